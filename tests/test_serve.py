"""`nanogpt serve`, in process (starlette's TestClient): every endpoint, OpenAI's reply and chunk
formats, the SSE framing, stop strings, text that never splits a character, and OpenAI's error JSON
with the right status for every kind of bad request."""

from __future__ import annotations

import dataclasses
import gc
import json
import string
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

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
                "chat_template": None,  # a base model (tests/test_chat_serve.py serves a chat model)
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


@pytest.mark.slow
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
    scheduler.submit = lambda completions: (jobs.append(completions), submit(completions))[1]
    try:
        body = {"prompt": "a", "max_tokens": 1000, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            next(r.iter_lines())
        for _ in range(500):
            if client.get("/health").json()["running"] == 0:
                break
            threading.Event().wait(0.01)
        assert client.get("/health").json()["running"] == 0
        assert jobs[0][0].job.cancelled and jobs[0][0].tokens < 1000
    finally:
        client.__exit__(None, None, None)


def test_a_finished_request_is_freed_without_the_garbage_collector(client):
    """With the cyclic collector off, a reply's completions (each holding its stop strings' tables: 8 bytes
    per character) are gone once the reply is: nothing they belong to is a cycle (a Job that listed its
    completions grew the soak test's server, 800k characters of stops every 20th request, by 30-60 MB
    per 100 requests until a full collection)."""
    scheduler = client.app.state.nanogpt.scheduler
    submitted, submit = [], scheduler.submit
    scheduler.submit = lambda completions: (
        submitted.extend(map(weakref.ref, completions)),
        submit(completions),
    )[1]
    gc.disable()
    try:
        for stream in (False, True):
            body = {"prompt": "ab", "max_tokens": 5, "n": 2, "stop": ["x" * 5000], "stream": stream}
            assert client.post("/v1/completions", json=body).status_code == 200
        assert len(submitted) == 4 and all(ref() is None for ref in submitted)
    finally:
        gc.enable()
        del scheduler.submit


def poisoned_model(tok) -> GPT:
    """A model whose input embedding of "Z" is NaN (its head untied, so only a sequence that holds a Z
    gets NaN logits): the model a broken checkpoint gives, for one request only."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=CONTEXT, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)
    model = GPT(dataclasses.replace(config, tie_embeddings=False)).eval()
    with torch.no_grad():
        model.transformer.wte.weight[tok.encode("Z")[0]] = float("nan")
    return model


def test_one_failing_request_never_stops_the_others(char_model):
    """NaN logits fail that request alone (500 JSON; a stream: an error event, then [DONE]); tiny
    temperatures (1e-300, 5e-324: 0 in float32) draw near-greedily; every other request before, among
    and after them gets its exact text and /health stays ok and idle."""
    _, tok = char_model
    model = poisoned_model(tok)
    client = start(Served(model, tok, "poisoned"), max_batch=2)
    try:
        good = {"prompt": "Hello", "max_tokens": 12, "seed": 5, "temperature": 0.9}
        expected = alone(model, tok, "Hello", 12, 5, temperature=0.9)
        bad = client.post("/v1/completions", json={"prompt": "aZ", "max_tokens": 4})
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "decoding_failed", bad.text
        with client.stream("POST", "/v1/completions", json={"prompt": "Z", "stream": True}) as r:
            data = events(r)
        assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "decoding_failed"
        greedy = client.post("/v1/completions", json={**good, "temperature": 0}).json()["choices"][0]["text"]
        for t in (1e-300, 5e-324):
            tiny = client.post("/v1/completions", json={**good, "temperature": t})
            assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy
        replies = [client.post("/v1/completions", json=good).json() for _ in range(3)]
        assert [r["choices"][0]["text"] for r in replies] == [expected] * 3
        assert client.get("/health").json() == {
            "status": "ok",
            "model": "poisoned",
            "running": 0,
            "waiting": 0,
        }
    finally:
        client.__exit__(None, None, None)


def test_health_reports_a_decoding_thread_that_died():
    """A decoding loop that dies (a bug) says so: /health and new requests are 503 naming why."""
    tok = CharTokenizer("".join(sorted(CHARS)))
    client = start(Served(tiny_model(tok.vocab_size), tok, "tiny"))
    try:
        scheduler = client.app.state.nanogpt.scheduler

        def broken():
            raise RuntimeError("a bug in the loop")

        scheduler._admit = broken  # the loop's next call raises outside any request's try
        with scheduler.wake:
            scheduler.wake.notify()
        client.post("/v1/completions", json={"prompt": "a"})  # wakes the loop (or finds it dead)
        scheduler.thread.join(10)
        health = client.get("/health")
        assert health.status_code == 503 and "a bug in the loop" in health.json()["error"]["message"]
        after = client.post("/v1/completions", json={"prompt": "a"})
        assert after.status_code == 503 and after.json()["error"]["code"] == "decoder_failed"
    finally:
        client.__exit__(None, None, None)


DEEP = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    "body, param, code",
    [
        (DEEP, None, "invalid_json"),  # deeper than Python's parser recurses
        (b'{"prompt": ' + DEEP + b"}", None, "invalid_json"),
        # more completions than the queue holds can never fit: 400 (not a retryable 503), counted before
        # any prompt is read (the last one here is not even valid)
        ({"prompt": ["a"] * 99 + ["naïve"], "n": 3}, "prompt", "too_many_completions"),
        ({"prompt": "a", "n": 3, "logprobs": 1, "echo": True, "max_tokens": -1}, "max_tokens", None),
    ],
)
def test_requests_that_used_to_break_the_server(body, param, code):
    tok = CharTokenizer("".join(sorted(CHARS)))
    client = start(Served(tiny_model(tok.vocab_size), tok, "tiny"), max_n=3, max_waiting=256)
    try:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = client.post("/v1/completions", **kwargs)
        assert r.status_code == 400, r.text
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)
    finally:
        client.__exit__(None, None, None)


def test_max_completion_tokens_0_is_refused_like_max_tokens_0(client):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    ok = client.post("/v1/chat/completions", json={**body, "max_completion_tokens": 3, "max_tokens": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3


def test_long_stop_strings_cost_o_new_text(char_model):
    """4 stop strings of 240,000 characters (a legal body just under 1 MB) that never match: the reply is
    the text without them, and it comes in seconds (it took 32 s with prefix slicing; every other client
    waited meanwhile)."""
    model, tok = char_model
    client = start(Served(model, tok, "tiny"), max_body_bytes=1_000_000)
    try:
        stops = [c * 240_000 for c in "abcd"]
        greedy = {"prompt": "Hello", "max_tokens": 10, "temperature": 0}
        plain = client.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
        began = time.monotonic()
        r = client.post("/v1/completions", json={**greedy, "stop": stops})
        assert r.json()["choices"][0]["text"] == plain
        assert time.monotonic() - began < 5
    finally:
        client.__exit__(None, None, None)


def forward_logprobs(model: GPT, ids: list[int], vocab_size: int | None = None) -> torch.Tensor:
    """Log-probs of every next token after each position of ids, from one plain forward pass without
    a cache, over the first vocab_size ids (the tokenizer's; None: all V), (T, vocab_size) in float32:
    what the server's log-probs must equal."""
    idx = torch.tensor([ids])
    with torch.no_grad():
        logits, _ = model(idx, idx)  # with targets: every position's logits
    return torch.log_softmax(logits[0, :, :vocab_size].float(), dim=-1)


def check_logprobs(model, tok, text: str, logprobs: dict, echoed: int, top: int) -> None:
    """Each token's log-prob and top log-probs equal the forward pass over `text` (prompt + reply; the
    first `echoed` characters are the echoed prompt), and text_offset counts characters into it."""
    ids = tok.encode(text)
    assert "".join(logprobs["tokens"]) == text[len(text) - len(logprobs["tokens"]) :]
    reference = forward_logprobs(model, ids, tok.vocab_size)
    first = len(ids) - len(logprobs["tokens"])
    for k, (token, lp, tops, offset) in enumerate(
        zip(
            *(logprobs[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")),
            strict=True,
        )
    ):
        pos = first + k
        assert offset == pos and tok.encode(token) == [ids[pos]]
        if pos == 0:
            assert lp is None and tops is None and echoed
            continue
        assert abs(lp - float(reference[pos - 1, ids[pos]])) < 1e-4, (k, lp)
        values, best = torch.topk(reference[pos - 1], top)
        assert list(tops) == [tok.decode([int(b)]) for b in best]
        for (_, got), want in zip(tops.items(), values.tolist(), strict=True):
            assert abs(got - want) < 1e-4


def test_logprobs_and_echo_equal_a_forward_pass_batched_with_others(char_model):
    """logprobs=3 with echo, sampled with a seed, n=2, while other requests decode in the same batch:
    the prompt's and the generated tokens' log-probs (cached, batched decoding) equal one plain forward
    pass over the whole text; max_tokens=0 scores the prompt alone; the token-id prompt forms give the
    string prompt's reply."""
    model, tok = char_model
    client = start(Served(model, tok, "tiny"), max_batch=6, max_n=4)
    try:
        body = {
            "prompt": "Hello there",
            "max_tokens": 12,
            "seed": 3,
            "temperature": 0.9,
            "n": 2,
            "logprobs": 3,
        }
        others = {"prompt": "abc", "max_tokens": 30, "seed": 1, "n": 3}
        with ThreadPoolExecutor(3) as pool:
            busy = [pool.submit(client.post, "/v1/completions", json=others) for _ in range(2)]
            echoed = client.post("/v1/completions", json={**body, "echo": True}).json()
            plain = client.post("/v1/completions", json=body).json()
            assert all(b.result().status_code == 200 for b in busy)
        for e, p in zip(echoed["choices"], plain["choices"], strict=True):
            assert e["text"] == "Hello there" + p["text"]
            check_logprobs(model, tok, e["text"], e["logprobs"], echoed=11, top=3)
            check_logprobs(model, tok, e["text"], p["logprobs"], echoed=0, top=3)
            assert p["logprobs"]["text_offset"][0] == 11  # offsets count from the prompt's start
        score = {"prompt": "Hello there", "max_tokens": 0, "echo": True, "logprobs": 1}
        scored = client.post("/v1/completions", json=score).json()
        assert scored["choices"][0]["text"] == "Hello there" and scored["usage"]["completion_tokens"] == 0
        check_logprobs(model, tok, "Hello there", scored["choices"][0]["logprobs"], echoed=11, top=1)
        ids = tok.encode("Hello there")
        for prompt in (ids, [ids, ids]):
            again = client.post("/v1/completions", json={**body, "prompt": prompt}).json()
            assert again["choices"][0]["text"] == plain["choices"][0]["text"]
    finally:
        client.__exit__(None, None, None)


def test_a_model_that_favours_a_padding_id_serves_text_and_never_lists_it():
    """The char model padded to 128 ids, its likeliest next token padding id 100 (ln_f's bias adds 3 to
    every feature, wte[100] is all ones): greedy and sampled completions and a chat reply are the
    tokenizer's text, every log-prob and top log-prob is the forward pass's renormalised over the
    tokenizer's ids (never a padding id), and a prompt holding a padding id is a 400."""
    tok = CharTokenizer("".join(sorted(CHARS)))
    model = tiny_model(128)
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(3.0)
        model.transformer.wte.weight[100] = 1.0
    assert int(forward_logprobs(model, tok.encode("Hello"))[-1].argmax()) == 100
    client = start(Served(model, tok, "tiny"), max_batch=4)
    try:
        for options in ({"temperature": 0}, {"seed": 1, "temperature": 1.0}, {"seed": 2, "top_p": 0.5}):
            body = {"prompt": "Hello", "max_tokens": 10, "logprobs": 5, "echo": True, **options}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
            choice = r.json()["choices"][0]
            check_logprobs(model, tok, choice["text"], choice["logprobs"], echoed=5, top=5)
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "seed": 3}
        r = client.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 20})
        reply = r.json()["choices"][0]
        assert reply["finish_reason"] in ("stop", "length"), r.text
        tops = [t["token"] for c in reply["logprobs"]["content"] for t in c["top_logprobs"]]
        assert len(tops) == 20 * len(reply["logprobs"]["content"]) and set(tops) <= set(CHARS)
        assert set(reply["message"]["content"]) <= set(CHARS)
        bad = client.post("/v1/completions", json={"prompt": [100], "max_tokens": 2})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt", bad.text
    finally:
        client.__exit__(None, None, None)


def greedy_reference(
    model, ids: list[int], n: int, presence: float, frequency: float, bias: dict
) -> list[int]:
    """Greedy decoding with OpenAI's penalties and logit_bias, recomputing every step: the reference."""
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids + out]))[0][0, -1].detach().float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
        logits = logits - counts * frequency - (counts > 0).float() * presence
        for token, b in bias.items():
            logits[token] += b
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize(
    "presence, frequency, bias",
    [(0.0, 2.0, {}), (1.5, 0.0, {}), (0.0, 0.0, {"x": 100.0}), (-2.0, 0.5, {"e": -100.0, " ": 5.0})],
)
def test_penalties_and_logit_bias_follow_openais_formula(client, char_model, presence, frequency, bias):
    model, tok = char_model
    ids = {tok.encode(k)[0]: v for k, v in bias.items()}
    body = {
        "prompt": "The cat",
        "max_tokens": 20,
        "temperature": 0,
        "presence_penalty": presence,
        "frequency_penalty": frequency,
        "logit_bias": {str(k): v for k, v in ids.items()},
    }
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert tok.encode(text) == greedy_reference(model, tok.encode("The cat"), 20, presence, frequency, ids)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"999": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logprobs": -1}, "logprobs"),
        ({"max_tokens": 0, "echo": True}, "max_tokens"),  # scoring needs logprobs
        ({"prompt": [[1, 2], []]}, "prompt.1"),
        ({"prompt": [[1, 999]]}, "prompt.0"),
    ],
)
def test_out_of_range_options_are_400s_naming_them(client, body, param):
    r = client.post("/v1/completions", json={"prompt": "a", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_chat_logprobs(client, char_model):
    model, tok = char_model
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "seed": 2,
        "logprobs": True,
        "top_logprobs": 2,
    }
    reply = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = reply["logprobs"]["content"]
    prompt = "User: Hi\nAssistant:"
    ids = tok.encode(prompt) + [tok.encode(c["token"])[0] for c in content]
    reference = forward_logprobs(model, ids)
    for k, c in enumerate(content):
        pos = len(tok.encode(prompt)) + k
        assert abs(c["logprob"] - float(reference[pos - 1, ids[pos]])) < 1e-4
        assert c["bytes"] == list(c["token"].encode()) and len(c["top_logprobs"]) == 2
    assert (
        reply["message"]["content"]
        == "".join(c["token"] for c in content)[: len(reply["message"]["content"])]
    )
    bad = client.post("/v1/chat/completions", json={**body, "top_logprobs": 21})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"


def test_streamed_logprobs_are_the_whole_replys(client):
    body = {"prompt": "abc", "max_tokens": 9, "seed": 4, "logprobs": 2, "echo": True}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(d)["choices"][0]["logprobs"] for d in events(r)[:-1]]
    joined = {key: [v for c in chunks if c for v in c[key]] for key in whole}
    assert joined == whole


