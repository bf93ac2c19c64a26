#!/usr/bin/env bash
# Calibration ability (the paper's Figure 4, docs/eval.md): the model continues episodes from histories that hold
# the SFT policy's deviated step and from the same histories without it, into
# RUN_DIR/eval/<LABEL>/<SPLIT>/calibration/ (eval_agent/layout.py); or (CALIBRATION_PROBE=next_action) takes one
# step after each deviated history, into .../calibration_next_action/. SPLIT=seen plays D_c's histories (train
# tasks), SPLIT=unseen the SFT model's own deviations on the unseen split (its step-accuracy records);
# CALIBRATION_HISTORIES=step_accuracy takes the seen split's too (held out from training). e.g.
#   TASK_FAMILY=alfworld SPLIT=seen LABEL=steca CALIBRATION_LIMIT=100 bash eval/calibration.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage_lib.sh                # PRESET, PYTHON, TASK_FAMILY, RUN_DIR

source scripts/label_vars.sh               # LABEL MODEL BASE_MODEL
CALIBRATION_LIMIT=${CALIBRATION_LIMIT:-}   # histories drawn at random per split (the paper: 100)
CALIBRATION_PROBE=${CALIBRATION_PROBE:-}   # episode (success after the deviated / clean history) | next_action
CALIBRATION_HISTORIES=${CALIBRATION_HISTORIES:-}  # calibration_set (D_c) | step_accuracy; empty = per split
OUT=${OUT:-}                               # the output folder; empty = RUN_DIR/eval/<LABEL>/<SPLIT>/calibration
source scripts/episode_vars.sh             # SPLIT DATA_ROOT MAX_STEPS CONCURRENCY
source scripts/model_vars.sh               # BACKEND ENDPOINTS CHAT_FORMAT ICL_NUM INSTRUCTION_FROM ICL_FROM MAX_NEW_TOKENS

args+=(--task_family "$TASK_FAMILY" --run_dir "$RUN_DIR")
opt --limit "$CALIBRATION_LIMIT"
opt --probe "$CALIBRATION_PROBE"
opt --histories "$CALIBRATION_HISTORIES"
opt --out "$OUT"
exec "$PYTHON" -m eval.calibration "${args[@]}" "$@"
