#!/usr/bin/env bash
# The GPU path end to end, small, in one folder: a randomly initialised Llama-architecture model (~0.5B on a
# GPU) built on the spot with the SmolLM2 tokenizer; SFT in the llama-2 chat format under FSDP and under
# DeepSpeed ZeRO-3 (one process each), resumed, reloaded and generated from; step records, Monte-Carlo rollouts
# and evaluation (VirtualHome) with the in-process backend on the GPU and over HTTP through serve_hf; reinforced
# training with beta = 0 and beta > 0 (the frozen reference under FSDP); vLLM serving the SFT model for a
# sampling stage and an evaluation when vLLM is importable. Prints each training stage's peak GPU memory, tokens/s
# and model FLOPs utilisation and each sampling run's generation tokens/s; everything lands in SMOKE_DIR (never in
# OUT, a GPU lender's variable for the few files it sends back), and the compact figures.json also goes to FIGURES
# when set. The model is the largest default size whose files fit the free disk. The last line starts with
# `gpu_smoke: ok`.
#
#   bash scripts/gpu_smoke.sh                  # on a GPU (~3-6 min on one H100 for the 0.5B model)
#   bash scripts/gpu_smoke.sh --cpu            # the same with tiny sizes on a CPU (CI; FSDP skipped: GPU only)
#   bash scripts/gpu_smoke.sh --bundle DIR     # a GPU box with only torch, transformers and accelerate: install
#                                              # the wheels and files of scripts/gpu_bundle.sh first (no network)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

source scripts/python_envs.sh     # the environments: VENV, VLLM_VENV (vllm_python)
SMOKE_DIR=${SMOKE_DIR:-}          # the work folder; empty = outputs/gpu_smoke/<UTC time> (a fresh folder per run)
FIGURES=${FIGURES:-}              # also write the compact figures.json here (e.g. $OUT/gpu_smoke.json); empty = no
PYTHON=${PYTHON:-}                # empty = $VENV/bin/python, else python3
TOKENIZER=${TOKENIZER:-}          # the SmolLM2 tokenizer folder; empty = models/SmolLM2-135M-Instruct (or the bundle's)
VH_DATA=${VH_DATA:-}              # VirtualHome task sets; empty = data/virtualhome (or the bundle's)
SIZE=${SIZE:-}                    # tiny | 0.5b | 1b | 3b | 7b; empty = 0.5b on a GPU when its files fit the free disk
                                  # (else tiny), tiny with --cpu
VLLM=${VLLM:-auto}                # auto: serve with vLLM when VLLM_PY imports it (GPU only) | 1: required | 0: skip
VLLM_PY=${VLLM_PY:-}              # empty = $VLLM_VENV/bin/python, else the smoke's python
PEAK_TFLOPS=${PEAK_TFLOPS:-}      # bf16 peak of one GPU for the MFU; empty = by the GPU's name (H100/H200: 989)

DEVICE=cuda
BUNDLE=
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) DEVICE=cpu; shift ;;
    --bundle) BUNDLE=${2:?--bundle needs a folder}; shift 2 ;;
    *) echo "usage: bash scripts/gpu_smoke.sh [--cpu] [--bundle DIR]" >&2; exit 2 ;;
  esac
done
if [ -z "$PYTHON" ]; then
  if [ -x "$VENV/bin/python" ]; then PYTHON=$VENV/bin/python; else PYTHON=python3; fi
