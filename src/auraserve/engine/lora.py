"""LoRA adapters per batch: registry lookup, loading, key conversion, an LRU cache, hot-swap.

How adapters reach the transformer. At engine start (before any speed mode compiles the
blocks) `LoraSlots` adds `MAX_LORAS` PEFT LoRA adapters, the *slots*, to every linear layer of
the transformer, at rank `max_rank`, with zero weights, and turns their scalings into tensors
(`peft.utils.hotswap.prepare_model_for_compiled_hotswap`). A batch's adapters are then copied
into the slots in place (zero-padded to `max_rank`, the same padding PEFT's hot-swap does) and
each slot's scaling tensor is filled with the request's scale. Parameters and scalings keep
their identity, shape and dtype, so a compiled transformer never recompiles when the adapter
set changes: this is diffusers' LoRA hot-swap (`enable_lora_hotswap` + `hotswap=True`), done
on fixed slots so that up to four adapters, and none, share one compiled graph.

Without LoRA. Uncompiled, a batch without adapters runs with PEFT's adapters disabled: every
layer calls its original `nn.Linear` and nothing else, so the image is bit-for-bit the one an
engine that never saw an adapter draws. Compiled, the slots stay active with scale 0 (the graph
must not change): the layer adds an exact zero, again the same bits as a fresh compiled engine.

Loading. Names resolve only through the registry (`core.lora.available_loras`), never as
paths. Weights are read with diffusers' `AuraFlowLoraLoaderMixin.lora_state_dict` (a local
`.safetensors` file, a diffusers-format folder or an allowlisted hub id), then converted to
one layout, `{diffusers module: (A, B)}` with the adapter's alpha/rank folded into B:

* diffusers / PEFT keys: `transformer.<module>.lora_A.weight`, `base_model.model.…`;
* kohya / ComfyUI keys: `lora_unet_<module with _>.lora_down.weight` / `lora_up` / `alpha`,
  and `diffusion_model.<module>.…`, in diffusers' module names or in the original AuraFlow
  names (`double_layers.0.attn.w2q`), mapped with diffusers'
  `convert_auraflow_transformer_checkpoint_to_diffusers` so the mapping is diffusers' own;
* SimpleTuner: its PEFT adapters are the diffusers layout; its LyCORIS-trained ones
  (`lycoris_<module with _>.lora_down.weight` / `lora_up` / `alpha`, what Pony V7's conversion
  script takes) are kohya's layout under another prefix.

LyCORIS LoHa/LoKr and DoRA are refused when the registry is listed (`core.lora.refusal`), and
`check_registry_fits` reads every listed adapter's header at worker start, so an adapter whose
rank or targets do not fit the model stops the start with one line naming the file.

Converted adapters stay in an LRU cache bounded by bytes (`AURASERVE_LORA_CACHE_MB`); the
adapters of the running batch are never evicted, so one adapter larger than the budget still
runs (and leaves the cache at once afterwards).

Not supported (the request ends FAILED with a reason, the worker keeps running): adapters
above `max_rank`; adapters on non-linear layers; the final AdaLN layer under its original name
(`modF.1`: diffusers swaps its halves on conversion; `norm_out.linear` works); and LoRA
together with `fuse_qkv` or `fp8` (both replace the linear layers the adapters attach to) or
sequential offload (its per-layer hooks do not move the slots); the engine log says so at
start.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.single_file_utils import (
    convert_auraflow_transformer_checkpoint_to_diffusers,
)
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils.hotswap import prepare_model_for_compiled_hotswap

from auraserve.core.engine_options import EngineOptions
from auraserve.core.lora import DIFFUSERS_WEIGHT_NAME, MAX_LORAS, LoraSource, LoraSpec
from auraserve.core.request import GenerationRequest, check_one_batch
from auraserve.engine.components import AuraFlowPipeline, AuraFlowTransformer2DModel
from auraserve.engine.optimize import offload_mode
from auraserve.errors import UnsupportedRequest

SLOT_PREFIX = "auraserve_slot"
# Prefixes of the module path that trainers and UIs put before the transformer's own names.
_PREFIXES = (
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "lora_unet_",
    "lora_transformer_",
    # SimpleTuner's LyCORIS-trained LoRAs (algo "lora"): kohya-style underscored names.
    "lycoris_",
)
_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<part>lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight|"
    r"(?P<alpha>alpha))$"
)


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """What the engine needs to know about LoRA; built from the settings by the caller."""

    registry: Callable[[], Mapping[str, LoraSource]]
    cache_bytes: int = 1024 * 2**20
    max_rank: int = 64


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One adapter in the engine's layout: diffusers module → (A (r × in), B (out × r)), with
    alpha/r folded into B, so applying it at scale s adds s · B A x."""

    name: str
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


