"""The model options beyond GPT-2 (GPTConfig.position, norm, qk_norm, mlp, tie_embeddings, logit_softcap,
zero_init_proj, residual_scalars, value_embeddings): each against an independent reference where one exists (transformers' Llama rotary and
MLP, torch.nn.RMSNorm), the KV cache against recompute for every combination, and the rolling cache that
lets a rotary model decode past block_size without recomputing."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from nanogpt import GPT, GPTConfig
from nanogpt.errors import NanoGPTError
from nanogpt.generate import Sampling, StaticKVCache, generate
from nanogpt.model import ARCHITECTURE, KVCache, apply_rotary, rotary, sliding_window

TINY = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)
OPTIONS = dict(
    position=("learned", "rope"),
    norm=("layernorm", "rmsnorm"),
    qk_norm=(False, True),
    mlp=("gelu", "relu2", "swiglu"),
    tie_embeddings=(True, False),
    logit_softcap=(None, 5.0),
    zero_init_proj=(False, True),
)
EXTRAS = dict(residual_scalars=True, value_embeddings=True)  # parameters of their own: tested apart
GREEDY = Sampling(temperature=0.0)
MODERN = dict(
    position="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False, logit_softcap=5.0
)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def randomized(model: GPT, seed: int = 1) -> GPT:
    """Every weight random (zero_init_proj's zeros and the norms' ones too), so no option is invisible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def llama_rotary(hs: int, base: float, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Llama cos and sin for positions pos (B, T): (B, T, hs)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = pytest.importorskip("transformers").LlamaConfig(
        hidden_size=2 * hs, num_attention_heads=2, rope_theta=base
    )
    return llama.LlamaRotaryEmbedding(config=config)(torch.zeros(1, dtype=torch.float32), pos)


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_rotary_matches_llama(base):
    """Our rotation of q and k equals transformers' apply_rotary_pos_emb with LlamaRotaryEmbedding's
    angles, for positions shared by the batch (T,) and per sequence (B, T), far past any block too."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    B, nh, T, hs = 2, 3, 7, 16
    q, k = torch.randn(B, nh, T, hs), torch.randn(B, nh, T, hs)
    pos = torch.stack([torch.arange(T), torch.arange(1000, 1000 + T)])  # (B, T)
    ref_q, ref_k = llama.apply_rotary_pos_emb(q, k, *llama_rotary(hs, base, pos))
    ours = apply_rotary(torch.stack((q, k)), *rotary(pos, hs, base))
    torch.testing.assert_close(ours, torch.stack((ref_q, ref_k)), atol=1e-5, rtol=1e-5)
    shared = apply_rotary(torch.stack((q, k)), *rotary(pos[1], hs, base))  # (T,): every sequence alike
    torch.testing.assert_close(shared[:, 1], ours[:, 1])


def test_rotary_scores_depend_on_distance_only():
    """(float32 angles: at position 900 they are off by ~1e-4 rad, hence the tolerance)"""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def score(i: int, j: int) -> float:  # q at position i . k at position j
        turned = (apply_rotary(x, *rotary(torch.tensor([p]), 32, 1e4)) for x, p in ((q, i), (k, j)))
        return (next(turned) * next(turned)).sum().item()

    assert score(5, 2) == pytest.approx(score(905, 902), rel=3e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-2)


def test_rmsnorm_matches_torch():
    model = randomized(tiny_model(norm="rmsnorm"))
    ours = model.transformer.h[0].ln_1
    reference = torch.nn.RMSNorm(32, eps=1e-5)
    reference.weight.data.copy_(ours.weight)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(ours(x), reference(x))
    assert not any("ln_1.bias" in n for n, _ in model.named_parameters())


def reference_attention(attn, x: torch.Tensor, rope: bool, qk_norm: bool) -> torch.Tensor:
    """Causal self-attention written out: Llama's rotary, q and k divided by their RMS per head, a masked
    softmax of q k^T / sqrt(hs)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    B, T, C = x.shape
    nh, hs = attn.n_head, C // attn.n_head
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=-1))
    if qk_norm:
        q, k = (t / t.pow(2).mean(-1, keepdim=True).add(torch.finfo(t.dtype).eps).sqrt() for t in (q, k))
    if rope:
        q, k = llama.apply_rotary_pos_emb(q, k, *llama_rotary(hs, 1e4, torch.arange(T)[None]))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return attn.c_proj(y)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("rope, qk_norm", [(True, False), (False, True), (True, True)])
