"""What a weights file holds, read from its header alone (torch-free, no tensor is read).

A .safetensors file starts with an 8-byte length and a JSON header naming every tensor with
its dtype, shape and byte range; a GGUF file starts with metadata and a tensor table. Both are
read here in milliseconds whatever the file's size (a 14 GB file is a few hundred KB of
header), so `auraserve models inspect` and the loaders recognise a file by its content.

Recognised AuraFlow layouts (the transformer's keys, after a prefix):

* "original": AuraFlow's own names (`double_layers.0.attn.w2q.weight`, `cond_seq_linear`…), as
  fal released them and as ComfyUI saves them under `model.diffusion_model.`;
* "diffusers": `joint_transformer_blocks.0.attn.to_q.weight`…, bare or under `transformer.`.

All-in-one files add a UMT5/T5 text encoder (`…encoder.block.0.layer.0.SelfAttention.q.weight`,
e.g. ComfyUI's `text_encoders.pile_t5xl.transformer.`) and a VAE (LDM layout under
`first_stage_model.` or diffusers' under `vae.`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from auraserve.errors import BadWeights

Format = Literal["safetensors", "gguf"]
Layout = Literal["original", "diffusers"]

# A key that only AuraFlow's transformer has, in each layout.
ORIGINAL_MARKER = "double_layers.0.attn.w2q.weight"
DIFFUSERS_MARKER = "joint_transformer_blocks.0.attn.to_q.weight"
TEXT_ENCODER_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
VAE_MARKER = "decoder.conv_in.weight"
# Quant types the GGUF loader accepts (diffusers' GGUF support dequantises these).
GGUF_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q6_K",
    "Q5_K",
    "Q5_0",
    "Q5_1",
    "Q4_K",
    "Q4_0",
    "Q4_1",
    "Q3_K",
    "Q2_K",
    "IQ4_NL",
    "IQ4_XS",
)
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
# What a file that is not AuraFlow looks like, by a key only that family has.
_OTHERS: tuple[tuple[str, str], ...] = (
    ("double_blocks.0.img_attn", "a Flux checkpoint"),
    ("joint_blocks.0.context_block", "a Stable Diffusion 3 checkpoint"),
    ("conditioner.embedders.1", "a Stable Diffusion XL checkpoint"),
    ("label_emb.0.0.weight", "a Stable Diffusion XL checkpoint"),
    ("input_blocks.0.0.weight", "a Stable Diffusion 1.x/2.x checkpoint"),
    ("transformer_blocks.0.attn.to_q.weight", "a DiT checkpoint of another family"),
)
_LORA = re.compile(r"(lora_(up|down|A|B)|\.hada_w|\.lokr_w|\.alpha$|lora_te_|lora_unet_)")


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name (BF16, F8_E4M3…) or a GGUF type (Q8_0, F16…)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class WeightsFile:
    """A probed file. Tensor names are the file's own (prefix included)."""

    path: Path
    format: Format
    size: int
    tensors: dict[str, TensorMeta]
    metadata: dict[str, Any] = field(default_factory=dict)
    layout: Layout = "original"
    prefix: str = ""  # before the transformer's own keys, e.g. "model.diffusion_model."
    text_encoder_prefix: str | None = None
    vae_prefix: str | None = None
    vae_layout: Literal["ldm", "diffusers"] | None = None

    @property
    def transformer_keys(self) -> list[str]:
        return [k for k in self.tensors if k.startswith(self.prefix) and not self._other(k)]

    def _other(self, key: str) -> bool:
        return any(
            p is not None and p != self.prefix and key.startswith(p) and len(p) > len(self.prefix)
            for p in (self.text_encoder_prefix, self.vae_prefix)
        )

    def transformer_tensor(self, name: str) -> TensorMeta | None:
        """A transformer tensor by its unprefixed name."""
        return self.tensors.get(self.prefix + name)

    @property
    def layout_name(self) -> str:
        if self.layout == "diffusers":
            return "diffusers" + (f" (prefix {self.prefix!r})" if self.prefix else "")
        if self.prefix == "model.diffusion_model.":
            return "AuraFlow original, ComfyUI prefix 'model.diffusion_model.'"
        return "AuraFlow original" + (f" (prefix {self.prefix!r})" if self.prefix else "")

    @property
    def transformer_dtypes(self) -> Counter[str]:
        return Counter(self.tensors[k].dtype for k in self.transformer_keys)

    @property
    def fp8_dtype(self) -> str | None:
        """F8_E4M3 or F8_E5M2 when the transformer's weights are stored in float8."""
        found = [d for d in self.transformer_dtypes if d in FP8_DTYPES]
        return found[0] if found else None

    @property
    def components_inside(self) -> list[str]:
        inside = ["transformer"]
        if self.text_encoder_prefix is not None:
            inside.append("text_encoder")
        if self.vae_prefix is not None:
            inside.append("vae")
        return inside

    @property
    def components_needed(self) -> list[str]:
        needed = ["tokenizer"]
        if self.text_encoder_prefix is None:
            needed.append("text_encoder")
        if self.vae_prefix is None:
            needed.append("vae")
        needed += ["scheduler", "transformer config (attention heads)"]
        return needed

    def architecture(self) -> dict[str, int]:
        """Layer counts, widths and the transformer's parameter count, from shapes alone."""
        keys = [k[len(self.prefix) :] for k in self.transformer_keys]
        if self.layout == "original":
            double, single = _count(keys, "double_layers."), _count(keys, "single_layers.")
            context, grid = "cond_seq_linear.weight", "positional_encoding"
            patch, out = "init_x_linear.weight", "final_linear.weight"
        else:
            double = _count(keys, "joint_transformer_blocks.")
            single = _count(keys, "single_transformer_blocks.")
            context, grid = "context_embedder.weight", "pos_embed.pos_embed"
            patch, out = "pos_embed.proj.weight", "proj_out.weight"
        arch = {"double_layers": double, "single_layers": single}
        context_meta = self.transformer_tensor(context)
        if context_meta is not None and len(context_meta.shape) == 2:
            arch["width"], arch["text_dim"] = context_meta.shape
        grid_meta = self.transformer_tensor(grid)
        if grid_meta is not None and len(grid_meta.shape) == 3:
            arch["pos_embed_max_size"] = grid_meta.shape[1]
        for name, key in (("patch_inputs", patch), ("patch_outputs", out)):
            meta = self.transformer_tensor(key)
            if meta is not None and len(meta.shape) == 2:
                arch[name] = meta.shape[1] if name == "patch_inputs" else meta.shape[0]
        arch["parameters"] = sum(self.tensors[k].numel for k in self.transformer_keys)
        return arch

    def describe(self) -> dict[str, Any]:
        """Everything `models inspect` says, as JSON-ready data."""
        groups: dict[str, Counter[str]] = {}
        for name, meta in self.tensors.items():
            groups.setdefault(self.group(name), Counter())[meta.dtype] += 1
        return {
            "path": str(self.path),
            "format": self.format,
            "size_bytes": self.size,
            "layout": self.layout_name,
            "architecture": self.architecture(),
            "dtypes": {group: dict(counts) for group, counts in sorted(groups.items())},
            "inside": self.components_inside,
            "from_components": self.components_needed,
            "servable": True,
        }

    def group(self, name: str) -> str:
        """A tensor's group for reports: text_encoder, vae, or a transformer part."""
        if self.text_encoder_prefix is not None and name.startswith(self.text_encoder_prefix):
            return "text_encoder"
        if self.vae_prefix is not None and name.startswith(self.vae_prefix):
            return "vae"
        if not name.startswith(self.prefix):
            return "other"
        own = name[len(self.prefix) :]
        if own.startswith(("double_layers.", "joint_transformer_blocks.")):
            return "transformer.double_blocks"
        if own.startswith(("single_layers.", "single_transformer_blocks.")):
            return "transformer.single_blocks"
        return "transformer.other"


