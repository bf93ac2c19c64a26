#!/usr/bin/env bash
# The whole STeCa pipeline for one or both task families: each stage script in order, each family in its own
# run directory RUN_ROOT/<family> (eval_agent/layout.py), then the results table in RUN_ROOT/report.
# First a pre-flight check (eval_agent/preflight.py) lists every problem it can see in seconds (data counts,
# models, batch vs processes, GPUs, endpoints, disk) and stops the run before any stage; PREFLIGHT=0 skips it.
# With BACKEND=vllm (or serve_hf on CPUs without vLLM) the pipeline starts the model server each stage
# prompts and stops it after the stage (scripts/serve_lib.sh): the SFT model for step records, MC rollouts
# and self-reflection, then the base, SFT and STeCa models in turn for evaluation; none runs while a model
# trains. A completed stage leaves a marker in RUN_DIR/pipeline/ with the fingerprints of its settings and
# inputs and the state of its outputs, and is skipped on a rerun with the same ones while its outputs are the ones
# it left; a changed setting (BASE_MODEL, N, ...) reruns the stages
# it affects, their old results moved aside; an interrupted stage is rerun and resumes (docs/reliability.md).
# Then the calibration-ability evaluation (Figure 4) of the CALIBRATION_LABELS models, and each VARIANT of the run
# (eval_agent/variants.py, docs/variants.md): its own stages in RUN_DIR/variants/<name>/, the stages it shares
# with the main run taken from it (checked to be what the variant would compute, never run again).
# Stage variables (docs/) pass through, and PRESET fills in the ones not set (scripts/presets.sh), e.g.
#   TASK_FAMILY=both PRESET=tiny bash scripts/run_pipeline.sh
#   TASK_FAMILY=alfworld PRESET=paper BASE_MODEL=meta-llama/Llama-2-7b-chat-hf CHAT_FORMAT=llama-2 \
#     BACKEND=vllm NPROC=8 RFT_BATCH=16 DIST_CONFIG=sft/configs/fsdp.yaml bash scripts/run_pipeline.sh
#   VARIANT=table6,delta_0.05 PRESET=tiny bash scripts/run_pipeline.sh    # the main run, then four variants
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/usage.sh "$@"                      # --help

PRESET=${PRESET:-tiny}                            # tiny | small | paper (scripts/presets.sh)
FAMILIES=${TASK_FAMILY:-${TASK:-alfworld}}        # alfworld | virtualhome | both (TASK: the older name)
RUN_ROOT=${RUN_ROOT:-outputs/pipeline-${PRESET}}  # one run directory per family below it, and the report
PYTHON=${PYTHON:-.venv/bin/python}
PREFLIGHT=${PREFLIGHT:-1}                         # 0: skip the pre-flight check
VARIANT=${VARIANT:-}                              # variants run after the main run: names or groups, comma-separated
EXPERT_SOURCE=${EXPERT_SOURCE:-${EXPERT_DATA:-${DATA:-}}}  # an expert file to train on (DATA: the older name):
                                                           # imported into each run (expert_data)
export PRESET PYTHON EXPERT_SOURCE
export STECA_ON_CHANGE=move_aside  # a stage moves results of other settings aside instead of refusing them
unset SPLIT LABEL POLICY MODEL OUT EXPERT_DATA DATA  # the pipeline sets these per stage; every stage reads the run's expert data

case "$FAMILIES" in
  both) families=(alfworld virtualhome) ;;
  alfworld|virtualhome) families=("$FAMILIES") ;;
  *) echo "error: TASK_FAMILY must be alfworld, virtualhome or both, got '$FAMILIES'" >&2; exit 2 ;;
