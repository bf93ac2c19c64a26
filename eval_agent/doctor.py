"""What this machine has for the pipeline: library versions, data found and counted, GPUs, vLLM
endpoints reachable, whether an API key is set (never its value).

    python -m eval_agent.doctor
"""
from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from eval_agent.protocol import git_commit, library_versions

REPO = Path(__file__).resolve().parent.parent


def _count_games(root: Path) -> dict[str, int]:
    base = root / "json_2.1.1"
    return {split: sum(1 for _ in (base / split).glob("*/*/game.tw-pddl")) for split in ("train", "valid_seen", "valid_unseen")}


def _gpus() -> list[str]:
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # a broken CUDA install is something to report, not to crash on
        return [f"error: {e}"]


def _reachable(url: str) -> str:
    try:
        with urllib.request.urlopen(url.rstrip("/").removesuffix("/v1") + "/health", timeout=3) as r:
            return f"ok ({r.status})"
    except Exception as e:
        return f"unreachable: {e}"


def report() -> dict:
    alf = Path(os.environ.get("ALFWORLD_DATA", REPO / "data" / "alfworld"))
    urls = [u for u in os.environ.get("OPENAI_BASE_URL", "").split(",") if u]
    return {
        "git_commit": git_commit(),
        "versions": library_versions(),
        "alfworld_data": {"root": str(alf), "games": _count_games(alf) if alf.exists() else "missing"},
        "gpus": _gpus(),
        "endpoints": {u: _reachable(u) for u in urls},
        "OPENAI_API_KEY": "set" if os.environ.get("OPENAI_API_KEY") else "not set",
    }


if __name__ == "__main__":
    print(json.dumps(report(), indent=2))
