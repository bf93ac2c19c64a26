#!/usr/bin/env bash
# Stage 5: evaluate a model (or the built-in expert) on a split, into RUN_DIR/eval/<LABEL>/<SPLIT>/
# (eval_agent/layout.py). LABEL names the model: base (the base model), sft and steca (the run's models),
# or any name with MODEL. docs/eval.md lists every variable with its default, e.g.
#   TASK_FAMILY=alfworld SPLIT=unseen LABEL=sft bash eval/evaluate.sh
#   TASK_FAMILY=alfworld SPLIT=unseen POLICY=expert bash eval/evaluate.sh
#   TASK_FAMILY=alfworld SPLIT=seen,unseen LABEL=sft bash eval/evaluate.sh   # both splits decoded together
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage_lib.sh                # PRESET, PYTHON, TASK_FAMILY, RUN_DIR

POLICY=${POLICY:-}                         # model | expert (the built-in expert: the sanity baseline)
source scripts/label_vars.sh               # LABEL MODEL BASE_MODEL
EVAL_LIMIT=${EVAL_LIMIT:-${LIMIT:-}}       # first N tasks only; empty = the whole split (LIMIT: the older name)
OUT=${OUT:-}                               # the output folder; empty = RUN_DIR/eval/<LABEL>/<SPLIT>
source scripts/episode_vars.sh             # SPLIT DATA_ROOT MAX_STEPS CONCURRENCY
EVAL_MAX_STEPS=${EVAL_MAX_STEPS:-}         # the evaluation's episode budget; empty = MAX_STEPS (tiny: 6)
EVAL_ENV_ARGS=${EVAL_ENV_ARGS:-}           # the evaluation's environment options; empty = ENV_ARGS (paper: task_text original)
source scripts/model_vars.sh               # BACKEND ENDPOINTS CHAT_FORMAT ICL_NUM INSTRUCTION_FROM ICL_FROM MAX_NEW_TOKENS

args+=(--task_family "$TASK_FAMILY" --run_dir "$RUN_DIR")
opt --policy "$POLICY"
opt --limit "$EVAL_LIMIT"
opt --max_steps "$EVAL_MAX_STEPS"          # after MAX_STEPS's flag: the last one counts
opt --env_args "$EVAL_ENV_ARGS"            # after ENV_ARGS's flag
opt --out "$OUT"
exec "$PYTHON" -m eval.evaluate "${args[@]}" "$@"
