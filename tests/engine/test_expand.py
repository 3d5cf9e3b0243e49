"""Prompt expansion: offline rules, a real OpenAI-compatible HTTP server, a real local LM."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from auraserve.engine.expand import (
    ExpansionError,
    FallbackExpander,
    OfflineExpander,
    OpenAIChatExpander,
    PromptExpander,
    TokenBudget,
    TransformersExpander,
    append_detail,
    expand_prompt,
    fit_to_budget,
    make_expander,
)
from auraserve.engine.tiny import build_tiny_tokenizer

# The async reference's own example prompt (its body asks for expand_prompt: true).
SEED_PROMPT = (
    "Close-up portrait of a majestic iguana with vibrant blue-green scales, piercing amber "
    "eyes, and orange spiky crest. Intricate textures and details visible on scaly skin. "
    "Wrapped in dark hood, giving regal appearance. Dramatic lighting against black "
    "background. Hyper-realistic, high-resolution image showcasing the reptiles expressive "
    "features and coloration."
)

PROMPTS = [
    "a cat holding a sign that says hello world",
    "An oil painting of a castle at sunset.",
    "portrait of an old fisherman, close-up",
    "neon city street at night, 3d render",
    "abstract shapes",
    "日本の庭園",
]


# --- offline ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_offline_keeps_the_users_text_and_is_deterministic(prompt: str) -> None:
    expander = OfflineExpander()
    out = expander.expand(prompt, 7)
    assert out.startswith(prompt.strip())
    assert len(out) > len(prompt) + 20
    assert out == OfflineExpander().expand(prompt, 7)


def test_offline_varies_with_seed_and_follows_keywords() -> None:
    expander = OfflineExpander()
    variants = {expander.expand("a cat in a garden", seed) for seed in range(20)}
    assert len(variants) > 3
    painting = expander.expand("an oil painting of a lighthouse", 1)
    assert any(term in painting for term in ("brushwork", "painting", "painterly"))
    # The user already chose the light: the expander must not add a second one.
    sunset = expander.expand("a lake at sunset", 3)
    assert not any(term in sunset for term in ("window light", "overcast", "golden hour"))
    assert isinstance(expander, PromptExpander)


# --- OpenAI-compatible server over real HTTP ---------------------------------------------------


class _ChatServer:
    """A loopback HTTP server speaking /v1/chat/completions; records what it received."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.answer = '  "golden light, a weathered wooden sign"  '
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                server.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )
                if self.path != "/v1/chat/completions":
                    self._reply(404, {"error": "not found"})
                elif server.status != 200:
                    self._reply(server.status, {"error": {"message": "boom"}})
                else:
                    message = {"role": "assistant", "content": server.answer}
                    self._reply(200, {"choices": [{"index": 0, "message": message}]})

            def _reply(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server() -> Iterator[_ChatServer]:
    server = _ChatServer()
    yield server
    server.close()


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_openai_expander_talks_to_a_real_server(chat_server: _ChatServer, suffix: str) -> None:
    expander = OpenAIChatExpander(chat_server.url + suffix, "qwen2.5-3b", api_key="sk-test")
    out = expander.expand("a cat holding a sign that says hello world", 42)
    # The model's answer is appended: the user's words stay first, byte for byte.
    assert out == (
        "a cat holding a sign that says hello world, golden light, a weathered wooden sign"
    )
    [request] = chat_server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sk-test"
    body = request["body"]
    assert body["model"] == "qwen2.5-3b" and body["seed"] == 42
    assert body["messages"][0]["role"] == "system"
    assert body["messages"][-1] == {
        "role": "user",
        "content": "a cat holding a sign that says hello world",
    }


def test_an_answer_that_repeats_the_prompt_is_not_doubled(chat_server: _ChatServer) -> None:
    chat_server.answer = "A cat on a roof, moonlight, film grain"
    out = OpenAIChatExpander(chat_server.url, "m").expand("a cat on a roof", 1)
    assert out == "a cat on a roof, moonlight, film grain"
    assert append_detail("A dog.", "a dog. Snow") == "A dog. Snow"
    assert append_detail("a dog", "") == "a dog"


def test_openai_expander_errors_and_fallback(chat_server: _ChatServer) -> None:
    chat_server.status = 500
    remote = OpenAIChatExpander(chat_server.url, "m", timeout=5)
    with pytest.raises(ExpansionError, match="HTTP 500"):
        remote.expand("a cat", 1)
    prompt, warnings = expand_prompt(FallbackExpander(remote), "a cat", 1)
    assert prompt == OfflineExpander().expand("a cat", 1)
    assert len(warnings) == 1 and "offline" in warnings[0]

    chat_server.status, chat_server.answer = 200, "   "
    with pytest.raises(ExpansionError, match="empty"):
        remote.expand("a cat", 1)


def test_unreachable_server_falls_back_quickly() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        port = probe.server_address[1]  # closed again when the block ends: nothing listens
    expander = make_expander(f"http://127.0.0.1:{port}", "m", None, None)
    prompt, warnings = expand_prompt(expander, "a dog", 5)
    assert prompt.startswith("a dog") and warnings and "unreachable" in warnings[0]


def test_plain_expander_that_raises_still_falls_back() -> None:
    class Broken:
        def expand(self, prompt: str, seed: int) -> str:
            raise RuntimeError("no GPU for the LLM")

    prompt, warnings = expand_prompt(Broken(), "a boat", 2)
    assert prompt == OfflineExpander().expand("a boat", 2)
    assert "no GPU for the LLM" in warnings[0]


def test_make_expander_choices() -> None:
    assert isinstance(make_expander(None, None, None, None), OfflineExpander)
    remote = make_expander("http://127.0.0.1:9", "m", "k", None)
    assert isinstance(remote, FallbackExpander)
    assert isinstance(remote.primary, OpenAIChatExpander)
    local = make_expander(None, None, None, "/models/llm")
    assert isinstance(local, FallbackExpander)
    assert isinstance(local.primary, TransformersExpander)
    with pytest.raises(ValueError, match="model"):
        make_expander("http://127.0.0.1:9", None, None, None)
    with pytest.raises(ValueError, match="not both"):
        make_expander("http://127.0.0.1:9", "m", None, "/models/llm")


# --- local transformers model ------------------------------------------------------------------


def _save_tiny_causal_lm(directory: Path) -> None:
    """A random-weight 2-layer Llama with a word-level tokenizer: real classes, tiny sizes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "a the cat dog red blue light soft sharp detailed photo painting of in with".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
        )
        LlamaForCausalLM(config).save_pretrained(directory)


def test_transformers_expander_loads_lazily_and_is_seeded(tmp_path: Path) -> None:
    _save_tiny_causal_lm(tmp_path)
    expander = TransformersExpander(str(tmp_path), max_new_tokens=12)
    assert expander._model is None  # nothing loaded until the first expansion
    first = expander.expand("a cat", 3)
    assert first and expander._model is not None
    assert expander.expand("a cat", 3) == first


def test_transformers_expander_missing_model_falls_back(tmp_path: Path) -> None:
    expander = make_expander(None, None, None, str(tmp_path / "nothing-here"))
    prompt, warnings = expand_prompt(expander, "a cat", 1)
    assert prompt.startswith("a cat") and "cannot load" in warnings[0]


# --- the token budget ------------------------------------------------------------------------


def _words_budget(limit: int) -> TokenBudget:
    return TokenBudget(count=lambda text: len(text.split()), limit=limit)


def test_expansion_keeps_the_phrases_that_fit_in_order() -> None:
    prompt = "a red fox in snow"
    expanded = prompt + ", soft light, a very long and detailed phrase about the fur, 8k"
    fitted, warnings = fit_to_budget(prompt, expanded, _words_budget(8))
    # "soft light" (2 words) and "8k" fit after the 5 words; the long phrase does not.
    assert fitted == "a red fox in snow, soft light, 8k"
    assert len(warnings) == 1 and "left out" in warnings[0] and "fur" in warnings[0]
    assert fit_to_budget(prompt, expanded, _words_budget(100)) == (expanded, [])


def test_a_prompt_that_fills_the_window_gets_nothing_appended() -> None:
    prompt = "one two three four"
    fitted, warnings = fit_to_budget(prompt, prompt + ", five", _words_budget(4))
    assert fitted == prompt and warnings == [
        "prompt expansion added nothing: the prompt alone is 4 tokens and AuraFlow reads 4"
    ]
    fitted, warnings = fit_to_budget(prompt, prompt + ", five", _words_budget(3))
    assert fitted == prompt and "added nothing" in warnings[0]


def test_expand_prompt_fits_any_expander_to_the_budget() -> None:
    class Rewriter:
        def expand(self, prompt: str, seed: int) -> str:
            return "A completely rewritten prompt, with lots of detail, and more"

    fitted, warnings = expand_prompt(Rewriter(), "a boat", 1, _words_budget(8))
    assert fitted == "a boat, A completely rewritten prompt, and more"
    assert "left out" in warnings[0]


@pytest.mark.parametrize("seed", range(8))
def test_the_seed_example_expands_within_the_models_window(seed: int) -> None:
    tokenizer = build_tiny_tokenizer()
    budget = TokenBudget(count=lambda text: len(tokenizer(text).input_ids), limit=256)
    fitted, warnings = expand_prompt(OfflineExpander(), SEED_PROMPT, seed, budget)
    assert fitted == OfflineExpander().expand(SEED_PROMPT, seed) and warnings == []
    assert fitted.startswith(SEED_PROMPT) and budget.fits(fitted)
    # With a window it overflows, the user's words are kept whole and detail is cut.
    tight = TokenBudget(count=budget.count, limit=budget.count(SEED_PROMPT) + 12)
    cut, notes = expand_prompt(OfflineExpander(), SEED_PROMPT, seed, tight)
    assert cut.startswith(SEED_PROMPT) and len(cut) > len(SEED_PROMPT) and tight.fits(cut)
    assert len(notes) == 1 and "left out" in notes[0]
