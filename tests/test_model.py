"""The GPT model: known parameter counts, config validation, the two attention paths, KV-cache
generation against the recompute path, and learning (overfitting one batch)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from nanogpt import GPT, GPTConfig
from nanogpt.model import KVCache, sample_next_token

TINY = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(GPTConfig(vocab_size=50257))
    assert model.get_num_params(non_embedding=False) == 124_439_808
    assert model.get_num_params() == 123_653_376


@pytest.mark.parametrize(
    "field, value",
    [
        ("n_layer", 0),
        ("n_head", -1),
        ("n_embd", 0),
        ("block_size", 0),
        ("vocab_size", 0),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("gelu_approximate", "fast"),
        ("attention", "flash"),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"{field}.*{value}"):
        GPTConfig(**{**TINY, field: value})


def test_config_rejects_embd_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"n_embd=30.*n_head=4"):
        GPTConfig(**{**TINY, "n_embd": 30, "n_head": 4})


def test_too_long_sequence_names_both_lengths():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"length 17.*block_size is only 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_weights_are_tied_and_initialised_as_gpt2():
    model = tiny_model(n_layer=8, n_embd=128, vocab_size=512)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(
        0.02 / math.sqrt(16), rel=0.05
    )
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.bias) == 0


def test_inference_returns_last_position_only():
    model = tiny_model()
    idx = torch.randint(0, 65, (3, 10))
    full, _ = model(idx, idx)
    last, loss = model(idx)
    assert loss is None and last.shape == (3, 1, 65)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_loss_ignores_minus_one():
    model = tiny_model()
    idx = torch.randint(0, 65, (2, 12))
    targets = torch.randint(0, 65, (2, 12))
    targets[0, :5] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)


def test_sdpa_matches_manual_attention():
    sdpa, manual = tiny_model(attention="sdpa"), tiny_model(attention="manual")
    idx = torch.randint(0, 65, (4, 16))
    torch.testing.assert_close(sdpa(idx, idx)[0], manual(idx, idx)[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_forward_matches_full_forward():
    """Prompt, then one token, then three at once: every cached step equals the full sequence's logits."""
    for attention in ("sdpa", "manual"):
        model = tiny_model(attention=attention)
        idx = torch.randint(0, 65, (2, 12))
        full, _ = model(idx, idx)
        cache = [KVCache(16) for _ in range(2)]
        pieces = [model(idx[:, a:b], idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 8), (8, 9), (9, 12))]
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(
    "sampling",
    [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.8, top_k=10),
        dict(temperature=1.0, top_p=0.9),
    ],
)
def test_generate_with_cache_equals_recompute(batch, sampling):
    """Same seed -> same tokens, also well past block_size (16): 40 new tokens after a 5-token prompt.
    Float64 so that any difference is a logic error, not rounding."""
    model = tiny_model().double()
    prompt = torch.randint(0, 65, (batch, 5))
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(1234)
        outs.append(model.generate(prompt, 40, use_cache=use_cache, generator=gen, **sampling))
    assert outs[0].shape == (batch, 45)
    assert torch.equal(outs[0][:, :5], prompt)
    assert torch.equal(outs[0], outs[1])


def test_generate_prompt_longer_than_block_size():
    model = tiny_model().double()
    prompt = torch.randint(0, 65, (2, 30))
    a = model.generate(prompt, 5, temperature=0.0)
    b = model.generate(prompt, 5, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(5, 65)
    greedy = sample_next_token(logits, temperature=0.0)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, top_k=1, generator=gen), greedy)
    assert torch.equal(sample_next_token(logits, top_p=1e-6, generator=gen), greedy)


def test_top_p_keeps_the_nucleus_only():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two tokens only
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    tokens = sample_next_token(logits, top_p=0.7, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens.view(-1), minlength=4)
    assert counts[2:].sum() == 0 and counts[0] > counts[1] > 0


def test_sampling_draws_each_token_with_its_probability():
    """200,000 draws from (0.5, 0.3, 0.15, 0.05, 0): each frequency within 0.005 of its probability (about
    4 standard errors), and a token of probability 0 never."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])
    tokens = sample_next_token(probs.log().repeat(200_000, 1), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens.view(-1), minlength=5) / 200_000
    torch.testing.assert_close(freq, probs[0], atol=5e-3, rtol=0)
    assert freq[4] == 0


@pytest.mark.slow
def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).train()
    x = torch.randint(0, 65, (4, 16))
    y = torch.roll(x, -1, dims=1)
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), "cpu")
    losses = []
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 3.5  # about ln(65) = 4.17 at init
    assert losses[-1] < 0.1


def test_configure_optimizers_decays_matrices_only(capsys):
    model = tiny_model(bias=True)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    # every parameter exactly once (wte and lm_head are one tensor)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.get_num_params(False)
    assert "num decayed parameter tensors: 10" in capsys.readouterr().out  # wte, wpe, 4 per block x 2


def test_crop_block_size():
    model = tiny_model()
    idx = torch.randint(0, 65, (2, 8))
    before, _ = model(idx, idx)
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 32)
    after, _ = model(idx, idx)
    torch.testing.assert_close(before, after)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_flops_per_token_and_mfu_of_gpt2_124m_by_hand():
    """GPT-2 124M (vocab 50257, T = 1024), counted by hand: per layer ln_1 1,536 + c_attn 1,771,776 +
    attn c_proj 590,592 + ln_2 1,536 + c_fc 2,362,368 + mlp c_proj 2,360,064 = 7,087,872; x 12 =
    85,054,464, + wte 38,597,376 + ln_f 1,536 = N = 123,653,376 without wpe (nanoGPT's "123.65M").
    nanoGPT's 6N + 12 L H Q T = 741,920,256 + 12 * 12 * 12 * 64 * 1024 (113,246,208) = 855,166,464."""
    with torch.device("meta"):  # shapes only: nothing allocated
        model = GPT(
            GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True)
        )
    assert model.get_num_params() == 123_653_376
    assert model.flops_per_token() == 855_166_464
    # nanoGPT's 480 sequences per iteration (12 x 40): 855,166,464 x 1024 x 480 = 420,331,420,385,280
    # FLOPs; in 2 s on a device whose peak is half of that per second, MFU is 1
    assert model.estimate_mfu(480, 2.0, peak_flops=210_165_710_192_640) == pytest.approx(1.0)


def test_tanh_gelu_is_selectable():
    exact, tanh = tiny_model(), tiny_model(gelu_approximate="tanh")
    idx = torch.randint(0, 65, (2, 16))
    diff = (exact(idx, idx)[0] - tanh(idx, idx)[0]).abs().max().item()
    assert 0 < diff < 1e-2  # same weights, slightly different activation


def test_auto_attention_picks_the_plain_path_for_cpu_bf16_training():
    """ "auto" = the plain path where the fused CPU kernel is slow (bf16 with gradients), else SDPA."""
    auto, manual, sdpa = (tiny_model(attention=a) for a in ("auto", "manual", "sdpa"))
    idx = torch.randint(0, 65, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(auto(idx, idx)[0], manual(idx, idx)[0])
        with torch.no_grad():
            assert torch.equal(auto(idx, idx)[0], sdpa(idx, idx)[0])
    assert torch.equal(auto(idx, idx)[0], sdpa(idx, idx)[0])  # float32
