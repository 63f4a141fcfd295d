"""Evaluation tasks: the CORE table (as data), where each task's file comes from, and reading a task file
into items of one of the three in-context-learning layouts of MosaicML's eval gauntlet:

    multiple_choice    {"query": str, "choices": [str, ...], "gold": int}
    schema             {"context_options": [str, ...], "continuation": str, "gold": int}
    language_modeling  {"context": str, "continuation": str}

A canonical task file is found like a text source of `nanogpt prepare` (nanogpt/data/sources.py): under
$NANOGPT_DATA_SOURCES/evals/, in the cache ($NANOGPT_CACHE/evals/), else downloaded from its pinned URL;
it must hash to its sha256. A user's own task is any JSONL file in one of the layouts, named as
`path.jsonl:TYPE:SHOTS` (TYPE: mc, schema or lm) or by a small TOML file (file, type, shots, delimiter,
random_baseline).
"""

from __future__ import annotations

import bz2
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nanogpt.data.sources import RawSource, cache_dir, fetch
from nanogpt.errors import NanoGPTError
from nanogpt.files import write_text_atomic
from nanogpt.options import tomllib

TYPES = ("multiple_choice", "schema", "language_modeling")
_SHORT_TYPES = {"mc": "multiple_choice", "schema": "schema", "lm": "language_modeling"}

_GAUNTLET = "https://raw.githubusercontent.com/mosaicml/llm-foundry/8c8dd48f72168c5d51e2f7b151595892a8fba43d/scripts/eval/local_data/"
_HELLASWAG = RawSource(
    "evals",
    "hellaswag_val_full.txt.bz2",
    "https://raw.githubusercontent.com/klosax/hellaswag_text_data/1105d370f8340eac3c63a91fd1fa58e8999f9505/hellaswag_val_full.txt.bz2",
    "50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b",
    1_964_544,
)


@dataclass(frozen=True)
class Task:
    """One in-context-learning task: its scoring and where its items come from."""

    name: str
    type: str  # one of TYPES
    shots: int  # few-shot examples per prompt
    delimiter: str  # between the query / context and the choice / continuation
    random_baseline: float  # percent: the accuracy of guessing, for the centered accuracy
    source: RawSource | None = None  # a canonical file (None: `path`, a user's file)
    path: str = ""


def _gauntlet(
    name: str, file: str, shots: int, type: str, sha256: str, size: int, rb: float, delimiter: str = " "
) -> Task:
    folder, filename = file.split("/")
    return Task(
        name,
        type,
        shots,
        delimiter,
        rb,
        RawSource(f"evals/{folder}", filename, _GAUNTLET + file, sha256, size),
    )


