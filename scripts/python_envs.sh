# The Python environments, defined once (paths from the repository root). Sourced by scripts/setup.sh (which
# creates them), scripts/serve_vllm.sh and scripts/gpu_smoke.sh (which run them); eval_agent/pyenvs.py reads the
# same lines for the pre-flight and the doctor, so that they check the pythons the stages will run. Set a
# variable to put an environment elsewhere: setup creates it there and everything else looks there.
VENV=${VENV:-.venv}                              # training and the in-process stages (setup.sh; --gpu: CUDA torch)
VLLM_VENV=${VLLM_VENV:-.venv-vllm}               # vLLM on GPUs (setup.sh --gpu)
VLLM_CPU_VENV=${VLLM_CPU_VENV:-.venv-vllm-cpu}   # vLLM on the CPU (setup.sh --vllm-cpu)

vllm_python() {  # vllm_python gpu|cpu: the python that serves vLLM there: VLLM_PY when set, else the environment's
  if [ -n "${VLLM_PY:-}" ]; then
    echo "$VLLM_PY"
  elif [ "$1" = gpu ]; then
    echo "$VLLM_VENV/bin/python"
  else
    echo "$VLLM_CPU_VENV/bin/python"
  fi
}