# --------------------------------------------------------------------------------------------
# Key layouts
# --------------------------------------------------------------------------------------------


def original_module_names(transformer: AuraFlowTransformer2DModel) -> dict[str, str]:
    """Original AuraFlow module name → diffusers' name, for every linear layer that diffusers'
    single-file converter maps (it is the source of truth; we feed it name markers)."""
    config = transformer.config
    originals = ["t_embedder.mlp.0", "t_embedder.mlp.2", "cond_seq_linear", "final_linear"]
    for i in range(int(config["num_mmdit_layers"])):
        for mlp in ("mlpX", "mlpC"):
            originals += [f"double_layers.{i}.{mlp}.{k}" for k in ("c_fc1", "c_fc2", "c_proj")]
        originals += [f"double_layers.{i}.modX.1", f"double_layers.{i}.modC.1"]
        originals += [
            f"double_layers.{i}.attn.{k}"
            for k in ("w2q", "w2k", "w2v", "w2o", "w1q", "w1k", "w1v", "w1o")
        ]
    for i in range(int(config["num_single_dit_layers"])):
        originals += [f"single_layers.{i}.mlp.{k}" for k in ("c_fc1", "c_fc2", "c_proj")]
        originals += [f"single_layers.{i}.modCX.1"]
        originals += [f"single_layers.{i}.attn.{k}" for k in ("w1q", "w1k", "w1v", "w1o")]
    markers: dict[str, Any] = {f"{name}.weight": name for name in originals}
    # Keys the converter pops unconditionally; their values are never ours to map.
    markers.update(
        {"positional_encoding": None, "init_x_linear.weight": None, "init_x_linear.bias": None}
    )
    converted = convert_auraflow_transformer_checkpoint_to_diffusers(markers)
    return {
        value: key.removesuffix(".weight")
        for key, value in converted.items()
        if isinstance(value, str) and key.endswith(".weight")
    }


def module_aliases(transformer: AuraFlowTransformer2DModel) -> dict[str, str]:
    """Every accepted spelling of a linear layer → its diffusers module name: the diffusers
    name, the original AuraFlow name, and kohya's underscored forms of both."""
    linear = {
        name
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear | LoraLayer)
        and not any(part == "base_layer" or part.startswith("lora_") for part in name.split("."))
    }
    aliases: dict[str, str] = {}
    for original, name in original_module_names(transformer).items():
        if name in linear:
            aliases[original] = name
            aliases[original.replace(".", "_")] = name
    for name in linear:
        aliases[name] = name
        aliases[name.replace(".", "_")] = name
    return aliases


def convert(
    state_dict: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str],
    *,
    alpha: float | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Any supported key layout → {diffusers module: (A, B · alpha / r)}. `alpha` is the
    adapter-wide alpha from diffusers' metadata; per-module `.alpha` keys (kohya) win; without
    either, alpha = r, as diffusers assumes."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = _KEY.match(key)
        if match is None:
            raise UnsupportedRequest(f"LoRA key {key[:120]!r} is not in a known layout")
        module = _strip_prefix(match["module"])
        name = aliases.get(module)
        if name is None:
            raise UnsupportedRequest(f"LoRA targets {module[:120]!r}, which this model lacks")
        part = match["part"] or "alpha"
        part = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(part, part)
        parts.setdefault(name, {})[part] = value
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, found in parts.items():
        if "lora_A" not in found or "lora_B" not in found:
            raise UnsupportedRequest(f"LoRA for {name!r} lacks its A or B matrix")
        down, up = found["lora_A"].float(), found["lora_B"].float()
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise UnsupportedRequest(f"LoRA for {name!r} is not a linear adapter")
        rank = down.shape[0]
        module_alpha = found.get("alpha")
        a = float(module_alpha) if module_alpha is not None else alpha
        weights[name] = (down, up if a is None or a == rank else up * (a / rank))
    if not weights:
        raise UnsupportedRequest("the LoRA file holds no adapter weights")
    return weights


def _strip_prefix(module: str) -> str:
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            return module.removeprefix(prefix)
    return module


