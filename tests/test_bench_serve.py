"""benchmarks/bench_serve.py's figures: TTFT, TPOT and ITL as vLLM's `bench serve` defines them, from
request records whose times are set by hand; and the synthetic prompts have the asked length."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("httpx", reason="the dev extra (httpx) is not installed")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
bench_serve = importlib.util.module_from_spec(spec)
sys.modules["bench_serve"] = bench_serve  # its dataclasses look their module up there
spec.loader.exec_module(bench_serve)


def test_ttft_tpot_and_itl_follow_vllms_definitions():
    """Request a: sent at 0, chunks at 0.1, 0.2, 0.4 (3 tokens); b: sent at 1, chunks at 1.3, 1.35 (2).
    TTFT: 0.1 and 0.3 s. TPOT (last chunk - first) / (tokens - 1): 0.15 and 0.05 s. ITL, every gap
    between a stream's chunks: 0.1, 0.2, 0.05 s. Over 2 s: 1 request/s, 2.5 output tokens/s."""
    records = [bench_serve.Record(0.0, [0.1, 0.2, 0.4], 3), bench_serve.Record(1.0, [1.3, 1.35], 2)]
    got = bench_serve.figures(records, ["an error"], elapsed=2.0)
    want = {
        "requests": 2,
        "errors": 1,
        "requests_per_s": 1.0,
        "output_tokens_per_s": 2.5,
        "ttft_p50_ms": 100.0,
        "ttft_p99_ms": 300.0,
        "tpot_p50_ms": 50.0,
        "tpot_p99_ms": 150.0,
        "itl_p50_ms": 100.0,
        "itl_p99_ms": 200.0,
    }
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-9), key


def test_no_requests_give_nan_latencies_not_a_crash():
    got = bench_serve.figures([], ["timeout"], elapsed=1.0)
    assert got["requests"] == 0 and got["errors"] == 1 and math.isnan(got["ttft_p99_ms"])


@pytest.mark.parametrize("model", ["baby", "gpt2_124m"])
def test_synthetic_prompts_have_the_asked_length(model):
    from nanogpt.data.tokenizers import CharTokenizer, get_tokenizer

    cfg = bench_serve.BenchServeConfig(model=model, input_len=12)
    tok = CharTokenizer(bench_serve.SHAKESPEARE_CHARS) if model == "baby" else get_tokenizer("gpt2")
    prompts = bench_serve.synthetic_prompts(tok, cfg, 20)
    assert len(set(prompts)) == 20  # random, not one prompt repeated (a server's cache would flatter it)
    lengths = [len(tok.encode(p)) for p in prompts]
    # characters exactly; random GPT-2 tokens decoded and encoded again merge or split a little
    assert all(n == 12 for n in lengths) if model == "baby" else 11 <= sum(lengths) / 20 <= 14


@pytest.mark.slow  # starts a server process
def test_a_short_run_writes_every_level_json_and_plot(tmp_path, monkeypatch, capsys):
    """The script end to end, bounded: a sweep of 1 and 2 clients and a Poisson level against a real server
    on loopback; every level is in the JSON with its figures, no request failed, the plot is written."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "serve.json"
    args = ["--concurrency=1,2", "--request_rates=20", "--seconds=1", "--repeats=1", "--output_len=8"]
    assert bench_serve.main([*args, f"--out={out}"]) == 0
    results = json.loads(out.read_text())
    levels = results["levels"]
    assert [lv.get("concurrency", lv.get("request_rate")) for lv in levels] == [1, 2, 20.0]
    for lv in levels:
        assert lv["errors"] == 0 and lv["requests"] > 0 and lv["output_tokens_per_s"] > 0
        assert 0 < lv["ttft_p50_ms"] <= lv["ttft_p99_ms"] and 0 < lv["itl_p50_ms"] <= lv["itl_p99_ms"]
    assert levels[0]["engine_output_tokens_per_s"] > 0 and "engine_output_tokens_per_s" not in levels[2]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| 2 clients |" in capsys.readouterr().out
