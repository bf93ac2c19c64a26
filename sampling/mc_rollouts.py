"""Stage 2b: Monte-Carlo rollouts of step records; a record's step reward is their mean success.

For each step record, N rollouts at temperature 1 after its step t (the replayed prefix counts toward
`--max_steps`, as in the original), a record's N queued together so a prefix cache serves them: over HTTP they go
to one replica, and each request carries a seed derived from `--seed` and the rollout key (recorded in the
rollout), so a server that honours per-request seeds gives the same rollouts again. A record whose episode
already ended at step t gets its outcome copied N times (`from_record=True`). Writes
`eval_agent.records.Rollout`s to RUN_DIR/sampling/mc/; resumable. docs/sampling.md and docs/rollouts.md have the
details.

    python -m sampling.mc_rollouts --task_family alfworld --kind both --run_dir outputs/alfworld
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

from eval_agent.async_runner import run_for_policy
from eval_agent.cli import check_policy_model, count, input_file, natural, non_negative, probability, run_main
from eval_agent.envs import Task, get_task_family
from eval_agent.guard import RunGuard, fingerprint, identity, model_arg_names, policy_fingerprint, require_output, settings_of
from eval_agent.layout import RunDir
from eval_agent.llm import BackendUnavailable, GenerationConfig
from eval_agent.run_card import write_run_card
from eval_agent.records import MIN_STEP, Rollout, StepRecord, judged, read_step_records, rollout_key
from eval_agent.runner import Episode, ModelPolicy, derive_seed
from eval_agent.store import BadRecord, JsonlStore
from eval_agent.tracking import log_summary
from sampling.expert_tasks import add_sampling_args, check_shards, kinds, log, resolve_run_paths, shard_of

CODE_VERSION = 1  # raise it when a change makes the stage give other results for the same settings


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


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the stage's (docs/ lists them)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(p)
    p.add_argument("--n", type=count, default=5, help="rollouts per step record (the paper: 5)")
    p.add_argument("--temperature", type=non_negative, default=1.0)
    p.add_argument("--top_p", type=probability, default=1.0)
    p.add_argument("--seed", type=int, default=0,
                   help="the run's seed: seeds the in-process sampler once; over HTTP each rollout's requests carry "
                        "seeds derived from it and the rollout key (recorded in the rollout)")
    p.add_argument("--steps", help="step records to roll out (default: this kind's and shard's generate_steps output)")
    p.add_argument("--min_step", type=natural, default=MIN_STEP,
                   help="roll out the records data collection judges at this MIN_STEP: explored steps t >= MIN_STEP, "
                        "expert steps t >= MIN_STEP - 1 (0: every record, as the original)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_shards(args)
    run = resolve_run_paths(args)
    if args.steps and args.kind == "both":
        raise SystemExit("error: --steps names one file: choose --kind expert or explore")
    sources = {kind: input_file(args.steps or run.steps(kind, args.num_shards, args.shard_id), f"{kind} step records")
               for kind in kinds(args.kind)}
    check_policy_model(args)
    with RunGuard(fingerprints(args, run, sources), folder=False, overwrite=args.overwrite):
        return roll_out(args, run, sources)


def fingerprints(args: argparse.Namespace, run: RunDir, sources: dict[str, Path]) -> dict[Path, dict[str, Any]]:
    """One per output file: the sampling settings, the policy, and the step records rolled out; MIN_STEP only
    selects which records (a rollout is the same whichever are chosen: a lower one adds rollouts)."""
    settings = settings_of(args, drop=model_arg_names() | {"kind", "steps", "data_root", "min_step"})
    policy_settings, policy_inputs = policy_fingerprint(args)
    tasks = get_task_family(args.task_family).data_identity(args.split, args.data_root)
    return {run.rollouts(kind, args.num_shards, args.shard_id): fingerprint(
        "sampling.mc_rollouts", CODE_VERSION, {**settings, **policy_settings, "kind": kind},
        {"steps": identity(source), "tasks": tasks, **policy_inputs}, selection={"min_step": args.min_step})
        for kind, source in sources.items()}


def roll_out(args: argparse.Namespace, run: RunDir, sources: dict[str, Path]) -> dict[str, Any]:
    import torch

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    family = get_task_family(args.task_family)
    tasks = {t.key: t for t in family.load_tasks(args.split, data_root=args.data_root)}
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    request_seed = args.seed if args.backend == "openai" else None  # the in-process sampler has one stream
    write_run_card(run.mc, "sampling.mc_rollouts", vars(args))
    stores: dict[str, JsonlStore] = {}
    counts: dict[str, dict[str, int]] = {}
    jobs: list[tuple[Task, list[str]]] = []
    for kind in kinds(args.kind):
        source = sources[kind]
        try:
            records = read_step_records(source)
        except (BadRecord, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        records = [r for r in records if shard_of(r.task_key, args.num_shards) == args.shard_id]
        require_output(len(records), f"{source} has no step record of shard {args.shard_id}/{args.num_shards}")
        before_min = sum(not judged(r.kind, r.t, args.min_step) for r in records)
        records = [r for r in records if judged(r.kind, r.t, args.min_step)]
        require_output(len(records), f"{source}: no {kind} step record at the steps data collection judges "
                                     f"(MIN_STEP={args.min_step})")
        unknown = sorted({r.task_key for r in records} - tasks.keys())
        if unknown:
            raise SystemExit(f"error: {source}: {len(unknown)} tasks are not in {args.task_family}/{args.split} "
                             f"(e.g. {unknown[0]!r}); pass the --split / --data_root the step records were made on")
        store = stores[kind] = JsonlStore(run.rollouts(kind, args.num_shards, args.shard_id))
        before = len(store)
        for rec in (r for r in records if r.done):
            for i in range(args.n):
                if rollout_key(rec.key, i) not in store:
                    store.append(copied_rollout(rec, i).to_dict())
        kind_jobs = rollout_jobs([r for r in records if not r.done], tasks, args.n, store, request_seed)
        jobs += kind_jobs
        counts[kind] = {"records": len(records), "before": before, "copied": len(store) - before, "jobs": len(kind_jobs),
                        "before_min_step": before_min}

    t0 = time.perf_counter()
    if jobs:  # both kinds in one runner call: on a CPU their rows decode together
        policy = ModelPolicy.from_args(args, gen)
        try:
            run_for_policy(jobs, policy, partial(family.make_env, **args.env_args),
                           lambda ep: stores[ep.traj.meta["rollout"]["kind"]].append(to_rollout(ep).to_dict()),
                           max_steps=args.max_steps, concurrency=args.concurrency, env_workers=args.env_workers)
        except BackendUnavailable as e:
            raise SystemExit(f"error: {e}") from None
    seconds = round(time.perf_counter() - t0, 1)
    summary: dict[str, Any] = {"seconds": seconds}
    for kind, store in stores.items():
        c, expected = counts[kind], counts[kind]["records"] * args.n
        summary[kind] = {"records_in": c["records"], "records_before_min_step": c["before_min_step"],
                         "rollouts_expected": expected,
                         "skipped_done": expected - c["copied"] - c["jobs"], "copied_from_done_records": c["copied"],
                         "rolled_out": len(store) - c["before"] - c["copied"],
                         "success_rate": sum(r["success"] for r in store.records.values()) / max(1, len(store)),
                         "out": str(store.path)}
        log.info("rollouts_%s: %d step records x %d = %d rollouts (%d records before the steps data collection "
                 "judges left out): %d done before, %d copied from finished records, %d rolled out now -> %s", kind,
                 c["records"], args.n, expected, c["before_min_step"], summary[kind]["skipped_done"], c["copied"],
                 summary[kind]["rolled_out"], store.path)
    log.info("%d rollouts of %s in one run of %.1fs", len(jobs), " and ".join(stores), seconds)
    log_summary(run.root, "mc", summary, run.mc)
    return summary


if __name__ == "__main__":
    run_main(main)
