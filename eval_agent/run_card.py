"""The run card every stage writes beside its output (`config.json`): all effective
arguments, library versions, model path, git commit and seed, so a table row can be traced back, and what the
stage opted into that is not the paper's (eval_agent/opt_ins.py)."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from eval_agent.layout import RUN_CARD
from eval_agent.opt_ins import card_opt_ins
from eval_agent.redaction import SECRET_WORDS, redact
from eval_agent.store import write_json

_LIBS = ("torch", "transformers", "accelerate", "vllm", "alfworld", "textworld", "virtualhome", "openai")


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in _LIBS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        repo = Path(__file__).resolve().parent.parent
        return subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_card(stage: str, args: dict[str, Any]) -> dict[str, Any]:
    clean = {k: "<set>" if SECRET_WORDS & set(k.lower().split("_")) and v else redact(v) if isinstance(v, str) else v
             for k, v in args.items()}
    return {
        "stage": stage,
        "args": clean,
        "opt_ins": card_opt_ins(stage, args),  # what makes its results not the paper's, opted into by name
        "versions": {"python": platform.python_version(), **library_versions()},
        "git_commit": git_commit(),
        "command": redact(" ".join(sys.argv)),
    }


def write_run_card(out_dir: str | Path, stage: str, args: dict[str, Any], name: str = RUN_CARD) -> dict[str, Any]:
    card = run_card(stage, args)
    write_json(Path(out_dir) / name, card)
    return card
