"""SFT rows and batches: the loss trains on assistant tokens only (user tokens change no gradient, the loss
is the hand-computed mean over assistant tokens), best-fit packing, truncation and skips counted, val
split by whole conversations, batches reproducible and resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanogpt.chat.sft import SFTData, SFTLoader, best_fit, pack
from nanogpt.chat.template import Message, encode_conversation, template_for
from nanogpt.data.bpe import train_bpe
from nanogpt.data.tokenizers import IM_END
from nanogpt.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def bpe(shakespeare_text):
    return train_bpe([shakespeare_text[:60_000]], 400)


@pytest.fixture(scope="module")
def model(bpe):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=bpe.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32))


def _rows(bpe, conversations, block_size=96):
    template = template_for(bpe)
    encoded = [encode_conversation(bpe, template, c) for c in conversations]
    ids = [np.array(i) for i, _ in encoded]
    trained = [np.array(t) for _, t in encoded]
    return pack(ids, trained, block_size, template.bos, seed=0)


def _batch(bpe, conversations, block_size=96):
    packed = _rows(bpe, conversations, block_size)
    loader = SFTLoader({"train": (packed.tokens, packed.targets)}, len(packed.tokens))
    return loader.get_batch("train")


def test_a_conversations_loss_is_the_mean_over_its_assistant_tokens(bpe, model):
    conversation = [Message("user", "Who is the king?"), Message("assistant", "Richard, my lord.")]
    x, y = _batch(bpe, [conversation])
    _, loss = model(x, y)
    # by hand: the conversation's own ids and flags, every position's log-probability of the next id
    ids, trained = encode_conversation(bpe, template_for(bpe), conversation)
    inputs = torch.tensor([ids[:-1]])
    logits, _ = model(inputs, torch.zeros_like(inputs))  # (1, T, V): targets make every position's logits
    logp = F.log_softmax(logits[0].double(), dim=-1)
    terms = [-logp[t, ids[t + 1]] for t in range(len(ids) - 1) if trained[t + 1]]
    assert len(terms) == len(bpe.encode("Richard, my lord.")) + 1  # its tokens and <|im_end|>
    torch.testing.assert_close(loss.double(), torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


def test_a_changed_user_token_changes_no_gradient(bpe, model):
    def grads(last_user: str, answer: str = "Richard.") -> tuple[float, list[torch.Tensor]]:
        conversation = [
            Message("user", "Who is king?"),
            Message("assistant", answer),
            Message("user", last_user),
        ]
        x, y = _batch(bpe, [conversation])
        model.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = grads("Thanks, good sir")
    loss_b, grads_b = grads("Begone, villain")  # other user tokens, after every assistant token
    assert loss_a == loss_b and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    loss_c, grads_c = grads("Thanks, good sir", answer="Henry.")  # the control: an assistant token
    assert loss_c != loss_a and not all(torch.equal(a, c) for a, c in zip(grads_a, grads_c, strict=True))


def test_no_loss_gradient_reaches_a_non_assistant_position(bpe, model):
    conversation = [
        Message("system", "Speak as a knight."),
        Message("user", "Who is king?"),
        Message("assistant", "Richard."),
        Message("user", "And queen?"),
        Message("assistant", "Anne."),
    ]
    x, y = _batch(bpe, [conversation])
    logits, _ = model(x, y)
    logits.retain_grad()
    F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1).backward()
    touched = logits.grad.abs().sum(-1)[0] != 0  # (T,): positions whose logits the loss reads
    assert torch.equal(touched, y[0] != -1)
    assert bpe.decode(y[0][y[0] != -1].tolist()) == f"Richard.{IM_END}Anne.{IM_END}"


def test_best_fit_places_every_item_once_within_capacity():
    lengths = list(np.random.default_rng(0).integers(1, 60, 200))
    rows = best_fit(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) <= np.ceil(sum(lengths) / 100) * 1.1  # nearly full rows


def test_packing_keeps_conversations_whole_and_counts_cuts(bpe):
    short = [[Message("user", f"q{i}"), Message("assistant", f"a{i}")] for i in range(10)]
    long = [Message("user", "word " * 200), Message("assistant", "late")]  # its answer beyond the block
    long_answer = [Message("user", "hi"), Message("assistant", "word " * 200)]  # cut, still trains
    packed = _rows(bpe, [*short, long, long_answer], block_size=64)
    assert (packed.truncated, packed.dropped) == (2, 1)
    assert packed.tokens.shape[1] == 65 and packed.used < packed.tokens.size
    template = template_for(bpe)
    starts = (packed.tokens == template.bos) & np.roll(packed.tokens == template.start, -1, axis=1)
    assert starts.sum() == 11  # 10 short + the long answer, each starting at <|endoftext|><|im_start|>
    assert not packed.targets[starts].any()


def _write(path, conversations):
    with open(path, "w") as f:
        for i, turns in enumerate(conversations):
            f.write(json.dumps({"id": i, "messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
    return path


def test_sft_data_splits_by_conversation_and_reports(tmp_path, bpe, model, capsys):
    convs = [[("user", f"question {i}?"), ("assistant", f"answer {i}.")] for i in range(40)]
    convs += [[("system", "no reply here"), ("user", "hello")]]
    data = SFTData(str(_write(tmp_path / "c.jsonl", convs)), bpe.to_meta(), val_fraction=0.1, seed=3)
    assert data.skipped == 1 and len(data.splits["val"][0]) == 4 and len(data.splits["train"][0]) == 36
    as_text = {s: {bpe.decode(a.tolist()) for a in data.splits[s][0]} for s in ("train", "val")}
    assert not as_text["train"] & as_text["val"] and len(as_text["train"] | as_text["val"]) == 40
    data.pack(model, seed=3)
    out = capsys.readouterr().out
    assert (
        "train 36 conversations ->" in out
        and "0 cut to block_size" in out
        and "1 skipped (no assistant" in out
    )
    assert (
        data.tokenizer_meta["chat_template"]["format"] == "chatml"
        and "chat_template" not in data.meta["tokenizer"]
    )


def test_batches_resume_exactly_and_differ_across_ranks(bpe):
    convs = [[Message("user", f"q{i}"), Message("assistant", "a" * (i % 7 + 1))] for i in range(30)]
    packed = _rows(bpe, convs, block_size=24)
    rows = {"train": (packed.tokens, packed.targets)}
    loader = SFTLoader(rows, batch_size=4, seed=5)
    first = [loader.get_batch("train") for _ in range(3)]
    state = loader.state_dict()
    after = [loader.get_batch("train") for _ in range(6)]  # crosses epochs
    resumed = SFTLoader(rows, batch_size=4, seed=99)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    again = [resumed.get_batch("train") for _ in range(6)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(after, again, strict=True))
    replay = SFTLoader(rows, batch_size=4, seed=5)
    assert torch.equal(replay.get_batch("train")[0], first[0][0])
    other_rank = SFTLoader(rows, batch_size=4, seed=5, rank=1, world_size=2)
    assert not torch.equal(other_rank.get_batch("train")[0], first[0][0])


def test_two_conversations_split_one_and_one_whatever_the_fraction(tmp_path, bpe):
    convs = [[("user", "q1"), ("assistant", "a1")], [("user", "q2"), ("assistant", "a2")]]
    data = SFTData(str(_write(tmp_path / "two.jsonl", convs)), bpe.to_meta(), val_fraction=0.9, seed=0)
    assert (len(data.splits["train"][0]), len(data.splits["val"][0])) == (1, 1)
