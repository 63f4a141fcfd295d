"""nanogpt: prepare text, train, fine-tune, evaluate and sample GPT language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nanogpt.model import GPT, GPTConfig
    from nanogpt.quantization import quantize

__all__ = ["GPT", "GPTConfig", "quantize"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """GPT, GPTConfig and quantize import torch on first use, not on `import nanogpt`: the CLI starts (and
    handles Ctrl-C) before the heavy imports."""
    if name == "quantize":
        from nanogpt.quantization import quantize

        return quantize
    if name in __all__:
        from nanogpt import model

        return getattr(model, name)
    raise AttributeError(f"module 'nanogpt' has no attribute {name!r}")
