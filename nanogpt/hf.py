"""Hugging Face interop: GPT-2 weights in (from the hub or a local folder) and out (a folder that
`transformers.GPT2LMHeadModel.from_pretrained` loads). Needs the `hf` extra: transformers + safetensors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from nanogpt.data.bpe import write_hf_tokenizer
from nanogpt.data.tokenizers import GPT2_EOT
from nanogpt.errors import NanoGPTError
from nanogpt.files import (
    make_folder,
    normal_modes,
    remove_stale_folders,
    temporary_folder,
    write_text_atomic,
    writing,
)
from nanogpt.model import GPT, GPTConfig

PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# HF's GPT-2 uses Conv1D layers, whose weights are stored (in, out): these four are transposed
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF activation name -> nn.GELU(approximate=...)
GELU_OF_HF = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise NanoGPTError(
            "GPT-2 / Hugging Face interop needs transformers: pip install 'nanogpt[hf]'"
        ) from None
    return transformers


def read_complete_gpt2(name_or_path: str):
    """transformers' GPT2LMHeadModel with every tensor from the files: another architecture, or a tensor
    missing or misshapen (which transformers would fill with a random init and carry on), is refused."""
    transformers = _transformers()
    print(f"loading weights from pretrained gpt: {name_or_path}")
    try:
        model_type = transformers.AutoConfig.from_pretrained(name_or_path).model_type
        if model_type != "gpt2":
            raise NanoGPTError(
                f"{name_or_path} holds a {model_type!r} model, not GPT-2: only GPT-2 weights load"
            )
        hf_model, report = transformers.GPT2LMHeadModel.from_pretrained(
            name_or_path, output_loading_info=True
        )
    except (OSError, ValueError) as e:  # offline without a cached copy, a folder without weights, bad JSON
        if isinstance(e, NanoGPTError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NanoGPTError(
            f"could not load GPT-2 weights {name_or_path!r}: {first}. Hub names need the network once (then "
            "they are cached); a local folder needs config.json and model.safetensors"
        ) from None
    missing = [
        k
        for k in report["missing_keys"]
        if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))
    ]
    bad = missing or [k for k, *_ in report["mismatched_keys"]]
    if bad:
        raise NanoGPTError(
            f"{name_or_path} is not a complete GPT-2: {len(bad)} tensor(s) are missing from its files or have "
            f"another shape ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}); it would load as random weights"
        )
    return hf_model


def load_gpt2(name_or_path: str, override_args: dict | None = None) -> GPT:
    """Our GPT with the weights of a HF GPT-2: a hub name (PRETRAINED, needs the network once) or a
    local folder holding config.json + weights. Only dropout may be overridden."""
    override_args = dict(override_args or {})
    if set(override_args) - {"dropout"}:
        raise NanoGPTError(
            f"only 'dropout' can be overridden when loading GPT-2 weights, got {sorted(override_args)}: "
            "the other sizes are fixed by the weights"
        )
    if name_or_path not in PRETRAINED and not Path(name_or_path).is_dir():
        raise NanoGPTError(
            f"{name_or_path!r} is neither a GPT-2 name ({', '.join(PRETRAINED)}) nor a local folder "
            "with a Hugging Face GPT-2 (config.json + model.safetensors)"
        )
    hf_model = read_complete_gpt2(name_or_path)
    hf_cfg = hf_model.config
    if hf_cfg.activation_function not in GELU_OF_HF:
        raise NanoGPTError(
            f"unsupported activation_function {hf_cfg.activation_function!r} in {name_or_path}"
        )
    config = GPTConfig(
        block_size=hf_cfg.n_positions,
        vocab_size=hf_cfg.vocab_size,
        n_layer=hf_cfg.n_layer,
        n_head=hf_cfg.n_head,
        n_embd=hf_cfg.n_embd,
        bias=True,
        dropout=override_args.get("dropout", 0.0),
        gelu_approximate=GELU_OF_HF[hf_cfg.activation_function],
    )
    model = GPT(config)
    sd = model.state_dict()
    sd_hf = {
        k: v for k, v in hf_model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))
    }
    if set(sd) != set(sd_hf):
        raise NanoGPTError(
            f"{name_or_path}: parameter names differ from GPT-2's: missing {sorted(set(sd) - set(sd_hf))[:5]}, "
            f"unexpected {sorted(set(sd_hf) - set(sd))[:5]}"
        )
    with torch.no_grad():
        for k, v in sd_hf.items():
            sd[k].copy_(v.t() if k.endswith(TRANSPOSED) else v)
    return model


def require_gpt2(cfg: GPTConfig, what: str) -> None:
    """Refuse a model with options beyond GPT-2's (rotary positions, RMSNorm, ...) where `what` holds GPT-2's
    architecture only, naming them."""
    options = cfg.non_gpt2_options()
    if options:
        raise NanoGPTError(
            f"{what} holds GPT-2's architecture only, and this model has {', '.join(options)}: keep it as our "
            "checkpoint (nanogpt export --format=ckpt), or train it with GPT-2's options (the defaults)"
        )


def hf_config(cfg: GPTConfig, **extra):
    """The transformers.GPT2Config of a model with our config (extra: more GPT2Config fields)."""
    require_gpt2(cfg, "a Hugging Face GPT2LMHeadModel")
    transformers = _transformers()
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function="gelu_new" if cfg.gelu_approximate == "tanh" else "gelu",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        # GPT-2's <|endoftext|> where the vocabulary has it (a char model has none)
        bos_token_id=GPT2_EOT if cfg.vocab_size > GPT2_EOT else None,
        eos_token_id=GPT2_EOT if cfg.vocab_size > GPT2_EOT else None,
        **extra,
    )


EXPORT_MARK = "nanogpt_export.json"  # in every folder export() writes: what a later export may replace
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_export_folder(directory: Path) -> None:
    """Refuse a target that writing there would destroy: a file, or a folder holding anything but an earlier
    export of ours (EXPORT_MARK in it). A new or empty folder is fine."""
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise NanoGPTError(f"--to={directory} is a file, not a folder: give a folder for the HF export")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / EXPORT_MARK).is_file():
        raise NanoGPTError(
            f"--to={directory} holds files that are not an earlier `nanogpt export --format=hf` (no "
            f"{EXPORT_MARK}): nothing is deleted; give a new or empty folder"
        )


def unit_tokenizer(tokenizer: Any):
    """A `transformers.PreTrainedTokenizerFast` that gives the ids of a tokenizer of single units: characters
    (a vocabulary of the characters, no merges) or bytes (GPT-2's byte alphabet, no merges). Decoding joins
    the tokens' text as it is, spaces untouched. (A byte-level BPE's: nanogpt.data.bpe.hf_tokenizer.)"""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte -> printable character

    if tokenizer.name == "char":
        backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(tokenizer.chars)}, merges=[]))
        backend.decoder = decoders.Fuse()
    elif tokenizer.name == "byte":
        alphabet = bytes_to_unicode()
        backend = HFTokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
    else:
        raise NanoGPTError(f"no Hugging Face tokenizer for {tokenizer.name!r} tokens")
    return _transformers().PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False
    )


def _hf_model(model: GPT, tokenizer: Any, dtype: str):
    """transformers' GPT2LMHeadModel holding our weights, in `dtype`. A model without biases gets zero
    biases, which computes the same function."""
    cfg = model.config
    hf_cfg = hf_config(cfg)
    if tokenizer is not None and tokenizer.eot is not None:  # its <|endoftext|>, wherever its id is
        hf_cfg.bos_token_id = hf_cfg.eos_token_id = tokenizer.eot
    hf_model = _transformers().GPT2LMHeadModel(hf_cfg)
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for k, v in hf_model.state_dict().items():
            if k in ours:
                v.copy_(ours[k].t() if k.endswith(TRANSPOSED) else ours[k])
            elif k.endswith(".bias") and not cfg.bias:
                v.zero_()
    return hf_model.to(DTYPES[dtype])


def _write_folder(hf_model, tokenizer: Any, folder: Path) -> None:
    from safetensors import SafetensorError

    bars = _transformers().utils.logging
    shown = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()  # a bar for one shard, drawn even when the write fails
    try:
        hf_model.save_pretrained(folder, safe_serialization=True)
    except SafetensorError as e:  # a full disk, among others: writing() tells which
        raise RuntimeError(str(e)) from None
    finally:
        if shown:
            bars.enable_progress_bar()
    if tokenizer is not None and not write_hf_tokenizer(tokenizer, folder):  # not a BPE: characters or bytes
        unit_tokenizer(tokenizer).save_pretrained(str(folder))
    write_text_atomic(folder / EXPORT_MARK, json.dumps({"written_by": "nanogpt export --format=hf"}) + "\n")
    normal_modes(folder)


def _swap_in(new: Path, directory: Path) -> None:
    """Put the complete folder `new` where `directory` is (an earlier export, replaced whole)."""
    if not directory.exists():
        os.rename(new, directory)
        return
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    os.rename(directory, old)
    os.rename(new, directory)
    shutil.rmtree(old)


def export(model: GPT, directory: str | Path, tokenizer: Any = None, dtype: str = "float32") -> Path:
    """Write `model` as a HF GPT-2 folder: config.json + model.safetensors (weights in `dtype`), the
    tokenizer's files for `transformers.AutoTokenizer` (any of ours: characters, bytes, GPT-2, a trained
    BPE) and EXPORT_MARK. Written beside the target and swapped in whole; the target may only be new,
    empty, or an earlier export (check_export_folder)."""
    if dtype not in DTYPES:
        raise NanoGPTError(f"HF export dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    directory = Path(directory).resolve()  # ".": a name to put the temporary folder beside
    check_export_folder(directory)
    hf_model = _hf_model(model, tokenizer, dtype)
    make_folder(directory.parent)
    for kind in ("new", "old"):
        remove_stale_folders(directory, kind)
    tmp = temporary_folder(directory, "new")
    try:
        with writing(directory):
            _write_folder(hf_model, tokenizer, tmp)
            _swap_in(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
