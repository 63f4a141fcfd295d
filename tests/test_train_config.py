"""The training config: presets, precedence, errors, --help, and the learning rate schedule."""

from __future__ import annotations

import itertools
import math

import pytest

from nanogpt.errors import NanoGPTError
from nanogpt.train import trainer
from nanogpt.train.config import TrainConfig, load_train_config, preset_names
from nanogpt.train.distributed import per_rank_accumulation
from nanogpt.train.schedule import get_lr

PRESETS = {
    "shakespeare_char",
    "shakespeare_char_cpu",
    "lecture",
    "gpt2_124m",
    "finetune_shakespeare",
    "eval_gpt2",
    "eval_gpt2_medium",
    "eval_gpt2_large",
    "eval_gpt2_xl",
}


def test_every_preset_loads():
    assert PRESETS <= set(preset_names())
    for name in preset_names():
        assert isinstance(load_train_config([name]), TrainConfig)


def test_presets_match_their_sources():
    # nanoGPT's README "baby GPT" for a CPU
    cpu = load_train_config(["shakespeare_char_cpu"])
    assert (cpu.block_size, cpu.batch_size, cpu.n_layer, cpu.n_head, cpu.n_embd) == (64, 12, 4, 4, 128)
    assert (cpu.max_iters, cpu.lr_decay_iters, cpu.dropout, cpu.eval_iters, cpu.log_interval) == (
        2000,
        2000,
        0.0,
        20,
        1,
    )
    assert (cpu.device, cpu.compile, cpu.dataset) == ("cpu", False, "shakespeare_char")
    gpu = load_train_config(["shakespeare_char"])
    assert (gpu.n_layer, gpu.n_head, gpu.n_embd, gpu.block_size, gpu.batch_size) == (6, 6, 384, 256, 64)
    assert (gpu.learning_rate, gpu.max_iters, gpu.dropout, gpu.warmup_iters, gpu.min_lr, gpu.beta2) == (
        1e-3,
        5000,
        0.2,
        100,
        1e-4,
        0.99,
    )
    lecture = load_train_config(["lecture"])
    assert (lecture.batch_size, lecture.block_size, lecture.n_embd, lecture.n_head, lecture.n_layer) == (
        16,
        32,
        64,
        4,
        4,
    )
    assert (lecture.learning_rate, lecture.decay_lr, lecture.max_iters, lecture.eval_interval) == (
        1e-3,
        False,
        5000,
        100,
    )
    gpt2 = load_train_config(["gpt2_124m"])
    assert (gpt2.gradient_accumulation_steps, gpt2.batch_size, gpt2.block_size, gpt2.max_iters) == (
        40,
        12,
        1024,
        600000,
    )
    assert load_train_config(["finetune_shakespeare"]).init_from == "gpt2-xl"
    assert load_train_config(["eval_gpt2_medium"]).eval_only


