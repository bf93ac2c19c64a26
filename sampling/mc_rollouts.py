"""Stage 2b: Monte-Carlo rollouts of step records (the step reward is their mean success).

For each step record, N rollouts with the policy at temperature 1: the record's prefix (expert
replies 0..t-1 and its own step-t reply) is replayed in the environment, then the policy samples
until the episode ends or `--max_steps` (the replayed prefix counts, as in the original). The N
rollouts of a record are queued together, and over HTTP they go to one replica (its prefix cache
serves them), each request seeded from the run's `--seed` and the rollout key (the rollout's seed is
recorded), so a server that honours per-request seeds gives the same rollouts again. Rollouts are
`eval_agent.records.Rollout`s, keyed `<record key>|s<i>`, in
RUN_DIR/sampling/mc/rollouts_<kind>[.shard<i>of<n>].jsonl.

A record whose episode had already ended at step t (done) gets its outcome copied N times with
`from_record=True` and no agent step: the original took one extra agent step there (D8).

    python -m sampling.mc_rollouts --task alfworld --kind both --model outputs/alfworld/sft/model --run_dir outputs/alfworld
"""
from __future__ import annotations

import argparse
import logging
import random
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Container

from eval_agent.envs import Task, get_task_family
from eval_agent.llm import BackendUnavailable, GenerationConfig
from eval_agent.run_card import write_run_card
from eval_agent.records import Rollout, StepRecord, read_step_records, rollout_key
from eval_agent.async_runner import run_for_policy
from eval_agent.runner import Episode, derive_seed
from eval_agent.store import BadRecord, JsonlStore
from sampling.expert_tasks import (add_common_args, build_policy, check_shards, kinds, log, mc_dir, out_path, shard_of,
                             steps_dir)


def copied_rollout(rec: StepRecord, sample: int) -> Rollout:
    """The outcome of a record that ended at step t: nothing to roll out."""
    return Rollout(key=rollout_key(rec.key, sample), record_key=rec.key, task_key=rec.task_key, t=rec.t, kind=rec.kind,
                   sample=sample, success=rec.step_success, reward=float(rec.step_success), steps=0,
                   termination=rec.step_termination, actions=[], from_record=True, error=rec.error)


def rollout_jobs(records: list[StepRecord], tasks: dict[str, Task], n: int, done: Container[str],
                 seed: int | None = None) -> list[tuple[Task, list[str]]]:
    """(task, prefix) for every missing rollout, the N samples of a record next to each other. The
    task copy carries the rollout's identity in its meta (the episode's `traj.meta`), the record as
    its `route_key` (its N rollouts go to one replica) and, with `seed`, the rollout's own seed."""
    jobs = []
    for rec in records:
        for i in range(n):
            key = rollout_key(rec.key, i)
            if key not in done:
                meta = {**tasks[rec.task_key].meta, "route_key": rec.key,
                        "rollout": {"key": key, "record_key": rec.key, "t": rec.t, "kind": rec.kind, "sample": i}}
                if seed is not None:
                    meta["seed"] = derive_seed(seed, key)
                jobs.append((replace(tasks[rec.task_key], meta=meta), rec.rollout_prefix()))
    return jobs


def to_rollout(ep: Episode) -> Rollout:
    r, traj = ep.traj.meta["rollout"], ep.traj
    return Rollout(key=r["key"], record_key=r["record_key"], task_key=ep.task.key, t=r["t"], kind=r["kind"],
                   sample=r["sample"], success=traj.success, reward=traj.reward, steps=len(traj.steps) - len(ep.prefix),
                   termination=traj.termination, actions=traj.actions[len(ep.prefix):], from_record=False,
                   error=traj.meta.get("error"), seed=ep.task.meta.get("seed"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--n", type=int, default=5, help="rollouts per step record (the paper: 5)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0,
                   help="the run's seed: seeds the in-process sampler once; over HTTP each rollout's requests carry "
                        "seeds derived from it and the rollout key (recorded in the rollout)")
    p.add_argument("--steps", help="step records to roll out (default: this kind's and shard's generate_steps output)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_shards(args)
    if args.steps and args.kind == "both":
        raise SystemExit("error: --steps names one file: choose --kind expert or explore")

    import torch

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    family = get_task_family(args.task_family)
    tasks = {t.key: t for t in family.load_tasks(args.split, data_root=args.data_root)}
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    request_seed = args.seed if args.backend == "openai" else None  # the in-process sampler has one stream
    policy = None
    write_run_card(mc_dir(args.run_dir), "sampling.mc_rollouts", vars(args))
    summary: dict[str, Any] = {}
    for kind in kinds(args.kind):
        t0 = time.perf_counter()
        source = Path(args.steps or out_path(steps_dir(args.run_dir), f"steps_{kind}", args.num_shards, args.shard_id))
        try:
            records = read_step_records(source)
        except (BadRecord, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        records = [r for r in records if shard_of(r.task_key, args.num_shards) == args.shard_id]
        unknown = sorted({r.task_key for r in records} - tasks.keys())
        if unknown:
            raise SystemExit(f"error: {source}: {len(unknown)} tasks are not in {args.task_family}/{args.split} "
                             f"(e.g. {unknown[0]!r}); pass the --split / --data_root the step records were made on")
        path = out_path(mc_dir(args.run_dir), f"rollouts_{kind}", args.num_shards, args.shard_id)
        store = JsonlStore(path, overwrite=args.overwrite)
        before = len(store)
        for rec in (r for r in records if r.done):
            for i in range(args.n):
                if rollout_key(rec.key, i) not in store:
                    store.append(copied_rollout(rec, i).to_dict())
        copied = len(store) - before
        jobs = rollout_jobs([r for r in records if not r.done], tasks, args.n, store, request_seed)
        if jobs:
            policy = policy or build_policy(args, gen)
            try:
                run_for_policy(jobs, policy, partial(family.make_env, **args.env_args),
                               lambda ep: store.append(to_rollout(ep).to_dict()),
                               max_steps=args.max_steps, concurrency=args.concurrency, env_workers=args.env_workers)
            except BackendUnavailable as e:
                raise SystemExit(f"error: {e}") from None
        expected = len(records) * args.n
        summary[kind] = {"records_in": len(records), "rollouts_expected": expected, "skipped_done": expected - copied - len(jobs),
                         "copied_from_done_records": copied, "rolled_out": len(store) - before - copied,
                         "seconds": round(time.perf_counter() - t0, 1), "out": str(path)}
        log.info("rollouts_%s: %d step records x %d = %d rollouts: %d done before, %d copied from finished records, "
                 "%d rolled out now in %.1fs -> %s", kind, len(records), args.n, expected, summary[kind]["skipped_done"],
                 copied, summary[kind]["rolled_out"], summary[kind]["seconds"], path)
    return summary


if __name__ == "__main__":
    main()
