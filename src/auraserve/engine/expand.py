"""Prompt expansion: turn a short prompt into a richer one before it reaches the model.

AuraFlow follows long, specific prompts much better than three-word ones, so a request may ask
(`expand_prompt`) for detail to be added first. Every expander keeps the user's text, byte for
byte, at the start and appends to it; three implementations:

* `OpenAIChatExpander`: any OpenAI-compatible `/v1/chat/completions` server (OpenAI, vLLM,
  llama.cpp, Ollama, LM Studio …), called with httpx, asked for the added detail only.
* `TransformersExpander`: a local causal LM loaded with transformers on first use, likewise.
* `OfflineExpander`: built in, no model: appends subject emphasis, lighting, composition and
  quality terms picked by keyword rules. Deterministic for a given (prompt, seed).

The budget: AuraFlow reads 256 tokens of its own tokenizer and ignores the rest, so an
expansion that runs past them is wasted where it matters most (the added detail is what gets
cut). Given a `TokenBudget` (the engine passes the model's tokenizer), `expand_prompt` keeps
the appended phrases, in order, that fit after the user's text, leaves out the ones that do
not (and says so in a warning), and appends nothing to a prompt that already fills the window.

Fallback: a remote or local expander can fail (server down, timeout, empty answer, model
missing). `make_expander` wraps them in `FallbackExpander`, which then uses the offline expander
for that prompt, logs a warning, and reports the warning through `expand_prompt(...)` so the
engine can put it in the job's `warnings`. A generation is never failed because expansion failed.
"""

from __future__ import annotations

import logging
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import httpx

from auraserve.errors import ExpansionError

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You add detail to prompts for a text-to-image model. The user's prompt is kept as it is; "
    "your answer is appended after it. Add concrete visual detail it does not already give: "
    "subject appearance, setting, lighting, composition, camera or medium, and quality. Answer "
    "with the added detail only, as short comma-separated phrases, at most 60 words, without "
    "repeating the prompt, no preamble and no quotes."
)
# Where added detail may be cut: between the phrases an expander appends.
_PHRASE_BREAK = re.compile(r"\s*[,;]\s*|(?<=[.!?])\s+")


@dataclass(frozen=True)
class TokenBudget:
    """The text encoder's window: `count(text)` is the number of ids the model's tokenizer
    gives `text` (special tokens included); at most `limit` of them are read."""

    count: Callable[[str], int]
    limit: int

    def fits(self, text: str) -> bool:
        return self.count(text) <= self.limit


@runtime_checkable
class PromptExpander(Protocol):
    """Rewrites a prompt; the same (prompt, seed) should give the same answer where possible."""

    def expand(self, prompt: str, seed: int) -> str: ...


# --------------------------------------------------------------------------------------------
# Offline, rule-based expander
# --------------------------------------------------------------------------------------------

# Each category: the words that trigger it, then detail fragments to choose from.
_CATEGORIES: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "portrait": (
        frozenset(
            "man woman girl boy child person people portrait face selfie king queen "
            "astronaut warrior knight wizard witch soldier dancer musician".split()
        ),
        (
            "expressive eyes and natural skin texture",
            "a clear, characterful expression",
            "carefully rendered hair and clothing details",
        ),
    ),
    "animal": (
        frozenset(
            "cat cats dog dogs bird birds fox wolf bear lion tiger owl horse rabbit "
            "deer eagle fish whale dragon butterfly kitten puppy".split()
        ),
        (
            "finely detailed, lifelike textures",
            "an alert, lifelike pose",
            "crisp detail in the eyes",
        ),
    ),
    "landscape": (
        frozenset(
            "landscape mountain mountains forest river lake sea ocean beach desert "
            "valley field meadow waterfall canyon island sky clouds".split()
        ),
        (
            "a sweeping sense of depth and scale",
            "layered foreground, middle ground and background",
            "rich atmospheric perspective",
        ),
    ),
    "architecture": (
        frozenset(
            "city street house castle tower bridge building skyline temple church "
            "interior room cathedral village town alley".split()
        ),
        (
            "strong architectural lines and believable materials",
            "intricate structural detail",
            "a lived-in sense of place",
        ),
    ),
    "food": (
        frozenset(
            "food cake bread coffee tea pizza burger fruit soup dessert sushi cocktail "
            "wine breakfast".split()
        ),
        (
            "appetizing textures and fresh ingredients",
            "a styled tabletop arrangement",
            "glistening highlights on the food",
        ),
    ),
    "vehicle": (
        frozenset(
            "car cars train ship boat plane airplane motorcycle bicycle truck rocket".split()
        ),
        (
            "precise mechanical detail and reflective surfaces",
            "a dynamic sense of motion",
            "clean industrial design",
        ),
    ),
}

