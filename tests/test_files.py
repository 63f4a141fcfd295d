"""Atomic writes: a failure mid-write leaves the old file whole and no temporary behind."""

from __future__ import annotations

import pytest

from nanogpt.files import atomic_open, write_text_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "meta.json"
    write_text_atomic(path, "old ✓")
    with pytest.raises(KeyboardInterrupt), atomic_open(path) as f:
        f.write("half of the new")
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing
    assert path.read_text(encoding="utf-8") == "old ✓"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


@pytest.mark.parametrize("durable", [False, True])
def test_a_finished_write_replaces_the_file(tmp_path, durable):
    path = tmp_path / "new_folder" / "ckpt.bin"
    for data in (b"\x00first", b"\x01second"):
        with atomic_open(path, "wb", durable=durable) as f:
            f.write(data)
        assert path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.bin"]
