"""nanogpt: prepare text, train, fine-tune, evaluate and sample GPT language models."""

from nanogpt.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
__version__ = "0.1.0"
