"""The model a training run starts from, as its config says: a new one (scratch), GPT-2's weights
(fine-tuning), or its own checkpoint's (resume). `nanogpt bench` builds its model the same way."""

from __future__ import annotations

from typing import Any

from nanogpt.checkpoint import model_from_checkpoint
from nanogpt.errors import NanoGPTError
from nanogpt.model import ARCHITECTURE, GPT, GPTConfig, padded_vocab_size
from nanogpt.train.config import TrainConfig


def model_vocab_size(meta: dict) -> int:
    """The dataset's vocabulary; GPT-2's BPE padded to a multiple of 64 as nanoGPT does (50257 -> 50304)."""
    vocab_size = int(meta["vocab_size"])
    return padded_vocab_size(vocab_size) if meta["tokenizer"]["name"] == "gpt2" else vocab_size


def init_model(cfg: TrainConfig, meta: dict, ckpt: dict[str, Any] | None) -> GPT:
    """A new model (scratch), the checkpoint's (resume: its shapes win over cfg's) or GPT-2's (cropped to
    cfg.block_size if that is shorter). Dropout always comes from cfg."""
    if ckpt is not None:
        print(f"resuming training from {cfg.out_dir} at iteration {ckpt['iter_num']}")
        model = model_from_checkpoint(ckpt, dropout=cfg.dropout)
    elif cfg.init_from == "scratch":
        print("initializing a new model from scratch")
        model = GPT(
            GPTConfig(
                block_size=cfg.block_size,
                vocab_size=model_vocab_size(meta),
                n_layer=cfg.n_layer,
                n_head=cfg.n_head,
                n_embd=cfg.n_embd,
                dropout=cfg.dropout,
                bias=cfg.bias,
                rope_base=cfg.rope_base,
                zero_init_proj=cfg.zero_init_proj,
                **{k: getattr(cfg, k) for k in ARCHITECTURE},
            )
        )
    else:
        check_gpt2_options(cfg)
        print(f"initializing from OpenAI GPT-2 weights: {cfg.init_from}")
        model = GPT.from_pretrained(cfg.init_from, dict(dropout=cfg.dropout))
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)  # model surgery: a shorter context
    if meta["vocab_size"] > model.config.vocab_size:
        raise NanoGPTError(
            f"the dataset's vocabulary ({meta['vocab_size']} tokens) does not fit the model's "
            f"({model.config.vocab_size}): init_from={cfg.init_from!r} does not match dataset={cfg.dataset!r}"
        )
    return model


def check_gpt2_options(cfg: TrainConfig) -> None:
    """GPT-2 weights are GPT-2's architecture: model options beyond it in cfg cannot apply to them."""
    asked = GPTConfig(**{k: getattr(cfg, k) for k in ARCHITECTURE}).non_gpt2_options()
    if asked:  # init_from names GPT-2 weights here
        raise NanoGPTError(
            f"init_from={cfg.init_from!r} loads GPT-2's architecture, which has none of {', '.join(asked)}: "
            "leave those options out (or train from scratch)"
        )
