"""Benchmark evaluation (nanogpt/evals/): each scoring rule on a hand-computed example, nanochat's prompts
and few-shot draw, batching and cutting that change no score, task files (canonical, a user's, broken),
characters a vocabulary lacks, and `nanogpt eval --tasks` end to end."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nanogpt import GPT, GPTConfig
from nanogpt.checkpoint import save_checkpoint
from nanogpt.cli import main as cli
from nanogpt.data.tokenizers import CharTokenizer, GPT2Tokenizer
from nanogpt.errors import NanoGPTError
from nanogpt.evals.prompts import fewshot_indices, prompt_item, render
from nanogpt.evals.report import centered, evaluate_tasks, prompt_task
from nanogpt.evals.scorer import score_items, score_sequences
from nanogpt.evals.tasks import CORE_TASKS, LM, MC, SCHEMA, TASKS, Task, load_items, resolve_tasks


@pytest.fixture(scope="module")
def evals_dir(sources_dir):
    if not (sources_dir / "evals" / "commonsense_reasoning" / "copa.jsonl").is_file():
        pytest.skip(f"no evals/ under {sources_dir}")
    return sources_dir / "evals"


class Bigram(nn.Module):
    """A 3-token model with fixed next-token probabilities: P(next | token) = probs[token]."""

    def __init__(self, probs: list[list[float]], block_size: int = 16):
        super().__init__()
        self.table = torch.tensor(probs).log()
        self.transformer = nn.ModuleDict({"ln_f": nn.Identity()})
        self.config = SimpleNamespace(block_size=block_size)

    def forward(self, idx):
        h = self.transformer.ln_f(self.table[idx])  # the "hidden state" is the logits
        return self._head(h[:, -1:]), None

    def _head(self, h):
        return h


# characters " ", "a", "b" are tokens 0, 1, 2 (no BOS: a character vocabulary has none)
CHARS = CharTokenizer(" ab")
PROBS = [[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.1, 0.2, 0.7]]  # rows: after " ", after "a", after "b"
P = lambda after, nxt: math.log(PROBS[" ab".index(after)][" ab".index(nxt)])


def score(task: Task, item: dict) -> tuple:
    prompted = prompt_item(task, [item], 0, CHARS, 16)
    (v,) = score_items(Bigram(PROBS), task, [prompted], "cpu")
    return v


def test_multiple_choice_rules_by_hand():
    """query "a", choices "a" / "bb": CORE scores the tokens after the common prefix "a " by mean loss,
    lm-eval the continuation " a" / " bb" by sum (acc) and sum / characters (acc_norm)."""
    task = Task("t", MC, 0, " ", 50.0)
    core = [-P(" ", "a"), -(P(" ", "b") + P("b", "b")) / 2]  # 0.693, 0.780
    acc = [P("a", " ") + P(" ", "a"), P("a", " ") + P(" ", "b") + P("b", "b")]  # -1.20, -2.07
    norm = [acc[0] / 1, acc[1] / 2]  # -1.20, -1.04
    assert core[0] < core[1] and acc[0] > acc[1] and norm[1] > norm[0]  # the rules disagree
    v = score(task, {"query": "a", "choices": ["a", "bb"], "gold": 1})
    assert (v.prediction, v.correct, v.acc, v.acc_norm) == (0, False, False, True)
    prompted = prompt_item(task, [{"query": "a", "choices": ["a", "bb"], "gold": 1}], 0, CHARS, 16)
    s = score_sequences(Bigram(PROBS), prompted.sequences, "cpu", "float32")
    assert [x.core_loss for x in s] == pytest.approx(core, rel=1e-6)
    assert [x.logprob for x in s] == pytest.approx(acc, rel=1e-6)


def test_schema_scores_the_shared_continuation_only():
    """contexts "a" / "b", continuation "b": only " b" (the common suffix) is scored, by mean loss."""
    task = Task("t", SCHEMA, 0, " ", 50.0)
    prompted = prompt_item(
        task, [{"context_options": ["a", "b"], "continuation": "b", "gold": 1}], 0, CHARS, 16
    )
    s = score_sequences(Bigram(PROBS), prompted.sequences, "cpu", "float32")
    expected = [-(P("a", " ") + P(" ", "b")) / 2, -(P("b", " ") + P(" ", "b")) / 2]
    assert [x.core_loss for x in s] == pytest.approx(expected, rel=1e-6)
    v = score(task, {"context_options": ["a", "b"], "continuation": "b", "gold": 1})
    assert (v.prediction, v.correct) == (0, False)


def test_language_modeling_needs_every_token_greedy():
    """After "a" the likeliest is " ", after " " it is "a": "a" is reproduced, "b" and "ab" are not."""
    task = Task("t", LM, 0, " ", 0.0)
    assert score(task, {"context": "a", "continuation": "a"}).correct
    assert not score(task, {"context": "a", "continuation": "b"}).correct
    assert not score(
        task, {"context": "a ", "continuation": "ab"}
    ).correct  # " a" right, then " " is likelier than "b"


def test_centered_accuracy():
    assert centered(0.25, 25.0) == 0.0 and centered(1.0, 25.0) == 1.0
    assert centered(0.5, 40.3) == pytest.approx((0.5 - 0.403) / 0.597)
    # every item skipped: no figures (JSON null, never NaN), and no part in CORE
    from nanogpt.evals.report import task_result

    r = task_result(TASKS["copa"], [], skipped=5)
    assert (r["accuracy"], r["centered"], r["acc"], r["acc_norm"], r["skipped"]) == (
        None,
        None,
        None,
        None,
        5,
    )


# nanochat's core_eval.py templates, the reference for how prompts are rendered
NANOCHAT_MC = """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip()
NANOCHAT_LM = """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}""".strip()


