"""Model presets: the model ids clients name in URLs, mapped to weights and default parameters.

Torch-free, like all of `core`: the settings validate presets at start and the API prices and
defaults requests from them without loading the model stack.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from auraserve.core.samplers import OutputFormat, SamplerName, SchedulerName

DEFAULT_WEIGHTS = "fal/AuraFlow-v0.3"
TINY_MODEL = "tiny"


class ModelPreset(BaseModel):
    """A model id that clients name in URLs, mapped to weights and default parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: str = DEFAULT_WEIGHTS
    description: str = ""
    width: Annotated[int, Field(ge=512, le=2048)] = 1024
    height: Annotated[int, Field(ge=512, le=2048)] = 1024
    steps: Annotated[int, Field(ge=1, le=100)] = 25
    guidance_scale: Annotated[float, Field(ge=0, le=20)] = 3.5
    shift: Annotated[float, Field(ge=0, le=10)] = 1.73
    sampler: SamplerName = "euler"
    scheduler: SchedulerName = "normal"
    output_format: OutputFormat = "png"
    output_quality: Annotated[int, Field(ge=0, le=100)] = 80
    # Credits for one 1024x1024 image at 25 steps; other sizes and step counts scale linearly.
    price_per_image: Annotated[int, Field(ge=0)] = 100


def default_presets() -> dict[str, ModelPreset]:
    return {
        "auraflow-v0-3": ModelPreset(description="AuraFlow v0.3, 1024x1024 by default"),
        # The hosted Queue API's example URL names this id; same weights, 512x512 by default.
        "auraflow-v0-3-512": ModelPreset(
            description="AuraFlow v0.3, 512x512 by default", width=512, height=512
        ),
    }
