"""Generation throughput: our KV cache vs recomputing every step, and vs Hugging Face's generate() with its
own cache on the same weights. Batch 1 and 8; medians of --repeats runs; JSON out; peak RSS.

    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py                 # 500 new tokens, 3 repeats
    python benchmarks/bench_generate.py --new_tokens=200 --out=/tmp/gen.json

Models (random weights: throughput does not depend on what the weights are), the shape of the
shakespeare_char_cpu preset (4 layers, 4 heads, n_embd 128, 65-character vocabulary):
  a) block_size 64, the preset's own. GPT.generate keeps nanoGPT's semantics: once the sequence outgrows
     block_size it conditions on the last block_size tokens at positions 0..block_size-1, so every cached
     key is stale and those steps recompute. Of 500 new tokens only the first 63 use the cache: expect ~1x.
  b) block_size 1024: prompt + all new tokens fit in the window, so the cache serves every step.
     HF's GPT2LMHeadModel (exported with nanogpt.hf.export) runs here too, and a float64 greedy run checks
     that it produces the very tokens ours does.
  c) block_size 64 with rotary positions (position="rope"): keys hold their own position, so the cache
     rolls past the window and serves all 500 steps. Its exact recompute reads every token that reaches the
     last one through the layers' windows (n_layer * 63 + 1 = 253), so the honest baseline is also
     setting a's recompute (nanoGPT's loop over the last 64 tokens): column "vs nanoGPT's loop".
Every setting samples at temperature 1 with no top-k/top-p, from a 1-token prompt, never stopping early.
Targets: >= 10x tokens/s with the cache than without for 500 new tokens, and >= HF generate(),
both in setting b, batch 1 and 8; setting c >= 5x recompute at batch 1.

--quantize measures instead what nanogpt.quantize buys: cached decoding tokens/s at batch 1 and 8 of the
baby shape (the preset's, block 64, 63 new tokens) and of GPT-2-124M's (block 1024, --quantize_tokens new
tokens) in float32, bfloat16 (autocast) and int8, the variants alternated within each repeat (medians);
also int8 with every Linear quantised (the baby's layers are below quantization.MIN_WEIGHTS) and int8 with a
float32 head (GPT-2's). Then it trains the baby for --train_iters steps on shakespeare_char and gives the
val loss in float32 and int8. Target: int8 >= 2x float32 at GPT-2-124M, batch 1; loss within 1%.

    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py --quantize     # about two minutes
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nanogpt.bench import GEN_BATCH_SIZES, measure_generation
from nanogpt.checkpoint import load_model
from nanogpt.data.loader import load_split
from nanogpt.data.prepare import ensure_prepared
from nanogpt.device import device_name
from nanogpt.evaluate import evaluate
from nanogpt.files import write_text_atomic
from nanogpt.model import GPT, GPTConfig
from nanogpt.options import parse_options
from nanogpt.perf import generation_tokens_per_second
from nanogpt.quantization import quantize
from nanogpt.train.config import load_train_config
from nanogpt.train.trainer import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHAKESPEARE_CHARS = 65  # tiny Shakespeare's distinct characters: the preset's vocabulary


@dataclass
class Options:
    new_tokens: int = 500
    repeats: int = 3
    long_block_size: int = 1024  # setting b's context window (>= 1 + new_tokens)
    hf: bool = True  # also time transformers' generate() in setting b
    quantize: bool = False  # measure float32 vs bfloat16 vs int8 instead (see above)
    quantize_tokens: int = 16  # --quantize: new tokens per run at the GPT-2-124M shape
    train_iters: int = 300  # --quantize: training steps of the baby model whose val loss is compared
    out: str = ""  # "": benchmarks/results/bench_generate.json (bench_generate_quantize.json with --quantize)


def preset_model(block_size: int, position: str = "learned") -> GPT:
    cfg = load_train_config(["shakespeare_char_cpu"])
    torch.manual_seed(0)
    shape = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, bias=cfg.bias, position=position)
    return GPT(GPTConfig(block_size=block_size, vocab_size=SHAKESPEARE_CHARS, **shape)).eval()


def hf_tokens_per_second(hf_model, batch_size: int, new_tokens: int, repeats: int) -> float:
    """transformers' generate() with its KV cache, sampling like ours (temperature 1, no top-k), median."""
    prompt = torch.zeros(batch_size, 1, dtype=torch.long)
    # top_k=0 and top_p=1 switch both filters off in every transformers version; the explicit mask keeps
    # HF from treating token 0 (also the pad id it needs for a batch) as padding
    kwargs = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, use_cache=True, pad_token_id=0)
    kwargs |= dict(attention_mask=torch.ones_like(prompt))
    hf_model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = hf_model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        times.append(time.perf_counter() - t0)
        assert out.shape == (batch_size, 1 + new_tokens)
    return batch_size * new_tokens / statistics.median(times)


