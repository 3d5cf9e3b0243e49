"""The sampler and scheduler names the API accepts.

Names follow ComfyUI's lists because the sync dialect (seed 000) exposes them and its users
expect them to mean what they mean there. The implementations live in `auraserve.engine`;
this module holds only the names so that request validation never imports torch.
"""

from typing import Final

SAMPLERS: Final[tuple[str, ...]] = (
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
)

SCHEDULERS: Final[tuple[str, ...]] = (
    "normal",
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "linear_quadratic",
    "kl_optimal",
)

OUTPUT_FORMATS: Final[tuple[str, ...]] = ("png", "webp", "jpeg")

MEDIA_TYPES: Final[dict[str, str]] = {
    "png": "image/png",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
}


def require_one_of(value: str, allowed: tuple[str, ...]) -> str:
    """Validator body shared by the request and the presets: one message for one rule."""
    if value not in allowed:
        raise ValueError(f"must be one of: {', '.join(allowed)}")
    return value
