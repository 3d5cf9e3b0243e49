"""Which engine optimisations a worker runs with: a torch-free description, validated with the
settings, so that an API process checks `AURASERVE_ENGINE_MODE` without importing the model
stack. `auraserve.engine.optimize` applies them; its module docstring says what each one does.

`EngineOptions()` (every field at its default) changes nothing: the engine stays bit-identical
to diffusers on fp32 CPU. A mode string names a preset, `field=value` pairs, or both
(`fast,fp8=1`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SdpaBackend = Literal["default", "auto", "cudnn", "flash", "efficient", "math"]
CompileMode = Literal["none", "blocks"]
VaeDtype = Literal["same", "bfloat16", "float16", "float32"]
Fp8Backend = Literal["torchao", "native"]
StepCacheMethod = Literal["none", "fbcache", "taylorseer"]
AttentionChoice = Literal["diffusers", "auto", "sdpa", "cudnn", "flash3"]


class EngineOptions(BaseModel):
    """Which optimisations an engine runs with. The defaults switch every one of them off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fuse_qkv: bool = False
    # "default": torch's own choice, untouched. "auto": cuDNN, flash, efficient, math, in that
    # order of preference (cuDNN attention is the fastest on Hopper where it applies). A named
    # backend is preferred and the others stay as fallbacks.
    sdpa_backend: SdpaBackend = "default"
    # "blocks": regional compilation of the repeated transformer blocks.
    compile: CompileMode = "none"
    # Dynamic shapes from the first compile: one graph serves every size and batch (only a
    # single-row batch is specialised); False compiles per shape (faster kernels, recompiles).
    compile_dynamic: bool = True
    autotune: bool = False  # inductor max-autotune; CUDA only; minutes of warm-up
    cuda_graphs: bool = False  # with compile="blocks" on CUDA
    vae_channels_last: bool = False
    vae_dtype: VaeDtype = "same"  # "same" keeps the VAE's load-time dtype
    # Tiled decode when width × height > this² (px); 0: never.
    vae_tiling_above: int = Field(0, ge=0)
    # Tile side in px when tiling (0: the VAE's own, 1024 for SDXL's). Larger tiles: fewer
    # seams and GroupNorm-statistics mismatches between tiles, more memory per tile.
    vae_tile_size: int = Field(0, ge=0, multiple_of=8)
    text_cache_size: int = Field(0, ge=0)  # prompt-embedding LRU entries; 0: no cache
    fp8: bool = False
    fp8_backend: Fp8Backend = "torchao"
    # Our AuraFlow attention processor (engine.optimize.attention): "auto" picks
    # FlashAttention-3 on Hopper where flash_attn_interface is installed, cuDNN attention on
    # other CUDA GPUs, torch's SDPA on the CPU (bit-identical there), once at load; a name
    # forces that kernel. "diffusers": diffusers' own processor, untouched.
    attention: AttentionChoice = "diffusers"
    # Step caching (engine.optimize.step_cache): "fbcache" skips the blocks after the first
    # where the first block's residual changed by less than cache_threshold (relative L1)
    # since that row's last full computation, reusing the residual; "taylorseer" forecasts
    # it to first order in σ instead. Lossy when the threshold is above 0 (0: never skips,
    # bit-identical). No skip before cache_warmup steps are done; at most cache_max_skip
    # consecutive skips per row (0: no limit).
    step_cache: StepCacheMethod = "none"
    cache_threshold: float = Field(0.08, ge=0.0, le=10.0)
    cache_warmup: int = Field(2, ge=0, le=1000)
    cache_max_skip: int = Field(3, ge=0, le=1000)

    @model_validator(mode="after")
    def _consistent(self) -> EngineOptions:
        if self.cuda_graphs and self.compile == "none":
            raise ValueError("cuda_graphs needs compile=blocks (graphs are captured by it)")
        if self.autotune and self.compile == "none":
            raise ValueError("autotune needs compile=blocks")
        return self

    @property
    def step_cache_lossy(self) -> bool:
        return self.step_cache != "none" and self.cache_threshold > 0

    def lossy(self) -> list[dict[str, Any]]:
        """The lossy options in force, for the fidelity label of every image they touch.
        Quantised weights of the checkpoint itself are the loader's to add."""
        items: list[dict[str, Any]] = []
        if self.step_cache_lossy:
            items.append(
                {
                    "option": "step_cache",
                    "method": self.step_cache,
                    "threshold": self.cache_threshold,
                    "warmup_steps": self.cache_warmup,
                    "max_skip": self.cache_max_skip,
                }
            )
        if self.fp8:
            items.append({"option": "fp8", "backend": self.fp8_backend})
        return items

    def exact(self) -> EngineOptions:
        """These options without the lossy step cache, for a job that asks for exact output.
        (fp8 is in the weights and cannot be dropped per job.)"""
        return self.replace(step_cache="none") if self.step_cache_lossy else self

    @property
    def is_default(self) -> bool:
        return self == EngineOptions()

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> EngineOptions:
        """A validated copy with `changes` applied (`model_copy` would skip validation)."""
        return EngineOptions(**{**self.model_dump(), **changes})

    @classmethod
    def parse(cls, spec: str) -> EngineOptions:
        """A preset name, or comma-separated `field=value` pairs (both: `fast,fp8=1`).

        For command lines and config files: "fast", "fuse_qkv=1,compile=blocks",
        "fp8_native,text_cache_size=1024". Raises ValueError naming the bad part.
        """
        values: dict[str, Any] = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            if "=" not in part:
                if part not in PRESETS:
                    raise ValueError(f"unknown engine mode {part!r}; presets: {', '.join(PRESETS)}")
                values.update(PRESETS[part].model_dump(exclude_defaults=True))
                continue
            name, _, raw = (s.strip() for s in part.partition("="))
            if name not in cls.model_fields:
                known = ", ".join(cls.model_fields)
                raise ValueError(f"unknown engine option {name!r}; known: {known}")
            values[name] = raw
        try:
            return cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            message = str(err["msg"]).removeprefix("Value error, ")
            raise ValueError(f"{where}: {message}" if where else message) from None


