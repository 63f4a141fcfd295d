"""Bring your nanoGPT runs: karpathy/nanoGPT's checkpoints, meta.pkl files and config/*.py files, read
without running any of their code.

- A nanoGPT `out-*/ckpt.pt` is a dict {model, optimizer, model_args, iter_num, best_val_loss, config} of
  tensors, numbers and strings: torch.load(weights_only=True) reads it (checkpoint.load_checkpoint), and
  model_args are GPTConfig fields. Its state dict may carry torch.compile's `_orig_mod.` prefix and, from
  a torch without flash attention, the causal mask as `attn.bias` buffers (checkpoint.clean_state_dict).
- Its tokenizer: the dataset's meta.pkl (characters: stoi / itos) when given or found where nanoGPT's
  sample.py looks (data/<dataset>/meta.pkl), else GPT-2 BPE, as nanoGPT assumes. meta.pkl is a pickle:
  read_meta_pkl admits only dicts, lists, strings and numbers, so a crafted file cannot run code.
- A config/*.py file: its assignments parsed with `ast` and evaluated only as literals, arithmetic on
  them and on names assigned before (plus the str()/int()/float() and time.time() of nanoGPT's own files).
"""

from __future__ import annotations

import ast
import io
import math
import operator
import pickle
import time
from pathlib import Path
from typing import Any

from nanogpt.data.tokenizers import CharTokenizer, Tokenizer, get_tokenizer
from nanogpt.errors import NanoGPTError


def is_nanogpt_checkpoint(ckpt: dict[str, Any]) -> bool:
    """nanoGPT's checkpoints carry no tokenizer (ours always do)."""
    return "tokenizer" not in ckpt


# ---- meta.pkl ---------------------------------------------------------------------------------------


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings and numbers (pickle makes those without looking anything up);
    refuses every global (classes, functions: how a pickle runs code) and persistent id."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; a meta.pkl holds only plain data")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it refers to external objects; a meta.pkl holds only plain data")


def read_meta_pkl(path: str | Path) -> dict[str, Any]:
    """nanoGPT's meta.pkl ({'vocab_size', 'itos', 'stoi'}) read as data only: nothing in it can run."""
    path = Path(path)
    if not path.is_file():
        raise NanoGPTError(f"meta.pkl not found at {path}")
    try:
        meta = _DataOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:  # UnpicklingError, EOFError, ... from a damaged or crafted file
        raise NanoGPTError(f"{path} is not a plain-data meta.pkl, refused: {e}") from None
    if not isinstance(meta, dict):
        raise NanoGPTError(
            f"{path}: expected a dict with vocab_size, itos and stoi, got {type(meta).__name__}"
        )
    return meta


def char_tokenizer_from_meta_pkl(meta: dict[str, Any], where: str) -> CharTokenizer:
    """The character tokenizer of nanoGPT's prepare.py: itos[i] is the i-th of the sorted characters."""
    itos, vocab_size = meta.get("itos"), meta.get("vocab_size")
    if not isinstance(itos, dict) or sorted(itos) != list(range(len(itos))) or vocab_size != len(itos):
        raise NanoGPTError(f"{where}: itos must map 0..vocab_size-1 to characters")
    chars = [itos[i] for i in range(len(itos))]
    if not all(isinstance(c, str) and len(c) == 1 for c in chars) or chars != sorted(set(chars)):
        raise NanoGPTError(f"{where}: itos must list distinct single characters in sorted order")
    stoi = meta.get("stoi")
    if stoi is not None and stoi != {c: i for i, c in enumerate(chars)}:
        raise NanoGPTError(f"{where}: stoi is not the inverse of itos")
    return CharTokenizer("".join(chars))


def find_meta_pkl(ckpt: dict[str, Any], ckpt_file: Path) -> Path | None:
    """Where nanoGPT's sample.py finds the dataset's meta.pkl (data/<dataset>/meta.pkl from the working
    directory), or beside the nanoGPT checkout the checkpoint is in (<out_dir>/../data/<dataset>/)."""
    dataset = (ckpt.get("config") or {}).get("dataset")
    if not isinstance(dataset, str) or not dataset:
        return None
    for root in (Path("data"), ckpt_file.parent.parent / "data"):
        if (root / dataset / "meta.pkl").is_file():
            return root / dataset / "meta.pkl"
    return None


def nanogpt_tokenizer(ckpt: dict[str, Any], ckpt_file: Path, vocab_size: int, meta: str = "") -> Tokenizer:
    """A nanoGPT checkpoint's tokenizer: meta.pkl's characters (given, or found as nanoGPT finds it), else
    GPT-2 BPE, checked against the model's vocab_size."""
    path = Path(meta) if meta else find_meta_pkl(ckpt, ckpt_file)
    if path is not None:
        print(f"loading meta from {path}...")
        tokenizer = char_tokenizer_from_meta_pkl(read_meta_pkl(path), str(path))
        if tokenizer.vocab_size > vocab_size:
            raise NanoGPTError(
                f"{path} has {tokenizer.vocab_size} characters but the model only {vocab_size} tokens"
            )
        return tokenizer
    gpt2 = get_tokenizer("gpt2")
    if vocab_size < gpt2.vocab_size:
        raise NanoGPTError(
            f"{ckpt_file}: a {vocab_size}-token model needs its dataset's meta.pkl (GPT-2 BPE has "
            f"{gpt2.vocab_size} tokens): give --meta=PATH/meta.pkl (nanoGPT's data/<dataset>/meta.pkl)"
        )
    print("No meta.pkl found, assuming GPT-2 encodings...")
    return gpt2


