"""GPT-2 weight interop against Hugging Face transformers, offline: a small random GPT2LMHeadModel saved
to a temp folder stands in for the hub's weights (same code path, same parameter names)."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nanogpt import GPT, GPTConfig  # noqa: E402
from nanogpt.hf import export  # noqa: E402


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=50257, n_positions=128)
    model = transformers.GPT2LMHeadModel(config)
    # random LayerNorm gains/biases too, so a missed or transposed copy cannot hide behind 1s and 0s
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_model(hf_folder):
    return transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def test_import_matches_hf_logits(hf_folder, hf_model):
    ours = GPT.from_pretrained(str(hf_folder)).eval()
    assert ours.config.gelu_approximate == "tanh" and ours.config.block_size == 128
    torch.manual_seed(1)
    for shape in [(1, 1), (3, 37), (2, 128)]:
        idx = torch.randint(0, 50257, shape)
        logits, _ = ours(idx, idx)
        torch.testing.assert_close(logits, hf_logits(hf_model, idx), atol=1e-5, rtol=0)


def test_export_roundtrip_through_hf(tmp_path):
    torch.manual_seed(2)
    ours = GPT(GPTConfig(block_size=64, vocab_size=500, n_layer=2, n_head=4, n_embd=32)).eval()
    export(ours, tmp_path / "exported")
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "exported"))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    idx = torch.randint(0, 500, (3, 64))
    torch.testing.assert_close(ours(idx, idx)[0], hf_logits(theirs, idx), atol=1e-5, rtol=0)
    # and back again
    again = GPT.from_pretrained(str(tmp_path / "exported")).eval()
    torch.testing.assert_close(again(idx, idx)[0], ours(idx, idx)[0], atol=1e-6, rtol=0)


def test_export_model_without_biases(tmp_path):
    torch.manual_seed(3)
    ours = GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=1, n_head=2, n_embd=16, bias=False)).eval()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(export(ours, tmp_path / "nobias")).eval()
    idx = torch.randint(0, 100, (2, 32))
    torch.testing.assert_close(ours(idx, idx)[0], hf_logits(theirs, idx), atol=1e-5, rtol=0)


def test_greedy_generation_matches_hf(hf_folder, hf_model):
    ours = GPT.from_pretrained(str(hf_folder)).eval()
    prompt = torch.randint(0, 50257, (2, 7), generator=torch.Generator().manual_seed(4))
    expected = hf_model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=30,
        do_sample=False,
        pad_token_id=50256,
    )
    assert torch.equal(ours.generate(prompt, 30, temperature=0.0), expected)


def test_only_dropout_may_be_overridden(hf_folder):
    model = GPT.from_pretrained(str(hf_folder), override_args={"dropout": 0.1})
    assert model.config.dropout == 0.1
    with pytest.raises(ValueError, match="only 'dropout'"):
        GPT.from_pretrained(str(hf_folder), override_args={"n_layer": 3})


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a GPT-2 name"):
        GPT.from_pretrained(str(tmp_path / "missing"))


def test_hub_name_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ValueError, match="could not load GPT-2 weights 'gpt2'"):
        GPT.from_pretrained("gpt2")
