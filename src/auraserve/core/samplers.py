"""The sampler, scheduler and output-format names the API accepts, and what each sampler is.

Names follow ComfyUI's lists because the Sync API exposes them and its users
expect them to mean what they mean there. The implementations live in `auraserve.engine`;
this module holds the names, as `Literal` types (so pydantic models and the OpenAPI document
carry the enums) and as tuples, and the samplers' facts, so request validation never imports
torch.

A sampler's facts are one `SamplerSpec` record in `SAMPLER_SPECS`; everything else (the
engine's implementation map, which samplers draw noise, the schedule rule for dpm_2 and
uni_pc, the names listed by the API and the docs) derives from those records, and tests hold
the `SamplerName` Literal, the engine's map and the samplers' behaviour to them.
"""

from dataclasses import dataclass
from typing import Final, Literal, get_args

SamplerName = Literal[
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
]


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler, once.

    `stochastic`: it draws fresh noise while sampling (ancestral and SDE samplers), so its
    images depend on the sampler noise seed as well as the initial noise.
    `model_calls_per_step`: denoiser calls in a step (each a transformer pass over every CFG
    row); the last step, down to σ = 0, may take fewer.
    `discard_penultimate_sigma`: ComfyUI's KSampler computes one extra sigma for it and drops
    the penultimate (the schedule keeps steps + 1 values).
    """

    name: SamplerName
    stochastic: bool = False
    model_calls_per_step: int = 1
    discard_penultimate_sigma: bool = False


SAMPLER_SPECS: Final[tuple[SamplerSpec, ...]] = (
    SamplerSpec("euler"),
    SamplerSpec("euler_ancestral", stochastic=True),
    SamplerSpec("heun", model_calls_per_step=2),
    SamplerSpec("dpm_2", model_calls_per_step=2, discard_penultimate_sigma=True),
    SamplerSpec(
        "dpm_2_ancestral", stochastic=True, model_calls_per_step=2, discard_penultimate_sigma=True
    ),
    SamplerSpec("lms"),
    SamplerSpec("dpmpp_2s_ancestral", stochastic=True, model_calls_per_step=2),
    SamplerSpec("dpmpp_sde", stochastic=True, model_calls_per_step=2),
    SamplerSpec("dpmpp_2m"),
    SamplerSpec("dpmpp_2m_sde", stochastic=True),
    SamplerSpec("dpmpp_3m_sde", stochastic=True),
    SamplerSpec("ddim"),
    SamplerSpec("uni_pc", discard_penultimate_sigma=True),
    SamplerSpec("uni_pc_bh2", discard_penultimate_sigma=True),
)

_SPEC_BY_NAME: Final[dict[str, SamplerSpec]] = {spec.name: spec for spec in SAMPLER_SPECS}


def sampler_spec(name: str) -> SamplerSpec:
    """The record of sampler `name`; ValueError for a name that is not one."""
    spec = _SPEC_BY_NAME.get(name)
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
    return spec


SchedulerName = Literal[
    "normal",
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "linear_quadratic",
    "kl_optimal",
]

OutputFormat = Literal["png", "webp", "jpeg"]

SAMPLERS: Final[tuple[str, ...]] = tuple(spec.name for spec in SAMPLER_SPECS)
SCHEDULERS: Final[tuple[str, ...]] = get_args(SchedulerName)
OUTPUT_FORMATS: Final[tuple[str, ...]] = get_args(OutputFormat)

MEDIA_TYPES: Final[dict[str, str]] = {
    "png": "image/png",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
}
