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
    CKPT_NAME,
    checkpoint_path,
    inference_source,
    is_hf_source,
    load_model,
    peek_checkpoint,
    save_checkpoint,
)
from nanogpt.errors import NanoGPTError
from nanogpt.lora import has_lora, merge_lora
from nanogpt.model import GPT
from nanogpt.options import parse_options
from nanogpt.processes import exits_on_sigterm


@dataclass
class ExportConfig:
    init_from: str = "resume"  # "resume": the checkpoint in out_dir; or gpt2, ..., a HF folder, a checkpoint (ours or nanoGPT's)
    out_dir: str = "out"  # the training out_dir whose checkpoint init_from="resume" reads
    meta: str = ""  # a nanoGPT checkpoint's meta.pkl (see `nanogpt sample`)
    format: Literal["hf", "gguf", "ckpt"] = (
        "hf"  # hf: a transformers folder; gguf: one llama.cpp file; ckpt: ours
    )
    to: str = ""  # where to write: a folder (hf, ckpt) or a .gguf file
    dtype: str = ""  # the weights' dtype, float32 | float16 | bfloat16; "": gguf float16, hf float32 (ckpt: float32 only)


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
        "exported_from": str(source),  # marks it as an export: a later export may replace it
    }


def _source_folder(source: str) -> Path | None:
    """The folder the model is read from (a run's out_dir, a HF folder); None for a hub name."""
    if is_hf_source(source):
        return Path(source).resolve() if Path(source).is_dir() else None
    return checkpoint_path(source).parent.resolve()


def check_target(cfg: ExportConfig, source: str) -> Path:
    """--to, refused where writing it would replace what export did not write: the source's own folder or
    one holding it, a file where a folder goes, another run's ckpt.pt, a file that is not a GGUF."""
    if not cfg.to:
        raise NanoGPTError("give --to=PATH: the folder (hf, ckpt) or .gguf file to write")
    to = Path(cfg.to).resolve()
    folder = _source_folder(source)
    if cfg.format != "gguf" and folder is not None and (to == folder or folder.is_relative_to(to)):
        raise NanoGPTError(
            f"--to={cfg.to} is {'the source' if to == folder else 'a folder holding the source'} {folder}: "
            "give another folder"
        )
    if cfg.format == "hf":
        from nanogpt.hf import check_export_folder

        check_export_folder(to)
    elif cfg.format == "ckpt":
        if to.exists() and not to.is_dir():
            raise NanoGPTError(f"--to={cfg.to} is a file, not a folder: give a folder for the checkpoint")
        if (to / CKPT_NAME).is_file() and "exported_from" not in peek_checkpoint(to):
            raise NanoGPTError(
                f"--to={cfg.to} holds another run's {CKPT_NAME} (not an export): nothing is replaced; give a "
                "new folder"
            )
    elif to.is_dir() or (to.exists() and not _is_gguf(to)):
        what = "a folder" if to.is_dir() else "a file that is not GGUF"
        raise NanoGPTError(f"--to={cfg.to} is {what}: nothing is replaced; give a new .gguf path")
    return to


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def _save_merged(ckpt: dict[str, Any], to: Path) -> Path:
    """save_checkpoint into `to`; a failed save leaves no folder it made."""
    made = not to.exists()
    try:
        return save_checkpoint(ckpt, to)
    except BaseException:
        if made and to.is_dir() and not any(to.iterdir()):
            to.rmdir()
        raise


def export(cfg: ExportConfig) -> Path:
    """Write the model cfg names in cfg.format at cfg.to; returns what was written."""
    source = inference_source(cfg.init_from, cfg.out_dir)
    to = check_target(cfg, source)
    if cfg.format == "ckpt" and cfg.dtype not in ("", "float32"):
        raise NanoGPTError(f"--dtype={cfg.dtype}: a checkpoint of ours holds float32 weights (drop --dtype)")
    model, tokenizer = load_model(source, "cpu", cfg.meta)
    tokenizer = chat_tokenizer(source, tokenizer)  # a chat model's template travels into every format
    if has_lora(model):
        print("merging the LoRA adapters into their base")
        model = merge_lora(model)
    if cfg.format == "hf":
        from nanogpt.hf import export as hf_export

        return hf_export(model, to, tokenizer, cfg.dtype or "float32")
    if cfg.format == "ckpt":
        return _save_merged(inference_checkpoint(model, tokenizer, source), to)
    from nanogpt.gguf_export import write_gguf

    if model.config.gelu_approximate != "tanh":
        print(
            "note: this model uses exact GELU; llama.cpp's GPT-2 computes the tanh approximation, so its "
            "logits differ slightly (tests/test_export.py measures it)",
            file=sys.stderr,
        )
    return write_gguf(model, tokenizer, to, cfg.dtype or "float16", name=Path(source).name)


@exits_on_sigterm  # one line and 143, its temporary folder removed
def main(argv: list[str]) -> int:
    cfg = parse_options(
        ExportConfig, argv, "usage: nanogpt export --format=hf|gguf|ckpt --to=PATH [--key=value ...]"
    )
    if cfg is not None:
        print(f"wrote {export(cfg)}")
    return 0
