"""`nanogpt eval`: loss, perplexity and bits per character / byte of a model on a whole dataset split or
a text file; with --tasks, accuracy on in-context-learning benchmarks and CORE (nanogpt/evals/).

    nanogpt eval --out_dir=out/shakespeare_char                   # its training dataset's val split
    nanogpt eval --init_from=gpt2 --dataset=openwebtext --split=val --json
    nanogpt eval --out_dir=out/shakespeare_char --file=hamlet.txt
    nanogpt eval --init_from=gpt2 --tasks=core --json=core.json   # CORE's tasks (20 of 22 offline)
    nanogpt eval --out_dir=out/x --tasks=hellaswag,arc_easy --limit=200

The text is read sequentially in windows of block_size tokens, each token after the first predicted
exactly once. The loss is the mean over all those tokens (not a mean of batch means). Bits per byte
(total nats / ln 2 / UTF-8 bytes of the text) is the figure that compares across tokenizers.
"""

from __future__ import annotations

import codecs
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nanogpt.checkpoint import describe_tokenizer, load_for_inference, model_source, training_config
from nanogpt.data.loader import check_token_ids, load_split, read_meta, sequential_batches
from nanogpt.data.tokenizers import tokenizer_from_meta
from nanogpt.device import DtypeName, autocast, check_dtype, resolve_device, resolve_dtype
from nanogpt.errors import NanoGPTError
from nanogpt.evals.report import evaluate_tasks, format_results
from nanogpt.evals.tasks import resolve_tasks
from nanogpt.files import read_utf8, write_text_atomic
from nanogpt.model import GPT
from nanogpt.options import parse_options
from nanogpt.quantization import check_quantize, quantized

_DECODE_CHUNK = 1 << 20  # tokens decoded at once when counting the characters and bytes of the text


@dataclass
class EvalConfig:
    init_from: str = "resume"  # "resume": the checkpoint in out_dir; or gpt2, gpt2-medium, ... or a HF folder, or a checkpoint (ours or nanoGPT's)
    meta: str = ""  # a nanoGPT checkpoint's meta.pkl; "": found as nanoGPT finds it, else GPT-2 BPE
    out_dir: str = "out"  # the training out_dir whose checkpoint init_from="resume" reads
    dataset: str = ""  # a dataset prepared under data_dir; "": the checkpoint's training dataset
    data_dir: str = ""  # "": the checkpoint's data_dir for its own dataset, else "data"
    split: str = "val"  # train, val or test
    file: str = ""  # a text file to evaluate on instead of a dataset split
    batch_size: int = 8  # windows per forward pass
    block_size: int = 0  # window length; 0: the model's block_size
    max_tokens: int = 0  # evaluate on the first max_tokens tokens only (a fixed budget); 0: all of them
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    dtype: DtypeName = "float32"  # float32, bfloat16 / float16 through torch.autocast, or auto (as training)
    compile: bool = False  # torch.compile the model (pays off for a large split on a GPU)
    quantize: str = "none"  # int8: int8 Linear weights and inputs, on the CPU (nanogpt/quantization.py)
    json: bool | str = False  # True: print one JSON object instead of a table; a path: also write it there
    tasks: str = ""  # core, task names (hellaswag,arc_easy), PATH.jsonl:TYPE:SHOTS or task.toml: accuracy instead of loss
    limit: int = 0  # --tasks: the first `limit` items of each task, in file order; 0: all
    task_batch_size: int = 32  # --tasks: sequences (an item's choices) per forward pass
    skip_unencodable: bool = False  # --tasks: skip (and count) items the tokenizer cannot encode

    def __post_init__(self):
        check_dtype(self.dtype)
        check_quantize(self.quantize, self.dtype, self.compile)
        if self.batch_size < 1 or self.block_size < 0 or self.max_tokens < 0:
            raise NanoGPTError("batch_size must be >= 1, block_size and max_tokens >= 0")
        if self.dataset and self.file:
            raise NanoGPTError("give either --dataset (with --split) or --file, not both")
        if self.tasks and (self.dataset or self.file):
            raise NanoGPTError("--tasks evaluates on its task files: give it without --dataset or --file")
        if self.limit < 0 or self.task_batch_size < 1:
            raise NanoGPTError("limit must be >= 0, task_batch_size >= 1")
        if not (self.dataset or self.file or self.tasks or self.init_from == "resume"):
            raise NanoGPTError(f"what to evaluate {self.init_from} on: give --dataset=NAME or --file=PATH")


@torch.no_grad()
def token_losses(
    model: GPT, tokens: np.ndarray, block_size: int, batch_size: int, device: str, dtype: str = "float32"
) -> tuple[float, int]:
    """(sum of the next-token losses in nats, number of predicted tokens) over all of `tokens`."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    batches = sequential_batches(tokens, block_size, batch_size, device)
    for x, y in tqdm(batches, desc="eval", unit="batch", disable=None, file=sys.stderr):
        with autocast(device, dtype):
            _, loss = model(x, y)  # mean over the targets != -1 (padding)
        n = (y != -1).sum()
        total += loss.double() * n
        count += n
    return total.item(), int(count.item())


def text_size(tokens: np.ndarray, tokenizer: Any) -> tuple[int, int]:
    """(characters, UTF-8 bytes) of the text `tokens` stand for, exactly. Decoded in chunks to bound
    memory, through one incremental UTF-8 decoder: a character that a chunk edge cuts counts once.
    The end-of-text token between documents is no text: it counts no characters or bytes (so bits per
    byte compare with a tokenizer that has none)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chars = n_bytes = 0
    for start in range(0, len(tokens), _DECODE_CHUNK):
        chunk = np.asarray(tokens[start : start + _DECODE_CHUNK])
        data = tokenizer.decode_bytes(chunk[chunk != tokenizer.eot].tolist())
        n_bytes += len(data)
        chars += len(decoder.decode(data))
    return chars + len(decoder.decode(b"", final=True)), n_bytes


