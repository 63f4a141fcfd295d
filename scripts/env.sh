# Sourced by demo.sh and test.sh: create or reuse .venv and install nanogpt into it.
# torch first, pinned, so pip never swaps in a multi-GB CUDA build on a CPU machine. Override with
# NANOGPT_TORCH (e.g. NANOGPT_TORCH=torch for the default CUDA build on a GPU machine).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
EXTRAS="${1:-dev}"
STAMP=".venv/.nanogpt-installed-$EXTRAS"
# reinstall only when the dependencies changed
WANT="$(cat pyproject.toml scripts/env.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "${NANOGPT_TORCH:-torch==2.13.0}"
    .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
    echo "$WANT" > "$STAMP"
fi
# Offline raw sources (tiny Shakespeare, ...): a folder beside the checkout when there is one,
# else nanogpt downloads them from their public URLs.
if [ -z "${NANOGPT_DATA_SOURCES:-}" ] && [ -d "$ROOT/../shared/data" ]; then
    export NANOGPT_DATA_SOURCES="$(cd "$ROOT/../shared/data" && pwd)"
fi
export PATH="$ROOT/.venv/bin:$PATH"