_STYLES: dict[str, frozenset[str]] = {
    "photo": frozenset("photo photograph photography photorealistic realistic dslr camera".split()),
    "painting": frozenset("painting painted oil watercolor watercolour acrylic gouache".split()),
    "illustration": frozenset(
        "illustration drawing sketch anime manga cartoon comic vector lineart".split()
    ),
    "render": frozenset("render 3d cgi octane unreal blender isometric".split()),
}

_LIGHTING: dict[str, tuple[str, ...]] = {
    "photo": (
        "soft natural window light",
        "warm golden hour sunlight",
        "diffused overcast daylight",
        "dramatic rim lighting",
    ),
    "painting": (
        "luminous, painterly light",
        "chiaroscuro lighting",
        "soft glowing light with gentle color transitions",
    ),
    "illustration": (
        "clean cel shading with bold highlights",
        "vibrant, even lighting",
        "moody, atmospheric lighting",
    ),
    "render": (
        "physically based global illumination",
        "soft studio lighting with subtle reflections",
        "volumetric light rays",
    ),
}

_COMPOSITION: tuple[str, ...] = (
    "balanced rule-of-thirds composition",
    "centered, symmetrical composition",
    "thoughtful framing with negative space",
    "eye-level perspective",
    "low-angle perspective that gives presence",
)

_QUALITY: dict[str, tuple[str, ...]] = {
    "photo": (
        "shot on a 50mm lens, shallow depth of field, sharp focus, high detail",
        "high-resolution photograph, sharp focus, true-to-life color",
        "professional photography, crisp detail, natural color grading",
    ),
    "painting": (
        "visible brushwork, rich color palette, masterful fine-art quality",
        "museum-quality painting, harmonious colors, fine detail",
    ),
    "illustration": (
        "clean linework, cohesive color palette, highly detailed illustration",
        "polished professional illustration, crisp shapes, rich detail",
    ),
    "render": (
        "highly detailed 3D render, realistic materials, 8k",
        "octane-quality render, crisp detail, cinematic color",
    ),
}

# Words that already fix the lighting: don't contradict the user.
_LIGHTING_WORDS = frozenset(
    "light lights lighting lit sunlight sunset sunrise dusk dawn night moonlight neon "
    "glow glowing shadow shadows dark golden backlit candlelight".split()
)
_COMPOSITION_WORDS = frozenset(
    "close-up closeup wide-angle panorama panoramic aerial overhead composition framing "
    "portrait symmetrical centered macro".split()
)
_WORD = re.compile(r"[a-z0-9][a-z0-9\-']*")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _style(words: set[str]) -> str:
    for style, triggers in _STYLES.items():
        if words & triggers:
            return style
    return "photo"  # AuraFlow's default look is photographic; match it


class OfflineExpander:
    """Rule-based expansion: the user's text, then appended detail. No model, no network."""

    def expand(self, prompt: str, seed: int) -> str:
        text = prompt.strip()
        words = _words(text)
        # Seeding with (seed, prompt) keeps the choice stable per request yet varied per seed;
        # random.Random hashes str seeds with SHA-512, so PYTHONHASHSEED does not matter.
        rng = random.Random(f"{seed}\x00{text}")
        style = _style(words)
        details: list[str] = []
        for triggers, fragments in _CATEGORIES.values():
            if words & triggers:
                details.append(rng.choice(fragments))
        if not details:
            details.append("the main subject rendered in clear, striking detail")
        if not words & _LIGHTING_WORDS:
            details.append(rng.choice(_LIGHTING[style]))
        if not words & _COMPOSITION_WORDS:
            details.append(rng.choice(_COMPOSITION))
        details.append(rng.choice(_QUALITY[style]))
        return append_detail(text, ", ".join(details))


