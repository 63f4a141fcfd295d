#!/usr/bin/env bash
# The test suite: lint, then pytest (slow tests included). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" dev
ruff check nanogpt tests benchmarks
ruff format --check nanogpt tests benchmarks
HF_HUB_OFFLINE=1 python -m pytest "$@"
