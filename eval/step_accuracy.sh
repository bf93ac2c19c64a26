#!/usr/bin/env bash
# Step accuracy (docs/metrics.md): on the expert trajectories of a test split, the model's greedy step after the
# expert's prefix against the expert's step, and whether the environment accepts it; into
# RUN_DIR/eval/<LABEL>/<SPLIT>/step_accuracy/ (eval_agent/layout.py). LABEL names the model as in evaluation:
# base, sft, steca, or any name with MODEL. docs/eval.md lists every variable with its default, e.g.
#   TASK_FAMILY=alfworld SPLIT=unseen LABEL=sft EVAL_LIMIT=3 STEPS_PER_TASK=4 bash eval/step_accuracy.sh
#   TASK_FAMILY=alfworld SPLIT=seen,unseen LABEL=sft bash eval/step_accuracy.sh   # both splits asked together
# MAX_STEPS is not read: the model takes one step, and the expert plays each task to its end (--expert_max_steps).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage_lib.sh                # PRESET, PYTHON, TASK_FAMILY, RUN_DIR

source scripts/label_vars.sh               # LABEL MODEL BASE_MODEL
SPLIT=${SPLIT:-}                           # seen | unseen | seen,unseen (one process, each into its own folder)
EVAL_LIMIT=${EVAL_LIMIT:-}                 # first N tasks only; empty = the whole split
STEPS_PER_TASK=${STEPS_PER_TASK:-}         # N steps of each expert trajectory, evenly spaced; empty = all
DATA_ROOT=${DATA_ROOT:-}                   # task data folder
CONCURRENCY=${CONCURRENCY:-}               # episodes in flight
ENV_ARGS=${ENV_ARGS:-}                     # JSON object of environment options (docs/pipeline.md)
EVAL_ENV_ARGS=${EVAL_ENV_ARGS:-}           # the evaluation's; empty = ENV_ARGS
OUT=${OUT:-}                               # the output folder; empty = RUN_DIR/eval/<LABEL>/<SPLIT>/step_accuracy
source scripts/model_vars.sh               # BACKEND ENDPOINTS CHAT_FORMAT ICL_NUM INSTRUCTION_FROM MAX_NEW_TOKENS

args+=(--task_family "$TASK_FAMILY" --run_dir "$RUN_DIR")
opt --split "$SPLIT"
opt --limit "$EVAL_LIMIT"
opt --steps_per_task "$STEPS_PER_TASK"
opt --data_root "$DATA_ROOT"
opt --concurrency "$CONCURRENCY"
opt --env_args "$ENV_ARGS"
opt --env_args "$EVAL_ENV_ARGS"            # the last one counts
opt --out "$OUT"
exec "$PYTHON" -m eval.step_accuracy "${args[@]}" "$@"