def append_detail(prompt: str, detail: str) -> str:
    """`prompt` (stripped, otherwise byte for byte), then `detail` after a joiner that reads
    naturally. A `detail` that repeats the prompt first (models do, whatever they are told)
    has that part removed, so the prompt is not there twice."""
    text = prompt.strip()
    added = detail.strip()
    if added.lower().startswith(text.lower()):
        added = added[len(text) :].lstrip(" ,;:")
    if not added:
        return text
    joiner = " " if text[-1] in ",.;:!?" else ", "
    return f"{text}{joiner}{added}"


def fit_to_budget(prompt: str, expanded: str, budget: TokenBudget) -> tuple[str, list[str]]:
    """`expanded` cut to what `budget` reads: the user's text first, then the appended phrases,
    in order, that still fit (one that does not is left out; a later, shorter one may fit).
    Returns the prompt and the warnings about what was left out."""
    text = prompt.strip()
    if budget.fits(expanded):
        return expanded, []
    tail = expanded[len(text) :] if expanded.startswith(text) else ""
    phrases = [p for p in _PHRASE_BREAK.split(tail.lstrip(" ,;:")) if p]
    kept: list[str] = []
    left_out: list[str] = []
    for phrase in phrases if budget.fits(text) else []:
        candidate = append_detail(text, ", ".join([*kept, phrase]))
        (kept if budget.fits(candidate) else left_out).append(phrase)
    if not kept:
        return text, [
            f"prompt expansion added nothing: the prompt alone is {budget.count(text)} tokens "
            f"and AuraFlow reads {budget.limit}"
        ]
    shown = ", ".join(left_out)
    shown = shown if len(shown) <= 120 else shown[:117] + "..."
    warning = (
        f"prompt expansion shortened to fit AuraFlow's {budget.limit} tokens; left out: {shown!r}"
    )
    return append_detail(text, ", ".join(kept)), [warning]


# --------------------------------------------------------------------------------------------
# Remote and local model expanders
# --------------------------------------------------------------------------------------------


def _clean_answer(answer: str) -> str:
    """Strip what chat models like to add around the prompt: quotes, labels, code fences."""
    text = answer.strip().strip("`").strip()
    text = re.sub(r"^(?:rewritten |expanded |improved )?prompt\s*:\s*", "", text, flags=re.I)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return " ".join(text.split())


def _chat_url(base_url: str) -> str:
    # Accept both "http://host:8000" and the OpenAI SDK style "http://host:8000/v1".
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions"


