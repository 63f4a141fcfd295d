"""`nanogpt serve`, in process (starlette's TestClient): every endpoint, OpenAI's reply and chunk
formats, the SSE framing, stop strings, text that never splits a character, and OpenAI's error JSON
with the right status for every kind of bad request."""

from __future__ import annotations

import json
import string
import threading

import pytest
import torch

pytest.importorskip("fastapi", reason="nanogpt[serve] is not installed")
from starlette.testclient import TestClient  # noqa: E402

from nanogpt import GPT, GPTConfig  # noqa: E402
from nanogpt.data.tokenizers import ByteTokenizer, CharTokenizer  # noqa: E402
from nanogpt.generate import Sampling, decode_stream, generate_stream  # noqa: E402
from nanogpt.serve.app import Served, Settings, create_app  # noqa: E402
from nanogpt.serve.engine import StopMatcher  # noqa: E402

CHARS = string.ascii_letters + string.digits + " .,:;!?'\n"
CONTEXT = 48


def tiny_model(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=CONTEXT, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()


def start(served: Served, **settings) -> TestClient:
    client = TestClient(create_app(lambda: served, Settings(**settings)))
    client.__enter__()
    wait_ready(client)
    return client


def wait_ready(client: TestClient) -> None:
    for _ in range(500):
        if client.get("/health").status_code == 200:
            return
        threading.Event().wait(0.01)
    raise AssertionError("the model never loaded")


@pytest.fixture(scope="module")
def char_model():
    tok = CharTokenizer("".join(sorted(CHARS)))
    return tiny_model(tok.vocab_size), tok


@pytest.fixture(scope="module")
def client(char_model):
    model, tok = char_model
    client = start(Served(model, tok, "tiny"), max_batch=4, max_n=3, max_body_bytes=10_000, max_tokens=40)
    yield client
    client.__exit__(None, None, None)


def events(response) -> list[str]:
    """The data of each SSE event, checking the framing: `data: ...` lines, a blank line after each."""
    body = response.read().decode()
    assert body.endswith("\n\n")
    frames = body[:-2].split("\n\n")
    assert all(f.startswith("data: ") and "\n" not in f for f in frames), body
    return [f[len("data: ") :] for f in frames]


def alone(model, tok, prompt: str, n: int, seed: int, **sampling) -> str:
    """The text of one completion decoded alone with GPT's engine: what the server must return."""
    steps = generate_stream(
        model,
        torch.tensor([tok.encode(prompt)]),
        n,
        Sampling(**sampling),
        generator=torch.Generator().manual_seed(seed),
    )
    return "".join(decode_stream(tok, (int(t) for t in steps)))


def test_health_is_503_while_the_model_loads_then_200(char_model):
    loaded = threading.Event()

    def load():
        loaded.wait(10)
        return Served(*char_model, "tiny")

    with TestClient(create_app(load)) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert client.post("/v1/completions", json={"prompt": "a"}).status_code == 503
        loaded.set()
        wait_ready(client)
        assert client.get("/health").json() == {"status": "ok", "model": "tiny", "running": 0, "waiting": 0}


def test_models_and_playground(client, char_model):
    model, tok = char_model
    assert client.get("/v1/models").json() == {
        "object": "list",
        "data": [
            {
                "id": "tiny",
                "object": "model",
                "created": 0,
                "owned_by": "nanogpt",
                "context_length": CONTEXT,
                "parameters": model.get_num_params(non_embedding=False),
                "tokenizer": "char",
            }
        ],
    }
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/completions" in page.text and "<script src" not in page.text  # no external script


def test_completion_is_each_choice_decoded_alone(client, char_model):
    """n=3 with a seed: choice i is the text the engine decodes alone with seed + i; usage adds up."""
    model, tok = char_model
    body = {"prompt": "Hello", "max_tokens": 20, "seed": 7, "n": 3, "temperature": 0.9, "top_k": 10}
    reply = client.post("/v1/completions", json=body).json()
    assert (
        reply["object"] == "text_completion" and reply["model"] == "tiny" and reply["id"].startswith("cmpl-")
    )
    for i, choice in enumerate(reply["choices"]):
        assert choice == {
            "index": i,
            "text": alone(model, tok, "Hello", 20, 7 + i, temperature=0.9, top_k=10),
            "logprobs": None,
            "finish_reason": "length",
        }
    assert reply["usage"] == {"prompt_tokens": 5, "completion_tokens": 60, "total_tokens": 65}
    echoed = client.post("/v1/completions", json={**body, "n": 1, "echo": True}).json()
    assert echoed["choices"][0]["text"] == "Hello" + reply["choices"][0]["text"]


def test_stream_is_openai_chunks_then_done(client):
    body = {"prompt": "abc", "max_tokens": 12, "seed": 3, "stream_options": {"include_usage": True}}
    whole = client.post("/v1/completions", json=body).json()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = events(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    texts, last, usage = chunks[:-2], chunks[-2], chunks[-1]
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in texts)
    assert "".join(c["choices"][0]["text"] for c in texts) == whole["choices"][0]["text"]
    assert last["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_chat_reply_and_stream(client, char_model):
    """Messages become the plain template; the reply is the completion of that prompt; the stream
    opens with the role, sends content deltas and ends with an empty delta and finish_reason."""
    model, tok = char_model
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    prompt = "System: Be brief.\nUser: Hi\nAssistant:"
    body = {"messages": messages, "max_tokens": 15, "seed": 1}
    reply = client.post("/v1/chat/completions", json=body).json()
    raw = client.post(
        "/v1/completions", json={"prompt": prompt, "max_tokens": 15, "seed": 1, "stop": "\nUser:"}
    )
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    choice = reply["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": raw.json()["choices"][0]["text"]}
    assert choice["finish_reason"] == raw.json()["choices"][0]["finish_reason"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(d) for d in events(r)[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    assert "".join(d["content"] for d in deltas[1:-1]) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def fed(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool]:
    matcher, sent = StopMatcher(stops), []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        sent.append(text)
        if stopped:
            return sent, True
    return [*sent, matcher.flush()], False


def test_stop_matcher_holds_back_what_may_start_a_stop_string():
    assert StopMatcher(("world",)).feed("hello wor") == ("hello ", False)
    assert fed(("world", "lo"), ["hello world!"]) == (["hel"], True)
    assert fed((), ["abc"]) == (["abc", ""], False)
    # a stop string split across pieces, after a false start that overlaps it (KMP's failure links)
    assert fed(("abab c",), ["xab", "aba", "b c", "tail"]) == (["x", "ab", ""], True)
    assert fed(("aab",), ["aaa", "a"]) == (["a", "a", "aa"], False)
    # every split of a text into pieces stops at the same place as str.find on the whole
    text, stops = "the cat sat on the mat, then the bat", ("the b", "at,", "xyz")
    whole = min(i for i in (text.find(s) for s in stops) if i >= 0)
    for cut in range(1, len(text)):
        sent, stopped = fed(stops, [text[:cut], text[cut:]])
        assert stopped and "".join(sent) == text[:whole], cut


def test_stop_string_ends_the_text_before_it(client):
    greedy = {"prompt": "The", "max_tokens": 30, "temperature": 0}
    text = client.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
    stop = text[10:13]  # three characters from the middle: the text ends where they first occur
    expected = text[: text.find(stop)]
    stopped = client.post("/v1/completions", json={**greedy, "stop": [stop, "never"]}).json()["choices"][0]
    assert stopped["text"] == expected and stopped["finish_reason"] == "stop"
    with client.stream("POST", "/v1/completions", json={**greedy, "stop": stop, "stream": True}) as r:
        chunks = [json.loads(d)["choices"][0] for d in events(r)[:-1]]
    assert "".join(c["text"] for c in chunks) == expected and chunks[-1]["finish_reason"] == "stop"


def test_max_tokens_is_capped_by_the_context_and_the_server(client):
    prompt = "a" * 30  # 18 positions left in the context of 48
    reply = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1000}).json()
    assert reply["usage"]["completion_tokens"] == 18 and reply["choices"][0]["finish_reason"] == "length"
    chat = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "seed": 0}
    )
    assert chat.json()["usage"]["completion_tokens"] <= 40  # the server's max_tokens