fi
WORK=${SMOKE_DIR:-outputs/gpu_smoke/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$WORK/logs"
WORK=$(cd "$WORK" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -n "$BUNDLE" ]; then  # wheels into WORK/site, ahead of the machine's own packages
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$BUNDLE"/wheels/*.whl \
    > "$WORK/logs/bundle.log" 2>&1 || { echo "gpu_smoke: FAILED installing $BUNDLE/wheels (see $WORK/logs/bundle.log)"; exit 1; }
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
  TOKENIZER=${TOKENIZER:-$BUNDLE/tokenizer}
  VH_DATA=${VH_DATA:-$BUNDLE/virtualhome}
fi
TOKENIZER=${TOKENIZER:-models/SmolLM2-135M-Instruct}
export VH_DATA=${VH_DATA:-$ROOT/data/virtualhome}

# sizes: the CPU ones keep the CI run short, the GPU ones give the kernels some work
if [ "$DEVICE" = cpu ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  SIZE=${SIZE:-tiny}; ROWS=2; MAX_LEN=512; BATCH=1; MICRO=1; LIMIT=1; MAX_STEPS=4; NEW_TOKENS=8; N=2; EVAL_LIMIT=1
  HTTP_STEPS=4; HTTP_TOKENS=8
  SAVED_DTYPE=float32; PRECISION=fp32
else
  ROWS=8; MAX_LEN=2048; BATCH=4; MICRO=2; LIMIT=2; MAX_STEPS=10; NEW_TOKENS=32; N=2; EVAL_LIMIT=4
  HTTP_STEPS=4; HTTP_TOKENS=16  # serve_hf answers one request at a time: the HTTP path, not throughput
  SAVED_DTYPE=bfloat16; PRECISION=auto
fi
PY=$PYTHON
start=$SECONDS
CURRENT=setup
SERVER_PID=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2> /dev/null; then
    kill -TERM "$SERVER_PID" 2> /dev/null || true
    wait "$SERVER_PID" 2> /dev/null || true
  fi
  if [ "$rc" != 0 ]; then
    echo "gpu_smoke: FAILED at $CURRENT after $((SECONDS - start)) s (logs: $WORK/logs/$CURRENT.log)"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() {  # step NAME COMMAND...: run it with its output in WORK/logs/NAME.log, one line on the terminal
  CURRENT=$1; shift
  local t0=$SECONDS
  if ! "$@" > "$WORK/logs/$CURRENT.log" 2>&1; then
    tail -n 25 "$WORK/logs/$CURRENT.log"
    return 1
  fi
  echo "[gpu_smoke] $CURRENT ok ($((SECONDS - t0)) s)"
}

SKIPPED=()
skip() { SKIPPED+=("$1"); echo "[gpu_smoke] skipped: $1"; }

# --- the machine ---------------------------------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import sys; from eval_agent.training import cuda_problem; p = cuda_problem(); p and print(p); sys.exit(bool(p))" \
    > "$WORK/logs/cuda.log" 2>&1 || {
    echo "gpu_smoke: no usable GPU for $PY: $(tail -n 1 "$WORK/logs/cuda.log"); run with --cpu on a CPU" >&2; exit 1; }
  "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'[gpu_smoke] {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__} (CUDA {torch.version.cuda})')"
fi
HAVE_DS=0
"$PY" -c "import deepspeed" > /dev/null 2>&1 && HAVE_DS=1
FSDP=1
[ "$DEVICE" = cpu ] && FSDP=0 && skip "FSDP: accelerate applies FSDP on GPUs only (SFT and beta > 0 run as one plain process)"
[ "$HAVE_DS" = 1 ] || skip "ZeRO-3: deepspeed is not installed for $PY (bash scripts/setup.sh --gpu, or the bundle)"

source scripts/stage_lib.sh     # opt, which train_launch.sh uses (the `args` they build are not used here)
source scripts/train_launch.sh  # launch_training MODULE ARGS...: reads PYTHON, NPROC, DIST_CONFIG
NPROC=1
launcher() {  # the DIST_CONFIG of a launcher name
  case "$1" in fsdp) echo sft/configs/fsdp.yaml ;; zero3) echo sft/configs/ds_zero3.yaml ;; *) echo "" ;; esac
}
train() {  # train LAUNCHER MODULE ARGS...: in a subshell, since launch_training ends in exec
  local name=$1; shift
  (DIST_CONFIG=$(launcher "$name") launch_training "$@")
}
common_train=(--per_device_train_batch_size "$MICRO" --model_max_length "$MAX_LEN" --precision "$PRECISION"
              --logging_steps 1 --save_strategy epoch --save_total_limit 1 --seed 0)
sample=(--task_family virtualhome --split train --max_steps "$MAX_STEPS" --max_new_tokens "$NEW_TOKENS" --concurrency 8)
PLAN_TRAINING=()
planned() { PLAN_TRAINING+=("$1"); }
path() { "$PY" -m eval_agent.layout --run_dir "$@"; }  # a path of a run directory (eval_agent/layout.py)

# --- the model and the data: run/ is the main run directory, the others hold one variant each ------
# the model size: what every stage below writes must fit the work folder's free disk (eval_agent/disk.py)
CURRENT=size
SIZE=$("$PY" scripts/gpu_smoke.py size --tokenizer "$TOKENIZER" --work "$WORK" --device "$DEVICE" \
       --zero3 "$HAVE_DS" ${SIZE:+--size "$SIZE"}) || exit 1
BASE=$WORK/base
step model "$PY" scripts/gpu_smoke.py model --tokenizer "$TOKENIZER" --size "$SIZE" --out "$BASE"
RUN=$WORK/run
step expert_data "$PY" -m sft.make_expert_data --task_family virtualhome --run_dir "$RUN" --limit "$ROWS"
EXPERT=$(path "$RUN" expert_data train)
SFT=$(path "$RUN" sft_model)