# ---- config/*.py --------------------------------------------------------------------------------------

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_CALLS = {"str": str, "int": int, "float": float}  # pure conversions nanoGPT's files use
_PLAIN = (bool, int, float, str, type(None))
# bounds on what a config file's arithmetic may build (a value there is a number or a short text): each
# operation is refused before it runs if its result would be larger, so `9 ** 9 ** 9` or `'a' * 10**10`
# cannot take the memory or the CPU
MAX_INT_BITS = 4096
MAX_TEXT = 100_000
MAX_FILE_BYTES = 1_000_000


class _Evaluator:
    """Values of a config file's expressions: literals, names assigned above, arithmetic on them."""

    def __init__(self, where: str):
        self.where = where
        self.values: dict[str, Any] = {}
        self.modules: set[str] = set()  # `import time` lets time.time() through, as nanoGPT's file uses it

    def fail(self, node: ast.AST, why: str) -> NanoGPTError:
        return NanoGPTError(
            f"{self.where} line {node.lineno}: {why}; nanoGPT config files are read, not run: use a literal value"
        )

    def eval(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, _PLAIN):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in self.values:
                raise self.fail(node, f"{node.id!r} is not assigned above")
            return self.values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self._apply(node, _BINARY[type(node.op)], self.eval(node.left), self.eval(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return self._apply(node, _UNARY[type(node.op)], self.eval(node.operand))
        if isinstance(node, ast.Call) and not node.keywords:
            return self._call(node)
        raise self.fail(node, f"cannot evaluate {ast.unparse(node)!r}")

    def _call(self, node: ast.Call) -> Any:
        func = ast.unparse(node.func)
        if func in _CALLS and len(node.args) == 1:
            return self._apply(node, _CALLS[func], self.eval(node.args[0]))
        if func == "time.time" and not node.args and "time" in self.modules:
            return time.time()
        raise self.fail(node, f"cannot call {func}()")

    def _apply(self, node: ast.AST, op: Any, *args: Any) -> Any:
        if op is operator.mod and isinstance(args[0], str):  # printf formatting: its widths build any size
            raise self.fail(node, f"{_short(node)!r} formats text with %, which is not read")
        if _too_large(op, args):
            raise self.fail(node, f"{_short(node)!r} is too large to evaluate")
        try:
            value = op(*args)
        except Exception as e:  # TypeError, ZeroDivisionError, OverflowError, ValueError
            raise self.fail(node, f"{_short(node)!r} fails ({e})") from None
        if _size(value) > (
            MAX_TEXT if isinstance(value, str) else MAX_INT_BITS
        ):  # a sum: twice its operands at most
            raise self.fail(node, f"{_short(node)!r} is too large to evaluate")
        return value


def _size(value: Any) -> int:
    """A value's size as the bounds count it: bits of an int, characters of a text, 0 otherwise."""
    if isinstance(value, int):
        return abs(value).bit_length()
    return len(value) if isinstance(value, str) else 0


def _too_large(op: Any, args: tuple[Any, ...]) -> bool:
    """Whether op(*args) would build an int over MAX_INT_BITS or a text over MAX_TEXT characters,
    estimated from its operands without computing it."""
    if len(args) != 2:
        return False
    a, b = args
    if op is operator.pow and isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and b > 0:
        return b * math.log2(abs(a)) > MAX_INT_BITS
    if op is operator.mul and isinstance(a, int) and isinstance(b, int):
        return _size(a) + _size(b) > MAX_INT_BITS
    if op is operator.mul and {type(a), type(b)} & {str} and all(isinstance(x, (str, int)) for x in args):
        text, count = (a, b) if isinstance(a, str) else (b, a)
        return isinstance(count, int) and len(text) * max(count, 0) > MAX_TEXT
    return False


def _short(node: ast.AST) -> str:
    """An expression's source, cut to a readable length for a message."""
    text = ast.unparse(node)
    return text if len(text) <= 80 else text[:77] + "..."


def read_nanogpt_config(path: str | Path) -> dict[str, Any]:
    """The key = value assignments of a nanoGPT config/*.py file, without executing it."""
    path = Path(path)
    if not path.is_file():
        raise NanoGPTError(f"config file {str(path)!r} not found")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise NanoGPTError(f"{path} is over {MAX_FILE_BYTES:,} bytes: not a nanoGPT config file")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except UnicodeDecodeError as e:
        raise NanoGPTError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except SyntaxError as e:
        raise NanoGPTError(f"{path} line {e.lineno}: not valid Python ({e.msg})") from None
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes; nesting too deep for the parser
        raise NanoGPTError(f"{path}: not a readable Python file ({type(e).__name__}: {e})") from None
    try:
        return _assignments(tree, _Evaluator(str(path)))
    except RecursionError:
        raise NanoGPTError(f"{path}: an expression is nested too deeply to evaluate") from None


def _assignments(tree: ast.Module, ev: _Evaluator) -> dict[str, Any]:
    """The values a parsed config file assigns, in order (a name may use names assigned above)."""
    for node in tree.body:
        if isinstance(node, ast.Import) and all(a.name == "time" and a.asname is None for a in node.names):
            ev.modules.add("time")
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            value = ev.eval(node.value)
            ev.values.update({t.id: value for t in node.targets})
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):  # docstrings pass
            raise ev.fail(
                node, f"only `name = value` lines are read, not {ast.unparse(node).splitlines()[0]!r}"
            )
    return ev.values