def with_hf(model: GPT, rows: list[dict], new_tokens: int, repeats: int) -> bool:
    """Add HF's tokens/s to `rows` (model = setting b); return whether greedy decoding agrees token for
    token with ours in float64 (the same weights, the same function)."""
    from transformers import GPT2LMHeadModel

    from nanogpt.hf import export

    with tempfile.TemporaryDirectory() as folder:
        export(model, folder)
        hf_model = GPT2LMHeadModel.from_pretrained(folder).eval()
    for row in rows:
        hf = hf_tokens_per_second(hf_model, row["batch_size"], new_tokens, repeats)
        row["hf_generate_tokens_per_sec"] = hf
        row["kv_cache_vs_hf"] = row["tokens_per_sec_kv_cache"] / hf
    prompt = torch.randint(SHAKESPEARE_CHARS, (2, 5), generator=torch.Generator().manual_seed(0))
    steps = min(100, model.config.block_size - prompt.size(1))  # HF's window cannot slide: stay inside it
    ref = hf_model.double().generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
    )
    mine = model.double().generate(prompt, steps, temperature=0.0)
    model.float()
    return torch.equal(ref, mine)


def int8_head_in_float32(model: GPT) -> GPT:
    """A copy of model with every Linear int8 but the head, float32 and still tied to wte."""
    model = copy.deepcopy(model)
    head = model.lm_head
    quantize(model)
    model.lm_head = head
    return model


def precision_variants(model: GPT, baby: bool) -> dict[str, tuple[GPT, str]]:
    """name -> (model, autocast dtype) of each variant timed at this shape."""
    variants = {
        "float32": (model, "float32"),
        "bfloat16": (model, "bfloat16"),
        "int8": (quantize(copy.deepcopy(model)), "float32"),
    }
    if baby:
        variants["int8_every_linear"] = (quantize(copy.deepcopy(model), min_weights=0), "float32")
    else:
        variants["int8_float32_head"] = (int8_head_in_float32(model), "float32")
    return variants


def precision_rows(model: GPT, baby: bool, new_tokens: int, repeats: int) -> list[dict]:
    """Cached decoding tokens/s of each variant at each batch size: medians of `repeats` rounds, each
    round timing every variant once (a busy machine slows them alike), with ratios to float32."""
    variants = precision_variants(model, baby)
    rows = []
    for batch_size in GEN_BATCH_SIZES:
        runs: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, (variant, dtype) in variants.items():
                rate = generation_tokens_per_second(variant, batch_size, new_tokens, True, dtype, 1)
                runs[name].append(rate)
        rates = {name: statistics.median(r) for name, r in runs.items()}
        row = {"batch_size": batch_size, "new_tokens": new_tokens, "tokens_per_sec": rates}
        row["vs_float32"] = {name: rate / rates["float32"] for name, rate in rates.items()}
        rows.append(row)
        print(
            f"  batch {batch_size}: " + ", ".join(f"{n} {r:,.1f}" for n, r in rates.items()), file=sys.stderr
        )
    return rows


def trained_val_losses(train_iters: int) -> dict[str, float]:
    """Val loss (whole split) of the baby model after train_iters steps on shakespeare_char, in float32
    and int8 (as quantize does it, and with every Linear int8)."""
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = load_train_config(["shakespeare_char_cpu"])
        ensure_prepared(cfg.dataset, cfg.data_dir)
        steps = [f"--max_iters={train_iters}", f"--lr_decay_iters={train_iters}", f"--out_dir={out_dir}"]
        steps.append(f"--warmup_iters={train_iters // 10}")
        cfg = load_train_config(
            ["shakespeare_char_cpu", *steps, "--eval_interval=100000", "--log_interval=100"]
        )
        train(cfg)
        model, tokenizer = load_model(out_dir)
    tokens = load_split(Path(cfg.data_dir) / cfg.dataset, "val")
    models = {
        "float32": model,
        "int8": quantize(copy.deepcopy(model)),
        "int8_every_linear": quantize(copy.deepcopy(model), min_weights=0),
    }
    losses = {name: evaluate(m, tokenizer, tokens, batch_size=32)["loss"] for name, m in models.items()}
    relative = {
        f"{name}_vs_float32": losses[name] / losses["float32"] - 1 for name in models if "int8" in name
    }
    return {**losses, **relative}


