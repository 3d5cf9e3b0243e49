"""One image across several processes over torch.distributed: CFG-parallel transformer rows
(`cfg=2`), Ulysses sequence parallelism (`ulysses=N`, `engine.ulysses`) and their product.

No library does this for AuraFlow (xDiT has no AuraFlow pipeline; diffusers' context
parallelism has no plan for AuraFlow's transformer, see docs/architecture.md), so the split
is ours. This module holds the groups (spawning, sub-groups, the cancel broadcast, rank 0's
`GroupEngine`) and the *row* (batch) split of the one transformer call; `engine.ulysses` the
token split inside it. With `cfg=2,ulysses=M` rank c·M+u computes row half c and token
shard u: the tokens are gathered inside each sequence group, then the rows across them.

Every rank runs the whole engine (text encoding, seeded noise, sampler, VAE) on the same
requests, so every rank holds the same latents at every step. Only the transformer forward on
the stacked [uncond rows, cond rows] batch (`AuraFlowEngine._chunked_forward`) is split: rank r
computes rows [r·k, (r+1)·k) with k = ceil(rows / world), and an all_gather hands the full
velocity back to every rank. With `cfg=2` and a CFG batch, rank 0 computes the uncond rows
and rank 1 the cond rows. When the halves are uneven (requests with guidance_scale ≤ 1 have no
uncond row, so a lone such request has one row) the last rank's slice is padded by repeating
its last row; the padding is computed and dropped, never mixed in. LoRA adapters are set per
batch (every row the same adapters, `engine.lora`), so a slice of rows needs no remapping.

Batch independence (`engine.pipeline`) makes the result the single-process image: on fp32 CPU
each row's velocity does not depend on which rows share its forward.

Backends: gloo on the CPU, nccl on CUDA (rank r on cuda:r). Ranks rendezvous over TCP on
127.0.0.1: the group lives on one machine and needs no external launcher.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image

from auraserve.core.request import GenerationRequest
from auraserve.engine.base import CancelCheck, JobResult, StepCallback
from auraserve.engine.ulysses import SequenceSplit, install_sequence_split
from auraserve.errors import ConfigError, JobCancelled, UnsupportedRequest

Forward = Callable[[torch.Tensor, float], torch.Tensor]

MODES = ("cfg", "ulysses")
# How long a rank waits in a collective for a hung peer (AURASERVE_PARALLEL_TIMEOUT_S).
DEFAULT_GROUP_TIMEOUT_S = 300.0
EXPECTED = "cfg=2, ulysses=N or cfg=2,ulysses=N"


@dataclass(frozen=True)
class ParallelSpec:
    """How many ranks one image runs on, by mode: `cfg=2` (the uncond and cond rows),
    `ulysses=N` (the tokens, heads around attention) or both (cfg·ulysses ranks)."""

    cfg: int = 1
    ulysses: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses

    def __str__(self) -> str:
        parts = [f"cfg={self.cfg}"] if self.cfg > 1 else []
        parts += [f"ulysses={self.ulysses}"] if self.ulysses > 1 else []
        return ",".join(parts)


def parse_parallel(text: str) -> ParallelSpec:
    """`cfg=2`, `ulysses=4`, `cfg=2,ulysses=2` → a ParallelSpec; anything else is a
    ConfigError naming what is allowed. Whether N divides the model's heads is checked when
    the model is there (`engine.ulysses.install_sequence_split`)."""
    fields: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MODES or name in fields:
            raise ConfigError(f"--parallel {text}: expected {EXPECTED}")
        try:
            fields[name] = int(value)
        except ValueError:
            raise ConfigError(f"--parallel {text}: {name} must be an integer") from None
    if not fields:
        raise ConfigError(f"--parallel {text}: expected {EXPECTED}")
    if "cfg" in fields and fields["cfg"] != 2:
        raise ConfigError(f"--parallel {text}: cfg must be 2 (uncond and cond halves)")
    if "ulysses" in fields and fields["ulysses"] < 2:
        raise ConfigError(f"--parallel {text}: ulysses must be 2 or more (ranks per image)")
    return ParallelSpec(**fields)


class RowSplit:
    """This rank's share of the transformer rows, and the all_gather that rejoins them."""

    def __init__(self, rank: int, world: int, group: Any = None) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a group of {world}")
        self.rank = rank
        self.world = world
        self.group = group  # None: the default (world) group

    def indices(self, total: int) -> list[int]:
        """Rows this rank computes: its contiguous slice, padded to the common length by
        repeating the last row (all_gather needs equal shapes)."""
        size = math.ceil(total / self.world)
        start = self.rank * size
        return [min(start + j, total - 1) for j in range(size)]

    def wrap(
        self, make_forward: Callable[[torch.Tensor], Forward], context: torch.Tensor
    ) -> Forward:
        """The full-batch forward, computed a slice per rank. `make_forward(context)` builds
        the local forward (the engine's chunked transformer call) on this rank's rows."""
        total = context.shape[0]
        index = torch.tensor(self.indices(total), dtype=torch.long, device=context.device)
        local = make_forward(context.index_select(0, index))

        def forward(x: torch.Tensor, sigma: float) -> torch.Tensor:
            v = local(x.index_select(0, index), sigma).contiguous()
            parts = [torch.empty_like(v) for _ in range(self.world)]
            dist.all_gather(parts, v, group=self.group)
            return torch.cat(parts)[:total]

        return forward