_FAST = EngineOptions(
    fuse_qkv=True,
    sdpa_backend="auto",
    compile="blocks",
    vae_channels_last=True,
    vae_dtype="bfloat16",
    vae_tiling_above=1536,
    text_cache_size=256,
)

#: Named modes: one per optimisation (each measurable alone), then the combinations.
PRESETS: dict[str, EngineOptions] = {
    "default": EngineOptions(),
    "fused_qkv": EngineOptions(fuse_qkv=True),
    "sdpa": EngineOptions(sdpa_backend="auto"),
    "compile": EngineOptions(compile="blocks"),
    "compile_cudagraphs": EngineOptions(compile="blocks", cuda_graphs=True),
    "vae": EngineOptions(vae_channels_last=True, vae_dtype="bfloat16", vae_tiling_above=1536),
    "text_cache": EngineOptions(text_cache_size=256),
    "fast": _FAST,
    "fast_cudagraphs": _FAST.replace(cuda_graphs=True),
    "fp8": _FAST.replace(fp8=True, fp8_backend="torchao"),
    "fp8_native": _FAST.replace(fp8=True, fp8_backend="native"),
    "attention": EngineOptions(attention="auto"),
    "fast_attention": _FAST.replace(attention="auto"),
    # Step caching, lossy: every image they touch is labelled {"exact": false, ...}.
    "cache_light": EngineOptions(step_cache="fbcache", cache_threshold=0.05, cache_warmup=3),
    "cache_fast": EngineOptions(step_cache="fbcache", cache_threshold=0.12, cache_warmup=2),
    "cache_taylor": EngineOptions(
        step_cache="taylorseer", cache_threshold=0.12, cache_warmup=2, cache_max_skip=4
    ),
    "cache_max": _FAST.replace(step_cache="fbcache", cache_threshold=0.08),  # with "fast"
}
