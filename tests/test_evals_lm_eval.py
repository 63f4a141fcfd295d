"""Our evaluator against the standard tools on the same weights and items, in float32: lm-eval's `hf`
backend on the exported model (acc, acc_norm, log-likelihoods), CORE's rule recomputed from transformers'
logits and tokenizer, and the `nanogpt` lm-eval plugin. Slow: lm-eval scores one request at a time."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from torch.nn import functional as F

from nanogpt import GPT, GPTConfig
from nanogpt.checkpoint import save_checkpoint
from nanogpt.data.tokenizers import GPT2Tokenizer
from nanogpt.evals.prompts import fewshot_indices, render
from nanogpt.evals.report import prompt_task
from nanogpt.evals.scorer import score_items, score_sequences
from nanogpt.evals.tasks import LM, MC, TASKS, load_items

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

ZERO_SHOT = ["hellaswag_zeroshot", "copa", "openbook_qa", "winograd", "lambada_openai"]
ITEMS = 200


@pytest.fixture(scope="module")
def exported(sources_dir, tmp_path_factory):
    """A random GPT-2-tokenizer model, as our checkpoint and as a HF folder; lm-eval task YAMLs over
    the local task files."""
    from nanogpt.evals.lm_eval_plugin import write_task_yamls
    from nanogpt.hf import export

    if not (sources_dir / "evals").is_dir():
        pytest.skip(f"no evals/ under {sources_dir}")
    root = tmp_path_factory.mktemp("lm_eval")
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOGPT_CACHE", str(root / "cache"))  # hellaswag's JSONL is converted into the cache
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=2, n_head=2, n_embd=64)).eval()
    tok = GPT2Tokenizer()
    export(model, root / "hf", tok)
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": tok.to_meta()}
    save_checkpoint(ckpt | {"config": {}}, root / "ckpt")
    write_task_yamls(root / "yaml", ZERO_SHOT)
    yield model, tok, root
    mp.undo()


def run_lm_eval(root, model: str, model_args: str, limit: int) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[f"nanogpt_{n}" for n in ZERO_SHOT],
        limit=limit,
        log_samples=True,
        task_manager=TaskManager(include_path=str(root / "yaml")),
        device="cpu",
        batch_size=1,
    )


def per_item(result: dict, name: str) -> list[dict]:
    return sorted(result["samples"][f"nanogpt_{name}"], key=lambda s: s["doc_id"])


def test_equal_to_lm_eval_hf_backend(exported):
    """Identical per-item acc / acc_norm and equal log-likelihoods to lm-eval's hf backend (BOS
    prepended, as CORE does), 200 items of each 0-shot task."""
    model, tok, root = exported
    result = run_lm_eval(root, "hf", f"pretrained={root / 'hf'},add_bos_token=True,dtype=float32", ITEMS)
    for name in ZERO_SHOT:
        task = TASKS[name]
        prompted, skipped = prompt_task(task, tok, model.config.block_size, ITEMS)
        verdicts = score_items(model, task, prompted, "cpu")
        theirs = per_item(result, name)
        assert skipped == 0 and len(theirs) == len(verdicts) == min(ITEMS, len(load_items(task)))  # copa: 100
        assert [float(v.acc) for v in verdicts] == [s["acc"] for s in theirs], name
        if task.type == MC:
            assert [float(v.acc_norm) for v in verdicts] == [s["acc_norm"] for s in theirs], name
        ours = [
            x.logprob for item in prompted for x in score_sequences(model, item.sequences, "cpu", "float32")
        ]
        lls = [ll for s in theirs for (ll, _greedy) in (r[0] for r in s["resps"])]
        assert ours == pytest.approx(lls, rel=1e-4, abs=1e-3), name


def common(seqs: list[list[int]]) -> int:
    n = 0
    while n < min(map(len, seqs)) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def core_reference(hf_model, hf_tok, task, items, index) -> bool:
    """CORE's verdict on one item written from nanochat's description: transformers' tokenizer and logits."""
    examples = [items[i] for i in fewshot_indices(index, len(items), task.shots)]
    prompts = ["".join(p) for p in render(items[index], task, examples)]
    bos = [hf_tok.bos_token_id]
    tokens = [bos + hf_tok(p)["input_ids"] for p in prompts]
    if task.type == LM:
        without = bos + hf_tok((prompts[0][: -len(items[index]["continuation"])]).strip())["input_ids"]
        starts = [len(without)]
    elif task.type == MC:
        starts = [common(tokens)] * len(tokens)
    else:
        suffix = common([t[::-1] for t in tokens])
        starts = [len(t) - suffix for t in tokens]
    losses, greedy = [], []
    for t, s in zip(tokens, starts, strict=True):
        with torch.no_grad():
            logits = hf_model(torch.tensor([t])).logits[0]
        target = torch.tensor(t[s:])
        losses.append(F.cross_entropy(logits[s - 1 : len(t) - 1], target).item())
        greedy.append(bool((logits[s - 1 : len(t) - 1].argmax(-1) == target).all()))
    if task.type == LM:
        return greedy[0]
    return losses.index(min(losses)) == items[index]["gold"]


def test_core_rule_equals_a_reference_from_transformers(exported):
    model, tok, root = exported
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(root / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
    for name in ZERO_SHOT:
        task = TASKS[name]
        items = load_items(task)
        prompted, _ = prompt_task(task, tok, model.config.block_size, 50)
        ours = [v.correct for v in score_items(model, task, prompted, "cpu")]
        assert ours == [core_reference(hf_model, hf_tok, task, items, i) for i in range(50)], name


def test_plugin_gives_our_evaluators_numbers(exported):
    """lm-eval with `--model nanogpt` on the same tasks: the same per-item acc / acc_norm as our evaluator
    (and so as the hf backend); loglikelihood_rolling and generate_until answer."""
    from nanogpt.evals.lm_eval_plugin import NanoGPTLM

    model, tok, root = exported
    result = run_lm_eval(root, "nanogpt", f"out_dir={root / 'ckpt'}", 50)
    for name in ZERO_SHOT:
        task = TASKS[name]
        prompted, _ = prompt_task(task, tok, model.config.block_size, 50)
        verdicts = score_items(model, task, prompted, "cpu")
        theirs = per_item(result, name)
        assert [float(v.acc) for v in verdicts] == [s["acc"] for s in theirs], name
        if task.type == MC:
            assert [float(v.acc_norm) for v in verdicts] == [s["acc_norm"] for s in theirs], name
    lm = NanoGPTLM(out_dir=str(root / "ckpt"), device="cpu")
    request = lambda *args: type("Request", (), {"args": args})()
    text = "The quick brown fox jumps over the lazy dog. " * 60  # 601 tokens: 3 windows of 256
    (rolling,) = lm.loglikelihood_rolling([request(text)])
    ids, total = [tok.eot, *tok.encode(text)], 0.0
    for a in range(1, len(ids), 256):  # predict ids[a:b] with as much context as fits, as lm-eval does
        b = min(a + 256, len(ids))
        x = torch.tensor([ids[max(0, b - 257) : b]])
        logits, _ = model(x[:, :-1], x[:, 1:])
        total += F.log_softmax(logits[0, -(b - a) :], -1).gather(1, x[0, -(b - a) :, None]).sum().item()
    assert rolling == pytest.approx(total, rel=1e-4)
    (generated,) = lm.generate_until([request("Once upon a time", {"until": ["\n"], "max_gen_toks": 8})])
    assert isinstance(generated, str) and "\n" not in generated