def test_attention_with_rope_and_qk_norm_matches_reference(attention, rope, qk_norm):
    position = "rope" if rope else "learned"
    model = randomized(tiny_model(position=position, qk_norm=qk_norm, attention=attention))
    attn, x = model.transformer.h[0].attn, torch.randn(2, 9, 32)
    hs = 16
    cos_sin = rotary(torch.arange(9), hs, 1e4) if rope else None
    torch.testing.assert_close(attn(x, None, cos_sin), reference_attention(attn, x, rope, qk_norm))


def test_relu_squared_mlp():
    mlp = randomized(tiny_model(mlp="relu2")).transformer.h[0].mlp
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2))


def test_swiglu_matches_llama_mlp_and_keeps_the_parameter_count():
    transformers = pytest.importorskip("transformers")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    model = randomized(tiny_model(mlp="swiglu", n_embd=48, n_head=2))
    ours = model.transformer.h[0].mlp
    hidden = ours.c_proj.in_features
    assert hidden == 128  # 8/3 * 48
    config = transformers.LlamaConfig(
        hidden_size=48, num_attention_heads=2, intermediate_size=hidden, hidden_act="silu", mlp_bias=True
    )
    reference = llama.LlamaMLP(config)
    with torch.no_grad():
        gate, up = ours.c_fc.weight.split(hidden)
        gate_bias, up_bias = ours.c_fc.bias.split(hidden)
        for linear, w, b in ((reference.gate_proj, gate, gate_bias), (reference.up_proj, up, up_bias),
                             (reference.down_proj, ours.c_proj.weight, ours.c_proj.bias)):  # fmt: skip
            linear.weight.copy_(w)
            linear.bias.copy_(b)
    x = torch.randn(2, 5, 48)
    torch.testing.assert_close(ours(x), reference(x))
    gelu = tiny_model(n_embd=192, n_head=6, bias=False)
    swiglu = tiny_model(n_embd=192, n_head=6, bias=False, mlp="swiglu")
    assert swiglu.get_num_params() == gelu.get_num_params()  # 8/3 * 192 = 512 exactly: same weights


def test_untied_head_has_its_own_matrix():
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    extra = 65 * 32
    assert untied.get_num_params(False) == tied.get_num_params(False) + extra
    assert untied.get_num_params() == tied.get_num_params()  # the table only looked up is left out
    idx = torch.randint(0, 65, (2, 8))
    untied.train()(idx, idx)[1].backward()
    assert untied.lm_head.weight.grad is not None and untied.transformer.wte.weight.grad is not None


def test_logit_softcap_is_c_tanh_of_the_raw_logits():
    capped = randomized(tiny_model(logit_softcap=0.5))
    raw = tiny_model()
    raw.load_state_dict(capped.state_dict())
    idx = torch.randint(0, 65, (2, 8))
    logits = capped(idx, idx)[0]
    torch.testing.assert_close(logits, 0.5 * torch.tanh(raw(idx, idx)[0] / 0.5))
    assert logits.abs().max() < 0.5 < raw(idx, idx)[0].abs().max()


def test_zero_init_proj_starts_every_block_as_the_identity():
    model = tiny_model(zero_init_proj=True, bias=False)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert torch.count_nonzero(p) == 0, name
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
    idx = torch.randint(0, 65, (2, 8))
    t = model.transformer
    x = t.wte(idx) + t.wpe(torch.arange(8))
    torch.testing.assert_close(model(idx, idx)[0], model.lm_head(t.ln_f(x)))


