"""`nanogpt sample`: determinism for a seed, streaming equal to GPT.generate, BPE streaming that never
breaks a character, and clear errors for bad prompts and bad checkpoints."""

from __future__ import annotations

import io
import random
from dataclasses import asdict

import pytest
import torch

from nanogpt import GPT, GPTConfig
from nanogpt.checkpoint import save_checkpoint
from nanogpt.cli import main as cli
from nanogpt.data.tokenizers import CharTokenizer, get_tokenizer
from nanogpt.errors import NanoGPTError
from nanogpt.sample import SampleConfig, encode_prompt, sample, stream_text

TINY = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def char_ckpt(shakespeare_text, tmp_path_factory):
    """out_dir of a tiny character model trained for 150 steps on tiny Shakespeare (about a second)."""
    tok = CharTokenizer.from_text(shakespeare_text)
    data = torch.tensor(tok.encode(shakespeare_text[:100_000]))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, **TINY))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        starts = torch.randint(len(data) - 33, (16,))
        x = torch.stack([data[s : s + 32] for s in starts])
        y = torch.stack([data[s + 1 : s + 33] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # it learnt something (ln 65 = 4.17 at chance); the mean of 10 batches, as one batch's loss and the
    # exact trajectory vary with the CPU's kernels and thread count (2.66-2.80 seen)
    assert sum(losses[-10:]) / 10 < 3.0 < losses[0]
    out_dir = tmp_path_factory.mktemp("char_model")
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": tok.to_meta()}
    save_checkpoint(ckpt, out_dir)
    return out_dir


def run_sample(out_dir, **options) -> str:
    out = io.StringIO()
    cfg = SampleConfig(
        out_dir=str(out_dir), device="cpu", **{"num_samples": 2, "max_new_tokens": 40, **options}
    )
    sample(cfg, out)
    return out.getvalue()


def test_sampling_is_deterministic_for_a_seed_and_decodes_to_text(char_ckpt, shakespeare_text):
    first = run_sample(char_ckpt, start="ROMEO:", seed=7)
    assert run_sample(char_ckpt, start="ROMEO:", seed=7) == first
    assert run_sample(char_ckpt, start="ROMEO:", seed=8) != first
    samples = first.split("\n---------------\n")[:-1]
    assert len(samples) == 2 and samples[0] != samples[1]
    for s in samples:
        assert s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 40  # one character per token
        assert set(s) <= set(shakespeare_text)


def test_streamed_text_equals_generate(char_ckpt):
    """The streamed pieces join to exactly what GPT.generate returns for the same generator seed."""
    from nanogpt.checkpoint import load_model

    model, tok = load_model(char_ckpt)
    cfg = SampleConfig(max_new_tokens=50, temperature=0.9, top_k=20)  # 50 > block_size: the sliding phase too
    prompt = tok.encode("KING:")
    pieces = list(stream_text(model, tok, prompt, cfg, torch.Generator().manual_seed(3)))
    ref = model.generate(
        torch.tensor([prompt]), 50, 0.9, top_k=20, generator=torch.Generator().manual_seed(3)
    )
    assert len(pieces) == 50
    assert "".join(pieces) == tok.decode(ref[0, len(prompt) :].tolist())


def scripted(ids: list[int]):
    """Stands in for the engine's generate_stream: yields a fixed list of token ids."""

    def generate_stream(model, idx, max_new_tokens, *args, **kwargs):
        yield from (torch.tensor([[i]]) for i in ids[:max_new_tokens])

    return generate_stream


def test_bpe_streaming_never_splits_a_character_and_stops_at_eot(monkeypatch):
    tok = get_tokenizer("gpt2")
    ids = tok.encode("a😀b é") + [tok.eot] + tok.encode("never shown")
    assert len(tok.encode("😀")) > 1  # the emoji spans two tokens: the case under test
    monkeypatch.setattr("nanogpt.sample.generate_stream", scripted(ids))
    model = torch.nn.Linear(1, 1)  # stream_text reads the device from a parameter
    pieces = list(stream_text(model, tok, [0], SampleConfig(max_new_tokens=len(ids)), torch.Generator()))
    assert "".join(pieces) == "a😀b é"
    assert not any("\ufffd" in p for p in pieces)
    everything = SampleConfig(max_new_tokens=len(ids), stop_at_eot=False)
    assert "".join(stream_text(model, tok, [0], everything, torch.Generator())).endswith("never shown")


def test_prompt_from_file(char_ckpt, tmp_path):
    (tmp_path / "prompt.txt").write_text("JULIET:\nO Romeo", encoding="utf-8")
    text = run_sample(char_ckpt, start=f"FILE:{tmp_path / 'prompt.txt'}", num_samples=1, max_new_tokens=5)
    assert text.startswith("JULIET:\nO Romeo")


def test_prompt_longer_than_block_size_keeps_its_end(char_ckpt, capsys):
    prompt = "".join("abcdefghij"[i % 10] for i in range(100))
    text = run_sample(char_ckpt, start=prompt, num_samples=1, max_new_tokens=3)
    assert text.startswith(prompt[-32:]) and not text.startswith(prompt[-33:])
    assert "100 tokens" in capsys.readouterr().err


def test_empty_prompt_without_eot_is_an_error():
    with pytest.raises(NanoGPTError, match="prompt is empty"):
        encode_prompt("", CharTokenizer("ab"), 8)
    assert encode_prompt("", get_tokenizer("gpt2"), 8) == [50256]


def test_unknown_character_is_named_by_the_cli(char_ckpt, capsys):
    assert cli(["sample", f"--out_dir={char_ckpt}", "--start=ROMEO ☃ says", "--device=cpu"]) == 1
    err = capsys.readouterr().err
    assert "'☃'" in err and "position 6" in err and "Traceback" not in err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert cli(["sample", f"--out_dir={tmp_path / 'nothing'}", "--device=cpu"]) == 1
    assert "no checkpoint at" in capsys.readouterr().err


# random bytes whose unpickling fails with UnpicklingError, IndexError, KeyError and UnicodeDecodeError
@pytest.mark.parametrize("damage", ["garbage-0", "garbage-2", "garbage-20", "garbage-195", "truncated"])
def test_damaged_checkpoint_is_a_clear_error(char_ckpt, tmp_path, capsys, damage):
    good = (char_ckpt / "ckpt.pt").read_bytes()
    if damage == "truncated":
        (tmp_path / "ckpt.pt").write_bytes(good[: len(good) // 2])
    else:
        (tmp_path / "ckpt.pt").write_bytes(random.Random(int(damage.split("-")[1])).randbytes(1000))
    assert cli(["sample", f"--out_dir={tmp_path}", "--device=cpu"]) == 1
    assert "damaged or not a nanogpt checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--temperature=-1", "temperature"),
        ("--top_p=1.5", "top_p"),
        ("--dtype=float8", "dtype"),
        ("--topk=3", "top_k"),
    ],
)
def test_bad_options_are_clear_errors(arg, message, capsys):
    assert cli(["sample", arg]) == 1
    assert message in capsys.readouterr().err


def test_samples_a_local_hf_folder(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from nanogpt.hf import export

    torch.manual_seed(0)
    export(GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=32)), tmp_path / "hf")
    text = run_sample("", init_from=str(tmp_path / "hf"), start="Hello", num_samples=1, stop_at_eot=False)
    assert text.startswith("Hello") and len(text) > len("Hello")


