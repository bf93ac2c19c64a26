"""Stage 5: evaluate a policy on a task split. One result file per task, then `summary.json`.
Several splits in one run (`--split seen,unseen`) decode together, each into its own folder: one model
load, and on a CPU twice the rows per decoding step for little more than the time of one.

Output: RUN_DIR/eval/<label>/<split>/ (eval_agent/layout.py), or --out. The label names the model:
`base` (default: the embedded SmolLM2), `sft` and `steca` (default: the run directory's SFT / STeCa model),
`expert` for --policy expert, or any name with --model.

Resumable: tasks whose result file exists are skipped; the summary is rebuilt from the result
files of the selected tasks, so each task counts once however often the stage was interrupted.

    python -m eval.evaluate --task_family alfworld --split seen --policy expert --run_dir outputs/alfworld
    python -m eval.evaluate --task_family alfworld --split seen,unseen --label sft --run_dir outputs/alfworld
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

from eval.manifest import manifest
from eval_agent.async_runner import run_for_policy
from eval_agent.cli import UserError, check_policy_model, count, non_negative, per_split, run_main
from eval_agent.envs import Task, add_task_family_arg, get_task_family
from eval_agent.guard import RunGuard, fingerprint, model_arg_names, policy_fingerprint, settings_of
from eval_agent.layout import EVAL_SUMMARY, LABELS, RunDir
from eval_agent.llm import BackendUnavailable
from eval_agent.run_card import write_run_card
from eval_agent.smollm2 import default_model_dir
from eval_agent.runner import MAX_STEPS, Episode, ExpertPolicy, ModelPolicy, RunStats, add_model_args
from eval_agent.store import write_json
from eval_agent.tracking import find_run_dir, log_summary
from eval_agent.trajectory import Trajectory

log = logging.getLogger("eval")
CODE_VERSION = 1  # raise it when a change makes the stage give other results for the same settings


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


def model_of_label(args: argparse.Namespace) -> str:
    """The model `--label` names when --model is not given: base (--base_model, else the embedded SmolLM2),
    sft and steca (the run directory's models)."""
    run = RunDir(args.run_dir) if args.run_dir else None
    run_models = {"sft": run.sft_model, "steca": run.steca_model} if run else {}
    if args.label == "base":
        return args.base_model or str(default_model_dir())
    if args.label in run_models:
        return str(run_models[args.label])
    raise SystemExit(f"error: --label {args.label!r} names no model of the run: pass --model "
                     f"(labels with a default model: base, sft, steca with --run_dir)")


def resolve_output(args: argparse.Namespace) -> Path:
    """The output folder, and the model the label names when --model is not given."""
    args.label = args.label or ("expert" if args.policy == "expert" else "base")
    if args.policy == "expert" and args.label in LABELS:
        raise UserError(f"--label {args.label} names the run's {args.label} model, but --policy expert plays the "
                        "built-in expert: leave LABEL unset (its results go under expert/) or evaluate the model")
    if args.policy == "model" and args.label == "expert":
        raise UserError("--label expert names the built-in expert (--policy expert), not a model: label the model")
    if args.policy == "model" and not args.model:
        args.model = model_of_label(args)
    if args.out:
        return Path(args.out)
    if not args.run_dir:
        raise SystemExit("error: pass --run_dir (results go to RUN_DIR/eval/<label>/<split>/) or --out")
    return RunDir(args.run_dir).evaluation(args.label, args.split)


def build_policy(args: argparse.Namespace):
    if args.policy == "expert":
        return ExpertPolicy(), {}
    from eval_agent.llm import GenerationConfig

    policy = ModelPolicy.from_args(args, GenerationConfig(max_new_tokens=args.max_new_tokens,
                                                          temperature=args.temperature))
    return policy, {"chat_format": policy.chat_format.name}


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the stage's (docs/ lists them)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_family_arg(p)
    p.add_argument("--split", default="seen", help="train | seen | unseen, or several comma-separated "
                                                    "(seen,unseen): decoded together, each in its own folder")
    p.add_argument("--policy", choices=("model", "expert"), default="model")
    add_model_args(p)
    p.add_argument("--max_steps", type=count, default=MAX_STEPS)
    p.add_argument("--temperature", type=non_negative, default=0.0, help="0 = greedy, as the paper evaluates")
    p.add_argument("--data_root", help="task data folder (default: the task family's own lookup)")
    p.add_argument("--env_args", type=json.loads, default={},
                   help='JSON object of environment options, e.g. \'{"task_text": "original"}\' (ALFWorld)')
    p.add_argument("--limit", type=count, help="first N tasks of the split only (default: all)")
    p.add_argument("--concurrency", type=count, help="episodes in flight (default: 16 in-process, 1024 over HTTP)")
    p.add_argument("--run_dir", help="the run directory: results go to RUN_DIR/eval/<label>/<split>/")
    p.add_argument("--label", help="what is evaluated: base | sft | steca (the run's models) | any name with --model "
                                   "(default: expert for --policy expert, else base)")
    p.add_argument("--base_model", help="the model --label base names (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="the output folder (default: from --run_dir and --label)")
    p.add_argument("--overwrite", action="store_true",
                   help="rerun every task, whatever settings made the old results (moved aside as <out>.old)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The summary of the split; with several splits, {split: summary}."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs = [(a, resolve_output(a)) for a in per_split(args)]
    if args.policy == "model":
        check_policy_model(runs[0][0])
    with RunGuard({out: fingerprint_of(a) for a, out in runs}, folder=True, overwrite=args.overwrite):
        summaries = evaluate(runs)
    return summaries[runs[0][0].split] if len(runs) == 1 else summaries


def fingerprint_of(args: argparse.Namespace) -> dict[str, Any]:
    """The policy (the model's settings and identity, or the built-in expert), decoding, steps and tasks; the
    task limit only selects: each task's result file is the same whichever tasks are chosen."""
    settings = settings_of(args, drop=model_arg_names() | {"base_model", "data_root", "limit"})
    policy_settings, policy_inputs = policy_fingerprint(args) if args.policy == "model" else ({}, {})
    return fingerprint("eval", CODE_VERSION, {**settings, **policy_settings},
                       {"tasks": get_task_family(args.task_family).data_identity(args.split, args.data_root),
                        **policy_inputs}, selection={"limit": args.limit})


def evaluate(runs: list[tuple[argparse.Namespace, Path]]) -> dict[str, dict[str, Any]]:
    """Play the tasks of every (split, output folder) not done yet in one runner call; {split: summary}."""
    args = runs[0][0]
    family = get_task_family(args.task_family)
    tasks_of: dict[str, list[Task]] = {}
    out_of: dict[str, Path] = {}
    todo: list[Task] = []
    for a, out in runs:
        tasks = tasks_of[a.split] = family.load_tasks(a.split, data_root=a.data_root, limit=a.limit)
        out_of[a.split] = out
        missing = [t for t in tasks if not result_path(out, t.key).exists()]
        todo += missing
        log.info("%s/%s: %d tasks, %d already done, %d to run", a.task_family, a.split, len(tasks),
                 len(tasks) - len(missing), len(missing))

    policy, extra = build_policy(args)
    cards = {a.split: write_run_card(out, "eval", {**vars(a), **extra}) for a, out in runs}

    def save(ep: Episode) -> None:
        write_json(result_path(out_of[ep.task.split], ep.task.key), ep.traj.to_dict())

    try:
        make_env = partial(family.make_env, expert=args.policy == "expert", **args.env_args)
        stats = run_for_policy(todo, policy, make_env, save, max_steps=args.max_steps, concurrency=args.concurrency,
                               env_workers=args.env_workers)
    except BackendUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    return {a.split: write_summary(a, out, tasks_of[a.split], stats, cards[a.split]) for a, out in runs}


def write_summary(args: argparse.Namespace, out: Path, tasks: list[Task], stats: RunStats,
                  card: dict[str, Any]) -> dict[str, Any]:
    """The split's summary.json from the result files of its selected tasks (the run's counts are all splits')."""
    trajs = [Trajectory.from_dict(json.loads(result_path(out, t.key).read_text())) for t in tasks]
    for t, traj in zip(tasks, trajs):
        traj.meta.setdefault("task_type", t.meta.get("task_type", "unknown"))
    summary = {**summarize(args.task_family, args.split, trajs), "manifest": manifest(args.task_family, [t.key for t in tasks]),
               "run": asdict(stats), "run_card": card}
    write_json(out / EVAL_SUMMARY, summary)
    log_summary(find_run_dir(out), f"eval/{out.parent.name}/{out.name}", {k: v for k, v in summary.items()
                                                                         if k != "run_card"}, out)
    log.info(
        "%s/%s: success %.3f, avg reward %.3f, avg steps %.1f over %d tasks (%d episodes of the run in %.1fs)",
        args.task_family, args.split, summary["success_rate"], summary["avg_reward"], summary["avg_steps"],
        summary["num_tasks"], stats.episodes, stats.seconds,
    )
    return summary


if __name__ == "__main__":
    run_main(main)