@pytest.mark.parametrize("options", [dict(residual_scalars=True), dict(value_embeddings=True), EXTRAS])
def test_residual_scalars_and_value_embeddings_start_as_the_plain_model(options):
    """lambdas (1, 0) and zero value tables at init: the plain model's weights give its very logits."""
    plain = randomized(tiny_model())
    model = tiny_model(**options)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".ve." in k or k.endswith("lambdas") for k in missing)
    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(idx, idx)[0], plain(idx, idx)[0])


def test_value_embeddings_add_to_the_values():
    """A value table whose rows are all u acts as u added to c_attn's value bias in that layer."""
    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(0))
    model = randomized(tiny_model(value_embeddings=True, bias=True)).double()
    plain = tiny_model(bias=True).double()
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for layer, table in enumerate(model.transformer.ve):
            table.weight.copy_(
                table.weight[layer].clone().expand_as(table.weight)
            )  # every token: row `layer`
            plain.transformer.h[layer].attn.c_attn.bias[2 * 32 :] += table.weight[0]
    torch.testing.assert_close(model(idx, idx)[0], plain(idx, idx)[0])


def test_residual_scalars_mix_the_embeddings_into_each_block():
    """Block 1 of a model with lambdas (a, b) reads a x1 + b x0, x0 the embeddings and x1 block 0's
    output: computed by hand with the plain blocks."""
    model = randomized(tiny_model(residual_scalars=True)).double()
    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(0))
    t = model.transformer
    (a0, b0), (a1, b1) = t.h[0].lambdas.tolist(), t.h[1].lambdas.tolist()
    x0 = t.wte(idx) + t.wpe(torch.arange(12))
    with torch.no_grad():
        for block in t.h:
            block.lambdas.copy_(torch.tensor([1.0, 0.0]))  # the plain block
        mixed = (a0 + b0) * x0  # block 0: the stream is the embeddings
        x1 = t.h[0](mixed, x0=mixed)
        mixed = a1 * x1 + b1 * x0
        x2 = t.h[1](mixed, x0=mixed)
        by_hand = model.lm_head(t.ln_f(x2))
        for block, lambdas in zip(t.h, ((a0, b0), (a1, b1)), strict=True):
            block.lambdas.copy_(torch.tensor(lambdas))
        torch.testing.assert_close(model(idx, idx)[0], by_hand)


def test_extras_keep_the_kv_cache_equal_to_recompute():
    """Value tables are looked up per token and the mix per layer: the cached forward and the cached
    greedy loop equal the recomputing ones, learned and rotary positions."""
    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(0))
    for position in ("learned", "rope"):
        model = randomized(tiny_model(position=position, **EXTRAS)).double()
        torch.testing.assert_close(cached_pieces(model, idx), model(idx, idx)[0])
        reference = model.generate(idx, 10, temperature=0.0, use_cache=False)
        assert torch.equal(model.generate(idx, 10, temperature=0.0), reference), position


def test_label_smoothing_is_torchs_on_the_logits():
    """(1 - e) cross-entropy + e times the mean of -log p over the vocabulary; 0 is the plain loss."""
    model = randomized(tiny_model()).double()
    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, plain = model(idx, idx)
    logp = F.log_softmax(logits, dim=-1)
    by_hand = 0.9 * plain + 0.1 * (-logp.mean(dim=-1)).mean()
    torch.testing.assert_close(model(idx, idx, label_smoothing=0.1)[1], by_hand)
    assert model(idx, idx, label_smoothing=0.0)[1] == plain


def test_default_model_is_gpt2():
    model = tiny_model()
    assert model.config.non_gpt2_options() == []
    assert "transformer.wpe.weight" in model.state_dict()
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize(
    "field, value",
    [
        ("position", "alibi"),
        ("norm", "batchnorm"),
        ("mlp", "geglu"),
        ("logit_softcap", 0.0),
        ("rope_base", 1.0),
    ],
)
def test_config_rejects_bad_option_values(field, value):
    with pytest.raises(NanoGPTError, match=rf"{field}.*{value}"):
        GPTConfig(**{**TINY, field: value})


def test_rope_needs_an_even_head_size():
    with pytest.raises(NanoGPTError, match="head size .* 5 must be even"):
        GPTConfig(**{**TINY, "n_embd": 10, "n_head": 2, "position": "rope"})


