"""Expert data checked against the engine: every trajectory's actions replayed in the real environment.

Published expert data was written by an LLM and contains actions the real game rejects (original-code.md
§7: "sometimes invalid, e.g. `go to dining table 1`"); trained on as is, the model learns them, and the
sampling stages replay them as the expert prefix. For each trajectory this reports whether it replays
exactly (every action accepted and every observation the one the data shows), whether the episode ends
in success, and the first divergence of one that does not (step, action, the data's observation, the
engine's). Observations are compared with whitespace collapsed; VirtualHome's also as a set of their
comma-separated parts, since the original printed them in hash order.

    python -m sft.check_expert_data --task_family alfworld --expert_data data/official/alfworld/alfworld_sft.json \
        --report outputs/replay_alfworld.jsonl [--limit 100] [--keep replayed --out kept.jsonl]

`sft/make_expert_data.sh` runs the same check with CHECK_REPLAY=1 (and REPLAY_KEEP to drop trajectories).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eval_agent.cli import count, run_main
from eval_agent.envs import add_task_family_arg, get_task_family
from eval_agent.expert_data import load_expert_data, task_of, task_tail
from eval_agent.runner import MAX_STEPS, start_episode
from eval_agent.store import BadRecord, JsonlStore, move_aside, write_json
from eval_agent.trajectory import Trajectory

log = logging.getLogger("sft.check_expert_data")
KEEP = ("all", "replayed", "succeeded")  # which trajectories a filtered copy keeps


def same_observation(data: str, engine: str, task_family: str) -> bool:
    a, b = " ".join(data.split()), " ".join(engine.split())
    if a == b:
        return True
    if task_family == "virtualhome":
        parts = lambda s: sorted(p.strip(" .") for p in s.replace(". ", ", ").split(", ") if p.strip(" ."))  # noqa: E731
        return parts(a) == parts(b)
    return False


def replay_one(traj: Trajectory, task: Any, env: Any, task_family: str) -> dict[str, Any]:
    """The check of one trajectory: replayed exactly?, success?, first divergence."""
    steps = traj.steps
    ep = start_episode(task, env, [s.text for s in steps], max_steps=max(MAX_STEPS, len(steps) + 1))
    divergence = None
    for i, want in enumerate(steps):
        if i >= len(ep.traj.steps):
            divergence = {"step": i, "action": want.action, "data": want.observation,
                          "engine": f"(episode ended at step {len(ep.traj.steps) - 1}: {ep.traj.termination})"}
            break
        got = ep.traj.steps[i].observation
        last = i == len(steps) - 1 and not want.observation  # the published files end with an answer
        if not last and not same_observation(want.observation, got, task_family):
            divergence = {"step": i, "action": want.action, "data": want.observation, "engine": got}
            break
    return {"key": traj.meta["key"], "task_key": task.key, "steps": len(steps), "replayed": divergence is None,
            "success": ep.traj.success, "termination": ep.traj.termination, "divergence": divergence,
            "error": ep.traj.meta.get("error")}


def check(trajs: list[Trajectory], task_family: str, split: str = "train", data_root: str | None = None,
          env_args: dict[str, Any] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """One result per trajectory, in order; a trajectory that matches no task of the split says so."""
    family = get_task_family(task_family)
    by_tail = {task_tail(t.key): t for t in family.load_tasks(split, data_root=data_root)}
    env = family.make_env(**(env_args or {}))
    results = []
    try:
        for traj in tqdm(trajs, desc="replay", unit="traj", disable=not progress):
            task = task_of(traj, by_tail)
            if task is None:
                results.append({"key": traj.meta["key"], "task_key": None, "steps": len(traj.steps), "replayed": False,
                                "success": False, "termination": None, "divergence": None,
                                "error": f"matches no {task_family}/{split} task"})
            else:
                results.append(replay_one(traj, task, env, task_family))
    finally:
        env.close()
    return results


def kept(result: dict[str, Any], keep: str) -> bool:
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    return keep == "all" or (result["replayed"] if keep == "replayed" else result["success"])


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, and where and how the ones that do not replay first diverge."""
    n = len(results)
    diverged = [r for r in results if r["divergence"]]
    return {
        "trajectories": n,
        "replayed_exactly": sum(r["replayed"] for r in results),
        "succeeded": sum(r["success"] for r in results),
        "replayed_and_succeeded": sum(r["replayed"] and r["success"] for r in results),
        "without_task": sum(r["task_key"] is None for r in results),
        "env_errors": sum(bool(r["error"]) and r["task_key"] is not None for r in results),
        "first_divergence_step": dict(sorted(Counter(r["divergence"]["step"] for r in diverged).items())),
        "diverged_with_nothing_happens": sum(r["divergence"]["engine"] == "Nothing happens." for r in diverged),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_family_arg(p)
    p.add_argument("--expert_data", required=True, help="expert trajectories: published (alfworld_sft.json) or ours")
    p.add_argument("--split", default="train")
    p.add_argument("--data_root", help="task data folder (default: the task family's own lookup)")
    p.add_argument("--limit", type=count, help="first N trajectories only")
    p.add_argument("--report", help="JSONL of one result per trajectory (default: none); the summary goes beside it")
    p.add_argument("--keep", choices=KEEP, default="all", help="with --out: which trajectories the copy keeps")
    p.add_argument("--out", help="write the kept trajectories here (JSONL, our format)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        trajs = load_expert_data(args.expert_data)[: args.limit]
    except (BadRecord, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    results = check(trajs, args.task_family, args.split, args.data_root)
    summary = {**summarize(results), "expert_data": args.expert_data, "seconds": round(time.perf_counter() - t0, 1)}
    if args.report:
        report = Path(args.report)
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
        write_json(report.with_suffix(".summary.json"), summary)
    if args.out:
        move_aside(Path(args.out))  # a fresh copy each run; an older one is kept as .old
        store = JsonlStore(args.out)
        for traj, res in zip(trajs, results):
            if kept(res, args.keep):
                store.append({"key": traj.meta["key"], **traj.to_dict()})
        summary["kept"] = len(store)
    log.info("%d trajectories: %d replay exactly, %d end in success (%.1fs)", summary["trajectories"],
             summary["replayed_exactly"], summary["succeeded"], summary["seconds"])
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    run_main(main)
