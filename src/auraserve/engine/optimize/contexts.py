"""Context managers around every forward of a module (SDPA backend choice, CUDA-graph steps).

Several optimisations need "run this call inside that context"; they share one wrapper per
module so they compose in the order they were added, whatever else wraps the module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch import nn

ContextFactory = Callable[[], AbstractContextManager[Any]]


class _ForwardInContexts:
    """Installed as a module's forward: the forward it replaced, inside every context."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner
        self.contexts: list[ContextFactory] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # One ExitStack per transformer call (25–50 per image): nothing next to a forward pass.
        with contextlib.ExitStack() as stack:
            for factory in self.contexts:
                stack.enter_context(factory())
            return self.inner(*args, **kwargs)


def add_forward_context(module: nn.Module, factory: ContextFactory) -> None:
    """Run every forward of `module` inside `factory()`. Wraps whatever forward is current
    (diffusers', or an offload hook's), so it composes with accelerate either way round."""
    wrapper = vars(module).get("forward")
    if not isinstance(wrapper, _ForwardInContexts):
        wrapper = _ForwardInContexts(module.forward)
        module.forward = wrapper
    wrapper.contexts.append(factory)
