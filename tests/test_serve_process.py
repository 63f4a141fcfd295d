"""`nanogpt serve` as a real process on 127.0.0.1 (a free port): the official `openai` client, a headless
Chromium driving the playground, SIGTERM, a model that fails to load, and a short soak test (200 requests
from 16 clients, some leaving mid-stream, some invalid)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="the dev extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="nanogpt[serve] is not installed")

from nanogpt import GPT, GPTConfig  # noqa: E402
from nanogpt.checkpoint import load_model, save_checkpoint  # noqa: E402
from nanogpt.cli import main as cli  # noqa: E402
from nanogpt.data.tokenizers import CharTokenizer  # noqa: E402
from nanogpt.generate import Sampling, decode_stream, generate_stream  # noqa: E402

CHARS = "".join(sorted(set(string.ascii_letters + string.digits + " .,:;!?'\n")))


def save_tiny_model(out_dir: Path, block_size: int, n_layer: int = 2, n_embd: int = 32) -> Path:
    tok = CharTokenizer(CHARS)
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=block_size, vocab_size=tok.vocab_size, n_layer=n_layer, n_head=2, n_embd=n_embd)
    )
    save_checkpoint(
        {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": tok.to_meta()}, out_dir
    )
    return out_dir


class ServerProcess:
    """`python -m nanogpt serve --port=0` (one torch thread), its address read from its first line."""

    def __init__(self, out_dir: Path, log: Path, *options: str):
        command = [
            sys.executable,
            "-m",
            "nanogpt",
            "serve",
            f"--out_dir={out_dir}",
            "--port=0",
            "--device=cpu",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.proc = subprocess.Popen(
            [*command, *options], stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env
        )
        line = self.proc.stdout.readline()
        found = re.search(r"http://[\d.]+:\d+", line)
        if not found:
            self.proc.kill()
            raise AssertionError(f"no address in {line!r}; stderr: {log.read_text()}")
        self.url = found.group(0)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("the server never became ready")

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("served_model"), block_size=256)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    server = ServerProcess(model_dir, tmp_path_factory.mktemp("logs") / "server.log", "--max_batch=16")
    server.wait_ready()
    yield server
    assert server.stop() == 0, server.log.read_text()
    assert "Traceback" not in server.log.read_text()  # no request, cancelled or not, broke anything


@functools.cache
def loaded(model_dir: Path):
    return load_model(model_dir)


def expected_text(model_dir: Path, prompt: str, max_tokens: int, seed: int, temperature: float) -> str:
    """The completion decoded alone in this process: what the server must answer."""
    model, tok = loaded(model_dir)
    steps = generate_stream(
        model,
        torch.tensor([tok.encode(prompt)]),
        max_tokens,
        Sampling(temperature),
        generator=torch.Generator().manual_seed(seed),
    )
    return "".join(decode_stream(tok, (int(t) for t in steps)))


@pytest.mark.slow
def test_openai_client(server, model_dir):
    openai = pytest.importorskip("openai", reason="the dev extra (openai) is not installed")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    name = client.models.list().data[0].id
    assert name == model_dir.name
    completion = client.completions.create(model=name, prompt="Hello", max_tokens=12, seed=5, temperature=0.7)
    assert completion.choices[0].text == expected_text(model_dir, "Hello", 12, 5, 0.7)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 12
    streamed = client.completions.create(
        model=name, prompt="Hello", max_tokens=12, seed=5, temperature=0.7, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == completion.choices[0].text
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=8, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    chunks = list(
        client.chat.completions.create(model=name, messages=messages, max_tokens=8, seed=1, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=name, prompt="a", temperature=5)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a")


def chromium_paths() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("headless browser test: Debian's chromium and chromium-driver are not installed")
    return browser, driver


@pytest.mark.slow
def test_playground_in_a_real_browser(server, model_dir, tmp_path):
    """Headless Chromium opens the page, types a prompt, presses Generate and sees streamed text."""
    pytest.importorskip("selenium", reason="the dev extra (selenium) is not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=900,700",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"{server.url}/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "parameters" in d.find_element(By.ID, "model").text)
        assert model_dir.name in driver.find_element(By.ID, "model").text
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("ROMEO:")
        max_tokens = driver.find_element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("80")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "finished" in d.find_element(By.ID, "stats").text)
        driver.save_screenshot(str(tmp_path / "playground.png"))
        completion = driver.find_element(By.ID, "completion").get_attribute("textContent")
        stats = driver.find_element(By.ID, "stats").text
    finally:
        driver.quit()
    assert len(completion) == 80 and set(completion) <= set(CHARS)  # one character per token
    assert "80 tokens" in stats and "tokens/s" in stats and "finished: length" in stats
    assert (tmp_path / "playground.png").stat().st_size > 1000


def raw_request(url: str, body: bytes, length: int | None = None) -> socket.socket:
    """A POST /v1/completions sent by hand (Content-Length `length`, default the body's): the socket,
    for the caller to read from or to close early."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def soak_request(client: httpx.Client, i: int) -> tuple[str, dict | None, str | None]:
    """Request i of the soak test -> (kind, body, text): valid requests (plain, streamed, with a tiny
    temperature or four long stop strings) whose text must be exact, mixed with bad ones that must each
    get their error (a bad temperature, JSON nested 5000 deep, more completions than the queue holds)
    and clients that leave (mid-stream, before sending the whole body, before a plain reply)."""
    body = {
        "prompt": ["ROMEO:", "To be", "A"][i % 3],
        "max_tokens": 10 + i % 30,
        "seed": i,
        "temperature": 0.8,
    }
    kind = i % 20
    bad = {
        3: ({**body, "temperature": 9}, "temperature", None),
        13: ({**body, "temperature": -1}, "temperature", None),
    }
    bad[5] = (b"[" * 5000 + b"]" * 5000, None, "invalid_json")
    bad[9] = ({**body, "prompt": ["A"] * 300}, "prompt", "too_many_completions")
    if kind in bad:
        sent, param, code = bad[kind]
        r = client.post(
            "/v1/completions", **({"content": sent} if isinstance(sent, bytes) else {"json": sent})
        )
        assert r.status_code == 400 and (r.json()["error"]["param"], r.json()["error"]["code"]) == (
            param,
            code,
        )
        return "invalid", None, None
    if kind in (7, 17):  # leave after the first chunk
        with client.stream("POST", "/v1/completions", json={**body, "max_tokens": 200, "stream": True}) as r:
            next(r.iter_lines())
        return "left", None, None
    if kind in (1, 19):  # leave before the reply (1) or halfway through sending the body (19)
        data = json.dumps({**body, "max_tokens": 200}).encode()
        raw_request(
            client.base_url.__str__().rstrip("/"), data[: len(data) // 2] if kind == 19 else data, len(data)
        ).close()
        return "left", None, None
    if kind == 11:
        body["temperature"] = 5e-324
    sent = {**body, "stop": [c * 200_000 for c in "#$%&"]} if kind == 15 else body
    if i % 2:
        return "valid", body, client.post("/v1/completions", json=sent).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**sent, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    return "valid", body, "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines)


@pytest.mark.slow
def test_soak_many_clients(server, model_dir):
    """200 requests from 16 clients, a third of them bad or leaving early: every valid one gets its text
    exactly, the server's memory settles, its log has no traceback and it is healthy and idle at the end."""
    local = threading.local()

    def run(i: int):
        local.client = getattr(local, "client", None) or httpx.Client(base_url=server.url, timeout=60)
        return soak_request(local.client, i)

    with ThreadPoolExecutor(16) as pool:
        first = list(pool.map(run, range(100)))
        warm_mb = server.rss_mb()
        second = list(pool.map(run, range(100, 200)))
    end_mb = server.rss_mb()
    valid = [(i, body, text) for i, (kind, body, text) in enumerate(first + second) if kind == "valid"]
    for i, body, text in valid:
        expected = expected_text(
            model_dir, body["prompt"], body["max_tokens"], body["seed"], body["temperature"]
        )
        assert text == expected, f"request {i}"
    assert len(valid) == 120
    print(f"server RSS after 100 requests {warm_mb:.0f} MB, after 200 {end_mb:.0f} MB")
    assert end_mb - warm_mb < 50, (warm_mb, end_mb)  # the second 100 requests did not grow it
    deadline = time.monotonic() + 30  # the clients that left free their rows at the next step
    while (health := httpx.get(f"{server.url}/health").json())["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["status"] == "ok" and health["running"] == health["waiting"] == 0
    assert "Traceback" not in server.log.read_text()


@pytest.mark.slow
def test_sigterm_mid_stream_exits_0(tmp_path):
    """SIGTERM while a long completion streams: the server stops within seconds, exit status 0."""
    model_dir = save_tiny_model(tmp_path / "model", block_size=1024, n_layer=1, n_embd=16)
    server = ServerProcess(model_dir, tmp_path / "server.log")
    try:
        server.wait_ready()
        streaming = threading.Event()

        def stream():
            body = {"prompt": "a", "max_tokens": 1000, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
                for _ in r.iter_lines():
                    streaming.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert streaming.wait(30)
        start = time.monotonic()
        assert server.stop() == 0, server.log.read_text()
        assert time.monotonic() - start < 10
    finally:
        server.proc.kill()


@pytest.mark.slow
def test_a_model_that_fails_to_load_is_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    server = ServerProcess(tmp_path / "empty", tmp_path / "server.log")
    assert server.proc.wait(60) == 1
    assert "nanogpt serve: error: no checkpoint at" in server.log.read_text()


def test_missing_extra_names_it(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    assert cli(["serve", f"--out_dir={tmp_path}"]) == 1
    assert "pip install 'nanogpt[serve]'" in capsys.readouterr().err


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory) -> Path:
    """A model wide enough that 1000 tokens take seconds here (a context of 1024)."""
    return save_tiny_model(tmp_path_factory.mktemp("slow_model"), block_size=1024, n_layer=4, n_embd=256)


def start_long_requests(
    server: ServerProcess, streams: int, plain: int
) -> tuple[list, threading.Event, list]:
    """Threads sending `streams` streaming and `plain` plain requests of 1000 tokens; each appends
    (kind, status, content type, body) to the returned list when its reply ends."""
    results, streaming = [], threading.Event()

    def stream():
        body = {"prompt": "ROMEO:", "max_tokens": 1000, "stream": True}
        lines = []
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    streaming.set()
                    lines.append(line)
        except httpx.TransportError as e:  # cut off: the connection ended before the stream did
            results.append(("broken", 0, "", [repr(e), *lines[-2:]]))
            return
        results.append(("stream", r.status_code, r.headers["content-type"], [x for x in lines if x]))

    def plain_request():
        r = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": "To be", "max_tokens": 1000}, timeout=60
        )
        results.append(("plain", r.status_code, r.headers["content-type"], r.text))

    threads = [threading.Thread(target=stream) for _ in range(streams)]
    threads += [threading.Thread(target=plain_request) for _ in range(plain)]
    for t in threads:
        t.start()
    return results, streaming, threads


@pytest.mark.slow
def test_shutdown_with_requests_running_answers_each_in_openai_json(slow_model_dir, tmp_path):
    """SIGTERM with 4 streams and 2 plain requests decoding (2 rows: the rest wait): after the grace
    period each plain request gets OpenAI's error JSON (503), each stream an error event then [DONE];
    no traceback in the log; exit 0 (before: 500 text/plain, streams cut without [DONE], one
    CancelledError traceback per request)."""
    server = ServerProcess(slow_model_dir, tmp_path / "server.log", "--max_batch=2")
    try:
        server.wait_ready()
        results, streaming, threads = start_long_requests(server, streams=4, plain=2)
        assert streaming.wait(60)
        assert server.stop() == 0, server.log.read_text()
        for t in threads:
            t.join(30)
        assert len(results) == 6
        ended = 0
        for kind, status, content_type, body in results:
            if kind == "plain":
                assert content_type == "application/json", body
                if status != 200:
                    assert status == 503 and json.loads(body)["error"]["code"] == "server_shutting_down"
                    ended += 1
            else:
                assert status == 200 and body[-1] == "data: [DONE]", body[-3:]
                errors = [json.loads(x[6:]) for x in body[:-1] if '"error"' in x]
                ended += bool(errors)
                assert all(e["error"]["code"] == "server_shutting_down" for e in errors)
        assert ended >= 4  # most were still running or waiting when the grace period ended
        log = server.log.read_text()
        assert "Traceback" not in log and "CancelledError" not in log, log
    finally:
        server.proc.kill()


@pytest.mark.slow
def test_double_ctrl_c_with_streams_running_exits_cleanly(tmp_path):
    """Ctrl-C while 4 streams decode, and again once the server stopped accepting: the process ends
    with 0, not an abort (it was SIGABRT, "terminate called without an active exception", 2 of 2 runs
    with this 57M-parameter model: the decoding thread was killed inside a torch op at exit)."""
    model_dir = save_tiny_model(tmp_path / "model", block_size=1024, n_layer=8, n_embd=768)
    server = ServerProcess(model_dir, tmp_path / "server.log", "--max_batch=4")
    try:
        server.wait_ready()
        _, streaming, threads = start_long_requests(server, streams=4, plain=0)
        assert streaming.wait(60)
        server.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(httpx.TransportError):  # until it no longer accepts connections
            while httpx.get(f"{server.url}/health", timeout=5):
                time.sleep(0.01)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(30) == 0, server.log.read_text()
        assert "terminate called" not in server.log.read_text()
        for t in threads:
            t.join(30)
    finally:
        server.proc.kill()


@pytest.mark.slow
def test_a_plain_request_whose_client_leaves_frees_its_rows(slow_model_dir, tmp_path):
    """n=4 plain (not streamed) completions of 1000 tokens; the client closes once they decode: the rows
    free long before 4000 tokens are generated (before, all four decoded to the end)."""
    server = ServerProcess(slow_model_dir, tmp_path / "server.log")
    try:
        server.wait_ready()
        body = json.dumps({"prompt": "ROMEO:", "max_tokens": 1000, "n": 4}).encode()
        sock = raw_request(server.url, body)
        while httpx.get(f"{server.url}/health").json()["running"] < 4:
            time.sleep(0.02)
        sock.close()
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(f"{server.url}/health").json()["running"] == 0
        assert metric(server.url, "nanogpt_generation_tokens_total") < 4000
        assert server.stop() == 0
        assert "Traceback" not in server.log.read_text()
    finally:
        server.proc.kill()


@pytest.mark.slow
def test_a_client_that_leaves_while_sending_its_body_leaves_no_traceback(model_dir, tmp_path):
    server = ServerProcess(model_dir, tmp_path / "server.log")
    try:
        server.wait_ready()
        raw_request(server.url, b'{"prompt": "A",', length=500).close()  # 14 of 500 bytes, then gone
        deadline = time.monotonic() + 30  # the server counts the request once it gave up on it
        while time.monotonic() < deadline:
            text = httpx.get(f"{server.url}/metrics").text
            if 'endpoint="/v1/completions"' in text:
                break
            time.sleep(0.02)
        assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "A"}).status_code == 200
        assert server.stop() == 0
        assert "Traceback" not in server.log.read_text(), server.log.read_text()
    finally:
        server.proc.kill()


SIGTERM_BEFORE_LISTENING = """
import os, signal, sys
import nanogpt.serve.main as serve_main
from nanogpt.cli import main

real_bind = serve_main.bind

def bind(host, port):  # SIGTERM arrives in the window before the server listens
    os.kill(os.getpid(), signal.SIGTERM)
    return real_bind(host, port)

serve_main.bind = bind
sys.exit(main(["serve", "--out_dir=" + sys.argv[1], "--port=0", "--device=cpu"]))
"""


@pytest.mark.slow
def test_sigterm_before_listening_exits_0(model_dir):
    """As documented: SIGTERM stops the server with exit 0, also before it listens (it was 143)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_BEFORE_LISTENING, str(model_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "stopped (SIGTERM) before listening" in done.stderr and "listening on" not in done.stdout


def test_a_host_that_does_not_resolve_is_named():
    from nanogpt.errors import NanoGPTError
    from nanogpt.serve.main import bind

    with pytest.raises(NanoGPTError, match=r"--host=no.such.host.invalid: no such host") as e:
        bind("no.such.host.invalid", 0)
    assert "--port" not in str(e.value)  # it said "pick another --port"


LM_EVAL_TASK = """
task: nanogpt_served_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def lm_eval_items(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    words = ["the", "king", "queen", "said", "to", "be", "or", "not", "ROMEO", "love", "night", "sword"]

    def phrase(k: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(len(words), (k,), generator=g))

    return [
        {"context": phrase(6), "choices": [phrase(2) for _ in range(4)], "label": i % 4} for i in range(n)
    ]


def scored_in_process(model_dir: Path, context: str, continuation: str) -> tuple[float, bool]:
    """The test's own scorer: (sum of the continuation's log-probs, whether each was the argmax)."""
    model, tok = loaded(model_dir)
    ctx, cont = tok.encode(context), tok.encode(continuation)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ctx + cont]), torch.tensor([ctx + cont]))
    logprobs = torch.log_softmax(logits[0, len(ctx) - 1 : -1].float(), dim=-1)
    picked = logprobs[torch.arange(len(cont)), torch.tensor(cont)]
    return float(picked.sum()), bool((logprobs.argmax(-1) == torch.tensor(cont)).all())


