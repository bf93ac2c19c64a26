"""Stage 5: evaluate a policy on a task split. One result file per task, then `summary.json`.

Resumable: tasks whose result file exists are skipped; the summary is rebuilt from the result
files of the selected tasks, so each task counts once however often the stage was interrupted.

    python -m eval.evaluate --task alfworld --split seen --policy expert --out outputs/eval/expert
    python -m eval.evaluate --task alfworld --split unseen --policy model --model models/SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import Counter, defaultdict
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from eval_agent.envs import add_task_family_arg, get_task_family
from eval_agent.llm import BackendUnavailable
from eval_agent.run_card import write_run_card
from eval_agent.async_runner import run_for_policy
from eval_agent.runner import MAX_STEPS, Episode, ExpertPolicy, ModelPolicy, add_model_args
from eval_agent.store import write_json
from eval_agent.trajectory import Trajectory

log = logging.getLogger("eval")


def result_path(out: Path, key: str) -> Path:
    return out / "tasks" / (key.replace("/", "__") + ".json")


def summarize(task_name: str, split: str, trajs: list[Trajectory]) -> dict[str, Any]:
    """Success rate, average reward and steps, overall and per task type."""

    def stats(ts: list[Trajectory]) -> dict[str, Any]:
        n = len(ts)
        return {
            "num_tasks": n,
            "success_rate": sum(t.success for t in ts) / n if n else 0.0,
            "avg_reward": sum(t.reward or 0.0 for t in ts) / n if n else 0.0,
            "avg_steps": sum(len(t.steps) for t in ts) / n if n else 0.0,
        }

    by_type: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        by_type[t.meta.get("task_type", "unknown")].append(t)
    return {
        "env": task_name,
        "split": split,
        **stats(trajs),
        "per_task_type": {k: stats(v) for k, v in sorted(by_type.items())},
        "terminations": dict(Counter(t.termination for t in trajs)),
    }


def build_policy(args: argparse.Namespace):
    if args.policy == "expert":
        return ExpertPolicy(), {}
    from eval_agent.llm import GenerationConfig

    policy = ModelPolicy.from_args(args, GenerationConfig(max_new_tokens=args.max_new_tokens,
                                                          temperature=args.temperature))
    return policy, {"chat_format": policy.chat_format.name}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_family_arg(p)
    p.add_argument("--split", default="seen", help="train | seen | unseen")
    p.add_argument("--policy", choices=("model", "expert"), default="model")
    add_model_args(p)
    p.add_argument("--max_steps", type=int, default=MAX_STEPS)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, as the paper evaluates")
    p.add_argument("--data_root", help="task data folder (default: the task family's own lookup)")
    p.add_argument("--env_args", type=json.loads, default={},
                   help='JSON object of environment options, e.g. \'{"task_text": "original"}\' (ALFWorld)')
    p.add_argument("--limit", type=int, help="first N tasks of the split only")
    p.add_argument("--concurrency", type=int, help="episodes in flight (default: 16 in-process, 1024 over HTTP)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="ignore existing result files and rerun every task")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    out = Path(args.out)
    family = get_task_family(args.task_family)
    tasks = family.load_tasks(args.split, data_root=args.data_root, limit=args.limit)
    todo = [t for t in tasks if args.overwrite or not result_path(out, t.key).exists()]
    log.info("%s/%s: %d tasks, %d already done, %d to run", args.task_family, args.split, len(tasks), len(tasks) - len(todo), len(todo))

    policy, extra = build_policy(args)
    card = write_run_card(out, "eval", {**vars(args), **extra})

    def save(ep: Episode) -> None:
        write_json(result_path(out, ep.task.key), ep.traj.to_dict())

    try:
        make_env = partial(family.make_env, expert=args.policy == "expert", **args.env_args)
        stats = run_for_policy(todo, policy, make_env, save, max_steps=args.max_steps, concurrency=args.concurrency,
                               env_workers=args.env_workers)
    except BackendUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    trajs = [Trajectory.from_dict(json.loads(result_path(out, t.key).read_text())) for t in tasks]
    for t, traj in zip(tasks, trajs):
        traj.meta.setdefault("task_type", t.meta.get("task_type", "unknown"))
    summary = {**summarize(args.task_family, args.split, trajs), "run": asdict(stats), "run_card": card}
    write_json(out / "summary.json", summary)
    log.info(
        "%s/%s: success %.3f, avg reward %.3f, avg steps %.1f over %d tasks (%d run now in %.1fs)",
        args.task_family, args.split, summary["success_rate"], summary["avg_reward"], summary["avg_steps"],
        summary["num_tasks"], stats.episodes, stats.seconds,
    )
    return summary


if __name__ == "__main__":
    main()
