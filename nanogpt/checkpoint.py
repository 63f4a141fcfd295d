"""The checkpoint format: one file, out_dir/ckpt.pt, written atomically and read without running code.
(out_dir/resume.pt, the same format, holds a run stopped by a signal while ckpt.pt keeps its best model.)

A checkpoint is a dict (training_checkpoint writes it):
    model           state_dict (never with torch.compile's `_orig_mod.` prefix)
    model_args      GPTConfig fields
    tokenizer       the tokenizer's meta (a char vocabulary included), so sampling needs no data folder
    config          the training config it was made with
    iter_num, best_val_loss
    optimizer, scaler, rng, loader   (training state for exact resume)
Everything in it is a tensor, number, string, list or dict: `torch.load(weights_only=True)` reads it.

Here too: the random generators' state (rng_state / restore_rng) and the models built from a checkpoint,
for training on (resume_model) and for inference (load_model, load_for_inference).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanogpt.errors import NanoGPTError
from nanogpt.files import atomic_open
from nanogpt.model import GPT, GPTConfig

CKPT_NAME = "ckpt.pt"
# a run that keeps only its best model in ckpt.pt (always_save_checkpoint=false) saves its state here
# when a signal stops it, for init_from=resume; removed once ckpt.pt is newer or the run completes
RESUME_NAME = "resume.pt"


def checkpoint_path(path: str | Path) -> Path:
    """An out_dir or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return path / CKPT_NAME if path.is_dir() else path


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `_orig_mod.` prefix that a torch.compile'd module adds to every key."""
    return {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}


def resume_path(out_dir: str | Path) -> Path:
    """The checkpoint init_from=resume continues from: a stopped run's resume.pt, else ckpt.pt."""
    resume = Path(out_dir) / RESUME_NAME
    return resume if resume.is_file() else Path(out_dir) / CKPT_NAME


def save_checkpoint(ckpt: dict[str, Any], out_dir: str | Path, name: str = CKPT_NAME) -> Path:
    """Write ckpt to out_dir/name atomically and durably (nanogpt.files): a crash or kill -9 at any
    moment leaves either the old or the new checkpoint, never a broken one. A new ckpt.pt supersedes a
    stopped run's resume.pt, which is removed."""
    path = Path(out_dir) / name
    with atomic_open(path, "wb", durable=True) as f:
        torch.save(ckpt, f)
    if name == CKPT_NAME:
        discard_resume(out_dir)
    return path


def discard_resume(out_dir: str | Path) -> None:
    """Remove a stopped run's resume.pt: a newer ckpt.pt or the completed run supersedes it."""
    (Path(out_dir) / RESUME_NAME).unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (an out_dir or the file itself) with weights_only=True: no code runs."""
    file = checkpoint_path(path)
    if not file.is_file():
        raise NanoGPTError(f"no checkpoint at {file}: train one with `nanogpt train --out_dir={Path(path)}`")
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # a damaged pickle fails in many ways (IndexError, KeyError, EOFError, ...)
        raise NanoGPTError(f"checkpoint {file} is damaged or not a nanogpt checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise NanoGPTError(f"{file} is not a nanogpt checkpoint (no 'model' / 'model_args')")
    return ckpt


def training_checkpoint(
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scaler: dict[str, Any],
    model_args: dict[str, Any],
    iter_num: int,
    best_val_loss: float,
    config: dict[str, Any],
    tokenizer: dict[str, Any],
    rng: list[dict[str, Any]],
    loader: dict[str, Any],
) -> dict[str, Any]:
    """The dict a training run saves: everything that decides its next steps (rng: one state per rank;
    loader: the batch stream's position before the batch not yet trained on)."""
    return {
        "model": clean_state_dict(model),
        "optimizer": optimizer,
        "scaler": scaler,
        "model_args": model_args,
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "config": config,
        "tokenizer": tokenizer,
        "rng": rng,
        "loader": loader,
    }


def model_from_checkpoint(ckpt: dict[str, Any], **overrides: Any) -> GPT:
    """The checkpoint's model; overrides change GPTConfig fields that do not shape weights (dropout)."""
    model = GPT(GPTConfig(**{**ckpt["model_args"], **overrides}))
    model.load_state_dict(clean_state_dict(ckpt["model"]))
    return model


def training_config(source: str | Path) -> dict[str, Any]:
    """The training config a checkpoint was made with ({} if it has none), read without loading its
    weights (memory-mapped)."""
    file = checkpoint_path(source)
    try:
        ckpt = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # as load_checkpoint
        raise NanoGPTError(f"checkpoint {file} is damaged or not a nanogpt checkpoint ({e})") from None
    return ckpt.get("config") or {} if isinstance(ckpt, dict) else {}


def rng_state(device: str) -> dict[str, Any]:
    """Python's, numpy's, torch's and CUDA's generator states as lists and tensors (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None,
    }


def restore_rng(state: dict[str, Any], device: str) -> None:
    """Continue the generators where rng_state(device) left them."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def load_model(source: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Any]:
    """A model and its tokenizer from a training out_dir / checkpoint file, a GPT-2 name or a local HF
    GPT-2 folder (GPT-2 BPE tokenizer). The model is in eval mode on `device`."""
    from nanogpt.data.tokenizers import get_tokenizer, tokenizer_from_meta
    from nanogpt.hf import PRETRAINED

    source_path = Path(source)
    # HF weights beside config.json: a training out_dir has a config.json too (its training config)
    hf_weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    is_hf_folder = (source_path / "config.json").is_file() and any(
        (source_path / w).is_file() for w in hf_weights
    )
    if str(source) in PRETRAINED or is_hf_folder:
        model = GPT.from_pretrained(str(source))
        tokenizer = get_tokenizer("gpt2")
    else:
        ckpt = load_checkpoint(source_path, map_location="cpu")
        model = model_from_checkpoint(ckpt)
        meta = ckpt.get("tokenizer")
        tokenizer = tokenizer_from_meta(meta) if meta else get_tokenizer("gpt2")
    return model.to(device).eval(), tokenizer


def model_source(init_from: str, out_dir: str) -> str:
    """What an inference command loads: out_dir's checkpoint for init_from="resume", else init_from."""
    return out_dir if init_from == "resume" else init_from


def load_for_inference(source: str, device: str, compile: bool) -> tuple[GPT, Any]:
    """(model, tokenizer) in eval mode on `device`, compiled in place if asked (so every method that
    calls the model, and the decoding engine, use the compiled forward)."""
    from nanogpt.perf import compile_options

    model, tokenizer = load_model(source, device)
    if compile:
        model.compile(options=compile_options(device))
    return model, tokenizer
