"""int8 inference on the CPU: `nanogpt.quantize(model)` and the --quantize=int8 option of `sample`, `eval`
and `serve`.

Every Linear layer of MIN_WEIGHTS or more (the blocks' c_attn, c_proj, c_fc and the lm_head of a
GPT-2-sized model) keeps its weight as int8, one scale per output row (symmetric, per channel); each call
quantises its input to int8 as well, with one scale from that input's range (dynamic quantisation), and
multiplies int8 by int8 into int32 in fbgemm's kernels (PyTorch's own dynamic quantisation:
torch.ops.quantized.linear_dynamic). Norms, attention, softmax and the embedding lookups stay float32.
The lm_head is tied to wte: it gets an int8 copy of the matrix, and the lookups keep wte in float32.

Why these kernels and the quantised head, measured at the GPT-2-124M shape, batch 1, one thread, on a
busy 2-core AMD EPYC (Zen 4, AVX512-VNNI; benchmarks/bench_generate.py --quantize): int8 decodes at 3.5x
float32's tokens/s, 1.9x with the head kept float32 (it is a third of the weights read per token),
bfloat16 autocast at 0.76x. In a first probe at 16 tokens/s in float32, torchao 0.18's
Int8DynamicActivationInt8WeightConfig ran at 1.8 and its weight-only int8 at 4.4 (eager, without
torch.compile), so torchao is not used.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_map

from nanogpt.errors import NanoGPTError

SCHEMES = ("none", "int8")  # the values of --quantize
# Linears with fewer weights stay float32 (exact): there the per-call cost of quantising the input eats
# the smaller matmul's gain. One thread, AMD EPYC Zen 4, one layer: 128x512 int8 0.8x float32's speed,
# 256x1024 1.3x at batch 1 and 8x at batch 8, 768x3072 12x. The whole shakespeare_char_cpu model (every
# layer under this) with every Linear int8 decoded at 0.93-1.10x float32's tokens/s: no gain to buy
MIN_WEIGHTS = 1 << 17


def check_quantize(scheme: str, dtype: str, compile: bool) -> None:
    """A command's --quantize against its other options: NanoGPTError naming the combination that cannot
    run (the device is checked by `quantize`, once "auto" has become a device)."""
    if scheme not in SCHEMES:
        raise NanoGPTError(f"quantize must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if scheme == "none":
        return
    if dtype != "float32":  # "auto" too: it can mean bfloat16 autocast, which int8's kernels do not take
        raise NanoGPTError(
            f"--quantize={scheme} computes between its int8 matmuls in float32: it cannot run in "
            f"--dtype={dtype} (use --dtype=float32, or no --quantize)"
        )
    if compile:
        raise NanoGPTError(f"--quantize={scheme} runs eagerly: drop --compile")


def _activation_range_reduced() -> bool:
    """Whether activations must use 7 of their 8 bits: fbgemm's AVX2 / AVX-512 kernels without VNNI add
    pairs of u8 x s8 products in int16, which saturates at full range (PyTorch's default reduces always);
    VNNI's instruction adds into int32, so there the full range halves the activations' rounding error."""
    return not torch.cpu._is_vnni_supported()  # AVX512-VNNI (fbgemm uses no AVX-VNNI)


class Int8Weight(torch.Tensor):
    """What an Int8Linear's `weight` reads as: the float32 (out, in) matrix its int8 values and scales stand
    for, dequantised whenever an op reads its values; its metadata (float32, cpu, shape) costs nothing.
    So code that asks a Linear for its weight's dtype and device (the decoding engine picks its kernels
    by them: the compute between the int8 matmuls is float32) reads the truth, with no float32 copy kept."""

    @staticmethod
    def __new__(cls, packed: torch.ScriptObject, shape: torch.Size) -> Int8Weight:
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32, device="cpu")

    def __init__(self, packed: torch.ScriptObject, shape: torch.Size):
        self.packed = packed

    def dequantized(self) -> torch.Tensor:
        return torch.ops.quantized.linear_unpack(self.packed)[0].dequantize()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def plain(t):
            return t.dequantized() if isinstance(t, Int8Weight) else t

        return func(*tree_map(plain, args), **tree_map(plain, kwargs or {}))

    def __repr__(self) -> str:
        return f"Int8Weight(shape={tuple(self.shape)})"


class Int8Linear(nn.Module):
    """An inference-only nn.Linear with int8 weights (per output channel) and dynamically quantised int8
    inputs (fbgemm's kernel)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (out,)
        zero = torch.zeros(w.size(0), dtype=torch.long)
        bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():  # PyTorch marks these quantised-tensor APIs deprecated; they are
            warnings.simplefilter("ignore")  # still its fastest int8 CPU kernels (see the module docstring)
            qweight = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.reduce_range = _activation_range_reduced()

    @property
    def weight(self) -> Int8Weight:
        return Int8Weight(self._packed, torch.Size((self.out_features, self.in_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) float32 -> (..., out) float32."""
        return torch.ops.quantized.linear_dynamic(x, self._packed, self.reduce_range)

    def train(self, mode: bool = True) -> Int8Linear:
        if mode:
            raise NanoGPTError(
                "an int8-quantized model runs inference only: train the float32 model, then quantize it"
            )
        return super().train(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and inputs"


def quantize(model: nn.Module, min_weights: int = MIN_WEIGHTS) -> nn.Module:
    """Make every nn.Linear of a CPU model with at least min_weights weights an Int8Linear, in place (LoRA
    adapters are merged first); the model is put in eval mode and returned. A tied lm_head gets its own
    int8 copy of the embedding matrix. The result runs inference only, on the CPU, in float32 between
    the int8 matmuls."""
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise NanoGPTError(
            f"int8 quantization runs on the CPU only (fbgemm's kernels); the model is on "
            f"{', '.join(sorted(devices)) or 'no device'}: use --device=cpu (on a GPU, --dtype=bfloat16 is the fast choice)"
        )
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise NanoGPTError(
            "this PyTorch build has no fbgemm quantized kernels (x86 only): run without --quantize"
        )
    from nanogpt.lora import has_lora, merge_lora

    if has_lora(model):
        merge_lora(model)
    model.eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.numel() >= min_weights:
                setattr(parent, name, Int8Linear(child))
    return model


def quantized(model: nn.Module, scheme: str) -> nn.Module:
    """The model as a command's --quantize asks: quantized in place for "int8", as it is for "none"."""
    return quantize(model) if scheme == "int8" else model
