"""Bad inputs and faults: each gives one line on stderr naming what is wrong and what to do, a non-zero
exit, no traceback, and leaves what was good on disk unchanged (folders are hashed before and after)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ends_with_this_process, tiny_train_config

from nanogpt.checkpoint import load_checkpoint, save_checkpoint
from nanogpt.cli import main as cli
from nanogpt.errors import NanoGPTError
from nanogpt.files import folder_lock
from nanogpt.model import GPTConfig
from nanogpt.options import parse_overrides, set_fields
from nanogpt.sample import SampleConfig
from nanogpt.train.metrics import read_metrics
from nanogpt.train.model_init import INVOCATION_KEYS, check_fits
from nanogpt.train.trainer import train

REPO = Path(__file__).resolve().parents[1]


def tree_hash(folder: Path) -> str:
    """One hash of every file's path and bytes below folder (lock files aside: they hold a pid)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != ".lock"):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `nanogpt ARGV` run in this process; it must not raise (no traceback)."""
    capsys.readouterr()
    code = cli(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


QUICK = dict(max_iters=4, eval_interval=2, eval_iters=2, gradient_accumulation_steps=1)


def train_args(data_dir: Path, out_dir: Path, **overrides) -> list[str]:
    cfg = tiny_train_config(data_dir, out_dir, **{**QUICK, **overrides})
    return ["train", *(f"--{k}={v}" for k, v in vars(cfg).items())]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Path:
    """A finished 4-iteration run on shakespeare_char (never modified by the tests: they copy it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_train_config(data_dir, out, **QUICK))
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    """A data_dir with `other`: a char dataset whose vocabulary differs from shakespeare_char's."""
    from nanogpt.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("other")
    (root / "other.txt").write_text("abc def ghi\n" * 3000, encoding="utf-8")
    prepare_dataset("other", source=root / "other.txt", data_dir=root / "data", tokenizer="char")
    return root / "data"


# --- silent wrong results -------------------------------------------------------------------------------


def test_resume_on_data_with_another_tokenizer_is_refused(run_copy, other_data, capsys):
    before = tree_hash(run_copy)
    argv = train_args(other_data, run_copy, dataset="other", init_from="resume", max_iters=8)
    code, err = run_cli(argv, capsys)
    assert code == 1 and "another tokenizer" in err and "char, 65 tokens" in err and "char, 11 tokens" in err
    assert tree_hash(run_copy) == before


def test_resume_with_another_shape_is_refused_and_names_the_keys(run_copy, data_dir, capsys):
    before = tree_hash(run_copy)
    code, err = run_cli(
        train_args(data_dir, run_copy, init_from="resume", max_iters=8, n_layer=6, n_embd=64), capsys
    )
    assert (
        code == 1
        and f"cannot resume {run_copy}" in err
        and "n_layer=6 (checkpoint: 2)" in err
        and "n_embd=64" in err
    )
    assert tree_hash(run_copy) == before


def test_resuming_a_complete_run_says_so_exits_0_and_changes_nothing(run_copy, data_dir, capsys):
    """A requeue loop (`until nanogpt train ... --init_from=resume; do ...; done`) tells done from failed."""
    before = tree_hash(run_copy)
    capsys.readouterr()
    assert cli(train_args(data_dir, run_copy, init_from="resume", max_iters=4)) == 0
    out = capsys.readouterr().out
    assert f"{run_copy} is complete: at iteration 4 = max_iters" in out and "nothing changed" in out
    assert tree_hash(run_copy) == before  # metrics.jsonl keeps its last eval record
    # without --max_iters the checkpoint's own (4) applies: complete too
    assert cli(["train", "--init_from=resume", f"--out_dir={run_copy}", "--device=cpu"]) == 0
    assert tree_hash(run_copy) == before


def test_resume_with_max_iters_below_the_checkpoint_is_refused(run_copy, data_dir, capsys):
    before = tree_hash(run_copy)
    code, err = run_cli(train_args(data_dir, run_copy, init_from="resume", max_iters=3), capsys)
    assert code == 1 and "max_iters=3 is below iteration 4" in err and "--max_iters=4 or more" in err
    assert tree_hash(run_copy) == before


def test_training_time_of_a_stopped_and_continued_run_is_the_whole(data_dir, tmp_path):
    """Resumed for 1 more step after 12: the reported time covers all 13 steps, not the last one."""
    cfg = tiny_train_config(data_dir, tmp_path / "run", **{**QUICK, "max_iters": 12, "eval_interval": 12})
    first = train(cfg)["total_train_time"]
    assert load_checkpoint(tmp_path / "run")["train_time"] == pytest.approx(first)
    total = train(set_fields(cfg, {"init_from": "resume", "max_iters": 13}, "test"))["total_train_time"]
    assert total > first


def test_a_second_trainer_on_the_same_out_dir_is_refused(run_copy, data_dir, capsys):
    before = tree_hash(run_copy)
    with folder_lock(run_copy, "training"):
        code, err = run_cli(train_args(data_dir, run_copy, init_from="resume", max_iters=8), capsys)
    assert code == 1 and "in use by another process" in err and f"pid {os.getpid()}" in err
    assert tree_hash(run_copy) == before


@pytest.mark.slow
def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from nanogpt.files import folder_lock\n"
         f"with folder_lock({str(tmp_path)!r}, 'test'):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(NanoGPTError, match="in use"), folder_lock(tmp_path, "test"):
        pass
    holder.kill()
    holder.wait(timeout=10)
    with folder_lock(tmp_path, "test"):  # the kernel released the dead process's lock
        pass


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_embd=130, n_head=4), "must be divisible by n_head"),
        (dict(dataset="no_such_dataset"), "no prepared data"),
        (dict(block_size=200_000), "block_size=200000 is too long for the val split (111540 tokens)"),
    ],
)
def test_a_run_that_fails_validation_leaves_out_dir_untouched(run_copy, data_dir, capsys, overrides, message):
    before = tree_hash(run_copy)
    code, err = run_cli(train_args(data_dir, run_copy, overwrite=True, **overrides), capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert tree_hash(run_copy) == before


def test_a_split_of_one_token_asks_for_more_text_not_for_block_size_0():
    with pytest.raises(NanoGPTError, match=r"the train split has 1 token\(s\): too few .* Prepare more text"):
        check_fits(GPTConfig(block_size=8, vocab_size=65), {"train_tokens": 1, "val_tokens": 100})


def test_a_model_that_cannot_fit_in_memory_is_refused_before_it_is_built(monkeypatch):
    monkeypatch.setattr("nanogpt.train.model_init.available_memory_bytes", lambda: 8 << 30)
    meta = {"train_tokens": 10**9, "val_tokens": 10**8}
    check_fits(GPTConfig(block_size=1024, vocab_size=50304), meta)  # GPT-2 124M: ~2 GiB
    with pytest.raises(NanoGPTError, match=r"needs about 1\d\d\.\d GiB .* more than the 8\.0 GiB"):
        check_fits(GPTConfig(block_size=100_000, vocab_size=50304, n_layer=12), meta)


# --- faults on disk --------------------------------------------------------------------------------------


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    from nanogpt.files import remove_stale_temporaries

    dead, live = tmp_path / f".ckpt.pt.{2**22 + 1}.tmp", tmp_path / f".ckpt.pt.{os.getpid()}.tmp"
    for path in (dead, live):
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert live.exists() and not dead.exists()


def test_out_dir_that_is_a_file_is_a_clear_error(data_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    code, err = run_cli(train_args(data_dir, blocker), capsys)
    assert code == 1 and "a file is in the way" in err and blocker.read_text() == "keep me"


@pytest.fixture
def small_tmpfs(trained, tmp_path):
    """A tmpfs with room for one checkpoint of the `trained` run's shape (and its logs), not for two."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    size = (trained / "ckpt.pt").stat().st_size * 3 // 2 + (200 << 10)
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode:
        pytest.skip(
            f"cannot mount a tmpfs here (needs root in a sandbox that allows mounts): {made.stderr!r}"
        )
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_last_checkpoint(
    data_dir, small_tmpfs, capsys
):
    out = small_tmpfs / "run"
    argv = train_args(data_dir, out, max_iters=6, eval_interval=2, always_save_checkpoint=True)
    code, err = run_cli(argv, capsys)
    assert code == 1 and "no space left on device while writing" in err and "ckpt.pt" in err, err
    assert load_checkpoint(out)["iter_num"] == 2  # the first save
    assert not list(out.glob(".*.tmp"))


def test_a_read_only_out_dir_is_one_line(data_dir, tmp_path, capsys):
    mount = tmp_path / "ro"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {made.stderr!r}")
    try:
        code, err = run_cli(train_args(data_dir, mount / "run"), capsys)
        assert code == 1 and "cannot write to" in err and "read-only" in err
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# --- damaged or foreign inputs -------------------------------------------------------------------------


def test_token_ids_outside_the_vocabulary_are_named(data_dir, tmp_path, capsys):
    broken = Path(shutil.copytree(data_dir / "shakespeare_char", tmp_path / "data" / "shakespeare_char"))
    tokens = torch.from_numpy(__import__("numpy").fromfile(broken / "train.bin", dtype="uint16").copy())
    tokens[1234] = 300  # a corrupted file: 65 characters, id 300
    tokens.numpy().tofile(broken / "train.bin")
    code, err = run_cli(train_args(tmp_path / "data", tmp_path / "out"), capsys)
    assert code == 1 and "token id 300" in err and "train" in err


def test_non_utf8_files_are_named(trained, tmp_path, capsys):
    binary, toml = tmp_path / "latin1.txt", tmp_path / "latin1.toml"
    for path in (binary, toml):
        path.write_bytes("café = 1".encode("latin-1"))
    for argv, what in (
        (["sample", f"--out_dir={trained}", f"--start=FILE:{binary}", "--max_new_tokens=2"], "prompt file"),
        (["eval", f"--out_dir={trained}", f"--file={binary}"], "--file"),
        (["train", f"--config={toml}"], "config file"),
    ):
        code, err = run_cli(argv, capsys)
        assert code == 1 and what in err and "not UTF-8" in err


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["model_args"].update(n_experts=4), "not a nanogpt checkpoint (model_args"),
        (lambda c: c["model"].pop("lm_head.weight"), "its weights do not fit its model_args"),
        (lambda c: c["model_args"].update(n_embd=64), "its weights do not fit its model_args"),
    ],
)
def test_checkpoints_with_wrong_contents_are_named(trained, tmp_path, capsys, change, message):
    ckpt = load_checkpoint(trained)
    change(ckpt)
    save_checkpoint(ckpt, tmp_path)
    code, err = run_cli(["sample", f"--out_dir={tmp_path}", "--max_new_tokens=2"], capsys)
    assert code == 1 and message in err


def test_checkpoint_messages_name_the_folder_and_never_suggest_unsafe_loading(tmp_path, capsys):
    code, err = run_cli(["sample", f"--out_dir={tmp_path / 'missing'}"], capsys)
    assert code == 1 and f"--out_dir={tmp_path / 'missing'}`" in err and "ckpt.pt`" not in err
    (tmp_path / "ckpt.pt").write_bytes(b"")
    code, err = run_cli(["sample", f"--out_dir={tmp_path}"], capsys)
    assert code == 1 and "damaged" in err and "()" not in err and "0 bytes" in err
    torch.save(
        {"model": {}, "model_args": {}, "evil": Path("x")}, tmp_path / "ckpt.pt"
    )  # not weights_only-safe
    code, err = run_cli(["sample", f"--out_dir={tmp_path}"], capsys)
    assert (
        code == 1
        and "refused" in err
        and "weights_only=False" not in err
        and len(err.strip().splitlines()) == 1
    )


def test_a_torn_last_metrics_line_is_tolerated_other_damage_is_named(run_copy, data_dir, capsys):
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines) + '{"iter": 4, "lo')  # a kill in the middle of an append
    assert read_metrics(run_copy) == [json.loads(line) for line in lines]
    code, _ = run_cli(train_args(data_dir, run_copy, init_from="resume", max_iters=6), capsys)
    assert code == 0 and read_metrics(run_copy)[-1]["iter"] == 6
    metrics.write_text("not json\n" + metrics.read_text())
    with pytest.raises(NanoGPTError, match="damaged at line 1"):
        read_metrics(run_copy)


def test_hf_folders_that_are_not_a_complete_gpt2_are_refused(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    tiny = dict(n_positions=32, n_embd=32, n_layer=2, n_head=2, vocab_size=50257)
    complete = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**tiny)).save_pretrained(complete)
    missing = Path(shutil.copytree(complete, tmp_path / "missing_layer"))
    weights = load_file(missing / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if ".h.1." not in k},
        missing / "model.safetensors",
        {"format": "pt"},
    )
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64)).save_pretrained(bert)  # fmt: skip
    for folder, message in ((missing, "is not a complete GPT-2"), (bert, "holds a 'bert' model")):
        code, err = run_cli(["sample", f"--init_from={folder}", "--max_new_tokens=2", "--start=a"], capsys)
        assert code == 1 and message in err
    code, _ = run_cli(["sample", f"--init_from={complete}", "--max_new_tokens=2", "--start=a"], capsys)
    assert code == 0


# --- behaviour and messages ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1", "None", "'x'", "[1, 2]", "True"])
def test_string_options_take_the_text_as_given(text):
    _, overrides = parse_overrides([f"--start={text}"])
    assert set_fields(SampleConfig(), overrides, "test").start == text


def test_typed_options_still_read_literals():
    _, overrides = parse_overrides(
        ["--top_k=None", "--temperature=0.5", "--stop_at_eot=false", "--num_samples=1e1"]
    )
    cfg = set_fields(SampleConfig(), overrides, "test")
    assert (cfg.top_k, cfg.temperature, cfg.stop_at_eot, cfg.num_samples) == (None, 0.5, False, 10)


@pytest.mark.slow
def test_ctrl_c_during_imports_exits_130_without_a_traceback(data_dir, tmp_path):
    """A run that cannot end by itself: whether Ctrl-C lands in the imports (0.3 s: torch is loading on
    most machines) or in training on a fast one, the exit is 130 without a traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["train", "shakespeare_char_cpu", f"--data_dir={data_dir}", "--max_iters=1000000", "--device=cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ends_with_this_process())  # fmt: skip
    time.sleep(0.3)  # python is up; torch is being imported
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_experiment_checks_every_dataset_before_training(data_dir, tmp_path, capsys):
    argv = [
        "experiment",
        "--datasets=shakespeare_char,shakespeare_chr",
        f"--data_dir={data_dir}",
        f"--out={tmp_path}/x",
    ]
    code, err = run_cli(argv, capsys)
    assert code == 1 and "'shakespeare_chr'" in err and not (tmp_path / "x").exists()


def test_a_small_vocabulary_hf_folder_is_not_fed_gpt2_ids(tmp_path, capsys):
    """A HF folder is read with GPT-2's BPE: a model of 65 tokens cannot take its ids (was an IndexError)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=65, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    code, err = run_cli(
        ["sample", f"--init_from={tmp_path / 'hf'}", "--start=hello", "--max_new_tokens=2"], capsys
    )
    assert code == 1 and "50257 tokens" in err and "vocabulary of 65" in err


def test_a_moved_experiment_folder_continues(data_dir, tmp_path, capsys):
    """Paths inside an experiment's runs (out_dir, data_dir) do not pin it: a copy elsewhere continues."""
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=2", "--eval_iters=1",
            "--gradient_accumulation_steps=1", "--max_iters=2", "--eval_interval=2", "--progress=plain"]  # fmt: skip
    args = ["experiment", "--seeds=1", "--inference_tokens=2", f"--data_dir={data_dir}", *tiny]
    assert run_cli([*args, f"--out={tmp_path / 'a'}"], capsys)[0] == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "final_info.json").unlink()
    capsys.readouterr()
    assert cli([*args, f"--out={tmp_path / 'b'}"]) == 0
    assert "(done earlier: kept)" in capsys.readouterr().out


def test_resume_without_shape_options_takes_the_checkpoints_and_records_it(run_copy, data_dir, capsys):
    """Only shapes asked for are checked: a bare `--init_from=resume` (TrainConfig's 12 x 768 defaults)
    continues the 2 x 32 checkpoint, and config.json then says 2 x 32, not the defaults."""
    argv = ["train", "--init_from=resume", f"--out_dir={run_copy}", f"--data_dir={data_dir}",
            "--dataset=shakespeare_char", "--max_iters=6", "--eval_interval=2", "--eval_iters=1",
            "--gradient_accumulation_steps=1", "--batch_size=2", "--device=cpu", "--progress=plain"]  # fmt: skip
    assert run_cli(argv, capsys)[0] == 0
    written = json.loads((run_copy / "config.json").read_text())
    assert (written["n_layer"], written["n_embd"], written["block_size"]) == (2, 32, 16)
    assert load_checkpoint(run_copy)["config"]["n_layer"] == 2


def test_prepare_option_errors_are_one_line(capsys):
    code, err = run_cli(["prepare", "shakespeare_char", "--tokenizer=nope"], capsys)
    assert code == 1 and "invalid choice: 'nope'" in err and len(err.strip().splitlines()) == 1


# --- a flag is used or refused; a run is continued, never replaced by surprise ----------------------------


def test_a_new_run_into_an_out_dir_with_a_checkpoint_is_refused_unless_overwrite(run_copy, data_dir, capsys):
    before = tree_hash(run_copy)
    code, err = run_cli(train_args(data_dir, run_copy, max_iters=2), capsys)
    assert code == 1 and "--init_from=resume" in err and "--overwrite=true" in err
    assert tree_hash(run_copy) == before
    assert run_cli(train_args(data_dir, run_copy, max_iters=2, overwrite=True), capsys)[0] == 0
    assert load_checkpoint(run_copy)["iter_num"] == 2  # the 4-iteration run is replaced, as asked


def test_train_names_what_it_trains_no_surprise_download(tmp_path, capsys, monkeypatch):
    """Without a preset or --dataset, TrainConfig's defaults would prepare OpenWebText: refused instead."""
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["train", "--max_iters=1"], capsys)
    assert code == 1 and "shakespeare_char_cpu" in err and "--dataset=NAME" in err and "gpt2_124m" in err
    assert list(tmp_path.iterdir()) == []  # nothing prepared, nothing written


