"""GPUs free before training: a stopped vLLM server waits for its replicas' GPU memory to be released, or fails
naming the processes still holding it (serve_vllm.sh exits 3, the pipeline's stop_server fails), and the training
launcher refuses GPUs another process holds. On this CPU machine with a faked nvidia-smi whose GPU processes are
real processes (the vLLM stand-in's replicas, a sleeping holder): memory is "held" while they live."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval_agent.gpus import GpuProcess, wait_free
from helpers import fake_nvidia_smi
from test_vllm import STAND_IN, free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def holder():
    """A process of someone else's that holds GPU memory until the test ends."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc.pid
    proc.stdin.close()
    proc.wait(timeout=30)


def gpu_env(tmp_path: Path, tiny_model_dir: Path, apps=(), stop_timeout: int = 60) -> dict[str, str]:
    """serve_vllm.sh on one faked GPU, its replica the vLLM stand-in (serve_hf on the CPU)."""
    fake = tmp_path / "fake_vllm_python"
    fake.write_text(STAND_IN.format(python=sys.executable))
    fake.chmod(0o755)
    pids = tmp_path / "pids"
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OPENAI_BASE_URL")}
    env.update(PATH=fake_nvidia_smi(tmp_path, gpus=1, apps=apps, pids_file=pids), MODEL=str(tiny_model_dir),
               BASE_MODEL=str(tiny_model_dir), VLLM_PY=str(fake), PYTHON=sys.executable, STAND_IN_PIDS=str(pids),
               BASE_PORT=str(free_port()), SERVE_PORT="", MAX_MODEL_LEN="512", STARTUP_TIMEOUT="180",
               STOP_TIMEOUT=str(stop_timeout), ENDPOINTS_FILE=str(tmp_path / "endpoints.txt"), LOG_DIR=str(tmp_path / "logs"),
               PYTHONPATH=str(REPO))
    return env


def test_wait_free_polls_until_the_memory_is_released():
    vllm, other = GpuProcess(7, "0", "GPU-a", 100, "vllm"), GpuProcess(8, "1", "GPU-b", 100, "other")
    reads = iter([[vllm], [vllm], []])
    assert wait_free({}, timeout=60, read=lambda: next(reads), poll=0) == [] and next(reads, None) is None
    assert wait_free({}, timeout=0, read=lambda: [vllm, other]) == [vllm, other]  # the time is up: who holds them
    assert wait_free({"CUDA_VISIBLE_DEVICES": "0"}, timeout=0, read=lambda: [vllm, other]) == [vllm]  # by index
    assert wait_free({"CUDA_VISIBLE_DEVICES": "GPU-b"}, timeout=0, read=lambda: [vllm, other]) == [other]  # by UUID


def test_server_stop_waits_for_its_replicas_gpu_memory(tmp_path, tiny_model_dir):
    env = gpu_env(tmp_path, tiny_model_dir)
    done = subprocess.run(["bash", "scripts/serve_vllm.sh", "--", sys.executable, "-c", "pass"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replica 0: GPU(s) 0" in done.stdout and "error" not in done.stderr  # released once the replica exited


def test_pipeline_stop_fails_naming_the_process_that_holds_the_gpu(tmp_path, tiny_model_dir, holder):
    env = gpu_env(tmp_path, tiny_model_dir, apps=[{"pid": holder, "gpu": 0, "mib": 5000}], stop_timeout=20)
    env.update(BACKEND="vllm", RUN_DIR=str(tmp_path / "run"), TASK_FAMILY="virtualhome")
    script = "source scripts/serve_lib.sh; start_server base || exit 9; stop_server; echo stop_server=$?"
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "stop_server=1" in done.stdout, done.stdout + done.stderr
    assert f"GPU 0: pid {holder} (python3, 5000 MiB)" in done.stderr and "did not free its GPUs" in done.stderr
    replica = [line for line in (tmp_path / "pids").read_text().splitlines()]
    assert len(replica) == 1 and str(holder) not in replica[0]  # the replica itself exited and released its memory


def test_training_refuses_gpus_another_process_holds(tmp_path, holder):
    script = "source scripts/stage_lib.sh; source scripts/train_launch.sh; launch_training platform"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_FREE_TIMEOUT": "1",
           "PATH": fake_nvidia_smi(tmp_path, gpus=2, apps=[{"pid": holder, "gpu": 1, "mib": 700}])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"training (platform) needs the GPUs but after 1 s they still hold another process's memory: GPU 1: " \
           f"pid {holder} (python3, 700 MiB)" in done.stderr
    free = subprocess.run(["bash", "-c", script], cwd=REPO, env={**env, "CUDA_VISIBLE_DEVICES": "0"},
                          capture_output=True, text=True, timeout=60)
    assert free.returncode == 0 and "Linux" in free.stdout  # GPU 0 is free: the module ran
