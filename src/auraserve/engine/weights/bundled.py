"""The text encoder and VAE inside an all-in-one file, used whole (their configs come from
the components source; their weights from the file).

* Text encoder: Hugging Face T5/UMT5 names under any prefix (ComfyUI writes
  `text_encoders.pile_t5xl.transformer.`); the input embedding may be stored once
  (`shared.weight`) and is tied to `encoder.embed_tokens.weight` as transformers ties it.
* VAE: the LDM layout (`first_stage_model.encoder.down.0.block.0…`) converted with diffusers'
  `convert_ldm_vae_checkpoint`, or diffusers' own layout (`vae.encoder.down_blocks.0…`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors import safe_open
from transformers import PreTrainedModel, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from auraserve.engine.components import AutoencoderKL
from auraserve.engine.weights.probe import WeightsFile
from auraserve.engine.weights.single_file import stream_into
from auraserve.errors import BadWeights

_TIED = "encoder.embed_tokens.weight"


def load_text_encoder(
    info: WeightsFile, config: dict[str, Any], dtype: torch.dtype
) -> PreTrainedModel:
    prefix = info.text_encoder_prefix or ""
    umt5 = (
        "UMT5" in "".join(config.get("architectures") or []) or config.get("model_type") == "umt5"
    )
    model: PreTrainedModel
    with init_empty_weights():
        if umt5:
            model = UMT5EncoderModel(UMT5Config.from_dict(config))
        else:
            model = T5EncoderModel(T5Config.from_dict(config))
    wanted = {name for name, _ in model.named_parameters()}
    names = {
        key: key[len(prefix) :]
        for key in info.tensors
        if key.startswith(prefix) and key[len(prefix) :] in wanted | {_TIED}
    }
    if _TIED in names.values() and "shared.weight" not in names.values():
        names = {k: ("shared.weight" if v == _TIED else v) for k, v in names.items()}
    names = {k: v for k, v in names.items() if v != _TIED}

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(str(info.path), framework="pt") as file:
            for key in names:
                yield key, file.get_tensor(key)

    def tie() -> None:
        model.encoder.embed_tokens.weight = model.shared.weight  # what tie_weights does

    stream_into(model, names, read(), lambda _t: dtype, f"{info.path} (text encoder)", finish=tie)
    return model.eval()


def load_vae(info: WeightsFile, config: dict[str, Any], dtype: torch.dtype) -> AutoencoderKL:
    prefix = info.vae_prefix or ""
    with safe_open(str(info.path), framework="pt") as file:
        raw = {k[len(prefix) :]: file.get_tensor(k) for k in info.tensors if k.startswith(prefix)}
    state = convert_ldm_vae_checkpoint(raw, config) if info.vae_layout == "ldm" else raw
    vae = AutoencoderKL.from_config(config)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise BadWeights(
            f"{info.path} (VAE): {len(missing)} tensors missing, {len(unexpected)} unexpected "
            f"(e.g. {example!r}); not the VAE the components' config describes"
        )
    return vae.to(dtype).eval()


__all__ = ["load_text_encoder", "load_vae"]
