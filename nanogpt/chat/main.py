"""`nanogpt chat`: talk to a chat-trained model (`nanogpt train sft`) in the terminal.

    nanogpt chat --out_dir=out/sft                      # replies stream; /clear, /system TEXT, Ctrl-D quits
    printf 'Hi\\nWho are you?\\n' | nanogpt chat --out_dir=out/sft --temperature=0   # one reply per line
    nanogpt chat --out_dir=out/sft --gsm8k=gsm8k_test.jsonl --limit=100             # GSM8K accuracy (JSON)

With stdin not a terminal, each input line is one user message and each reply is printed on one line
(a reply's own line breaks written as \\n, backslashes as \\\\); blank lines are skipped, and the commands
work there too (they print nothing on stdout). The history is kept while it fits the model's context
with room for a reply: the oldest turns are dropped first, a system message is kept.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from nanogpt.chat.template import ChatTemplate, Message, checkpoint_template, encode_prompt
from nanogpt.checkpoint import load_for_inference, model_source
from nanogpt.device import DtypeName, autocast, resolve_device, resolve_dtype
from nanogpt.errors import NanoGPTError
from nanogpt.generate import Sampling, TextPieces, generate_stream
from nanogpt.model import GPT
from nanogpt.options import parse_options
from nanogpt.sample import SampleConfig


@dataclass
class ChatConfig:
    init_from: str = "resume"  # "resume": the checkpoint in out_dir; or a checkpoint / out_dir
    out_dir: str = "out"  # the training out_dir whose checkpoint init_from="resume" reads
    system: str = ""  # a system message to start every conversation with
    max_new_tokens: int = 256  # the longest reply, in tokens
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 200  # sample from the k likeliest tokens only
    top_p: float | None = None  # nucleus sampling: the smallest set of tokens whose probability reaches p
    seed: int = 1337  # the sampling generator's seed
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    dtype: DtypeName = "float32"  # float32, bfloat16 / float16 through torch.autocast, or auto (as training)
    gsm8k: str = ""  # a GSM8K .jsonl (question, answer): answer its questions, print the accuracy as JSON
    limit: int = 0  # with gsm8k: only the first this many questions (0: all)

    def __post_init__(self):
        # sample's checks of the same decoding options
        SampleConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                     top_p=self.top_p, dtype=self.dtype)  # fmt: skip
        if self.max_new_tokens < 1 or self.limit < 0:
            raise NanoGPTError(
                f"max_new_tokens must be >= 1 and limit >= 0, got {self.max_new_tokens}, {self.limit}"
            )


class ChatSession:
    """One conversation with a model: `reply(text)` streams the assistant's answer and keeps it in the
    history. Generation stops at <|im_end|> (or a new turn), or after max_new_tokens."""

    def __init__(self, model: GPT, tokenizer: Any, template: ChatTemplate, cfg: ChatConfig):
        self.model, self.tokenizer, self.template, self.cfg = model, tokenizer, template, cfg
        self.sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, tokenizer.vocab_size)  # ids with text
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.messages: list[Message] = []
        self.clear(cfg.system)

    def clear(self, system: str | None = None) -> None:
        """Forget the conversation; keep (or set) the system message."""
        if system is None:
            system = self.messages[0].content if self.messages and self.messages[0].role == "system" else ""
        self.messages = [Message("system", system)] if system else []

    def prompt(self) -> list[int]:
        """The ids a reply continues, fitted to the context: oldest turns dropped (the system message
        kept), and a single turn too long kept by its last tokens, so a reply has room."""
        block_size = self.model.config.block_size
        room = block_size - min(self.cfg.max_new_tokens, block_size // 2)
        system = 1 if self.messages and self.messages[0].role == "system" else 0
        ids = encode_prompt(self.tokenizer, self.template, self.messages)
        while len(ids) > room and len(self.messages) > system + 1:
            del self.messages[system]
            ids = encode_prompt(self.tokenizer, self.template, self.messages)
        return ids[-room:]

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to user message `text`, piece by piece; it joins the history when complete
        (or when the caller stops reading: what was said is kept)."""
        self.messages.append(Message("user", text))
        device = next(self.model.parameters()).device
        idx = torch.tensor([self.prompt()], dtype=torch.long, device=device)  # (1, T)
        pieces, decoder, stops = [], TextPieces(self.tokenizer), self.template.stops()
        try:
            for token in generate_stream(
                self.model, idx, self.cfg.max_new_tokens, self.sampling, generator=self.generator
            ):
                token_id = int(token)
                if token_id in stops:
                    break
                piece = decoder.add(token_id)
                if piece:
                    pieces.append(piece)
                    yield piece
            pieces.append(decoder.flush())
            yield pieces[-1]
        finally:
            self.messages.append(Message("assistant", "".join(pieces)))


def load_session(cfg: ChatConfig) -> ChatSession:
    """The model of cfg and its chat template (a base model has none: refused, saying how to get one)."""
    source = model_source(cfg.init_from, cfg.out_dir)
    template = checkpoint_template(source)
    if template is None:
        raise NanoGPTError(
            f"{source} is a base model (no chat template with its tokenizer): fine-tune it on conversations "
            f"first, `nanogpt train sft --init_from={source} --sft_data=conversations.jsonl`"
        )
    device = resolve_device(cfg.device)
    model, tokenizer = load_for_inference(source, device, compile=False)
    return ChatSession(model, tokenizer, template, cfg)


def command(session: ChatSession, line: str) -> str | None:
    """Run a /command; returns what to tell the user, or None if `line` is not a command."""
    if line == "/clear":
        session.clear()
        return "(conversation cleared)"
    if line == "/system" or line.startswith("/system "):
        session.clear(line[len("/system") :].strip())
        return "(system message set, conversation cleared)"
    if line.startswith("/") and " " not in line:
        return f"(unknown command {line}: /clear, /system TEXT; Ctrl-D quits)"
    return None


def one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def run_script(session: ChatSession, lines: TextIO, out: TextIO, err: TextIO) -> None:
    """Non-interactive: each input line a user message, each reply one output line."""
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        said = command(session, line.strip())
        if said is not None:
            print(said, file=err)
            continue
        print(one_line("".join(session.reply(line)).strip()), file=out, flush=True)


def run_terminal(session: ChatSession, out: TextIO) -> None:
    """Interactive: replies stream as they are generated; Ctrl-C stops a reply, Ctrl-D quits."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(
        "chat: /clear forgets the conversation, /system TEXT sets the system message, Ctrl-D quits", file=out
    )
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=out)
            return
        if not line:
            continue
        said = command(session, line)
        if said is not None:
            print(said, file=out)
            continue
        out.write("bot> ")
        try:
            for piece in session.reply(line):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")


def main(argv: list[str]) -> int:
    cfg = parse_options(ChatConfig, argv, "usage: nanogpt chat [--out_dir=OUT] [--key=value ...]")
    if cfg is None:
        return 0
    session = load_session(cfg)
    device = resolve_device(cfg.device)
    with autocast(device, resolve_dtype(cfg.dtype, device)):
        if cfg.gsm8k:
            from nanogpt.chat.gsm8k import print_gsm8k

            print_gsm8k(session, cfg.gsm8k, cfg.limit)
        elif sys.stdin.isatty():
            run_terminal(session, sys.stdout)
        else:
            run_script(session, sys.stdin, sys.stdout, sys.stderr)
    return 0