esac
TASK_FAMILY=$FAMILIES
variants=$("$PYTHON" -m eval_agent.variants names "$VARIANT")  # checked before anything runs
source scripts/presets.sh
apply_preset "$PRESET"
CALIBRATION_EVAL=${CALIBRATION_EVAL:-1}  # 0: skip the calibration-ability evaluation (Figure 4; tiny: 0)
CALIBRATION_LABELS=${CALIBRATION_LABELS:-sft steca}  # the models it measures, each run's own (small: base too)
BASE_MODEL=${BASE_MODEL:-$("$PYTHON" -c 'from eval_agent.smollm2 import default_model_dir; print(default_model_dir())')}
export BASE_MODEL
source scripts/serve_lib.sh
trap 'stop_all' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$PREFLIGHT" != 0 ]; then
  VARIANT=$VARIANT "$PYTHON" -m eval_agent.preflight --task_family "$FAMILIES" --run_root "$RUN_ROOT"  # variants too
fi

layout() { "$PYTHON" -m eval_agent.layout "$@"; }

fingerprints() {  # the fingerprints of the run a stage command would do (eval_agent/guard.py): no work, no server
  if serving; then STECA_FINGERPRINT=1 BACKEND= "$@"; else STECA_FINGERPRINT=1 "$@"; fi
}

reads_any() {  # reads_any <script> <variable...>: 0 when the script or a file it sources declares one of them
  local script=$1 name files; shift
  files=("$script" $(sed -n 's/^source \(scripts\/[a-z_]*\.sh\).*/\1/p' "$script"))
  for name in "$@"; do
    grep -q "^$name=\${$name:-" "${files[@]}" && return 0
  done
  return 1
}

shared_stage() {  # shared_stage <name> <command...>: a variant's stage that is the main run's: it must have completed
                  # with what the variant would compute (a variant setting a variable of it is checked, else skipped)
  local name=$1 marker; shift
  marker=$(layout --run_dir "$RUN_DIR" marker "$name")
  if [ ! -f "$marker" ]; then
    echo "error: $RUN_NAME: stage $name is shared with the main run, which has not completed it ($marker)" >&2
    exit 2
  fi
  if [ "$1" = bash ] && ! reads_any "$2" "${VARIANT_VARS[@]}"; then
    echo "== $RUN_NAME: $name: shared with the main run"; return
  fi
  if ! "$PYTHON" -m eval_agent.guard marker-status "$marker" <<< "$(fingerprints "$@")"; then
    echo "error: $RUN_NAME: stage $name is shared with the main run, but the variant's variables (${VARIANT_VARS[*]}) change it: " \
         "make the variant diverge at $name or earlier (eval_agent/variants.py)" >&2
    exit 2
  fi
  echo "== $RUN_NAME: $name: shared with the main run (checked)"
}

stage() {  # stage <name> [--serve base|sft|steca] <command...>: run it unless its marker says it completed with
           # the settings and inputs it would run with now
  local name=$1 serve= marker fingerprint; shift
  if [ "$1" = --serve ]; then serve=$2; shift 2; fi
  if [ -n "$(layout --run_dir "$RUN_DIR" shared_with "$name")" ]; then
    shared_stage "$name" "$@"; return
  fi
  marker=$(layout --run_dir "$RUN_DIR" marker "$name")
  fingerprint=$(fingerprints "$@")
  if "$PYTHON" -m eval_agent.guard marker-status "$marker" <<< "$fingerprint"; then
    echo "== $RUN_NAME: $name: done, skipped"; return
  fi
  echo "== $RUN_NAME: $name ($(date +%H:%M:%S))"
  local t0=$SECONDS
  if declare -F "$1" > /dev/null; then "$@"; else with_server "$serve" "$@"; fi
  "$PYTHON" -m eval_agent.guard marker-write "$marker" --seconds $((SECONDS - t0)) <<< "$fingerprint"
}

evaluate_all() {  # the base, SFT and STeCa models on both test splits (success, step accuracy), one server per model;
                  # a variant evaluates only its own models (eval_agent/layout.py: eval_labels). Episodes and step
                  # accuracy run side by side: replaying environments overlaps decoding (in-process on a CPU, each
                  # with half the threads: ALFWorld, 2 cores, 0.67x the time of one after the other)
  local label threads
  threads=$(( ${OMP_NUM_THREADS:-$(nproc)} / 2 ))
  [ "$threads" -ge 1 ] || threads=1
  for label in $(layout --run_dir "$RUN_DIR" eval_labels); do
    start_server "$label"
    OMP_NUM_THREADS=$threads LABEL=$label SPLIT=seen,unseen launch bash eval/evaluate.sh  # both splits decode together
    OMP_NUM_THREADS=$threads LABEL=$label SPLIT=seen,unseen launch bash eval/step_accuracy.sh
    wait_launched
    stop_server
  done
}