MC, SCHEMA, LM = TYPES
ANSWER = "\nAnswer: "
# CORE: the DCLM paper's 22 "low variance" tasks (shots, type and delimiter from its dclm_heavy.yaml,
# random baselines from its eval_meta_data.csv). squad and coqa are not in the gauntlet's local data.
CORE_TASKS: tuple[Task, ...] = (
    Task("hellaswag_zeroshot", MC, 0, " ", 25.0, _HELLASWAG),
    _gauntlet("jeopardy", "world_knowledge/jeopardy_all.jsonl", 10, LM, "187e7f270a440c63d6cf11a57459fdc7e0bce889338225e42cc88e24ee13d52e", 364_582, 0.0, ANSWER),
    _gauntlet("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", 10, LM, "bb0d22727cb25beffb022c8e8c0c3e1159c8b3c7bd7284603c0d6491f8616265", 1_639_702, 0.0),
    _gauntlet("arc_easy", "world_knowledge/arc_easy.jsonl", 10, MC, "d2d12e59543acf9a5ef6079634a72b30215e36c2fd4236fff3bc855d287b87f5", 636_665, 25.0, ANSWER),
    _gauntlet("arc_challenge", "world_knowledge/arc_challenge.jsonl", 10, MC, "1ae3aeedf1951d881cbd5c2e3a31e78a1993d251479afbe4cb413b6707244636", 365_606, 25.0, ANSWER),
    _gauntlet("copa", "commonsense_reasoning/copa.jsonl", 0, MC, "595dca44dec54c849490bd403a3e24a29e3b944065783222ebb0eb1a55298846", 14_627, 50.0),
    _gauntlet("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", 10, MC, "2771f63f8127c0725b1f6b0ef2cd2ef6469168ae5875fc8d276b25b4f32c8c1a", 258_861, 40.3),
    _gauntlet("piqa", "commonsense_reasoning/piqa.jsonl", 10, MC, "d2870e73aec5154df3faf259b7700876e11608eebdf69e9d6667435673dbe4e0", 533_992, 50.0, ANSWER),
    _gauntlet("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", 0, MC, "adb2e5c7f8db810ddad4d6b2bf53dcc86dcc545499f7aafcaf42a8e179476c09", 88_043, 25.0),
    _gauntlet("lambada_openai", "language_understanding/lambada_openai.jsonl", 0, LM, "411bfbe5b9054346b6a19299c0242670adbefb9162efd958593cbc0290b8c9dc", 1_895_241, 0.0),
    Task("hellaswag", MC, 10, " ", 25.0, _HELLASWAG),
    _gauntlet("winograd", "language_understanding/winograd_wsc.jsonl", 0, SCHEMA, "746336c27cd2e39a554cb1b8b4869d0f1ae2577ac5bfe799842d26bca5a5bf5e", 60_523, 50.0),
    _gauntlet("winogrande", "language_understanding/winogrande.jsonl", 0, SCHEMA, "ea1592526f3bfdd0948ed3acb1b4dfa3f83d23698917118688ee1df7f8d4b8d7", 312_369, 50.0),
    _gauntlet("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", 10, LM, "106ba9ac7507c7ab385c5e59c49cd57aa83025abf080d9b2a2661c0d6c6dbcc5", 198_916, 0.0),
    _gauntlet("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", 3, MC, "9ffd73480b51746c11627e56239f8b87035eb255cb92c3a58fd64e2e4b65fb56", 219_517, 25.0),
    _gauntlet("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", 10, LM, "8485683a8c7e7e6c9fc6ca3cc81140fd85edb27f34406a6736d1539cf7ebcb3a", 235_435, 0.0),
    _gauntlet("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", 10, LM, "41e2964ad619c49edd97c22b2c50f922a0241255d906a754bf81a20f4f66b85f", 35_375, 0.0),
    _gauntlet("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", 10, LM, "8febd2c0080a15680cd17f92bfa30d87abcfac021e646e55d0b8ad69f0cfa767", 7_158, 0.0),
    _gauntlet("boolq", "reading_comprehension/boolq.jsonl", 10, MC, "454ff101e614370bb1807fe7ebbda6fdb57e794b9662cc1ccae211bf1ff626c8", 2_210_395, 62.0, ANSWER),
    _gauntlet("bigbench_language_identification", "language_understanding/bigbench_language_identification.jsonl", 10, MC, "80c98d8e7ab8213513d1643886229c05c40a6837353b07c19ac7bd860668954e", 3_940_808, 25.0),
)  # fmt: skip
CORE_SIZE = 22  # tasks in the published CORE metric; squad and coqa have no offline copy
TASKS = {task.name: task for task in CORE_TASKS}


def _user_task(path: str, type: str, shots: int, **fields: Any) -> Task:
    if type not in TYPES:
        raise NanoGPTError(f"task {path}: type {type!r} is not one of mc, schema, lm ({', '.join(TYPES)})")
    if not Path(path).is_file():
        raise NanoGPTError(f"task file {path} not found")
    return Task(
        Path(path).stem,
        type,
        shots,
        fields.get("delimiter", " "),
        float(fields.get("random_baseline", 0.0)),
        path=path,
    )


def _toml_task(path: str) -> Task:
    try:
        spec = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        file, type = Path(path).parent / spec["file"], _SHORT_TYPES.get(spec["type"], spec["type"])
        extra = {key: spec[key] for key in ("delimiter", "random_baseline") if key in spec}
        task = _user_task(str(file), type, int(spec.get("shots", 0)), **extra)
    except (KeyError, ValueError, TypeError, OSError, tomllib.TOMLDecodeError) as e:
        raise NanoGPTError(
            f"task description {path}: {e} (keys: file, type, shots, delimiter, random_baseline)"
        ) from None
    return replace(task, name=spec.get("name", Path(path).stem))


