#!/usr/bin/env bash
# The recipe ablation in one command: every variant of benchmarks/ablation_recipe.toml over 2 seeds, each
# run 10 minutes of wall clock on this machine (evaluations included), then the whole val split of each
# run's best checkpoint (`nanogpt eval`). Results: runs/ablation_recipe/results.md (mean ± standard error
# per variant: final and best val loss, ms/iter, seconds to val 1.55), val_loss.png (val loss against
# seconds), final_info.json, all_results.json; runs/ablation_recipe/full_val.jsonl.
#
#   bash benchmarks/ablation_recipe.sh                                   # the real thing: ~8 h for 24 x 2 runs
#   bash benchmarks/ablation_recipe.sh --only=baseline,modern --seeds=3  # some rows, more seeds
#   bash benchmarks/ablation_recipe.sh --only=baseline,rope,muon --seeds=1 --max_seconds=300 \
#       --out=runs/screen                                                # benchmarks/README.md's 5-minute screening
#   bash benchmarks/ablation_recipe.sh --max_seconds=30 --seeds=1 --only=baseline,rope,muon,modern \
#       --out=runs/ablation_smoke                                        # does the runner work?
#
# Later --key=value arguments win over the defaults here (any TrainConfig key or experiment option).
# Stopped (Ctrl-C), the same command again keeps finished runs and resumes the stopped one. Run it on a
# quiet machine: the budget is wall clock, so another process's load changes every result.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/ablation_recipe
for arg in "$@"; do
  case "$arg" in --out=*) out="${arg#--out=}" ;; esac
done

python -m nanogpt experiment \
  --config=shakespeare_char_cpu_fast \
  --variants=benchmarks/ablation_recipe.toml \
  --datasets=shakespeare_char \
  --seeds=2 \
  --max_seconds=600 \
  --max_iters=1000000 \
  --lr_decay_iters=1000000 \
  --target_loss=1.55 \
  --out="$out" \
  "$@"

# the whole val split (111,540 characters), not the 20 batches of the runs' own evaluations: each finished
# run once (a run in progress, say another invocation's on the same --out, is left for later)
touch "$out/full_val.jsonl"
for run in "$out"/*/shakespeare_char/seed_* "$out"/shakespeare_char/seed_*; do  # with variants, and without
  [ -f "$run/final_info.json" ] || continue
  grep -qF "\"run\": \"$run\"" "$out/full_val.jsonl" && continue
  python -m nanogpt eval --out_dir="$run" --split=val --json=true 2>/dev/null \
    | python -c 'import json, sys; r = json.load(sys.stdin); r["run"] = sys.argv[1]; print(json.dumps(r))' "$run" \
    >>"$out/full_val.jsonl" || echo "eval of $run failed" >&2
done
echo "whole-split val losses: $out/full_val.jsonl"
