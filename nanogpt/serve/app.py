"""The HTTP side: a FastAPI app with OpenAI's endpoints over the decoding Scheduler.

    GET  /                      the playground (one static HTML file)
    GET  /health                503 while the model loads (or if decoding stopped), then 200
    GET  /metrics               Prometheus' text format: requests, tokens, batch size, latencies
    GET  /v1/models             the model: id, context length, parameter count, tokenizer
    GET  /tokenizer_info, POST /tokenize, POST /detokenize   vLLM's tokenizer endpoints (lm-eval uses them)
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
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from nanogpt.errors import NanoGPTError
from nanogpt.model import GPT
from nanogpt.serve.engine import Busy, Completion, Job, Piece, Scheduler
from nanogpt.serve.metrics import Metrics
from nanogpt.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Options,
    Reply,
    TokenizeRequest,
    TokenText,
    chat_logprobs,
    check_completion_count,
    check_context,
    checked_token_ids,
    legacy_logprobs,
    options_of,
    parse,
    render_chat,
    render_chat_ids,
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
        self.metrics = Metrics()

    def load(self, load: Callable[[], Served]) -> None:
        try:
            served = load()
            s = self.settings
            self.scheduler = Scheduler(
                served.model, served.tokenizer, s.max_batch, s.max_waiting, served.context, self.metrics
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

    def healthy(self) -> Served:
        """ready(), and the decoding thread takes work (503 naming why not)."""
        served = self.ready()
        problem = self.scheduler.problem()
        if problem:
            raise ApiError(
                503, problem, code="decoder_failed" if self.scheduler.failure else "server_shutting_down"
            )
        return served

    def drain(self) -> None:
        """Stop decoding: every running or waiting completion ends with a shutdown error (503 JSON, or an
        error event then [DONE] in a stream)."""
        if self.scheduler is not None:
            self.scheduler.stop()

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        given = request.headers.get("authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(
                401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key"
            )


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past `limit` bytes (read no further), 400 if it is not JSON (or nests
    deeper than Python's parser recurses) or the client left before sending all of it."""
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:  # nobody reads the reply; nothing to log
        raise ApiError(
            400, "the client left before sending its whole body", code="client_disconnected"
        ) from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def failure(piece: Piece) -> ApiError | None:
    """The error a completion's piece ends with, if any."""
    if piece.finish == "error":
        return ApiError(500, piece.text, code="decoding_failed")
    if piece.finish == "shutdown":
        return ApiError(503, piece.text, code="server_shutting_down")
    return None


async def pieces_of(job: Job) -> AsyncIterator[list[Piece]]:
    """The pieces of a job as they arrive (all queued ones at once), until every completion finished.
    Leaving early (client gone, error) cancels the job: the decoding loop frees its rows next step."""
    left = set(job.indices)
    try:
        while left:
            pieces = await job.queue.get()
            while not job.queue.empty():
                pieces += job.queue.get_nowait()
            left -= {p.index for p in pieces if p.finish}
            yield pieces
    finally:
        job.cancelled = True


