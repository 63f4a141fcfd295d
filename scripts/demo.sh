#!/usr/bin/env bash
# The whole demo on a CPU: prepare tiny Shakespeare, train the baby GPT for ~2000 iterations, sample.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" plot
nanogpt prepare shakespeare_char
nanogpt train shakespeare_char_cpu --out_dir=out/shakespeare_char_cpu "$@"
nanogpt sample --out_dir=out/shakespeare_char_cpu --start="ROMEO:" --num_samples=2 --max_new_tokens=300
echo "metrics: out/shakespeare_char_cpu/metrics.jsonl   loss curve: out/shakespeare_char_cpu/loss.png"