def read_adapter(source: LoraSource, aliases: Mapping[str, str], max_rank: int) -> Adapter:
    """Read and convert one registry entry with diffusers' loader."""
    if source.kind == "file":
        folder, _, weight_name = source.location.rpartition("/")
        location, kwargs = folder, {"weight_name": weight_name}
    elif source.kind == "folder":
        location, kwargs = source.location, {"weight_name": DIFFUSERS_WEIGHT_NAME}
    else:
        location, kwargs = source.location, {}
    try:
        state_dict, metadata = AuraFlowPipeline.lora_state_dict(
            location, return_lora_metadata=True, **kwargs
        )
    except (OSError, ValueError, RuntimeError) as exc:
        # A registry entry that is not a readable adapter: the request naming it fails and
        # the worker goes on. The loader's message names server paths, so the client gets
        # only the name; the cause stays chained for the worker's log.
        raise UnsupportedRequest(f"LoRA '{source.name}' cannot be read as an adapter") from exc
    alpha = _metadata_alpha(metadata)
    weights = convert(state_dict, aliases, alpha=alpha)
    rank = max(a.shape[0] for a, _ in weights.values())
    if rank > max_rank:
        raise UnsupportedRequest(
            f"LoRA '{source.name}' has rank {rank}; this server accepts up to {max_rank} "
            "(AURASERVE_LORA_MAX_RANK)"
        )
    return Adapter(name=source.name, weights=weights, rank=rank)


def _metadata_alpha(metadata: Mapping[str, Any] | None) -> float | None:
    """The adapter-wide alpha from diffusers' metadata (the saved LoraConfig, keys prefixed
    `transformer.`), as the alpha that gives the scaling PEFT would apply with rank r."""
    if not metadata:
        return None
    config = {key.removeprefix("transformer."): value for key, value in metadata.items()}
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise UnsupportedRequest("LoRA with per-module alpha or rank patterns")
    if config.get("use_dora"):
        raise UnsupportedRequest("DoRA adapters")
    alpha, rank = config.get("lora_alpha"), config.get("r")
    if alpha is None or rank is None:
        return None
    # rsLoRA scales by alpha / sqrt(r): the same as alpha * sqrt(r) / r.
    return float(alpha) * math.sqrt(rank) if config.get("use_rslora") else float(alpha)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


