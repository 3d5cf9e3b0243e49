"""diffusers' classes the engine uses, imported from the modules that define them.

`from diffusers import AuraFlowPipeline` resolves, for a type checker, to a placeholder from
diffusers' dummy-objects module (its lazy top level cannot be followed statically), so every
attribute looked unknown; the defining modules give mypy the real classes. Same objects at run
time.
"""

from __future__ import annotations

from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.auraflow_transformer_2d import (
    AuraFlowPatchEmbed,
    AuraFlowTransformer2DModel,
)
from diffusers.pipelines.aura_flow.pipeline_aura_flow import AuraFlowPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
)

__all__ = [
    "AuraFlowPatchEmbed",
    "AuraFlowPipeline",
    "AuraFlowTransformer2DModel",
    "AutoencoderKL",
    "FlowMatchEulerDiscreteScheduler",
]
