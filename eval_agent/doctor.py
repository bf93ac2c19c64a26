"""What this machine has for the pipeline: library versions (also of the separate vLLM environments
scripts/serve_vllm.sh uses: their python, vllm, torch and transformers), the GPU side (NVIDIA driver, torch's
CUDA build and whether it can use the GPUs, and if not torch's reason, each GPU's memory and bf16), data found and counted (ALFWorld games per split, VirtualHome tasks per
split, looked up as the stages do; which training data, published or generated, counted), GPUs, vLLM endpoints reachable and what they serve (from
--endpoints or $OPENAI_BASE_URL, as the stages take them), whether an API key is set (never its value).

    python -m eval_agent.doctor [--endpoints FILE] [--alfworld_data DIR] [--vh_data DIR]
    python -m eval_agent.doctor --preflight     # the pipeline's pre-flight check, with the same variables
"""
from __future__ import annotations

import argparse
import json
import os
import urllib.request
from pathlib import Path
from typing import Any

from eval_agent.cli import run_main
from eval_agent.redaction import redact
from eval_agent.envs import alfworld, virtualhome
from eval_agent.gpus import driver_version
from eval_agent.pyenvs import probe, vllm_python
from eval_agent.llm import BackendUnavailable
from eval_agent.llm.openai_http import resolve_base_urls
from eval_agent.run_card import git_commit, library_versions



def _count_games(root: Path) -> dict[str, int]:
    base = root / "json_2.1.1"
    return {split: sum(1 for _ in (base / split).glob("*/*/game.tw-pddl"))
            for split in ("train", "valid_seen", "valid_unseen")}


def _training_data(task_family: str, root: str | None) -> dict[str, Any]:
    """Which training data the stages will use (published or generated, eval_agent.published.training_data),
    with its rows counted (EXPERT_SOURCE as the paper preset or the user sets it)."""
    from eval_agent.published import training_counts, training_data

    try:
        data = training_data(task_family, root, os.environ.get("EXPERT_SOURCE") or None)
        return {"kind": data.kind, "tasks": str(data.tasks), "expert": str(data.expert) if data.expert else None,
                "why": data.why, **training_counts(task_family, data)}
    except (OSError, ImportError, ValueError) as e:  # also BadRecord: named by file, line and field
        return {"error": str(e)}


def _alfworld_data(root: str | None) -> dict[str, Any]:
    try:
        found = alfworld.find_data_root(root)
    except FileNotFoundError as e:
        return {"error": str(e)}
    return {"root": str(found), "games": _count_games(found), "training_data": _training_data("alfworld", root)}


def _virtualhome_data(root: str | None) -> dict[str, Any]:
    """Per split: tasks the stages can run, and those without an initial scene graph (not run); which training
    data, counted."""
    out: dict[str, Any] = {"root": str(virtualhome.find_data_root(root))}
    for split in virtualhome.TASK_FILES:
        try:
            tasks, missing = virtualhome.read_split(split, root)
            out[split] = {"tasks": len(tasks), "without_scene_graph": len(missing)}
        except (OSError, ImportError, ValueError) as e:
            out[split] = {"error": str(e)}
    out["training_data"] = _training_data("virtualhome", root)
    return out


