#!/usr/bin/env bash
# Stage 3: step rewards, deviation detection, reflections, D_c / D_s / D_e with nDTW weights, the
# merged training set and its published export. Reads RUN_DIR/sampling/ (merged: sharded runs go
# through `python -m sampling.merge` first), writes RUN_DIR/data_collection/. Edit the values below
# or override them from the environment, e.g.
#   TASK=virtualhome REFLECT_BACKEND=self bash data_collection/build_dataset.sh
# Rerunnable: reflections are cached on disk, a rerun rewrites the same files with no new LLM call.
# The chat reflection backend reads OPENAI_API_KEY / OPENAI_BASE_URL from the environment only.
set -euo pipefail
cd "$(dirname "$0")/.."

TASK=${TASK:-alfworld}                # alfworld | virtualhome
RUN_DIR=${RUN_DIR:-outputs/${TASK}}
EXPERT_DATA=${EXPERT_DATA:-${RUN_DIR}/sft/expert_train.jsonl}  # the expert trajectories sampling replayed
MODEL=${MODEL:-${RUN_DIR}/sft/model}  # the SFT policy: the `self` reflection backend's model
BACKEND=${BACKEND:-hf}                # self reflections: hf (in-process) | openai (vLLM or any compatible server)
ENDPOINTS=${ENDPOINTS:-}              # openai backend: file with one base URL per line (else $OPENAI_BASE_URL)
CHAT_FORMAT=${CHAT_FORMAT:-}          # template | llama-2; empty = what the model folder records, else template
REFLECT_BACKEND=${REFLECT_BACKEND:-auto}  # chat (GPT-4o, the paper) | self (the policy, Table 3) | auto: chat when OPENAI_API_KEY is set
REFLECT_MODEL=${REFLECT_MODEL:-}      # chat: default gpt-4o; self: default $MODEL
REFLECT_CONCURRENCY=${REFLECT_CONCURRENCY:-8}  # chat: requests in flight; self: prompts per generate call
REFLECT_RETRIES=${REFLECT_RETRIES:-2} # times an invalid reflection is asked again
REFLECTION_FALLBACK=${REFLECTION_FALLBACK:-0}  # 1: keep a D_c row whose reflection stays invalid, with a templated thought
N=${N:-5}                             # MC samples expected per step record (the paper: 5; others are reported)
DELTA=${DELTA:-0}                     # deviated when r(explored t) <= r(expert t-1) + DELTA (the paper: 0)
STRICT=${STRICT:-0}                   # 1: < instead of the original code's <=
SIM_THRESHOLD=${SIM_THRESHOLD:-0.95}  # deviated only when cos(explored action, expert action) < this
MIN_STEP=${MIN_STEP:-2}               # explored steps t < MIN_STEP are not considered (the original: 2)
MARGIN=${MARGIN:-0.01}                # expert_sub / expert_full: the expert must be better by this (the original: 0.01)
K=${K:-}                              # reward = 1 +/- K * nDTW; empty = per TASK: alfworld 0.01, virtualhome 1
KEEP_THRESHOLD=${KEEP_THRESHOLD:-}    # explored rows kept when nDTW < this; empty = per TASK: alfworld 0.013, virtualhome 1e-6
EMBEDDER=${EMBEDDER:-minilm}          # minilm (all-MiniLM-L6-v2, mean pooling) | bert-cls (the original's bert-base-uncased [CLS])
EMBEDDER_PATH=${EMBEDDER_PATH:-}      # model folder or hub name; empty = the package's MiniLM / bert-base-uncased
EMBED_DEVICE=${EMBED_DEVICE:-cpu}     # cpu | cuda
PYTHON=${PYTHON:-.venv/bin/python}

args=(--task "$TASK" --run_dir "$RUN_DIR" --expert_data "$EXPERT_DATA" --model "$MODEL" --backend "$BACKEND"
      --reflect_backend "$REFLECT_BACKEND" --reflect_concurrency "$REFLECT_CONCURRENCY" --reflect_retries "$REFLECT_RETRIES"
      --n "$N" --delta "$DELTA" --sim_threshold "$SIM_THRESHOLD" --min_step "$MIN_STEP" --margin "$MARGIN"
      --embedder "$EMBEDDER" --embed_device "$EMBED_DEVICE")
[ -n "$ENDPOINTS" ] && args+=(--endpoints "$ENDPOINTS")
[ -n "$CHAT_FORMAT" ] && args+=(--chat_format "$CHAT_FORMAT")
[ -n "$REFLECT_MODEL" ] && args+=(--reflect_model "$REFLECT_MODEL")
[ "$REFLECTION_FALLBACK" = 1 ] && args+=(--reflection_fallback)
[ "$STRICT" = 1 ] && args+=(--strict)
[ -n "$K" ] && args+=(--k "$K")
[ -n "$KEEP_THRESHOLD" ] && args+=(--keep_threshold "$KEEP_THRESHOLD")
[ -n "$EMBEDDER_PATH" ] && args+=(--embedder_path "$EMBEDDER_PATH")

"$PYTHON" -m data_collection.build "${args[@]}" "$@"
echo "training set: $RUN_DIR/data_collection/train.jsonl (published format: final_data_rft_train.json)"
