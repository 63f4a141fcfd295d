"""The GPT-2 language model, in one file that reads top to bottom.

LayerNorm, RMSNorm -> rotary positions -> KVCache -> CausalSelfAttention -> MLP, SwiGLU -> Block -> GPTConfig
-> GPT -> sampling. GPT.generate is the plain decoding loop; nanogpt/generate.py is the fast engine the
commands use, tested against it. Parameter names follow OpenAI's GPT-2 (wte, wpe, h, ln_f, c_attn, c_proj,
c_fc), so importing its weights is a key-for-key copy with four transposed matrices (see nanogpt/hf.py).

By default the model is GPT-2 exactly. GPTConfig's options beyond it (rotary positions, RMSNorm, QK-norm,
ReLU² or SwiGLU, untied head, logit soft-capping, zero-initialised projections) are the recipe of the
speedrun community since 2024 (modded-nanogpt, nanochat); each acts in a few lines where it applies.

References: OpenAI's GPT-2 (tensorflow/model.py), Hugging Face's GPT2LMHeadModel, Karpathy's nanoGPT.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanogpt.errors import NanoGPTError


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019; Llama's): x / rms(x) * gain. No mean to subtract, no bias."""

    def __init__(self, ndim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, 1e-5)


def norm_layer(config: GPTConfig) -> nn.Module:
    """The normalisation before each block's attention and MLP and before the head, as config.norm says."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return LayerNorm(config.n_embd, bias=config.bias)


RotaryAngles = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) of each position's angles, from rotary()


def rotary(pos: torch.Tensor, head_size: int, base: float) -> RotaryAngles:
    """cos and sin of the rotary angles (RoPE, Su et al. 2021) at positions pos, (T,) or (B, T) -> each
    (1 or B, 1, T, head_size / 2), broadcasting over heads. Dimension pair i turns by pos * base^(-2i/hs).
    Float32 whatever the model's dtype (in bf16 the angle of position 500 is off by a radian)."""
    inv_freq = 1.0 / base ** (
        torch.arange(0, head_size, 2, device=pos.device, dtype=torch.float32) / head_size
    )
    angles = pos.float()[..., None] * inv_freq  # (T, hs/2) or (B, T, hs/2)
    return angles.cos().unsqueeze(-3), angles.sin().unsqueeze(-3)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, hs) with each pair of dimensions (i, i + hs/2) turned by its angle (Llama's layout), so
    that q . k depends on the distance between the two positions only."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def sliding_window(T: int, S: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool for the last T of S positions: query i sees the `window` keys up to its own position."""
    query = torch.arange(S - T, S, device=device)[:, None]
    key = torch.arange(S, device=device)
    return (key <= query) & (key > query - window)


class KVCache:
    """Keys and values of the positions one attention layer has already seen, for incremental decoding.
    Attention reads the `len` positions filled so far.

    A rolling cache, once full, takes one position at a time in place of the oldest (slot = position %
    max_len), so each query sees the last max_len keys, in slot order. Only for rotary positions: their
    keys hold their own position, while a learned-position model's keys all change when the window moves."""

    def __init__(self, max_len: int, rolling: bool = False):
        self.max_len = max_len
        self.rolling = rolling
        self.len = 0  # positions cached so far
        self.kv: torch.Tensor | None = None  # (2, B, nh, max_len, hs), allocated on first use in kv's dtype

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """The positions of the next T tokens, (T,)."""
        return torch.arange(self.len, self.len + T, dtype=torch.long, device=device)

    def storage(self, kv: torch.Tensor) -> torch.Tensor:
        """The (2, B, nh, max_len, hs) buffer, allocated at the first append in kv's dtype. Zeros: a cache
        that attends over unfilled slots with weight 0 (generate.StaticKVCache) must not read 0 * NaN."""
        if self.kv is None:
            _, B, nh, _, hs = kv.shape
            self.kv = kv.new_zeros(2, B, nh, self.max_len, hs)
        return self.kv

    def append(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Add (2, B, nh, T, hs) keys and values; return all cached ones, (B, nh, S, hs) each, and which
        of the S keys each of the T queries may see, (T, S) bool (None: the causal corner, keys 0..S-T+i;
        a cache of sequences of different lengths gives one mask per sequence, (B, 1, T, S))."""
        T = kv.size(3)
        slot = self.len if self.len + T <= self.max_len else self._oldest_slot(T)
        self.storage(kv)[:, :, :, slot : slot + T] = kv  # one copy for keys and values: decoding is op-bound
        self.len += T
        k, v = self.kv[:, :, :, : min(self.len, self.max_len)].unbind(0)
        return k, v, None

    def _oldest_slot(self, T: int) -> int:
        """Where a full rolling cache puts its next position: over the oldest."""
        if not (self.rolling and T == 1):
            raise NanoGPTError(
                f"the KV cache holds {self.max_len} positions and has {self.len}: it cannot take {T} more"
                + (" (once full, a rolling cache takes one at a time)" if self.rolling else "")
            )
        return self.len % self.max_len


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # key, query, value projections for all heads, in one batched matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.attention = config.attention
        self.qk_norm = config.qk_norm
        # causal mask: query i may look at keys 0..i. Not saved in checkpoints (persistent=False).
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("bias", mask, persistent=False)

    def _use_sdpa(self, q: torch.Tensor) -> bool:
        if self.attention != "auto":
            return self.attention == "sdpa"
        # PyTorch's fused CPU kernel is slow backwards in bfloat16 (measured 9x its float32 time on an
        # AVX-512 CPU; benchmarks/bench_train.py): there the plain path's bf16 matmuls win
        return not (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled())

    def _visible(self, T: int, S: int, visible: torch.Tensor | None) -> torch.Tensor:
        """(T, S) bool: the cache's mask, or by default the causal one's bottom-right corner (the T
        queries are the last T of S positions)."""
        return self.bias[S - T : S, :S] if visible is None else visible

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        rope: RotaryAngles | None = None,
        value_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). rope: the rotary angles' (cos, sin) of the T positions, if rotary.
        value_embedding (B, T, C): added to the values (the tokens' own, from a table: modded-nanogpt)."""
        B, T, C = x.size()  # batch, sequence length, n_embd
        hs = C // self.n_head  # head size
        qkv = self.c_attn(x)  # (B, T, 3 C): query, key and value of every head
        if value_embedding is not None:
            qkv = torch.cat((qkv[..., : 2 * C], qkv[..., 2 * C :] + value_embedding), dim=-1)
        qkv = qkv.view(B, T, 3, self.n_head, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        if self.qk_norm or rope is not None:  # q and k: RMS-normalised per head, then turned by position
            qk = F.rms_norm(qkv[:2], (hs,)) if self.qk_norm else qkv[:2]
            qkv = torch.cat((qk if rope is None else apply_rotary(qk, *rope), qkv[2:]))
        q, k, v = qkv.unbind(0)  # (B, nh, T, hs) each
        visible = None  # (T, S) bool: may query i look at key j? None: the causal corner (_visible)
        if kv_cache is not None:
            k, v, visible = kv_cache.append(qkv[1:])  # (B, nh, S, hs), S = cached + T (or max_len)
        S = k.size(2)
        if visible is None and S > self.bias.size(0):  # rotary, longer than block_size: a sliding window
            visible = sliding_window(T, S, self.bias.size(0), x.device)
        corner = visible is None  # sliced from self.bias only where needed: decoding is op-bound
        if self._use_sdpa(q):
            # fused kernel; is_causal only describes the square (S == T) case, one query needs no mask
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if corner and (S == T or T == 1) else self._visible(T, S, visible),
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=corner and S == T and T > 1,
            )
        else:  # the plain path, kept for teaching and as the reference the fused kernel is tested against
            # 0 where query i may look at key j and -inf where it may not
            mask = self._visible(T, S, visible)
            causal = torch.zeros_like(mask, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
            if causal.dim() == 4:  # one mask per sequence (B, 1, T, S) (batched decoding): one per head
                causal = causal.expand(B, self.n_head, T, S).reshape(B * self.n_head, T, S)
            # one kernel scales q k^T and adds the mask (a third faster than matmul, mul and masked_fill
            # on a CPU): (B*nh, T, hs) x (B*nh, hs, S) -> (B*nh, T, S)
            att = torch.baddbmm(
                causal,
                q.reshape(B * self.n_head, T, hs),
                k.reshape(B * self.n_head, S, hs).transpose(1, 2),
                alpha=1.0 / math.sqrt(hs),
            )
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = (att @ v.reshape(B * self.n_head, S, hs)).view(B, self.n_head, T, hs)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class ReLUSquared(nn.Module):
    """relu(x)^2 (So et al. 2021, "Primer"; modded-nanogpt): cheaper than GELU, and its output is sparse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU(approximate=config.gelu_approximate) if config.mlp == "gelu" else ReLUSquared()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class SwiGLU(nn.Module):
    """The gated MLP of PaLM and Llama (Shazeer 2020): c_proj(silu(gate) * up), gate and up from one c_fc
    matmul. Hidden width 8/3 n_embd: its 3 matrices hold the 8 n_embd^2 weights of GPT-2's two."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = round(8 * config.n_embd / 3)
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # gate, then up
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.dropout(self.c_proj(F.silu(gate) * up))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). With residual_scalars its input
    is first lambdas[0] x + lambdas[1] x0, x0 the embeddings (modded-nanogpt): each layer may re-read the
    tokens themselves, which a deep narrow stream otherwise has to carry through every layer."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm_layer(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)
        # (2,): the stream's and the embeddings' weights, 1 and 0 at init (the plain block)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0])) if config.residual_scalars else None

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        rope: RotaryAngles | None = None,
        x0: torch.Tensor | None = None,
        value_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.lambdas is not None:
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        x = x + self.attn(self.ln_1(x), kv_cache, rope, value_embedding)
        x = x + self.mlp(self.ln_2(x))
        return x


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """vocab_size rounded up to a multiple of 64: GPT-2's 50257 -> 50304, as nanoGPT pads it (the lm_head
    matmul runs faster on such shapes; the extra tokens are never targets)."""
    return -(-vocab_size // multiple) * multiple


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context, in tokens
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    gelu_approximate: str = "none"  # "none": exact GELU (nanoGPT); "tanh": GPT-2's and HF's approximation
    # "sdpa": PyTorch's fused kernel; "manual": the plain masked softmax; "auto": whichever is faster here
    attention: str = "auto"
    # beyond GPT-2 (the defaults are GPT-2's; benchmarks/README.md says which of these pay at small scale)
    position: str = "learned"  # "learned": GPT-2's position embeddings (wpe); "rope": rotary, on q and k
    rope_base: float = 10000.0  # rotary: dimension pair i turns by position * rope_base^(-2i / head size)
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (no mean, no bias)
    qk_norm: bool = False  # RMS-normalise q and k per head before attention (bounds the attention logits)
    mlp: str = "gelu"  # "gelu" (GPT-2), "relu2" (ReLU squared), "swiglu" (gated, 8/3 wide: same weights)
    tie_embeddings: bool = True  # lm_head is wte's matrix (GPT-2); False: a head of its own
    logit_softcap: float | None = None  # c: logits = c * tanh(logits / c), smoothly bounded to (-c, c)
    zero_init_proj: bool = False  # the residual projections (c_proj) start at zero: blocks start as identity
    residual_scalars: bool = False  # each block's input is a learned mix of the stream and the embeddings
    value_embeddings: bool = False  # each layer adds a per-token table (zero at init) to its values

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise NanoGPTError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise NanoGPTError(
                f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head} (each head gets "
                f"n_embd // n_head dimensions)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise NanoGPTError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise NanoGPTError(
                    f"GPTConfig.{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
                )
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise NanoGPTError(
                f"position='rope' turns pairs of dimensions: the head size n_embd // n_head = "
                f"{self.n_embd // self.n_head} must be even"
            )
        if not self.rope_base > 1:
            raise NanoGPTError(f"GPTConfig.rope_base must be > 1, got {self.rope_base!r}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise NanoGPTError(f"GPTConfig.logit_softcap must be None or > 0, got {self.logit_softcap!r}")

    def non_gpt2_options(self) -> list[str]:
        """The options, as name=value, by which this model computes another function than GPT-2's (formats
        that hold GPT-2 only, such as transformers' GPT2LMHeadModel, cannot hold it)."""
        gpt2 = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
        return [
            f"{name}={getattr(self, name)!r}" for name in ARCHITECTURE if getattr(self, name) != gpt2[name]
        ]


# the values each choice option may take (the first is GPT-2's)
CHOICES = {
    "gelu_approximate": ("none", "tanh"),
    "attention": ("auto", "sdpa", "manual"),
    "position": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "relu2", "swiglu"),
}
# the options that change the function away from GPT-2's (rope_base acts only with position="rope";
# zero_init_proj changes the start of training, not what a model computes)
ARCHITECTURE = (
    "position",
    "norm",
    "qk_norm",
    "mlp",
    "tie_embeddings",
    "logit_softcap",
    "residual_scalars",
    "value_embeddings",
)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        embeddings = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == "learned":  # rotary positions act inside attention instead
            embeddings["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.value_embeddings:  # one (vocab, n_embd) table per layer, added to its values
            embeddings["ve"] = nn.ModuleList(
                nn.Embedding(config.vocab_size, config.n_embd) for _ in range(config.n_layer)
            )
        self.transformer = nn.ModuleDict(
            dict(
                **embeddings,
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=norm_layer(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # weight tying (https://paperswithcode.com/method/weight-tying): one matrix embeds and unembeds
            self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        for table in self.transformer["ve"] if config.value_embeddings else ():
            torch.nn.init.zeros_(table.weight)  # the plain model at init
        # GPT-2 paper: residual projections scaled by 1/sqrt(number of residual additions = 2 n_layer);
        # zero_init_proj: zero, so that each block starts as the identity (modded-nanogpt)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") and config.zero_init_proj:
                torch.nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the tables only looked up: the position and value
        embeddings, and the token embeddings unless they are lm_head's matrix too (tied, as in GPT-2)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        if non_embedding and "ve" in self.transformer:
            n_params -= sum(table.weight.numel() for table in self.transformer.ve)
        if non_embedding and not self.config.tie_embeddings:
            n_params -= self.transformer.wte.weight.numel()
        return n_params

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: list[KVCache] | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss). With targets (B, T): logits (B, T, V) and the mean
        cross-entropy over targets != -1 (against targets smoothed by label_smoothing, for training).
        Without: logits of the last position only, (B, 1, V). With kv_cache (one KVCache per layer) idx
        continues the cached positions."""
        B, T = idx.size()
        start = 0 if kv_cache is None else kv_cache[0].len
        learned = self.config.position == "learned"
        # learned positions end at block_size; rotary ones do not (past it a query sees block_size keys)
        if learned and start + T > self.config.block_size:
            raise NanoGPTError(
                f"cannot forward a sequence of length {start + T}: block_size is only {self.config.block_size}"
            )
        if kv_cache is None:
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        else:
            pos = kv_cache[0].positions(T, idx.device)  # (T,), or (B, T) for sequences of other lengths

        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if learned:
            x = x + self.transformer.wpe(pos)  # + (T, n_embd)
        head_size = self.config.n_embd // self.config.n_head
        rope = None if learned else rotary(pos, head_size, self.config.rope_base)  # cos, sin of the angles
        x = self.transformer.drop(x)
        x0 = x  # what residual_scalars mix back in at every block
        for i, block in enumerate(self.transformer.h):
            ve = self.transformer.ve[i](idx) if self.config.value_embeddings else None  # (B, T, n_embd)
            x = block(x, None if kv_cache is None else kv_cache[i], rope, x0, ve)
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self._head(x)  # (B, T, V)
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=-1,
                label_smoothing=label_smoothing,
            )
        else:
            # inference: only the last position's logits are needed (-1: keeps the time dim)
            logits = self._head(x[:, -1:, :])  # (B, 1, V)
            loss = None
        return logits, loss

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the final hidden states; soft-capped to (-c, c) if logit_softcap = c (Gemma 2,
        modded-nanogpt), in float32 (a bf16 tanh near c would round the logits to a few steps)."""
        logits = self.lm_head(x)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits.float() / cap)
        return logits

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context (e.g. GPT-2's 1024 -> 256) for a smaller, faster model."""
        if not 0 < block_size <= self.config.block_size:
            raise NanoGPTError(f"crop_block_size: {block_size} must be in 1..{self.config.block_size}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            block.attn.bias = block.attn.bias[:block_size, :block_size]

    @classmethod
    def from_pretrained(cls, name_or_path: str, override_args: dict | None = None) -> GPT:
        """GPT-2 weights: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" or a local HF GPT-2 folder."""
        from nanogpt.hf import load_gpt2  # transformers is an optional dependency

        return load_gpt2(name_or_path, override_args)

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float],
        device_type: str,
        params: list[nn.Parameter] | None = None,
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices (>= 2-D: Linear weights, embeddings) and none on biases
        and norm gains; over `params` if given (nanogpt/train/optim.py gives Muon the blocks' matrices)."""
        if params is None:
            params = [p for p in self.parameters() if p.requires_grad]  # tied weights appear once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        print(
            f"num decayed parameter tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} parameters\n"
            f"num non-decayed parameter tensors: {len(no_decay)}, with "
            f"{sum(p.numel() for p in no_decay):,} parameters"
        )
        # the fused kernel updates all parameters in one pass (CUDA, and CPU since torch 2.4: 7% faster
        # steps of the shakespeare_char_cpu model here); checked at run time, not by version
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        extra = {"fused": True} if fused else {"foreach": True}
        print(f"using fused AdamW: {fused}")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def flops_per_token(self) -> float:
        """Forward + backward FLOPs per token (PaLM appendix B): 6N for the matmuls with the weights,
        12 L H Q T for attention scores and their use."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved FLOP/s of fwdbwd_per_iter sequences in dt seconds over
        peak_flops (nanogpt.perf.matmul_peak_flops measures this device's; nanoGPT used an A100's 312e12)."""
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    def context(self, idx: torch.Tensor) -> torch.Tensor:
        """The last tokens of idx (B, T) that a recomputing step conditions on. Learned positions: the last
        block_size (nanoGPT's crop). Rotary: all that reach the last token through the layers' windows of
        block_size keys, n_layer * (block_size - 1) + 1 (exactly what a rolling cache computes)."""
        cfg = self.config
        keep = cfg.block_size if cfg.position == "learned" else cfg.n_layer * (cfg.block_size - 1) + 1
        return idx[:, -keep:]

    def prefill(
        self,
        idx: torch.Tensor,
        kv_cache: list[KVCache],
        step: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Read prompts idx (B, T) into empty caches -> logits (B, 1, V) of the next token. A rotary
        model's prompt longer than the caches: the rest one position at a time, as they roll, each
        through `step` (token (B, 1) -> logits; default: a forward pass with the caches)."""
        size = kv_cache[0].max_len
        logits, _ = self(idx[:, :size], kv_cache=kv_cache)
        for t in range(size, idx.size(1)):
            token = idx[:, t : t + 1]
            logits = self(token, kv_cache=kv_cache)[0] if step is None else step(token)
        return logits

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

        With use_cache the prompt is read once and each new token costs one position's forward pass.
        Once the sequence outgrows block_size, a learned-position model conditions on the last block_size
        tokens at positions 0..block_size-1 (as nanoGPT does): those keys all change, so that phase
        recomputes. A rotary model's keys hold their own position: its cache rolls (each query sees the
        last block_size keys) and serves every step. use_cache=False recomputes every step (over
        `context`): nanoGPT's loop, the reference the caches are tested against."""
        validate_prompt(idx, max_new_tokens, self.config.vocab_size)
        sampling = Sampling(temperature, top_k, top_p)
        block_size = self.config.block_size
        rolling = self.config.position == "rope"
        cache: list[KVCache] | None = None
        for _ in range(max_new_tokens):
            if not use_cache or (idx.size(1) > block_size and not rolling):
                logits, _ = self(self.context(idx))
            elif cache is None:  # read the whole prompt once
                max_len = min(block_size, idx.size(1) + max_new_tokens)
                cache = [KVCache(max_len, rolling) for _ in self.transformer.h]
                logits = self.prefill(idx, cache)
            else:  # only the newest token is not cached yet
                logits, _ = self(idx[:, -1:], kv_cache=cache)
            idx_next = sampling.draw(logits[:, -1, :], generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def validate_prompt(idx: torch.Tensor, max_new_tokens: int, vocab_size: int) -> None:
    """Raise NanoGPTError naming what of a generate call's idx (B, T) or max_new_tokens is out of range."""
    if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
        raise NanoGPTError(
            f"idx must be a (B, T) tensor of integer token ids, got {idx.dtype} of shape {tuple(idx.shape)}"
        )
    if idx.numel() == 0:
        raise NanoGPTError("idx is empty: give at least one token per sequence")
    if int(idx.min()) < 0 or int(idx.max()) >= vocab_size:
        raise NanoGPTError(
            f"token ids must be in 0..{vocab_size - 1} (the model's vocabulary), got {int(idx.min())}..{int(idx.max())}"
        )
    if max_new_tokens < 0:
        raise NanoGPTError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


class SamplingError(NanoGPTError):
    """A sampling option out of range; `param` names it (the server's 400 reply names it too)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits (sample_next_token), checked once here for every
    caller: temperature 0 is greedy, top_k keeps the k likeliest tokens, top_p the smallest set whose
    probability reaches p. vocab_size: the tokenizer's, whose ids 0..vocab_size-1 alone have text; the
    model's padded ids past it are never drawn (None: every id of the logits may be)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    vocab_size: int | None = None

    def __post_init__(self):
        if self.vocab_size is not None and self.vocab_size < 1:
            raise SamplingError("vocab_size", f"vocab_size must be >= 1 or None, got {self.vocab_size}")
        if not 0 <= self.temperature < math.inf:
            raise SamplingError(
                "temperature", f"temperature must be >= 0 (0 is greedy), got {self.temperature}"
            )
        if self.top_k is not None and self.top_k < 1:
            raise SamplingError("top_k", f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SamplingError("top_p", f"top_p must be in (0, 1] or None, got {self.top_p}")

    def draw(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """logits (B, V) -> the next token of each row, (B, 1)."""
        return sample_next_token(logits, self.temperature, self.top_k, self.top_p, generator, self.vocab_size)


def decodable_logits(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """logits (..., V) with the ids from vocab_size on (a padded vocabulary's, which no tokenizer can
    decode) at -inf: a softmax of the result is the model's distribution renormalised over the ids
    0..vocab_size-1. None, or vocab_size >= V: logits unchanged."""
    if vocab_size is None or vocab_size >= logits.size(-1):
        return logits
    padding = torch.arange(logits.size(-1), device=logits.device) >= vocab_size  # (V,)
    return logits.masked_fill(padding, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1), each below vocab_size (decodable_logits). temperature 0
    is greedy; top_k keeps the k likeliest tokens, top_p the smallest set whose probability reaches p
    (nucleus sampling)."""
    logits = decodable_logits(logits, vocab_size)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # the largest logit becomes 0 and the rest negative, so a tiny temperature (1e-300: 0 in float32)
    # sends them to -inf, a near-greedy draw, instead of inf / inf = NaN
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        # drop a token once the tokens before it already reach top_p (the likeliest always stays)
        drop_sorted = cum_probs - F.softmax(sorted_logits, dim=-1) >= top_p
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
