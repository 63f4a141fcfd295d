"""The shared `--key=value` / TOML config parser (nanoGPT's override syntax, typed, no exec)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from nanogpt.errors import NanoGPTError
from nanogpt.options import parse_overrides, read_toml, set_fields
from nanogpt.train.config import TrainConfig


@dataclass
class Options:
    learning_rate: float = 1e-3
    max_iters: int = 100
    compile: bool = False
    init_from: str = "scratch"
    top_k: int | None = None

    def __post_init__(self):
        if self.max_iters < 0:
            raise ValueError(f"max_iters must be >= 0, got {self.max_iters}")


def test_values_are_read_as_their_fields_type():
    """Typed fields read Python literals (nanoGPT's syntax); text fields keep the text as typed."""
    positionals, overrides = parse_overrides(
        [
            "preset",
            "--learning_rate=3e-4",
            "--compile=True",
            "--init_from=gpt2",
            "--max_iters",
            "5",
            "--wandb_run_name=1e3",
        ]
    )
    assert positionals == ["preset"]
    cfg = set_fields(TrainConfig(), overrides, "test")
    assert (cfg.learning_rate, cfg.compile, cfg.init_from, cfg.max_iters) == (3e-4, True, "gpt2", 5)
    assert cfg.wandb_run_name == "1e3"  # text, not the float 1000.0


def test_set_fields_converts_and_checks_types():
    cfg = set_fields(Options(), {"learning_rate": 1, "max_iters": 2e3, "top_k": 5}, "command line")
    assert cfg == Options(learning_rate=1.0, max_iters=2000, top_k=5)
    assert isinstance(cfg.learning_rate, float) and isinstance(cfg.max_iters, int)


@pytest.mark.parametrize(
    "text, value", [("false", False), ("true", True), ("FALSE", False), ("False", False)]
)
def test_booleans_may_be_spelled_in_lower_case(text, value):
    """`--compile=false` as in TOML (and the README), besides nanoGPT's Python literal False."""
    cfg = set_fields(Options(compile=not value), parse_overrides([f"--compile={text}"])[1], "command line")
    assert cfg.compile is value


def test_unknown_key_suggests_close_matches():
    with pytest.raises(
        NanoGPTError, match=r"unknown config key 'learning_rat' \(command line\).*learning_rate"
    ):
        set_fields(Options(), {"learning_rat": 0.1}, "command line")


@pytest.mark.parametrize(
    "key, value",
    [("max_iters", "many"), ("compile", 1), ("compile", "yes"), ("max_iters", 2.5), ("init_from", 3)],
)
def test_wrong_type_names_key_and_type(key, value):
    with pytest.raises(NanoGPTError, match=rf"'{key}'.*expects"):
        set_fields(Options(), {key: value}, "x.toml")


def test_validation_errors_become_user_errors():
    with pytest.raises(NanoGPTError, match="max_iters must be >= 0"):
        set_fields(Options(), {"max_iters": -1}, "command line")


def test_read_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('learning_rate = 6e-4\ninit_from = "gpt2"\n')
    assert set_fields(Options(), read_toml(path), str(path)) == Options(learning_rate=6e-4, init_from="gpt2")
    path.write_text("learning_rate = = 1")
    with pytest.raises(NanoGPTError, match="not valid TOML"):
        read_toml(path)
    with pytest.raises(NanoGPTError, match="not found"):
        read_toml(tmp_path / "missing.toml")
