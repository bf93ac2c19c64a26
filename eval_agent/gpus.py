"""The GPUs as nvidia-smi reports them: the driver and which CUDA builds of torch it can run, and which processes
hold GPU memory. Used by scripts/setup.sh --gpu (the driver against the chosen build, before installing), the
pre-flight (the driver against the builds installed), scripts/serve_vllm.sh (a stopped server's GPU memory is
released) and the training launcher (the GPUs are free before training starts).

    python -m eval_agent.gpus setup --torch_cuda cu128       # exit 1 naming both versions if the driver cannot run it
    python -m eval_agent.gpus wait-free --timeout 60 --what "SFT"   # exit 1 naming the processes still on the GPUs

Standard library only: setup.sh runs it with the system's python, before any environment exists.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from eval_agent.cli import run_main

# The oldest driver that runs any build of a CUDA major version (NVIDIA's minor-version compatibility: a
# driver of 12.x runs builds for later 12.y too, but nothing of 13).
MIN_DRIVER = {12: "525.60.13", 13: "580.65.06"}


def smi(*args: str, timeout: float = 20) -> str | None:
    """nvidia-smi's output, or None without a driver (or when it fails)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def driver_version() -> str | None:
    out = smi("--query-gpu=driver_version", "--format=csv,noheader")
    return out.strip().splitlines()[0].strip() if out and out.strip() else None


def driver_cuda() -> str | None:
    """The newest CUDA the driver supports, from nvidia-smi's banner ("CUDA Version: 12.4")."""
    found = re.search(r"CUDA Version:\s*([\d.]+)", smi() or "")
    return found[1] if found else None


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text))


def variant_cuda(variant: str) -> str:
    """The CUDA version of a PyTorch build name: cu130 -> 13.0, cu128 -> 12.8."""
    found = re.fullmatch(r"cu(\d+)(\d)", variant)
    if not found:
        raise ValueError(f"TORCH_CUDA={variant}: not a CUDA build name like cu130, cu128 or cu126")
    return f"{int(found[1])}.{found[2]}"


def driver_problem(driver: str | None, cuda: str, what: str, supports: str | None = None) -> str | None:
    """Why `driver` cannot run `what`, built for CUDA `cuda`, naming both versions; None when it can."""
    need = MIN_DRIVER.get(version_tuple(cuda)[0])
    if need is None:
        return f"{what} is built for CUDA {cuda}, which this project knows no driver requirement for"
    if driver and version_tuple(driver) and version_tuple(driver) >= version_tuple(need):
        return None
    have = f"NVIDIA driver {driver}" if driver else "the NVIDIA driver (version unreadable)"
    return (f"{have}{f' (CUDA {supports} at most)' if supports else ''} cannot run {what}, built for CUDA {cuda} "
            f"(driver >= {need} needed): upgrade the driver, or rerun bash scripts/setup.sh --gpu with the "
            "TORCH_CUDA of a build it runs (docs/gpu.md)")


# ---- who holds GPU memory ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuProcess:
    pid: int
    gpu: str  # the GPU's index
    uuid: str  # the GPU's UUID
    used_mib: int
    name: str

    def text(self) -> str:
        return f"GPU {self.gpu}: pid {self.pid} ({self.name}, {self.used_mib} MiB)"


def _rows(out: str | None) -> list[list[str]]:
    return [[x.strip() for x in line.split(",")] for line in (out or "").splitlines() if line.strip()]


def gpu_processes() -> list[GpuProcess]:
    """Every process holding memory on a GPU of this machine (empty without a driver; rows not of the asked
    shape are skipped)."""
    gpus = {row[1]: row[0] for row in _rows(smi("--query-gpu=index,uuid", "--format=csv,noheader,nounits"))
            if len(row) == 2}
    apps = _rows(smi("--query-compute-apps=pid,gpu_uuid,used_memory,process_name", "--format=csv,noheader,nounits"))
    return [GpuProcess(int(row[0]), gpus.get(row[1], "?"), row[1], int(row[2]) if row[2].isdigit() else 0,
                       ",".join(row[3:])) for row in apps if len(row) >= 3 and row[0].isdigit()]


def visible(processes: list[GpuProcess], env: Mapping[str, str]) -> list[GpuProcess]:
    """The processes on the GPUs this job may use (CUDA_VISIBLE_DEVICES: indices or UUIDs; all GPUs when unset)."""
    if "CUDA_VISIBLE_DEVICES" not in env:
        return processes
    ids = [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    return [p for p in processes if p.gpu in ids or any(i.startswith("GPU-") and p.uuid.startswith(i) for i in ids)]


def wait_free(env: Mapping[str, str], timeout: float, read: Callable[[], list[GpuProcess]] = gpu_processes,
              poll: float = 0.5) -> list[GpuProcess]:
    """Wait up to `timeout` s for no process to hold memory on the visible GPUs; the ones still there (empty: free)."""
    deadline = time.monotonic() + timeout
    while True:
        busy = visible(read(), env)
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(poll)  # poll interval: memory is released when the processes have exited


def busy_text(busy: list[GpuProcess]) -> str:
    return "; ".join(p.text() for p in busy)


# ---- command line -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="the driver against the CUDA build setup.sh --gpu would install")
    s.add_argument("--torch_cuda", required=True, help="the PyTorch build name, e.g. cu130, cu128")
    w = sub.add_parser("wait-free", help="wait for the visible GPUs to hold no process's memory")
    w.add_argument("--timeout", type=float, default=60.0)
    w.add_argument("--what", default="this job", help="what needs the GPUs (for the message)")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.cmd == "setup":
        try:
            cuda = variant_cuda(a.torch_cuda)
        except ValueError as e:
            raise SystemExit(f"[setup] error: {e}") from None
        problem = driver_problem(driver_version(), cuda, f"torch's TORCH_CUDA={a.torch_cuda} build", driver_cuda())
        if problem:
            raise SystemExit(f"[setup] error: {problem}")
        print(f"[setup] NVIDIA driver {driver_version()} runs CUDA {cuda} builds (TORCH_CUDA={a.torch_cuda})")
        return
    busy = wait_free(os.environ, a.timeout)
    if busy:
        print(f"error: {a.what} needs the GPUs but after {a.timeout:.0f} s they still hold another process's memory: "
              f"{busy_text(busy)}; stop it (kill PID) or set CUDA_VISIBLE_DEVICES to free GPUs", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    run_main(main)
