#!/usr/bin/env bash
# Stage 2b: N Monte-Carlo rollouts (temperature 1) after every step record; the step reward is their
# mean success. Run sampling/generate_steps.sh first. Edit the values below or override them, e.g.
#   TASK=virtualhome N=5 BACKEND=openai ENDPOINTS=endpoints.txt bash sampling/mc_rollouts.sh
# Several machines: NUM_SHARDS/SHARD_ID as for generate_steps.sh (each shard reads its own step file), then
#   .venv/bin/python -m sampling.merge --what rollouts --num_shards 4 --n 5 --run_dir "$RUN_DIR"
set -euo pipefail
cd "$(dirname "$0")/.."

TASK=${TASK:-alfworld}              # alfworld | virtualhome
KIND=${KIND:-both}                  # expert | explore | both: which step records to roll out
RUN_DIR=${RUN_DIR:-outputs/${TASK}}
MODEL=${MODEL:-${RUN_DIR}/sft/model}  # the SFT policy (HF folder or served model name)
BACKEND=${BACKEND:-hf}              # hf (in-process transformers) | openai (vLLM or any compatible server)
ENDPOINTS=${ENDPOINTS:-}            # openai backend: file with one base URL per line (else $OPENAI_BASE_URL)
CHAT_FORMAT=${CHAT_FORMAT:-}        # template | llama-2; empty = what the model folder records, else template
N=${N:-5}                           # rollouts per step record (the paper: 5)
TEMPERATURE=${TEMPERATURE:-1.0}
TOP_P=${TOP_P:-1.0}
SEED=${SEED:-0}                     # seeds the in-process sampler (a server seeds its own: vllm serve --seed)
SPLIT=${SPLIT:-train}
DATA_ROOT=${DATA_ROOT:-}
MAX_STEPS=${MAX_STEPS:-40}          # episode budget, the replayed prefix included (as the original)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-512}
NUM_SHARDS=${NUM_SHARDS:-1}
SHARD_ID=${SHARD_ID:-0}
CONCURRENCY=${CONCURRENCY:-16}      # episodes advanced together; a record's N rollouts are queued side by side
PYTHON=${PYTHON:-.venv/bin/python}

args=(--task "$TASK" --kind "$KIND" --split "$SPLIT" --run_dir "$RUN_DIR" --model "$MODEL" --backend "$BACKEND"
      --n "$N" --temperature "$TEMPERATURE" --top_p "$TOP_P" --seed "$SEED"
      --max_steps "$MAX_STEPS" --max_new_tokens "$MAX_NEW_TOKENS"
      --num_shards "$NUM_SHARDS" --shard_id "$SHARD_ID" --concurrency "$CONCURRENCY")
[ -n "$ENDPOINTS" ] && args+=(--endpoints "$ENDPOINTS")
[ -n "$CHAT_FORMAT" ] && args+=(--chat_format "$CHAT_FORMAT")
[ -n "$DATA_ROOT" ] && args+=(--data_root "$DATA_ROOT")

"$PYTHON" -m sampling.mc_rollouts "${args[@]}" "$@"
echo "rollouts: $RUN_DIR/sampling/mc/"
