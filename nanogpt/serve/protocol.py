"""The OpenAI API's shapes: request bodies (pydantic), their checks, the chat template, the error JSON
and the objects of replies and stream chunks. A body that is not the schema (a missing field, a wrong
type) is a 422; a value out of range, an unsupported option or a prompt that does not fit is a 400."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from nanogpt.generate import Draw, Penalties, Sampling, SamplingError

# options of OpenAI's API this server does not implement: refused when set, rather than ignored
UNSUPPORTED = ("suffix", "tools", "functions", "best_of")
MAX_STOP = 4  # stop strings per request, as OpenAI (each matched in O(new text) per token, any length)
MAX_LOGPROBS = {"completion": 5, "chat": 20}  # top log-probs per token, as OpenAI
# a base model is not a chat model: messages become plain "Role: content" lines, the reply continues
# after "Assistant:" and ends where the model starts the user's next line
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"


class ApiError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's, but llama.cpp's and vLLM's: 0 (or absent) keeps all tokens
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> [-100, 100]


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None  # 0..5: the sampled token's log-prob and this many likeliest


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None  # 0..20, with logprobs


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize (what lm-evaluation-harness's remote tokenizer calls)."""

    model_config = ConfigDict(extra="allow")
    prompt: str
    add_special_tokens: bool = False  # nanoGPT's tokenizers add none


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[int]


def parse(cls: type[BaseModel], body: Any) -> BaseModel:
    """A request body -> cls, or ApiError 422 naming the first field that does not fit."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise ApiError(422, f"{param}: {first['msg']}", param, "invalid_value") from None
    for name in UNSUPPORTED if isinstance(request, _Request) else ():
        if (request.model_extra or {}).get(name):
            raise ApiError(400, f"{name} is not supported by this server", name, "unsupported_parameter")
    return request


@dataclass(frozen=True)
class Options:
    """What a request asks of each of its completions, checked. max_tokens None: the server's default;
    0: score the prompt only (completions with echo and logprobs). top: top log-probs per token (None:
    no log-probs); echo_top: the prompt's log-probs too, with this many top ones."""

    sampling: Sampling
    penalties: Penalties
    stop: tuple[str, ...]
    n: int
    seed: int | None
    max_tokens: int | None
    top: int | None
    echo_top: int | None


def options_of(request: _Request, max_n: int, vocab_size: int) -> Options:
    """The request's options, each checked against OpenAI's range (ApiError 400 naming the parameter)."""
    chat = isinstance(request, ChatRequest)
    top = top_logprobs_of(request)
    echo = not chat and request.echo
    max_tokens = (
        request.max_tokens
        if not chat or request.max_completion_tokens is None
        else request.max_completion_tokens
    )
    param = "max_completion_tokens" if chat and request.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < (0 if echo and top is not None else 1):
        hint = "" if chat else " (0 scores the prompt only: with echo and logprobs)"
        raise ApiError(400, f"{param} must be >= 1{hint}, got {max_tokens}", param)
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise ApiError(400, "seed must be in 0..2**63-1", "seed")
    try:
        sampling = sampling_of(request)
        penalties = Penalties(
            request.presence_penalty or 0.0, request.frequency_penalty or 0.0, bias_of(request, vocab_size)
        )
    except SamplingError as e:
        raise ApiError(400, str(e), e.param) from None
    stop = stops_of(request) + ((CHAT_STOP,) if chat else ())
    n = count_of(request, max_n)
    return Options(sampling, penalties, stop, n, request.seed, max_tokens, top, top if echo else None)


def sampling_of(request: _Request) -> Sampling:
    """The request's temperature (default 1, at most 2 as OpenAI), top_p and top_k (0: all tokens)."""
    t = 1.0 if request.temperature is None else request.temperature
    if t > 2:
        raise ApiError(400, f"temperature must be in [0, 2], got {t}", "temperature")
    if (request.top_k or 0) < 0:
        raise ApiError(400, f"top_k must be >= 0 (0 keeps all tokens), got {request.top_k}", "top_k")
    top_p = 1.0 if request.top_p is None else request.top_p
    return Sampling(t, request.top_k or None, top_p if top_p != 1 else None)


