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
Targets: issue 6, >= 10x tokens/s with the cache than without for 500 new tokens, and >= HF generate(),
both in setting b, batch 1 and 8; issue 14, setting c >= 5x recompute at batch 1.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nanogpt.bench import measure_generation
from nanogpt.device import device_name
from nanogpt.files import write_text_atomic
from nanogpt.model import GPT, GPTConfig
from nanogpt.options import parse_options
from nanogpt.train.config import load_train_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHAKESPEARE_CHARS = 65  # tiny Shakespeare's distinct characters: the preset's vocabulary


@dataclass
class Options:
    new_tokens: int = 500
    repeats: int = 3
    long_block_size: int = 1024  # setting b's context window (>= 1 + new_tokens)
    hf: bool = True  # also time transformers' generate() in setting b
    out: str = "benchmarks/results/bench_generate.json"


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
    results = {
        "options": asdict(opts),
        "machine": {
            "cpu": device_name("cpu"),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "settings": settings,
        # ru_maxrss is in KiB on Linux (bytes on macOS)
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / (1024 if sys.platform != "darwin" else 2**20),
    }
    out = Path(opts.out)
    write_text_atomic(out, json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"\npeak RSS {results['peak_rss_mib']:.0f} MiB; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