def test_a_bare_resume_continues_the_run_as_it_was_configured(run_copy, tmp_path, capsys, monkeypatch):
    """`--init_from=resume --out_dir=X` alone: dataset, data_dir, batch and schedule are the checkpoint's
    (TrainConfig's defaults would start preparing OpenWebText in ./data)."""
    monkeypatch.chdir(tmp_path)
    saved = load_checkpoint(run_copy)["config"]
    argv = ["train", "--init_from=resume", f"--out_dir={run_copy}", "--max_iters=6", "--progress=plain"]
    assert run_cli(argv, capsys)[0] == 0
    written = json.loads((run_copy / "config.json").read_text())
    same = lambda config: {k: v for k, v in config.items() if k not in (*INVOCATION_KEYS, "max_iters")}
    assert same(written) == same(saved) and written["dataset"] == "shakespeare_char"
    assert load_checkpoint(run_copy)["iter_num"] == 6 and not (tmp_path / "data").exists()


def test_a_seed_given_on_resume_is_refused(run_copy, data_dir, capsys):
    """The checkpoint's generators and batch stream continue: another seed could not apply."""
    before = tree_hash(run_copy)
    code, err = run_cli(train_args(data_dir, run_copy, init_from="resume", max_iters=6, seed=7), capsys)
    assert code == 1 and "seed=7 (checkpoint: 1337)" in err
    assert tree_hash(run_copy) == before


