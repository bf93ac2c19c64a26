"""Step accuracy: on the expert trajectories of a test split, how often the model's greedy step, given the
expert's steps before it, is the expert's step, and how often the environment accepts it. Success needs a
whole episode right; one step at a time moves long before success does, so it shows what SFT and STeCa
training changed in a small model (docs/metrics.md).

1. The built-in expert plays every task of the split through the episode runner (ALFWorld: alfworld's
   handcoded expert; VirtualHome: the task's program), written as the training data writes expert
   trajectories (templated thoughts; ALFWorld's no-op look / inventory left out). Played once, kept.
2. For each chosen step t of a won expert run: replay expert steps 0..t-1 in the real environment, ask the
   model for one greedy reply (a one-step budget), and record
   - valid: the environment accepted the action (`StepResult.valid`);
   - match: the action is the expert's action at t (compared as `normalize_action` writes both: case,
     spacing, `_`) and valid; a named but refused one counts as `refused_match`, not as a match.
   A reply without `Action:` is none of these.
   Skipped and counted, never scored: the replay did not reproduce the expert's observations, the
   environment failed, or the prompt did not fit the model's context.

Several splits in one run (`--split seen,unseen`), each into its own folder: one model load, the expert of all
splits in one runner call, and all their model steps in another, so that the rows of both decode together.

Outputs, in RUN_DIR/eval/<label>/<split>/step_accuracy/ (or --out, one split's folder):
    expert.jsonl   one expert trajectory per task          steps.jsonl   one record per (task, t)
    summary.json   counts, shares and Wilson 95% intervals, overall and per task type; config.json (run card)

Resumable: expert runs and step records already written are kept and skipped; the summary is rebuilt from
the records of the selected tasks and steps. A rerun with other settings (model, split, prompt, ...) is
refused, naming the difference (another task limit or steps per task is no other setting: it selects);
--overwrite moves the old files aside and starts fresh.

    python -m eval.step_accuracy --task_family alfworld --split seen,unseen --run_dir outputs/alfworld --label sft \\
        --limit 3 --steps_per_task 4
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from eval.evaluate import model_of_label
from eval.manifest import manifest
from eval_agent.cli import check_policy_model, count, per_split, run_main
from eval_agent.envs import Env, StepResult, Task, add_task_family_arg, get_task_family
from eval_agent.expert_data import AS_TRAINING_DATA
from eval_agent.guard import RunGuard, fingerprint, model_arg_names, policy_fingerprint, settings_of
from eval_agent.layout import EVAL_SUMMARY, RunDir
from eval_agent.llm import BackendUnavailable, GenerationConfig
from eval_agent.records import task_step_key
from eval_agent.run_card import write_run_card
from eval_agent.runner import MAX_STEPS, Episode, ExpertPolicy, ModelPolicy, Policy, RunStats, add_model_args, run_episodes
from eval_agent.stats import format_share, wilson_interval
from eval_agent.store import BadRecord, JsonlStore, write_json
from eval_agent.trajectory import Step, Trajectory

log = logging.getLogger("eval.step_accuracy")

CODE_VERSION = 1  # raise it when a change makes the stage give other results for the same settings


def normalize_action(action: str) -> str:
    """How two action texts are compared: case-folded, `_` read as a space (VirtualHome takes both), runs of
    whitespace as one space. A match also needs the environment to accept the action (`step_record`)."""
    return " ".join(action.replace("_", " ").lower().split())


def chosen_steps(length: int, per_task: int | None) -> list[int]:
    """All steps of a `length`-step trajectory, or `per_task` of them evenly spaced from the first to the
    last (so a small budget still sees the end of a task, where its placing and heating steps are)."""
    if per_task is None or per_task >= length:
        return list(range(length))
    if per_task <= 1:
        return [0] if per_task == 1 else []
    return sorted({round(i * (length - 1) / (per_task - 1)) for i in range(per_task)})


class Recording:
    """An environment that keeps whether each step since the last reset was accepted (the trajectory keeps
    only what the agent saw), and outlives a runner call: `run_episodes` closes its environments when it
    returns, and a new ALFWorld engine costs about a second, so `close` gives it back to `pool` instead."""

    def __init__(self, env: Env, pool: list["Recording"]):
        self.env, self.pool, self.valid = env, pool, []
        self.name = env.name

    def reset(self, task: Task) -> str:
        self.valid = []
        return self.env.reset(task)

    def step(self, action: str) -> StepResult:
        result = self.env.step(action)
        self.valid.append(result.valid)
        return result

    def expert_action(self) -> str | None:
        return self.env.expert_action()

    def close(self) -> None:
        self.pool.append(self)


@contextmanager
def recording_envs(family: Any, env_args: dict[str, Any]) -> Iterator[Callable[[], Recording]]:
    """An environment factory for `run_episodes` whose environments record which steps were accepted, are
    reused across its calls, and are closed when the block ends."""
    pool: list[Recording] = []
    made: list[Recording] = []

    def make_env() -> Recording:
        if not pool:
            made.append(Recording(family.make_env(**env_args), pool))
            return made[-1]
        return pool.pop()

    try:
        yield make_env
    finally:
        for env in made:
            env.env.close()


def step_record(task: Task, expert: Trajectory, ep: Episode) -> dict[str, Any]:
    """The record of the model's step t = len(prefix) in `ep`, or why there is none."""
    t, steps = len(ep.prefix), ep.traj.steps
    record: dict[str, Any] = {
        "key": task_step_key(task.key, t), "task_key": task.key, "task_type": task.meta.get("task_type", "unknown"), "t": t,
        "length": len(expert.steps), "expert_action": expert.steps[t].action, "reply": None, "action": None,
        "observation": None, "match": None, "valid": None, "refused_match": None, "skip": None,
        "error": ep.traj.meta.get("error"),
    }
    replayed = [s.observation for s in steps[:t]]
    if replayed != [s.observation for s in expert.steps[:len(replayed)]]:
        record["skip"] = "replay_differs"  # the environment did not reproduce the expert's run
    elif len(steps) <= t:
        record["skip"] = {"context_overflow": "context_overflow", "env_error": "env_error"}.get(
            ep.traj.termination, "prefix_ended")
    elif ep.traj.termination == "env_error":
        record["skip"] = "env_error"
    else:
        record.update(judge(steps[t], record["expert_action"], ep.env.valid))
    return record


