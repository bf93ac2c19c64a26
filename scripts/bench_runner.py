"""Episodes/s of the batched episode runner (hf backend with its prefix cache) against one episode
at a time running the whole prompt every step (the original scheme): same model, same tasks, same
greedy decoding, measured side by side in one run; also whether both took the same actions.

    .venv/bin/python scripts/bench_runner.py --task alfworld --split unseen --limit 8 --max_steps 10
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from eval_agent.envs import get_task_family
from eval_agent.llm import GenerationConfig
from eval_agent.smollm2 import default_model_dir
from eval_agent.runner import ModelPolicy, run_episodes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_family", "--task", default="alfworld")
    p.add_argument("--split", default="unseen")
    p.add_argument("--model", default=str(default_model_dir()))
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max_steps", type=int, default=10)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="episodes advanced together in the batched run")
    args = p.parse_args()

    family = get_task_family(args.task_family)
    tasks = family.load_tasks(args.split, limit=args.limit)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)

    results = {}
    # sequential: the original scheme (the whole prompt every step); batched: the runner as the stages use it.
    # Each has its own backend: a prefix cache filled by one run must not serve the other.
    for name, concurrency, options in (("sequential", 1, {"batch_size": 1, "prefix_cache_gb": 0}),
                                       ("batched", args.batch, {"batch_size": args.batch})):
        policy = ModelPolicy.build(args.task_family, args.model, generation, **options)
        trajs = {}
        load_before = os.getloadavg()[0]
        stats = run_episodes(tasks, policy, family.make_env, lambda ep: trajs.__setitem__(ep.task.key, ep.traj.actions),
                             max_steps=args.max_steps, concurrency=concurrency, progress=False)
        results[name] = {
            **stats.rates(),
            "seconds": stats.seconds,
            "generate_calls": stats.generate_calls,
            "prompt_tokens": policy.backend.prompt_tokens,
            "prompt_tokens_run": policy.backend.prompt_tokens_run,
            "load_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "actions": trajs,
        }
    same = results["sequential"].pop("actions") == results["batched"].pop("actions")
    ratio = results["batched"]["episodes_per_s"] / results["sequential"]["episodes_per_s"]
    print(json.dumps({"model": args.model, "tasks": len(tasks), "max_steps": args.max_steps, **results,
                      "same_greedy_actions": same, "speedup_batched_vs_sequential": round(ratio, 2)}, indent=2))


if __name__ == "__main__":
    main()