class OpenAIChatExpander:
    """Expands with any OpenAI-compatible chat-completions server over HTTP."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 20.0,
    ) -> None:
        self.url = _chat_url(base_url)
        self.model = model
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)

    def expand(self, prompt: str, seed: int) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": prompt},
            ],
            "temperature": 0.7,
            "max_tokens": 300,
            # Servers that honour `seed` make the expansion reproducible per request.
            "seed": seed % 2**31,
        }
        try:
            response = self._client.post(self.url, json=body)
            response.raise_for_status()
            answer = response.json()["choices"][0]["message"]["content"]
        except httpx.HTTPStatusError as exc:
            raise ExpansionError(f"{self.url} answered HTTP {exc.response.status_code}") from exc
        except httpx.HTTPError as exc:
            raise ExpansionError(f"{self.url} unreachable: {exc.__class__.__name__}") from exc
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ExpansionError(f"{self.url} sent an unexpected answer") from exc
        text = _clean_answer(str(answer or ""))
        if not text:
            raise ExpansionError(f"{self.url} returned an empty prompt")
        return append_detail(prompt, text)

    def close(self) -> None:
        self._client.close()


class TransformersExpander:
    """Expands with a local causal LM (a transformers directory), loaded on first use."""

    def __init__(self, path: str, *, max_new_tokens: int = 160, device: str = "cpu") -> None:
        self.path = path
        self.max_new_tokens = max_new_tokens
        self.device = device
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            # Any: transformers types `.to` on its models too narrowly for a device string.
            model: Any = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ExpansionError(f"cannot load the expansion model at {self.path}: {exc}") from exc
        self._model = model.to(self.device).eval()

    def _inputs(self, prompt: str) -> Any:
        tokenizer = self._tokenizer
        if getattr(tokenizer, "chat_template", None):
            messages = [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": prompt},
            ]
            return tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        # Base models without a chat template: a plain instruction they can continue.
        text = f"{SYSTEM_PROMPT}\n\nPrompt: {prompt}\nRewritten prompt:"
        return tokenizer(text, return_tensors="pt")

    def expand(self, prompt: str, seed: int) -> str:
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            inputs = {k: v.to(self.device) for k, v in self._inputs(prompt).items()}
            pad_id = self._tokenizer.pad_token_id
            if pad_id is None:
                pad_id = self._tokenizer.eos_token_id
            # Sampling draws from the global RNG; fork it so the seed is ours alone.
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(seed)
                output = self._model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=0.7,
                    top_p=0.9,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=pad_id,
                )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        text = _clean_answer(self._tokenizer.decode(new_tokens, skip_special_tokens=True))
        if not text:
            raise ExpansionError(f"the expansion model at {self.path} returned an empty prompt")
        return append_detail(prompt, text)


# --------------------------------------------------------------------------------------------
# Fallback and construction
# --------------------------------------------------------------------------------------------


class FallbackExpander:
    """Tries `primary`; on any failure uses `fallback` (offline by default) and says so."""

    def __init__(self, primary: PromptExpander, fallback: PromptExpander | None = None) -> None:
        self.primary = primary
        self.fallback = fallback or OfflineExpander()

    def expand(self, prompt: str, seed: int) -> str:
        return self.expand_with_warnings(prompt, seed)[0]

    def expand_with_warnings(self, prompt: str, seed: int) -> tuple[str, list[str]]:
        try:
            return self.primary.expand(prompt, seed), []
        except Exception as exc:
            warning = f"prompt expansion failed ({exc}); used the built-in offline expander instead"
            logger.warning(warning)
            return self.fallback.expand(prompt, seed), [warning]


def expand_prompt(
    expander: PromptExpander, prompt: str, seed: int, budget: TokenBudget | None = None
) -> tuple[str, list[str]]:
    """Expand with any expander, returning (prompt, warnings); never raises for the expander's
    sake: a failing expander without its own fallback falls back to the offline one here.
    With a `budget`, the result is cut to fit it (`fit_to_budget`), the user's text first."""
    verbose = getattr(expander, "expand_with_warnings", None)
    if callable(verbose):
        result: tuple[str, list[str]] = verbose(prompt, seed)
    else:
        result = FallbackExpander(expander).expand_with_warnings(prompt, seed)
    expanded, warnings = result
    if not expanded.startswith(prompt.strip()):
        # A custom expander that rewrote the prompt: the user's words still come first.
        expanded = append_detail(prompt, expanded)
    if budget is None:
        return expanded, warnings
    fitted, cut = fit_to_budget(prompt, expanded, budget)
    return fitted, warnings + cut


def make_expander(
    url: str | None,
    model: str | None,
    api_key: str | None,
    local_path: str | None,
) -> PromptExpander:
    """Pick the expander from settings: a chat URL (needs `model`), else a local model
    directory, else the offline expander. Remote and local ones fall back to offline."""
    if url and local_path:
        raise ValueError("set either an expansion URL or a local expansion model, not both")
    if url:
        if not model:
            raise ValueError("an expansion URL needs a model name for /v1/chat/completions")
        return FallbackExpander(OpenAIChatExpander(url, model, api_key))
    if local_path:
        return FallbackExpander(TransformersExpander(local_path))
    return OfflineExpander()
