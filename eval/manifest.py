"""The evaluation manifest: the exact task list an evaluation ran (ALFWorld game paths `<split>/<task>/<trial>`,
VirtualHome task keys, calibration history keys), a hash of it, and the versions of the environment packages it
ran on. Every evaluation summary records one (eval.evaluate, eval.step_accuracy, eval.calibration), and the report
refuses to put side by side summaries of one kind, environment and split that ran different manifests (another
game set, a task limit, another alfworld) unless told to (`--allow_different_manifests`), naming them either way.
A summary written before manifests existed has none and is not compared.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

# The packages whose version changes what an environment does, per task family.
ENV_PACKAGES = {"alfworld": ("alfworld", "textworld"), "virtualhome": ("virtualhome", "virtualhome-eval")}


def package_versions(task_family: str) -> dict[str, str | None]:
    out = {}
    for name in ENV_PACKAGES.get(task_family, ()):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def manifest(task_family: str, keys: list[str]) -> dict[str, Any]:
    """The manifest of an evaluation of `keys`, in the order run."""
    return {"tasks": list(keys), "num_tasks": len(keys),
            "tasks_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
            "packages": package_versions(task_family)}


def _identity(m: dict[str, Any]) -> tuple[str, str]:
    return m.get("tasks_sha256", ""), json.dumps(m.get("packages") or {}, sort_keys=True)


def _describe(m: dict[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in sorted((m.get("packages") or {}).items()))
    return f"{m.get('num_tasks')} tasks (sha256 {str(m.get('tasks_sha256'))[:12]}; {packages or 'no packages'})"


def differences(summaries: Iterable[str | Path]) -> list[str]:
    """One line per group of summaries shown side by side (one stage, environment and split) whose manifests
    differ, naming each manifest and the summaries that ran it."""
    groups: dict[tuple[str, str, str], dict[tuple[str, str], tuple[dict[str, Any], list[str]]]] = defaultdict(dict)
    for path in dict.fromkeys(str(p) for p in summaries):  # each file once, in order
        try:
            summary = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue  # not a summary file (the report reads and checks those itself)
        m = summary.get("manifest") if isinstance(summary, dict) else None
        if not isinstance(m, dict):
            continue
        stage = (summary.get("run_card") or {}).get("stage") or "eval"
        group = groups[(stage, str(summary.get("env")), str(summary.get("split")))]
        group.setdefault(_identity(m), (m, []))[1].append(path)
    lines = []
    for (stage, env, split), found in groups.items():
        if len(found) > 1:
            parts = [f"{_describe(m)}: {', '.join(paths)}" for m, paths in found.values()]
            lines.append(f"{stage} {env}/{split}: {len(found)} different manifests side by side: " + " vs ".join(parts))
    return lines


def check_side_by_side(summaries: Iterable[str | Path], allow: bool) -> list[str]:
    """The differences; an error naming them unless `allow`."""
    lines = differences(summaries)
    if lines and not allow:
        raise SystemExit("error: the report would compare evaluations of different task lists or environment "
                         "versions (pass --allow_different_manifests to compare them anyway):\n" + "\n".join(lines))
    return lines


def to_markdown(lines: list[str]) -> str:
    """The report's note on the summaries it put side by side although their manifests differ."""
    return "\n".join(["## Different manifests side by side (--allow_different_manifests)", "",
                      *[f"- {line}" for line in lines]]) + "\n"