def judge(step: Step, expert_action: str, accepted: list[bool]) -> dict[str, Any]:
    """The model's step (the episode's last) against the expert's action: the reply, whether the environment
    accepted it (`valid`; `accepted`: the Recording environment's list, whose last entry is this step's when it had
    an action) and whether it was the expert's action (`match`). An action the environment refused did not happen,
    so it was not the expert's step, however it reads (ALFWorld refuses "Go to sofa 1", VirtualHome takes "walk to
    bedroom" for "Walk to bedroom"): that is a `refused_match`."""
    named = step.action is not None and normalize_action(step.action) == normalize_action(expert_action)
    valid = step.action is not None and accepted[-1]
    return {"reply": step.text, "action": step.action, "observation": step.observation, "match": named and valid,
            "valid": valid, "refused_match": named and not valid}


def counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Step accuracy and the valid-action share of scored records, as counts, shares and 95% intervals."""
    n = len(records)
    match, valid = sum(r["match"] for r in records), sum(r["valid"] for r in records)
    return {
        "steps": n, "match": match, "valid": valid, "no_action": sum(r["action"] is None for r in records),
        "refused_match": sum(r["refused_match"] for r in records),
        "step_accuracy": match / n if n else None, "step_accuracy_ci": wilson_interval(match, n) if n else None,
        "valid_share": valid / n if n else None, "valid_share_ci": wilson_interval(valid, n) if n else None,
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in records if r["skip"] is None]
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in scored:
        by_type[r["task_type"]].append(r)
    return {**counts(scored), "skipped": dict(Counter(r["skip"] for r in records if r["skip"])),
            "per_task_type": {k: counts(v) for k, v in sorted(by_type.items())}}


def open_store(path: Path) -> JsonlStore:
    try:
        return JsonlStore(path)
    except BadRecord as e:
        raise SystemExit(f"error: {e}; pass --overwrite to start fresh (the old files are moved aside)") from None


def fingerprint_of(args: argparse.Namespace) -> dict[str, Any]:
    """The model's settings and identity, the expert's budget, the tasks; the task limit and the steps per task
    only select: each record is the same whichever are chosen."""
    settings = settings_of(args, drop=model_arg_names() | {"base_model", "data_root", "limit", "steps_per_task"})
    policy_settings, policy_inputs = policy_fingerprint(args) if args.model else ({}, {})
    return fingerprint("eval.step_accuracy", CODE_VERSION, {**settings, **policy_settings},
                       {"tasks": get_task_family(args.task_family).data_identity(args.split, args.data_root),
                        **policy_inputs}, selection={"limit": args.limit, "steps_per_task": args.steps_per_task})


@dataclass
class Split:
    """One split of the run: its arguments, its folder, its tasks and step records, the expert's runs, and the
    (task, expert run, t) it scores."""
    args: argparse.Namespace
    out: Path
    tasks: list[Task]
    steps: JsonlStore
    experts: dict[str, Trajectory] = field(default_factory=dict)
    selected: list[tuple[Task, Trajectory, int]] = field(default_factory=list)


def play_expert(splits: dict[str, Split], args: argparse.Namespace) -> None:
    """The expert's run of every task, played once (all splits in one runner call) and kept in its split's
    expert.jsonl."""
    family = get_task_family(args.task_family)
    stores = {name: open_store(s.out / "expert.jsonl") for name, s in splits.items()}
    as_data = AS_TRAINING_DATA[args.task_family]
    todo = [t for name, s in splits.items() for t in s.tasks if t.key not in stores[name]]

    def keep(ep: Episode) -> None:  # a lost run is kept as it went (it is listed, never replayed)
        traj = as_data(ep.traj, ep.task.key) if ep.traj.success else ep.traj
        stores[ep.task.split].append({"key": ep.task.key, **traj.to_dict()})

    if todo:
        log.info("the expert plays %d of %d tasks", len(todo), sum(len(s.tasks) for s in splits.values()))
        run_episodes(todo, ExpertPolicy(), partial(family.make_env, expert=True, **args.env_args), keep,
                     max_steps=args.expert_max_steps, concurrency=args.concurrency, progress=False)
    for name, s in splits.items():
        for task in s.tasks:
            rec = {k: v for k, v in stores[name].records[task.key].items() if k != "key"}
            try:
                s.experts[task.key] = Trajectory.from_dict(rec)
            except (TypeError, ValueError) as e:
                raise SystemExit(f"error: {stores[name].path}: record {task.key!r} is not a trajectory ({e}); "
                                 "pass --overwrite to play the expert again") from None


def model_steps(todo: list[tuple[Task, Trajectory, int]], policy: Policy, make_env: Callable[[], Env],
                stores: dict[str, JsonlStore], concurrency: int) -> RunStats:
    """Expert prefix, then one model step, for every (task, t) of `todo`, all in one runner call, each record
    into the store of its task's split: the steps of a task are asked together (in `todo`'s order, task by
    task), and each prompt begins the next one's (the prefix cache's case)."""
    experts = {(task.split, task.key): expert for task, expert, _ in todo}  # a key may be in several splits
    bar = tqdm(total=len(todo), desc="model steps", unit="step")

    def save(ep: Episode) -> None:
        stores[ep.task.split].append(step_record(ep.task, experts[ep.task.split, ep.task.key], ep))
        bar.update(1)

    try:
        return run_episodes([(task, [s.text for s in expert.steps[:t]]) for task, expert, t in todo], policy,
                            make_env, save, max_steps=max(t for *_, t in todo) + 1, concurrency=concurrency,
                            progress=False, steps_after_prefix=1)
    finally:
        bar.close()


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the stage's (docs/eval.md lists them)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_family_arg(p)
    p.add_argument("--split", default="seen", help="seen | unseen (a test split; train works too), or several "
                                                    "comma-separated (seen,unseen): asked together, each in its own folder")
    add_model_args(p)
    p.add_argument("--run_dir", help="outputs go to RUN_DIR/eval/<label>/<split>/step_accuracy/")
    p.add_argument("--label", help="the model, as evaluation names it: base | sft | steca (the run's models) | any "
                                   "name with --model (default: base)")
    p.add_argument("--base_model", help="the model --label base names (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="output folder of one split (default: from --run_dir and --label)")
    p.add_argument("--limit", type=count, help="first N tasks of the split only (default: all)")
    p.add_argument("--steps_per_task", type=count, help="N steps of each expert trajectory, evenly spaced (default: all)")
    p.add_argument("--expert_max_steps", type=count, default=MAX_STEPS,
                   help="the expert's episode budget (not the evaluation's MAX_STEPS: a small budget there must not "
                        "cut the expert trajectories short)")
    p.add_argument("--data_root", help="task data folder (default: the task family's own lookup)")
    p.add_argument("--env_args", type=json.loads, default={}, help="JSON object of environment options")
    p.add_argument("--concurrency", type=count, default=16, help="episodes advanced together")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh whatever settings made the old results (moved aside as <out>.old)")
    return p


def parse_args(argv: list[str] | None, scripted: bool = False) -> argparse.Namespace:
    """The arguments, with the model the label names (none needed for a scripted policy)."""
    p = build_parser()
    args = p.parse_args(argv)
    args.label = args.label or "base"
    if args.out is None and not args.run_dir:
        p.error("give --run_dir (outputs go to RUN_DIR/eval/<label>/<split>/step_accuracy/) or --out")
    if not isinstance(args.env_args, dict):
        p.error("--env_args must be a JSON object")
    if not args.model and not scripted:
        args.model = model_of_label(args)
    return args


def main(argv: list[str] | None = None, policy: Policy | None = None) -> dict[str, Any]:
    """The summary of the split; with several splits, {split: summary}. `policy` replaces the model policy of the
    arguments (tests script one)."""
    args = parse_args(argv, scripted=policy is not None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs = [(a, Path(a.out) if a.out else RunDir(a.run_dir).step_accuracy(a.label, a.split)) for a in per_split(args)]
    if policy is None:
        check_policy_model(args)
    with RunGuard({out: fingerprint_of(a) for a, out in runs}, folder=True, overwrite=args.overwrite):
        summaries = measure(runs, policy)
    return summaries[runs[0][0].split] if len(runs) == 1 else summaries


def measure(runs: list[tuple[argparse.Namespace, Path]], policy: Policy | None) -> dict[str, dict[str, Any]]:
    """The selected steps of every (split, folder) not recorded yet, in one runner call; {split: summary}."""
    t0 = time.perf_counter()
    args = runs[0][0]
    family = get_task_family(args.task_family)
    try:
        splits = {a.split: Split(a, out, family.load_tasks(a.split, data_root=a.data_root, limit=a.limit),
                                 open_store(out / "steps.jsonl")) for a, out in runs}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    play_expert(splits, args)
    todo: list[tuple[Task, Trajectory, int]] = []
    for s in splits.values():
        won = [t for t in s.tasks if s.experts[t.key].success]
        s.selected = [(t, s.experts[t.key], i) for t in won
                      for i in chosen_steps(len(s.experts[t.key].steps), args.steps_per_task)]
        missing = [x for x in s.selected if task_step_key(x[0].key, x[2]) not in s.steps]
        todo += missing
        log.info("%s/%s: %d tasks (%d won by the expert), %d steps selected, %d done before, %d to run",
                 args.task_family, s.args.split, len(s.tasks), len(won), len(s.selected),
                 len(s.selected) - len(missing), len(missing))

    extra: dict[str, Any] = {}
    if policy is None and todo:  # nothing to ask: the model is not even loaded
        policy = ModelPolicy.from_args(args, GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0))
        extra["resolved_chat_format"] = policy.chat_format.name
    cards = {name: write_run_card(s.out, "eval.step_accuracy", {**vars(s.args), **extra}) for name, s in splits.items()}
    try:
        with recording_envs(family, args.env_args) as make_env:
            stats = (model_steps(todo, policy, make_env, {name: s.steps for name, s in splits.items()},
                                 args.concurrency) if todo else RunStats())
    except BackendUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    seconds = round(time.perf_counter() - t0, 1)
    return {name: write_summary(s, stats, seconds, cards[name]) for name, s in splits.items()}


def write_summary(s: Split, stats: RunStats, seconds: float, card: dict[str, Any]) -> dict[str, Any]:
    """The split's summary.json from the records of its selected steps (the run's counts and seconds are all
    splits')."""
    args = s.args
    records = [s.steps.records[task_step_key(t.key, i)] for t, _, i in s.selected]
    won = sum(e.success for e in s.experts.values())
    summary = {"env": args.task_family, "split": args.split, "label": args.label, "model": args.model,
               "tasks": len(s.tasks), "expert_won": won,
               "expert_failed": [t.key for t in s.tasks if not s.experts[t.key].success],
               **summarize(records), "manifest": manifest(args.task_family, [t.key for t in s.tasks]),
               "run": asdict(stats), "seconds": seconds, "run_card": card}
    write_json(s.out / EVAL_SUMMARY, summary)
    log.info("%s/%s%s: step accuracy %s, valid actions %s over %d steps (%d skipped) of %d tasks -> %s",
             args.task_family, args.split, f" ({args.label})" if args.label else "",
             format_share(summary["match"], summary["steps"]), format_share(summary["valid"], summary["steps"]),
             summary["steps"], sum(summary["skipped"].values()), won, s.out)
    return summary


if __name__ == "__main__":
    run_main(main)