evaluate_calibration() {  # the run's own models of CALIBRATION_LABELS from deviated histories (Figure 4), one server
                          # per model; a variant measures its own models on its main run's histories
  local label split
  for label in $(layout --run_dir "$RUN_DIR" eval_labels); do
    [[ " $CALIBRATION_LABELS " == *" $label "* ]] || continue
    start_server "$label"
    for split in seen unseen; do
      LABEL=$label SPLIT=$split served bash eval/calibration.sh
    done
    stop_server
  done
}

reflection_server() {  # the model data collection prompts: the SFT model, unless reflection is by a chat endpoint
                       # or nothing is asked (no D_c in TRAIN_SETS and no LLM step rewards)
  local backend=${REFLECT_BACKEND:-auto}
  if [ -n "${TRAIN_SETS:-}" ] && [[ ",$TRAIN_SETS," != *,calibration,* ]] && [ "${STEP_REWARD:-}" != llm ]; then return; fi
  if [ "$backend" = auto ] && [ -n "${REFLECT_API_KEY:-${OPENAI_API_KEY:-}}" ]; then backend=chat; fi
  [ "$backend" = chat ] || echo sft
}

run_stages() {  # every stage of the run in RUN_DIR; a variant's shared ones are the main run's (shared_stage)
  stage expert_data     bash sft/make_expert_data.sh
  stage sft             bash sft/sft.sh
  stage steps           --serve sft bash sampling/generate_steps.sh
  stage mc              --serve sft bash sampling/mc_rollouts.sh
  stage data_collection --serve "$(reflection_server)" bash data_collection/build_dataset.sh
  stage steca           bash Reinforced_train/steca_train.sh
  stage eval            evaluate_all
}

run_variant() {  # run_variant <name>: the variant's variables set for its stages only, in RUN_DIR/variants/<name>/
  local name=$1 main=$RUN_DIR line var i
  local -a saved=() was_set=()
  VARIANT_VARS=()
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    var=${line%%=*}
    VARIANT_VARS+=("$var") was_set+=("${!var+1}") saved+=("${!var-}")
    eval "export $line"  # NAME=value, quoted by the Python side
  done < <("$PYTHON" -m eval_agent.variants env "$name")
  RUN_DIR=$("$PYTHON" -m eval_agent.variants init --run_dir "$main" --name "$name")
  RUN_NAME=$TASK_FAMILY/$name
  export RUN_DIR
  run_stages
  [ "$CALIBRATION_EVAL" = 0 ] || stage calibration evaluate_calibration
  for i in "${!VARIANT_VARS[@]}"; do
    if [ -n "${was_set[$i]}" ]; then export "${VARIANT_VARS[$i]}=${saved[$i]}"; else unset "${VARIANT_VARS[$i]}"; fi
  done
  VARIANT_VARS=()
  RUN_DIR=$main RUN_NAME=$TASK_FAMILY
}

start=$SECONDS
report_args=()
VARIANT_VARS=()
for family in "${families[@]}"; do
  RUN_DIR=$(layout --run_root "$RUN_ROOT" --task_family "$family")
  RUN_NAME=$family
  export TASK_FAMILY=$family RUN_DIR RUN_NAME
  run_stages
  [ "$CALIBRATION_EVAL" = 0 ] || stage calibration evaluate_calibration
  for name in $variants; do
    run_variant "$name"
  done
  report_args+=(--run "$family=$RUN_DIR")
done
report=$(layout --run_root "$RUN_ROOT")
"$PYTHON" -m eval.report "${report_args[@]}" --out "$report" --reading
"$PYTHON" -m eval.stage_times "${report_args[@]}" --out "$report"
echo "pipeline ($PRESET, ${families[*]}${variants:+; variants: $(echo $variants)}) finished in $((SECONDS - start)) s: $report/report.md"
