"""The OpenAI API's shapes: request bodies (pydantic), their checks, the chat template, the error JSON
and the objects of replies and stream chunks. A body that is not the schema (a missing field, a wrong
type) is a 422; a value out of range, an unsupported option or a prompt that does not fit is a 400."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from nanogpt.generate import Sampling

# options of OpenAI's API this server does not implement: refused when set, rather than ignored
UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "suffix",
    "tools",
    "functions",
    "presence_penalty",
    "frequency_penalty",
)
MAX_STOP = 4  # stop strings per request, as OpenAI
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


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    echo: bool = False


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


def parse(cls: type[_Request], body: Any) -> _Request:
    """A request body -> cls, or ApiError 422 naming the first field that does not fit."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise ApiError(422, f"{param}: {first['msg']}", param, "invalid_value") from None
    for name in UNSUPPORTED:
        if (request.model_extra or {}).get(name):
            raise ApiError(400, f"{name} is not supported by this server", name, "unsupported_parameter")
    return request


def sampling_of(request: _Request) -> Sampling:
    """The request's temperature (default 1), top_p and top_k, checked against OpenAI's ranges."""
    t = 1.0 if request.temperature is None else request.temperature
    if not 0 <= t <= 2:
        raise ApiError(400, f"temperature must be in [0, 2], got {t}", "temperature")
    top_p = 1.0 if request.top_p is None else request.top_p
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = request.top_k or 0
    if top_k < 0:
        raise ApiError(400, f"top_k must be >= 0 (0 keeps all tokens), got {top_k}", "top_k")
    return Sampling(t, top_k or None, top_p if top_p < 1 else None)


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


def render_chat(messages: list[ChatMessage]) -> str:
    """The plain template for base models: one "Role: content" line per message, then "Assistant:"."""
    if not messages:
        raise ApiError(400, "messages must hold at least one message", "messages")
    lines = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise ApiError(
                400, f"role {m.role!r} is not one of {', '.join(CHAT_ROLES)}", f"messages.{i}.role"
            )
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        lines.append(f"{CHAT_ROLES[m.role]}: {text}")
    return "\n".join(lines) + "\nAssistant:"


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

    def choice(self, index: int, text: str | None, finish: str | None, delta: bool = False) -> dict:
        """A choice of a reply (delta=False) or of a chunk; for a chat chunk text None is the first
        delta (the role) and "" with a finish the last (an empty delta)."""
        if self.kind == "completion":
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not delta:
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
        content = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
        return {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}

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
