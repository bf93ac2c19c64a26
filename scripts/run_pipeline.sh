#!/usr/bin/env bash
# The whole STeCa pipeline, stage by stage, for one or both environments:
#   expert data -> SFT -> step records -> Monte-Carlo rollouts -> data collection (step rewards, deviations,
#   reflections, D_c / D_e / D_s with nDTW weights) -> reinforced training -> evaluation of the base, SFT and
#   STeCa models on seen and unseen -> the results table (python -m eval.report).
# Everything of one environment lives in RUN_ROOT/<task>/ (the stage folders of DESIGN.md §5); the table in
# RUN_ROOT/report/. A completed stage leaves RUN_ROOT/<task>/pipeline/<stage>.done and is skipped on a rerun
# (delete the marker to redo it); an interrupted stage is rerun and resumes (every stage appends and skips
# what it has). Edit the values below or override them from the environment, e.g.
#   TASK=both PRESET=tiny bash scripts/run_pipeline.sh
#   TASK=alfworld PRESET=paper BASE_MODEL=meta-llama/Llama-2-7b-chat-hf CHAT_FORMAT=llama-2 \
#     BACKEND=openai ENDPOINTS=outputs/vllm/endpoints.txt NPROC=8 bash scripts/run_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TASK=${TASK:-alfworld}                    # alfworld | virtualhome | both
PRESET=${PRESET:-tiny}                    # tiny: SmolLM2-135M, small counts, a 2-core CPU | paper: the paper's values
RUN_ROOT=${RUN_ROOT:-outputs/pipeline-${PRESET}}
BASE_MODEL=${BASE_MODEL:-models/SmolLM2-135M-Instruct}
CHAT_FORMAT=${CHAT_FORMAT:-}              # template | llama-2; empty = the tokenizer's template (recorded by SFT)
BACKEND=${BACKEND:-hf}                    # sampling and evaluation: hf (in-process) | openai (vLLM servers)
ENDPOINTS=${ENDPOINTS:-}                  # openai backend: file with one base URL per line (scripts/serve_vllm.sh)
REFLECT_BACKEND=${REFLECT_BACKEND:-auto}  # auto: a chat endpoint when OPENAI_API_KEY is set, else the SFT model itself
NPROC=${NPROC:-1}                         # training processes (GPUs, or CPU processes over gloo)
DIST_CONFIG=${DIST_CONFIG:-}              # accelerate config for training, e.g. sft/configs/fsdp.yaml
PYTHON=${PYTHON:-.venv/bin/python}

# The presets: each value below applies only when it is not set already (an override always wins).
case "$PRESET" in
  tiny)    # minutes per stage on 2 CPU cores; the numbers measure that the pipeline runs, not the paper
    : "${SFT_LIMIT:=16}" "${SFT_EPOCHS:=2}" "${SFT_LR:=1e-4}" "${SFT_BATCH:=4}"
    : "${SAMPLE_LIMIT:=2}" "${N:=2}" "${MAX_STEPS:=12}" "${MAX_NEW_TOKENS:=40}" "${ICL_NUM:=1}"
    : "${RFT_LR:=1e-5}" "${RFT_BATCH:=4}" "${EVAL_LIMIT:=3}" ;;
  paper)   # the paper's values (Llama-2-7B-Chat on GPUs): every task, N=5, 40 steps, 512 new tokens
    : "${SFT_LIMIT:=}" "${SFT_EPOCHS:=3}" "${SFT_LR:=2e-5}" "${SFT_BATCH:=16}"
    : "${SAMPLE_LIMIT:=}" "${N:=5}" "${MAX_STEPS:=40}" "${MAX_NEW_TOKENS:=512}" "${ICL_NUM:=1}"
    : "${RFT_LR:=3e-6}" "${RFT_BATCH:=15}" "${EVAL_LIMIT:=}" ;;
  *) echo "error: PRESET must be tiny or paper, got '$PRESET'" >&2; exit 2 ;;
esac
: "${MICRO_BATCH:=1}" "${CONCURRENCY:=16}"

case "$TASK" in
  both) tasks=(alfworld virtualhome) ;;
  alfworld|virtualhome) tasks=("$TASK") ;;
  *) echo "error: TASK must be alfworld, virtualhome or both, got '$TASK'" >&2; exit 2 ;;
esac

stage() {  # stage <name> <command...>: run it unless its marker says it completed
  local marker="$RUN_DIR/pipeline/$1.done"; shift
  if [ -f "$marker" ]; then echo "== $task: $(basename "$marker" .done): done, skipped"; return; fi
  echo "== $task: $(basename "$marker" .done) ($(date +%H:%M:%S))"
  local t0=$SECONDS
  "$@"
  mkdir -p "$(dirname "$marker")"
  echo "$((SECONDS - t0)) s" > "$marker"
}

evaluate_all() {  # the base, SFT and STeCa models on both test splits, into RUN_DIR/eval/<label>/<split>
  local label model split
  for label in base sft steca; do
    case $label in base) model=$BASE_MODEL ;; sft) model=$RUN_DIR/sft/model ;; steca) model=$RUN_DIR/steca/model ;; esac
    for split in seen unseen; do
      TASK=$task SPLIT=$split POLICY=model MODEL=$model LIMIT=$EVAL_LIMIT OUT=$RUN_DIR/eval/$label/$split \
        bash eval/evaluate.sh
    done
  done
}

export BACKEND ENDPOINTS CHAT_FORMAT PYTHON MAX_STEPS MAX_NEW_TOKENS ICL_NUM CONCURRENCY NPROC DIST_CONFIG MICRO_BATCH
start=$SECONDS
report_args=()
for task in "${tasks[@]}"; do
  RUN_DIR=$RUN_ROOT/$task
  export TASK=$task RUN_DIR
  expert=$RUN_DIR/sft/expert_train.jsonl
  stage expert_data env LIMIT="$SFT_LIMIT" OUT="$expert" bash sft/make_expert_data.sh
  stage sft env MODEL="$BASE_MODEL" DATA="$expert" OUT="$RUN_DIR/sft/model" EPOCHS="$SFT_EPOCHS" LR="$SFT_LR" \
    BATCH="$SFT_BATCH" bash sft/sft.sh
  stage steps env MODEL="$RUN_DIR/sft/model" EXPERT_DATA="$expert" LIMIT="$SAMPLE_LIMIT" \
    bash sampling/generate_steps.sh --icl_num "$ICL_NUM"
  stage mc env MODEL="$RUN_DIR/sft/model" N="$N" bash sampling/mc_rollouts.sh --icl_num "$ICL_NUM"
  stage data_collection env MODEL="$RUN_DIR/sft/model" EXPERT_DATA="$expert" N="$N" \
    REFLECT_BACKEND="$REFLECT_BACKEND" bash data_collection/build_dataset.sh
  stage steca env MODEL="$RUN_DIR/sft/model" DATA="$RUN_DIR/data_collection/train.jsonl" OUT="$RUN_DIR/steca/model" \
    LR="$RFT_LR" BATCH="$RFT_BATCH" bash Reinforced_train/steca_train.sh
  stage eval evaluate_all
  report_args+=(--run "$task=$RUN_DIR")
done
"$PYTHON" -m eval.report "${report_args[@]}" --out "$RUN_ROOT/report"
echo "pipeline ($PRESET, ${tasks[*]}) finished in $((SECONDS - start)) s: $RUN_ROOT/report/report.md"
