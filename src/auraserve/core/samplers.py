"""The sampler, scheduler and output-format names the API accepts.

Names follow ComfyUI's lists because the Sync API exposes them and its users
expect them to mean what they mean there. The implementations live in `auraserve.engine`;
this module holds only the names, as `Literal` types (so pydantic models and the OpenAPI
document carry the enums) and as tuples derived from them, so request validation never
imports torch.
"""

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

SAMPLERS: Final[tuple[str, ...]] = get_args(SamplerName)
SCHEDULERS: Final[tuple[str, ...]] = get_args(SchedulerName)
OUTPUT_FORMATS: Final[tuple[str, ...]] = get_args(OutputFormat)

MEDIA_TYPES: Final[dict[str, str]] = {
    "png": "image/png",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
}