@dataclass(frozen=True)
class Placement:
    """This rank's shares of each transformer call: its rows (cfg; None without) and its
    tokens (ulysses; None without). Rank = cfg index · ulysses + ulysses index: the ranks of
    one sequence group are neighbours (on one machine, nccl's fastest pairs)."""

    rank: int
    spec: ParallelSpec
    rows: RowSplit | None
    sequence: SequenceSplit | None

    @property
    def world(self) -> int:
        return self.spec.world_size


def place(rank: int, spec: ParallelSpec) -> Placement:
    """This rank's Placement, with the sub-groups it needs. Every rank must call it (in the
    same order, once the group is up): new_group is a collective over the whole world."""
    cfg, ulysses = spec.cfg, spec.ulysses
    row_index, seq_index = divmod(rank, ulysses)
    rows = sequence = None
    if cfg > 1 and ulysses > 1:
        # Rows are gathered across sequence groups, between ranks with the same token shard.
        row_groups = [dist.new_group([c * ulysses + u for c in range(cfg)]) for u in range(ulysses)]
        seq_groups = [dist.new_group([c * ulysses + u for u in range(ulysses)]) for c in range(cfg)]
        rows = RowSplit(row_index, cfg, row_groups[seq_index])
        sequence = SequenceSplit(seq_index, ulysses, seq_groups[row_index])
    elif cfg > 1:
        rows = RowSplit(rank, cfg)
    else:
        sequence = SequenceSplit(rank, ulysses)
    return Placement(rank, spec, rows, sequence)


def install(engine: Any, placement: Placement | RowSplit) -> None:
    """Make `engine` (an AuraFlowEngine) compute only this rank's rows and tokens of each
    forward (a bare RowSplit: rows only). The step cache keeps per-row state and per-job skip
    counts over the whole batch and decides from the whole output, which one rank does not
    see: the two do not combine (yet)."""
    if isinstance(placement, RowSplit):
        spec = ParallelSpec(cfg=placement.world)
        placement = Placement(placement.rank, spec, placement, None)
    if getattr(engine, "cache_settings", None) is not None:
        raise ConfigError(
            "--parallel does not combine with a step_cache engine mode yet; drop one of them"
        )
    if placement.sequence is not None:
        options = getattr(engine, "options", None)
        if options is not None and options.compile != "none":
            # The all-to-alls run inside the blocks that compile wraps (as graph breaks);
            # that path, with or without CUDA graphs, has not been run on GPUs here.
            raise ConfigError(
                "--parallel ulysses does not combine with the compile engine mode yet; "
                "drop one of them"
            )
        install_sequence_split(engine.pipe.transformer, placement.sequence)
    engine.row_split = placement.rows


