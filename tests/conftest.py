"""Shared fixtures. Tests never touch the network: raw sources come from NANOGPT_DATA_SOURCES."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Several test processes may share the 2 cores; one thread each avoids a 50x oversubscription slowdown.
torch.set_num_threads(int(os.environ.get("NANOGPT_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sources_dir() -> Path:
    """The folder of raw sources (NANOGPT_DATA_SOURCES; CI points it at ../shared/data)."""
    path = Path(os.environ.get("NANOGPT_DATA_SOURCES", REPO.parent / "shared" / "data"))
    if not (path / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"tiny Shakespeare not found under {path}; set NANOGPT_DATA_SOURCES")
    return path


@pytest.fixture(scope="session")
def shakespeare_text(sources_dir: Path) -> str:
    return (sources_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, sources_dir: Path) -> Path:
    """A data_dir holding shakespeare_char (tiny Shakespeare, characters), prepared once per test run."""
    from nanogpt.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data")
    prepare_dataset("shakespeare_char", source=sources_dir / "tinyshakespeare" / "input.txt", data_dir=out)
    return out


def ends_with_this_process():
    """A subprocess preexec_fn: the child is killed when this test process ends, however it ends (no
    training or torchrun process outlives a killed pytest; torchrun's workers end with torchrun)."""
    from nanogpt.processes import die_with_parent

    parent = os.getpid()
    return lambda: die_with_parent(parent)


def tiny_train_config(data_dir: Path, out_dir: Path, **overrides):
    """A TrainConfig for a 2-layer model on shakespeare_char that trains in milliseconds per step, on
    the CPU in float32 (so results compare bit for bit); tests override what they exercise."""
    from nanogpt.options import set_fields
    from nanogpt.train.config import TrainConfig

    values = dict(
        out_dir=str(out_dir),
        data_dir=str(data_dir),
        dataset="shakespeare_char",
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=16,
        batch_size=4,
        learning_rate=3e-3,
        warmup_iters=2,
        log_interval=1,
        device="cpu",
        dtype="float32",
        compile=False,
        progress="plain",
    )
    return set_fields(TrainConfig(), {**values, **overrides}, where="test")


def process_running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, exited but not yet reaped, is not)."""
    psutil = pytest.importorskip("psutil")  # in the dev extra
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
