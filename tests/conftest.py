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