def free_port() -> int:
    """A loopback port for the group's rendezvous (free now; taken by rank 0 at init)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def uses_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def check_devices(device: str, world: int) -> None:
    """nccl needs one GPU per rank; say so before any process starts."""
    if uses_cuda(device) and torch.cuda.device_count() < world:
        raise ConfigError(
            f"--parallel needs {world} GPUs (one per rank); {torch.cuda.device_count()} visible"
        )


def join_group(
    rank: int,
    spec: ParallelSpec | int,
    port: int,
    device: str,
    timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
) -> Placement:
    """Join the group (blocks until every rank has joined) and pin this rank's GPU; `spec`
    (an int: cfg over that many ranks) says how the work is shared. `timeout_s`: how long a
    collective waits for a hung peer before it fails."""
    spec = spec if isinstance(spec, ParallelSpec) else ParallelSpec(cfg=spec)
    world = spec.world_size
    cuda = uses_cuda(device)
    if cuda:
        # Before the model loads: "cuda" then means this rank's own GPU.
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    return place(rank, spec)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Group:
    """Rank 0's handle on the followers it spawned."""

    def __init__(self, split: Placement, context: Any) -> None:
        self.split = split
        self._context = context

    def finish(self) -> None:
        """Wait for the followers to end (they end after the last collective), then leave."""
        try:
            while not self._context.join(timeout=1.0):
                pass
        finally:
            leave_group()

    def alive(self, wait: float = 0.0) -> bool:
        """Every follower still running (`wait`: give a dying one time to be reaped)."""
        deadline = time.monotonic() + wait
        while True:
            if not all(p.is_alive() for p in self._context.processes):
                return False
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.1)

    def abort(self) -> None:
        """Rank 0 failed: the followers would wait in a collective until the timeout."""
        _stop(self._context)
        leave_group()


