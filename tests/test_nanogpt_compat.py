"""karpathy/nanoGPT's own files: a checkpoint in its exact layout gives the logits nanoGPT's model computes,
its meta.pkl gives the characters (a crafted one runs nothing), its config/*.py files read to their values
without being executed, and training resumes or fine-tunes from its runs."""

from __future__ import annotations

import io
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config
from torch.nn import functional as F

from nanogpt import GPT, GPTConfig
from nanogpt.checkpoint import load_checkpoint, load_model
from nanogpt.errors import NanoGPTError
from nanogpt.from_nanogpt import read_meta_pkl, read_nanogpt_config
from nanogpt.sample import SampleConfig, sample
from nanogpt.train.config import load_train_config
from nanogpt.train.trainer import train

FIXTURES = Path(__file__).parent / "fixtures" / "nanogpt_config"
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny Shakespeare's 65
MODEL_ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=False, vocab_size=65, dropout=0.0)


def nanogpt_reference_logits(sd: dict[str, torch.Tensor], args: dict, idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT's GPT.forward (model.py) written out on its state dict: pre-norm blocks, masked-softmax
    attention, exact GELU, LayerNorm eps 1e-5 without biases, lm_head tied to wte. (B, T, V)."""
    B, T = idx.shape
    nh, C = args["n_head"], args["n_embd"]
    ln = lambda x, name: F.layer_norm(x, (C,), sd[f"{name}.weight"], sd.get(f"{name}.bias"), 1e-5)
    lin = lambda x, name: F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}"
        q, k, v = lin(ln(x, f"{h}.ln_1"), f"{h}.attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // nh)
        y = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1) @ v
        x = x + lin(y.transpose(1, 2).reshape(B, T, C), f"{h}.attn.c_proj")
        x = x + lin(F.gelu(lin(ln(x, f"{h}.ln_2"), f"{h}.mlp.c_fc")), f"{h}.mlp.c_proj")
    return F.linear(ln(x, "transformer.ln_f"), sd["transformer.wte.weight"])


def write_nanogpt_run(root: Path, with_meta: bool = True) -> Path:
    """A nanoGPT checkout's out-shakespeare-char/ckpt.pt as its train.py writes it (compiled: `_orig_mod.`
    keys; a torch without flash attention: the causal mask saved as attn.bias; AdamW state after a step;
    best_val_loss a tensor) and data/shakespeare_char/meta.pkl as its prepare.py writes it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL_ARGS))
    decay = [p for p in model.parameters() if p.dim() >= 2]  # nanoGPT's configure_optimizers groups
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay}], lr=1e-3)
    idx = torch.randint(0, 65, (2, 64))
    model(idx, idx)[1].backward()
    optimizer.step()
    sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    for i in range(MODEL_ARGS["n_layer"]):
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    config = dict(out_dir="out-shakespeare-char", dataset="shakespeare_char", batch_size=64, device="cuda")
    ckpt = dict(
        model=sd,
        optimizer=optimizer.state_dict(),
        model_args=MODEL_ARGS,
        iter_num=250,
        best_val_loss=torch.tensor(1.4697),
        config=config,
    )
    (root / "out-shakespeare-char").mkdir(parents=True)
    torch.save(ckpt, root / "out-shakespeare-char" / "ckpt.pt")
    if with_meta:
        (root / "data" / "shakespeare_char").mkdir(parents=True)
        meta = {"vocab_size": 65, "itos": dict(enumerate(CHARS)), "stoi": {c: i for i, c in enumerate(CHARS)}}
        with open(root / "data" / "shakespeare_char" / "meta.pkl", "wb") as f:
            pickle.dump(meta, f)
    return root / "out-shakespeare-char"


def test_checkpoint_gives_nanogpts_logits_and_meta_pkl_characters(tmp_path):
    out_dir = write_nanogpt_run(tmp_path / "nanoGPT")
    model, tokenizer = load_model(out_dir)  # meta.pkl found beside the checkout, as nanoGPT finds it
    assert tokenizer.name == "char" and tokenizer.decode(tokenizer.encode("ROMEO: hi")) == "ROMEO: hi"
    assert tokenizer.encode("\n !") == [0, 1, 2]
    raw = torch.load(out_dir / "ckpt.pt", weights_only=True)  # nanoGPT's layout loads without pickle code
    sd = {k.removeprefix("_orig_mod."): v for k, v in raw["model"].items()}
    idx = torch.randint(0, 65, (3, 64))
    torch.testing.assert_close(
        model(idx, idx)[0], nanogpt_reference_logits(sd, MODEL_ARGS, idx), atol=1e-5, rtol=0
    )