def test_optimizer_options_given_on_resume_are_used(run_copy, data_dir, capsys):
    """The restored optimizer state keeps its moments but takes the command's hyperparameters (torch's
    load_state_dict brings the checkpoint's weight decay and betas with it)."""
    argv = train_args(data_dir, run_copy, init_from="resume", max_iters=6, weight_decay=0.3, beta2=0.9)
    assert run_cli(argv, capsys)[0] == 0
    groups = load_checkpoint(run_copy)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.3, 0.0] and all(g["betas"][1] == 0.9 for g in groups)


def test_a_complete_run_always_leaves_a_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    """always_save_checkpoint=false and no evaluation improves on the first (or no step fits the time
    budget): the final model is saved, and the log says why."""
    losses = iter(range(10, 20))  # every evaluation worse than the one before
    monkeypatch.setattr(
        "nanogpt.train.trainer.estimate_loss", lambda *a: dict.fromkeys(("train", "val"), next(losses))
    )
    train(tiny_train_config(data_dir, tmp_path / "worse", **QUICK, always_save_checkpoint=False))
    assert "no evaluation after iteration 0 improved" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "worse")["iter_num"] == 4
    losses = iter(range(10, 20))
    train(
        tiny_train_config(
            data_dir, tmp_path / "no_time", **QUICK, always_save_checkpoint=False, max_seconds=1e-9
        )
    )
    assert load_checkpoint(tmp_path / "no_time")["iter_num"] == 0


def test_a_network_failure_is_one_line(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from nanogpt.data.hf_corpus import load_documents

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Skylion007/openwebtext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        NanoGPTError, match=r"cannot download Skylion007/openwebtext .*OfflineModeIsEnabled"
    ) as e:
        load_documents(None, ("Skylion007/openwebtext", None))
    assert len(str(e.value).splitlines()) == 1
