# syntax=docker/dockerfile:1.7
#
# auraserve: one image for API replicas (`serve --workers 0`), GPU workers (`worker`) and
# migrations (`db upgrade`). docs/deploy.md says how to build and run it.
#
#   docker build -t auraserve:0.1.0 .                                     # CUDA (GPU workers)
#   docker build -t auraserve:0.1.0-cpu \
#     --build-arg BASE_IMAGE=ubuntu:22.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .  # CPU only, ~1 GB smaller
#
# CUDA comes from the torch wheel: PyPI's torch 2.13.0 for Linux x86-64 is the CUDA 13.0 build
# and depends on the CUDA runtime, cuBLAS and cuDNN as pip packages (cuda-toolkit 13.0.3,
# nvidia-cudnn-cu13 9.20). So the base is NVIDIA's small `base` flavour (cudart, the driver
# compatibility package and the NVIDIA_* variables the container toolkit reads, including
# NVIDIA_REQUIRE_CUDA=cuda>=13.0: the host driver must be 580 or newer); a `cudnn-runtime`
# base would ship a second copy of those libraries (~3 GB) that torch never loads.
# For drivers older than 580 build with a CUDA 12.x pair, e.g.
#   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Pin BASE_IMAGE by digest (`@sha256:…`) in a release pipeline; tags can be re-pushed.

ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu22.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

# --- build: Python 3.11, torch, the project, in a virtual environment under /opt ------------
FROM ${BASE_IMAGE} AS build
ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu 22.04 ships Python 3.10; uv installs a standalone CPython 3.11 build under /opt/python,
# which the runtime stage copies as it is (no compiler, no deadsnakes PPA).
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
COPY --from=uv /uv /usr/local/bin/uv
# Apt packages are not version-pinned (hadolint DL3008): Ubuntu's security updates replace the
# pinned versions and break the build; the base image's tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv
# torch alone first, from TORCH_INDEX_URL: its layer (~3 GB with CUDA) changes far less often
# than the project's, and the project's `torch>=2.4` is then already satisfied.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install /src

# --- runtime --------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
# tini is PID 1: it forwards SIGTERM to auraserve (whose handlers run the graceful stop) and
# reaps the compile workers torch.compile forks.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 auraserve \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/auraserve \
       --shell /usr/sbin/nologin auraserve \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/auraserve \
    && install -d -o 10001 -g 10001 -m 0755 /models /cache
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/auraserve \
    # Listen on every interface of the container (the default 127.0.0.1 is for bare hosts).
    AURASERVE_HOST=0.0.0.0 \
    AURASERVE_PORT=8000 \
    # The embedded default's SQLite, media and secret.key; unused with PostgreSQL + S3 and a
    # shared AURASERVE_SECRET_KEY, as in compose.yaml and deploy/k8s.
    AURASERVE_DATA_DIR=/var/lib/auraserve \
    AURASERVE_LOG_FORMAT=json \
    # Weights are mounted, not baked in: AURASERVE_MODEL=/models/AuraFlow-v0.3 (read-only).
    # Hub downloads (AURASERVE_MODEL=fal/AuraFlow-v0.3 without HF_HUB_OFFLINE) and compile
    # caches go to /cache, a writable mount; the root filesystem can stay read-only.
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor

VOLUME ["/models", "/cache"]
USER 10001:10001
WORKDIR /var/lib/auraserve
EXPOSE 8000

# Liveness of the API (`serve`). A `worker` container serves no HTTP: compose.yaml disables
# this check for it, and Kubernetes ignores HEALTHCHECK (deploy/k8s has its own probes).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('AURASERVE_PORT', '8000') + '/healthz', timeout=4)"]

ENTRYPOINT ["tini", "--", "auraserve"]
CMD ["serve", "--workers", "0"]
