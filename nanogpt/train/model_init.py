"""The model a training run starts from, as its config says: a new one (scratch), GPT-2's weights
(fine-tuning), or its own checkpoint's (resume). `nanogpt bench` builds its model the same way."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nanogpt.checkpoint import (
    base_model,
    describe_tokenizer,
    is_hf_source,
    model_from_checkpoint,
    peek_checkpoint,
)
from nanogpt.data.tokenizers import GPT2_VOCAB_SIZE
from nanogpt.errors import NanoGPTError
from nanogpt.lora import LoRAConfig, apply_lora, lora_entry, weights_sha256
from nanogpt.model import ARCHITECTURE, GPT, GPTConfig, padded_vocab_size
from nanogpt.options import set_fields
from nanogpt.train.config import TrainConfig

# the model's shape as a TrainConfig spells it (dropout is not shape: it may change on resume)
SHAPE_KEYS = tuple(
    f.name
    for f in dataclasses.fields(GPTConfig)
    if f.name in {g.name for g in dataclasses.fields(TrainConfig)} and f.name != "dropout"
)


def model_vocab_size(meta: dict) -> int:
    """The dataset's vocabulary; GPT-2's BPE padded to a multiple of 64 as nanoGPT does (50257 -> 50304)."""
    vocab_size = int(meta["vocab_size"])
    return padded_vocab_size(vocab_size) if meta["tokenizer"]["name"] == "gpt2" else vocab_size


def init_model(cfg: TrainConfig, meta: dict, ckpt: dict[str, Any] | None) -> GPT:
    """A new model (scratch), the checkpoint's (resume: its shapes win over cfg's) or GPT-2's (cropped to
    cfg.block_size if that is shorter). Dropout always comes from cfg."""
    if ckpt is not None:
        check_same_tokenizer(meta, ckpt.get("tokenizer"), f"{cfg.out_dir}'s checkpoint")
        check_fits(GPTConfig(**ckpt["model_args"]), meta)
        print(f"resuming training from {cfg.out_dir} at iteration {ckpt['iter_num']}")
        model = model_from_checkpoint(ckpt, dropout=cfg.dropout)
    elif cfg.init_from == "scratch":
        config = GPTConfig(
            **{k: getattr(cfg, k) for k in SHAPE_KEYS}, vocab_size=model_vocab_size(meta), dropout=cfg.dropout
        )
        check_fits(config, meta)
        print("initializing a new model from scratch")
        model = GPT(config)
    else:
        check_gpt2_options(cfg)
        if not is_hf_source(cfg.init_from):  # before its weights are read
            check_same_tokenizer(meta, peek_checkpoint(cfg.init_from).get("tokenizer"), cfg.init_from)
        print(f"initializing from {cfg.init_from}")
        model = base_model(cfg.init_from, cfg.block_size, dropout=cfg.dropout)
        check_gpt2_tokenizer(cfg, meta, model.config.vocab_size)
        if cfg.lora_rank:
            model = with_lora(model, cfg)
    if meta["vocab_size"] > model.config.vocab_size:
        raise NanoGPTError(
            f"the dataset's vocabulary ({meta['vocab_size']} tokens) does not fit the model's "
            f"({model.config.vocab_size}): init_from={cfg.init_from!r} does not match dataset={cfg.dataset!r}"
        )
    return model


def check_gpt2_tokenizer(cfg: TrainConfig, meta: dict, vocab_size: int) -> None:
    """GPT-2 weights (GPT-2's vocabulary) read GPT-2 BPE ids (a small HF folder names no tokenizer: the
    vocabulary size check of init_model is all there is; nor do nanoGPT's checkpoints)."""
    if is_hf_source(cfg.init_from) and meta["tokenizer"]["name"] != "gpt2" and vocab_size >= GPT2_VOCAB_SIZE:
        raise NanoGPTError(
            f"init_from={cfg.init_from!r} reads GPT-2 BPE ids, but dataset {cfg.dataset!r} was prepared with the "
            f"{meta['tokenizer']['name']!r} tokenizer: prepare it with --tokenizer gpt2"
        )


def check_gpt2_options(cfg: TrainConfig) -> None:
    """GPT-2 weights are GPT-2's architecture: model options beyond it in cfg cannot apply to them."""
    asked = GPTConfig(**{k: getattr(cfg, k) for k in ARCHITECTURE}).non_gpt2_options()
    if is_hf_source(cfg.init_from) and asked:
        raise NanoGPTError(
            f"init_from={cfg.init_from!r} loads GPT-2's architecture, which has none of {', '.join(asked)}: "
            "leave those options out (or train from scratch)"
        )


def with_lora(base: GPT, cfg: TrainConfig) -> GPT:
    """base, frozen, with adapters as cfg.lora_* say. model.lora_entry names the base for the checkpoint
    (a local path made absolute, so that the run loads from any folder) and hashes its weights."""
    lora = LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets.split(",")))
    local = Path(cfg.init_from).exists()
    entry = lora_entry(
        lora, str(Path(cfg.init_from).resolve()) if local else cfg.init_from, weights_sha256(base)
    )
    model = apply_lora(base, lora)
    model.lora_entry = entry
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA rank {lora.rank} on {', '.join(lora.targets)}: {trained:,} trained parameters, base frozen")
    return model


def check_same_tokenizer(meta: dict, model_tokenizer: dict | None, model_name: str) -> None:
    """The dataset's ids must mean what the model's ids mean: same tokenizer kind, same vocabulary."""
    data_tokenizer = meta["tokenizer"]
    if model_tokenizer is not None and model_tokenizer != data_tokenizer:
        raise NanoGPTError(
            f"the data was prepared with another tokenizer than {model_name} was trained on (data: "
            f"{describe_tokenizer(data_tokenizer)}; model: {describe_tokenizer(model_tokenizer)}): its token ids "
            "would mean other text. Prepare the data with the model's tokenizer, or train a new model"
        )