def resolve_tasks(spec: str) -> list[Task]:
    """The tasks a --tasks value names: `core`, task names, `path.jsonl:TYPE:SHOTS` or `task.toml`,
    separated by commas."""
    tasks: list[Task] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "core":
            tasks += CORE_TASKS
        elif part in TASKS:
            tasks.append(TASKS[part])
        elif part.endswith(".toml"):
            tasks.append(_toml_task(part))
        elif ".jsonl" in part:
            path, _, rest = part.partition(".jsonl")
            kind, _, shots = rest.lstrip(":").partition(":")
            if kind not in _SHORT_TYPES or not (shots or "0").isdigit():
                raise NanoGPTError(
                    f"task {part!r}: write a task file as PATH.jsonl:TYPE:SHOTS, TYPE one of mc, schema, lm"
                )
            tasks.append(_user_task(path + ".jsonl", _SHORT_TYPES[kind], int(shots or 0)))
        else:
            raise NanoGPTError(
                f"unknown task {part!r}: give core, one of {', '.join(TASKS)}, PATH.jsonl:TYPE:SHOTS or a .toml"
            )
    if not tasks:
        raise NanoGPTError("--tasks names no task")
    return list(dict.fromkeys(tasks))  # each once, in order


def _check_item(item: Any, type: str) -> str | None:
    """What is wrong with one item of a `type` task, or None."""
    if not isinstance(item, dict):
        return "not a JSON object"
    strings = {MC: ("query",), SCHEMA: ("continuation",), LM: ("context", "continuation")}[type]
    options = {MC: "choices", SCHEMA: "context_options", LM: None}[type]
    for key in strings:
        if not isinstance(item.get(key), str):
            return f"no string {key!r}"
    if options is None:
        return None
    if not (
        isinstance(item.get(options), list)
        and len(item[options]) >= 2
        and all(isinstance(c, str) for c in item[options])
    ):
        return f"{options!r} is not a list of 2 or more strings"
    gold = item.get("gold")
    if not (isinstance(gold, int) and 0 <= gold < len(item[options])):
        return f"gold {gold!r} is not an index into {options!r}"
    return None


def read_jsonl(path: Path, type: str) -> list[dict]:
    """The items of a JSONL task file, each checked against its layout; a bad line is named."""
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanoGPTError(f"{path} line {number}: not valid JSON ({e.msg})") from None
            problem = _check_item(item, type)
            if problem:
                raise NanoGPTError(f"{path} line {number}: {problem} (a {type} item needs {_LAYOUTS[type]})")
            items.append(item)
    if not items:
        raise NanoGPTError(f"{path} holds no items")
    return items


_LAYOUTS = {
    MC: '{"query": str, "choices": [str, ...], "gold": int}',
    SCHEMA: '{"context_options": [str, ...], "continuation": str, "gold": int}',
    LM: '{"context": str, "continuation": str}',
}


def read_hellaswag_text(path: Path) -> list[dict]:
    """HellaSwag's validation items from their text form (6 lines an item: `activity_label: ctx`, the
    gold label, 4 endings) as multiple-choice items."""
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    lines = lines[:-1] if lines and lines[-1] == "" else lines
    if len(lines) % 6:
        raise NanoGPTError(f"{path}: {len(lines)} lines, not 6 an item (context, label, 4 endings)")
    items = []
    for start in range(0, len(lines), 6):
        query, label, *endings = lines[start : start + 6]
        if label not in ("0", "1", "2", "3"):
            raise NanoGPTError(f"{path} line {start + 2}: label {label!r} is not 0-3")
        items.append({"query": query, "choices": endings, "gold": int(label)})
    return items


def _fetch(task: Task) -> Path:
    try:
        return fetch(task.source)
    except NanoGPTError as e:
        raise NanoGPTError(
            f"task {task.name}: file {task.source.folder}/{task.source.filename}: {e}"
        ) from None


def load_items(task: Task) -> list[dict]:
    """A task's items in file order."""
    if task.source is None:
        return read_jsonl(Path(task.path), task.type)
    path = _fetch(task)
    return read_hellaswag_text(path) if task.source is _HELLASWAG else read_jsonl(path, task.type)


def task_jsonl(task: Task) -> Path:
    """A task's items as a JSONL file of its layout (HellaSwag's text: converted once into the cache)."""
    if task.source is None:
        return Path(task.path)
    if task.source is not _HELLASWAG:
        return _fetch(task)
    target = cache_dir() / "evals" / "hellaswag.jsonl"
    if not target.is_file():
        lines = (json.dumps(item) + "\n" for item in read_hellaswag_text(_fetch(task)))
        write_text_atomic(target, "".join(lines))
    return target