def test_extreme_options_and_nan_weights_are_one_line(char_ckpt, tmp_path, capsys):
    """A tiny positive temperature samples (near-greedy); a seed beyond 64 bits and a checkpoint with a NaN
    weight are one line each, exit 1, no traceback."""
    args = ["sample", f"--out_dir={char_ckpt}", "--device=cpu", "--num_samples=1", "--max_new_tokens=5"]
    assert cli([*args, "--temperature=1e-300"]) == 0
    capsys.readouterr()
    assert cli([*args, "--seed=18446744073709551616"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed must be in [0, 2**64)" in err, err
    ckpt = torch.load(char_ckpt / "ckpt.pt", weights_only=True)
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_checkpoint(ckpt, tmp_path / "nan")
    assert cli([*args[:1], f"--out_dir={tmp_path / 'nan'}", *args[2:]]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transformer.h.0.mlp.c_fc.weight holds NaN" in err, err


def test_sigterm_while_sampling_is_one_line_and_143(char_ckpt, monkeypatch, capsys):
    import os
    import signal

    import nanogpt.sample as sample_module

    def terminated_midway(model, tokenizer, prompt_ids, cfg, generator):
        yield "a"
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the main thread, as from `kill PID`
        yield "b"

    monkeypatch.setattr(sample_module, "stream_text", terminated_midway)
    assert cli(["sample", f"--out_dir={char_ckpt}", "--device=cpu", "--num_samples=1"]) == 143
    err = capsys.readouterr().err
    assert err.strip() == "terminated", err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back after the command


def test_a_flag_that_would_not_be_read_is_refused(char_ckpt, capsys):
    """--out_dir beside --init_from (the model is init_from's), --meta with a checkpoint of ours (its own
    tokenizer is used): refused with one line, as export refuses them."""
    for cmd in (
        ["sample", "--num_samples=1", "--max_new_tokens=2"],
        ["export", "--format=ckpt", "--to=unused"],
    ):
        assert cli([*cmd, f"--init_from={char_ckpt}", "--out_dir=elsewhere"]) == 1
        assert "both name the model" in capsys.readouterr().err
        assert cli([*cmd, f"--out_dir={char_ckpt}", "--meta=meta.pkl"]) == 1
        assert "--meta=meta.pkl is read only with a karpathy/nanoGPT checkpoint" in capsys.readouterr().err
