#!/usr/bin/env bash
# Stage 2a: expert and explored step records (expert prefix replayed, then step t by the expert or the greedy
# SFT policy), from the run's expert data and SFT model into RUN_DIR/sampling/ (eval_agent/layout.py).
# docs/sampling.md lists every variable with its default, e.g.
#   TASK_FAMILY=virtualhome KIND=explore bash sampling/generate_steps.sh
# Several machines: the same command with NUM_SHARDS=4 SHARD_ID=0..3, then
#   .venv/bin/python -m sampling.merge --what steps --num_shards 4 --task_family "$TASK_FAMILY" --run_dir "$RUN_DIR"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage_lib.sh                # PRESET, PYTHON, TASK_FAMILY, RUN_DIR

EXPERT_DATA=${EXPERT_DATA:-}               # expert trajectories (ours or published); empty = the run's
SAMPLE_LIMIT=${SAMPLE_LIMIT:-${LIMIT:-}}   # first N expert trajectories only; empty = all (LIMIT: the older name)
source sampling/sampling_vars.sh           # KIND MODEL NUM_SHARDS SHARD_ID
source scripts/episode_vars.sh             # SPLIT DATA_ROOT MAX_STEPS CONCURRENCY
source scripts/model_vars.sh               # BACKEND ENDPOINTS CHAT_FORMAT ICL_NUM INSTRUCTION_FROM ICL_FROM MAX_NEW_TOKENS

args+=(--task_family "$TASK_FAMILY" --run_dir "$RUN_DIR")
opt --expert_data "$EXPERT_DATA"
opt --limit "$SAMPLE_LIMIT"
exec "$PYTHON" -m sampling.generate_steps "${args[@]}" "$@"
