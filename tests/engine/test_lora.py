"""LoRA per request on the tiny model: exactness against diffusers, key layouts, the cache,
bit-exact plain requests after adapters, and hot-swap without recompiling.

The adapters are built in code with PEFT on the tiny transformer and saved the two ways
operators get them: diffusers' `save_lora_weights` folder, and a kohya-style single file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from auraserve.core.engine_options import EngineOptions
from auraserve.core.lora import LoraSource, LoraSpec, available_loras
from auraserve.core.request import GenerationRequest
from auraserve.engine.lora import (
    Adapter,
    AdapterCache,
    LoraOptions,
    convert,
    module_aliases,
    original_module_names,
)
from auraserve.engine.pipeline import AuraFlowEngine
from auraserve.engine.tiny import build_tiny_pipeline
from auraserve.errors import UnsupportedRequest
from tests.engine.conftest import make_small_request

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.linear_1", "norm1.linear"]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def save_adapter(folder: Path, rank: int, alpha: int, seed: int) -> dict[str, torch.Tensor]:
    """A PEFT adapter on the tiny transformer, with weights large enough to change the image,
    saved as diffusers' training scripts save one (weights plus the LoraConfig as metadata)."""
    pipe = build_tiny_pipeline()
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(seed)
    pipe.transformer.add_adapter(config)
    state = get_peft_model_state_dict(pipe.transformer)
    state = {key: value.detach().clone() * 3.0 for key, value in state.items()}
    AuraFlowPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return state


