#!/usr/bin/env bash
# The whole STeCa pipeline for one or both task families: each stage script in order, each family in its own
# run directory RUN_ROOT/<family> (eval_agent/layout.py), then the results table in RUN_ROOT/report.
# First a pre-flight check (eval_agent/preflight.py) lists every problem it can see in seconds (data counts,
# models, batch vs processes, GPUs, endpoints, disk) and stops the run before any stage; PREFLIGHT=0 skips it.
# With BACKEND=vllm (or serve_hf on CPUs without vLLM) the pipeline starts the model server each stage
# prompts and stops it after the stage (scripts/serve_lib.sh): the SFT model for step records, MC rollouts
# and self-reflection, then the base, SFT and STeCa models in turn for evaluation; none runs while a model
# trains. A completed stage leaves a marker in RUN_DIR/pipeline/ with the fingerprints of its settings and
# inputs, and is skipped on a rerun with the same ones; a changed setting (BASE_MODEL, N, ...) reruns the stages
# it affects, their old results moved aside; an interrupted stage is rerun and resumes (docs/reliability.md).
# Stage variables (docs/) pass through, and PRESET fills in the ones not set (scripts/presets.sh), e.g.
#   TASK_FAMILY=both PRESET=tiny bash scripts/run_pipeline.sh
#   TASK_FAMILY=alfworld PRESET=paper BASE_MODEL=meta-llama/Llama-2-7b-chat-hf CHAT_FORMAT=llama-2 \
#     BACKEND=vllm NPROC=8 RFT_BATCH=16 DIST_CONFIG=sft/configs/fsdp.yaml bash scripts/run_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PRESET=${PRESET:-tiny}                            # tiny | paper (scripts/presets.sh)
FAMILIES=${TASK_FAMILY:-${TASK:-alfworld}}        # alfworld | virtualhome | both (TASK: the older name)
RUN_ROOT=${RUN_ROOT:-outputs/pipeline-${PRESET}}  # one run directory per family below it, and the report
PYTHON=${PYTHON:-.venv/bin/python}
PREFLIGHT=${PREFLIGHT:-1}                         # 0: skip the pre-flight check
EXPERT_SOURCE=${EXPERT_SOURCE:-${EXPERT_DATA:-}}  # an expert file to train on: imported into each run (expert_data)
export PRESET PYTHON EXPERT_SOURCE
export STECA_ON_CHANGE=move_aside  # a stage moves results of other settings aside instead of refusing them
unset SPLIT LABEL POLICY MODEL OUT EXPERT_DATA  # the pipeline sets these per stage; every stage reads the run's expert data

case "$FAMILIES" in
  both) families=(alfworld virtualhome) ;;
  alfworld|virtualhome) families=("$FAMILIES") ;;
  *) echo "error: TASK_FAMILY must be alfworld, virtualhome or both, got '$FAMILIES'" >&2; exit 2 ;;
esac
TASK_FAMILY=$FAMILIES
source scripts/presets.sh
apply_preset "$PRESET"
BASE_MODEL=${BASE_MODEL:-$("$PYTHON" -c 'from eval_agent.smollm2 import default_model_dir; print(default_model_dir())')}
export BASE_MODEL
source scripts/serve_lib.sh
trap 'stop_all' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$PREFLIGHT" != 0 ]; then
  "$PYTHON" -m eval_agent.preflight --task_family "$FAMILIES" --run_root "$RUN_ROOT"
fi

layout() { "$PYTHON" -m eval_agent.layout "$@"; }

fingerprints() {  # the fingerprints of the run a stage command would do (eval_agent/guard.py): no work, no server
  if serving; then STECA_FINGERPRINT=1 BACKEND= "$@"; else STECA_FINGERPRINT=1 "$@"; fi
}

stage() {  # stage <name> [--serve base|sft|steca] <command...>: run it unless its marker says it completed with
           # the settings and inputs it would run with now
  local name=$1 serve= marker fingerprint; shift
  if [ "$1" = --serve ]; then serve=$2; shift 2; fi
  marker=$(layout --run_dir "$RUN_DIR" marker "$name")
  fingerprint=$(fingerprints "$@")
  if "$PYTHON" -m eval_agent.guard marker-status "$marker" <<< "$fingerprint"; then
    echo "== $TASK_FAMILY: $name: done, skipped"; return
  fi
  echo "== $TASK_FAMILY: $name ($(date +%H:%M:%S))"
  local t0=$SECONDS
  if declare -F "$1" > /dev/null; then "$@"; else with_server "$serve" "$@"; fi
  "$PYTHON" -m eval_agent.guard marker-write "$marker" --seconds $((SECONDS - t0)) <<< "$fingerprint"
}

evaluate_all() {  # the base, SFT and STeCa models on both test splits (success, step accuracy), one server per model
  local label split
  for label in base sft steca; do
    start_server "$label"
    for split in seen unseen; do
      LABEL=$label SPLIT=$split served bash eval/evaluate.sh
      LABEL=$label SPLIT=$split served bash eval/step_accuracy.sh
    done
    stop_server
  done
}

reflection_server() {  # the model data collection prompts: the SFT model, unless reflection is by a chat endpoint
  local backend=${REFLECT_BACKEND:-auto}
  if [ "$backend" = auto ] && [ -n "${REFLECT_API_KEY:-${OPENAI_API_KEY:-}}" ]; then backend=chat; fi
  [ "$backend" = chat ] || echo sft
}

start=$SECONDS
report_args=()
for family in "${families[@]}"; do
  RUN_DIR=$(layout --run_root "$RUN_ROOT" --task_family "$family")
  export TASK_FAMILY=$family RUN_DIR
  stage expert_data     bash sft/make_expert_data.sh
  stage sft             bash sft/sft.sh
  stage steps           --serve sft bash sampling/generate_steps.sh
  stage mc              --serve sft bash sampling/mc_rollouts.sh
  stage data_collection --serve "$(reflection_server)" bash data_collection/build_dataset.sh
  stage steca           bash Reinforced_train/steca_train.sh
  stage eval            evaluate_all
  report_args+=(--run "$family=$RUN_DIR")
done
report=$(layout --run_root "$RUN_ROOT")
"$PYTHON" -m eval.report "${report_args[@]}" --out "$report" --reading
"$PYTHON" -m eval.stage_times "${report_args[@]}" --out "$report"
echo "pipeline ($PRESET, ${families[*]}) finished in $((SECONDS - start)) s: $report/report.md"