def start_group(
    follower: Callable[..., None],
    args: tuple[object, ...],
    spec: ParallelSpec | int,
    device: str,
    timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
) -> Group:
    """This process becomes rank 0; ranks 1..world-1 are spawned (`torch.multiprocessing`,
    the spawn method: no external launcher) and run `follower(index, port, *args)`, where
    rank = index + 1. Returns once every rank has joined. A follower that fails before
    joining (say, its model does not load) stops the start at once with its error, not at
    the rendezvous timeout."""
    import torch.multiprocessing as mp

    spec = spec if isinstance(spec, ParallelSpec) else ParallelSpec(cfg=spec)
    world = spec.world_size
    check_devices(device, world)
    port = free_port()
    context = mp.start_processes(
        follower, args=(port, *args), nprocs=world - 1, join=False, start_method="spawn"
    )
    joined: list[Placement] = []
    errors: list[BaseException] = []

    def rendezvous() -> None:
        try:
            joined.append(join_group(0, spec, port, device, timeout_s))
        except BaseException as exc:  # handed to the main thread
            errors.append(exc)

    thread = threading.Thread(target=rendezvous, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            context.join(timeout=0.2)  # raises if a follower failed
            thread.join(timeout=0.2)
    except BaseException:
        _stop(context)
        raise
    if errors:
        _stop(context)
        raise errors[0]
    return Group(joined[0], context)


def _stop(context: Any) -> None:
    for process in context.processes:
        if process.is_alive():
            process.terminate()
    for process in context.processes:
        process.join(timeout=10)


# --------------------------------------------------------------------------------------------
# A served group: rank 0 is the worker, the followers compute what it hands them
# --------------------------------------------------------------------------------------------


def synced_cancel(cancelled: CancelCheck | None, size: int, device: torch.device) -> CancelCheck:
    """The engine's cancel check, decided by rank 0 and broadcast, so that every rank drops
    the same requests and stops at the same step (rank 0 passes the worker's check, the
    followers None). Every rank's engine calls it equally often: once, then once a step."""

    def check() -> set[int]:
        mask = torch.zeros(size, dtype=torch.uint8, device=device)
        if cancelled is not None:
            for i in cancelled():
                if 0 <= i < size:
                    mask[i] = 1
        dist.broadcast(mask, src=0)
        return {int(i) for i in mask.nonzero().flatten().tolist()}

    return check


class GroupEngine:
    """Rank 0's `Engine` for the worker: each batch goes to every follower (a queue per
    follower; no collective waits while the worker is idle), then every rank computes its
    share. The worker claims, settles and hands back exactly as with one process.

    A rank that dies breaks the group: `on_broken` runs (the worker hands its batch back to
    the queue, the attempt not spent, and stops), and the batch ends as cancelled-by-abort,
    so nothing is settled or charged. The process then exits non-zero for its supervisor to
    start a whole new group."""

    # Followers are sent (requests, images) only: a resumed rank 0 would run other steps than
    # they do. Set here because __getattr__ would otherwise answer for the wrapped engine.
    supports_checkpoints = False

    def __init__(self, engine: Any, group: Group, commands: list[Any]) -> None:
        self.engine = engine
        self.group = group
        self.commands = commands
        self.description = f"{engine.description}, parallel {group.split.spec}"
        self.is_test_model: bool = engine.is_test_model
        self.broken = False
        self.on_broken: Callable[[], None] = lambda: None
        # One batch at a time through the group: the followers run batches in queue order,
        # so the put and rank 0's own run must not interleave with another thread's.
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: StepCallback | None = None,
        cancelled: CancelCheck | None = None,
        init_images: Sequence[Image.Image | None] | None = None,
    ) -> list[JobResult]:
        with self._lock:
            if self.broken or not self.group.alive():
                self._break()
            images = list(init_images) if init_images is not None else None
            for queue in self.commands:
                queue.put((list(requests), images))
            try:
                results: list[JobResult] = self.engine.generate(
                    requests,
                    on_step=on_step,
                    cancelled=synced_cancel(cancelled, len(requests), self.engine.device),
                    init_images=images,
                )
            except Exception:
                if not self.group.alive(wait=1.0):
                    self._break()
                raise
            return results

    def _break(self) -> None:
        if not self.broken:  # once: another worker thread may find the group broken too
            self.broken = True
            self.on_broken()
        raise JobCancelled("the parallel group lost a rank; the batch went back to the queue")

    def close(self) -> None:
        for queue in self.commands:
            queue.put(None)
        if self.broken:
            self.group.abort()
        else:
            self.group.finish()


def follow(engine: Any, commands: Any, parent: int) -> None:
    """A follower's loop: run each batch rank 0 sends, until None or rank 0's process is
    gone. A request the engine refuses is refused on every rank alike; any other error ends
    this process (rank 0 then finds the group broken)."""
    import queue as queues

    while True:
        try:
            command = commands.get(timeout=1.0)
        except queues.Empty:
            if os.getppid() != parent:
                return
            continue
        if command is None:
            return
        requests, images = command
        try:
            engine.generate(
                requests,
                cancelled=synced_cancel(None, len(requests), engine.device),
                init_images=images,
            )
        except (JobCancelled, UnsupportedRequest, ValueError):
            continue


__all__ = [
    "DEFAULT_GROUP_TIMEOUT_S",
    "Group",
    "GroupEngine",
    "ParallelSpec",
    "Placement",
    "RowSplit",
    "check_devices",
    "follow",
    "free_port",
    "install",
    "join_group",
    "leave_group",
    "parse_parallel",
    "place",
    "start_group",
    "synced_cancel",
    "uses_cuda",
]