def test_a_checkpoint_from_before_the_options_loads():
    old = {k: v for k, v in dataclasses.asdict(GPTConfig(**TINY)).items() if k not in ARCHITECTURE}
    assert GPTConfig(**old).non_gpt2_options() == []


def test_export_and_gpt2_weights_refuse_the_options_naming_them(tmp_path):
    pytest.importorskip("transformers")
    from nanogpt.hf import export
    from nanogpt.train.config import TrainConfig
    from nanogpt.train.model_init import check_gpt2_options

    with pytest.raises(NanoGPTError, match=r"GPT-2's architecture only.*position='rope', norm='rmsnorm'"):
        export(tiny_model(position="rope", norm="rmsnorm"), tmp_path / "hf")
    for name, value in {**MODERN, **EXTRAS}.items():
        with pytest.raises(NanoGPTError, match=f"{name}={value!r}"):
            export(tiny_model(**{name: value}), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export(tiny_model(zero_init_proj=True), tmp_path / "hf")  # an init choice: still GPT-2's function
    with pytest.raises(NanoGPTError, match="init_from='gpt2'.*mlp='swiglu'"):
        check_gpt2_options(TrainConfig(init_from="gpt2", mlp="swiglu"))


def cached_pieces(model: GPT, idx: torch.Tensor, targets: bool = True) -> torch.Tensor:
    """Logits of idx fed through a cache as a prompt, one token, then three at once."""
    cache = [KVCache(16, rolling=model.config.position == "rope") for _ in model.transformer.h]
    return torch.cat(
        [model(idx[:, a:b], idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 8), (8, 9), (9, 12))], 1
    )


@pytest.mark.slow
def test_kv_cache_equals_recompute_for_every_combination():
    """All 192 combinations of the options: the cached forward (prompt, one token, three at once) equals
    the full one, and greedy generation 6 tokens past block_size (16) with the cache gives the recomputing
    loop's tokens. Float64 and random weights, so a difference is a logic error, not rounding."""
    combos = list(itertools.product(*OPTIONS.values()))
    assert len(combos) == 192
    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(0))
    for values in combos:
        options = dict(zip(OPTIONS, values, strict=True))
        model = randomized(tiny_model(**options)).double()
        torch.testing.assert_close(cached_pieces(model, idx), model(idx, idx)[0], msg=str(options))
        reference = model.generate(idx[:, :12], 10, temperature=0.0, use_cache=False)
        assert torch.equal(model.generate(idx[:, :12], 10, temperature=0.0), reference), options


