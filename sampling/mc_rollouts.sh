#!/usr/bin/env bash
# Stage 2b: N Monte-Carlo rollouts (temperature 1) after every step record of the run; the step reward is
# their mean success. Run sampling/generate_steps.sh first. Writes RUN_DIR/sampling/mc/ (eval_agent/layout.py).
# docs/sampling.md lists every variable with its default, e.g.
#   TASK_FAMILY=virtualhome N=5 BACKEND=openai ENDPOINTS=endpoints.txt bash sampling/mc_rollouts.sh
# Several machines: NUM_SHARDS/SHARD_ID as for generate_steps.sh (each shard reads its own step file), then
#   .venv/bin/python -m sampling.merge --what rollouts --num_shards 4 --n 5 --task_family "$TASK_FAMILY" --run_dir "$RUN_DIR"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage_lib.sh                # PRESET, PYTHON, TASK_FAMILY, RUN_DIR

KIND=${KIND:-}                             # expert | explore | both: which step records to roll out
MODEL=${MODEL:-}                           # the policy (HF folder or served model name); empty = the run's SFT model
N=${N:-}                                   # rollouts per step record (the paper: 5)
TEMPERATURE=${TEMPERATURE:-}
TOP_P=${TOP_P:-}
MC_SEED=${MC_SEED:-}                       # seeds the sampler
SPLIT=${SPLIT:-}                           # the split the step records were made on (train)
DATA_ROOT=${DATA_ROOT:-}
MAX_STEPS=${MAX_STEPS:-}                   # episode budget, the replayed prefix included (as the original)
NUM_SHARDS=${NUM_SHARDS:-}
SHARD_ID=${SHARD_ID:-}
CONCURRENCY=${CONCURRENCY:-}               # episodes in flight; a record's N rollouts are queued side by side
source scripts/model_vars.sh               # BACKEND ENDPOINTS CHAT_FORMAT ICL_NUM INSTRUCTION_FROM ICL_FROM MAX_NEW_TOKENS

args+=(--task_family "$TASK_FAMILY" --run_dir "$RUN_DIR")
opt --kind "$KIND"
opt --model "$MODEL"
opt --n "$N"
opt --temperature "$TEMPERATURE"
opt --top_p "$TOP_P"
opt --seed "$MC_SEED"
opt --split "$SPLIT"
opt --data_root "$DATA_ROOT"
opt --max_steps "$MAX_STEPS"
opt --num_shards "$NUM_SHARDS"
opt --shard_id "$SHARD_ID"
opt --concurrency "$CONCURRENCY"
exec "$PYTHON" -m sampling.mc_rollouts "${args[@]}" "$@"