def nanochat_fewshot(data: list[dict], item: dict, shots: int) -> list[dict]:
    """nanochat's draw, literally: the data shuffled with Random(1337), then Random(1234 + position)
    samples `shots` of the other positions."""
    shuffled = list(data)
    random.Random(1337).shuffle(shuffled)
    idx = next(i for i, x in enumerate(shuffled) if x is item)
    available = [i for i in range(len(shuffled)) if i != idx]
    return [shuffled[i] for i in random.Random(1234 + idx).sample(available, shots)]


@pytest.mark.parametrize("name", ["arc_easy", "jeopardy"])
def test_prompts_and_fewshot_draw_are_nanochats(evals_dir, name):
    jinja2 = pytest.importorskip("jinja2")
    task = TASKS[name]
    items = load_items(task)
    for index in (0, 7, len(items) - 1):
        examples = [items[i] for i in fewshot_indices(index, len(items), task.shots)]
        assert len(examples) == 10 and all(e is not items[index] for e in examples)
        assert examples == nanochat_fewshot(items, items[index], task.shots)
        ours = ["".join(pair) for pair in render(items[index], task, examples)]
        context = dict(fewshot_examples=examples, continuation_delimiter=task.delimiter, item=items[index])
        if task.type == MC:
            theirs = [
                jinja2.Template(NANOCHAT_MC).render(choice=c, **context) for c in items[index]["choices"]
            ]
        else:
            theirs = [jinja2.Template(NANOCHAT_LM).render(include_continuation=True, **context)]
        assert ours == theirs


