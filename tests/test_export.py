"""`nanogpt export`: GGUF read back by gguf's reader (every tensor ours) and loaded by transformers (same
logits, same token ids); a LoRA run merged into a checkpoint of ours and into HF; clear errors for what
GGUF cannot hold."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

from nanogpt import GPT, GPTConfig
from nanogpt.checkpoint import load_model, save_checkpoint
from nanogpt.cli import main as cli_main
from nanogpt.data.tokenizers import get_tokenizer
from nanogpt.errors import NanoGPTError
from nanogpt.export import ExportConfig, export
from nanogpt.lora import LoRAConfig, apply_lora, lora_entry, weights_sha256

gguf = pytest.importorskip("gguf")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
GPT2_TINY = dict(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, bias=True)


def our_checkpoint(folder, model: GPT, tokenizer) -> None:
    from dataclasses import asdict

    ckpt = {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": tokenizer.to_meta()}
    save_checkpoint(ckpt, folder)


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """A checkpoint of ours: a small GPT-2-shaped model (padded GPT-2 vocabulary, tanh GELU) with GPT-2 BPE."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT2_TINY, gelu_approximate="tanh")).eval()
    folder = tmp_path_factory.mktemp("run")
    our_checkpoint(folder, model, get_tokenizer("gpt2"))
    return folder, model


@pytest.fixture(scope="module")
def gguf_file(gpt2_run, tmp_path_factory):
    folder, _ = gpt2_run
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    assert (
        cli_main(["export", f"--out_dir={folder}", "--format=gguf", f"--to={path}", "--dtype=float32"]) == 0
    )
    return path


@pytest.mark.slow
def test_gguf_reader_sees_every_tensor_and_the_vocabulary(gguf_file, gpt2_run):
    _, model = gpt2_run
    reader = gguf.GGUFReader(gguf_file)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    sd = model.state_dict()
    assert len(tensors) == 5 + 12 * model.config.n_layer  # wte, wpe, ln_f (2), output + 12 a block
    np.testing.assert_array_equal(tensors["token_embd.weight"], sd["transformer.wte.weight"].numpy())
    np.testing.assert_array_equal(tensors["output.weight"], sd["lm_head.weight"].numpy())
    np.testing.assert_array_equal(
        tensors["blk.1.attn_qkv.weight"], sd["transformer.h.1.attn.c_attn.weight"].numpy()
    )
    np.testing.assert_array_equal(
        tensors["blk.0.ffn_down.bias"], sd["transformer.h.0.mlp.c_proj.bias"].numpy()
    )
    np.testing.assert_array_equal(tensors["output_norm.weight"], sd["transformer.ln_f.weight"].numpy())
    field = lambda key: reader.fields[key]
    assert bytes(field("general.architecture").parts[-1]).decode() == "gpt2"
    assert (
        int(field("gpt2.context_length").parts[-1][0]) == 64
        and int(field("gpt2.block_count").parts[-1][0]) == 2
    )
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens.data) == 50304  # 50257 GPT-2 tokens + 47 unused [PAD<id>]
    token = lambda i: bytes(tokens.parts[tokens.data[i]]).decode()
    assert token(50256) == "<|endoftext|>" and token(50303) == "[PAD50303]" and token(15496) == "Hello"


@pytest.mark.slow
def test_gguf_float16_and_bfloat16_hold_our_weights_rounded(gpt2_run, tmp_path):
    folder, model = gpt2_run
    wte = model.state_dict()["transformer.wte.weight"]
    for dtype, torch_dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        path = export(
            ExportConfig(out_dir=str(folder), format="gguf", to=str(tmp_path / f"{dtype}.gguf"), dtype=dtype)
        )
        reader = gguf.GGUFReader(path)
        t = next(t for t in reader.tensors if t.name == "token_embd.weight")
        data = np.array(t.data)
        got = (
            torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
            if dtype == "bfloat16"
            else torch.from_numpy(data)
        )
        assert torch.equal(got.reshape(wte.shape), wte.to(torch_dtype)), dtype
        bias = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.bias")
        assert (
            np.array(bias.data).dtype == np.float32
        )  # vectors stay float32, as llama.cpp's converter writes


@pytest.mark.slow  # transformers converts the 50k-token GGUF vocabulary in ~40 s on a busy 2-core machine
def test_transformers_loads_the_gguf_with_our_logits_and_token_ids(gguf_file, gpt2_run):
    transformers = pytest.importorskip("transformers")
    _, model = gpt2_run
    # transformers reads gpt2.context_length as n_ctx, not n_positions (the position table): say it
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, n_positions=model.config.block_size
    ).eval()
    torch.manual_seed(1)
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx, idx)[0], atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    text = "Hello world, it's a test.\n\n  ROMEO: ok 123 — ünïcödé 日本\t"
    assert hf_tok.encode(text) == get_tokenizer("gpt2").encode(text)
    assert hf_tok.eos_token_id == 50256  # (the text "<|endoftext|>" is that id to HF, plain text to us)