# --- SFT: FSDP (GPU) or one process (CPU), resumed; ZeRO-3 (the check reloads and generates from both) ---
SFT_LAUNCHER=single; [ "$FSDP" = 1 ] && SFT_LAUNCHER=fsdp
sft_args=(--task_family virtualhome --model_name_or_path "$BASE" --chat_format llama-2 --learning_rate 1e-4
          --global_batch_size "$BATCH" "${common_train[@]}")
step sft_$SFT_LAUNCHER train "$SFT_LAUNCHER" sft.train "${sft_args[@]}" --run_dir "$RUN" --num_train_epochs 2 \
  --save_total_limit 2 --keep_checkpoints
# as if killed during its second epoch: its last checkpoint and summary set aside, the rerun resumes from the first
# (and, finished, drops its checkpoints)
mkdir -p "$WORK/set_aside"
mv "$(ls -d "$SFT"/checkpoint-* | sort -t- -k2 -n | tail -n 1)" "$SFT/train_summary.json" "$WORK/set_aside/"
step sft_resume train "$SFT_LAUNCHER" sft.train "${sft_args[@]}" --run_dir "$RUN" --num_train_epochs 2 \
  --save_total_limit 2
planned "{\"name\": \"sft_$SFT_LAUNCHER+resume\", \"launcher\": \"$SFT_LAUNCHER\", \"run\": \"run\", \"model\": \"sft_model\", \"resumed\": true, \"generate\": true}"
if [ "$HAVE_DS" = 1 ]; then
  step sft_zero3 train zero3 sft.train "${sft_args[@]}" --run_dir "$WORK/zero3" --data "$EXPERT" --num_train_epochs 1
  planned '{"name": "sft_zero3", "launcher": "zero3", "run": "zero3", "model": "sft_model", "generate": true}'
fi

# --- sampling and evaluation, in process ---------------------------------------------------------
step steps_hf "$PY" -m sampling.generate_steps "${sample[@]}" --kind both --limit "$LIMIT" --run_dir "$RUN"
step mc_hf "$PY" -m sampling.mc_rollouts "${sample[@]}" --kind explore --n "$N" --run_dir "$RUN"

# --- reinforced training: beta = 0 (ZeRO-3 when there), beta > 0 with the frozen reference (FSDP on GPUs) -----
step rows "$PY" scripts/gpu_smoke.py rows --run_dir "$RUN"
RFT_LAUNCHER=single; [ "$HAVE_DS" = 1 ] && RFT_LAUNCHER=zero3
rft_args=(--learning_rate 3e-6 --global_batch_size "$MICRO" --num_train_epochs 1 "${common_train[@]}")
step steca_beta0 train "$RFT_LAUNCHER" Reinforced_train.train "${rft_args[@]}" --beta 0 --run_dir "$RUN"
planned "{\"name\": \"steca_beta0\", \"launcher\": \"$RFT_LAUNCHER\", \"run\": \"run\", \"model\": \"steca_model\"}"
step steca_beta0.1 train "$SFT_LAUNCHER" Reinforced_train.train "${rft_args[@]}" --beta 0.1 --run_dir "$WORK/beta" \
  --model_name_or_path "$SFT" --data "$(path "$RUN" train_set)"
planned "{\"name\": \"steca_beta0.1\", \"launcher\": \"$SFT_LAUNCHER\", \"run\": \"beta\", \"model\": \"steca_model\", \"beta\": 0.1}"
step eval_hf "$PY" -m eval.evaluate --task_family virtualhome --split seen --limit "$EVAL_LIMIT" --max_steps "$MAX_STEPS" \
  --max_new_tokens "$NEW_TOKENS" --run_dir "$RUN" --label steca

# --- the same stages over HTTP through serve_hf --------------------------------------------------
HTTP=$WORK/http
mkdir -p "$HTTP"
CURRENT=serve_hf
"$PY" -m eval_agent.llm.serve_hf --model "$SFT" --port 0 > "$HTTP/serve_hf.out" 2> "$WORK/logs/serve_hf.log" &
SERVER_PID=$!
"$PY" scripts/gpu_smoke.py wait-url "$HTTP/serve_hf.out" --pid "$SERVER_PID" > "$HTTP/endpoints.txt"
echo "[gpu_smoke] serve_hf up at $(cat "$HTTP/endpoints.txt")"
http=(--backend openai --endpoints "$HTTP/endpoints.txt" --model "$SFT" --max_steps "$HTTP_STEPS"
      --max_new_tokens "$HTTP_TOKENS")
