#!/usr/bin/env bash
# The whole STeCa pipeline for one or both task families: each stage script in order, each family in its own
# run directory RUN_ROOT/<family> (eval_agent/layout.py), then the results table in RUN_ROOT/report.
# A completed stage leaves a marker in RUN_DIR/pipeline/ and is skipped on a rerun; an interrupted stage is
# rerun and resumes (every stage appends and skips what it has). Stage variables (docs/) pass through, and
# PRESET fills in the ones not set (scripts/presets.sh), e.g.
#   TASK_FAMILY=both PRESET=tiny bash scripts/run_pipeline.sh
#   TASK_FAMILY=alfworld PRESET=paper BASE_MODEL=meta-llama/Llama-2-7b-chat-hf CHAT_FORMAT=llama-2 \
#     BACKEND=openai ENDPOINTS=outputs/vllm/endpoints.txt NPROC=8 bash scripts/run_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PRESET=${PRESET:-tiny}                            # tiny | paper (scripts/presets.sh)
FAMILIES=${TASK_FAMILY:-${TASK:-alfworld}}        # alfworld | virtualhome | both (TASK: the older name)
RUN_ROOT=${RUN_ROOT:-outputs/pipeline-${PRESET}}  # one run directory per family below it, and the report
PYTHON=${PYTHON:-.venv/bin/python}
export PRESET PYTHON
unset SPLIT LABEL POLICY MODEL OUT  # the pipeline sets these per stage

case "$FAMILIES" in
  both) families=(alfworld virtualhome) ;;
  alfworld|virtualhome) families=("$FAMILIES") ;;
  *) echo "error: TASK_FAMILY must be alfworld, virtualhome or both, got '$FAMILIES'" >&2; exit 2 ;;
esac
source scripts/presets.sh
apply_preset "$PRESET"

layout() { "$PYTHON" -m eval_agent.layout "$@"; }

stage() {  # stage <name> <command...>: run it unless its marker says it completed
  local name=$1 marker; shift
  marker=$(layout --run_dir "$RUN_DIR" marker "$name")
  if [ -f "$marker" ]; then echo "== $TASK_FAMILY: $name: done, skipped"; return; fi
  echo "== $TASK_FAMILY: $name ($(date +%H:%M:%S))"
  local t0=$SECONDS
  "$@"
  mkdir -p "$(dirname "$marker")"
  echo "$((SECONDS - t0)) s" > "$marker"
}

evaluate_all() {  # the base, SFT and STeCa models on both test splits
  local label split
  for label in base sft steca; do
    for split in seen unseen; do
      LABEL=$label SPLIT=$split bash eval/evaluate.sh
    done
  done
}

start=$SECONDS
report_args=()
for family in "${families[@]}"; do
  RUN_DIR=$(layout --run_root "$RUN_ROOT" --task_family "$family")
  export TASK_FAMILY=$family RUN_DIR
  stage expert_data     bash sft/make_expert_data.sh
  stage sft             bash sft/sft.sh
  stage steps           bash sampling/generate_steps.sh
  stage mc              bash sampling/mc_rollouts.sh
  stage data_collection bash data_collection/build_dataset.sh
  stage steca           bash Reinforced_train/steca_train.sh
  stage eval            evaluate_all
  report_args+=(--run "$family=$RUN_DIR")
done
report=$(layout --run_root "$RUN_ROOT")
"$PYTHON" -m eval.report "${report_args[@]}" --out "$report"
echo "pipeline ($PRESET, ${families[*]}) finished in $((SECONDS - start)) s: $report/report.md"