@pytest.mark.parametrize(
    "options",
    [{}, MODERN, dict(MODERN, mlp="swiglu", position="learned"), dict(MODERN, **EXTRAS)],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_engine_equals_the_reference_loop_with_options(options, batch):
    """The decoding engine (generate.py) samples GPT.generate's recomputing tokens, past block_size too."""
    model = randomized(tiny_model(**options)).double()
    prompt = torch.randint(0, 65, (batch, 5), generator=torch.Generator().manual_seed(0))
    reference = model.generate(prompt, 30, use_cache=False, generator=torch.Generator().manual_seed(1))
    engine = generate(model, prompt, 30, sampling=Sampling(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(engine, reference)


def test_sliding_window_mask():
    mask = sliding_window(3, 6, 4, torch.device("cpu"))
    expected = [[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]  # queries at 3, 4, 5
    assert mask.int().tolist() == expected


def count_positions(monkeypatch) -> list[int]:
    """The number of positions each GPT.forward call reads, recorded."""
    calls, forward = [], GPT.forward

    def counting(self, idx, targets=None, kv_cache=None, **kwargs):
        calls.append(idx.size(1))
        return forward(self, idx, targets, kv_cache, **kwargs)

    monkeypatch.setattr(GPT, "forward", counting)
    return calls


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=20)])
def test_rope_decodes_past_block_size_with_the_rolling_cache(sampling, monkeypatch):
    """A block-16 rotary model generating 60 tokens past a 5-token prompt: after the prompt every step
    reads one position (the cache serves all the way), and the tokens are those of a reference that
    recomputes every step with each layer seeing the same window of keys (the last 16 positions)."""
    model = randomized(tiny_model(position="rope", norm="rmsnorm", qk_norm=True), seed=3).double()
    prompt = torch.randint(0, 65, (2, 5), generator=torch.Generator().manual_seed(0))

    def reference_step(idx: torch.Tensor) -> torch.Tensor:  # the whole sequence, windowed attention
        return model(idx)[0]

    idx, gen = prompt, torch.Generator().manual_seed(7)
    from nanogpt.model import sample_next_token

    for _ in range(60):
        idx = torch.cat((idx, sample_next_token(reference_step(idx)[:, -1], generator=gen, **sampling)), 1)
    calls = count_positions(monkeypatch)
    ours = model.generate(prompt, 60, generator=torch.Generator().manual_seed(7), **sampling)
    assert calls == [5] + [1] * 59 and torch.equal(ours, idx)
    calls.clear()
    engine = generate(
        model, prompt, 60, sampling=Sampling(**sampling), generator=torch.Generator().manual_seed(7)
    )
    assert calls == [5] + [1] * 59 and torch.equal(engine, idx)


def test_one_layer_rolling_cache_equals_nanogpts_cropped_recompute():
    """With one layer a key depends on its token and position only, so the rolling cache must give
    exactly nanoGPT's loop: recompute the last block_size tokens every step (an independent reference)."""
    model = randomized(tiny_model(position="rope", n_layer=1)).double()
    idx = torch.randint(0, 65, (1, 3))
    reference = idx
    for _ in range(50):
        logits = model(reference[:, -16:])[0]
        reference = torch.cat((reference, logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(model.generate(idx, 50, temperature=0.0), reference)


def test_rope_prompt_longer_than_block_size():
    model = randomized(tiny_model(position="rope")).double()
    prompt = torch.randint(0, 65, (2, 40))
    reference = model.generate(prompt, 6, temperature=0.0, use_cache=False)
    assert torch.equal(model.generate(prompt, 6, temperature=0.0), reference)
    assert torch.equal(generate(model, prompt, 6, sampling=GREEDY), reference)


def test_static_cache_rolls_for_rope():
    """The GPU engine's fixed-shape cache (here on the CPU) past max_len: position p in slot p % 16."""
    model = randomized(tiny_model(position="rope")).double()
    idx = torch.randint(0, 65, (2, 30))
    full = model(idx, idx)[0]  # windowed attention over the whole sequence
    pos = torch.zeros(1, dtype=torch.long)
    cache = [StaticKVCache(16, pos) for _ in model.transformer.h]
    pieces = [model(idx[:, :16], kv_cache=cache)[0]]
    for t in range(16, 30):
        pos.fill_(t)
        pieces.append(model(idx[:, t : t + 1], kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, 1), full[:, 15:])


def test_a_full_cache_refuses_more_unless_it_rolls():
    learned = tiny_model()
    cache = [KVCache(4) for _ in learned.transformer.h]
    learned(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
    with pytest.raises(NanoGPTError, match="holds 4 positions"):
        learned(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    rope = tiny_model(position="rope")
    cache = [KVCache(4, rolling=True) for _ in rope.transformer.h]
    rope(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
    rope(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(NanoGPTError, match="one at a time"):
        rope(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)


def test_rope_model_crops_and_counts_without_position_embeddings():
    model = tiny_model(position="rope")
    assert "wpe" not in model.transformer
    assert model.get_num_params() == model.get_num_params(False)
    idx = torch.randint(0, 65, (2, 8))
    before = model(idx, idx)[0]
    model.crop_block_size(8)
    torch.testing.assert_close(model(idx, idx)[0], before)


@pytest.mark.slow
def test_every_option_trains():
    """The modern model with all options on learns one batch (a wiring error shows up here)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, **MODERN, **EXTRAS, zero_init_proj=True)).train()
    x = torch.randint(0, 65, (4, 16))
    y = torch.roll(x, -1, dims=1)
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), "cpu")
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2