def precision_results(opts: Options) -> dict:
    """--quantize's measurements, as one JSON-able dict."""
    shapes = {
        "baby": (preset_model(64), 63),
        "gpt2_124m": (GPT(GPTConfig()).eval(), opts.quantize_tokens),  # 50304 tokens, 12 x 768, block 1024
    }
    settings = {}
    for name, (model, new_tokens) in shapes.items():
        print(f"{name}: {model.get_num_params() / 1e6:.2f}M params", file=sys.stderr)
        settings[name] = {"rows": precision_rows(model, name == "baby", new_tokens, opts.repeats)}
    return {"settings": settings, "val_loss": trained_val_losses(opts.train_iters)}


def precision_markdown(results: dict) -> str:
    lines = ["| shape | batch | variant | tokens/s | vs float32 |", "|---|---:|---|---:|---:|"]
    for shape, setting in results["settings"].items():
        for r in setting["rows"]:
            lines += [
                f"| {shape} | {r['batch_size']} | {n} | {rate:,.1f} | {r['vs_float32'][n]:.2f}x |"
                for n, rate in r["tokens_per_sec"].items()
            ]
    loss = results["val_loss"]
    lines.append("\nval loss of the trained baby (whole split):")
    lines += [
        f"- {n}: {v:.4f}" if not n.endswith("_vs_float32") else f"- {n}: {v:+.3%}" for n, v in loss.items()
    ]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    lines = [
        "| setting | batch | KV cache tok/s | recompute tok/s | speedup | vs nanoGPT's loop "
        "| HF generate tok/s | ours / HF |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, setting in results["settings"].items():
        for r in setting["rows"]:
            hf = r.get("hf_generate_tokens_per_sec")
            hf_cells = f"{hf:,.0f} | {r['kv_cache_vs_hf']:.2f}x" if hf else "- | -"
            loop = f"{r['vs_nanogpt_loop']:.2f}x" if "vs_nanogpt_loop" in r else "-"
            lines.append(
                f"| {name} | {r['batch_size']} | {r['tokens_per_sec_kv_cache']:,.0f} | "
                f"{r['tokens_per_sec_recompute']:,.0f} | {r['kv_cache_speedup']:.2f}x | {loop} | {hf_cells} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    opts = parse_options(Options, argv, __doc__)
    if opts is None:  # --help
        return 0
    if opts.quantize:
        return write_results(
            opts, precision_results(opts), precision_markdown, "bench_generate_quantize.json"
        )
    settings = {}
    cases = (
        ("a_block64", 64, "learned"),
        (f"b_block{opts.long_block_size}", opts.long_block_size, "learned"),
        ("c_block64_rope", 64, "rope"),
    )
    for name, block_size, position in cases:
        model = preset_model(block_size, position)
        print(f"{name}: {model.get_num_params() / 1e6:.2f}M params, block_size {block_size}", file=sys.stderr)
        rows = measure_generation(model, opts.new_tokens, "float32", opts.repeats)
        setting = {"block_size": block_size, "position": position, "rows": rows}
        if opts.hf and block_size >= 1 + opts.new_tokens and position == "learned":
            setting["hf_greedy_tokens_match"] = with_hf(model, rows, opts.new_tokens, opts.repeats)
        settings[name] = setting
    for rope, learned in zip(settings["c_block64_rope"]["rows"], settings["a_block64"]["rows"], strict=True):
        rope["vs_nanogpt_loop"] = rope["tokens_per_sec_kv_cache"] / learned["tokens_per_sec_recompute"]
    return write_results(opts, {"settings": settings}, markdown, "bench_generate.json")


def write_results(opts: Options, measured: dict, table: Callable[[dict], str], default_name: str) -> int:
    """Add the options, the machine and the peak RSS to `measured`; write it as JSON and print its table."""
    results = {
        "options": asdict(opts),
        "machine": {
            "cpu": device_name("cpu"),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        **measured,
        # ru_maxrss is in KiB on Linux (bytes on macOS)
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / (1024 if sys.platform != "darwin" else 2**20),
    }
    out = Path(opts.out or f"benchmarks/results/{default_name}")
    write_text_atomic(out, json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\npeak RSS {results['peak_rss_mib']:.0f} MiB; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