BAD = [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, None),
    ({"max_tokens": 5}, 422, "prompt", "invalid_value"),
    ({"prompt": 3}, 422, "prompt", "invalid_value"),
    ({"prompt": "a", "max_tokens": "many"}, 422, "max_tokens", "invalid_value"),
    ({"prompt": "a", "temperature": 2.5}, 400, "temperature", None),
    ({"prompt": "a", "top_p": 0}, 400, "top_p", None),
    ({"prompt": "a", "top_k": -1}, 400, "top_k", None),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens", None),
    ({"prompt": "a", "n": 4}, 400, "n", None),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"prompt": "a", "seed": -1}, 400, "seed", None),
    ({"prompt": "a", "logprobs": 6}, 400, "logprobs", None),
    ({"prompt": "a", "suffix": "b"}, 400, "suffix", "unsupported_parameter"),
    ({"prompt": "a" * 48}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": "naïve"}, 400, "prompt", "invalid_prompt"),
    ({"prompt": [1, 999]}, 400, "prompt", "invalid_prompt"),
    ({"prompt": ""}, 400, "prompt", "invalid_prompt"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ({"prompt": "a" * 20_000}, 413, None, "request_too_large"),
]


@pytest.mark.parametrize("body, status, param, code", BAD)
def test_bad_requests_get_openai_error_json(client, body, status, param, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post("/v1/completions", **kwargs)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_chat_errors_and_unknown_routes(client):
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages.0.role"
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/completions").status_code == 405


def test_api_key_is_required_when_set(char_model):
    client = start(Served(*char_model, "tiny"), api_key="s3cret")
    try:
        assert client.get("/v1/models").status_code == 401
        wrong = client.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        ok = client.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200  # health and the page need no key
    finally:
        client.__exit__(None, None, None)


def trained_model(tokenizer, text: str, steps: int = 120) -> GPT:
    """A tiny model that learnt to continue `text` (repeated): greedy decoding then writes it out."""
    data = torch.tensor(tokenizer.encode(text * 20))
    model = tiny_model(tokenizer.vocab_size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(len(data) - CONTEXT - 1, (8,))
        x = torch.stack([data[s : s + CONTEXT] for s in starts])
        y = torch.stack([data[s + 1 : s + CONTEXT + 1] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("tokenizer", ["char", "byte"])
def test_streamed_text_never_splits_a_character(tokenizer):
    """Non-ASCII prompts and text: with characters as tokens, and with bytes as tokens (3-4 per
    character here), every chunk is whole characters (no U+FFFD) and they join to the text."""
    text = "日本語のテキスト、ελληνικά και 😀🎉 émoji — ünïcödé. "
    tok = CharTokenizer("".join(sorted(set(text)))) if tokenizer == "char" else ByteTokenizer()
    client = start(Served(trained_model(tok, text), tok, tokenizer))
    try:
        body = {"prompt": text[:5], "max_tokens": 40, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            pieces = [json.loads(d)["choices"][0]["text"] for d in events(r)[:-1]]
        # max_tokens may end the text inside a character: its bytes then end it as one U+FFFD (as
        # `nanogpt sample` does); anywhere before that a U+FFFD would be a character split across chunks
        joined = "".join(pieces).removesuffix("\ufffd")
        assert "\ufffd" not in joined and len(set(joined) - set(text)) == 0, joined
        assert sum(ord(ch) > 127 for ch in joined) >= 5  # it did write non-ASCII characters
        if tokenizer == "byte":  # a chunk per character, not per token: bytes were held back
            assert len([p for p in pieces if p]) < 30
    finally:
        client.__exit__(None, None, None)


def test_a_client_that_leaves_mid_stream_frees_its_row(char_model):
    """The client closes the stream after the first chunk: its completion leaves the batch long before
    its max_tokens (a context of 1024 positions, 1000 tokens asked)."""
    _, tok = char_model
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=16)).eval()
    client = start(Served(model, tok, "long"))
    scheduler = client.app.state.nanogpt.scheduler
    jobs = []
    submit = scheduler.submit
    scheduler.submit = lambda job: (jobs.append(job), submit(job))[1]
    try:
        body = {"prompt": "a", "max_tokens": 1000, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            next(r.iter_lines())
        for _ in range(500):
            if client.get("/health").json()["running"] == 0:
                break
            threading.Event().wait(0.01)
        assert client.get("/health").json()["running"] == 0
        assert jobs[0].cancelled and jobs[0].completions[0].tokens < 1000
    finally:
        client.__exit__(None, None, None)
