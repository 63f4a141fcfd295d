"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): fine-tune a frozen model through low-rank
adapters. A Linear's W x + b becomes W x + b + (alpha / r) B A dropout(x), with A (r, in) and B (out, r)
the only trained weights; B starts at zero, so before the first step the model is exactly the base.

The model file stays GPT-2: apply_lora swaps the named nn.Linear modules for LoRALinear in place, which
keeps their weight and bias under the same names (a base state dict still loads key for key) and adds
`lora_A` / `lora_B`. merge_lora folds the adapters back into plain Linears (for export).

A LoRA run's checkpoint holds the adapters only, plus a reference to its base: where it came from and a
hash of its weights (checkpoint.model_from_checkpoint rebuilds base + adapters).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from nanogpt.errors import NanoGPTError

TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2's Linears inside the blocks (lm_head is tied to wte)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input only
    targets: tuple[str, ...] = TARGETS  # module names (the last part of the name) to adapt

    def __post_init__(self):
        if self.rank < 1:
            raise NanoGPTError(f"lora_rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:  # nan too
            raise NanoGPTError(f"lora_alpha must be positive (it scales the update), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise NanoGPTError(f"lora_dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.targets) - set(TARGETS)
        if unknown or not self.targets:
            raise NanoGPTError(
                f"lora_targets must name some of {', '.join(TARGETS)}, got {','.join(self.targets) or 'none'}"
            )


class LoRALinear(nn.Module):
    """A frozen Linear (its own weight and bias, shared with the module it replaces) plus a trained
    low-rank update."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # (out, in), (out,) or None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        out_features, in_features = self.weight.shape
        if cfg.rank > min(out_features, in_features):  # B A could not have that rank
            raise NanoGPTError(
                f"lora_rank={cfg.rank} exceeds the adapted Linears' width ({min(out_features, in_features)}, "
                "the model's n_embd): give a smaller --lora_rank"
            )
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, cfg.rank, **factory))  # (out, r): starts at 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as peft and the paper
        self.scaling = cfg.alpha / cfg.rank
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., r) -> (..., out); never forms the (out, in) product B A
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (without dropout): W + (alpha / r) B A."""
        out_features, in_features = self.weight.shape
        linear = nn.Linear(in_features, out_features, bias=self.bias is not None)
        linear.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + (self.lora_B @ self.lora_A) * self.scaling)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _replace(model: nn.Module, kind: type, make: Any) -> int:
    """Swap every submodule of type `kind` for make(name, module) where that returns one; the count."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                new = make(name, child)
                if new is not None:
                    setattr(parent, name, new)
                    count += 1
    return count


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze every parameter of `model` and adapt its Linears named in cfg.targets, in place."""
    for p in model.parameters():
        p.requires_grad_(False)
    count = _replace(model, nn.Linear, lambda name, m: LoRALinear(m, cfg) if name in cfg.targets else None)
    if count == 0:
        raise NanoGPTError(f"no Linear named {', '.join(cfg.targets)} in the model: nothing to adapt")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its Linear, in place: a plain model computing the same function."""
    _replace(model, LoRALinear, lambda name, m: m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def is_adapter_key(key: str) -> bool:
    return key.endswith((".lora_A", ".lora_B"))


def adapter_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters' entries of a LoRA model's state dict."""
    return {k: v for k, v in state_dict.items() if is_adapter_key(k)}


def weights_sha256(model: nn.Module) -> str:
    """A hash of a model's weights (names, dtypes, shapes and bytes, in name order): the identity of a
    LoRA run's base, checked when the base is loaded again."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if is_adapter_key(name):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself: no copy
    return h.hexdigest()


def lora_entry(cfg: LoRAConfig, base: str, base_sha256: str) -> dict[str, Any]:
    """The checkpoint's "lora" entry: the adapters' shape and the base they adapt."""
    return {**asdict(cfg), "targets": list(cfg.targets), "base": base, "base_sha256": base_sha256}


def lora_config(entry: dict[str, Any]) -> LoRAConfig:
    return LoRAConfig(entry["rank"], entry["alpha"], entry["dropout"], tuple(entry["targets"]))


def adapt_base(base: nn.Module, entry: dict[str, Any], adapters: dict[str, torch.Tensor]) -> nn.Module:
    """A checkpoint's base model with its adapters: checks the base is the one the run started from."""
    found = weights_sha256(base)
    if found != entry["base_sha256"]:
        raise NanoGPTError(
            f"the LoRA base {entry['base']!r} has changed since this run was trained (weights hash "
            f"{found[:12]}, expected {entry['base_sha256'][:12]}): restore that base, or train again"
        )
    model = apply_lora(base, lora_config(entry))
    missing = set(adapter_state(model.state_dict())) ^ set(adapters)
    if missing:
        raise NanoGPTError(f"the checkpoint's adapters do not fit the base: {sorted(missing)[:3]} ...")
    model.load_state_dict(adapters, strict=False)
    model.lora_entry = dict(entry)  # saved again with the adapters (lora_checkpoint)
    return model


def lora_checkpoint(ckpt: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """A training checkpoint as a LoRA run saves it: the adapters and the base's reference in place of
    all weights (optimizer state is the adapters' only already). Other models' checkpoints unchanged."""
    entry = getattr(model, "lora_entry", None)
    return ckpt if entry is None else {**ckpt, "model": adapter_state(ckpt["model"]), "lora": entry}