def test_sample_with_meta_option_and_a_clear_error_without(tmp_path, monkeypatch):
    out_dir = write_nanogpt_run(tmp_path / "nanoGPT")
    meta = tmp_path / "elsewhere.pkl"
    shutil.move(tmp_path / "nanoGPT" / "data" / "shakespeare_char" / "meta.pkl", meta)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NanoGPTError, match="65-token model needs its dataset's meta.pkl"):
        load_model(out_dir)
    cfg = SampleConfig(
        init_from=str(out_dir), meta=str(meta), start="ROMEO:", num_samples=1, max_new_tokens=20
    )
    (text,) = sample(cfg, io.StringIO())
    assert len(text) == 20 and set(text) <= set(CHARS)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_meta_pkl_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"vocab_size": 65, "itos": _Exploit(marker)}))
    with pytest.raises(
        NanoGPTError, match="not a plain-data meta.pkl.*posix.system|not a plain-data meta.pkl"
    ):
        read_meta_pkl(path)
    assert not marker.exists()
    path.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(NanoGPTError, match="plain-data"):
        read_meta_pkl(path)


def test_resume_and_fine_tune_from_a_nanogpt_run(data_dir, tmp_path):
    """init_from=resume continues its iteration count, best val loss and AdamW state; init_from=PATH
    fine-tunes from its weights."""
    out_dir = write_nanogpt_run(tmp_path / "nanoGPT")
    shape = {k: v for k, v in MODEL_ARGS.items() if k not in ("vocab_size", "dropout")}
    steps_before = load_checkpoint(out_dir)["optimizer"]["state"][0]["step"]
    cfg = tiny_train_config(data_dir, out_dir, init_from="resume", max_iters=252, eval_interval=1000, **shape)
    result = train(cfg)
    ckpt = load_checkpoint(out_dir)
    assert result["iter_num"] == 252 and "tokenizer" in ckpt  # now a checkpoint of ours
    assert ckpt["optimizer"]["state"]["transformer.wte.weight"]["step"] == steps_before + 2
    assert result["best_val_loss"] <= 1.4697 + 1e-6

    fresh = write_nanogpt_run(tmp_path / "nanoGPT2")
    result = train(
        tiny_train_config(data_dir, tmp_path / "ft", init_from=str(fresh), max_iters=2, eval_iters=2)
    )
    assert result["iter_num"] == 2 and load_checkpoint(tmp_path / "ft")["model_args"]["n_embd"] == 32


# ---- config/*.py ---------------------------------------------------------------------------------------

