"""A GPT-2-shaped model and its byte-level BPE tokenizer as one GGUF file, the format of llama.cpp, Ollama
and LM Studio (their `gpt2` architecture), written with the `gguf` package (the `gguf` extra).

Tensor names and layout follow llama.cpp's convert_hf_to_gguf.py for GPT-2: weights as nn.Linear stores
them, (out, in) (HF's Conv1D matrices are transposed there; ours already are), LayerNorm gains and all
biases in float32, matrices in the chosen dtype, lm_head written as `output.weight` (tied to wte). The
vocabulary is the tokenizer's tokens in GPT-2's byte-to-unicode spelling with its merges; the padding
ids of a padded vocabulary (GPT-2's 50257 -> 50304) are [PAD<id>] tokens marked unused, as llama.cpp's
converter writes them.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanogpt.errors import NanoGPTError
from nanogpt.files import atomic_open
from nanogpt.hf import require_gpt2
from nanogpt.model import GPT, GPTConfig

DTYPES = ("float32", "float16", "bfloat16", "q8_0")
# llama.cpp's pre-tokenizer of each of our split patterns. "llama-bpe" is LLaMA 3's split, GPT-4's
# (cl100k) without its `\s++$` branch: the two differ only on whitespace that ends the text and holds a
# newline before a space or tab ("a\n " is "a", "\n " to us and "a", "\n", " " to llama.cpp).
PRE_TOKENIZER = {"gpt2": "gpt-2", "gpt4": "llama-bpe"}
# our parameter name in a block -> llama.cpp's
BLOCK_TENSORS = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise NanoGPTError("GGUF export needs the gguf package: pip install 'nanogpt[gguf]'") from None
    return gguf


def gguf_names(cfg: GPTConfig) -> dict[str, str]:
    """Our state-dict name -> the GGUF tensor name, for every tensor llama.cpp's GPT-2 reads."""
    names = {
        "transformer.wte.weight": "token_embd.weight",
        "transformer.wpe.weight": "position_embd.weight",
        "transformer.ln_f.weight": "output_norm.weight",
        "transformer.ln_f.bias": "output_norm.bias",
        "lm_head.weight": "output.weight",
    }
    for i in range(cfg.n_layer):
        for ours, theirs in BLOCK_TENSORS.items():
            for kind in ("weight", "bias"):
                names[f"transformer.h.{i}.{ours}.{kind}"] = f"blk.{i}.{theirs}.{kind}"
    return names


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The GGUF name -> float32 tensor of every weight; a model without biases gets zero biases (the same
    function: llama.cpp's GPT-2 requires them)."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {}
    for ours, theirs in gguf_names(model.config).items():
        if ours in state:
            out[theirs] = state[ours]
        elif ours.endswith(".bias"):
            weight = state[ours.removesuffix(".bias") + ".weight"]
            out[theirs] = torch.zeros(weight.shape[0])
        else:
            raise NanoGPTError(f"the model has no {ours}: not a GPT-2-shaped model")
    return out


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types) of a byte-level BPE, padded with unused [PAD<id>] up to vocab_size."""
    if tokenizer.name not in ("gpt2", "bpe"):
        raise NanoGPTError(
            f"GGUF export needs a byte-level BPE tokenizer (GPT-2's or a trained one); this model uses "
            f"{tokenizer.name!r} tokens, which llama.cpp cannot read: export it with --format=hf or --format=ckpt"
        )
    pattern = _pattern_name(tokenizer)
    if pattern not in PRE_TOKENIZER:
        raise NanoGPTError(
            f"the tokenizer splits text with the {pattern!r} pattern, for which no llama.cpp pre-tokenizer is "
            f"checked here (only {', '.join(PRE_TOKENIZER)}): export it with --format=hf or --format=ckpt"
        )
    from nanogpt.data.bpe import hf_tokenizer

    hf = json.loads(hf_tokenizer(tokenizer).backend_tokenizer.to_str())
    by_id = {i: t for t, i in hf["model"]["vocab"].items()}
    by_id.update({t["id"]: t["content"] for t in hf["added_tokens"]})
    gguf = _gguf()
    special = {t["id"] for t in hf["added_tokens"]}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        kind = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
        types.append(int(kind if i in by_id else gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in hf["model"]["merges"]]
    return tokens, merges, types


def _pattern_name(tokenizer: Any) -> str:
    from nanogpt.data.tokenizers import PATTERNS

    pattern = getattr(tokenizer, "pattern", PATTERNS["gpt2"])
    return next((name for name, p in PATTERNS.items() if p == pattern), "custom")


def _tensor_data(gguf: Any, name: str, t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw dtype or None) of one tensor: vectors stay float32 as llama.cpp's converter keeps them."""
    if t.dim() == 1 or dtype == "float32":
        return t.numpy().astype(np.float32), None
    if dtype == "q8_0":
        return _q8_0(gguf, name, t.numpy().astype(np.float32))
    if dtype == "float16":
        return t.numpy().astype(np.float16), None
    data = gguf.quants.quantize(t.numpy().astype(np.float32), gguf.GGMLQuantizationType.BF16)
    return data, gguf.GGMLQuantizationType.BF16


def _q8_0(gguf: Any, name: str, data: np.ndarray) -> tuple[np.ndarray, Any]:
    """Q8_0 (each run of 32 values of a row as int8 times one float16 scale, max |value| / 127), as
    llama.cpp's converter writes it: position embeddings stay float32, and a matrix whose rows are not a
    multiple of 32 long falls back to float16."""
    if name == "position_embd.weight":
        return data, None
    try:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    except gguf.QuantError:
        return data.astype(np.float16), None


def write_gguf(model: GPT, tokenizer: Any, path: str | Path, dtype: str = "float16", name: str = "") -> Path:
    """Write model + tokenizer as a GGUF file at `path`, atomically."""
    if dtype not in DTYPES:
        raise NanoGPTError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg = model.config
    require_gpt2(cfg, "GGUF's gpt2 architecture")
    vocab = vocabulary(tokenizer, cfg.vocab_size)  # (tokens, merges, types); refused before any file is made
    gguf = _gguf()
    path = Path(path)
    # the writer opens the file by name: it writes atomic_open's temporary, which is renamed on success
    with atomic_open(path, "wb", durable=True) as f:
        writer = gguf.GGUFWriter(f.name, arch="gpt2")
        try:
            _write_into(writer, gguf, model, tokenizer, vocab, name or path.stem, dtype)
            writer.close()
        except BaseException:
            with contextlib.suppress(Exception):  # a full disk fails the flush too; the file is closed anyway
                writer.close()
            raise
    return path


def _write_into(
    writer: Any, gguf: Any, model: GPT, tokenizer: Any, vocab: tuple, name: str, dtype: str
) -> None:
    cfg = model.config
    tokens, merges, types = vocab
    file_type = {
        "float32": "ALL_F32",
        "float16": "MOSTLY_F16",
        "bfloat16": "MOSTLY_BF16",
        "q8_0": "MOSTLY_Q8_0",
    }[dtype]
    writer.add_name(name)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(1e-5)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER[_pattern_name(tokenizer)])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.eot is not None:
        writer.add_bos_token_id(tokenizer.eot)
        writer.add_eos_token_id(tokenizer.eot)
    for tensor_name, t in gguf_tensors(model).items():
        data, raw_dtype = _tensor_data(gguf, tensor_name, t, dtype)
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
