"""Serving a chat model: /v1/chat/completions renders the messages in the model's template and the reply
ends at its end-of-turn token; /v1/models says whether there is a template; a base model keeps the
plain rendering. The chat tokens decode as their spelling (GPT-2's included)."""

from __future__ import annotations

import threading
from dataclasses import asdict

import pytest
import torch

pytest.importorskip("fastapi", reason="nanogpt[serve] is not installed")
from starlette.testclient import TestClient  # noqa: E402

from nanogpt.chat.template import (
    ChatTokenizer,
    Message,
    chat_tokenizer,
    encode_prompt,
    template_for,
    with_template,
)  # noqa: E402
from nanogpt.checkpoint import save_checkpoint  # noqa: E402
from nanogpt.data.bpe import train_bpe  # noqa: E402
from nanogpt.data.tokenizers import IM_END, IM_START, GPT2Tokenizer  # noqa: E402
from nanogpt.errors import NanoGPTError  # noqa: E402
from nanogpt.model import GPT, GPTConfig  # noqa: E402
from nanogpt.serve.app import Served, Settings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def bpe(shakespeare_text):
    return train_bpe([shakespeare_text[:60_000]], 400)


def always(token: int, vocab_size: int) -> GPT:
    """A model whose every next token is `token`: ln_f makes every position the same vector, which only
    the head's row `token` reads."""
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False)
    )
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias = torch.nn.Parameter(torch.ones(16))
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = 1.0
    return model.eval()


def client_for(model: GPT, tokenizer) -> TestClient:
    client = TestClient(create_app(lambda: Served(model, tokenizer, "tiny"), Settings(max_tokens=40)))
    client.__enter__()
    for _ in range(500):
        if client.get("/health").status_code == 200:
            return client
        threading.Event().wait(0.01)
    raise AssertionError("the model never loaded")


MESSAGES = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Who is king?"}]


def test_a_chat_model_answers_in_its_template_and_stops_at_end_of_turn(bpe):
    template = template_for(bpe)
    prompt = encode_prompt(bpe, template, [Message("system", "Be brief."), Message("user", "Who is king?")])
    for token, finish in ((template.end, "stop"), (bpe.encode("a")[0], "length")):  # the control: never ends
        client = client_for(always(token, bpe.vocab_size), ChatTokenizer(bpe, template))
        try:
            reply = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5}).json()
            assert reply["usage"]["prompt_tokens"] == len(prompt)
            assert reply["choices"][0]["finish_reason"] == finish
            assert reply["choices"][0]["message"]["content"] == ("" if finish == "stop" else "aaaaa")
            assert client.get("/v1/models").json()["data"][0]["chat_template"] == "chatml"
        finally:
            client.__exit__(None, None, None)


def test_a_base_model_keeps_the_plain_rendering(bpe):
    client = client_for(always(bpe.encode("a")[0], bpe.vocab_size), bpe)
    try:
        reply = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3}).json()
        plain = "System: Be brief.\nUser: Who is king?\nAssistant:"
        assert reply["usage"]["prompt_tokens"] == len(bpe.encode(plain))
        assert client.get("/v1/models").json()["data"][0]["chat_template"] is None
    finally:
        client.__exit__(None, None, None)


def test_serve_picks_the_template_from_the_checkpoint(tmp_path, bpe):
    model = always(0, bpe.vocab_size)
    for name, meta in (("base", bpe.to_meta()), ("chat", with_template(bpe.to_meta(), template_for(bpe)))):
        save_checkpoint(
            {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": meta},
            tmp_path / name,
        )
    assert chat_tokenizer(tmp_path / "base", bpe) is bpe
    served = chat_tokenizer(tmp_path / "chat", bpe)
    assert served.template == template_for(bpe) and served.eot == template_for(bpe).end
    assert chat_tokenizer("gpt2", bpe) is bpe  # GPT-2's weights: a base model


def test_chat_tokens_decode_as_their_spelling():
    try:
        gpt2 = GPT2Tokenizer()
    except NanoGPTError as e:
        pytest.skip(str(e))
    tok = ChatTokenizer(gpt2, template_for(gpt2))
    ids = [50257, *gpt2.encode("user\nhi"), 50258]
    assert tok.decode(ids) == f"{IM_START}user\nhi{IM_END}" and tok.vocab_size == 50259