@pytest.mark.slow
def test_lm_eval_local_completions_scores_as_in_process(server, model_dir, tmp_path):
    """lm-evaluation-harness's `local-completions` model against the server (its remote tokenizer:
    /tokenizer_info, /tokenize), a 0-shot multiple-choice task of 100 local JSONL items: every item's
    log-likelihoods (1e-4), greediness and accuracy equal the test's own forward-pass scorer."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    pytest.importorskip("tenacity", reason="lm-eval's API models need its [api] extra")
    from lm_eval.tasks import TaskManager

    items = lm_eval_items(100)
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (tmp_path / "task.yaml").write_text(LM_EVAL_TASK.format(items=tmp_path / "items.jsonl"))
    name = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    args = (
        f"base_url={server.url}/v1/completions,model={name},tokenizer_backend=remote,tokenized_requests=True"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["nanogpt_served_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        num_fewshot=0,
        log_samples=True,
    )
    samples = sorted(results["samples"]["nanogpt_served_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == 100
    for sample in samples:
        item = items[sample["doc_id"]]
        ours = [scored_in_process(model_dir, item["context"], " " + c) for c in item["choices"]]
        theirs = [tuple(r[0]) for r in sample["resps"]]
        for (ll, greedy), (their_ll, their_greedy) in zip(ours, theirs, strict=True):
            assert abs(ll - their_ll) < 1e-4 and greedy == their_greedy, sample["doc_id"]
        best = max(range(4), key=lambda i: ours[i][0])
        assert sample["acc"] == float(best == item["label"])
    print("lm-eval acc", results["results"]["nanogpt_served_mc"]["acc,none"])
