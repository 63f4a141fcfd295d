"""A `nanogpt` model for EleutherAI's lm-evaluation-harness (`pip install nanogpt[eval]`), and lm-eval task
YAMLs over our local task files (lm-eval's own task definitions download their data).

    nanogpt-lm-eval --model nanogpt --model_args out_dir=out/x --tasks hellaswag      # online data
    python -m nanogpt.evals.lm_eval_plugin --model nanogpt ...                         # the same
    python -m nanogpt.evals.lm_eval_plugin tasks lm_eval_tasks/                       # write offline YAMLs
    nanogpt-lm-eval --model nanogpt --model_args out_dir=out/x --include_path lm_eval_tasks --tasks nanogpt_copa

lm-eval 0.4 finds models only in its own registry, so `nanogpt-lm-eval` is lm-eval's command with this
module imported; `import nanogpt.evals.lm_eval_plugin` does the same for `lm_eval.simple_evaluate`.
model_args: out_dir (or init_from: gpt2, a HF folder, a checkpoint file), dtype (device and batch size:
lm-eval's --device and --batch_size),
add_bos_token (default True: the end-of-text token before every context, as CORE does; lm-eval's hf
backend gives the same numbers with add_bos_token=True).
Scores come from the scorer of `nanogpt eval --tasks` (nanogpt/evals/scorer.py); requests are encoded
by lm-eval's TemplateLM (trailing context whitespace moved to the continuation; an empty context
conditioned on the end-of-text token) and cut as its hf backend cuts them: the last block_size + 1 tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models: its registry loads them only while empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from nanogpt.checkpoint import load_for_inference, model_source
from nanogpt.device import resolve_device, resolve_dtype
from nanogpt.errors import NanoGPTError
from nanogpt.evals.prompts import Sequence
from nanogpt.evals.scorer import score_sequences
from nanogpt.evals.tasks import LM, MC, TASKS, Task, task_jsonl
from nanogpt.files import write_text_atomic
from nanogpt.generate import generate
from nanogpt.model import Sampling


@register_model("nanogpt")
class NanoGPTLM(TemplateLM):
    """lm-eval's LM over a nanogpt model: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(
        self,
        out_dir: str = "out",
        init_from: str = "resume",
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int | str = 32,
        add_bos_token: bool | str = True,  # as CORE does (lm-eval's hf backend: add_bos_token=True)
        **_: Any,  # lm-eval passes its own (e.g. max_batch_size) too
    ):
        super().__init__()
        self.device_name = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device_name)
        self.model, self.tokenizer = load_for_inference(
            model_source(init_from, out_dir), self.device_name, False
        )
        self.rows = int(batch_size) if str(batch_size).isdigit() else 32
        self.window = self.model.config.block_size
        self.bos = (
            [self.tokenizer.eot] if str(add_bos_token) == "True" and self.tokenizer.eot is not None else []
        )

    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eot is None:
            raise NanoGPTError(
                f"the {self.tokenizer.name} tokenizer has no end-of-text token to condition an empty context on"
            )
        return self.tokenizer.eot

    def tok_encode(self, string: str, **_: Any) -> list[int]:
        return self.bos + self.tokenizer.encode(string)

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether greedy decoding reproduces it) per request
        ((context, continuation), context tokens, continuation tokens), batched longest first."""
        seqs = []
        for _, context, continuation in requests:
            tokens = (context + continuation)[-(self.window + 1) :]
            start = len(tokens) - len(continuation)
            seqs.append(Sequence(tokens, start, start, ""))
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].tokens))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
        for b in range(0, len(order), self.rows):
            batch = order[b : b + self.rows]
            for i, score in zip(
                batch,
                score_sequences(self.model, [seqs[i] for i in batch], self.device_name, self.dtype),
                strict=True,
            ):
                results[i] = (score.logprob, score.greedy)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in disjoint windows of block_size tokens (lm-eval's)."""
        totals = []
        for (text,) in [r.args for r in requests]:
            windows = get_rolling_token_windows(
                self.tokenizer.encode(text), self.eot_token_id, self.window, 1
            )
            pieces = [(None, *make_disjoint_window(w)) for w in windows]
            totals.append(sum(logprob for logprob, _ in self._loglikelihood_tokens(pieces)))
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first of the request's `until` strings."""
        outputs = []
        for context, options in [r.args for r in requests]:
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else until
            max_new = int(options.get("max_gen_toks", 256))
            prompt = self.tok_encode(context)[-self.window :] or [self.eot_token_id]
            idx = torch.tensor([prompt], device=self.device_name)
            greedy = Sampling(temperature=0.0, vocab_size=self.tokenizer.vocab_size)  # only ids with text
            out = generate(self.model, idx, max_new, sampling=greedy)[0, len(prompt) :].tolist()
            text = self.tokenizer.decode(out)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def _metrics(*names: str) -> list[dict[str, Any]]:
    return [{"metric": name, "aggregation": "mean", "higher_is_better": True} for name in names]


def task_yaml(task: Task, path: Path) -> dict[str, Any]:
    """lm-eval's task config (as a dict) for one of our tasks over its JSONL file at `path` (0-shot as the
    task's own few-shot draw is nanochat's, not lm-eval's)."""
    d = task.delimiter
    base = {
        "task": f"nanogpt_{task.name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "target_delimiter": d[len(d.rstrip()) :],
    }
    if task.type == MC:
        text = {
            "doc_to_text": "{{query}}" + d.rstrip(),
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}",
        }
        return base | text | {"output_type": "multiple_choice", "metric_list": _metrics("acc", "acc_norm")}
    if task.type == LM:  # lm-eval adds no target_delimiter to a loglikelihood request: the target holds it
        target = base.pop("target_delimiter") + "{{continuation}}"
        text = {"doc_to_text": "{{context | trim}}" + d.rstrip(), "doc_to_target": target}
        return base | text | {"output_type": "loglikelihood", "metric_list": _metrics("acc")}
    text = {
        "doc_to_text": "{{gold}}",
        "doc_to_choice": "{{context_options}}",
        "doc_to_target": "{{continuation}}",
    }
    return base | text | {"output_type": "multiple_choice", "metric_list": _metrics("acc")}


def write_task_yamls(folder: str | Path, names: list[str]) -> list[Path]:
    """lm-eval task YAMLs (JSON is YAML) for our tasks `names`, over their local files, into `folder`."""
    written = []
    for name in names:
        if name not in TASKS:
            raise NanoGPTError(f"unknown task {name!r}: one of {', '.join(TASKS)}")
        target = Path(folder) / f"nanogpt_{name}.yaml"
        write_text_atomic(
            target, json.dumps(task_yaml(TASKS[name], task_jsonl(TASKS[name])), indent=1) + "\n"
        )
        written.append(target)
    return written


def cli() -> None:
    """`nanogpt-lm-eval`: lm-eval's command line with the nanogpt model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    if sys.argv[1:2] == ["tasks"]:  # python -m nanogpt.evals.lm_eval_plugin tasks FOLDER [TASK ...]
        if len(sys.argv) < 3:
            sys.exit("usage: python -m nanogpt.evals.lm_eval_plugin tasks FOLDER [TASK ...]")
        names = sys.argv[3:] or [t for t in TASKS if t != "hellaswag"]
        print("\n".join(str(p) for p in write_task_yamls(sys.argv[2], names)))
    else:  # lm-eval's own options
        cli()