def _gpu() -> dict[str, Any]:
    """The driver, torch's CUDA build, whether torch can use the GPUs (else its reason), and each GPU."""
    try:
        import torch

        from eval_agent.training import cuda_problem, gpu_expected
    except Exception as e:  # a broken torch install is something to report, not to crash on
        return {"error": f"{type(e).__name__}: {e}"}
    problem = cuda_problem()
    devices = []
    for i in range(torch.cuda.device_count() if problem is None else 0):
        props = torch.cuda.get_device_properties(i)
        devices.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                        "compute_capability": f"{props.major}.{props.minor}",
                        "bf16": props.major >= 8})
    return {"nvidia_driver": driver_version(), "driver_expected": gpu_expected(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_usable": problem is None, "cuda_problem": problem,
            "devices": devices}


def _vllm_server_envs() -> dict[str, Any]:
    """The vLLM environments scripts/serve_vllm.sh can run ($VLLM_PY, VLLM_VENV's on GPUs, VLLM_CPU_VENV's on
    CPUs: scripts/python_envs.sh) and what each holds."""
    envs = {k: v for k, v in os.environ.items() if k != "VLLM_PY"}
    pythons = [os.environ["VLLM_PY"]] if os.environ.get("VLLM_PY") else []
    pythons += [p for p in (vllm_python(envs, gpu=True), vllm_python(envs, gpu=False)) if Path(p).exists()]
    if not pythons:
        return {"none": "no VLLM_PY set, no VLLM_VENV (scripts/setup.sh --gpu), no VLLM_CPU_VENV (--vllm-cpu)"}
    out: dict[str, Any] = {}
    for python in dict.fromkeys(pythons):
        found = out[python] = probe(python)
        if "error" not in found and not ({"vllm", "vllm-cpu"} & found.keys()):
            found["vllm"] = "not installed"
    return out


def _get_json(url: str, timeout: float = 3) -> Any:
    request = urllib.request.Request(url)
    if os.environ.get("OPENAI_API_KEY"):  # a server started with --api-key wants it for /v1/*
        request.add_header("Authorization", f"Bearer {os.environ['OPENAI_API_KEY']}")
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def _probe(url: str) -> dict[str, Any]:
    """/health (vLLM and serve_hf), then the model names /v1/models lists: what --model must say."""
    try:
        _get_json(url.rstrip("/").removesuffix("/v1") + "/health")
    except Exception as e:
        return {"status": f"unreachable: {e}"}
    try:
        models = [m["id"] for m in _get_json(url.rstrip("/") + "/models")["data"]]
    except Exception as e:
        return {"status": "ok", "models": f"error: {e}"}
    return {"status": "ok", "models": models}


def _endpoints(endpoints_file: str | None) -> dict[str, Any] | str:
    try:
        urls = resolve_base_urls(endpoints_file)
    except BackendUnavailable:
        return "none configured: pass --endpoints FILE or set $OPENAI_BASE_URL"
    except OSError as e:
        return f"error: {e}"
    return {u: _probe(u) for u in urls}


def report(endpoints: str | None = None, alfworld_data: str | None = None, vh_data: str | None = None) -> dict:
    return {
        "git_commit": git_commit(),
        "versions": library_versions(),
        "vllm_server_envs": _vllm_server_envs(),
        "alfworld_data": _alfworld_data(alfworld_data),
        "virtualhome_data": _virtualhome_data(vh_data),
        "gpu": _gpu(),
        "endpoints": _endpoints(endpoints),
        "OPENAI_API_KEY": "set" if os.environ.get("OPENAI_API_KEY") else "not set",
        "REFLECT_API_KEY": "set" if os.environ.get("REFLECT_API_KEY") else "not set",
    }


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoints", help="file with one base URL per line, as the stages take it (else $OPENAI_BASE_URL)")
    p.add_argument("--alfworld_data", help="default: $ALFWORLD_DATA, else data/alfworld")
    p.add_argument("--vh_data", help="default: $VH_DATA, else data/virtualhome")
    p.add_argument("--preflight", action="store_true",
                   help="run the pipeline's pre-flight check instead (eval_agent/preflight.py; TASK_FAMILY, PRESET, ...)")
    args = p.parse_args(argv)
    if args.preflight:
        from eval_agent.preflight import main as preflight

        return preflight([]).text("doctor")
    text = json.dumps(report(args.endpoints, args.alfworld_data, args.vh_data), indent=2)
    key = os.environ.get("OPENAI_API_KEY")
    if key:  # an error message that quoted it would still not show it
        text = text.replace(key, "<OPENAI_API_KEY>")
    text = redact(text)  # credentials in an endpoint URL
    print(text)
    return text


if __name__ == "__main__":
    run_main(main)