def test_rotary_models_serve_past_block_size(char_model):
    """A rotary model's rows roll past block_size (48 here): a 60-character prompt and 40 new tokens,
    the text decoded alone (generate_stream's rolling cache, tested against a windowed recompute)."""
    _, tok = char_model
    torch.manual_seed(0)
    config = GPTConfig(
        block_size=CONTEXT, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, position="rope"
    )
    model = GPT(config).eval()
    client = start(Served(model, tok, "rope"), max_batch=3)
    try:
        prompt = ("To be or not to be, that is the question. " * 2)[:60]
        body = {"prompt": prompt, "max_tokens": 40, "seed": 9, "n": 2}
        reply = client.post("/v1/completions", json=body).json()
        for i, choice in enumerate(reply["choices"]):
            assert choice["text"] == alone(model, tok, prompt, 40, 9 + i), i
        # log-probs past block_size too: the rolling cache's equal a forward pass over the whole text,
        # where each layer's queries see the last block_size keys (a sliding window)
        scored = client.post("/v1/completions", json={**body, "echo": True, "logprobs": 2}).json()
        for choice in scored["choices"]:
            check_logprobs(model, tok, choice["text"], choice["logprobs"], echoed=60, top=2)
    finally:
        client.__exit__(None, None, None)


def test_metrics_in_prometheus_text_format(char_model):
    model, tok = char_model
    client = start(Served(model, tok, "tiny"), max_n=3)
    try:
        replies = [
            client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 5 + i, "n": 2})
            for i in range(3)
        ]
        client.post("/v1/completions", json={"prompt": "a", "n": 9})
        with client.stream(
            "POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 4, "stream": True}
        ) as r:
            events(r)
        text = client.get("/metrics").text
        values = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        generated = sum(r.json()["usage"]["completion_tokens"] for r in replies) + 4
        assert values['nanogpt_requests_total{endpoint="/v1/completions",status="200"}'] == 4
        assert values['nanogpt_requests_total{endpoint="/v1/completions",status="400"}'] == 1
        assert values["nanogpt_generation_tokens_total"] == generated
        assert values["nanogpt_prompt_tokens_total"] == 3 * 2 * 2 + 3
        assert values["nanogpt_time_to_first_token_seconds_count"] == 7  # one per completion
        assert values["nanogpt_inter_token_latency_seconds_count"] == generated - 7
        assert values['nanogpt_batch_size_bucket{le="+Inf"}'] == values["nanogpt_batch_size_count"] > 0
        assert values["nanogpt_num_requests_running"] == values["nanogpt_num_requests_waiting"] == 0
        assert "# TYPE nanogpt_time_to_first_token_seconds histogram" in text
    finally:
        client.__exit__(None, None, None)


def test_tokenizer_endpoints_are_vllms(client, char_model):
    _, tok = char_model
    info = client.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "char" and info["model_max_length"] == CONTEXT
    tokens = client.post("/tokenize", json={"prompt": "Hi there"}).json()
    assert tokens["tokens"] == tok.encode("Hi there") and tokens["count"] == 8
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hi there"}
    assert client.post("/detokenize", json={"tokens": [999]}).json()["error"]["param"] == "tokens"
