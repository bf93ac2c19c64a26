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

KIND=${KIND:-}                             # expert | explore | both
MODEL=${MODEL:-}                           # the policy (HF folder or served model name); empty = the run's SFT model
EXPERT_DATA=${EXPERT_DATA:-}               # expert trajectories (ours or published); empty = the run's
SPLIT=${SPLIT:-}                           # the split the expert trajectories play (train)
DATA_ROOT=${DATA_ROOT:-}                   # task data folder; empty = $ALFWORLD_DATA / $VH_DATA, else data/<family>
MAX_STEPS=${MAX_STEPS:-}                   # episode budget, the replayed prefix included (as the original)
SAMPLE_LIMIT=${SAMPLE_LIMIT:-${LIMIT:-}}   # first N expert trajectories only; empty = all (LIMIT: the older name)
NUM_SHARDS=${NUM_SHARDS:-}                 # split the tasks over machines: a task and all its steps go to one shard
SHARD_ID=${SHARD_ID:-}
CONCURRENCY=${CONCURRENCY:-}               # episodes in flight
source scripts/model_vars.sh               # BACKEND ENDPOINTS CHAT_FORMAT ICL_NUM INSTRUCTION_FROM ICL_FROM MAX_NEW_TOKENS

args+=(--task_family "$TASK_FAMILY" --run_dir "$RUN_DIR")
opt --kind "$KIND"
opt --model "$MODEL"
opt --expert_data "$EXPERT_DATA"
opt --split "$SPLIT"
opt --data_root "$DATA_ROOT"
opt --max_steps "$MAX_STEPS"
opt --limit "$SAMPLE_LIMIT"
opt --num_shards "$NUM_SHARDS"
opt --shard_id "$SHARD_ID"
opt --concurrency "$CONCURRENCY"
exec "$PYTHON" -m sampling.generate_steps "${args[@]}" "$@"
