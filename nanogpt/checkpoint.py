"""The checkpoint format: one file, out_dir/ckpt.pt, written atomically and read without running code.
(out_dir/resume.pt, the same format, holds a run stopped by a signal while ckpt.pt keeps its best model.)

A checkpoint is a dict (training_checkpoint writes it):
    model           state_dict (never with torch.compile's `_orig_mod.` prefix)
    model_args      GPTConfig fields
    tokenizer       the tokenizer's meta (a char vocabulary included), so sampling needs no data folder;
                    a chat-trained model's also holds its "chat_template" (nanogpt/chat/template.py)
    config          the training config it was made with
    iter_num, best_val_loss, train_time, elapsed_s
    optimizer, scaler, rng, loader   (training state for exact resume)
Everything in it is a tensor, number, string, list or dict: `torch.load(weights_only=True)` reads it.

Here too: the random generators' state (rng_state / restore_rng) and the models built from a checkpoint,
for fine-tuning (base_model) and for inference (load_model, load_for_inference).
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanogpt.data.tokenizers import get_tokenizer, tokenizer_from_meta
from nanogpt.device import device_type
from nanogpt.errors import NanoGPTError
from nanogpt.files import atomic_open
from nanogpt.from_nanogpt import is_nanogpt_checkpoint, nanogpt_tokenizer
from nanogpt.hf import PRETRAINED
from nanogpt.lora import adapt_base, merge_lora
from nanogpt.model import GPT, GPTConfig
from nanogpt.perf import compile_options

CKPT_NAME = "ckpt.pt"
# a run that keeps only its best model in ckpt.pt (always_save_checkpoint=false) saves its state here
# when a signal stops it, for init_from=resume; removed once ckpt.pt is newer or the run completes
RESUME_NAME = "resume.pt"


def checkpoint_path(path: str | Path) -> Path:
    """An out_dir or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return path / CKPT_NAME if path.is_dir() else path


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `_orig_mod.` prefix that a torch.compile'd module adds to every key, and the causal
    mask that nanoGPT saves as `attn.bias` where torch has no flash attention (ours is not saved)."""
    return {k.replace("_orig_mod.", ""): v for k, v in state_dict.items() if not k.endswith(".attn.bias")}


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
        out_dir = file.parent if file.name in (CKPT_NAME, RESUME_NAME) else file
        raise NanoGPTError(
            f"no checkpoint at {file}: train one with `nanogpt train PRESET --out_dir={out_dir}`"
        )
    ckpt = _safe_load(file, map_location=map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise NanoGPTError(f"{file} is not a nanogpt checkpoint (no 'model' / 'model_args')")
    return ckpt


def peek_checkpoint(source: str | Path) -> dict[str, Any]:
    """A checkpoint's entries without reading its weights (memory-mapped: tensors stay on disk until
    used): for its config or tokenizer. {} for a file that holds no dict."""
    ckpt = _safe_load(checkpoint_path(source), map_location="cpu", mmap=True)
    return ckpt if isinstance(ckpt, dict) else {}


def _safe_load(file: Path, **options: Any) -> Any:
    """torch.load(weights_only=True) of file, every failure one line that never suggests loading unsafely."""
    try:
        return torch.load(file, weights_only=True, **options)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a refused class: bytes that are no valid pickle
            lines = [line.strip() for line in str(e).splitlines()]
            reason = next((line for line in lines if line.startswith("Unsupported")), "not a pickle")
            raise NanoGPTError(
                f"checkpoint {file} is damaged or not a nanogpt checkpoint ({reason})"
            ) from None
        # torch's own text for a refusal invites weights_only=False: never do that
        raise NanoGPTError(
            f"{file} holds objects other than tensors and plain data: refused, loading it could run code "
            "(a nanogpt checkpoint never does)"
        ) from None
    except Exception as e:  # a damaged pickle fails in many ways (IndexError, KeyError, EOFError, ...)
        reason = f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__}, {file.stat().st_size} bytes"
        raise NanoGPTError(f"checkpoint {file} is damaged or not a nanogpt checkpoint ({reason})") from None


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
    train_time: float,
    elapsed_s: float,
) -> dict[str, Any]:
    """The dict a training run saves: everything that decides its next steps (rng: one state per rank;
    loader: the batch stream's position before the batch not yet trained on), the seconds spent in
    optimizer steps so far (a run stopped and continued reports its whole training time) and the wall
    seconds so far (a resumed run's clock and time budget go on from there)."""
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
        "train_time": train_time,
        "elapsed_s": elapsed_s,
    }


def model_from_checkpoint(ckpt: dict[str, Any], **overrides: Any) -> GPT:
    """The checkpoint's model (a LoRA run's: its base with its adapters); overrides change GPTConfig
    fields that do not shape weights (dropout)."""
    if ckpt.get("lora"):
        source = ckpt["lora"]["base"]
        if not is_hf_source(source) and not checkpoint_path(source).is_file():
            raise NanoGPTError(
                f"this LoRA run's base model {source!r} is gone (its adapters need the base they were trained "
                "on): put that checkpoint back there (its weights are checked by hash), or train the adapters again"
            )
        base = base_model(source, ckpt["model_args"]["block_size"], **overrides)
        return adapt_base(base, ckpt["lora"], ckpt["model"])
    try:
        model = GPT(GPTConfig(**{**ckpt["model_args"], **overrides}))
    except TypeError as e:  # a key GPTConfig does not have
        raise NanoGPTError(f"not a nanogpt checkpoint (model_args: {e})") from None
    try:
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    except (RuntimeError, AttributeError) as e:  # a missing, unexpected or misshapen tensor
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), type(e).__name__)
        raise NanoGPTError(
            f"not a nanogpt checkpoint (its weights do not fit its model_args: {first})"
        ) from None
    return model


