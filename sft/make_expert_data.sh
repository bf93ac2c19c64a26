#!/usr/bin/env bash
# Stage 1 data: expert trajectories for SFT (JSONL, resumable). Edit the values below or override them
# from the environment, e.g.  DATA_ROOT=/data/alfworld LIMIT=100 bash sft/make_expert_data.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TASK=${TASK:-alfworld}                    # alfworld (handcoded expert on the games) | virtualhome (generated trajectories)
SPLIT=${SPLIT:-train}
DATA_ROOT=${DATA_ROOT:-}                  # empty = the task family's lookup ($ALFWORLD_DATA / $VH_DATA, else data/<task>)
OUT=${OUT:-outputs/${TASK}/sft/expert_${SPLIT}.jsonl}
LIMIT=${LIMIT:-}                          # first N tasks only; empty = the whole split
EXPORT=${EXPORT:-}                        # also write the published alfworld_sft.json format to this path
PYTHON=${PYTHON:-.venv/bin/python}

args=(--task "$TASK" --split "$SPLIT" --out "$OUT")
[ -n "$DATA_ROOT" ] && args+=(--data_root "$DATA_ROOT")
[ -n "$LIMIT" ] && args+=(--limit "$LIMIT")
[ -n "$EXPORT" ] && args+=(--export "$EXPORT")

"$PYTHON" -m sft.make_expert_data "${args[@]}" "$@"
echo "expert data: $OUT"
