"""`worker --parallel` (cfg=2, ulysses=N, cfg=2,ulysses=N): one worker whose engine spans
several processes (ranks).

This process is rank 0: it claims, settles and hands back jobs like any worker, and hands each
batch to the followers it spawned (`engine.parallel.GroupEngine`). The followers load the same
model, join the group and compute their share of every transformer call; they never touch the
store.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Any

from auraserve.cli.engine import load_models
from auraserve.config import Settings
from auraserve.errors import ConfigError

if TYPE_CHECKING:
    from auraserve.engine.parallel import GroupEngine, ParallelSpec


def load_group(settings: Settings, models: list[str], spec: str) -> GroupEngine:
    """Start the followers, join them and load rank 0's engine; the group's engine."""
    import torch.multiprocessing as mp

    from auraserve.engine.parallel import GroupEngine, install, parse_parallel, start_group

    parallel = parse_parallel(spec)
    if settings.gpus:
        raise ConfigError("--parallel runs one group of ranks; it does not combine with --gpus")
    context = mp.get_context("spawn")
    commands = [context.Queue() for _ in range(parallel.world_size - 1)]
    group = start_group(
        _follower,
        (parallel, settings, models, commands, os.getpid()),
        parallel,
        settings.device,
        settings.parallel_timeout_s,
    )
    try:
        engine = _single_engine(settings, models)
        install(engine, group.split)
    except BaseException:
        group.abort()
        raise
    return GroupEngine(engine, group, commands)


def _single_engine(settings: Settings, models: list[str]) -> Any:
    from auraserve.engine.pipeline import AuraFlowEngine

    engine = load_models(settings, models)
    if not isinstance(engine, AuraFlowEngine):
        raise ConfigError(
            "--parallel serves one model's weights per group; choose presets that share "
            "them with --models"
        )
    return engine


def _follower(
    index: int,
    port: int,
    spec: ParallelSpec,
    settings: Settings,
    models: list[str],
    commands: list[Any],
    parent: int,
) -> None:
    from auraserve.engine.parallel import follow, install, join_group, leave_group

    # Rank 0 owns the signals: it stops the group (a terminal's Ctrl-C reaches every rank).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    split = join_group(index + 1, spec, port, settings.device, settings.parallel_timeout_s)
    try:
        engine = _single_engine(settings, models)
        install(engine, split)
        follow(engine, commands[index], parent)
    finally:
        leave_group()
