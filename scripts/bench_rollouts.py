"""Throughput of Monte-Carlo rollouts (stage 2b's workload): one episode at a time (the original
scheme) against the batched runner with the in-process hf backend, and with `--http URL` also the
batched runner against a server (`python -m eval_agent.llm.serve_hf --model MODEL`, or vLLM), all
in one run on the same model and the same step records. Prints JSON: episodes/s, env-steps/s,
generated tokens/s per scheme and the ratios to the sequential run.

    .venv/bin/python scripts/bench_rollouts.py --task virtualhome --records 4 --n 4
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from eval_agent.envs import get_task_family
from eval_agent.llm import GenerationConfig
from eval_agent.models import default_model_dir
from eval_agent.records import read_step_records
from eval_agent.runner import ModelPolicy, run_episodes
from sampling.generate_steps import main as generate_steps
from sampling.mc_rollouts import rollout_jobs

VH_EXPERT = Path(__file__).resolve().parent.parent / "data" / "virtualhome" / "vh_train_trajectories.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="virtualhome")
    p.add_argument("--expert_data", help=f"expert trajectories (default for virtualhome: {VH_EXPERT})")
    p.add_argument("--model", default=str(default_model_dir()))
    p.add_argument("--records", type=int, default=4, help="step records rolled out (the first steps of the first tasks)")
    p.add_argument("--n", type=int, default=4, help="rollouts per record")
    p.add_argument("--max_steps", type=int, default=6, help="episode budget, the replayed prefix included")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=16, help="episodes advanced together in the batched runs")
    p.add_argument("--http", help="also the batched runner against this OpenAI-compatible base URL serving --model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    expert = args.expert_data or (VH_EXPERT if args.task == "virtualhome" else None)
    if expert is None:
        raise SystemExit("error: --expert_data is required for this task")

    import torch

    with tempfile.TemporaryDirectory() as run_dir:  # expert step records: no model involved, fast
        generate_steps(["--task", args.task, "--kind", "expert", "--expert_data", str(expert), "--run_dir", run_dir,
                        "--limit", str(args.records)])
        records = read_step_records(Path(run_dir) / "sampling" / "steps_expert.jsonl")
    records = sorted((r for r in records if not r.done), key=lambda r: (r.t, r.key))[: args.records]
    family = get_task_family(args.task)
    tasks = {t.key: t for t in family.load_tasks("train")}
    jobs = rollout_jobs(records, tasks, args.n, set())
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)

    schemes = [("sequential", "hf", 1, {}), ("batched_hf", "hf", args.batch, {"batch_size": args.batch})]
    if args.http:
        schemes.append(("batched_http", "openai", args.batch, {"base_urls": args.http}))
    results = {}
    for name, backend, concurrency, options in schemes:
        torch.manual_seed(args.seed)
        policy = ModelPolicy.build(args.task, args.model, gen, backend=backend, tokenizer=args.model, **options)
        stats = run_episodes(jobs, policy, family.make_env, lambda ep: None, max_steps=args.max_steps,
                             concurrency=concurrency, progress=False)
        results[name] = {**stats.rates(), "seconds": stats.seconds, "episodes": stats.episodes,
                         "env_steps": stats.env_steps, "generated_tokens": stats.generated_tokens,
                         "generate_calls": stats.generate_calls}
    base = results["sequential"]
    ratios = {f"{name}_vs_sequential": {k: round(results[name][k] / max(base[k], 1e-9), 2)
                                        for k in ("episodes_per_s", "env_steps_per_s", "generated_tokens_per_s")}
              for name in results if name != "sequential"}
    print(json.dumps({"model": args.model, "task": args.task, "records": len(records), "n": args.n,
                      "rollouts": len(jobs), "max_steps": args.max_steps, "temperature": args.temperature,
                      **results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