def test_precedence_defaults_preset_overrides(tmp_path):
    assert load_train_config([]) == TrainConfig()
    cfg = load_train_config(
        ["shakespeare_char_cpu", "--max_iters=500", "--learning_rate", "3e-4", "--compile"]
    )
    assert (cfg.max_iters, cfg.learning_rate, cfg.compile, cfg.n_layer) == (500, 3e-4, True, 4)
    toml = tmp_path / "mine.toml"
    toml.write_text("dataset = \"shakespeare_char\"\nn_layer = 3\ninit_from = 'gpt2'\n")
    cfg = load_train_config(["--config", str(toml), "--n_layer=5", "--dtype='bfloat16'"])
    assert (cfg.dataset, cfg.n_layer, cfg.init_from, cfg.dtype) == ("shakespeare_char", 5, "gpt2", "bfloat16")
    assert load_train_config(["--config=lecture"]).n_embd == 64


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--max_iter=5"], ["max_iter", "max_iters"]),  # unknown key: named, with a close match
        (["--learning_rate=fast"], ["learning_rate", "float"]),  # wrong type
        (["--dtype=float8"], ["dtype", "float8"]),
        (["--eval_interval=0"], ["eval_interval"]),
        (["--init_from=gpt3"], ["init_from", "gpt3"]),
        (["shakespeare_cpu"], ["shakespeare_cpu", "shakespeare_char_cpu"]),  # unknown preset
        (["lecture", "gpt2_124m"], ["at most one"]),
        (["/no/such/file.toml"], ["not found"]),
    ],
)
def test_config_errors_name_the_problem(argv, words):
    with pytest.raises(NanoGPTError) as e:
        load_train_config(argv)
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizer=muon", "--muon_momentum=-1"], "muon_momentum must be in [0, 1), got -1.0"),
        (["--muon_momentum=1.5"], "muon_momentum must be in [0, 1), got 1.5"),
        (["--min_lr=1"], "min_lr (1.0) must not exceed learning_rate (0.0006)"),
        (["--lora_alpha=0"], "lora_alpha must be positive"),
        (["--lora_alpha=-4"], "lora_alpha must be positive"),
        (["--lora_rank=-1"], "lora_rank must not be negative"),
    ],
)
def test_ranges_are_checked(argv, message):
    with pytest.raises(NanoGPTError) as e:
        load_train_config(argv)
    assert message in str(e.value)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400", "NaN"])
def test_nan_and_infinities_are_refused_alike(text, tmp_path):
    """On the command line, in a TOML file and in code: one message (1e400 reads as inf; JSON has no inf
    for config.json to hold)."""
    message = r"config key 'max_seconds' \(.*\) must be a finite number, got -?(nan|inf)"
    with pytest.raises(NanoGPTError, match=message):
        load_train_config([f"--max_seconds={text}"])
    toml = tmp_path / "x.toml"
    toml.write_text(f"max_seconds = {text.lower() if text != '1e400' else text}\n")
    with pytest.raises(NanoGPTError, match=message):
        load_train_config([str(toml)])
    with pytest.raises(NanoGPTError, match=message):
        TrainConfig(max_seconds=float(text))
    with pytest.raises(NanoGPTError, match=message.replace("max_seconds", "lora_alpha")):
        load_train_config([f"--lora_alpha={text}"])


def test_min_lr_above_learning_rate_is_fine_without_a_decay():
    assert load_train_config(["--min_lr=1", "--decay_lr=False"]).min_lr == 1.0


def test_bad_toml_names_the_key(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("batch_sise = 4\n")
    with pytest.raises(NanoGPTError, match=r"batch_sise.*bad\.toml.*batch_size"):
        load_train_config([str(toml)])


def test_help_lists_fields_and_presets(capsys):
    assert trainer.main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ["--gradient_accumulation_steps", "--init_from", "--dtype", *PRESETS]:
        assert word in text


def test_lr_schedule():
    args = dict(learning_rate=1e-3, warmup_iters=10, lr_decay_iters=110, min_lr=1e-4)
    assert get_lr(0, **args) == pytest.approx(1e-3 / 11)  # warmup is linear and starts above 0
    assert get_lr(9, **args) == pytest.approx(1e-3 * 10 / 11)
    assert get_lr(10, **args) == pytest.approx(1e-3)  # the peak
    assert get_lr(60, **args) == pytest.approx((1e-3 + 1e-4) / 2)  # half way down the cosine
    assert get_lr(110, **args) == pytest.approx(1e-4)
    assert get_lr(10_000, **args) == 1e-4
    lrs = [get_lr(i, **args) for i in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))  # decays monotonically
    assert not any(math.isnan(x) for x in lrs)


def test_accumulation_must_divide_among_processes():
    assert per_rank_accumulation(40, 8) == 5
    with pytest.raises(NanoGPTError, match="divisible"):
        per_rank_accumulation(5, 2)
