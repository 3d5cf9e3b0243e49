"""One worker process per GPU: `auraserve worker --gpus all|0,1,3` and `serve --gpus`.

Each worker is a child process born with CUDA_VISIBLE_DEVICES naming its one GPU, so torch,
its kernels and every library below it see that GPU alone (as `cuda:0`): no code path can
drift onto a sibling's card, and an out-of-memory or a CUDA fault on one card takes one
worker down, not the host's others. The children are supervised by `cli.processes`'
`Supervisor`, as the API processes are: spawned, not forked (no inherited CUDA context, store
connections or threads), restarted when they exit (after a growing pause if they keep dying
young), and stopped on SIGTERM with the usual grace (the batch in hand may finish within
AURASERVE_STOP_GRACE_SECONDS, then goes back to the queue; a second signal hands it back at
once). Each registers in the worker registry with its GPU in the device (GET /v2/workers,
`auraserve workers`), and its metrics carry `device="gpu<N>"`.

Which GPUs there are: CUDA_VISIBLE_DEVICES when the supervisor was given one (a Kubernetes
device plugin or a scheduler sets it; "--gpus 1" then means its second entry), otherwise
torch's device count. AURASERVE_TEST_GPUS (hidden, for tests) replaces that list, so the
supervision and the pinning are tested on machines without a GPU (the children then run on
the CPU with `--device cpu`; they are still pinned, and report it).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

from auraserve.cli.engine import load_models
from auraserve.cli.processes import ChildPlan, die_with_parent
from auraserve.config import Settings
from auraserve.errors import ConfigError

log = logging.getLogger("auraserve")

TEST_GPUS_ENV = "AURASERVE_TEST_GPUS"
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


def available_gpus() -> list[str]:
    """The GPUs this process may hand out, as CUDA_VISIBLE_DEVICES entries."""
    fake = os.environ.get(TEST_GPUS_ENV)
    if fake is not None:
        return [part.strip() for part in fake.split(",") if part.strip()]
    visible = os.environ.get(VISIBLE_ENV)
    if visible is not None:
        return [part.strip() for part in visible.split(",") if part.strip()]
    import torch  # the worker side: the model stack is installed here

    return [str(i) for i in range(torch.cuda.device_count())]


def resolve_gpus(setting: str) -> list[str]:
    """`--gpus` as the CUDA_VISIBLE_DEVICES value of each child, in order."""
    gpus = available_gpus()
    if not gpus:
        raise ConfigError(f"--gpus {setting}: this machine has no GPU that CUDA can see")
    if setting == "all":
        return gpus
    chosen = []
    for part in setting.split(","):
        index = int(part)
        if index >= len(gpus):
            raise ConfigError(
                f"--gpus {setting}: there is no GPU {index}; this machine has {len(gpus)} "
                f"(0 to {len(gpus) - 1})"
            )
        chosen.append(gpus[index])
    return chosen


def gpu_worker_plans(
    settings: Settings,
    models: list[str],
    setup_logging: Callable[[], object],
    *,
    json_lines: bool,
) -> list[ChildPlan]:
    """One supervised child per GPU of `settings.gpus`, each serving `models`."""
    plans = []
    for gpu in resolve_gpus(settings.gpus):
        child_settings = settings
        if settings.worker_id:
            # A configured id names the host's workers; each GPU's gets its own suffix.
            child_settings = settings.model_copy(
                update={"worker_id": f"{settings.worker_id}-gpu{gpu}"}
            )
        plans.append(
            ChildPlan(
                label=f"GPU worker {gpu}",
                target=gpu_worker_main,
                args=(child_settings, models, setup_logging, json_lines),
                # Its own grace, then the hand-back, then the store closes: a margin on top.
                grace=settings.stop_grace_seconds + 5.0,
                env={VISIBLE_ENV: gpu},
            )
        )
    return plans


def gpu_worker_main(
    settings: Settings,
    models: list[str],
    setup_logging: Callable[[], object],
    json_lines: bool,
    ready: MpEvent,
) -> None:
    """One pinned worker: load the model on its GPU, claim jobs until a signal stops it."""
    die_with_parent()
    setup_logging()
    from auraserve.runtime import Runtime

    gpu = os.environ[VISIBLE_ENV]  # as this process was born with it: what it reports
    runtime = Runtime.open(settings)
    signals = 0

    def on_signal(signum: int, _frame: Any) -> None:
        # A signal handler: only events are set; the main thread acts.
        nonlocal signals
        signals += 1
        if signals == 1:
            runtime.begin_stop()
        else:
            runtime.hurry.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runtime.engine = load_models(settings, models)
        worker = runtime.start_worker(models=models, gpu=gpu)
        if json_lines:
            import json

            record = {"event": "ready", "worker_id": worker.worker_id, "gpu": gpu}
            print(json.dumps(record), flush=True)
        else:
            print(f"worker {worker.worker_id} ready on GPU {gpu}", flush=True)
        ready.set()
        while not runtime.stopping.wait(0.5) and not worker.finished:
            pass
        crashed = worker.finished and not runtime.stopping.is_set()
    finally:
        runtime.close()  # the grace, then the hand-back: Worker.stop
    if crashed:
        print(f"auraserve: the worker on GPU {gpu} stopped on its own", file=sys.stderr)
        sys.exit(1)
