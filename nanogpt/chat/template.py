"""The chat template: how a conversation becomes token ids, and which of them an assistant is trained on.

ChatML (OpenAI's, used by Qwen, SmolLM, TRL's `setup_chat_format`): every turn is

    <|im_start|>ROLE\\nCONTENT<|im_end|>\\n

with ROLE written as text (system, user, assistant) and CONTENT stripped of leading and trailing
whitespace; a conversation starts with <|endoftext|> (the document separator the base model was
pretrained with, so packed conversations read like packed documents), and a prompt for a reply ends
with `<|im_start|>assistant\\n`. Two special tokens, not nanochat's eight: roles as text keep the
vocabulary change to two ids (they fit GPT-2's padded vocabulary), any role name works, and
`transformers` renders ChatML with a four-line Jinja template (`jinja()`), which HF export writes.

The assistant is trained on its content tokens and its <|im_end|> (so it learns to stop); headers,
other roles and the newlines between turns are masked. A user's text containing "<|im_start|>" is
encoded as that text, never as the special token (the tokenizers' `encode` is ordinary text only).

The template a model was fine-tuned with is stored as its tokenizer meta's "chat_template" (every
checkpoint carries the tokenizer meta): `stored_template` reads it back; a base model has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nanogpt.data.tokenizers import ENDOFTEXT, GPT2_CHAT_TOKENS, IM_END, IM_START
from nanogpt.errors import NanoGPTError

ROLES = ("system", "user", "assistant")
FORMAT = "chatml"


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class ChatTemplate:
    """ChatML's token ids in one vocabulary. bos: the id each conversation starts with (None: none)."""

    start: int  # <|im_start|>
    end: int  # <|im_end|>
    bos: int | None

    def to_meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "special_tokens": {IM_START: self.start, IM_END: self.end},
            "bos": self.bos,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ChatTemplate:
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise NanoGPTError(f"unsupported chat template {meta!r} (this nanogpt reads format {FORMAT!r})")
        ids = meta["special_tokens"]
        return cls(int(ids[IM_START]), int(ids[IM_END]), None if meta["bos"] is None else int(meta["bos"]))

    def stops(self) -> frozenset[int]:
        """Ids that end a reply: <|im_end|>, and a new turn or conversation starting."""
        return frozenset(i for i in (self.end, self.start, self.bos) if i is not None)


def template_for(tokenizer: Any) -> ChatTemplate:
    """The ChatML template in `tokenizer`'s vocabulary: a BPE trained here (it reserves the two tokens)
    or GPT-2's (ids 50257 and 50258 of its padded vocabulary)."""
    if tokenizer.name == "gpt2":
        return ChatTemplate(GPT2_CHAT_TOKENS[IM_START], GPT2_CHAT_TOKENS[IM_END], tokenizer.eot)
    specials = getattr(tokenizer, "special_tokens", {})
    if IM_START not in specials or IM_END not in specials:
        raise NanoGPTError(
            f"the model's {tokenizer.name!r} tokenizer has no chat tokens ({IM_START}, {IM_END}): chat "
            "fine-tuning needs GPT-2's BPE or a BPE prepared by this nanogpt (`nanogpt prepare NAME "
            "--tokenizer bpe --vocab_size N`, which reserves them); pretrain the base model on such data"
        )
    return ChatTemplate(specials[IM_START], specials[IM_END], specials.get(ENDOFTEXT))


def stored_template(tokenizer_meta: dict | None) -> ChatTemplate | None:
    """The template a model was chat-trained with (its checkpoint's tokenizer meta), None for a base model."""
    if not tokenizer_meta or "chat_template" not in tokenizer_meta:
        return None
    return ChatTemplate.from_meta(tokenizer_meta["chat_template"])


def with_template(tokenizer_meta: dict, template: ChatTemplate) -> dict:
    """The tokenizer meta a chat-trained checkpoint stores: the base's, plus its template."""
    return {**tokenizer_meta, "chat_template": template.to_meta()}


def _turn(tokenizer: Any, template: ChatTemplate, message: Message) -> tuple[list[int], list[int]]:
    """(header, body) ids of one turn: <|im_start|>ROLE\\n, then CONTENT<|im_end|>. Stripped content
    starts and ends with a non-space, so no pre-tokenizer piece joins it to the header's newline: the ids
    are those of the whole text (what `transformers` gives the rendered string; tested)."""
    header = [template.start, *tokenizer.encode(message.role + "\n")]
    return header, [*tokenizer.encode(message.content.strip()), template.end]


def encode_conversation(
    tokenizer: Any, template: ChatTemplate, messages: Sequence[Message]
) -> tuple[list[int], list[bool]]:
    """(ids, trained): the whole conversation's ids and, per id, whether it is an assistant token the loss
    trains on (the assistant's content and its <|im_end|>)."""
    ids = [] if template.bos is None else [template.bos]
    trained = [False] * len(ids)
    newline = tokenizer.encode("\n")
    for message in messages:
        header, body = _turn(tokenizer, template, message)
        ids += header + body + newline
        trained += [False] * len(header) + [message.role == "assistant"] * len(body) + [False] * len(newline)
    return ids, trained


def encode_prompt(tokenizer: Any, template: ChatTemplate, messages: Sequence[Message]) -> list[int]:
    """The ids a reply continues: the conversation so far, then `<|im_start|>assistant\\n`."""
    ids, _ = encode_conversation(tokenizer, template, messages)
    return ids + [template.start, *tokenizer.encode("assistant\n")]


def jinja(template: ChatTemplate) -> str:
    """The template as `transformers`' `chat_template` (tokenizer_config.json): its apply_chat_template
    renders the same text, which its tokenizer turns into our ids."""
    bos = "{{ bos_token }}" if template.bos is not None else ""
    return (
        bos + "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] | trim) + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


class ChatTokenizer:
    """A chat model's tokenizer, as serving and export use it: the base tokenizer's ids and text, its
    `template` (in to_meta() too), the chat tokens decoded as their spelling (GPT-2's tiktoken has no ids
    50257/50258), and `eot` the end of a turn, where a reply ends. Everything else is the base's."""

    def __init__(self, base: Any, template: ChatTemplate):
        self.base, self.template, self.eot = base, template, template.end
        self._spelling = {template.start: IM_START.encode(), template.end: IM_END.encode()}
        self.vocab_size = max(base.vocab_size, template.start + 1, template.end + 1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        parts, run = [], []
        for i in ids:
            if i in self._spelling:
                parts += [self.base.decode_bytes(run), self._spelling[i]]
                run = []
            else:
                run.append(i)
        return b"".join([*parts, self.base.decode_bytes(run)])

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_meta(self) -> dict:
        return with_template(self.base.to_meta(), self.template)

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """The prompt of a reply to `messages` (encode_prompt)."""
        return encode_prompt(self.base, self.template, messages)


def checkpoint_template(source: Any) -> ChatTemplate | None:
    """The template stored in `source`'s checkpoint (an out_dir or a checkpoint file); None for a base
    model, GPT-2's weights included."""
    from nanogpt.checkpoint import is_hf_source, peek_checkpoint

    return None if is_hf_source(source) else stored_template(peek_checkpoint(source).get("tokenizer"))


def chat_tokenizer(source: Any, tokenizer: Any) -> Any:
    """The tokenizer to serve `source` with: a ChatTokenizer where its checkpoint stores a template, else
    `tokenizer` itself."""
    template = checkpoint_template(source)
    return tokenizer if template is None else ChatTokenizer(tokenizer, template)
