"""`nanogpt` itself: its version, the command list, a mistyped command, help text with a line per option
(from the config dataclasses' comments) and a preset's values, and a reader that closes the pipe early."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from importlib import metadata, resources

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from nanogpt.cli import COMMANDS, main
from nanogpt.options import field_docs, help_text


def test_version_is_the_installed_packages(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"nanogpt {metadata.version('nanogpt')}\n"


def test_no_command_lists_the_commands_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert all(f"\n  {name} " in err for name in COMMANDS), err


def test_a_mistyped_command_gets_did_you_mean(capsys):
    assert main(["trian", "shakespeare_char_cpu"]) == 2
    assert capsys.readouterr().err.startswith("nanogpt: unknown command 'trian'. Did you mean train?\n")
    assert main(["frobnicate"]) == 2
    assert "Did you mean" not in capsys.readouterr().err  # nothing close: no guess


def test_a_closed_pipe_ends_quietly(monkeypatch):
    """The reader of stdout is gone (`nanogpt -h | head -2` once head has exited): the shell's code for
    it, and stdout pointed at /dev/null so that Python's flush at exit has nothing to complain about."""
    read, write = os.pipe()
    os.close(read)
    monkeypatch.setattr(sys, "stdout", open(write, "w"))
    assert main(["-h"]) == 141
    print("more")  # where a traceback came from: the flush at exit
    sys.stdout.flush()
    sys.stdout.close()


@pytest.mark.slow
def test_help_into_a_closed_pipe_prints_no_traceback():
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run(
        [sys.executable, "-m", "nanogpt", "--help"], stdout=write, stderr=subprocess.PIPE, text=True
    )
    os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_train_help_shows_the_presets_values(capsys):
    """Every value in the preset's TOML file appears as that option's value, not TrainConfig's default."""
    assert main(["train", "shakespeare_char_cpu", "--help"]) == 0
    out = capsys.readouterr().out
    preset = resources.files("nanogpt.train").joinpath("presets", "shakespeare_char_cpu.toml")
    values = tomllib.loads(preset.read_text(encoding="utf-8"))
    assert values["n_layer"] == 4 and values["out_dir"] == "out/shakespeare_char_cpu"
    for key, value in values.items():
        assert f"\n  --{key}={value!r}  (" in out, key
    assert main(["train", "shakespeare_char_cpu", "--n_layer=2", "--help"]) == 0
    assert "\n  --n_layer=2  (int)" in capsys.readouterr().out


@dataclasses.dataclass
class Documented:
    # a section header (not a field's comment: the field has one of its own)
    plain: int = 1  # said on its own line
    wrapped: str = "x"  # said inside the parentheses the formatter added
    # said in the lines above
    # over two of them
    above: float = 0.5
    bare: bool = False
    after: int = 2  # after a field that has none


def test_field_docs_come_from_each_fields_comments():
    assert field_docs(Documented) == {
        "plain": "said on its own line",
        "wrapped": "said inside the parentheses the formatter added",
        "above": "said in the lines above over two of them",
        "after": "after a field that has none",
    }


def test_help_has_a_line_per_option_with_its_value_type_and_comment():
    lines = help_text(Documented, "usage: test", Documented(plain=7)).splitlines()
    assert lines[3:] == [
        "  --plain=7  (int)  said on its own line",
        "  --wrapped='x'  (str)  said inside the parentheses the formatter added",
        "  --above=0.5  (float)  said in the lines above over two of them",
        "  --bare=False  (bool)",
        "  --after=2  (int)  after a field that has none",
    ]


@pytest.mark.parametrize(
    "command", ["train", "sample", "eval", "export", "bench", "experiment", "serve", "chat"]
)
def test_every_key_value_command_describes_each_option(command, capsys):
    """`nanogpt COMMAND --help`: each option on its own line with what it does (a comment in its config
    dataclass; a new option without one fails here)."""
    assert main([command, "--help"]) == 0
    options = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  --")]
    bare = [
        line for line in options if not re.match(r"  --\w+=.*  \(.*\)  \S", line)
    ]  # name=value  (type)  what
    assert options and not bare, bare