EVAL = dict(batch_size=8, eval_iters=500, eval_only=True, wandb_log=False)
EXPECTED = {
    "train_shakespeare_char": dict(
        out_dir="out-shakespeare-char",
        eval_interval=250,
        eval_iters=200,
        log_interval=10,
        always_save_checkpoint=False,
        wandb_log=False,
        wandb_project="shakespeare-char",
        wandb_run_name="mini-gpt",
        dataset="shakespeare_char",
        gradient_accumulation_steps=1,
        batch_size=64,
        block_size=256,
        n_layer=6,
        n_head=6,
        n_embd=384,
        dropout=0.2,
        learning_rate=1e-3,
        max_iters=5000,
        lr_decay_iters=5000,
        min_lr=1e-4,
        beta2=0.99,
        warmup_iters=100,
    ),
    "train_gpt2": dict(
        wandb_log=True,
        wandb_project="owt",
        wandb_run_name="gpt2-124M",
        batch_size=12,
        block_size=1024,
        gradient_accumulation_steps=40,
        max_iters=600000,
        lr_decay_iters=600000,
        eval_interval=1000,
        eval_iters=200,
        log_interval=10,
        weight_decay=0.1,
    ),
    "finetune_shakespeare": dict(
        out_dir="out-shakespeare",
        eval_interval=5,
        eval_iters=40,
        wandb_log=False,
        wandb_project="shakespeare",
        dataset="shakespeare",
        init_from="gpt2-xl",
        always_save_checkpoint=False,
        batch_size=1,
        gradient_accumulation_steps=32,
        max_iters=20,
        learning_rate=3e-5,
        decay_lr=False,
    ),
    "eval_gpt2": dict(**EVAL, init_from="gpt2"),
    "eval_gpt2_medium": dict(**EVAL, init_from="gpt2-medium"),
    "eval_gpt2_large": dict(**EVAL, init_from="gpt2-large"),
    "eval_gpt2_xl": dict(**EVAL, init_from="gpt2-xl"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nanogpt_config_files_read_to_their_values(name):
    values = read_nanogpt_config(FIXTURES / f"{name}.py")
    run_name = values.pop("wandb_run_name") if name == "finetune_shakespeare" else None
    assert values == EXPECTED[name]
    if run_name is not None:  # 'ft-' + str(time.time())
        assert run_name.startswith("ft-") and float(run_name[3:]) > 1.7e9
    cfg = load_train_config([f"--config={FIXTURES / f'{name}.py'}", "--max_iters=7"])
    assert cfg.max_iters == 7 and all(
        getattr(cfg, k) == v for k, v in EXPECTED[name].items() if k != "max_iters"
    )


@pytest.mark.parametrize(
    "text, line, why",
    [
        ("batch_size = 4\nx = __import__('os').system('echo hi')\n", 2, "cannot call"),
        ("import os\nbatch_size = 4\n", 1, "only `name = value` lines"),
        ("batch_size = 4\nmax_iters = batch_size * iters\n", 2, "'iters' is not assigned above"),
        ("learning_rate = 1 / 0\n", 1, "fails"),
        ("dataset = open('x').read()\n", 1, "cannot call open"),
        ("n_layer = [i for i in range(3)]\n", 1, "cannot evaluate"),
    ],
)
def test_config_code_is_a_clear_error_naming_the_line(tmp_path, text, line, why):
    path = tmp_path / "bad.py"
    path.write_text(text)
    with pytest.raises(NanoGPTError, match=f"line {line}: .*{why}"):
        read_nanogpt_config(path)


def test_config_arithmetic_and_unknown_keys(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("batch_size = 4\nmax_iters = batch_size * 8 + 2 ** 3\nmin_lr = -(-1e-4)\nn_embd = 384\n")
    assert read_nanogpt_config(path) == dict(batch_size=4, max_iters=40, min_lr=1e-4, n_embd=384)
    path.write_text("batch_size = 4\nmy_knob = 3\n")
    with pytest.raises(NanoGPTError, match="unknown config key 'my_knob'"):
        load_train_config([f"--config={path}"])


def test_a_bare_resume_of_a_nanogpt_run_trains_on_its_own_dataset(data_dir, tmp_path, monkeypatch, capsys):
    """Its config["dataset"] (shakespeare_char) is used, not TrainConfig's default (openwebtext, which
    would start a download); data_dir is ours (nanoGPT's train.py reads data/<dataset>)."""
    from nanogpt.cli import main as cli

    out_dir = write_nanogpt_run(tmp_path / "nanoGPT")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--init_from=resume", f"--out_dir={out_dir}", f"--data_dir={data_dir}", "--max_iters=251",
            "--batch_size=2", "--gradient_accumulation_steps=1", "--eval_iters=1", "--device=cpu"]  # fmt: skip
    assert cli(argv) == 0, capsys.readouterr().err
    ckpt = load_checkpoint(out_dir)
    assert ckpt["iter_num"] == 251 and ckpt["config"]["dataset"] == "shakespeare_char"


@pytest.mark.parametrize(
    "text, line",
    [
        ("x = 'a' * 10**10\n", 1),  # 10 GB of text
        ("batch_size = 4\nmax_iters = 9 ** 9 ** 9\n", 2),  # hours of CPU
        ("max_iters = 2 ** 100000000\n", 1),  # 100 million bits, then too long to print
        ("s = 'a' * 60000\nt = s + s\n", 2),  # the sum of two texts within the bound, over it
        ("x = 10 ** 1000\ny = x * x * x * x * x\n", 2),
        ("name = '%0999999999d' % 1\n", 1),  # printf widths
    ],
)
def test_config_arithmetic_is_bounded(tmp_path, text, line):
    path = tmp_path / "big.py"
    path.write_text(text)
    with pytest.raises(NanoGPTError, match=rf"^{path} line {line}: .*(too large to evaluate|formats text)"):
        read_nanogpt_config(path)


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "notutf8.py"
    path.write_bytes(b"\xff\xfe max_iters = 3\n")
    with pytest.raises(NanoGPTError, match=rf"^{path} is not UTF-8 text .*save it as UTF-8$"):
        read_nanogpt_config(path)
    path.write_text("x = 1" + " + 1" * 100_000 + "\n")  # nested too deeply for the parser or the evaluator
    with pytest.raises(NanoGPTError, match=rf"^{path}: "):
        read_nanogpt_config(path)
