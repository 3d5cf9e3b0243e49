"""A tiny AuraFlow with random weights, built in code, for tests and for `--model tiny`.

The real weights cannot be fetched in CI or on a laptop without a GPU, yet every code path of
the engine (prompt encoding, CFG, the sampling loop, positional-embedding interpolation, VAE
decode) must run against the real diffusers classes. So this module builds the same model
family at toy widths:

* `AuraFlowTransformer2DModel`: 1 joint (MMDiT) + 1 single-DiT block, 4 heads x 8 dims, patch 2,
  a 48x48 learned positional grid (768 px), so sizes above 768 px exercise the interpolation
  path just as sizes above 1536 px do on AuraFlow v0.3 (96x96 grid).
* `UMT5EncoderModel`: 2 layers, d_model 32 (= the transformer's `joint_attention_dim`).
* A Unigram tokenizer built with the `tokenizers` library, T5-style (`<pad>`=0, `</s>`=1,
  `<unk>`=2, an `</s>` appended to every sequence), wrapped in `PreTrainedTokenizerFast`.
  Common words are one piece each and other words split into letter pairs, so a prompt
  costs about as many tokens as with a real SentencePiece vocabulary (a 60-word prompt
  about 150, not 260 as with single letters): token budgets measured with it are realistic.
* An SDXL-shaped `AutoencoderKL`: 4 blocks (3 downsamples → 8x), 4 latent channels,
  `scaling_factor` 0.13025, `force_upcast` like SDXL's.
* `FlowMatchEulerDiscreteScheduler(shift=1.73)`, AuraFlow v0.3's.

Everything is seeded, so two builds are identical, and the global torch RNG is left untouched.
Images it produces are structured noise; the API labels them as coming from a test model.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from auraserve.engine.components import (
    AuraFlowPipeline,
    AuraFlowTransformer2DModel,
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
)

TINY_SEED = 20240712
TEXT_DIM = 32
# Learned positional grid side (in patches). 48 patches x 2 x 8 = 768 px; v0.3 has 96 (1536 px).
POS_GRID = 48
SHIFT = 1.73
VAE_SCALING_FACTOR = 0.13025

# Whole words get their own piece so common prompts tokenize to roughly one token per word,
# like a real SentencePiece vocabulary; anything else falls back to single characters.
_WORDS = (
    "a an the of and in on with at by for to from under over near behind beside "
    "that this is are its it his her their into through "
    "cat dog bird fish horse cow fox wolf bear lion tiger owl dragon robot astronaut "
    "man woman girl boy child person people portrait face eyes hair hand hat sign "
    "city street house castle tower bridge road car train ship boat plane "
    "forest tree trees flower flowers garden field mountain mountains river lake sea "
    "ocean beach desert snow rain sky cloud clouds sun moon star stars night day "
    "sunset sunrise light lights shadow shadows fog mist fire water stone wood glass "
    "red orange yellow green blue purple pink white black gray gold silver "
    "big small tall old young new beautiful cute dark bright soft warm cold "
    "holding sitting standing walking running flying wearing looking says hello world "
    "photo photograph painting drawing illustration render sketch art style "
    "detailed high quality highly sharp focus cinematic lighting dramatic composition "
    "realistic photorealistic studio golden hour bokeh lens 35mm 50mm 4k 8k"
).split()
_CHARS = string.ascii_lowercase + string.digits + string.punctuation
# Letter pairs, at a word's start and inside it: the sub-word pieces of a real vocabulary.
# Appended after every other piece, so the ids (and embeddings) of those stay as they were.
_PAIRS = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A T5-like Unigram tokenizer small enough to build in milliseconds."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{word}", -1.0) for word in _WORDS]
    vocab += [(f"▁{ch}", -4.0) for ch in _CHARS]
    vocab += [(ch, -5.0) for ch in _CHARS]
    vocab += [(f"▁{pair}", -4.5) for pair in _PAIRS]
    vocab += [(pair, -5.5) for pair in _PAIRS]
    backend = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    # T5 appends </s> to every sequence; the truncation check in encode_prompt relies on it.
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )


def _tiny_text_encoder(vocab_size: int) -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return UMT5EncoderModel(config).eval()


def _grow_embeddings(text_encoder: UMT5EncoderModel, vocab_size: int) -> None:
    """New rows for the pieces past the encoder's vocabulary, drawn like the old ones."""
    old = text_encoder.get_input_embeddings().weight.detach().clone()
    text_encoder.resize_token_embeddings(vocab_size, mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[: old.shape[0]] = old
        weight[old.shape[0] :].normal_(0.0, float(old.std()))


def _tiny_transformer() -> AuraFlowTransformer2DModel:
    return AuraFlowTransformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=32,  # = heads x head dim: text tokens join the image stream
        out_channels=4,
        pos_embed_max_size=POS_GRID * POS_GRID,
    ).eval()


def wide_transformer(
    width: int, *, mmdit_layers: int = 1, single_layers: int = 1
) -> AuraFlowTransformer2DModel:
    """The tiny transformer at a real head width (64, as AuraFlow's) and `width` channels: for
    quantisation and file-size measurements, where 8-channel heads are too small for the block
    formats (GGUF's K-quants pack 256 values) and for the sizes to mean anything. Its weights
    come from the caller's random state."""
    return AuraFlowTransformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=mmdit_layers,
        num_single_dit_layers=single_layers,
        attention_head_dim=64,
        num_attention_heads=width // 64,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=width,
        out_channels=4,
        pos_embed_max_size=48 * 48,
    ).eval()


def _tiny_vae() -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=VAE_SCALING_FACTOR,
        force_upcast=True,
    )
    return vae.eval()


def build_tiny_pipeline() -> AuraFlowPipeline:
    """Build the tiny random-weight AuraFlow (fp32, CPU). Deterministic across calls."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        tokenizer = build_tiny_tokenizer()
        # Built at the vocabulary's size before the letter pairs, then grown: every weight
        # drawn before (and every image of a prompt of whole words) stays what it was.
        text_encoder = _tiny_text_encoder(vocab_size=len(tokenizer) - 2 * len(_PAIRS))
        transformer = _tiny_transformer()
        vae = _tiny_vae()
        _grow_embeddings(text_encoder, len(tokenizer))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    return AuraFlowPipeline(
        # diffusers annotates T5Tokenizer; any tokenizer with the same interface works.
        tokenizer=tokenizer,  # type: ignore[arg-type]
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def save_tiny_model(directory: Path) -> Path:
    """Write the tiny model in diffusers format; `AuraFlowPipeline.from_pretrained` loads it
    offline. Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline().save_pretrained(directory, safe_serialization=True)
    return directory