def bias_of(request: _Request, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """logit_bias {"token id": bias} -> ((id, bias), ...), each id in the vocabulary."""
    bias = []
    for key, value in (request.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise ApiError(
                400, f"logit_bias keys must be token ids in 0..{vocab_size - 1}, got {key!r}", "logit_bias"
            )
        bias.append((int(key), value))
    return tuple(bias)


def top_logprobs_of(request: _Request) -> int | None:
    """How many top log-probs each token carries (None: no log-probs)."""
    if isinstance(request, ChatRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        top, param = (request.top_logprobs or 0) if request.logprobs else None, "top_logprobs"
    else:
        top, param = request.logprobs, "logprobs"
    most = MAX_LOGPROBS["chat" if isinstance(request, ChatRequest) else "completion"]
    if top is not None and not 0 <= top <= most:
        raise ApiError(400, f"{param} must be in 0..{most}, got {top}", param)
    return top


def stops_of(request: _Request) -> tuple[str, ...]:
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stop) > MAX_STOP or not all(stop):
        raise ApiError(400, f"stop must be at most {MAX_STOP} non-empty strings", "stop")
    return tuple(stop)


def count_of(request: _Request, max_n: int) -> int:
    n = 1 if request.n is None else request.n
    if not 1 <= n <= max_n:
        raise ApiError(400, f"n must be in 1..{max_n} on this server, got {n}", "n")
    return n


def check_completion_count(request: _Request, max_n: int, max_waiting: int) -> None:
    """One request may not ask for more completions (prompts x n) than the server queues: a 400 (it can
    never fit), checked before any prompt is read."""
    prompt = getattr(request, "prompt", "")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    total = prompts * count_of(request, max_n)
    if total > max_waiting:
        message = (
            f"this request asks for {total} completions ({prompts} prompts x n); this server queues at "
            f"most {max_waiting} (--max_waiting): split it"
        )
        raise ApiError(400, message, "prompt" if prompts > 1 else "n", "too_many_completions")


def chat_texts(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """(role, text) of each message, checked: at least one, every role known."""
    if not messages:
        raise ApiError(400, "messages must hold at least one message", "messages")
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise ApiError(
                400, f"role {m.role!r} is not one of {', '.join(CHAT_ROLES)}", f"messages.{i}.role"
            )
    return [
        (m.role, m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or []))
        for m in messages
    ]


def checked_token_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    """A prompt given as token ids: at least one, each in the vocabulary."""
    if not ids or not all(0 <= t < vocab_size for t in ids):
        raise ApiError(400, f"token ids must be 1 or more in 0..{vocab_size - 1}", param, "invalid_prompt")
    return list(ids)


def check_context(prompt_tokens: int, context: int, rolling: bool) -> None:
    """A learned-position model's context must hold the prompt and one new token (a rotary one rolls)."""
    if prompt_tokens >= context and not rolling:
        message = (
            f"the prompt is {prompt_tokens} tokens; this model's context is {context} tokens and must "
            f"hold the prompt and at least one new token"
        )
        raise ApiError(400, message, "prompt", "context_length_exceeded")


def render_chat(messages: list[ChatMessage]) -> str:
    """The plain template for base models: one "Role: content" line per message, then "Assistant:"."""
    lines = [f"{CHAT_ROLES[role]}: {text}" for role, text in chat_texts(messages)]
    return "\n".join(lines) + "\nAssistant:"


def render_chat_ids(messages: list[ChatMessage], tokenizer: Any) -> list[int]:
    """A chat model's prompt in its own template (tokenizer: a nanogpt.chat.template.ChatTokenizer, whose
    eot, the end of a turn, ends the reply); "developer" is a system message there."""
    from nanogpt.chat.template import Message

    texts = chat_texts(messages)
    return tokenizer.encode_chat([Message("system" if r == "developer" else r, t) for r, t in texts])


@dataclass
class Reply:
    """The header of every object one request answers with."""

    kind: Literal["completion", "chat"]
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = self.id or ("cmpl-" if self.kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = self.created or int(time.time())

    def _object(self, chunk: bool) -> dict[str, Any]:
        name = {"completion": "text_completion", "chat": "chat.completion"}[self.kind]
        name += ".chunk" if chunk and self.kind == "chat" else ""
        return {"id": self.id, "object": name, "created": self.created, "model": self.model}

    def choice(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        delta: bool = False,
        logprobs: dict | None = None,
    ) -> dict:
        """A choice of a reply (delta=False) or of a chunk; for a chat chunk text None is the first
        delta (the role) and "" with a finish the last (an empty delta)."""
        if self.kind == "completion":
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        if not delta:
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
        content = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
        return {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": finish}

    def reply(self, choices: list[dict], usage: dict[str, int]) -> dict[str, Any]:
        return {**self._object(chunk=False), "choices": choices, "usage": usage}

    def chunk(self, choices: list[dict], usage: dict[str, int] | None = None, with_usage: bool = False):
        """One SSE event's object; with_usage (stream_options.include_usage) adds "usage" (null but in
        the last chunk, which has no choices)."""
        chunk = {**self._object(chunk=True), "choices": choices}
        return {**chunk, "usage": usage} if with_usage else chunk


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class TokenText:
    """A token id's text as OpenAI's log-probs show it: the decoded bytes, or "bytes:\\xNN..." for bytes
    that are not whole UTF-8 characters (part of one)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def bytes(self, token: int) -> bytes:
        return self.tokenizer.decode_bytes([token])

    def __call__(self, token: int) -> str:
        raw = self.bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def legacy_logprobs(draws: list[Draw], text_of: TokenText, offset: int) -> dict[str, list]:
    """/v1/completions' logprobs: per token its text, log-prob (None for an echoed prompt's first),
    top log-probs ({text: log-prob}, None with the log-prob) and character offset in the choice's text."""
    tokens = [text_of(d.token) for d in draws]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [d.logprob for d in draws],
        "top_logprobs": [None if d.logprob is None else {text_of(t): p for t, p in d.top} for d in draws],
        "text_offset": offsets,
    }


def chat_logprobs(draws: list[Draw], text_of: TokenText) -> dict[str, Any]:
    """Chat's logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": text_of(token), "logprob": logprob, "bytes": list(text_of.bytes(token))}

    content = [{**entry(d.token, d.logprob), "top_logprobs": [entry(t, p) for t, p in d.top]} for d in draws]
    return {"content": content, "refusal": None}
