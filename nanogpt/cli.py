"""`nanogpt COMMAND ...`: one entry point, each command's code in its own module."""

from __future__ import annotations

import importlib
import os
import sys

from nanogpt import __version__
from nanogpt.errors import NanoGPTError
from nanogpt.options import did_you_mean

# command -> (module with a `main(argv) -> int`, one-line help)
COMMANDS = {
    "prepare": ("nanogpt.data.prepare", "text -> train.bin / val.bin + meta.json"),
    "train": ("nanogpt.train.trainer", "train or fine-tune a model (presets + --key=value overrides)"),
    "sample": ("nanogpt.sample", "generate text from a checkpoint or GPT-2 weights"),
    "eval": ("nanogpt.evaluate", "loss, perplexity and bits per character on a split or a file"),
    "bench": ("nanogpt.bench", "training and generation throughput, MFU"),
    "experiment": ("nanogpt.experiment", "several seeds x several datasets -> a table of results"),
    "export": ("nanogpt.export", "a model as a HF folder, a GGUF file (llama.cpp) or a merged checkpoint"),
    "serve": ("nanogpt.serve.main", "OpenAI-compatible HTTP server with batched decoding and a playground"),
    "chat": ("nanogpt.chat.main", "talk to a chat-trained model (nanogpt train sft) in the terminal"),
}
# the shell's code for a process that wrote into a closed pipe (128 + SIGPIPE), as `cat file | head` gives
BROKEN_PIPE = 141


def usage() -> str:
    lines = ["usage: nanogpt COMMAND [options]   (nanogpt COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    """The command line -> its exit code: 0 done, 1 bad input or a fault (one line), 2 no or an unknown
    command, 130 interrupted."""
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"nanogpt {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"nanogpt: unknown command {command!r}.{did_you_mean(command, COMMANDS)}", file=sys.stderr)
        print(f"\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])  # inside: Ctrl-C during imports is clean too
        return int(module.main(rest) or 0)
    except NanoGPTError as e:
        print(f"nanogpt {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    try:
        code = run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # here, not at exit, so that a reader gone early is caught below
        return code
    except BrokenPipeError:  # e.g. `nanogpt train --help | head -2`: the reader has what it wanted
        # Python flushes stdout again at exit: point it at /dev/null so that nothing more is said
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