async def until_disconnected(request: Request) -> None:
    """Returns once the client has closed its connection (the body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def merged(pieces: list[Piece]) -> list[Piece]:
    """The pieces of each completion joined into one (its text and draws in order; its finish last)."""
    by_index: dict[int, Piece] = {}
    for p in pieces:
        q = by_index.get(p.index)
        by_index[p.index] = (
            p
            if q is None
            else Piece(p.index, q.text + p.text, p.finish, p.tokens, q.draws + p.draws, q.echo + p.echo)
        )
    return list(by_index.values())


@dataclass
class Answer:
    """What the replies of one request are built from: its completions' echoed text (or ""), the
    characters of each one's prompt (log-prob text offsets count from the prompt's start) and how each
    token id reads in log-probs."""

    reply: Reply
    prefix: list[str]
    prompt_chars: list[int]
    prompt_tokens: int
    text_of: TokenText

    def logprobs(self, index: int, draws: tuple, offset: int) -> dict | None:
        if self.reply.kind == "chat":
            return chat_logprobs(list(draws), self.text_of)
        return legacy_logprobs(list(draws), self.text_of, offset)


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

    def token_ids(self, ids: list[int], param: str) -> list[int]:
        """Ids that both the model and the tokenizer know (a padded vocabulary's extra ids have no text)."""
        served = self.state.ready()
        return checked_token_ids(ids, min(served.model.config.vocab_size, served.tokenizer.vocab_size), param)

    def prompts_of(self, request: CompletionRequest) -> list[list[int]]:
        """The prompt(s) as token ids, in OpenAI's four forms: a string, a list of strings, a list of
        token ids or a list of lists of token ids."""
        prompt = request.prompt
        if isinstance(prompt, str):
            return [self.encode(prompt, "prompt")]
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt", "invalid_prompt")
        if isinstance(prompt[0], str):
            return [self.encode(p, f"prompt.{i}") for i, p in enumerate(prompt)]
        if isinstance(prompt[0], int):
            return [self.token_ids(prompt, "prompt")]
        return [self.token_ids(p, f"prompt.{i}") for i, p in enumerate(prompt)]

    def completions(self, options: Options, prompts: list[list[int]], default: int) -> list[Completion]:
        """n completions per prompt, each with its own generator (seed + index with a seed: the same
        text as alone), max_tokens capped by the server and, for learned positions, by the context
        (a rotary model's cache rolls past it: at most block_size new tokens unless --max_tokens)."""
        served, settings = self.state.ready(), self.state.settings
        context = served.model.config.block_size
        rolling = served.model.config.position == "rope"
        device = served.model.lm_head.weight.device
        out = []
        for ids in prompts:
            check_context(len(ids), context, rolling)
            asked = default if options.max_tokens is None else options.max_tokens
            room = context if rolling else context - len(ids)
            max_tokens = min(asked, settings.max_tokens or context, room)
            for _ in range(options.n):
                generator = torch.Generator(device)
                if options.seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(options.seed + len(out))
                o = options
                out.append(
                    Completion(
                        len(out),
                        ids,
                        max_tokens,
                        o.sampling,
                        generator,
                        o.stop,
                        o.penalties,
                        o.top,
                        o.echo_top,
                    )
                )
        return out

    def submit(self, completions: list[Completion]) -> Job:
        job = Job(completions, asyncio.get_running_loop())
        try:
            self.state.scheduler.submit(completions)
        except Busy as e:
            raise ApiError(
                503, f"the server is busy: {e}" if e.code == "server_busy" else str(e), code=e.code
            ) from None
        return job

    async def collect(self, job: Job, answer: Answer, with_logprobs: bool) -> dict:
        """The whole reply of a job that is not streamed."""
        texts = {i: [answer.prefix[i]] for i in job.indices}
        draws: dict[int, list] = {i: [] for i in job.indices}
        finish, tokens = {}, {}
        async for pieces in pieces_of(job):
            for p in pieces:
                error = failure(p)
                if error:
                    raise error
                texts[p.index].append(p.text)
                draws[p.index] += [*p.echo, *p.draws]
                if p.finish:
                    finish[p.index], tokens[p.index] = p.finish, p.tokens
        choices = []
        for i in sorted(texts):
            start = 0 if answer.prefix[i] else answer.prompt_chars[i]
            logprobs = answer.logprobs(i, draws[i], start) if with_logprobs else None
            choices.append(answer.reply.choice(i, "".join(texts[i]), finish[i], logprobs=logprobs))
        return answer.reply.reply(choices, usage(answer.prompt_tokens, sum(tokens.values())))

    async def collect_unless_gone(self, request: Request, job: Job, answer: Answer, with_logprobs: bool):
        """collect, but a client that disconnects cancels the job (its rows free at the next step)."""
        reply = asyncio.ensure_future(self.collect(job, answer, with_logprobs))
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait((reply, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not reply.done():  # the client left (or this handler was cancelled): stop decoding for it
                job.cancelled = True
                reply.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reply
        return Response(status_code=499) if reply.cancelled() else JSONResponse(reply.result())

    async def stream(
        self, job: Job, answer: Answer, with_usage: bool, with_logprobs: bool
    ) -> AsyncIterator[str]:
        """The SSE events of a job: a first chunk (chat: the role; completions with echo: the prompt),
        a chunk per new text, a chunk with finish_reason per completion, usage if asked, then [DONE]
        (after an error event too)."""
        reply, prefix = answer.reply, answer.prefix
        first = reply.kind == "chat" or any(prefix)
        for i in range(len(job.indices) if first else 0):
            yield sse(reply.chunk([reply.choice(i, prefix[i] or None, None, delta=True)], None, with_usage))
        tokens = {}
        offsets = {i: 0 if prefix[i] else answer.prompt_chars[i] for i in range(len(prefix))}
        async for pieces in pieces_of(job):
            errors = [e for e in map(failure, pieces) if e]
            if errors:
                yield sse(errors[0].body())
                break
            for p in merged(pieces):  # a client that reads slower than the model gets fewer, longer chunks
                draws = [*p.echo, *p.draws]
                logprobs = answer.logprobs(p.index, draws, offsets[p.index]) if with_logprobs else None
                offsets[p.index] += sum(len(t) for t in (logprobs or {}).get("tokens", []))
                if p.text or logprobs:
                    choice = reply.choice(p.index, p.text, None, delta=True, logprobs=logprobs)
                    yield sse(reply.chunk([choice], None, with_usage))
                if p.finish:
                    tokens[p.index] = p.tokens
                    yield sse(
                        reply.chunk([reply.choice(p.index, "", p.finish, delta=True)], None, with_usage)
                    )
        else:
            if with_usage:
                yield sse(reply.chunk([], usage(answer.prompt_tokens, sum(tokens.values())), with_usage))
        yield "data: [DONE]\n\n"

    async def answer(
        self, http: Request, request: CompletionRequest | ChatRequest, reply: Reply, prompts: list[list[int]]
    ):
        """Decode the prompts; the reply as JSON, or as a stream of SSE events."""
        served, settings = self.state.ready(), self.state.settings
        options = options_of(request, settings.max_n, served.model.config.vocab_size)
        default = DEFAULT_COMPLETION_TOKENS if reply.kind == "completion" else settings.max_tokens
        completions = self.completions(options, prompts, default or 1 << 30)
        texts = [served.tokenizer.decode(p) for p in prompts]
        echo = reply.kind == "completion" and request.echo
        prompt_of = [texts[i // options.n] for i in range(len(completions))]
        prompt_tokens = sum(len(p) for p in prompts)
        answer = Answer(
            reply,
            [t if echo else "" for t in prompt_of],
            [len(t) for t in prompt_of],
            prompt_tokens,
            TokenText(served.tokenizer),
        )
        job = self.submit(completions)
        self.state.metrics.count_prompt(prompt_tokens * options.n)
        with_logprobs = options.top is not None
        if request.stream:
            with_usage = bool(request.stream_options and request.stream_options.include_usage)
            events = self.stream(job, answer, with_usage, with_logprobs)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        return await self.collect_unless_gone(http, job, answer, with_logprobs)

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
            # "chatml": chat completions use the model's template; None: a base model's plain rendering
            "chat_template": served.tokenizer.template.to_meta()["format"]
            if hasattr(served.tokenizer, "template")
            else None,
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
    add_tokenizer_routes(app, api)
    app.add_middleware(CountRequests, metrics=state.metrics)
    return app


class CountRequests:
    """ASGI middleware: each /v1 request counted by path and the status it was answered with (0: none,
    the client left first)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = 0

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.count_request(scope["path"], status)


def add_routes(app: FastAPI, api: Api) -> None:
    state = api.state
    playground = files("nanogpt.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return playground

    @app.get("/health")
    async def health() -> dict:
        served = state.healthy()
        running, waiting = state.scheduler.load()
        return {"status": "ok", "model": served.name, "running": running, "waiting": waiting}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        running, waiting = state.scheduler.load() if state.scheduler else (0, 0)
        return state.metrics.text(running, waiting)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        state.authorize(request)
        return {"object": "list", "data": [api.model_card()]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        state.authorize(request)
        body = parse(CompletionRequest, await read_json(request, state.settings.max_body_bytes))
        served = api.check_model(body.model)
        check_completion_count(body, state.settings.max_n, state.settings.max_waiting)
        return await api.answer(request, body, Reply("completion", served.name), api.prompts_of(body))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        state.authorize(request)
        body = parse(ChatRequest, await read_json(request, state.settings.max_body_bytes))
        served = api.check_model(body.model)
        check_completion_count(body, state.settings.max_n, state.settings.max_waiting)
        if hasattr(served.tokenizer, "template"):  # a chat model: its template, its end of turn
            prompts = [render_chat_ids(body.messages, served.tokenizer)]
        else:
            prompts = [api.encode(render_chat(body.messages), "messages")]
        return await api.answer(request, body, Reply("chat", served.name), prompts)


def add_tokenizer_routes(app: FastAPI, api: Api) -> None:
    """vLLM's tokenizer endpoints: lm-evaluation-harness's `local-completions` tokenizes through them."""
    state = api.state

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict:
        state.authorize(request)
        served = state.ready()
        eot = served.tokenizer.eot
        return {
            "tokenizer_class": served.tokenizer.name,
            "eos_token": None if eot is None else served.tokenizer.decode([eot]),
            "bos_token": None,
            "pad_token": None,
            "model_max_length": served.model.config.block_size,
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        state.authorize(request)
        body = parse(TokenizeRequest, await read_json(request, state.settings.max_body_bytes))
        tokens = api.encode(body.prompt, "prompt") if body.prompt else []
        return {
            "tokens": tokens,
            "count": len(tokens),
            "max_model_len": state.ready().model.config.block_size,
        }

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        state.authorize(request)
        body = parse(DetokenizeRequest, await read_json(request, state.settings.max_body_bytes))
        return {"prompt": state.ready().tokenizer.decode(api.token_ids(body.tokens, "tokens"))}
