"""Continuous batching (nanogpt.generate.BatchDecoder): every sequence of a batch gets the tokens it gets
decoded alone with the same seed, whatever its prompt length and whenever it joins or others leave."""

from __future__ import annotations

import pytest
import torch

from nanogpt import GPT, GPTConfig
from nanogpt.errors import NanoGPTError
from nanogpt.generate import BatchDecoder, Penalties, Sampling, generate_stream

# (step it joins at, prompt length, tokens to generate, seed): different lengths, joining and leaving
# at different steps, one finishing on its first token
REQUESTS = [(0, 3, 12, 1), (0, 17, 5, 2), (2, 1, 20, 3), (5, 9, 1, 4), (5, 30, 14, 5), (11, 6, 9, 6)]
SAMPLINGS = {
    "greedy": Sampling(temperature=0.0),
    "sampled": Sampling(temperature=1.0),
    "top_k_top_p": Sampling(temperature=0.8, top_k=20, top_p=0.9),
}


def tiny_model(attention: str, position: str = "learned") -> GPT:
    """A random model with weights 5x GPT-2's init: sharp attention and logits that depend on the
    context (at the usual init a greedy sequence repeats one token, which would hide a wrong mask)."""
    torch.manual_seed(0)
    shape = dict(block_size=48, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    model = GPT(GPTConfig(**shape, attention=attention, position=position))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    return model.eval()


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(50, (length,), generator=g).tolist() for _, length, _, _ in REQUESTS]


def decode_alone(model: GPT, prompt: list[int], n: int, sampling: Sampling, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    steps = generate_stream(model, torch.tensor([prompt]), n, sampling, generator=generator)
    return [int(t) for t in steps]


def decode_batched(model: GPT, prompts: list[list[int]], sampling: Sampling, rows: int) -> list[list[int]]:
    """Run REQUESTS through one BatchDecoder: each joins at its step and leaves once it has its tokens."""
    decoder = BatchDecoder(model, rows)
    out: list[list[int]] = [[] for _ in REQUESTS]

    def leave_finished():
        for key in list(decoder.keys):
            if len(out[key]) == REQUESTS[key][2]:
                decoder.leave(key)

    step = 0
    while step <= max(r[0] for r in REQUESTS) or decoder.keys:
        for key, (at, _, _, seed) in enumerate(REQUESTS):
            if at == step:
                generator = torch.Generator().manual_seed(seed)
                out[key].append(decoder.join(key, prompts[key], sampling, generator).token)
        leave_finished()
        if decoder.keys:
            for key, draw in zip(list(decoder.keys), decoder.step(), strict=True):
                out[key].append(draw.token)
            leave_finished()
        step += 1
    return out


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_batched_tokens_equal_each_sequence_decoded_alone(attention, name, position):
    model, sampling = tiny_model(attention, position), SAMPLINGS[name]
    batch = decode_batched(model, prompts(), sampling, rows=5)
    for key, (_, _, n, seed) in enumerate(REQUESTS):
        assert batch[key] == decode_alone(model, prompts()[key], n, sampling, seed), f"request {key}"


def test_seeds_matter_and_rows_are_reused():
    """Different seeds draw different tokens (the comparison above is not vacuous), and a decoder with
    fewer rows than requests over time serves them all as rows free up."""
    model = tiny_model("sdpa")
    a = decode_alone(model, [1, 2, 3], 20, SAMPLINGS["sampled"], seed=1)
    assert a != decode_alone(model, [1, 2, 3], 20, SAMPLINGS["sampled"], seed=2)
    batch = decode_batched(model, prompts(), SAMPLINGS["greedy"], rows=4)  # at most 4 at once here
    assert [len(tokens) for tokens in batch] == [n for _, _, n, _ in REQUESTS]


def test_join_refuses_a_full_batch_or_a_prompt_that_does_not_fit():
    decoder = BatchDecoder(tiny_model("sdpa"), rows=1)
    with pytest.raises(NanoGPTError, match="1..47 fit"):
        decoder.join("long", list(range(48)), Sampling())
    decoder.join("a", [1], Sampling())
    with pytest.raises(NanoGPTError, match="1/1 sequences"):
        decoder.join("b", [1], Sampling())
    decoder.leave("a")
    assert decoder.free == 1


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_a_row_that_fails_leaves_nothing_behind(attention):
    """A sequence whose logits turn NaN mid-decoding (logit_bias makes it read the poisoned token) fails
    alone, in its own Draw; a shorter sequence that then takes its row, beside a longer one (so its
    attention spans the stale, masked slots), decodes exactly as alone: a masked slot still multiplies
    its value by 0, and 0 * NaN is NaN, so a row's slots are zeroed when it is reused."""
    model = tiny_model(attention)
    with torch.no_grad():  # untied: only a sequence that reads token 7 gets NaN
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
        model.transformer.wte.weight[7] = float("nan")
    greedy = Sampling(temperature=0.0)
    decoder = BatchDecoder(model, rows=3)
    to_poison = Penalties(logit_bias=((7, 100.0),))
    assert decoder.join("bad", [1, 2, 3, 4, 5], greedy, penalties=to_poison).token == 7
    assert decoder.join("bad2", [3, 3], greedy, penalties=to_poison).token == 7
    assert all(d.error and d.token == -1 for d in decoder.step())  # their NaN keys/values are cached
    decoder.leave("bad")  # "bad2" (the last row) moves into row 0, then leaves too
    decoder.leave("bad2")
    ok = [[2, 4], list(range(10, 30))]
    out = {key: [decoder.join(key, ok[key], greedy).token] for key in (0, 1)}
    for _ in range(10):
        for key, draw in zip(list(decoder.keys), decoder.step(), strict=True):
            assert draw.error is None
            out[key].append(draw.token)
    for key in (0, 1):
        assert out[key] == decode_alone(model, ok[key], 11, greedy, seed=0), key


def test_rows_never_draw_or_list_ids_past_the_tokenizers_vocabulary():
    """Two rows whose sampling's vocab_size is 30 (of the model's 50), the model's likeliest token
    padding id 45 (ln_f's bias adds 3 to every feature, wte[45] is all ones): each draws below 30,
    lists only ids below 30 in its top log-probs, and every log-prob is the full forward pass's
    renormalised over ids 0..29 (1e-4); the tokens are those of each sequence decoded alone."""
    model = tiny_model("sdpa")
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(3.0)
        model.transformer.wte.weight[45] = 1.0
    sampling = Sampling(temperature=1.0, vocab_size=30)
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    decoder = BatchDecoder(model, rows=2)
    draws = {
        k: [decoder.join(k, p, sampling, torch.Generator().manual_seed(k), top=5)]
        for k, p in enumerate(prompts)
    }
    for _ in range(8):
        for k, draw in zip(list(decoder.keys), decoder.step(), strict=True):
            draws[k].append(draw)
    for k, prompt in enumerate(prompts):
        tokens = [d.token for d in draws[k]]
        assert tokens == decode_alone(model, prompt, 9, sampling, seed=k)
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits, _ = model(ids, ids)  # (1, T, 50): every position's
        assert int(logits[0, -1].argmax()) == 45
        reference = torch.log_softmax(logits[0, :, :30], dim=-1)
        for i, d in enumerate(draws[k]):
            pos = len(prompt) - 1 + i
            assert abs(d.logprob - float(reference[pos, d.token])) < 1e-4
            assert [t for t, _ in d.top] == torch.topk(reference[pos], 5).indices.tolist()
        assert max(tokens) < 30