def test_gguf_refuses_characters_and_non_gpt2_options(tmp_path, data_dir):
    from nanogpt.data.tokenizers import CharTokenizer

    model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=1, n_embd=8))
    our_checkpoint(tmp_path / "char", model, CharTokenizer("".join(chr(32 + i) for i in range(65))))
    with pytest.raises(NanoGPTError, match="byte-level BPE"):
        export(ExportConfig(out_dir=str(tmp_path / "char"), format="gguf", to=str(tmp_path / "x.gguf")))
    assert not (tmp_path / "x.gguf").exists()
    our_checkpoint(tmp_path / "rope", GPT(GPTConfig(**GPT2_TINY, position="rope")), get_tokenizer("gpt2"))
    with pytest.raises(NanoGPTError, match="position='rope'.*--format=ckpt"):
        export(ExportConfig(out_dir=str(tmp_path / "rope"), format="gguf", to=str(tmp_path / "y.gguf")))
    assert not (tmp_path / "y.gguf").exists()


@pytest.mark.slow
def test_lora_run_merges_into_a_checkpoint_and_hf(gpt2_run, tmp_path):
    """A LoRA checkpoint (adapters + base reference) exports merged: the same logits as the unmerged model,
    as a checkpoint of ours and through transformers."""
    folder, _ = gpt2_run
    base, tokenizer = load_model(folder)
    entry = lora_entry(LoRAConfig(rank=4), str(folder), weights_sha256(base))
    model = apply_lora(base, LoRAConfig(rank=4)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    ckpt = {
        "model": {k: v for k, v in model.state_dict().items() if "lora_" in k},
        "model_args": GPTConfig(**GPT2_TINY, gelu_approximate="tanh").__dict__,
        "tokenizer": tokenizer.to_meta(),
        "lora": entry,
    }
    save_checkpoint(ckpt, tmp_path / "lora")
    idx = torch.randint(0, 50257, (2, 64))
    expected = model(idx, idx)[0]
    merged_dir = export(
        ExportConfig(out_dir=str(tmp_path / "lora"), format="ckpt", to=str(tmp_path / "merged"))
    )
    merged, _ = load_model(merged_dir.parent)
    assert not any("lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(idx, idx)[0], expected, atol=1e-5, rtol=0)
    transformers = pytest.importorskip("transformers")
    hf_dir = export(ExportConfig(out_dir=str(tmp_path / "lora"), format="hf", to=str(tmp_path / "hf")))
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, expected, atol=1e-5, rtol=0)


def _tokenizer(kind: str):
    from nanogpt.data.bpe import train_bpe
    from nanogpt.data.tokenizers import ByteTokenizer, CharTokenizer

    if kind == "char":
        return CharTokenizer("\n !',.:;?" + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return train_bpe(["To be, or not to be: that is the question. Ünïcödé 日本語\n\n  x" * 50], 300)
    return get_tokenizer("gpt2")


@pytest.mark.parametrize("kind", ["char", "byte", pytest.param("gpt2", marks=pytest.mark.slow), "bpe"])
def test_hf_export_tokenizer_loads_in_transformers_and_generates_our_ids(tmp_path, kind):
    """Every vocabulary of ours: AutoTokenizer gives our ids and our text back, and `generate` on them
    (greedy) continues with the tokens our model picks."""
    transformers = pytest.importorskip("transformers")
    tok = _tokenizer(kind)
    torch.manual_seed(4)
    vocab = 50304 if kind == "gpt2" else -(-tok.vocab_size // 64) * 64
    model = GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16)).eval()
    our_checkpoint(tmp_path / "run", model, tok)
    assert (
        cli_main(["export", f"--out_dir={tmp_path / 'run'}", "--format=hf", f"--to={tmp_path / 'hf'}"]) == 0
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "ROMEO: to be, or not to be!\n\n  that is it. " + ("" if kind == "char" else "Ünïcödé 日本語\t")
    ids = tok.encode(text)
    assert hf_tok.encode(text) == ids
    assert hf_tok.decode(ids) == tok.decode(ids) == text
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    prompt = hf_tok(text[:12], return_tensors="pt")
    out = hf.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    idx = torch.tensor([ids[: prompt["input_ids"].shape[1]]])
    with torch.no_grad():
        for _ in range(6):
            idx = torch.cat([idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == idx.tolist()


@pytest.mark.slow
def test_hf_export_never_deletes_what_it_did_not_write(tmp_path, gpt2_run, capsys, monkeypatch):
    """A folder holding anything but an earlier export, the source run or a folder holding it, a file:
    refused with one line, every file as it was. An earlier export (its mark) is replaced."""
    folder, _ = gpt2_run
    run = tmp_path / "sandbox" / "model"
    run.mkdir(parents=True)
    (run / "ckpt.pt").write_bytes((folder / "ckpt.pt").read_bytes())
    (tmp_path / "sandbox" / "keep").mkdir()
    (tmp_path / "sandbox" / "keep" / "a.txt").write_text("mine")
    (tmp_path / "sandbox" / "b.txt").write_text("mine too")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    export_hf = ["export", f"--out_dir={run}", "--format=hf"]
    for to, message in [
        (tmp_path / "sandbox", "holding the source"),
        (run, "is the source"),
        (tmp_path / "sandbox" / "keep", "not an earlier `nanogpt export"),
        (tmp_path / "sandbox" / "b.txt", "is a file"),
    ]:
        assert cli_main([*export_hf, f"--to={to}"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    monkeypatch.chdir(tmp_path / "sandbox")
    assert cli_main(["export", "--out_dir=model", "--format=hf", "--to=."]) == 1  # the working directory
    assert "holding the source" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert cli_main([*export_hf, f"--to={tmp_path / 'hf'}", "--dtype=bfloat16"]) == 0
    assert cli_main([*export_hf, f"--to={tmp_path / 'hf'}", "--dtype=float16"]) == 0  # replaces its own
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert hf.transformer.wte.weight.dtype == torch.float16  # --dtype applied
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    mode = 0o777 & ~(os.umask(0o022) or 0o022)
    assert os.stat(tmp_path / "hf").st_mode & 0o777 == mode  # not mkdtemp's 0700
    assert os.stat(tmp_path / "hf" / "model.safetensors").st_mode & 0o777 == mode & 0o666


def test_ckpt_export_replaces_only_an_earlier_export(tmp_path, gpt2_run, capsys):
    folder, _ = gpt2_run
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "ckpt.pt").write_bytes((folder / "ckpt.pt").read_bytes())
    before = (victim / "ckpt.pt").read_bytes()
    args = ["export", f"--out_dir={folder}", "--format=ckpt"]
    assert cli_main([*args, f"--to={victim}"]) == 1
    assert "another run's ckpt.pt" in capsys.readouterr().err
    assert (victim / "ckpt.pt").read_bytes() == before
    assert cli_main([*args, f"--to={tmp_path / 'merged'}"]) == 0
    assert cli_main([*args, f"--to={tmp_path / 'merged'}"]) == 0  # an export of ours: replaced
    assert cli_main([*args, f"--to={tmp_path / 'x'}", "--dtype=float16"]) == 1
    assert "float32" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_export_file_system_faults_are_one_line_and_leave_nothing(tmp_path, gpt2_run, capsys):
    """Read-only, full disk, a file in the way: one line each, exit 1, no temporary and no empty folder."""
    folder, _ = gpt2_run
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root: file-system faults not tested")
    try:
        for fmt, to in [("hf", "x_hf"), ("ckpt", "x_ckpt"), ("gguf", "x.gguf")]:
            assert cli_main(["export", f"--out_dir={folder}", f"--format={fmt}", f"--to={mount / to}"]) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "no space left on device" in err, err
            assert list(mount.iterdir()) == [], list(mount.iterdir())
        (mount / "sub").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        for fmt, to in [("hf", "x_hf"), ("ckpt", "sub"), ("gguf", "x.gguf")]:
            assert cli_main(["export", f"--out_dir={folder}", f"--format={fmt}", f"--to={mount / to}"]) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "read-only file system" in err, err
        assert [p.name for p in mount.iterdir()] == ["sub"] and not list((mount / "sub").iterdir())
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_gguf_of_a_gpt4_pattern_bpe_tokenizes_as_ours_in_transformers(tmp_path):
    """The default trained BPE (gpt4 pattern) is written with llama.cpp's `llama-bpe` pre-tokenizer;
    transformers' GGUF loader (which maps llama-bpe to LLaMA 3's split) gives our ids."""
    transformers = pytest.importorskip("transformers")
    tok = _tokenizer("bpe")
    model = GPT(GPTConfig(block_size=32, vocab_size=320, n_layer=1, n_head=2, n_embd=16)).eval()
    our_checkpoint(tmp_path / "run", model, tok)
    path = tmp_path / "g" / "m.gguf"
    assert cli_main(["export", f"--out_dir={tmp_path / 'run'}", "--format=gguf", f"--to={path}"]) == 0
    reader = gguf.GGUFReader(path)
    assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "llama-bpe"
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["To be, or not to be:  that's 12345 it.\n\n\n  x", "Ünïcödé 日本語\r\n\tYOU'LL'VE ok  "]:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text


def test_gpt4_split_equals_llama_bpe_except_at_trailing_whitespace_with_a_newline():
    """llama.cpp's `llama-bpe` split (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_LLAMA3) against our gpt4 pattern
    on random short texts: the only texts split otherwise end in whitespace that holds a newline before a
    space or tab (the documented difference); most texts of that kind are covered many times."""
    import random

    regex = pytest.importorskip("regex")
    from nanogpt.data.tokenizers import GPT4_PATTERN

    llama_bpe = regex.compile(
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    ours = regex.compile(GPT4_PATTERN)
    alphabet = [*"ab Z1 2\n\r\t'.,!sStTlLé日", "  ", "\n\n", "'ll", "'VE"]
    rng = random.Random(0)
    differ = 0
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        if ours.findall(text) != llama_bpe.findall(text):
            tail = regex.search(r"\s*$", text).group(0)
            assert ("\n" in tail or "\r" in tail) and tail[-1] in " \t", repr(text)
            differ += 1
    assert 0 < differ < 1_000  # measured: 3,198 of 200,000 texts, every one of the documented kind
