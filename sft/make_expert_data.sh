#!/usr/bin/env bash
# Stage 1 data: expert trajectories for SFT (JSONL, resumable) into RUN_DIR (eval_agent/layout.py).
# Set a variable to override the stage's default (docs/sft.md lists every one with its default), e.g.
#   TASK_FAMILY=alfworld ALFWORLD_DATA=data/official/alfworld EXPERT_LIMIT=100 bash sft/make_expert_data.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage_lib.sh               # PRESET, PYTHON, TASK_FAMILY, RUN_DIR

SPLIT=${SPLIT:-}                          # the split the expert plays (train)
DATA_ROOT=${DATA_ROOT:-}                  # task data folder; empty = $ALFWORLD_DATA / $VH_DATA, else data/<family>
EXPERT_LIMIT=${EXPERT_LIMIT:-${LIMIT:-}}  # first N tasks only; empty = the whole split (LIMIT: the older name)
EXPORT=${EXPORT:-}                        # also write the published alfworld_sft.json format to this path
EXPERT_SOURCE=${EXPERT_SOURCE:-}          # import this expert file (e.g. the published alfworld_sft.json) instead;
                                          # PRESET=paper: the published file beside the data (eval_agent/published.py)
CHECK_REPLAY=${CHECK_REPLAY:-}            # 1: replay every imported trajectory in the real environment first
REPLAY_KEEP=${REPLAY_KEEP:-}              # all | replayed | succeeded: which checked trajectories are kept
OUT=${OUT:-}                              # the JSONL file; empty = the run directory's expert data

args+=(--task_family "$TASK_FAMILY" --run_dir "$RUN_DIR")
opt --split "$SPLIT"
opt --data_root "$DATA_ROOT"
opt --limit "$EXPERT_LIMIT"
opt --export "$EXPORT"
opt --source "$EXPERT_SOURCE"
flag --check_replay "$CHECK_REPLAY"
opt --replay_keep "$REPLAY_KEEP"
opt --out "$OUT"
exec "$PYTHON" -m sft.make_expert_data "${args[@]}" "$@"
