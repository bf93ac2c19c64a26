"""The GPU install path as far as a CPU machine can check it (a faked nvidia-smi and faked environments): setup's
Python and driver checks fire before anything is installed, TORCH_CUDA picks a build the driver runs, setup,
serve_vllm.sh, the smoke test and the pre-flight look for the same vLLM environment, and the doctor reports the
driver, torch's CUDA and the vLLM environments' versions."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval_agent import preflight
from helpers import fake_nvidia_smi

REPO = Path(__file__).resolve().parent.parent
OLD_PYTHONS = ["/root/.pyenv/versions/3.10.13/bin/python3", shutil.which("python3.10") or "", "/usr/bin/python3.10"]


def setup(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """scripts/setup.sh with every install target under tmp_path (the checks must stop it before any)."""
    full = {**os.environ, "VENV": str(tmp_path / "venv"), "VLLM_VENV": str(tmp_path / "venv-vllm"),
            "MODEL_DIR": str(tmp_path / "model"), "GAMES_DIR": str(tmp_path / "games"), "VH_DIR": str(tmp_path / "vh"),
            **env}
    return subprocess.run(["bash", "scripts/setup.sh", *args], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=120)




@pytest.mark.parametrize("mode", [[], ["--gpu"]])
def test_setup_refuses_a_python_older_than_3_11(tmp_path, mode):
    old = next((p for p in OLD_PYTHONS if p and Path(p).is_file()), None)
    if old is None:
        pytest.skip("no Python 3.10 on this machine")
    done = setup(mode, tmp_path, PYTHON=old)
    assert done.returncode == 1
    assert "is Python 3.10" in done.stderr and "need Python >= 3.11" in done.stderr and "PYTHON=python3.11" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_setup_gpu_needs_a_driver(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA driver")
    done = setup(["--gpu"], tmp_path, PYTHON=sys.executable)
    assert done.returncode == 1 and "--gpu needs an NVIDIA driver and none was found" in done.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize("driver", ["535.104.05", "garbage"])
def test_setup_gpu_refuses_a_driver_older_than_cuda_13_needs(tmp_path, driver):
    done = setup(["--gpu"], tmp_path, PYTHON=sys.executable, PATH=fake_nvidia_smi(tmp_path, driver, cuda="12.2"))
    assert done.returncode == 1
    assert f"NVIDIA driver {driver} (CUDA 12.2 at most) cannot run torch's TORCH_CUDA=cu130 build, built for CUDA " \
           "13.0 (driver >= 580.65.06 needed)" in done.stderr and "TORCH_CUDA" in done.stderr
    assert not (tmp_path / "venv").exists() and not (tmp_path / "venv-vllm").exists()


def stop_at_venv(tmp_path: Path) -> str:
    """A PYTHON that is this python, except that creating a venv stops setup there (exit 7): past the checks."""
    wrapper = tmp_path / "python3"
    wrapper.write_text(f'#!/bin/sh\n[ "$1 $2" = "-m venv" ] && {{ echo "creating venv $3" >&2; exit 7; }}\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def test_setup_gpu_takes_the_torch_build_an_older_driver_runs(tmp_path):
    path = fake_nvidia_smi(tmp_path, "570.86.15", cuda="12.8")
    done = setup(["--gpu"], tmp_path, PYTHON=stop_at_venv(tmp_path), PATH=path, TORCH_CUDA="cu128")
    assert done.returncode == 7, done.stderr  # past the driver check, at the first install step
    assert "NVIDIA driver 570.86.15 runs CUDA 12.8 builds (TORCH_CUDA=cu128)" in done.stdout
    assert f"creating venv {tmp_path / 'venv'}" in done.stderr
    refused = setup(["--gpu"], tmp_path, PYTHON=stop_at_venv(tmp_path), PATH=path, TORCH_CUDA="cuda12")
    assert refused.returncode == 1 and "TORCH_CUDA=cuda12: not a CUDA build name like cu130" in refused.stderr


def test_serve_script_and_preflight_look_for_the_same_vllm_python(tmp_path):
    """One definition (scripts/python_envs.sh): where setup puts vLLM's environment is where the pre-flight
    checks and serve_vllm.sh serves from, on GPUs and on the CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PY", "CUDA_VISIBLE_DEVICES")}
    env.update(VLLM_VENV=str(tmp_path / "gpu-env"), VLLM_CPU_VENV=str(tmp_path / "cpu-env"))
    for gpus, folder in ((1, "gpu-env"), (0, "cpu-env")):
        path = fake_nvidia_smi(tmp_path, gpus=gpus) if gpus else os.environ["PATH"]
        done = subprocess.run(["bash", "scripts/serve_vllm.sh"], cwd=REPO, env={**env, "PATH": path},
                              capture_output=True, text=True, timeout=60)
        python = tmp_path / folder / "bin" / "python"
        assert done.returncode == 2 and f"no python at VLLM_PY={python}" in done.stderr
        assert f"BACKEND=vllm: {python} cannot import vllm" in preflight.vllm_problem(env, gpus)


def test_setup_rejects_unknown_options(tmp_path):
    done = setup(["--gpus"], tmp_path)
    assert done.returncode == 2 and "usage: bash scripts/setup.sh [--gpu | --vllm-cpu]" in done.stderr


def test_serve_vllm_looks_for_the_gpu_environment_on_gpus(tmp_path):
    if (REPO / ".venv-vllm").exists():
        pytest.skip(".venv-vllm exists here")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PY", "VLLM_VENV", "CUDA_VISIBLE_DEVICES")}
    env["PATH"] = fake_nvidia_smi(tmp_path, "580.65.06")
    done = subprocess.run(["bash", "scripts/serve_vllm.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "no python at VLLM_PY=.venv-vllm/bin/python" in done.stderr and "setup.sh --gpu" in done.stderr


def test_doctor_reports_the_gpu_side_and_the_vllm_environments():
    res = subprocess.run([sys.executable, "-m", "eval_agent.doctor", "--alfworld_data", "/nonexistent"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "VLLM_PY": sys.executable})
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    import torch

    gpu = report["gpu"]
    assert gpu["torch"] == torch.__version__ and gpu["torch_cuda"] == torch.version.cuda
    if not torch.cuda.is_available():
        assert gpu["cuda_usable"] is False and gpu["cuda_problem"] and gpu["devices"] == []
    envs = report["vllm_server_envs"]
    mine = envs[sys.executable]  # VLLM_PY: this python, which has torch and transformers but no vLLM
    assert mine["python"] == ".".join(map(str, sys.version_info[:3])) and mine["torch"] == torch.__version__
    assert mine["transformers"] and mine["vllm"] == "not installed"
    cpu_env = REPO / ".venv-vllm-cpu" / "bin" / "python"
    if cpu_env.exists():  # scripts/setup.sh --vllm-cpu
        assert envs[str(cpu_env)]["vllm-cpu"] and envs[str(cpu_env)]["transformers"]