def tiny_gpt(block_size: int = 128, vocab_size: int = 50257, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()


def reference_scores(model: GPT, seq) -> tuple[float, float]:
    """(CORE's mean loss, lm-eval's summed log-prob) of one sequence from the model's full logits."""
    x = torch.tensor([seq.tokens])
    logits, _ = model(x[:, :-1], x[:, 1:])  # with targets: logits at every position
    logp = F.log_softmax(logits[0].float(), -1).gather(1, x[0, 1:, None])[:, 0]
    return -logp[seq.core_start - 1 :].mean().item(), logp[seq.lm_start - 1 :].sum().item()


@pytest.mark.parametrize("name", ["copa", "winograd", "lambada_openai", "arc_easy"])
def test_batched_scores_equal_one_sequence_at_a_time(evals_dir, name):
    """Padding, sorting and the head at scored positions only change no score; cutting a prompt from the
    left to a short window keeps every scored token."""
    model, tok = tiny_gpt(), GPT2Tokenizer()
    prompted, _ = prompt_task(TASKS[name], tok, 128, limit=3)
    seqs = [s for item in prompted for s in item.sequences]
    batched = score_sequences(model, seqs, "cpu", "float32")
    for seq, b in zip(seqs, batched, strict=True):
        assert len(seq.tokens) <= 128
        core, lm = reference_scores(model, seq)
        assert b.core_loss == pytest.approx(core, rel=1e-5) and b.logprob == pytest.approx(lm, rel=1e-5)


def test_a_prompt_cut_from_the_left_keeps_its_scored_tokens(evals_dir):
    tok = GPT2Tokenizer()
    items = load_items(TASKS["arc_easy"])
    whole = prompt_item(TASKS["arc_easy"], items, 3, tok, 4096)
    cut = prompt_item(TASKS["arc_easy"], items, 3, tok, 64)
    for w, c in zip(whole.sequences, cut.sequences, strict=True):
        assert len(w.tokens) > 64 == len(c.tokens) and w.tokens[-64:] == c.tokens
        assert len(w.tokens) - w.core_start == len(c.tokens) - c.core_start


def test_task_files_are_checked_and_named(evals_dir, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a"], "gold": 0}\n'
    )
    with pytest.raises(NanoGPTError, match=r"bad.jsonl line 2: 'choices' is not a list of 2 or more strings"):
        load_items(resolve_tasks(f"{bad}:mc:0")[0])
    bad.write_text('{"context": "q", "continuation": "a"}\n{"context": "q", \n')
    with pytest.raises(NanoGPTError, match="bad.jsonl line 2: not valid JSON"):
        load_items(resolve_tasks(f"{bad}:lm:0")[0])
    # a canonical file: missing (no download here) names the task and the file; corrupt fails its sha256
    monkeypatch.setenv("NANOGPT_DATA_SOURCES", str(tmp_path))
    monkeypatch.setenv("NANOGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        "nanogpt.data.sources.urllib.request.urlopen",
        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")),
    )
    with pytest.raises(
        NanoGPTError, match="task copa: file evals/commonsense_reasoning/copa.jsonl: could not download"
    ):
        load_items(TASKS["copa"])
    (tmp_path / "evals" / "commonsense_reasoning").mkdir(parents=True)
    (tmp_path / "evals" / "commonsense_reasoning" / "copa.jsonl").write_text("{}\n")
    with pytest.raises(NanoGPTError, match="copa.jsonl is not the canonical copa.jsonl"):
        load_items(TASKS["copa"])


def test_task_names_and_the_core_table():
    assert len(CORE_TASKS) == 20 and sum(t.source is not None for t in CORE_TASKS) == 20
    assert [t.name for t in resolve_tasks("arc_easy,piqa,arc_easy")] == ["arc_easy", "piqa"]
    with pytest.raises(NanoGPTError, match="unknown task 'hellaswagg'"):
        resolve_tasks("hellaswagg")
    with pytest.raises(NanoGPTError, match="PATH.jsonl:TYPE:SHOTS"):
        resolve_tasks("x.jsonl:multi:0")


def test_a_character_the_vocabulary_lacks(evals_dir):
    """A Shakespeare vocabulary has no digits: the item and the character are named, or skipped and counted."""
    tok = CharTokenizer(
        "".join(sorted(set(" \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:'?!-&$3")))
    )
    task = TASKS["bigbench_operators"]  # "op (op 17) =" ..., and its 10 examples' digits before it
    with pytest.raises(
        NanoGPTError,
        match=r"task bigbench_operators item 1: character '\d' is not in the model's vocabulary of 65",
    ):
        prompt_task(task, tok, 256, limit=5)
    prompted, skipped = prompt_task(task, tok, 256, limit=5, skip_unencodable=True)
    assert (len(prompted), skipped) == (0, 5)


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    """A random GPT-2-tokenizer model saved as a checkpoint of ours."""
    model = tiny_gpt()
    out_dir = tmp_path_factory.mktemp("gpt2_model")
    ckpt = {
        "model": model.state_dict(),
        "model_args": asdict(model.config),
        "tokenizer": GPT2Tokenizer().to_meta(),
    }
    save_checkpoint(ckpt | {"config": {}}, out_dir)
    return out_dir, model


def test_eval_tasks_command(evals_dir, gpt2_ckpt, tmp_path, capsys):
    """--tasks with --limit, --json=FILE and a user's JSONL task; the numbers are the library's."""
    out_dir, model = gpt2_ckpt
    mine = tmp_path / "mine.jsonl"
    mine.write_text(
        "".join(
            json.dumps({"query": f"{i} plus {i} is", "choices": [str(2 * i), str(i)], "gold": 0}) + "\n"
            for i in range(12)
        )
    )
    args = ["eval", "--device=cpu", f"--out_dir={out_dir}", "--limit=15", f"--json={tmp_path / 'r.json'}"]
    assert cli([*args, f"--tasks=copa,winograd,{mine}:mc:2"]) == 0
    table = capsys.readouterr().out
    assert "copa" in table and "mine" in table and "CORE" in table and "over 2 of its 22 tasks" in table
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["tasks"]) == {"copa", "winograd", "mine"} and r["core_tasks"] == 2
    assert set(r["tasks"]["copa"]) >= {"accuracy", "acc", "acc_norm", "centered", "items", "shots"}
    assert (
        r["tasks"]["copa"]["items"] == 15
        and r["tasks"]["mine"]["items"] == 12
        and r["tasks"]["mine"]["shots"] == 2
    )
    direct = evaluate_tasks(model, GPT2Tokenizer(), resolve_tasks("copa,winograd"), "cpu", limit=15)
    assert r["tasks"]["copa"] == direct["tasks"]["copa"] and r["core"] == pytest.approx(direct["core"])
    assert r["core"] == pytest.approx(
        (r["tasks"]["copa"]["centered"] + r["tasks"]["winograd"]["centered"]) / 2
    )


