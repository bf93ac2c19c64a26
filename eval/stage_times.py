"""How long each pipeline stage took, per run and per variant of it (RUN_DIR/variants/<name>/, a column of its own),
from the stage markers (eval_agent/guard.py): the table the pipeline prints at its end, so a user sees where the
time went (and what a skipped stage cost when it ran).

    python -m eval.stage_times --run alfworld=outputs/quickstart/alfworld --run virtualhome=... [--out FOLDER]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval_agent.cli import run_main
from eval_agent.layout import RunDir
from eval_agent.store import write_atomic


def marker_seconds(run_dir: Path) -> dict[str, float]:
    """stage -> seconds, in the order the stages completed; a marker without a time (or unreadable) is left out."""
    pipeline = RunDir(run_dir).pipeline
    times: dict[str, float] = {}
    for marker in sorted(pipeline.glob("*.done"), key=lambda p: p.stat().st_mtime_ns) if pipeline.is_dir() else []:
        try:
            seconds = json.loads(marker.read_text()).get("seconds")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(seconds, (int, float)):
            times[marker.stem] = float(seconds)
    return times


def to_markdown(runs: dict[str, dict[str, float]]) -> str:
    """One row per stage, one column per run, and the totals."""
    names = list(runs)
    stages = list(dict.fromkeys(stage for times in runs.values() for stage in times))
    lines = ["| stage | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for stage in stages:
        cells = [f"{runs[n][stage]:.0f} s" if stage in runs[n] else "-" for n in names]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    totals = [sum(runs[n].values()) for n in names]
    lines.append("| **total** | " + " | ".join(f"**{t:.0f} s**" for t in totals) + " |")
    return "\n".join(lines) + f"\n\nAll runs: {sum(totals):.0f} s ({sum(totals) / 60:.1f} min) of stage time.\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR", help="a run directory, named")
    p.add_argument("--out", type=Path, help="also write stage_times.md into this folder")
    args = p.parse_args(argv)
    runs = {}
    for item in args.run:
        name, sep, path = item.partition("=")
        if not sep:
            p.error(f"--run {item}: expected NAME=RUN_DIR")
        runs[name] = marker_seconds(Path(path))
        for variant in sorted(p for p in RunDir(path).variants.glob("*") if p.is_dir()):
            runs[f"{name}/{variant.name}"] = marker_seconds(variant)
    table = "## Stage times\n\n" + to_markdown(runs)
    if args.out:
        write_atomic(args.out / "stage_times.md", table)
    print(table, end="")
    return table


if __name__ == "__main__":
    run_main(main)
