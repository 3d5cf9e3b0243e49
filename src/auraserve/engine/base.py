"""The small interface between the worker and whatever runs the model.

The worker hands an engine a batch of canonical requests that share a batch key (same model,
size, steps, sampler, scheduler and shift) and gets back one `JobResult` per request. The
engine knows nothing about HTTP, the store or credits; the worker knows nothing about tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from auraserve.core.request import GenerationRequest

# Called after every finished denoising step with (step, total_steps); step counts from 1.
StepCallback = Callable[[int, int], None]
# Called between steps; returns the indexes (into the batch) of requests to drop now.
CancelCheck = Callable[[], Collection[int]]


@dataclass
class JobResult:
    """What one request of a batch produced. `images` is empty when the request was cancelled."""

    images: list[Image.Image]
    seeds: list[int]
    width: int
    height: int
    prompt_used: str
    cancelled: bool = False
    warnings: list[str] = field(default_factory=list)
    # Wall time the engine spent on the whole batch (encode → sample → decode), in seconds.
    engine_seconds: float = 0.0
    # How the images were computed: {"exact": True}, or {"exact": False, "lossy": [...]}
    # with one item per lossy option in force (step cache and its settings and skip counts,
    # fp8, quantised weights). The worker records it; status, webhooks and metadata show it.
    fidelity: dict[str, Any] = field(default_factory=lambda: {"exact": True})


@runtime_checkable
class Engine(Protocol):
    """Runs AuraFlow. Implementations: `engine.pipeline.AuraFlowEngine`."""

    #: Human label for logs and `/health`, e.g. "fal/AuraFlow-v0.3 (cuda, bfloat16)".
    description: str
    #: True for the tiny random-weight model, which draws noise; the API labels it so.
    is_test_model: bool

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: StepCallback | None = None,
        cancelled: CancelCheck | None = None,
        init_images: Sequence[Image.Image | None] | None = None,
    ) -> list[JobResult]:
        """Run a batch. Each request's images depend only on that request (never on the batch).

        `init_images` holds, per request, the decoded input of an image-to-image request (the
        worker fetches and decodes it; see `worker.inputs`), None for text-to-image; the
        worker passes it only when some request of the batch has an image.

        Raises `auraserve.errors.JobCancelled` if every request was cancelled; raises
        `auraserve.errors.UnsupportedRequest` for a request the model cannot run (the job
        FAILS); any other exception is a system fault (the job ERRORs). Neither is charged.
        """
        ...