def _count(keys: list[str], prefix: str) -> int:
    indexes = {k[len(prefix) :].split(".", 1)[0] for k in keys if k.startswith(prefix)}
    return len([i for i in indexes if i.isdigit()])


# --------------------------------------------------------------------------------------------
# Reading headers
# --------------------------------------------------------------------------------------------


def _read_safetensors(path: Path, size: int) -> tuple[dict[str, TensorMeta], dict[str, Any]]:
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise BadWeights(f"{path}: truncated or empty file ({size} bytes); cannot be served")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100 * 2**20:
            raise BadWeights(
                f"{path}: truncated file, or not a .safetensors file (header of {length} bytes "
                f"in a file of {size}); cannot be served"
            )
        try:
            header = json.loads(file.read(length))
        except ValueError as exc:
            raise BadWeights(f"{path}: not a .safetensors file ({exc}); cannot be served") from exc
    if not isinstance(header, dict):
        raise BadWeights(f"{path}: not a .safetensors file; cannot be served")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorMeta] = {}
    end = 0
    for name, entry in header.items():
        tensors[name] = TensorMeta(tuple(int(n) for n in entry["shape"]), str(entry["dtype"]))
        end = max(end, int(entry["data_offsets"][1]))
    if 8 + length + end > size:
        raise BadWeights(
            f"{path}: truncated file ({size} bytes, its header describes {8 + length + end}); "
            "download it again; cannot be served"
        )
    return tensors, metadata