class AdapterCache:
    """Converted adapters by name, least recently used first out, bounded by bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Adapter] = OrderedDict()
        self.loads = 0  # adapters read from disk or hub, for tests and the benchmark

    @property
    def nbytes(self) -> int:
        return sum(adapter.nbytes for adapter in self._entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str, load: Callable[[], Adapter], *, keep: Sequence[str] = ()) -> Adapter:
        """The adapter, loaded on a miss; then evict the oldest until within budget, never an
        adapter named in `keep` (the batch being prepared)."""
        adapter = self._entries.get(name)
        if adapter is None:
            adapter = load()
            self.loads += 1
            self._entries[name] = adapter
        self._entries.move_to_end(name)
        self._evict({name, *keep})
        return adapter

    def _evict(self, keep: set[str]) -> None:
        for name in list(self._entries):
            if self.nbytes <= self.max_bytes:
                return
            if name not in keep:
                del self._entries[name]


# --------------------------------------------------------------------------------------------
# The slots
# --------------------------------------------------------------------------------------------


class LoraSlots:
    """`MAX_LORAS` fixed PEFT adapters on the transformer, filled per batch (see module doc)."""

    def __init__(
        self, pipe: AuraFlowPipeline, options: LoraOptions, engine_options: EngineOptions
    ) -> None:
        self.options = options
        self.transformer = pipe.transformer
        self.compiled = engine_options.compile != "none"
        self.unavailable = _unavailable(engine_options, offload_mode(pipe)) or (
            _weights_unavailable(self.transformer)
        )
        self.cache = AdapterCache(options.cache_bytes)
        self.swaps = 0  # adapters copied into a slot, for tests and the benchmark
        self._lock = threading.Lock()
        self._slots: list[str | None] = [None] * MAX_LORAS  # adapter name in each slot
        self._scales: list[float | None] = [None] * MAX_LORAS
        self._enabled: tuple[int, ...] | None = None
        self._aliases = module_aliases(self.transformer)
        self._layers: list[LoraLayer] = []
        if self.unavailable is None:
            self._install()

    @property
    def log_line(self) -> str:
        if self.unavailable is not None:
            return f"lora: unavailable ({self.unavailable})"
        mode = "hot-swap into compiled slots" if self.compiled else "slots"
        return (
            f"lora: {MAX_LORAS} {mode} of rank {self.options.max_rank} on "
            f"{len(self._layers)} linear layers; cache {self.options.cache_bytes // 2**20} MiB"
        )

    @property
    def slot_names(self) -> list[str]:
        return [f"{SLOT_PREFIX}{i}" for i in range(MAX_LORAS)]

    def _install(self) -> None:
        targets = sorted(set(self._aliases.values()))
        rank = self.options.max_rank
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0)
        with warnings.catch_warnings():
            # PEFT warns that a second adapter joins the first: four slots is the design.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for name in self.slot_names:
                self.transformer.add_adapter(config, adapter_name=name)
        self._layers = [m for m in self.transformer.modules() if isinstance(m, LoraLayer)]
        with torch.no_grad():
            for layer in self._layers:
                layer.set_adapter(self.slot_names, inference_mode=True)
                for name in self.slot_names:
                    for weight in _slot_weights(layer, name):
                        weight.zero_()
                        weight.requires_grad_(False)
        prepare_model_for_compiled_hotswap(self.transformer, target_rank=rank)
        self._set_scales([0.0] * MAX_LORAS)
        self._enable(())

    # -- per batch ---------------------------------------------------------------------------

    def activate(self, requests: Sequence[GenerationRequest]) -> None:
        """Make the transformer apply this batch's adapters (all requests share them)."""
        specs = check_same_loras(requests)
        if self.unavailable is not None:
            if specs:
                raise UnsupportedRequest(f"LoRA is not available here: {self.unavailable}")
            return
        with self._lock, torch.no_grad():
            names = [spec.name for spec in specs]
            adapters = [self._adapter(name, keep=names) for name in names]
            placement = self._placement(names)
            for slot, adapter in zip(placement, adapters, strict=True):
                if self._slots[slot] != adapter.name:
                    self._copy(slot, adapter)
            scales = [0.0] * MAX_LORAS
            for slot, spec in zip(placement, specs, strict=True):
                scales[slot] = spec.scale
            self._set_scales(scales)
            self._enable(tuple(placement))

    def _adapter(self, name: str, *, keep: Sequence[str]) -> Adapter:
        source = self.options.registry().get(name)
        if source is None:
            raise UnsupportedRequest(f"unknown LoRA '{name[:100]}' (removed from the registry?)")
        return self.cache.get(
            name,
            lambda: read_adapter(source, self._aliases, self.options.max_rank),
            keep=keep,
        )

    def _placement(self, names: Sequence[str]) -> list[int]:
        """A slot per adapter: the one already holding it, else a free one. Slot order does
        not change the sum beyond rounding, but a fixed placement keeps a repeated request's
        image stable."""
        placement: list[int | None] = [
            self._slots.index(name) if name in self._slots else None for name in names
        ]
        taken = {slot for slot in placement if slot is not None}
        free = [slot for slot in range(MAX_LORAS) if slot not in taken]
        return [slot if slot is not None else free.pop(0) for slot in placement]

    def _copy(self, slot: int, adapter: Adapter) -> None:
        name = self.slot_names[slot]
        for layer in self._layers:
            for weight in _slot_weights(layer, name):
                weight.zero_()
        for module, (down, up) in adapter.weights.items():
            target = self.transformer.get_submodule(module)
            if not isinstance(target, LoraLayer):
                raise UnsupportedRequest(f"LoRA targets {module!r}, which takes no adapter here")
            a_param, b_param = _slot_weights(target, name)
            if down.shape[1] != a_param.shape[1] or up.shape[0] != b_param.shape[0]:
                raise UnsupportedRequest(
                    f"LoRA '{adapter.name}' does not fit {module!r}: shapes "
                    f"{tuple(down.shape)}, {tuple(up.shape)}"
                )
            rank = down.shape[0]
            a_param[:rank].copy_(down)
            b_param[:, :rank].copy_(up)
        self._slots[slot] = adapter.name
        self.swaps += 1

    def _set_scales(self, scales: Sequence[float]) -> None:
        for slot, scale in enumerate(scales):
            if self._scales[slot] == scale:
                continue
            name = self.slot_names[slot]
            for layer in self._layers:
                layer.scaling[name].fill_(scale)  # in place: a compiled graph reads the tensor
            self._scales[slot] = scale

    def _enable(self, slots: tuple[int, ...]) -> None:
        """Uncompiled: only the used slots run, and none disables adapters (plain layers).
        Compiled: every slot always runs (scale 0 when unused), so the graph never changes."""
        if self.compiled:
            return
        if self._enabled == slots:
            return
        active = [self.slot_names[slot] for slot in sorted(slots)]
        for layer in self._layers:
            if active:
                layer.enable_adapters(True)
                layer.set_adapter(active, inference_mode=True)
            else:
                layer.enable_adapters(False)
        self._enabled = slots


