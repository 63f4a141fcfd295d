"""`nanogpt export`: a trained model in another format, LoRA adapters merged into their base.

    nanogpt export --out_dir=out/ft --format=gguf --to=model.gguf --dtype=float16   # llama.cpp, Ollama
    nanogpt export --out_dir=out/ft --format=hf --to=hf_model        # transformers.from_pretrained
    nanogpt export --out_dir=out/lora --format=ckpt --to=out/merged  # our checkpoint, adapters merged
    nanogpt export --init_from=../nanoGPT/out-shakespeare-char --format=ckpt --to=out/imported

hf and ckpt take any model; gguf a GPT-2-shaped one with a byte-level BPE tokenizer (nanogpt/gguf_export.py).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from nanogpt.chat.template import chat_tokenizer
from nanogpt.checkpoint import (
    checkpoint_path,
    is_hf_source,
    load_model,
    model_source,
    peek_checkpoint,
    save_checkpoint,
)
from nanogpt.errors import NanoGPTError
from nanogpt.lora import has_lora, merge_lora
from nanogpt.model import GPT
from nanogpt.options import parse_options


@dataclass
class ExportConfig:
    init_from: str = "resume"  # "resume": the checkpoint in out_dir; or gpt2, ..., a HF folder, a checkpoint (ours or nanoGPT's)
    out_dir: str = "out"
    meta: str = ""  # a nanoGPT checkpoint's meta.pkl (see `nanogpt sample`)
    format: Literal["hf", "gguf", "ckpt"] = (
        "hf"  # hf: a transformers folder; gguf: one llama.cpp file; ckpt: ours
    )
    to: str = ""  # where to write: a folder (hf, ckpt) or a .gguf file
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"  # gguf only: the matrices' dtype


def inference_checkpoint(model: GPT, tokenizer: Any, source: str) -> dict[str, Any]:
    """An inference checkpoint of ours (no optimizer state: fine-tune from it, do not resume it): the
    model, its tokenizer, and the training config / iteration of the source checkpoint if it has them."""
    ckpt = {} if is_hf_source(source) else peek_checkpoint(source)  # its weights are in `model` already
    return {
        "model": model.state_dict(),
        "model_args": asdict(model.config),
        "tokenizer": tokenizer.to_meta(),
        "config": ckpt.get("config") or {},
        "iter_num": ckpt.get("iter_num", 0),
        "best_val_loss": float(ckpt.get("best_val_loss", float("inf"))),
    }


def export(cfg: ExportConfig) -> Path:
    """Write the model cfg names in cfg.format at cfg.to; returns what was written."""
    if not cfg.to:
        raise NanoGPTError("give --to=PATH: the folder (hf, ckpt) or .gguf file to write")
    source = model_source(cfg.init_from, cfg.out_dir)
    model, tokenizer = load_model(source, "cpu", cfg.meta)
    tokenizer = chat_tokenizer(source, tokenizer)  # a chat model's template travels into every format
    if has_lora(model):
        print("merging the LoRA adapters into their base")
        model = merge_lora(model)
    if cfg.format == "hf":
        from nanogpt.hf import export as hf_export

        return hf_export(model, cfg.to, tokenizer)
    if cfg.format == "ckpt":
        if Path(cfg.to).resolve() == checkpoint_path(source).parent.resolve():
            raise NanoGPTError(f"--to={cfg.to} is the source's own folder: give another one")
        return save_checkpoint(inference_checkpoint(model, tokenizer, source), cfg.to)
    from nanogpt.gguf_export import write_gguf

    if model.config.gelu_approximate != "tanh":
        print(
            "note: this model uses exact GELU; llama.cpp's GPT-2 computes the tanh approximation, so its "
            "logits differ slightly (tests/test_export.py measures it)",
            file=sys.stderr,
        )
    return write_gguf(model, tokenizer, cfg.to, cfg.dtype, name=Path(source).name)


def main(argv: list[str]) -> int:
    cfg = parse_options(
        ExportConfig, argv, "usage: nanogpt export --format=hf|gguf|ckpt --to=PATH [--key=value ...]"
    )
    if cfg is not None:
        print(f"wrote {export(cfg)}")
    return 0
