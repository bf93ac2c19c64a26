#!/usr/bin/env bash
# Step accuracy (docs/metrics.md): on the expert trajectories of a test split, the model's greedy step after
# the expert's prefix against the expert's step, and whether the environment accepts it. Writes
# RUN_DIR/eval/<LABEL>/<SPLIT>/step_accuracy/ (summary.json, steps.jsonl, expert.jsonl, config.json).
# Every value below is empty by default, and empty means the default of `python -m eval.step_accuracy`
# (see its --help). Set one in place or from the environment, e.g.
#   TASK_FAMILY=alfworld RUN_DIR=outputs/alfworld LABEL=sft SPLIT=unseen LIMIT=3 STEPS_PER_TASK=4 bash eval/step_accuracy.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TASK_FAMILY=${TASK_FAMILY:-${TASK:-}}  # alfworld | virtualhome (TASK is still read)
RUN_DIR=${RUN_DIR:-}                  # the run directory; with LABEL it names the output folder
LABEL=${LABEL:-}                      # base | sft | steca | any name for the model
MODEL=${MODEL:-}                      # HF folder or served name; empty with LABEL sft or steca: that model of RUN_DIR
SPLIT=${SPLIT:-}                      # seen | unseen
LIMIT=${LIMIT:-}                      # first N tasks of the split
STEPS_PER_TASK=${STEPS_PER_TASK:-}    # N steps of each expert trajectory, evenly spaced from first to last
BACKEND=${BACKEND:-}                  # hf (in-process transformers) | openai (vLLM or any compatible server)
ENDPOINTS=${ENDPOINTS:-}              # openai backend: file with one base URL per line
CHAT_FORMAT=${CHAT_FORMAT:-}          # template | llama-2
ICL_NUM=${ICL_NUM:-}                  # in-context examples in the prompt: 0 | 1
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-}    # tokens the model may write for its one step
MAX_STEPS=${MAX_STEPS:-}              # the expert's episode budget
CONCURRENCY=${CONCURRENCY:-}          # episodes advanced together
DATA_ROOT=${DATA_ROOT:-}              # task data folder
ENV_ARGS=${ENV_ARGS:-}                # JSON object of environment options
OUT=${OUT:-}                          # output folder instead of RUN_DIR's
OVERWRITE=${OVERWRITE:-}              # 1: move the old results aside and start fresh
PYTHON=${PYTHON:-.venv/bin/python}

if [ -z "$MODEL" ] && [ -n "$RUN_DIR" ] && { [ "$LABEL" = sft ] || [ "$LABEL" = steca ]; }; then
  MODEL=$("$PYTHON" -m eval_agent.layout "$RUN_DIR" "${LABEL}_model")
fi

args=()
flag() {  # flag --name VALUE: passed only when VALUE is set
  if [ -n "$2" ]; then args+=("$1" "$2"); fi
}
flag --task_family "$TASK_FAMILY"
flag --run_dir "$RUN_DIR"
flag --label "$LABEL"
flag --model "$MODEL"
flag --split "$SPLIT"
flag --limit "$LIMIT"
flag --steps_per_task "$STEPS_PER_TASK"
flag --backend "$BACKEND"
flag --endpoints "$ENDPOINTS"
flag --chat_format "$CHAT_FORMAT"
flag --icl_num "$ICL_NUM"
flag --max_new_tokens "$MAX_NEW_TOKENS"
flag --max_steps "$MAX_STEPS"
flag --concurrency "$CONCURRENCY"
flag --data_root "$DATA_ROOT"
flag --env_args "$ENV_ARGS"
flag --out "$OUT"
if [ "$OVERWRITE" = 1 ]; then args+=(--overwrite); fi

"$PYTHON" -m eval.step_accuracy "${args[@]}" "$@"