def _kohya(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The same adapter in kohya's layout: underscored module names, down/up, an alpha each."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, rest = key.partition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        part = "lora_down" if rest.startswith("A") else "lora_up"
        out[f"{name}.{part}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def _comfyui(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """ComfyUI's layout: `diffusion_model.` + AuraFlow's original module names."""
    originals = {v: k for k, v in original_module_names(build_tiny_pipeline().transformer).items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, rest = key.partition(".lora_")
        name = "diffusion_model." + originals[module.removeprefix("transformer.")]
        part = "lora_down" if rest.startswith("A") else "lora_up"
        out[f"{name}.{part}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def _simpletuner(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """SimpleTuner's LyCORIS-trained LoRA: kohya's layout under `lycoris_`."""
    return {
        key.replace("lora_unet_", "lycoris_", 1): value
        for key, value in _kohya(state, alpha).items()
    }


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    style = save_adapter(root / "style", rank=4, alpha=8, seed=1)
    save_file(_kohya(style, alpha=8.0), str(root / "style-kohya.safetensors"))
    save_file(_comfyui(style, alpha=8.0), str(root / "style-comfyui.safetensors"))
    save_file(_simpletuner(style, alpha=8.0), str(root / "style-simpletuner.safetensors"))
    # Layouts the engine does not apply: refused when the folder is listed.
    module = "lycoris_joint_transformer_blocks_0_attn_to_q"
    save_file(
        {f"{module}.hada_w1_a": torch.ones(32, 2), f"{module}.hada_w1_b": torch.ones(2, 32)},
        str(root / "loha.safetensors"),
    )
    save_file({f"{module}.lokr_w1": torch.ones(4, 4)}, str(root / "lokr.safetensors"))
    dora = _kohya(style, alpha=8.0)
    dora["lora_unet_joint_transformer_blocks_0_attn_to_q.dora_scale"] = torch.ones(1, 32)
    save_file(dora, str(root / "dora.safetensors"))
    save_adapter(root / "other", rank=8, alpha=4, seed=2)
    save_adapter(root / "wide", rank=16, alpha=16, seed=3)
    return root


def _options(lora_dir: Path, **kwargs: Any) -> LoraOptions:
    return LoraOptions(registry=lambda: available_loras(lora_dir), max_rank=8, **kwargs)


def _engine(lora_dir: Path, options: EngineOptions | None = None, **kwargs: Any) -> AuraFlowEngine:
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return AuraFlowEngine(
        pipe,
        description="tiny",
        is_test_model=True,
        options=options,
        lora=_options(lora_dir, **kwargs),
    )


@pytest.fixture(scope="module")
def engine(lora_dir: Path) -> AuraFlowEngine:
    return _engine(lora_dir)


def _request(*loras: tuple[str, float], **overrides: Any) -> GenerationRequest:
    specs = tuple(LoraSpec(name=name, scale=scale) for name, scale in loras)
    fields: dict[str, Any] = {"size": 64, "steps": 2, "seed": 5}
    fields.update(overrides)
    # make_small_request dumps and re-constructs without validation: the specs go in after.
    return make_small_request(**fields).model_copy(update={"loras": specs})


def _image(engine: AuraFlowEngine, request: GenerationRequest) -> Image.Image:
    [result] = engine.generate([request])
    return result.images[0]


# --- exactness against diffusers --------------------------------------------------------------


def _diffusers_image(lora_dir: Path, request: GenerationRequest, scale: float) -> Image.Image:
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_dir / "style"), adapter_name="style")
    pipe.set_adapters(["style"], [scale])
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=request.shift)
    result = pipe(
        request.prompt,
        negative_prompt=request.negative_prompt,
        guidance_scale=request.guidance_scale,
        num_inference_steps=request.steps,
        height=request.height,
        width=request.width,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    )
    image: Image.Image = result.images[0]
    return image


def test_lora_matches_diffusers_load_lora_weights(engine: AuraFlowEngine, lora_dir: Path) -> None:
    request = _request(("style", 0.7), seed=11, size=128, steps=3)
    ours = _pixels(_image(engine, request))
    theirs = _pixels(_diffusers_image(lora_dir, request, 0.7))
    plain = _pixels(_image(engine, request.model_copy(update={"loras": ()})))
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - plain).mean() > 2  # the adapter really changed the image


@pytest.mark.parametrize("layout", ["style-kohya", "style-comfyui", "style-simpletuner"])
def test_every_layout_gives_the_peft_layout_image(engine: AuraFlowEngine, layout: str) -> None:
    diffusers_layout = _pixels(_image(engine, _request(("style", 1.0))))
    other_layout = _pixels(_image(engine, _request((layout, 1.0))))
    assert np.abs(diffusers_layout - other_layout).max() <= 1


def test_lycoris_and_dora_are_refused_when_listed(lora_dir: Path) -> None:
    from auraserve.core.lora import check_registry
    from auraserve.errors import InvalidParameter

    registry = available_loras(lora_dir)
    assert {"loha", "lokr", "dora"}.isdisjoint(registry)
    assert "LoHa" in registry.refused["loha"] and "LoKr" in registry.refused["lokr"]
    assert "DoRA" in registry.refused["dora"]
    with pytest.raises(InvalidParameter, match="'loha' cannot be used: LyCORIS LoHa"):
        check_registry([LoraSpec(name="loha")], registry, "loras")


def test_adapters_that_do_not_fit_stop_the_start(lora_dir: Path, tmp_path: Path) -> None:
    from auraserve.engine.lora import check_registry_fits
    from auraserve.errors import BadWeights

    transformer = build_tiny_pipeline().transformer
    registry = available_loras(lora_dir)
    assert check_registry_fits(registry, transformer, max_rank=16) == len(registry)
    with pytest.raises(BadWeights, match=r"wide.*rank 16 .* up to 8"):
        check_registry_fits(registry, transformer, max_rank=8)
    other = tmp_path / "other-model"
    other.mkdir()
    save_file(
        {
            "lora_unet_joint_transformer_blocks_0_attn_to_q.lora_down.weight": torch.ones(4, 48),
            "lora_unet_joint_transformer_blocks_0_attn_to_q.lora_up.weight": torch.ones(32, 4),
        },
        str(other / "sdxl-sized.safetensors"),
    )
    with pytest.raises(BadWeights, match=r"sdxl-sized.safetensors.*takes 32 inputs"):
        check_registry_fits(available_loras(other), transformer, max_rank=64)
    save_file(
        {"lora_unet_down_blocks_0_attentions_0.lora_down.weight": torch.ones(4, 48)},
        str(other / "sdxl-sized.safetensors"),
    )
    with pytest.raises(BadWeights, match=r"targets 'down_blocks_0_attentions_0'"):
        check_registry_fits(available_loras(other), transformer, max_rank=64)


def test_original_auraflow_names_map_with_diffusers_converter(engine: AuraFlowEngine) -> None:
    names = original_module_names(engine.pipe.transformer)
    assert names["double_layers.0.attn.w2q"] == "joint_transformer_blocks.0.attn.to_q"
    assert names["double_layers.0.attn.w1q"] == "joint_transformer_blocks.0.attn.add_q_proj"
    assert names["single_layers.0.mlp.c_fc1"] == "single_transformer_blocks.0.ff.linear_1"
    aliases = module_aliases(engine.pipe.transformer)
    down, up = torch.ones(2, 32), torch.ones(256, 2)
    comfy = {
        "diffusion_model.double_layers.0.attn.w2q.lora_A.weight": down,
        "diffusion_model.double_layers.0.attn.w2q.lora_B.weight": up,
    }
    [(module, (_, b))] = convert(comfy, aliases).items()
    assert module == "joint_transformer_blocks.0.attn.to_q"
    assert torch.equal(b, up)  # no alpha: alpha = rank, as diffusers assumes
    kohya = {
        "lora_unet_double_layers_0_attn_w2q.lora_down.weight": down,
        "lora_unet_double_layers_0_attn_w2q.lora_up.weight": up,
        "lora_unet_double_layers_0_attn_w2q.alpha": torch.tensor(1.0),
    }
    [(module, (_, b))] = convert(kohya, aliases).items()
    assert module == "joint_transformer_blocks.0.attn.to_q"
    assert torch.equal(b, up * 0.5)


def test_bad_adapters_fail_the_request_not_the_worker(engine: AuraFlowEngine) -> None:
    aliases = module_aliases(engine.pipe.transformer)
    with pytest.raises(UnsupportedRequest, match="lacks"):
        convert({"transformer.nowhere.lora_A.weight": torch.ones(1, 1)}, aliases)
    with pytest.raises(UnsupportedRequest, match="layout"):
        convert({"some.random.tensor": torch.ones(1)}, aliases)
    with pytest.raises(UnsupportedRequest, match="rank 16"):
        engine.generate([_request(("wide", 1.0))])
    with pytest.raises(UnsupportedRequest, match="unknown LoRA"):
        engine.generate([_request(("missing", 1.0))])
    with pytest.raises(ValueError, match=r"share its batch key: .*lora:style"):
        engine.generate([_request(("style", 1.0)), _request()])


def test_lora_needs_it_enabled_and_refuses_fused_layers(lora_dir: Path) -> None:
    pipe = build_tiny_pipeline()
    plain = AuraFlowEngine(pipe, description="tiny", is_test_model=True)
    with pytest.raises(UnsupportedRequest, match="not enabled"):
        plain.generate([_request(("style", 1.0))])
    fused = _engine(lora_dir, EngineOptions(fuse_qkv=True))
    assert any("lora: unavailable (fuse_qkv" in line for line in fused.optimization_log)
    with pytest.raises(UnsupportedRequest, match="not available"):
        fused.generate([_request(("style", 1.0))])
    fused.generate([_request(steps=1)])  # plain requests still run


# --- hot and safe ------------------------------------------------------------------------------


def test_plain_request_after_lora_is_bit_identical_to_a_fresh_engine(lora_dir: Path) -> None:
    plain = _request()
    fresh = _pixels(_image(_engine(lora_dir), plain))
    used = _engine(lora_dir)
    _image(used, _request(("style", 1.0), ("other", -0.5)))
    _image(used, _request(("other", 2.0)))
    assert np.array_equal(_pixels(_image(used, plain)), fresh)
    # And the same bits as an engine with no LoRA support at all.
    no_lora = AuraFlowEngine(build_tiny_pipeline(), description="tiny", is_test_model=True)
    assert np.array_equal(_pixels(_image(no_lora, plain)), fresh)


def test_switching_adapters_keeps_each_image(engine: AuraFlowEngine) -> None:
    first = _pixels(_image(engine, _request(("style", 1.0))))
    _image(engine, _request(("other", 1.0), ("style", 0.5)))
    _image(engine, _request(("other", 1.0)))
    again = _pixels(_image(engine, _request(("style", 1.0))))
    assert np.abs(first - again).max() <= 1
    half = _pixels(_image(engine, _request(("style", 0.5))))
    assert np.abs(first - half).mean() > 0.5  # the scale is applied


def test_lru_cache_is_bounded_by_bytes() -> None:
    def adapter(name: str, floats: int) -> Adapter:
        return Adapter(
            name=name, weights={"m": (torch.zeros(1, floats), torch.zeros(1, 1))}, rank=1
        )

    cache = AdapterCache(max_bytes=4 * (100 + 1) * 2)  # two 100-float adapters fit
    for name in ("a", "b"):
        cache.get(name, lambda n=name: adapter(n, 100))  # type: ignore[misc]
    cache.get("a", lambda: adapter("a", 100))  # hit: a becomes the most recent
    assert cache.loads == 2
    cache.get("c", lambda: adapter("c", 100))
    assert cache.names() == ["a", "c"]  # b was the least recently used
    # An adapter of the batch being prepared is never evicted, even over the budget.
    cache.get("big", lambda: adapter("big", 1000), keep=["c"])
    assert set(cache.names()) == {"c", "big"}
    assert cache.loads == 4


def test_engine_cache_reloads_after_eviction(lora_dir: Path) -> None:
    engine = _engine(lora_dir, cache_bytes=1)  # nothing stays beyond the batch
    assert engine.lora is not None
    _image(engine, _request(("style", 1.0), steps=1))
    _image(engine, _request(("other", 1.0), steps=1))
    assert engine.lora.swaps == 2
    assert engine.lora.cache.names() == ["other"]
    assert engine.lora.cache.loads == 2


@pytest.mark.skipif(
    os.environ.get("AURASERVE_SKIP_COMPILE_TEST") == "1", reason="AURASERVE_SKIP_COMPILE_TEST=1"
)
def test_hot_swap_does_not_recompile(
    lora_dir: Path, fresh_dynamo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recompiles are decided by dynamo's guards, before any backend runs, so the blocks are
    compiled with the eager backend here: inductor's C++ build of the LoRA-wrapped blocks
    takes minutes on 2 cores (test_compile.py covers inductor itself)."""
    compile_module = torch.nn.Module.compile

    def eager_compile(module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("mode", None)
        compile_module(module, *args, backend="eager", **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", eager_compile)
    compiled = _engine(lora_dir, EngineOptions(compile="blocks"))
    assert compiled.lora is not None
    assert "hot-swap" in compiled.lora.log_line
    compiled.warmup([(64, 64)], steps=1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        plain_before = _pixels(_image(compiled, _request(size=64, steps=1)))
        _image(compiled, _request(("style", 1.0), size=64, steps=1))
        _image(compiled, _request(("other", 0.5), ("style", -1.0), size=64, steps=1))
        _image(compiled, _request(("other", 1.5), size=64, steps=1))
        plain_after = _pixels(_image(compiled, _request(size=64, steps=1)))
    assert compiled.lora.swaps >= 2
    assert np.array_equal(plain_before, plain_after)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_registry_names_only(lora_dir: Path) -> None:
    registry = available_loras(lora_dir)
    assert set(registry) == {
        "style",
        "style-kohya",
        "style-comfyui",
        "style-simpletuner",
        "other",
        "wide",
    }
    assert registry["style"] == LoraSource("style", "folder", str((lora_dir / "style").resolve()))
