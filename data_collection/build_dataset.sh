#!/usr/bin/env bash
# Stage 3: step rewards, deviation detection, reflections, D_c / D_s / D_e with nDTW weights, the merged
# training set and its published export: reads RUN_DIR/sampling/ (merged: sharded runs go through
# `python -m sampling.merge` first), writes RUN_DIR/data_collection/ (eval_agent/layout.py).
# docs/data_collection.md lists every variable with its default, e.g.
#   TASK_FAMILY=virtualhome REFLECT_BACKEND=self bash data_collection/build_dataset.sh
# Rerunnable: reflections are cached on disk, a rerun rewrites the same files with no new LLM call.
# The chat reflection backend reads its key and URL from the environment only: REFLECT_API_KEY and
# REFLECT_BASE_URL, each falling back to OPENAI_* (docs/data_collection.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage_lib.sh                # PRESET, PYTHON, TASK_FAMILY, RUN_DIR

EXPERT_DATA=${EXPERT_DATA:-}               # the expert trajectories sampling replayed; empty = the run's
MODEL=${MODEL:-}                           # the `self` reflection backend's model; empty = the run's SFT model
REFLECT_BACKEND=${REFLECT_BACKEND:-}       # chat (GPT-4o, the paper) | self (the policy, Table 3) | auto
REFLECT_MODEL=${REFLECT_MODEL:-}           # chat: the endpoint's model name; self: default MODEL
REFLECT_CONCURRENCY=${REFLECT_CONCURRENCY:-}  # chat: requests in flight; self: prompts per generate call
REFLECT_RETRIES=${REFLECT_RETRIES:-}       # times an invalid reflection is asked again
REFLECTION_FALLBACK=${REFLECTION_FALLBACK:-}  # 1: keep a D_c row whose reflection stays invalid, with a templated thought
REFLECT_PROMPT=${REFLECT_PROMPT:-}         # ours (chat turns) | original (the published code's Human:/Gpt: transcript)
CALIBRATE=${CALIBRATE:-}                   # every deviated step (the published code) | first per task (paper 3.2)
ROW_INSTRUCTION=${ROW_INSTRUCTION:-}       # 1: each expert trajectory's own instruction, as the original (and SFT)
N=${N:-}                                   # MC samples expected per step record (others are reported)
STEP_REWARD=${STEP_REWARD:-}               # mc (Monte-Carlo rollouts, the paper) | llm (scored by the reflecting model)
TRAIN_SETS=${TRAIN_SETS:-}                 # the sets in train.jsonl: calibration,expert_sub,expert_full,explored
DELTA=${DELTA:-}                           # deviated when r(explored t) <= r(expert t-1) + DELTA
STRICT=${STRICT:-}                         # 1: < instead of the original code's <=
SIM_THRESHOLD=${SIM_THRESHOLD:-}           # deviated only when cos(explored action, expert action) < this
MIN_STEP=${MIN_STEP:-}                     # explored steps t < MIN_STEP are not considered
MARGIN=${MARGIN:-}                         # D_s: the expert must beat the explored step by this
K=${K:-}                                   # reward = 1 +/- K * nDTW; empty = per family
KEEP_THRESHOLD=${KEEP_THRESHOLD:-}         # explored rows kept when nDTW < this; empty = per family
EMBEDDER=${EMBEDDER:-}                     # minilm | bert-cls (the original's bert-base-uncased [CLS])
EMBEDDER_PATH=${EMBEDDER_PATH:-}           # model folder or hub name; empty = the package's MiniLM / bert-base-uncased
EMBED_DEVICE=${EMBED_DEVICE:-}             # cpu | cuda
source scripts/model_vars.sh               # BACKEND ENDPOINTS CHAT_FORMAT ICL_NUM INSTRUCTION_FROM ICL_FROM MAX_NEW_TOKENS

args+=(--task_family "$TASK_FAMILY" --run_dir "$RUN_DIR")
opt --expert_data "$EXPERT_DATA"
opt --model "$MODEL"
opt --reflect_backend "$REFLECT_BACKEND"
opt --reflect_model "$REFLECT_MODEL"
opt --reflect_concurrency "$REFLECT_CONCURRENCY"
opt --reflect_retries "$REFLECT_RETRIES"
flag --reflection_fallback "$REFLECTION_FALLBACK"
opt --reflect_prompt "$REFLECT_PROMPT"
opt --calibrate "$CALIBRATE"
flag --row_instruction "$ROW_INSTRUCTION"
opt --n "$N"
opt --step_reward "$STEP_REWARD"
opt --train_sets "$TRAIN_SETS"
opt --delta "$DELTA"
flag --strict "$STRICT"
opt --sim_threshold "$SIM_THRESHOLD"
opt --min_step "$MIN_STEP"
opt --margin "$MARGIN"
opt --k "$K"
opt --keep_threshold "$KEEP_THRESHOLD"
opt --embedder "$EMBEDDER"
opt --embedder_path "$EMBEDDER_PATH"
opt --embed_device "$EMBED_DEVICE"
exec "$PYTHON" -m data_collection.build "${args[@]}" "$@"
