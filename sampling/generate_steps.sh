#!/usr/bin/env bash
# Stage 2a: expert and explored step records (expert prefix replayed, then step t by the expert or
# the greedy SFT policy). Edit the values below or override them from the environment, e.g.
#   TASK=virtualhome KIND=explore MODEL=outputs/virtualhome/sft/model bash sampling/generate_steps.sh
# Several machines: the same command with NUM_SHARDS=4 SHARD_ID=0..3, then
#   .venv/bin/python -m sampling.merge --what steps --num_shards 4 --expert_data "$EXPERT_DATA" --run_dir "$RUN_DIR"
set -euo pipefail
cd "$(dirname "$0")/.."

TASK=${TASK:-alfworld}              # alfworld | virtualhome
KIND=${KIND:-both}                  # expert | explore | both
RUN_DIR=${RUN_DIR:-outputs/${TASK}}
MODEL=${MODEL:-${RUN_DIR}/sft/model}  # the SFT policy (explore only; HF folder or served model name)
BACKEND=${BACKEND:-hf}              # hf (in-process transformers) | openai (vLLM or any compatible server)
ENDPOINTS=${ENDPOINTS:-}            # openai backend: file with one base URL per line (else $OPENAI_BASE_URL)
CHAT_FORMAT=${CHAT_FORMAT:-}        # template | llama-2; empty = what the model folder records, else template
EXPERT_DATA=${EXPERT_DATA:-${RUN_DIR}/sft/expert_train.jsonl}  # JSONL of expert trajectories (or the published format)
SPLIT=${SPLIT:-train}
DATA_ROOT=${DATA_ROOT:-}
MAX_STEPS=${MAX_STEPS:-40}          # episode budget, the replayed prefix included (as the original)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-512}
NUM_SHARDS=${NUM_SHARDS:-1}         # split the tasks over machines: a task and all its steps go to one shard
SHARD_ID=${SHARD_ID:-0}
LIMIT=${LIMIT:-}                    # first N expert trajectories only; empty = all
CONCURRENCY=${CONCURRENCY:-16}      # episodes advanced together (one batched generate call per round)
PYTHON=${PYTHON:-.venv/bin/python}

args=(--task "$TASK" --kind "$KIND" --split "$SPLIT" --expert_data "$EXPERT_DATA" --run_dir "$RUN_DIR"
      --backend "$BACKEND" --max_steps "$MAX_STEPS" --max_new_tokens "$MAX_NEW_TOKENS"
      --num_shards "$NUM_SHARDS" --shard_id "$SHARD_ID" --concurrency "$CONCURRENCY")
[ "$KIND" != expert ] && args+=(--model "$MODEL")
[ -n "$ENDPOINTS" ] && args+=(--endpoints "$ENDPOINTS")
[ -n "$CHAT_FORMAT" ] && args+=(--chat_format "$CHAT_FORMAT")
[ -n "$LIMIT" ] && args+=(--limit "$LIMIT")
[ -n "$DATA_ROOT" ] && args+=(--data_root "$DATA_ROOT")

"$PYTHON" -m sampling.generate_steps "${args[@]}" "$@"
echo "step records: $RUN_DIR/sampling/"
