"""`nanogpt COMMAND ...`: one entry point, each command's code in its own module."""

from __future__ import annotations

import importlib
import sys

from nanogpt.errors import NanoGPTError

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


def usage() -> str:
    lines = ["usage: nanogpt COMMAND [options]   (nanogpt COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"nanogpt: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
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
