#!/usr/bin/env bash
# Stage 2b: N Monte-Carlo rollouts (temperature 1) after every step record data collection judges (explored steps
# t >= MIN_STEP, expert steps t >= MIN_STEP - 1); the step reward is their mean success. Run
# sampling/generate_steps.sh first. Writes RUN_DIR/sampling/mc/ (eval_agent/layout.py).
# docs/sampling.md lists every variable with its default, e.g.
#   TASK_FAMILY=virtualhome N=5 BACKEND=openai ENDPOINTS=endpoints.txt bash sampling/mc_rollouts.sh
# Several machines: NUM_SHARDS/SHARD_ID as for generate_steps.sh (each shard reads its own step file), then
#   .venv/bin/python -m sampling.merge --what rollouts --num_shards 4 --n 5 --task_family "$TASK_FAMILY" --run_dir "$RUN_DIR"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage_lib.sh                # PRESET, PYTHON, TASK_FAMILY, RUN_DIR

N=${N:-}                                   # rollouts per step record (the paper: 5)
TEMPERATURE=${TEMPERATURE:-}
TOP_P=${TOP_P:-}
MC_SEED=${MC_SEED:-}                       # seeds the sampler
MIN_STEP=${MIN_STEP:-}                     # roll out the steps data collection judges at its MIN_STEP (0: all)
source sampling/sampling_vars.sh           # KIND MODEL NUM_SHARDS SHARD_ID
source scripts/episode_vars.sh             # SPLIT DATA_ROOT MAX_STEPS CONCURRENCY
source scripts/model_vars.sh               # BACKEND ENDPOINTS CHAT_FORMAT ICL_NUM INSTRUCTION_FROM ICL_FROM MAX_NEW_TOKENS

args+=(--task_family "$TASK_FAMILY" --run_dir "$RUN_DIR")
opt --n "$N"
opt --temperature "$TEMPERATURE"
opt --top_p "$TOP_P"
opt --seed "$MC_SEED"
opt --min_step "$MIN_STEP"
exec "$PYTHON" -m sampling.mc_rollouts "${args[@]}" "$@"
