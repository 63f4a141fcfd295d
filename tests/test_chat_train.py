"""`nanogpt train sft`: fine-tuning a base checkpoint on a conversation file stores the chat template with
the tokenizer, counts what it skipped, writes nothing for bad data, resumes exactly, and works with LoRA."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from nanogpt.chat.sft import fit_vocabulary
from nanogpt.chat.template import stored_template, template_for
from nanogpt.checkpoint import base_model, load_checkpoint, load_model, save_checkpoint
from nanogpt.cli import main as cli_main
from nanogpt.data.bpe import train_bpe
from nanogpt.data.tokenizers import GPT2Tokenizer
from nanogpt.errors import NanoGPTError
from nanogpt.lora import LoRAConfig, apply_lora
from nanogpt.model import GPT, GPTConfig
from nanogpt.options import set_fields
from nanogpt.train.config import TrainConfig
from nanogpt.train.metrics import read_metrics
from nanogpt.train.trainer import train


@pytest.fixture(scope="module")
def base(tmp_path_factory, shakespeare_text):
    """A base checkpoint: a random 2-layer model over a trained BPE (which reserves the chat tokens)."""
    tok = train_bpe([shakespeare_text[:60_000]], 400)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    folder = tmp_path_factory.mktemp("base")
    save_checkpoint(
        {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": tok.to_meta()}, folder
    )
    return folder


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "conv.jsonl"
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(30)
    ]
    lines.append({"messages": [{"role": "user", "content": "nobody answers this"}]})
    lines.append(
        {"conversations": [{"from": "human", "value": "long " * 100}, {"from": "gpt", "value": "ok"}]}
    )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# a few iterations of a tiny run, on the CPU in float32 (bit-for-bit comparable), two micro-steps, dropout
RUN = dict(
    batch_size=4, max_iters=6, eval_interval=3, eval_iters=2, learning_rate=1e-3, warmup_iters=1, lr_decay_iters=6,
    min_lr=1e-4, log_interval=1, gradient_accumulation_steps=2, device="cpu", dtype="float32", compile=False,
    progress="plain", bias=True, dropout=0.1,
)  # fmt: skip


def sft(base, data, out, **overrides) -> TrainConfig:
    values = dict(init_from=str(base), sft_data=str(data), out_dir=str(out), **RUN)
    return set_fields(TrainConfig(), {**values, **overrides}, where="test")


@pytest.mark.slow  # a 6-step training run through the CLI (~4 s)
def test_sft_run_stores_the_template_and_reports_its_data(base, conversations, tmp_path, capsys):
    out = tmp_path / "sft"
    options = dict(init_from=base, sft_data=conversations, out_dir=out, **RUN)
    assert cli_main(["train", "sft", *[f"--{k}={v}" for k, v in options.items()]]) == 0  # the preset
    log = capsys.readouterr().out
    assert (
        "1 skipped (no assistant turn)" in log
        and "1 cut to block_size (1 of them left with no assistant" in log
    )
    ckpt = load_checkpoint(out)
    template = stored_template(ckpt["tokenizer"])
    _, tokenizer = load_model(out)
    assert template is not None and template == template_for(tokenizer)
    assert stored_template(load_checkpoint(base)["tokenizer"]) is None  # the base stays a base model
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"messages": [{"role": "user", "content": "a"}', "conv.jsonl line 2: not valid JSON"),
        ('{"messages": [{"role": "bot", "content": "a"}]}', "conv.jsonl line 2: message 1 has unknown role"),
        (
            '{"messages": [{"role": "user", "content": ["a"]}]}',
            "conv.jsonl line 2: message 1's 'content' must",
        ),
    ],
)
def test_bad_data_is_refused_before_anything_is_written(base, tmp_path, line, message):
    data = tmp_path / "conv.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    data.write_text(json.dumps(good) + "\n" + line + "\n")
    out = tmp_path / "out"
    with pytest.raises(NanoGPTError, match=message):
        train(sft(base, data, out))
    assert not out.exists()


def test_a_base_without_chat_tokens_is_refused(tmp_path, conversations):
    from nanogpt.data.tokenizers import CharTokenizer

    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=1, n_embd=8))
    chars = CharTokenizer("".join(chr(32 + i) for i in range(65)))
    save_checkpoint(
        {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": chars.to_meta()},
        tmp_path / "char",
    )
    with pytest.raises(NanoGPTError, match="no chat tokens"):
        train(sft(tmp_path / "char", conversations, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # three short training runs
@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_sft_resumes_exactly(base, conversations, tmp_path, lora_rank):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(sft(base, conversations, whole, lora_rank=lora_rank))
    train(sft(base, conversations, part, lora_rank=lora_rank, max_iters=3))
    train(sft(base, conversations, part, lora_rank=lora_rank, init_from="resume"))
    loss = lambda out: {r["iter"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert loss(part) == loss(whole) and len(loss(whole)) == 6
    a, b = load_checkpoint(whole), load_checkpoint(part)
    assert a["model"].keys() == b["model"].keys() and all(
        torch.equal(a["model"][k], b["model"][k]) for k in a["model"]
    )
    assert stored_template(b["tokenizer"]) == stored_template(a["tokenizer"]) is not None
    if lora_rank:
        assert all(k.endswith((".lora_A", ".lora_B")) for k in a["model"])


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A small random GPT-2 in a HF folder: OpenAI's 50257 token rows, no padding (as GPT-2's weights)."""
    transformers = pytest.importorskip("transformers")
    try:
        GPT2Tokenizer()
    except NanoGPTError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_positions=64)
    folder = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_gpt2_weights_get_the_padded_vocabulary_for_the_chat_tokens(gpt2_folder):
    model = base_model(str(gpt2_folder))
    idx = torch.randint(0, 50257, (1, 12))
    before = model(idx, idx)[0]
    fit_vocabulary(model, 50258)
    after = model(idx, idx)[0]
    assert model.config.vocab_size == 50304 and model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(after[..., :50257], before, rtol=0, atol=0)  # the old tokens: unchanged
    wte = model.transformer.wte.weight
    assert torch.equal(wte[50300], wte[:50257].mean(0))
    lora = apply_lora(base_model(str(gpt2_folder)), LoRAConfig(4, 8.0, 0.0, ("c_attn",)))
    with pytest.raises(NanoGPTError, match="LoRA cannot add token rows"):
        fit_vocabulary(lora, 50258)


@pytest.mark.slow  # a training run with a 50k-token head (~4 s)
def test_sft_from_gpt2_weights(gpt2_folder, conversations, tmp_path, capsys):
    out = tmp_path / "sft"
    train(sft(gpt2_folder, conversations, out, max_iters=2, eval_interval=2, bias=True))
    assert "vocabulary padded from 50257 to 50304" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    assert (
        ckpt["model_args"]["vocab_size"] == 50304
        and ckpt["model"]["transformer.wte.weight"].shape[0] == 50304
    )
    template = stored_template(ckpt["tokenizer"])
    assert (template.start, template.end, template.bos) == (50257, 50258, 50256)
