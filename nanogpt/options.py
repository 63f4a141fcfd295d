"""Command-line options: typed dataclass defaults + a TOML file + `--key=value` overrides (nanoGPT's
syntax, no exec). The generic parser; what the options of training are is nanogpt/train/config.py.

Every command (train, sample, eval, bench, experiment) describes its options as a dataclass and reads
them with `parse_options` (or `read_argv` + `set_fields`, or `split_options` for a command that also takes
training options); the dataclass is the one source of truth for names, types and defaults.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import math
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from nanogpt.errors import NanoGPTError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

C = TypeVar("C")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _non_finite(tp: Any, value: Any) -> bool:
    """Whether a number field (float, float | None) is given nan or an infinity, as a float or as text
    ("nan", "inf", "1e400": Python reads that last one as inf)."""
    if tp is not float and float not in typing.get_args(tp):
        return False
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, float) and not math.isfinite(value)


def _finite_error(key: str, where: str, value: Any) -> NanoGPTError:
    return NanoGPTError(f"config key {key!r} ({where}) must be a finite number, got {float(value)}")


def check_finite(cfg: Any, where: str) -> None:
    """Refuse nan and infinities in dataclass cfg's number fields (the message set_fields gives)."""
    for key, tp in _field_types(type(cfg)).items():
        if _non_finite(tp, getattr(cfg, key)):
            raise _finite_error(key, where, getattr(cfg, key))


def _accepts(tp: Any, value: Any) -> Any:
    """Return `value` converted to type `tp`, or raise TypeError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _accepts(arg, value)
            except TypeError:
                continue
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):  # TOML's and most CLIs' spelling
            return value.lower() == "true"
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e3 on the command line means 1000
            return int(value)
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError
    if origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            return origin(value)
        raise TypeError
    return value


class CommandLineText(str):
    """A value as typed after --key=: read as the field's type wants it (see _from_text)."""


def _parse_literal(text: str) -> Any:
    """nanoGPT's rule: a Python literal if it parses as one (True, 3e-4, 'gpt2'), else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _takes_text(tp: Any) -> bool:
    """Whether a field of type tp holds text (str, str | None, a Literal of strings)."""
    if tp is str:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return all(isinstance(arg, str) for arg in typing.get_args(tp))
    return origin in (typing.Union, types.UnionType) and any(_takes_text(arg) for arg in typing.get_args(tp))


def _from_text(tp: Any, text: CommandLineText) -> Any:
    """A free-text field takes the text as given (--start=1, --start=None and --start="'x'" are those
    characters), except None for an optional one; a choice (Literal) takes one of its names, quoted or
    not; any other field reads it as a Python literal."""
    if typing.get_origin(tp) is typing.Literal and text not in typing.get_args(tp):
        return _parse_literal(text)
    if _takes_text(tp):
        return None if text == "None" and _accepts_none(tp) else str(text)
    return _parse_literal(text)


def _accepts_none(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _type_name(tp: Any) -> str:
    """How an error names a field's type: "int", "float | None", "one of auto, float32, ..."."""
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """ " Did you mean a, b?" naming the known names closest to a mistyped one, or ""."""
    close = difflib.get_close_matches(name, list(known), n=3)
    return f" Did you mean {', '.join(close)}?" if close else ""


def set_fields(cfg: C, values: dict[str, Any], where: str) -> C:
    """Return a copy of dataclass `cfg` with `values` applied, type-checked, naming `where` they came from."""
    types_ = _field_types(type(cfg))
    changes = {}
    for key, value in values.items():
        if key not in types_:
            raise NanoGPTError(f"unknown config key {key!r} ({where}).{did_you_mean(key, types_)}")
        if isinstance(value, CommandLineText):
            value = _from_text(types_[key], value)
        if _non_finite(types_[key], value):
            raise _finite_error(key, where, value)
        try:
            changes[key] = _accepts(types_[key], value)
        except TypeError:
            raise NanoGPTError(
                f"config key {key!r} ({where}) expects {_type_name(types_[key])}, got {value!r}"
            ) from None
    try:
        return dataclasses.replace(cfg, **changes)
    except ValueError as e:  # __post_init__ validation
        raise NanoGPTError(str(e)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise NanoGPTError(f"config file {str(path)!r} not found")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise NanoGPTError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise NanoGPTError(f"config file {str(path)!r} is not UTF-8 text: save it as UTF-8 TOML") from None


def parse_overrides(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Split argv into positionals and `--key=value` / `--key value` / `--flag` (= True) overrides."""
    positionals, overrides = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            key, eq, text = arg[2:].partition("=")
            if not eq:
                if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    text = argv[i + 1]
                    i += 1
                else:
                    text = "True"
            overrides[key.replace("-", "_")] = CommandLineText(text)
        else:
            positionals.append(arg)
        i += 1
    return positionals, overrides


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in the dataclass's source, as one line: the comment on its own line(s), else
    the block of comment lines right above it; fields without either are left out."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source file (a frozen build, a class made at run time)
        return {}
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n in comments and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        if own or above:
            docs[node.target.id] = " ".join(own or above)
    return docs


def help_text(cls: type, title: str, values: Any = None) -> str:
    """One line per option: name, value, type and what it does (the dataclass is the documentation).
    The values are `values`'s (an instance of cls, e.g. a preset's), else cls's defaults."""
    values = values if values is not None else cls()
    lines = [title, "", "options (--key=value):"]
    types_, docs = _field_types(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        option = f"  --{f.name}={getattr(values, f.name)!r}  ({_type_name(types_[f.name])})"
        lines.append(f"{option}  {docs[f.name]}" if f.name in docs else option)
    return "\n".join(lines)


def read_argv(cls: type, argv: list[str], title: str) -> dict[str, Any] | None:
    """The `--key=value` overrides in argv; None after printing the options of dataclass `cls` for --help."""
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, title))
        return None
    positionals, overrides = parse_overrides(argv)
    if positionals:
        raise NanoGPTError(f"unexpected argument(s) {positionals}: options are written --key=value")
    return overrides


def split_options(cls: type, overrides: dict[str, Any], other: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """Overrides -> (those naming a field of dataclass `cls`, those naming a field of dataclass `other`,
    e.g. TrainConfig for a command that trains); any other key is an error naming the closest of both."""
    own, theirs = {f.name for f in dataclasses.fields(cls)}, {f.name for f in dataclasses.fields(other)}
    for key in overrides.keys() - own - theirs:
        raise NanoGPTError(
            f"unknown option {key!r} (neither {cls.__name__} nor {other.__name__} has it).{did_you_mean(key, own | theirs)}"
        )
    return {k: v for k, v in overrides.items() if k in own}, {
        k: v for k, v in overrides.items() if k not in own
    }


def parse_options(cls: type[C], argv: list[str], title: str) -> C | None:
    """`--key=value` arguments -> an instance of dataclass `cls`; None after printing help for --help."""
    overrides = read_argv(cls, argv, title)
    return None if overrides is None else set_fields(cls(), overrides, "command line")
