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
    TransformersExpander,
    expand_prompt,
    make_expander,
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
        self.answer = '  "A majestic cat holding a sign that says hello world, golden light"  '
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
    assert out == "A majestic cat holding a sign that says hello world, golden light"
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
