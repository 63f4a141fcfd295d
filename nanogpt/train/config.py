"""Every knob of training in one typed dataclass; presets are TOML files shipped in nanogpt/train/presets.

Precedence: dataclass defaults (nanoGPT's train.py: GPT-2 124M on OpenWebText) < a preset or TOML file
< `--key=value` overrides. `nanogpt train shakespeare_char_cpu --max_iters=500` reads like nanoGPT's
`python train.py config/train_shakespeare_char.py --max_iters=500`, without executing any file.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from nanogpt.device import DtypeName
from nanogpt.errors import NanoGPTError
from nanogpt.hf import PRETRAINED
from nanogpt.options import check_finite, did_you_mean, help_text, parse_overrides, read_toml, set_fields

# counts that must be at least 1
POSITIVE_COUNTS = (
    "eval_interval",
    "log_interval",
    "eval_iters",
    "gradient_accumulation_steps",
    "muon_ns_steps",
)

# options that an FSDP-sharded run (parallel=fsdp) refuses, and why
FSDP_REFUSED = {
    "eval_tasks": "runs on rank 0 alone, which an FSDP-sharded model cannot: use parallel=ddp, or nanogpt "
    "eval --tasks on the checkpoint",
    "ema_decay": "is not supported with parallel=fsdp (the average is not sharded): use parallel=ddp",
}


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # checkpoint (ckpt.pt), config.json, metrics.jsonl and loss.png go here
    eval_interval: int = 2000  # estimate train and val loss every this many iterations, and at max_iters
    log_interval: int = 1  # log loss, lr, ms per iteration, tokens/s and MFU every this many iterations
    eval_iters: int = 200  # batches per split in each loss estimate (the same batches at every eval)
    eval_only: bool = False  # evaluate once at the start and exit (e.g. GPT-2 on OpenWebText)
    # benchmark tasks scored at each eval on rank 0, beside val_loss (as `nanogpt eval --tasks`): e.g.
    # "hellaswag", "copa,winograd", "core"; items the tokenizer cannot encode are skipped
    eval_tasks: str = ""
    eval_tasks_limit: int = 200  # the first N items of each task at each eval; 0: all
    always_save_checkpoint: bool = True  # save at every eval, not only when the val loss improves
    init_from: str = "scratch"  # scratch | resume (from out_dir) | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local HF GPT-2 folder | a checkpoint or out_dir (ours or nanoGPT's)
    # a new run (init_from not resume) into an out_dir that holds a checkpoint is refused unless this is set
    overwrite: bool = False
    # logging
    wandb_log: bool = False  # log to Weights & Biases (WANDB_MODE=offline works without an account)
    wandb_project: str = "owt"  # the W&B project the run is logged to
    wandb_run_name: str = "gpt2"  # the run's name there
    tensorboard_log: bool = False  # write TensorBoard events to out_dir/tensorboard (needs `tensorboard`)
    progress: Literal["auto", "bar", "plain"] = "auto"  # auto: a progress bar in a terminal, else plain lines
    # data
    data_dir: str = (
        "data"  # the folder `nanogpt prepare` writes: data_dir/dataset/{train,val}.bin + meta.json
    )
    dataset: str = "openwebtext"  # a folder under data_dir (prepared first if it is a known dataset)
    # supervised fine-tuning on conversations (nanogpt/chat/sft.py): a JSONL file of OpenAI "messages" or
    # ShareGPT "conversations" replaces the dataset; the loss trains on the assistant's tokens only
    sft_data: str = ""
    sft_val_fraction: float = 0.05  # the share of conversations held out (whole) for the val loss
    gradient_accumulation_steps: int = (
        40  # micro-steps per iteration, over all processes (divided among them)
    )
    batch_size: int = 12  # sequences per micro-step per process
    # training windows: "random" starts (nanoGPT's), or "epochs": each epoch every window of a grid at a
    # random offset once, shuffled (nanogpt/data/loader.py); evaluation batches are random windows either way
    batch_order: Literal["random", "epochs"] = "random"
    block_size: int = 1024  # context length in tokens
    # model (ignored where the weights decide: resume, GPT-2; dropout always applies)
    n_layer: int = 12
    n_head: int = 12  # attention heads per layer (n_embd must divide by it)
    n_embd: int = 768  # the width of the residual stream
    dropout: float = 0.0  # 0 for pretraining, 0.1+ for fine-tuning
    bias: bool = (
        False  # biases in Linears and LayerNorms (GPT-2 has them; without is a bit better and faster)
    )
    # model options beyond GPT-2 (nanogpt/model.py's GPTConfig; GPT-2's by default)
    position: Literal["learned", "rope"] = "learned"  # rope: rotary positions on q and k, no wpe
    rope_base: float = 10000.0  # rotary: pair i of a head's dimensions turns by position * base^(-2i/hs)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # the blocks' and the final norm
    qk_norm: bool = False  # RMS-normalise q and k per head before attention
    mlp: Literal["gelu", "relu2", "swiglu"] = "gelu"  # relu2: ReLU squared; swiglu: gated, same weights
    tie_embeddings: bool = True  # lm_head shares wte's matrix (GPT-2); False: a head of its own
    logit_softcap: float | None = None  # c: logits = c * tanh(logits / c)
    zero_init_proj: bool = False  # the residual projections (c_proj) start at zero
    residual_scalars: bool = False  # each block's input: learned lambdas[0] x + lambdas[1] embeddings
    value_embeddings: bool = False  # each layer adds a per-token table (zero at init) to its values
    # optimizer: AdamW, or Muon for the blocks' matrices + AdamW for the rest (nanogpt/train/optim.py)
    optimizer: Literal["adamw", "muon"] = "adamw"
    learning_rate: float = 6e-4  # peak learning rate (AdamW's)
    muon_learning_rate: float = 0.02  # Muon's peak (Keller Jordan's convention; see optim.py)
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    muon_ns_steps: int = (
        5  # Newton-Schulz iterations per matrix and step (each ~4 (rows, rows, cols) matmuls)
    )
    muon_split_qkv: bool = False  # orthogonalise c_attn's q, k and v apart rather than as one (3 C, C) matrix
    max_iters: int = 600000  # optimizer steps in total (a resumed run continues up to this)
    weight_decay: float = 1e-1  # on matrices only (see GPT.configure_optimizers)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    label_smoothing: float = (
        0.0  # training targets mix in this much of the uniform distribution (evals: none)
    )
    # > 0: evaluations and checkpoints use an exponential moving average of the weights with this decay
    # (e.g. 0.99: about the last 100 steps; nanogpt/train/ema.py); training goes on from the raw weights
    ema_decay: float = 0.0
    # learning rate schedule
    decay_lr: bool = True  # linear warmup then a decay; False: constant learning_rate
    lr_schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: warmup, constant, linear decay at the end
    decay_fraction: float = 0.2  # wsd: the last fraction of the run spent decaying
    warmup_iters: int = 2000  # iterations of linear warmup from 0 to learning_rate
    lr_decay_iters: int = 600000  # the decay reaches min_lr here (about max_iters, per Chinchilla)
    min_lr: float = 6e-5  # about learning_rate / 10, per Chinchilla
    # a wall-clock budget in seconds, evaluations included (0: none): the run stops in time for a final
    # evaluation and checkpoint, and the schedule after warmup runs on the time spent, not lr_decay_iters
    max_seconds: float = 0.0
    # system
    backend: Literal["auto", "nccl", "gloo"] = (
        "auto"  # torch.distributed backend: auto is nccl on CUDA, gloo on CPU
    )
    parallel: Literal["ddp", "fsdp"] = (
        "ddp"  # under torchrun: replicate the model (ddp) or shard it (fsdp, FSDP2)
    )
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    dtype: DtypeName = "auto"  # auto: bfloat16 on CUDA that has it, float16 on older CUDA, else float32
    compile: bool | None = None  # torch.compile the model; None: on CUDA only
    # keep only each block's input in the forward pass and recompute the rest in backward: activation
    # memory falls to about 1 / n_layer of it, for ~1/3 more compute (useful with LoRA: docs/finetune.md)
    activation_checkpointing: bool = False
    seed: int = 1337  # model init, dropout and training batches (process k uses seed + k)
    # LoRA fine-tuning (nanogpt/lora.py): base frozen, low-rank adapters on these Linears trained
    lora_rank: int = 0  # 0: train every weight; r > 0: adapters of rank r (init_from must name a base)
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = "c_attn,c_proj,c_fc"  # comma-separated Linear names inside the blocks

    def __post_init__(self):
        check_finite(self, "TrainConfig")
        for name in POSITIVE_COUNTS:
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        _require(
            self.eval_tasks_limit >= 0, f"eval_tasks_limit must not be negative, got {self.eval_tasks_limit}"
        )
        for name, why in FSDP_REFUSED.items():
            _require(not (getattr(self, name) and self.parallel == "fsdp"), f"{name} {why}")
        for name in ("batch_size", "block_size", "n_layer", "n_head", "n_embd"):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "grad_clip", "min_lr", "weight_decay"):
            _require(getattr(self, name) >= 0, f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("dropout", "label_smoothing", "ema_decay"):
            _require(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        _require(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}")
        _require(
            self.muon_learning_rate > 0, f"muon_learning_rate must be positive, got {self.muon_learning_rate}"
        )
        _require(0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        _require(
            self.max_seconds >= 0, f"max_seconds must not be negative (0: no budget), got {self.max_seconds}"
        )
        _require(0 <= self.muon_momentum < 1, f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        _require(
            not self.decay_lr or self.min_lr <= self.learning_rate,
            f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate}): the decay ends at min_lr",
        )
        _require(self.lora_rank >= 0, f"lora_rank must not be negative (0: no LoRA), got {self.lora_rank}")
        _require(
            self.lora_alpha > 0, f"lora_alpha must be positive (it scales the update), got {self.lora_alpha}"
        )
        _require(
            not self.decay_lr or self.warmup_iters <= self.lr_decay_iters,
            f"warmup_iters ({self.warmup_iters}) must not exceed lr_decay_iters ({self.lr_decay_iters})",
        )
        _require(
            self.init_from in ("scratch", "resume", *PRETRAINED) or Path(self.init_from).exists(),
            f"init_from must be scratch, resume, {', '.join(PRETRAINED)}, a local Hugging Face GPT-2 "
            f"folder or a checkpoint (an out_dir or its ckpt.pt, ours or nanoGPT's), got {self.init_from!r}",
        )
        _require(
            self.lora_rank == 0 or self.init_from != "scratch",
            "lora_rank > 0 fine-tunes a base model: give --init_from (gpt2, a HF folder or a checkpoint)",
        )
        _require(
            not self.sft_data or self.init_from != "scratch",
            "sft_data fine-tunes a base model: give --init_from (gpt2, a HF folder, a checkpoint or an out_dir)",
        )
        _require(
            not (self.sft_data and self.batch_order == "epochs"),
            "batch_order='epochs' orders a prepared dataset's windows, not sft_data's: leave it out",
        )
        _require(
            0 < self.sft_val_fraction < 1, f"sft_val_fraction must be in (0, 1), got {self.sft_val_fraction}"
        )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise NanoGPTError(message)


def preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml")
        for p in resources.files(__package__).joinpath("presets").iterdir()
        if p.name.endswith(".toml")
    )


def read_preset(name_or_path: str) -> dict[str, Any]:
    """A preset's values: a shipped preset name, the path of a TOML file, or a nanoGPT config/*.py file
    (read with `ast`, never run: nanogpt/from_nanogpt.py)."""
    if name_or_path.endswith(".py"):
        from nanogpt.from_nanogpt import read_nanogpt_config

        return read_nanogpt_config(name_or_path)
    if name_or_path.endswith(".toml") or Path(name_or_path).is_file():
        return read_toml(name_or_path)
    names = preset_names()
    if name_or_path not in names:
        raise NanoGPTError(
            f"unknown preset {name_or_path!r} (presets: {', '.join(names)}).{did_you_mean(name_or_path, names)}"
        )
    with resources.as_file(resources.files(__package__).joinpath("presets", f"{name_or_path}.toml")) as path:
        return read_toml(path)


def load_train_config(argv: list[str]) -> TrainConfig:
    """`[PRESET] [--config NAME_OR_TOML] [--key=value ...]` -> the resolved TrainConfig."""
    positionals, overrides = parse_overrides(argv)
    if "config" in overrides:
        positionals.append(str(overrides.pop("config")))
    if len(positionals) > 1:
        raise NanoGPTError(f"give at most one preset or config file, got {positionals}")
    cfg = TrainConfig()
    if positionals:
        cfg = set_fields(cfg, read_preset(positionals[0]), where=f"config {positionals[0]}")
    return set_fields(cfg, overrides, where="command line")


def given_keys(argv: list[str]) -> set[str]:
    """The keys `nanogpt train argv` names: its preset's or file's and its overrides' (a resumed run takes
    every other key from its checkpoint)."""
    positionals, overrides = parse_overrides(argv)
    if "config" in overrides:
        positionals.append(str(overrides.pop("config")))
    return set(overrides) | {key for name in positionals[:1] for key in read_preset(name)}


def train_help(argv: list[str]) -> str:
    """The options with the values `nanogpt train ARGV` runs with: a preset's, not TrainConfig's defaults."""
    asked = [arg for arg in argv if arg not in ("-h", "--help")]
    usage = "usage: nanogpt train [PRESET | --config FILE.toml] [--key=value ...]\nvalues: " + (
        " ".join(asked) if asked else "the defaults (GPT-2 124M on OpenWebText)"
    )
    presets = f"presets: {', '.join(preset_names())}   (nanogpt/train/presets/*.toml)"
    return f"{help_text(TrainConfig, usage, load_train_config(asked))}\n\n{presets}"
