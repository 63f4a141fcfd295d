"""The HTTP side: a FastAPI app with OpenAI's endpoints over the decoding Scheduler.

    GET  /                      the playground (one static HTML file)
    GET  /health                503 while the model loads, then 200
    GET  /v1/models             the model: id, context length, parameter count, tokenizer
    POST /v1/completions        prompt -> text; stream=true: Server-Sent Events in OpenAI's chunk format
    POST /v1/chat/completions   messages (rendered with a plain template: see protocol.py) -> a reply

The model loads in a thread after the server starts listening, so /health can say so."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from nanogpt.errors import NanoGPTError
from nanogpt.model import GPT
from nanogpt.serve.engine import Busy, Completion, Job, Piece, Scheduler
from nanogpt.serve.protocol import (
    CHAT_STOP,
    ApiError,
    ChatRequest,
    CompletionRequest,
    Reply,
    count_of,
    parse,
    render_chat,
    sampling_of,
    stops_of,
    usage,
)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass
class Served:
    """What the server decodes with: the model in eval mode on its device, its tokenizer, the name
    clients call it by, and the context the decoding thread runs in (autocast)."""

    model: GPT
    tokenizer: Any
    name: str
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class Settings:
    """The server's limits (ServeConfig's, documented there)."""

    api_key: str = ""
    max_batch: int = 16
    max_waiting: int = 256
    max_tokens: int = 0  # 0: the model's context
    max_n: int = 8
    max_body_bytes: int = 1 << 20
    on_load_error: Callable[[str], None] | None = None


class State:
    """The loaded model and its Scheduler (None while loading), shared by the handlers."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.served: Served | None = None
        self.scheduler: Scheduler | None = None
        self.error: str | None = None

    def load(self, load: Callable[[], Served]) -> None:
        try:
            served = load()
            s = self.settings
            self.scheduler = Scheduler(
                served.model, served.tokenizer, s.max_batch, s.max_waiting, served.context
            )
            self.scheduler.start()
            self.served = served
        except Exception as e:  # NanoGPTError: a clear line; anything else: a line and the traceback
            if not isinstance(e, NanoGPTError):
                traceback.print_exc(file=sys.stderr)
            self.error = str(e)
            if self.settings.on_load_error:
                self.settings.on_load_error(self.error)

    def ready(self) -> Served:
        if self.served is None:
            message = f"the model failed to load: {self.error}" if self.error else "the model is loading"
            raise ApiError(503, message, code="model_not_ready")
        return self.served

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        given = request.headers.get("authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(
                401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key"
            )


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past `limit` bytes (read no further), 400 if it is not JSON."""
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def pieces_of(job: Job) -> AsyncIterator[list[Piece]]:
    """The pieces of a job as they arrive (all queued ones at once), until every completion finished.
    Leaving early (client gone, error) cancels the job: the decoding loop frees its rows next step."""
    left = {c.index for c in job.completions}
    try:
        while left:
            pieces = await job.queue.get()
            while not job.queue.empty():
                pieces += job.queue.get_nowait()
            left -= {p.index for p in pieces if p.finish}
            yield pieces
    finally:
        job.cancelled = True


def merged(pieces: list[Piece]) -> list[Piece]:
    """The pieces of each completion joined into one (its text in order; its finish comes last)."""
    by_index: dict[int, Piece] = {}
    for p in pieces:
        q = by_index.get(p.index)
        by_index[p.index] = p if q is None else Piece(p.index, q.text + p.text, p.finish, p.tokens)
    return list(by_index.values())


class Api:
    """The endpoints' logic, on a State."""

    def __init__(self, state: State):
        self.state = state

    def encode(self, text: str, param: str) -> list[int]:
        tokenizer = self.state.ready().tokenizer
        try:
            ids = tokenizer.encode(text)  # a char tokenizer refuses a character it lacks, naming it
        except NanoGPTError as e:
            raise ApiError(400, str(e), param, "invalid_prompt") from None
        if not ids and tokenizer.eot is None:
            raise ApiError(400, "the prompt is empty: give at least one character", param, "invalid_prompt")
        return ids or [tokenizer.eot]  # an empty prompt starts a document

    def prompts_of(self, request: CompletionRequest) -> list[list[int]]:
        """The prompt(s) as token ids: a string, a list of strings or a list of token ids."""
        prompt = request.prompt
        if isinstance(prompt, str):
            return [self.encode(prompt, "prompt")]
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt", "invalid_prompt")
        if isinstance(prompt[0], str):
            return [self.encode(p, f"prompt.{i}") for i, p in enumerate(prompt)]
        vocab = self.state.ready().model.config.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ApiError(400, f"token ids must be in 0..{vocab - 1}", "prompt", "invalid_prompt")
        return [list(prompt)]

    def completions(self, request: CompletionRequest | ChatRequest, prompts: list[list[int]], default: int):
        """The completions of a request: n per prompt, each with its own generator (seed + index with a
        seed: the same text as alone), max_tokens capped by the server and by the context."""
        served, settings = self.state.ready(), self.state.settings
        context = served.model.config.block_size
        sampling, stop, n = sampling_of(request), stops_of(request), count_of(request, settings.max_n)
        asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
        if asked is not None and asked < 1:
            raise ApiError(400, f"max_tokens must be >= 1, got {asked}", "max_tokens")
        if request.seed is not None and not 0 <= request.seed < 2**63:
            raise ApiError(400, "seed must be in 0..2**63-1", "seed")
        stop += (CHAT_STOP,) if isinstance(request, ChatRequest) else ()
        device = served.model.lm_head.weight.device
        out = []
        for ids in prompts:
            if len(ids) >= context:
                message = (
                    f"the prompt is {len(ids)} tokens; this model's context is {context} tokens and must "
                    f"hold the prompt and at least one new token"
                )
                raise ApiError(400, message, "prompt", "context_length_exceeded")
            max_tokens = min(asked or default, settings.max_tokens or context, context - len(ids))
            for _ in range(n):
                generator = torch.Generator(device)
                if request.seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(request.seed + len(out))
                out.append(Completion(len(out), ids, max_tokens, sampling, generator, stop))
        return out

    def submit(self, completions: list[Completion]) -> Job:
        job = Job(completions, asyncio.get_running_loop())
        try:
            self.state.scheduler.submit(job)
        except Busy as e:
            raise ApiError(503, f"the server is busy: {e}", code="server_busy") from None
        return job

    async def collect(self, job: Job, reply: Reply, prefix: list[str], prompt_tokens: int) -> dict:
        """The whole reply of a job that is not streamed."""
        texts = {c.index: [prefix[c.index]] for c in job.completions}
        finish, tokens = {}, {}
        async for pieces in pieces_of(job):
            for p in pieces:
                if p.finish == "error":
                    raise ApiError(500, p.text, code="decoding_failed")
                texts[p.index].append(p.text)
                if p.finish:
                    finish[p.index], tokens[p.index] = p.finish, p.tokens
        choices = [reply.choice(i, "".join(texts[i]), finish[i]) for i in sorted(texts)]
        return reply.reply(choices, usage(prompt_tokens, sum(tokens.values())))

    async def stream(
        self, job: Job, reply: Reply, prefix: list[str], prompt_tokens: int, with_usage: bool
    ) -> AsyncIterator[str]:
        """The SSE events of a job: a first chunk (chat: the role; completions with echo: the prompt),
        a chunk per new text, a chunk with finish_reason per completion, usage if asked, then [DONE]."""
        first = reply.kind == "chat" or any(prefix)
        for i in range(len(job.completions) if first else 0):
            yield sse(reply.chunk([reply.choice(i, prefix[i] or None, None, delta=True)], None, with_usage))
        tokens = {}
        async for pieces in pieces_of(job):
            for p in pieces:
                if p.finish == "error":
                    yield sse(ApiError(500, p.text, code="decoding_failed").body())
                    return
            for p in merged(pieces):  # a client that reads slower than the model gets fewer, longer chunks
                if p.text:
                    yield sse(
                        reply.chunk([reply.choice(p.index, p.text, None, delta=True)], None, with_usage)
                    )
                if p.finish:
                    tokens[p.index] = p.tokens
                    yield sse(
                        reply.chunk([reply.choice(p.index, "", p.finish, delta=True)], None, with_usage)
                    )
        if with_usage:
            yield sse(reply.chunk([], usage(prompt_tokens, sum(tokens.values())), with_usage))
        yield "data: [DONE]\n\n"

    async def answer(
        self,
        request: CompletionRequest | ChatRequest,
        reply: Reply,
        prompts: list[list[int]],
        echo: list[str],
    ):
        """Decode the prompts; the reply as JSON, or as a stream of SSE events."""
        default = DEFAULT_COMPLETION_TOKENS if reply.kind == "completion" else self.state.settings.max_tokens
        completions = self.completions(request, prompts, default or 1 << 30)
        n = len(completions) // len(prompts)
        prefix = [echo[i // n] if echo else "" for i in range(len(completions))]
        prompt_tokens = sum(len(p) for p in prompts)
        job = self.submit(completions)
        if request.stream:
            with_usage = bool(request.stream_options and request.stream_options.include_usage)
            events = self.stream(job, reply, prefix, prompt_tokens, with_usage)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        return JSONResponse(await self.collect(job, reply, prefix, prompt_tokens))

    def check_model(self, name: str | None) -> Served:
        served = self.state.ready()
        if name is not None and name != served.name:
            raise ApiError(
                404,
                f"model {name!r} not found: this server serves {served.name!r}",
                "model",
                "model_not_found",
            )
        return served

    def model_card(self) -> dict[str, Any]:
        served = self.state.ready()
        return {
            "id": served.name,
            "object": "model",
            "created": 0,
            "owned_by": "nanogpt",
            "context_length": served.model.config.block_size,
            "parameters": served.model.get_num_params(non_embedding=False),
            "tokenizer": served.tokenizer.name,
        }


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    error = ApiError(status, message, code=code)
    return JSONResponse(error.body(), status_code=status)


def add_error_handlers(app: FastAPI) -> None:
    """Every error is OpenAI's error JSON, never a traceback."""

    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404, 405
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        traceback.print_exception(e, file=sys.stderr)
        return error_response(500, f"internal error ({type(e).__name__})", "internal_error")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


def create_app(load: Callable[[], Served], settings: Settings | None = None) -> FastAPI:
    """The app; `load` runs in a thread once the server is up (until it returns, /health is 503)."""
    state = State(settings or Settings())
    api = Api(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, args=(load,), name="nanogpt-load", daemon=True).start()
        yield
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.stop)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.nanogpt = state
    add_error_handlers(app)
    add_routes(app, api)
    return app


def add_routes(app: FastAPI, api: Api) -> None:
    state = api.state
    playground = files("nanogpt.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return playground

    @app.get("/health")
    async def health() -> dict:
        served = state.ready()
        running, waiting = state.scheduler.load()
        return {"status": "ok", "model": served.name, "running": running, "waiting": waiting}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        state.authorize(request)
        return {"object": "list", "data": [api.model_card()]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        state.authorize(request)
        body = parse(CompletionRequest, await read_json(request, state.settings.max_body_bytes))
        served = api.check_model(body.model)
        prompts = api.prompts_of(body)
        echo = [served.tokenizer.decode(p) for p in prompts] if body.echo else []
        return await api.answer(body, Reply("completion", served.name), prompts, echo)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        state.authorize(request)
        body = parse(ChatRequest, await read_json(request, state.settings.max_body_bytes))
        served = api.check_model(body.model)
        prompts = [api.encode(render_chat(body.messages), "messages")]
        return await api.answer(body, Reply("chat", served.name), prompts, [])