def _slot_weights(layer: LoraLayer, slot: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A slot's (A, B) weights of one layer (PEFT's ModuleDicts are untyped)."""
    modules: Any = layer
    return modules.lora_A[slot].weight, modules.lora_B[slot].weight


def check_same_loras(requests: Sequence[GenerationRequest]) -> tuple[LoraSpec, ...]:
    """The batch's adapter set. The batch key holds it, so a batch mixing sets is a mixed
    batch: `check_one_batch`'s ValueError (the jobs ERROR)."""
    check_one_batch(requests)
    return requests[0].loras if requests else ()


def check_registry_fits(
    registry: Mapping[str, LoraSource], transformer: AuraFlowTransformer2DModel, max_rank: int
) -> int:
    """Check, from headers alone, that every local adapter fits the model: known layout,
    targets it has, shapes of its layers, rank within `max_rank`. Raises `BadWeights` naming
    the first file that does not; returns how many were checked. Run at worker start."""
    from auraserve.engine.weights.probe import read_header
    from auraserve.errors import BadWeights

    aliases = module_aliases(transformer)
    checked = 0
    for source in registry.values():
        if source.kind == "hub":
            continue
        path = Path(source.location)
        if source.kind == "folder":
            path = path / DIFFUSERS_WEIGHT_NAME
        try:
            tensors = read_header(path).tensors
        except (OSError, ValueError, BadWeights) as exc:
            raise BadWeights(f"LoRA {path}: cannot read it ({exc})") from exc
        for key, meta in tensors.items():
            match = _KEY.match(key)
            if match is None:
                raise BadWeights(f"LoRA {path}: key {key[:120]!r} is not in a known layout")
            if match["alpha"]:
                continue
            module = _strip_prefix(match["module"])
            name = aliases.get(module)
            if name is None:
                raise BadWeights(f"LoRA {path}: targets {module[:120]!r}, which this model lacks")
            layer = transformer.get_submodule(name)
            base = getattr(layer, "base_layer", layer)
            down = match["part"] in ("lora_A", "lora_down")
            rank = meta.shape[0] if down else meta.shape[-1]
            if rank > max_rank:
                raise BadWeights(
                    f"LoRA {path}: rank {rank} on {name!r}; this server accepts up to "
                    f"{max_rank} (AURASERVE_LORA_MAX_RANK)"
                )
            width = meta.shape[-1] if down else meta.shape[0]
            expected = base.in_features if down else base.out_features
            if len(meta.shape) != 2 or width != expected:
                raise BadWeights(
                    f"LoRA {path}: {key!r} has shape {meta.shape}, but {name!r} takes "
                    f"{base.in_features} inputs and gives {base.out_features} outputs: "
                    "an adapter for another model?"
                )
        checked += 1
    return checked


def _weights_unavailable(transformer: AuraFlowTransformer2DModel) -> str | None:
    if any(p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for p in transformer.parameters()):
        return "the weights are in fp8 storage; adapters need bf16/fp16/fp32 weights"
    if any(type(m).__name__.startswith("GGUF") for m in transformer.modules()):
        return "the weights are GGUF-quantized; adapters need bf16/fp16/fp32 weights"
    return None


def _unavailable(options: EngineOptions, offload: str) -> str | None:
    if options.fuse_qkv:
        return "fuse_qkv replaces the q/k/v layers that adapters attach to"
    if options.fp8:
        return "fp8 replaces the linear layers that adapters attach to"
    if offload == "sequential":
        return "sequential offload moves layers by hooks that the adapter slots lack"
    return None


__all__ = [
    "Adapter",
    "AdapterCache",
    "LoraOptions",
    "LoraSlots",
    "check_registry_fits",
    "check_same_loras",
    "convert",
    "module_aliases",
    "original_module_names",
    "read_adapter",
]
