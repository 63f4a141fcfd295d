"""`nanogpt serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn: `pip install 'nanogpt[serve]'`).

    nanogpt serve --out_dir=out/shakespeare_char_cpu            # http://127.0.0.1:8000, playground at /
    nanogpt serve --init_from=gpt2 --port=0 --api_key=secret    # port 0: any free port (printed)

The server listens at once and loads the model in the background (/health: 503, then 200). SIGTERM or
Ctrl-C stops accepting, gives running requests a few seconds to finish, then ends the rest with an error
(OpenAI's JSON; a stream: an error event and [DONE]) and exits 0; a second Ctrl-C ends them at once.
SIGTERM before the server listens exits 0 too. torch is imported only once a signal handler is in place."""

from __future__ import annotations

import errno
import functools
import importlib.util
import ipaddress
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from nanogpt.errors import NanoGPTError
from nanogpt.options import parse_options

API_KEY_ENV = "NANOGPT_API_KEY"
GRACE_SECONDS = 3  # how long a stopping server lets running requests finish before ending them


@dataclass
class ServeConfig:
    init_from: str = "resume"  # "resume": the checkpoint in out_dir; or gpt2, gpt2-medium, ... or a HF folder
    out_dir: str = "out"  # the training out_dir whose checkpoint init_from="resume" reads
    host: str = "127.0.0.1"  # anything but loopback without an api_key prints a warning
    port: int = 8000  # 0: any free port (the address is printed)
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    dtype: str = "float32"  # float32, bfloat16 / float16 through torch.autocast, or auto
    compile: bool = False  # torch.compile the model
    quantize: str = "none"  # int8: int8 Linear weights and inputs, on the CPU (nanogpt/quantization.py)
    threads: int = 0  # torch's CPU threads (0: PyTorch's default)
    model_name: str = ""  # the model id clients send and /v1/models shows ("": out_dir's name or init_from)
    api_key: str = ""  # when set (or NANOGPT_API_KEY), /v1/* need "Authorization: Bearer KEY"
    max_batch: int = 16  # completions decoded together (rows of the batched KV cache)
    max_waiting: int = 256  # completions queued for a free row; more: 503 server_busy
    max_tokens: int = 0  # the most new tokens per completion (0: the context, block_size, minus the prompt)
    max_n: int = 8  # the most completions one request may ask for (n)
    max_body_bytes: int = 1_000_000  # larger request bodies: 413
    log_level: str = "warning"  # uvicorn's ("info" logs every request)

    def __post_init__(self):
        from nanogpt.device import check_dtype
        from nanogpt.quantization import check_quantize

        check_dtype(self.dtype)
        check_quantize(self.quantize, self.dtype, self.compile)
        for name in ("max_batch", "max_waiting", "max_n", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise NanoGPTError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens < 0 or self.threads < 0 or not 0 <= self.port < 65536:
            raise NanoGPTError("max_tokens and threads must be >= 0 and port in 0..65535")


def require_extra() -> None:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise NanoGPTError(
            f"nanogpt serve needs {' and '.join(missing)}: pip install 'nanogpt[serve]' (or -e '.[serve]')"
        )


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (bound before the model loads, so the port is known and held)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY on accepted connections only for IPPROTO_TCP sockets; without
    # it Nagle's algorithm held each small SSE write back for the client's delayed ACK (~40 ms per request)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise NanoGPTError(bind_error(host, port, e)) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def bind_error(host: str, port: int, e: OSError) -> str:
    """The line that says why binding host:port failed, naming the option to change."""
    if isinstance(e, socket.gaierror):
        return f"cannot listen on --host={host}: no such host ({e.strerror}): give an IP address or a name this machine resolves"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on --host={host}: not an address of this machine: pick another --host (127.0.0.1, 0.0.0.0)"
    if e.errno == errno.EACCES:
        return f"cannot listen on port {port} (permission denied): pick a --port of 1024 or more"
    return f"cannot listen on {host}:{port} ({e.strerror}): pick another --port"


def load(cfg: ServeConfig, device: str):
    """The Served model (runs in the server's loading thread)."""
    from nanogpt.chat.template import chat_tokenizer
    from nanogpt.checkpoint import load_for_inference, model_source
    from nanogpt.device import autocast, resolve_dtype
    from nanogpt.quantization import quantized
    from nanogpt.serve.app import Served

    source = model_source(cfg.init_from, cfg.out_dir)
    model, tokenizer = load_for_inference(source, device, cfg.compile)
    model = quantized(model, cfg.quantize)
    tokenizer = chat_tokenizer(source, tokenizer)  # a chat model's template and end of turn
    name = cfg.model_name or (
        Path(cfg.out_dir).resolve().name if cfg.init_from == "resume" else cfg.init_from
    )
    context = functools.partial(autocast, device, resolve_dtype(cfg.dtype, device))
    return Served(model, tokenizer, Path(name).name or name, context)


def serve(cfg: ServeConfig) -> None:
    """Run the server until a signal stops it; a model that fails to load stops it with the error."""
    require_extra()
    import torch
    import uvicorn

    from nanogpt.device import resolve_device
    from nanogpt.serve.app import Settings, create_app

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            # a signal is how a server is asked to stop: exit 0 after shutting down, do not re-raise it
            getattr(self, "_captured_signals", []).clear()
            # running requests get GRACE_SECONDS, then end with an error reply; a second signal: now
            drain = threading.Timer(GRACE_SECONDS if first else 0, state.drain)
            drain.daemon = True
            drain.start()

    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV, "")
    if not is_loopback(cfg.host) and not api_key:
        print(
            f"warning: serving on {cfg.host} without an API key: anyone who can reach it can use it "
            f"(set --api_key or {API_KEY_ENV})",
            file=sys.stderr,
        )
    errors: list[str] = []

    def stop_on_error(message: str) -> None:
        errors.append(message)
        server.should_exit = True

    limits = dict(max_batch=cfg.max_batch, max_waiting=cfg.max_waiting, max_tokens=cfg.max_tokens)
    settings = Settings(api_key, **limits, max_n=cfg.max_n, max_body_bytes=cfg.max_body_bytes)
    settings.on_load_error = stop_on_error
    app = create_app(functools.partial(load, cfg, device), settings)
    state = app.state.nanogpt
    # uvicorn's own deadline comes after ours: by then every request has had its error reply
    config = uvicorn.Config(
        app, log_level=cfg.log_level, access_log=False, timeout_graceful_shutdown=GRACE_SECONDS + 5
    )
    server = Server(config)
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    print(
        f"nanogpt serve: listening on http://{host}:{port} (playground at /, OpenAI API at /v1)", flush=True
    )
    try:
        server.run(sockets=[sock])
    finally:
        # the decoding thread ends before the interpreter does: one killed inside a torch op at exit
        # aborted the process (SIGABRT) after a second Ctrl-C
        state.drain()
    if errors:
        raise NanoGPTError(errors[0])


class StoppedBeforeListening(BaseException):
    """SIGTERM came before the server listened (uvicorn handles it from then on)."""


def _stop_before_listening(signum: int, frame: object) -> None:
    raise StoppedBeforeListening


def main(argv: list[str]) -> int:
    previous = signal.signal(signal.SIGTERM, _stop_before_listening)
    try:
        cfg = parse_options(ServeConfig, argv, "usage: nanogpt serve [--key=value ...]")
        if cfg is not None:
            serve(cfg)
    except StoppedBeforeListening:
        print("nanogpt serve: stopped (SIGTERM) before listening", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
