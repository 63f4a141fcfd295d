"""`nanogpt sample`: generate text from a training out_dir, GPT-2 weights or a local HF GPT-2 folder,
printed to the terminal token by token as it is generated.

    nanogpt sample --out_dir=out/shakespeare_char --start="ROMEO:" --num_samples=3
    nanogpt sample --init_from=gpt2 --start=FILE:prompt.txt --top_p=0.9
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from nanogpt.checkpoint import inference_source, load_for_inference
from nanogpt.device import DtypeName, autocast, check_dtype, resolve_device, resolve_dtype
from nanogpt.errors import NanoGPTError
from nanogpt.files import read_utf8
from nanogpt.generate import Sampling, decode_stream, generate_stream
from nanogpt.model import GPT
from nanogpt.options import parse_options
from nanogpt.processes import exits_on_sigterm
from nanogpt.quantization import check_quantize, quantized


@dataclass
class SampleConfig:
    init_from: str = "resume"  # "resume": the checkpoint in out_dir; or gpt2, gpt2-medium, ... or a HF folder, or a checkpoint (ours or nanoGPT's)
    meta: str = ""  # a nanoGPT checkpoint's meta.pkl; "": found as nanoGPT finds it, else GPT-2 BPE
    out_dir: str = "out"  # the training out_dir whose checkpoint init_from="resume" reads
    start: str = "\n"  # the prompt, or "FILE:path" to read it from a file
    num_samples: int = 10  # samples drawn, one after another
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 1.0: the model's own distribution, < 1 sharper, 0 greedy
    top_k: int | None = 200  # sample from the k likeliest tokens only
    top_p: float | None = None  # nucleus sampling: the smallest set of tokens whose probability reaches p
    seed: int = 1337  # the sampling generator's seed: the same seed gives the same samples
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    dtype: DtypeName = "float32"  # float32, bfloat16 / float16 through torch.autocast, or auto (as training)
    compile: bool = False  # torch.compile the model (pays off for long or many samples on a GPU)
    quantize: str = "none"  # int8: int8 Linear weights and inputs, on the CPU (nanogpt/quantization.py)
    stop_at_eot: bool = True  # end a sample at the end-of-text token (GPT-2's <|endoftext|>), if any

    def __post_init__(self):
        check_dtype(self.dtype)
        check_quantize(self.quantize, self.dtype, self.compile)
        if self.num_samples < 1 or self.max_new_tokens < 0:
            raise NanoGPTError(
                f"num_samples must be >= 1 and max_new_tokens >= 0, got {self.num_samples}, {self.max_new_tokens}"
            )
        Sampling(self.temperature, self.top_k, self.top_p)  # checks them (SamplingError names the option)
        if not 0 <= self.seed < 2**64:
            raise NanoGPTError(f"seed must be in [0, 2**64), got {self.seed}")


def check_finite(model: GPT, source: str) -> None:
    """Refuse a model whose weights hold NaN or inf: every draw from it would fail, or be noise."""
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise NanoGPTError(
                f"{source}: weight {name} holds NaN or inf values (a training run that diverged, or a damaged "
                "file): sample from an earlier checkpoint"
            )


def read_prompt(start: str) -> str:
    if not start.startswith("FILE:"):
        return start
    return read_utf8(start[len("FILE:") :], "prompt file (--start=FILE:path)")


def encode_prompt(text: str, tokenizer: Any, block_size: int) -> list[int]:
    """The prompt's token ids: at least one (the end-of-text token stands in for an empty prompt) and at
    most block_size (the last ones: the model cannot see further back)."""
    ids = tokenizer.encode(text)  # a char tokenizer names a character it lacks and where it is
    if not ids:
        if tokenizer.eot is None:
            raise NanoGPTError("the prompt is empty: give at least one character with --start")
        ids = [tokenizer.eot]
    if len(ids) > block_size:
        print(
            f"note: the prompt is {len(ids)} tokens, longer than the model's block_size {block_size}: "
            f"keeping its last {block_size} tokens",
            file=sys.stderr,
        )
        ids = ids[-block_size:]
    return ids


def stream_text(
    model: GPT, tokenizer: Any, prompt_ids: list[int], cfg: SampleConfig, generator: torch.Generator
) -> Iterator[str]:
    """Yield one sample's new text piece by piece as its tokens are generated (never half a character)."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, tokenizer.vocab_size)  # only ids with text
    steps = generate_stream(model, idx, cfg.max_new_tokens, sampling, generator=generator)
    yield from decode_stream(tokenizer, (int(t) for t in steps), tokenizer.eot if cfg.stop_at_eot else None)


def sample(cfg: SampleConfig, out: TextIO | None = None) -> list[str]:
    """Write cfg.num_samples samples (prompt + continuation) to `out` (default stdout) as they are
    generated; return the continuations."""
    out = out or sys.stdout
    device = resolve_device(cfg.device)
    source = inference_source(cfg.init_from, cfg.out_dir)
    model, tokenizer = load_for_inference(source, device, cfg.compile, cfg.meta)
    check_finite(model, source)
    model = quantized(model, cfg.quantize)
    prompt_ids = encode_prompt(read_prompt(cfg.start), tokenizer, model.config.block_size)
    prompt = tokenizer.decode(prompt_ids)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    samples = []
    with autocast(device, resolve_dtype(cfg.dtype, device)):
        for _ in range(cfg.num_samples):
            out.write(prompt)
            pieces = []
            for piece in stream_text(model, tokenizer, prompt_ids, cfg, generator):
                out.write(piece)
                out.flush()
                pieces.append(piece)
            out.write("\n---------------\n")
            samples.append("".join(pieces))
    return samples


@exits_on_sigterm
def main(argv: list[str]) -> int:
    cfg = parse_options(SampleConfig, argv, "usage: nanogpt sample [--key=value ...]")
    if cfg is not None:
        sample(cfg)
    return 0