def test_eval_task_described_in_toml(gpt2_ckpt, tmp_path, capsys):
    out_dir, _ = gpt2_ckpt
    (tmp_path / "lm.jsonl").write_text(
        "".join(json.dumps({"context": f"word {i}", "continuation": "x"}) + "\n" for i in range(5))
    )
    (tmp_path / "mytask.toml").write_text('file = "lm.jsonl"\ntype = "lm"\nshots = 1\ndelimiter = ": "\n')
    assert (
        cli(["eval", "--device=cpu", f"--out_dir={out_dir}", f"--tasks={tmp_path / 'mytask.toml'}", "--json"])
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["tasks"]["mytask"]["items"] == 5 and r["tasks"]["mytask"]["type"] == "language_modeling"
    assert r["core"] is None and r["core_tasks"] == 0


@pytest.mark.slow  # trains 2 steps, scores 3 evals, plots: ~8 s
def test_training_writes_task_accuracy_beside_val_loss(evals_dir, data_dir, tmp_path, capsys):
    """eval_tasks: at each eval metrics.jsonl holds the task's accuracy (items the character vocabulary
    cannot encode skipped), the very number `nanogpt eval --tasks` gives on the checkpoint saved there."""
    from conftest import tiny_train_config

    from nanogpt.evals.report import TaskEvaluator
    from nanogpt.train.metrics import read_metrics
    from nanogpt.train.trainer import train

    pytest.importorskip("matplotlib")
    cfg = tiny_train_config(
        data_dir, tmp_path / "run", block_size=128, max_iters=2, eval_interval=1, eval_iters=2
    )
    cfg = cfg.__class__(**{**asdict(cfg), "eval_tasks": "copa,winograd", "eval_tasks_limit": 20})
    train(cfg)
    evals = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 1, 2]
    assert all({"copa_accuracy", "copa_acc_norm", "winograd_accuracy", "core"} <= set(r) for r in evals)
    assert "copa_accuracy" in capsys.readouterr().out and (tmp_path / "run" / "loss.png").is_file()
    assert (
        cli(
            [
                "eval",
                "--device=cpu",
                f"--out_dir={tmp_path / 'run'}",
                "--tasks=copa,winograd",
                "--limit=20",
                "--skip_unencodable",
                "--json",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["tasks"]["copa"]["accuracy"] == evals[-1]["copa_accuracy"]
    assert r["tasks"]["winograd"]["accuracy"] == evals[-1]["winograd_accuracy"]
    assert r["core"] == pytest.approx(evals[-1]["core"])
    assert TaskEvaluator("copa", CHARS, 16, 3).skipped() == {"copa": 3}  # " ab" has none of copa's letters


def test_eval_tasks_with_fsdp_is_refused():
    """Rank 0 alone scores the tasks: an FSDP-sharded model would wait forever for the other ranks."""
    from nanogpt.options import set_fields
    from nanogpt.train.config import TrainConfig

    with pytest.raises(NanoGPTError, match="eval_tasks runs on rank 0 alone"):
        set_fields(TrainConfig(), {"eval_tasks": "copa", "parallel": "fsdp"}, where="test")
    assert set_fields(TrainConfig(), {"eval_tasks": "copa"}, where="test").eval_tasks == "copa"