step steps_http "$PY" -m sampling.generate_steps "${sample[@]}" --kind both --expert_data "$EXPERT" --limit 1 \
  --run_dir "$HTTP" "${http[@]}"
step mc_http "$PY" -m sampling.mc_rollouts "${sample[@]}" --kind explore --n "$N" --run_dir "$HTTP" "${http[@]}"
step eval_http "$PY" -m eval.evaluate --task_family virtualhome --split seen --limit "$EVAL_LIMIT" --run_dir "$HTTP" \
  --label sft "${http[@]}"
kill -TERM "$SERVER_PID" && wait "$SERVER_PID" || true
SERVER_PID=

# --- vLLM ----------------------------------------------------------------------------------------
SAMPLING_RUNS=('{"name": "hf", "run": "run", "mc": true, "eval": "steca"}'
               '{"name": "http", "run": "http", "mc": true, "eval": "sft"}')
if [ -z "$VLLM_PY" ]; then
  VLLM_PY=$(vllm_python gpu)
  [ -x "$VLLM_PY" ] || VLLM_PY=$PY
fi
if [ "$VLLM" = 0 ]; then
  skip "vLLM: VLLM=0"
elif [ "$DEVICE" = cpu ] && [ "$VLLM" = auto ]; then
  skip "vLLM: not on --cpu (tests/test_vllm.py covers vLLM on CPUs; VLLM=1 to include it)"
elif ! "$VLLM_PY" -c "import vllm" > /dev/null 2>&1; then
  [ "$VLLM" = 1 ] && { echo "gpu_smoke: VLLM=1 but $VLLM_PY cannot import vllm" >&2; exit 1; }
  skip "vLLM: $VLLM_PY cannot import vllm (bash scripts/setup.sh --gpu installs $VLLM_VENV)"
else
  vllm_http=(--backend openai --endpoints "$WORK/vllm/endpoints.txt" --model "$SFT")
  steps=$(printf '%q ' "$PY" -m sampling.generate_steps "${sample[@]}" --kind explore --expert_data "$EXPERT" \
          --limit "$LIMIT" --run_dir "$WORK/vllm" "${vllm_http[@]}")
  evals=$(printf '%q ' "$PY" -m eval.evaluate --task_family virtualhome --split seen --limit "$EVAL_LIMIT" \
          --max_steps "$MAX_STEPS" --max_new_tokens "$NEW_TOKENS" --run_dir "$WORK/vllm" --label sft "${vllm_http[@]}")
  step vllm env MODEL="$SFT" VLLM_PY="$VLLM_PY" PYTHON="$PY" ENDPOINTS_FILE="$WORK/vllm/endpoints.txt" \
    LOG_DIR="$WORK/vllm/logs" BASE_PORT=${VLLM_PORT:-8400} NUM_REPLICAS=1 MAX_MODEL_LEN=4096 \
    GPU_MEMORY_UTILIZATION=0.5 EXTRA_ARGS=--enforce-eager bash scripts/serve_vllm.sh -- bash -c "$steps && $evals"
  SAMPLING_RUNS+=('{"name": "vllm", "run": "vllm", "expert": false, "eval": "sft"}')
fi

# --- the check and the figures -------------------------------------------------------------------
CURRENT=check
{
  printf '{"saved_dtype": "%s", "n": %s, "eval_limit": %s, "training": [' "$SAVED_DTYPE" "$N" "$EVAL_LIMIT"
  (IFS=,; printf '%s' "${PLAN_TRAINING[*]}")
  printf '], "sampling": ['
  (IFS=,; printf '%s' "${SAMPLING_RUNS[*]}")
  printf '], "skipped": '
  "$PY" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${SKIPPED[@]}"
  printf '}\n'
} > "$WORK/plan.json"
peak=(); [ -n "$PEAK_TFLOPS" ] && peak=(--peak_tflops "$PEAK_TFLOPS")
"$PY" scripts/gpu_smoke.py check "$WORK" --device "$DEVICE" "${peak[@]}" 2>&1 | tee "$WORK/logs/check.log"
if [ -n "$FIGURES" ]; then
  mkdir -p "$(dirname "$FIGURES")"
  cp "$WORK/figures.json" "$FIGURES"
fi
echo "gpu_smoke: ok ($DEVICE, $SIZE model, $((SECONDS - start)) s, ${#SKIPPED[@]} skipped; $WORK/figures.json${FIGURES:+, $FIGURES})"
