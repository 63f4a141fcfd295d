"""`nanogpt serve` as a real process on 127.0.0.1 (a free port): the official `openai` client, a headless
Chromium driving the playground, SIGTERM, a model that fails to load, and a short soak test (200 requests
from 16 clients, some leaving mid-stream, some invalid)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
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


def soak_request(client: httpx.Client, i: int) -> tuple[str, str | None]:
    """Request i of the soak test -> (kind, text or None); every 10th invalid, every 10th leaves early."""
    body = {
        "prompt": ["ROMEO:", "To be", "A"][i % 3],
        "max_tokens": 10 + i % 30,
        "seed": i,
        "temperature": 0.8,
    }
    if i % 10 == 3:
        r = client.post("/v1/completions", json={**body, "temperature": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        return "invalid", None
    if i % 10 == 7:  # leave after the first chunk
        with client.stream("POST", "/v1/completions", json={**body, "max_tokens": 200, "stream": True}) as r:
            next(r.iter_lines())
        return "left", None
    if i % 2:
        return "valid", client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    return "valid", "".join(
        httpx.Response(200, content=line[6:]).json()["choices"][0]["text"] for line in lines
    )


@pytest.mark.slow
def test_soak_many_clients(server, model_dir):
    """200 requests from 16 clients: every valid one gets its text exactly, the server's memory
    settles and it is healthy and idle at the end."""
    local = threading.local()

    def run(i: int):
        local.client = getattr(local, "client", None) or httpx.Client(base_url=server.url, timeout=60)
        return soak_request(local.client, i)

    with ThreadPoolExecutor(16) as pool:
        first = list(pool.map(run, range(100)))
        warm_mb = server.rss_mb()
        second = list(pool.map(run, range(100, 200)))
    end_mb = server.rss_mb()
    for i, (kind, text) in enumerate(first + second):
        if kind == "valid":
            body_prompt = ["ROMEO:", "To be", "A"][i % 3]
            assert text == expected_text(model_dir, body_prompt, 10 + i % 30, i, 0.8), f"request {i}"
    assert sum(kind == "valid" for kind, _ in first + second) == 160
    print(f"server RSS after 100 requests {warm_mb:.0f} MB, after 200 {end_mb:.0f} MB")
    assert end_mb - warm_mb < 50, (warm_mb, end_mb)  # the second 100 requests did not grow it
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["running"] == health.json()["waiting"] == 0


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
