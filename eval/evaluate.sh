#!/usr/bin/env bash
# Stage 5: evaluate a policy on a split. Edit the values below or override them from the
# environment, e.g.  TASK=alfworld SPLIT=unseen POLICY=expert bash eval/evaluate.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TASK=${TASK:-alfworld}              # alfworld | virtualhome
SPLIT=${SPLIT:-seen}                # train | seen | unseen
POLICY=${POLICY:-model}             # model | expert (the built-in expert: the sanity baseline)
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
BACKEND=${BACKEND:-hf}              # hf (in-process transformers) | openai (vLLM or any compatible server)
ENDPOINTS=${ENDPOINTS:-}            # openai backend: file with one base URL per line (else $OPENAI_BASE_URL)
CHAT_FORMAT=${CHAT_FORMAT:-}        # template | llama-2; empty = what the model folder records, else template
MAX_STEPS=${MAX_STEPS:-40}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-512}
ICL_NUM=${ICL_NUM:-1}
LIMIT=${LIMIT:-}                    # first N tasks only; empty = the whole split
CONCURRENCY=${CONCURRENCY:-16}
DATA_ROOT=${DATA_ROOT:-}
OUT=${OUT:-outputs/eval/${TASK}-${SPLIT}-${POLICY}}
PYTHON=${PYTHON:-.venv/bin/python}

args=(--task "$TASK" --split "$SPLIT" --policy "$POLICY" --model "$MODEL" --backend "$BACKEND"
      --max_steps "$MAX_STEPS" --max_new_tokens "$MAX_NEW_TOKENS" --icl_num "$ICL_NUM"
      --concurrency "$CONCURRENCY" --out "$OUT")
[ -n "$ENDPOINTS" ] && args+=(--endpoints "$ENDPOINTS")
[ -n "$CHAT_FORMAT" ] && args+=(--chat_format "$CHAT_FORMAT")
[ -n "$LIMIT" ] && args+=(--limit "$LIMIT")
[ -n "$DATA_ROOT" ] && args+=(--data_root "$DATA_ROOT")

"$PYTHON" -m eval.evaluate "${args[@]}" "$@"
echo "summary: $OUT/summary.json"