def _read_gguf(path: Path, size: int) -> tuple[dict[str, TensorMeta], dict[str, Any]]:
    from gguf import GGUFReader  # numpy only; memory-mapped, no tensor is read

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/IndexError/OSError on bad bytes
        raise BadWeights(
            f"{path}: truncated or damaged GGUF file ({_first_line(exc)}); cannot be served"
        ) from exc
    tensors: dict[str, TensorMeta] = {}
    for tensor in reader.tensors:
        if int(tensor.data_offset) + int(tensor.n_bytes) > size:
            raise BadWeights(f"{path}: truncated GGUF file; download it again")
        # GGUF lists dimensions innermost first; torch's order is the reverse.
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        tensors[tensor.name] = TensorMeta(shape, tensor.tensor_type.name)
    metadata: dict[str, Any] = {}
    arch = reader.get_field("general.architecture")
    if arch is not None:
        metadata["general.architecture"] = bytes(arch.parts[arch.data[0]]).decode(errors="replace")
    return tensors, metadata


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return text.splitlines()[0][:200]


def read_header(path: Path) -> WeightsFile:
    """Format and tensor table of a file, recognised by its first bytes, not its name."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            magic = file.read(4)
    except OSError as exc:
        raise BadWeights(f"{path}: cannot read it ({exc.strerror}); cannot be served") from exc
    if magic == b"GGUF":
        tensors, metadata = _read_gguf(path, size)
        return WeightsFile(path, "gguf", size, tensors, metadata)
    if magic == b"PK\x03\x04" or (magic[:1] == b"\x80" and magic[1:2] in b"\x02\x03\x04\x05"):
        try:  # a safetensors header length can start with these bytes too
            tensors, metadata = _read_safetensors(path, size)
        except BadWeights:
            raise BadWeights(
                f"{path}: a pickled PyTorch checkpoint (.ckpt/.pt); only .safetensors and "
                ".gguf files are loaded (pickles can run code); cannot be served"
            ) from None
        return WeightsFile(path, "safetensors", size, tensors, metadata)
    tensors, metadata = _read_safetensors(path, size)
    return WeightsFile(path, "safetensors", size, tensors, metadata)


# --------------------------------------------------------------------------------------------
# Recognising the content
# --------------------------------------------------------------------------------------------


def _prefix_of(keys: list[str], marker: str, avoid: str | None = None) -> str | None:
    found = [
        k[: -len(marker)]
        for k in keys
        if k.endswith(marker)
        and (k == marker or k[: -len(marker)].endswith("."))
        and (avoid is None or not k.startswith(avoid))
    ]
    return min(found, key=len) if found else None


def looks_like(tensors: dict[str, TensorMeta]) -> str:
    """What a file that is not AuraFlow holds, in a few words."""
    keys = list(tensors)
    if any(_LORA.search(k) for k in keys):
        return "a LoRA adapter (serve it from AURASERVE_LORA_DIR, not as --model)"
    for marker, what in _OTHERS:
        if any(marker in k for k in keys):
            return what
    if _prefix_of(keys, TEXT_ENCODER_MARKER) is not None:
        return "a T5 text encoder alone"
    if _prefix_of(keys, VAE_MARKER) is not None:
        return "a VAE alone"
    return f"no AuraFlow transformer ({len(keys)} tensors, none of AuraFlow's)"


def probe(path: str | Path) -> WeightsFile:
    """Read and recognise one file; `BadWeights` (one line naming the file) if it is not
    AuraFlow weights."""
    path = Path(path).expanduser()
    info = read_header(path)
    keys = list(info.tensors)
    original = _prefix_of(keys, ORIGINAL_MARKER)
    diffusers = _prefix_of(keys, DIFFUSERS_MARKER)
    if original is not None:
        info.layout, info.prefix = "original", original
    elif diffusers is not None:
        info.layout, info.prefix = "diffusers", diffusers
    else:
        raise BadWeights(
            f"{path}: looks like {looks_like(info.tensors)}; not an AuraFlow transformer, "
            "cannot be served"
        )
    info.text_encoder_prefix = _prefix_of(keys, TEXT_ENCODER_MARKER)
    vae = _prefix_of(keys, VAE_MARKER)
    if vae is not None and vae != info.prefix:
        info.vae_prefix = vae
        ldm = f"{vae}decoder.mid.block_1.norm1.weight" in info.tensors
        info.vae_layout = "ldm" if ldm else "diffusers"
    if info.format == "gguf":
        unknown = sorted({m.dtype for m in info.tensors.values()} - set(GGUF_TYPES))
        if unknown:
            raise BadWeights(
                f"{path}: GGUF quant type {', '.join(unknown)} is not supported; use one of "
                f"{', '.join(GGUF_TYPES)}"
            )
    return info


def _amount(count: float, unit: str) -> str:
    """6.86 B / 12.3 M (parameters), 13.7 GB / 771 kB (bytes)."""
    names = ((1e9, "G", "B"), (1e6, "M", "M"), (1e3, "k", "k"))
    for scale, byte_name, count_name in names:
        if count >= scale:
            return f"{count / scale:.2f} {byte_name + unit if unit else count_name}"
    return f"{count:.0f} {unit}".rstrip()


def render(info: dict[str, Any]) -> str:
    """`describe()`'s data as lines for people."""
    arch = info["architecture"]
    params = arch.get("parameters", 0)
    size = info["size_bytes"]
    lines = [
        f"file:          {info['path']} ({_amount(size, 'B')})",
        f"format:        {info['format']}",
        f"layout:        {info['layout']}",
        f"architecture:  AuraFlow, {arch.get('double_layers')} joint (MMDiT) + "
        f"{arch.get('single_layers')} single-DiT layers, width {arch.get('width')}, text "
        f"dim {arch.get('text_dim')}, positional grid {arch.get('pos_embed_max_size')}, "
        f"{_amount(params, '')} parameters",
    ]
    for group, counts in info["dtypes"].items():
        detail = ", ".join(f"{n} {dtype}" for dtype, n in sorted(counts.items()))
        lines.append(f"  {group + ':':<26} {detail}")
    lines.append(f"inside:        {', '.join(info['inside'])}")
    lines.append(f"from --components: {', '.join(info['from_components'])}")
    return "\n".join(lines)


def inspect(path: str | Path, *, as_json: bool = False) -> tuple[str, int]:
    """`auraserve models inspect PATH [--json]`: the report and the exit status (0, or 2 for a
    file that cannot be served, with one line saying what it looks like)."""
    try:
        info = probe(path).describe()
    except BadWeights as exc:
        if as_json:
            return json.dumps({"path": str(path), "servable": False, "error": exc.message}), 2
        return exc.message, 2
    return (json.dumps(info, indent=2) if as_json else render(info)), 0


__all__ = [
    "FP8_DTYPES",
    "GGUF_TYPES",
    "BadWeights",
    "TensorMeta",
    "WeightsFile",
    "inspect",
    "looks_like",
    "probe",
    "read_header",
    "render",
]