def is_hf_source(source: str | Path) -> bool:
    """A GPT-2 name or a local HF GPT-2 folder (weights beside config.json: a training out_dir has a
    config.json too, its training config)."""
    path = Path(source)
    hf_weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return str(source) in PRETRAINED or (
        (path / "config.json").is_file() and any((path / w).is_file() for w in hf_weights)
    )


def base_model(source: str, block_size: int = 0, **overrides: Any) -> GPT:
    """The model a fine-tuning run starts from: GPT-2 weights (a name or a local HF folder) or a
    checkpoint (ours, a LoRA one merged, or nanoGPT's), cropped to block_size if that is shorter."""
    if is_hf_source(source):
        model = GPT.from_pretrained(str(source), overrides)
    else:
        model = merge_lora(model_from_checkpoint(load_checkpoint(source), **overrides))
    if 0 < block_size < model.config.block_size:
        model.crop_block_size(block_size)  # model surgery: a shorter context
    return model


def training_config(source: str | Path) -> dict[str, Any]:
    """The training config a checkpoint was made with ({} if it has none), its weights left on disk."""
    return peek_checkpoint(source).get("config") or {}


def rng_state(device: str) -> dict[str, Any]:
    """Python's, numpy's, torch's and CUDA's generator states as lists and tensors (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device_type(device) == "cuda" else None,
    }


def restore_rng(state: dict[str, Any], device: str) -> None:
    """Continue the generators where rng_state(device) left them."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device_type(device) == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def load_model(source: str | Path, device: str | torch.device = "cpu", meta: str = "") -> tuple[GPT, Any]:
    """A model and its tokenizer from a training out_dir / checkpoint file (ours, a LoRA run's: base +
    adapters, or karpathy/nanoGPT's: `meta` is its dataset's meta.pkl, found as nanoGPT does if not
    given), a GPT-2 name or a local HF GPT-2 folder (GPT-2 BPE tokenizer). The model is in eval mode on
    `device`."""
    if is_hf_source(source):
        _refuse_meta(meta, source)
        model = GPT.from_pretrained(str(source))
        tokenizer = get_tokenizer("gpt2")
    else:
        ckpt = load_checkpoint(source, map_location="cpu")
        model = model_from_checkpoint(ckpt)
        if is_nanogpt_checkpoint(ckpt):
            tokenizer = nanogpt_tokenizer(ckpt, checkpoint_path(source), model.config.vocab_size, meta)
        else:
            _refuse_meta(meta, source)
            tokenizer = tokenizer_from_meta(ckpt["tokenizer"])
    if tokenizer.vocab_size > model.config.vocab_size:
        raise NanoGPTError(
            f"{source}: its tokenizer ({tokenizer.name}, {tokenizer.vocab_size} tokens) has ids the model's "
            f"vocabulary of {model.config.vocab_size} cannot read (a folder whose tokenizer does not match its "
            "weights)"
        )
    return model.to(device).eval(), tokenizer


def describe_tokenizer(tokenizer: dict) -> str:
    """A tokenizer's meta (as checkpoints and meta.json hold it) in a few words: kind and vocabulary size."""
    try:
        size = tokenizer_from_meta(tokenizer).vocab_size
    except (NanoGPTError, KeyError, TypeError, ValueError):  # a damaged or foreign meta still gets named
        size = "?"
    return f"{tokenizer.get('name', '?')}, {size} tokens"


def model_source(init_from: str, out_dir: str) -> str:
    """What an inference command loads: out_dir's checkpoint for init_from="resume", else init_from."""
    return out_dir if init_from == "resume" else init_from


def inference_source(init_from: str, out_dir: str) -> str:
    """model_source, refusing an --out_dir that would not be read (init_from names the model)."""
    if init_from != "resume" and out_dir not in ("out", ""):  # "out": the default, "": none
        raise NanoGPTError(
            f"--out_dir={out_dir} and --init_from={init_from} both name the model: give one (--init_from=resume "
            "reads --out_dir)"
        )
    return model_source(init_from, out_dir)


def _refuse_meta(meta: str, source: str | Path) -> None:
    if meta:
        raise NanoGPTError(
            f"--meta={meta} is read only with a karpathy/nanoGPT checkpoint, and {source} carries its own "
            "tokenizer: drop --meta"
        )


def load_for_inference(source: str, device: str, compile: bool, meta: str = "") -> tuple[GPT, Any]:
    """(model, tokenizer) in eval mode on `device`, compiled in place if asked (so every method that
    calls the model, and the decoding engine, use the compiled forward). meta: a nanoGPT meta.pkl."""
    model, tokenizer = load_model(source, device, meta)
    if compile:
        model.compile(options=compile_options(device))
    return model, tokenizer
