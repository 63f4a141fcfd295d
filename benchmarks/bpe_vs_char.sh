#!/usr/bin/env bash
# Byte-level BPE (512 and 4096 tokens, trained on the train split) vs characters on tiny Shakespeare:
# the same model (the shakespeare_char_cpu preset) trained for the same wall-clock time on each, compared
# in bits per byte of the same val text (the last 10% of the file by characters, for all three datasets),
# which is the figure that compares across vocabularies (loss per token does not).
#
#     bash benchmarks/bpe_vs_char.sh            # 10 minutes per run, 1 seed: ~30 minutes
#     SECONDS_PER_RUN=60 SEEDS=2 bash benchmarks/bpe_vs_char.sh
#
# Not run yet: written while the machine was shared by several agents; run it on a quiet machine (the
# runs are timed, so a busy machine gives each fewer steps). Results: $OUT/results.md (loss per token,
# from the experiment runner) and $OUT/bits_per_byte.md (from `nanogpt eval` on each run).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}
OUT=${OUT:-runs/bpe_vs_char}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-600}
SEEDS=${SEEDS:-1}
SOURCE=${NANOGPT_DATA_SOURCES:-../shared/data}/tinyshakespeare/input.txt
NANOGPT="python -m nanogpt"

$NANOGPT prepare shakespeare_char --data_dir "$DATA"
for n in 512 4096; do
    $NANOGPT prepare "shakespeare_bpe$n" --source "$SOURCE" --tokenizer bpe --vocab_size "$n" --data_dir "$DATA"
done
$NANOGPT experiment --config=shakespeare_char_cpu \
    --datasets=shakespeare_char,shakespeare_bpe512,shakespeare_bpe4096 --seeds="$SEEDS" --out="$OUT" \
    --data_dir="$DATA" --max_seconds="$SECONDS_PER_RUN" --max_iters=1000000  # the schedule follows the time spent
for run in "$OUT"/*/seed_*; do
    $NANOGPT eval --out_dir="$run" --split=val --json > "$run/eval_val.json"
done
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
lines = ["| dataset | seed | val bits per byte | val bits per char | val loss per token |", "|---|---|---|---|---|"]
for path in sorted(out.glob("*/seed_*/eval_val.json")):
    r = json.loads(path.read_text())
    lines.append(f"| {path.parts[-3]} | {path.parts[-2]} | {r['bits_per_byte']:.4f} | {r['bits_per_char']:.4f} | {r['loss']:.4f} |")
(out / "bits_per_byte.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