# what describes this invocation (where it runs, how it reports), not the run: a resumed run takes every
# other key it is not given from its checkpoint's saved config
INVOCATION_KEYS = tuple(
    "out_dir init_from overwrite eval_only device dtype compile backend parallel progress wandb_log "
    "wandb_project wandb_run_name tensorboard_log activation_checkpointing".split()
)
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def given_values(cfg: TrainConfig) -> set[str]:
    """The keys of a config built in code that differ from TrainConfig's defaults: what it asks for."""
    default = TrainConfig()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


def checkpoint_decides(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The keys whose values are in a checkpoint's tensors, so a resumed run cannot change them: the model
    shape, the LoRA adapters (its "lora" entry: the config of older runs could disagree), the optimizer
    whose state it holds (nanoGPT's: AdamW) and the seed of the generators it continues (ours)."""
    args = ckpt["model_args"]
    decided = {k: args[k] for k in SHAPE_KEYS if k in args}
    lora = ckpt.get("lora")
    if lora:
        decided |= {"lora_rank": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"]}
        decided["lora_targets"] = ",".join(lora["targets"])
    else:  # no adapters: LoRA options would be ignored
        saved, default = ckpt.get("config") or {}, TrainConfig()
        decided |= {k: saved.get(k, getattr(default, k)) for k in LORA_KEYS} | {"lora_rank": 0}
    saved = ckpt.get("config") or {}
    if ckpt.get("rng") and "seed" in saved:  # its generators and batch stream continue: no seed applies
        decided["seed"] = saved["seed"]
    return decided | {"optimizer": saved.get("optimizer", "adamw")}


def differing(cfg: TrainConfig, values: dict[str, Any], given: set[str], whose: str) -> list[str]:
    """The keys of `values` that the command gave with another value, as "KEY=GIVEN (WHOSE: VALUE)"."""
    return [
        f"{k}={getattr(cfg, k)!r} ({whose}: {v!r})"
        for k, v in values.items()
        if k in given and getattr(cfg, k) != v
    ]


def resumed_config(cfg: TrainConfig, ckpt: dict[str, Any], given: set[str]) -> TrainConfig:
    """The config a resumed run continues with: the checkpoint's saved config, with the keys in `given`
    (the command's) taken from cfg, and INVOCATION_KEYS always cfg's. A key the checkpoint decides
    (checkpoint_decides) given with another value is refused, naming the keys."""
    decided = checkpoint_decides(ckpt)
    differ = differing(cfg, decided, given, "checkpoint")
    if differ:
        raise NanoGPTError(
            f"cannot resume {cfg.out_dir} with {', '.join(differ)}: its checkpoint holds those (its weights, "
            "adapters, optimizer state or random generators). Leave them out of the command, or start a new "
            "run from its weights "
            f"with --init_from={cfg.out_dir} --out_dir=ANOTHER"
        )
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(INVOCATION_KEYS)
    saved = {k: v for k, v in (ckpt.get("config") or {}).items() if k in fields}
    carried = {k: v for k, v in (saved | decided).items() if k not in given}
    return set_fields(cfg, carried, where=f"the saved config of {cfg.out_dir}'s checkpoint")


def fine_tune_config(cfg: TrainConfig, model: GPTConfig, given: set[str]) -> TrainConfig:
    """cfg with the shape of the model a fine-tuning run starts from (init_from's, block_size cropped to
    cfg's where that is shorter), so that config.json says what is trained. A shape given with another
    value is refused, naming the keys."""
    shape = {k: getattr(model, k) for k in SHAPE_KEYS}
    differ = differing(cfg, shape, given, "its")
    if differ:
        raise NanoGPTError(
            f"init_from={cfg.init_from!r} fine-tunes that model in its own shape, not {', '.join(differ)}: leave "
            "those options out (a shorter block_size crops it), or train from scratch"
        )
    return dataclasses.replace(cfg, **shape)


def check_fits(config: GPTConfig, meta: dict) -> None:
    """Refuse, before building anything, a model the data or the memory cannot hold: block_size must leave
    room for a window in every split, and weights, gradients, AdamW state and causal masks must fit."""
    for split in ("train", "val"):
        tokens = int(meta.get(f"{split}_tokens", config.block_size + 1))
        if tokens < 2:
            raise NanoGPTError(
                f"the {split} split has {tokens} token(s): too few for any training window (block_size + 1 "
                "tokens). Prepare more text (for val: a larger --val_fraction)"
            )
        if tokens <= config.block_size:
            raise NanoGPTError(
                f"block_size={config.block_size} is too long for the {split} split ({tokens} tokens): a training "
                f"window needs block_size + 1 tokens. Use --block_size={tokens - 1} or less"
            )
    need = training_bytes(config)
    available = available_memory_bytes()
    if available is not None and need > available:
        raise NanoGPTError(
            f"the model needs about {need / 2**30:.1f} GiB for its weights, gradients, AdamW state and causal "
            f"masks, more than the {available / 2**30:.1f} GiB available: use a smaller block_size, n_layer or n_embd"
        )


def training_bytes(config: GPTConfig) -> int:
    """A lower bound on training memory: float32 weights, gradients and two AdamW moments (16 bytes a
    parameter) plus each layer's (block_size, block_size) bool causal mask. Activations come on top."""
    C, V, T, L = config.n_embd, config.vocab_size, config.block_size, config.n_layer
    params = V * C + T * C + L * 12 * C * C
    return 16 * params + L * T * T


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
