"""The tiny AuraFlow: same architecture family, deterministic, saves and loads offline."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

from auraserve.engine.tiny import POS_GRID, build_tiny_pipeline, save_tiny_model


def _state(pipe: AuraFlowPipeline) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name in ("transformer", "text_encoder", "vae"):
        for key, value in getattr(pipe, name).state_dict().items():
            state[f"{name}.{key}"] = value
    return state


def test_build_is_fast_deterministic_and_leaves_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    started = time.perf_counter()
    first = build_tiny_pipeline()
    elapsed = time.perf_counter() - started
    second = build_tiny_pipeline()
    assert torch.equal(before, torch.random.get_rng_state())
    assert elapsed < 5.0  # ~0.1 s in practice; generous for loaded CI machines
    a, b = _state(first), _state(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_architecture_matches_auraflow_family(tiny_pipe: AuraFlowPipeline) -> None:
    transformer = tiny_pipe.transformer.config
    assert transformer.patch_size == 2 and transformer.in_channels == 4
    assert transformer.num_mmdit_layers >= 1 and transformer.num_single_dit_layers >= 1
    inner = transformer.num_attention_heads * transformer.attention_head_dim
    assert transformer.caption_projection_dim == inner
    assert transformer.joint_attention_dim == tiny_pipe.text_encoder.config.d_model
    assert transformer.pos_embed_max_size == POS_GRID * POS_GRID
    # A 2048 px request is beyond the learned grid, as 2048 is for AuraFlow v0.3 (1536 px).
    assert POS_GRID * 2 * 8 < 2048

    vae = tiny_pipe.vae.config
    assert tiny_pipe.vae_scale_factor == 8  # 4 blocks, 3 downsamples, like SDXL's VAE
    assert vae.latent_channels == 4 and vae.scaling_factor == 0.13025 and vae.force_upcast

    assert isinstance(tiny_pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert tiny_pipe.scheduler.config.shift == 1.73


def test_tokenizer_is_t5_like(tiny_pipe: AuraFlowPipeline) -> None:
    tokenizer = tiny_pipe.tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("A cat holding a sign that says hello world").input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 10  # one piece per known word, plus </s>
    assert tokenizer.unk_token_id not in tokenizer("Zebra §µ ünïcode 🙂").input_ids[:3]
    padded = tokenizer("a cat", padding="max_length", max_length=256, return_tensors="pt")
    assert padded.input_ids.shape == (1, 256) and int(padded.attention_mask.sum()) == 3
    assert max(tokenizer.get_vocab().values()) < tiny_pipe.text_encoder.config.vocab_size


def test_save_and_load_offline(tmp_path: Path, tiny_pipe: AuraFlowPipeline) -> None:
    directory = save_tiny_model(tmp_path / "tiny")
    assert (directory / "model_index.json").is_file()
    loaded = AuraFlowPipeline.from_pretrained(directory, local_files_only=True)
    a, b = _state(tiny_pipe), _state(loaded)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    text = "a red fox in the snow, 35mm photo"
    assert loaded.tokenizer(text).input_ids == tiny_pipe.tokenizer(text).input_ids
    assert loaded.scheduler.config.shift == 1.73