def evaluate(
    model: GPT,
    tokenizer: Any,
    tokens: np.ndarray,
    batch_size: int = 8,
    block_size: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, float | int]:
    """Loss (nats per token), perplexity, bits per token, per character and per byte on `tokens`."""
    if len(tokens) < 2:
        raise NanoGPTError(f"need at least 2 tokens to evaluate (one to predict), got {len(tokens)}")
    check_token_ids(tokens, model.config.vocab_size, "the text to evaluate")
    block_size = block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise NanoGPTError(f"block_size {block_size} is longer than the model's {model.config.block_size}")
    nats, n_tokens = token_losses(model, tokens, block_size, batch_size, device, dtype)
    chars, n_bytes = text_size(tokens[1:], tokenizer)  # the first token is never predicted
    bits = nats / math.log(2)
    loss = nats / n_tokens
    return {
        "tokens": n_tokens,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_token": bits / n_tokens,
        "bits_per_char": bits / chars,
        "bits_per_byte": bits / n_bytes,
    }


def training_dataset(source: str) -> tuple[str, str]:
    """(dataset, data_dir) a checkpoint was trained on, from its saved training config."""
    config = training_config(source)
    if not config.get("dataset"):
        raise NanoGPTError(f"{source}: the checkpoint does not say its dataset; give --dataset or --file")
    return config["dataset"], config.get("data_dir", "data")


def eval_tokens(cfg: EvalConfig, tokenizer: Any) -> tuple[np.ndarray, str]:
    """The tokens to evaluate on and a description of where they came from."""
    if cfg.file:
        tokens = np.asarray(tokenizer.encode(read_utf8(cfg.file, "--file")), dtype=np.int64)
        where = cfg.file
    else:
        dataset, data_dir = cfg.dataset, cfg.data_dir or "data"
        if not dataset:  # a checkpoint of ours: its training dataset, in the data_dir given or its own
            dataset, own_data_dir = training_dataset(cfg.out_dir)
            data_dir = cfg.data_dir or own_data_dir
        folder = Path(data_dir) / dataset
        meta = read_meta(folder)
        if tokenizer_from_meta(meta["tokenizer"]).to_meta() != tokenizer.to_meta():
            raise NanoGPTError(
                f"dataset {folder} was tokenized with {describe_tokenizer(meta['tokenizer'])}, the model with "
                f"{describe_tokenizer(tokenizer.to_meta())}: prepare the data with the model's tokenizer"
            )
        tokens = load_split(folder, cfg.split)
        where = f"{folder} {cfg.split}"
    return (tokens[: cfg.max_tokens] if cfg.max_tokens else tokens), where


def format_table(result: dict[str, Any]) -> str:
    rows = [
        ("model", result["model"]),
        ("data", f"{result['data']} ({result['tokens']:,} predicted tokens)"),
        ("loss", f"{result['loss']:.4f} nats/token"),
        ("perplexity", f"{result['perplexity']:.3f}"),
        ("bits/token", f"{result['bits_per_token']:.4f}"),
        ("bits/char", f"{result['bits_per_char']:.4f}"),
        ("bits/byte", f"{result['bits_per_byte']:.4f}"),
    ]
    return "\n".join(f"{name:<12} {value}" for name, value in rows)


def task_accuracy(cfg: EvalConfig, model: GPT, tokenizer: Any, device: str) -> dict[str, Any]:
    """The --tasks results (nanogpt/evals/report.py's evaluate_tasks)."""
    tasks = resolve_tasks(cfg.tasks)
    dtype = resolve_dtype(cfg.dtype, device)
    return evaluate_tasks(
        model, tokenizer, tasks, device, dtype, cfg.limit, cfg.task_batch_size, cfg.skip_unencodable
    )


def main(argv: list[str]) -> int:
    cfg = parse_options(EvalConfig, argv, "usage: nanogpt eval [--key=value ...]")
    if cfg is None:
        return 0
    device = resolve_device(cfg.device)
    source = model_source(cfg.init_from, cfg.out_dir)
    model, tokenizer = load_for_inference(source, device, cfg.compile, cfg.meta)
    model = quantized(model, cfg.quantize)
    if cfg.tasks:
        result = {
            "model": source,
            "tokenizer": tokenizer.name,
            **task_accuracy(cfg, model, tokenizer, device),
        }
        table = format_results(result)
    else:
        tokens, where = eval_tokens(cfg, tokenizer)
        metrics = evaluate(
            model, tokenizer, tokens, cfg.batch_size, cfg.block_size, device, resolve_dtype(cfg.dtype, device)
        )
        result = {"model": source, "data": where, "tokenizer": tokenizer.name, **metrics}
        table = format_table(result)
    if isinstance(cfg.json, str):
        write_text_atomic(cfg.json, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result) if cfg.json is True else table)
    return 0
