#!/usr/bin/env bash
# The test command (README): set-up if needed, then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@" tests
