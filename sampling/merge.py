"""Merge the shard files of a sampling stage into one file, after checking that every expected key
is there exactly once (a duplicate is an error too; see `eval_agent.store.merge_jsonl`).

Expected keys: for step records, every step t of every expert trajectory that matches a task (so
the same --expert_data / --limit / --split as generate_steps); for rollouts, N per record of the
merged step-record file. Nothing is written when a key is missing.

    python -m sampling.merge --what steps --kind both --num_shards 4 --expert_data expert.jsonl --run_dir outputs/alfworld
    python -m sampling.merge --what rollouts --kind both --num_shards 4 --n 5 --run_dir outputs/alfworld
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from eval_agent.cli import count, run_main
from eval_agent.envs import add_task_family_arg
from eval_agent.guard import RunGuard, differences, identity, same
from eval_agent.records import judged, read_step_records, rollout_key, step_key
from eval_agent.store import BadRecord, merge_jsonl, read_jsonl
from eval_agent.layout import RunDir, fingerprint_path
from sampling.expert_tasks import kinds, load_expert_tasks, log

EXAMPLES = 5


def check_keys(sources: list[Path], expected: set[str]) -> None:
    """Raise SystemExit naming how many keys are missing / unexpected / duplicated, with examples."""
    seen: set[str] = set()
    dups: set[str] = set()
    for src in sources:
        for rec in read_jsonl(src):
            (dups if rec["key"] in seen else seen).add(rec["key"])
    problems = []
    for what, keys in (("missing", sorted(expected - seen)), ("unexpected", sorted(seen - expected)),
                       ("duplicated", sorted(dups))):
        if keys:
            problems.append(f"{len(keys)} {what} (e.g. {', '.join(keys[:EXAMPLES])})")
    if problems:
        raise SystemExit(f"error: {len(expected)} keys expected in {', '.join(map(str, sources))}: " + "; ".join(problems))


def merged_fingerprint(sources: list[Path], rollouts_of: Path | None) -> dict[str, Any]:
    """The shards' common fingerprint: every shard must have been made with the same settings (a shard of
    another model would mix in silently). Rollout shards each read their own step records: the merged file's
    are those of the merged step records (`rollouts_of`)."""
    fps = []
    for src in sources:
        record = fingerprint_path(src, folder=False)
        if not record.is_file():
            raise SystemExit(f"error: {record} missing: the shard has no record of the settings it was made with")
        fp = json.loads(record.read_text())
        fps.append({**fp, "inputs": {k: v for k, v in fp["inputs"].items() if k != "steps"}})
    for src, fp in zip(sources[1:], fps[1:]):
        if not same(fps[0], fp):
            raise SystemExit(f"error: {src} was made with other settings than {sources[0]}: "
                             + "; ".join(differences(fps[0], fp)))
    if rollouts_of is not None:
        fps[0]["inputs"]["steps"] = identity(rollouts_of)
    return fps[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=("steps", "rollouts"), required=True)
    p.add_argument("--kind", choices=("expert", "explore", "both"), default="both")
    p.add_argument("--num_shards", type=count, required=True)
    p.add_argument("--run_dir", required=True)
    p.add_argument("--n", type=count, default=5, help="rollouts: samples per step record")
    p.add_argument("--expert_data", help="steps: the expert trajectories generate_steps read (default: the run's)")
    add_task_family_arg(p)
    p.add_argument("--split", default="train")
    p.add_argument("--data_root")
    p.add_argument("--limit", type=count)
    p.add_argument("--overwrite", action="store_true", help="replace a merged file made with other settings (moved aside)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run = RunDir(args.run_dir)
    args.expert_data = args.expert_data or str(run.expert_data(args.split))

    items = load_expert_tasks(args)[0] if args.what == "steps" else []
    summary = {}
    for kind in kinds(args.kind):
        t0 = time.perf_counter()
        path_of = run.steps if args.what == "steps" else run.rollouts
        sources = [path_of(kind, args.num_shards, i) for i in range(args.num_shards)]
        absent = [str(s) for s in sources if not s.is_file()]
        if absent:
            raise SystemExit(f"error: {len(absent)} of {args.num_shards} shard files are missing: {', '.join(absent)}")
        fp = merged_fingerprint(sources, run.steps(kind) if args.what == "rollouts" else None)
        try:
            if args.what == "steps":
                expected = {step_key(x.task.key, t, kind) for x in items for t in range(len(x.expert.steps))}
            else:  # the records the shards rolled out: those data collection judges at their MIN_STEP
                min_step = fp["selection"].get("min_step", 0)
                records = [r for r in read_step_records(run.steps(kind)) if judged(r.kind, r.t, min_step)]
                expected = {rollout_key(r.key, i) for r in records for i in range(args.n)}
            check_keys(sources, expected)
        except (BadRecord, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        out = path_of(kind)
        with RunGuard({out: fp}, folder=False, overwrite=args.overwrite):
            n = merge_jsonl(sources, out)
        summary[kind] = {"shards": args.num_shards, "records": n, "out": str(out), "seconds": round(time.perf_counter() - t0, 1)}
        log.info("%s: merged %d shards, %d records, all %d expected keys once -> %s (%.1fs)",
                 out.name, args.num_shards, n, len(expected), out, summary[kind]["seconds"])
    return summary


if __name__ == "__main__":
    run_main(main)
