"""The decoding engine (nanogpt/generate.py): its caches and steps against the full forward, and its tokens
against GPT.generate, the plain reference loop (recompute every step)."""

from __future__ import annotations

import pytest
import torch

from nanogpt import GPT, GPTConfig
from nanogpt.errors import NanoGPTError
from nanogpt.generate import Sampling, StaticKVCache, generate, one_position_kernels

TINY = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_static_cache_forward_matches_full_forward(attention):
    """The static cache (fixed shapes, for CUDA graphs) attends over all 16 slots with the unfilled ones
    masked, at positions the caller sets: prompt, one token (in the kernels the engine decodes with),
    then three at once all equal the full sequence's logits."""
    model = tiny_model(attention=attention)
    idx = torch.randint(0, 65, (2, 12))
    full, _ = model(idx, idx)
    pos = torch.zeros(1, dtype=torch.long)
    cache = [StaticKVCache(16, pos) for _ in range(2)]
    pieces = [model(idx[:, :8], idx[:, :8], kv_cache=cache)[0]]
    pos.fill_(8)
    with one_position_kernels(idx.device, torch.float32):
        pieces.append(model(idx[:, 8:9], idx[:, 8:9], kv_cache=cache)[0])
    pos.fill_(9)
    pieces.append(model(idx[:, 9:], idx[:, 9:], kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=10), dict(top_p=0.9)],
)
def test_engine_equals_the_reference_loop(batch, sampling):
    """Same seed -> the engine's tokens are GPT.generate's recomputing ones, also well past block_size (16):
    40 new tokens after a 5-token prompt. Float64, so a difference is a logic error, not rounding."""
    model = tiny_model().double()
    prompt = torch.randint(0, 65, (batch, 5))
    reference = model.generate(
        prompt, 40, use_cache=False, generator=torch.Generator().manual_seed(1), **sampling
    )
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(1)
        ours = generate(model, prompt, 40, sampling=Sampling(**sampling), use_cache=use_cache, generator=gen)
        assert torch.equal(ours, reference)


def test_engine_with_a_prompt_longer_than_block_size():
    model = tiny_model().double()
    prompt = torch.randint(0, 65, (2, 30))
    assert torch.equal(
        generate(model, prompt, 5, sampling=Sampling(temperature=0.0)),
        model.generate(prompt, 5, temperature=0.0, use_cache=False),
    )


def test_generated_tokens_can_be_trained_on():
    """The engine runs in inference mode; what generate returns is a normal tensor, so training on the
    samples (self-training, RL) works: autograd saves the ids in the embedding's backward."""
    model = tiny_model()
    ids = generate(model, torch.randint(0, 65, (2, 3)), 6)
    assert not ids.is_inference()
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert model.transformer.wte.weight.grad is not None


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (dict(idx=torch.zeros(1, 3)), "integer token ids"),
        (dict(idx=torch.full((1, 3), 65)), "token ids must be in 0..64"),
        (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "idx is empty"),
    ],
)
def test_bad_generate_arguments_are_named(args, message):
    """The API checks what the CLI checks, so a library user or a server gets the same one-line error."""
    model = tiny_model()
    call = dict(idx=torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2) | args
    engine = lambda idx, max_new_tokens, **kw: generate(model, idx, max_new_tokens, sampling=Sampling(**kw))
    for run in (model.generate, engine):
        with pytest.raises(NanoGPTError, match=message.replace("(", r"\(").replace(")", r"\)")):
            run(**call)


def test_decoding_steps_leave_onednn_only_in_float32_on_a_cpu():
    """oneDNN is off inside the context for float32 CPU work only (bf16 matmuls need it) and is restored
    after, also when the step raises."""
    cpu, onednn = torch.device("cpu"), lambda: torch.backends.mkldnn.enabled
    assert onednn()
    with one_position_kernels(cpu, torch.float32):
        assert not onednn()
    assert onednn()
    with one_position_kernels(cpu, torch.bfloat16):
        assert onednn()
    with torch.autocast("cpu", dtype=torch.bfloat16), one_position_kernels(cpu, torch.float32):
        assert onednn()
    with pytest.raises(ValueError), one_position_kernels(cpu, torch.float32):
        raise ValueError
    assert onednn()


def test_a_static_cache_of_learned_positions_refuses_to_wrap():
    """Past max_len a learned-position model's static cache would write position p into slot p % max_len
    over a key still in use: it refuses (a rotary one rolls there, tested in test_model_options)."""
    model = tiny_model()
    pos = torch.zeros(1, dtype=torch.long)
    cache = [StaticKVCache(4, pos, rolling=False) for _ in model.transformer.h]
    model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
    pos.fill_(4)
    with pytest.raises(NanoGPTError, match="holds 4 positions: it cannot take position 4"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
