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


def favour_padding(model: GPT, token: int) -> GPT:
    """Make the model's likeliest next token, everywhere, the (padding) id `token`: ln_f's bias adds 3 to
    every feature and wte[token] (tied to lm_head) is all ones, so its logit is 3 * n_embd + 0 (ln_f's
    normalised part sums to 0) against ~N(0, 0.4) for the others."""
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(3.0)
        model.transformer.wte.weight[token] = 1.0
    return model


CHAR_VOCAB = "".join(sorted(" abcdefghijklmnopq\n"))  # 19 characters; the model's vocabulary is 65
DRAWS = [
    dict(temperature=1.0),
    dict(temperature=0.0),
    dict(temperature=2.0, top_k=40),
    dict(temperature=1.0, top_p=0.5),
]


def test_the_padding_is_the_models_choice_unless_masked():
    """The fault the mask fixes, reproduced: unmasked, the model draws the padding id it favours."""
    model = favour_padding(tiny_model(), 60)
    drawn = generate(
        model, torch.zeros(1, 3, dtype=torch.long), 8, generator=torch.Generator().manual_seed(0)
    )
    assert (drawn[0, 3:] == 60).all()


def test_masked_draws_keep_the_valid_ids_distribution():
    """Over the ids below vocab_size the masked softmax is the model's distribution renormalised
    (float64 reference, 1e-6); padded ids have probability 0; and 20,000 draws (each option) never give
    a padded id and hit each valid id as often as 20,000 draws from the valid ids' logits alone (within
    0.02: 4 standard errors of the difference at p = 0.5)."""
    from nanogpt.model import decodable_logits, sample_next_token

    n = len(CHAR_VOCAB)
    model = favour_padding(tiny_model(), 60)
    logits, _ = model(torch.randint(0, n, (4, 10)))  # (4, 1, 65)
    logits = logits[:, -1, :]
    model_probs = torch.softmax(logits.double(), dim=-1)
    renormalised = model_probs[:, :n] / model_probs[:, :n].sum(-1, keepdim=True)
    masked = torch.softmax(decodable_logits(logits, n), dim=-1)
    assert torch.allclose(masked[:, :n].double(), renormalised, rtol=0, atol=1e-6)
    assert (masked[:, n:] == 0).all() and model_probs[:, 60].min() > 0.99
    rows = logits[:1].expand(20_000, -1)
    for options in DRAWS:
        generator = torch.Generator().manual_seed(0)
        got = sample_next_token(rows, **options, generator=generator, vocab_size=n)
        want = sample_next_token(rows[:, :n], **options, generator=generator)
        assert int(got.max()) < n, options
        frequency = [torch.bincount(d[:, 0], minlength=n) / len(d) for d in (got, want)]
        assert (frequency[0] - frequency[1]).abs().max() < 0.02, options


@pytest.mark.parametrize("options", DRAWS)
def test_sample_decodes_a_model_that_favours_a_padding_id(options):
    """`nanogpt sample`'s decoding (stream_text) of a model whose likeliest token is a padding id: every
    token has text (before the mask, decoding raised on the id outside the tokenizer's vocabulary)."""
    from nanogpt.data.tokenizers import CharTokenizer
    from nanogpt.sample import SampleConfig, stream_text

    tok = CharTokenizer(CHAR_VOCAB)
    model = favour_padding(tiny_model(), 60)
    cfg = SampleConfig(max_new_tokens=30, **{"top_k": None, **options})
    text = "".join(stream_text(model, tok, tok.encode("abc"), cfg, torch.Generator().manual_seed(1)))
    assert len(text) == 30 and set(text) <= set(CHAR_VOCAB)


def test_chat_replies_from_a_model_that_favours_a_padding_id():
    """A chat session on GPT-2's BPE (the chat tokenizer's 50,259 ids: 50257/50258 are <|im_start|> and
    <|im_end|>) with a 50,304-id model whose likeliest token is padding id 50300: the reply is the text of
    the ids it draws below 50,259 (before the mask the padding id ended it at once, empty)."""
    from nanogpt.chat.main import ChatConfig, ChatSession
    from nanogpt.chat.template import ChatTokenizer, Message, encode_prompt, template_for
    from nanogpt.data.tokenizers import GPT2Tokenizer
    from nanogpt.generate import generate_stream

    try:
        base = GPT2Tokenizer()
    except NanoGPTError as e:
        pytest.skip(str(e))
    template = template_for(base)
    tok = ChatTokenizer(base, template)
    model = favour_padding(tiny_model(block_size=64, vocab_size=50304, n_layer=1), 50300)
    cfg = ChatConfig(max_new_tokens=12, temperature=1.0, top_k=None)
    session = ChatSession(model, tok, template, cfg)
    reply = "".join(session.reply("Hi"))
    prompt = torch.tensor([encode_prompt(tok, template, [Message("user", "Hi")])])
    steps = generate_stream(model, prompt, 12, Sampling(1.0, vocab_size=tok.vocab_size),
                            generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip
    ids = [int(t) for t in steps]
    assert tok.vocab_size == 50259 and max(ids) < 50259
    expected = tok.decode(ids[: next((i for i, t in enumerate(ids) if t in template.stops()), len(ids))])
    assert reply == expected and reply
