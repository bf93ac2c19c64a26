"""Calibration ability (the paper's §5.4, Figure 4): does a model get back on the expert's path after a deviated
step? Two probes:
- episode (the paper's): the model continues episodes from histories that already hold a deviated step, and from the
  same histories without it; how often it still succeeds after the deviation (it recovers) against how often it
  succeeds from the clean history;
- next_action: the model's next step after each deviated history, one greedy reply; it `returns` when that is the
  expert's action at the deviated step (the action the deviation replaced: what a calibrated trajectory, D_c,
  trains it to do), whether or not the environment still accepts it there (`returns_accepted`: it did). One
  step per history, so every model of a run is measured on the same histories in minutes on a CPU
  (PRESET=small).

Histories (the expert's steps 0..t-1, then the SFT policy's deviated step t, with the observations recorded
when they were played), by `--histories`:
- calibration_set (default for seen): the run's D_c rows (RUN_DIR/data_collection/calibration.jsonl), each with the
  explore step record it was built from (sampling/steps_explore.jsonl) and its expert trajectory: train tasks, as
  the paper's 100 samples from D_c (which it trains on: in-sample);
- step_accuracy (default for unseen): the split's expert trajectories and the SFT model's greedy step after each
  expert prefix, as eval.step_accuracy recorded them for label sft (RUN_DIR/eval/sft/<split>/step_accuracy/): a
  step where the SFT model took an action the environment accepted and that is not the expert's is a deviated
  step. Test tasks: held out from training. The paper builds its unseen set "the same way" on unseen scenarios;
  there are no Monte-Carlo rollouts of test tasks here, so the deviation is the detector's action criteria
  without its step-reward one.
A variant of the run (eval_agent/variants.py) plays its main run's histories, so that every model is measured on
the same ones. `--limit` histories (the paper: 100) are drawn at random with `--seed` from those available.

Episode probe: each history is played twice through the episode runner: its prefix replayed in the environment
with the deviated step (`deviated`) and without it (`clean`), then the model continues greedily to the end of the
episode; the budget (--max_steps) counts the replayed steps, as in sampling. Next-action probe: the prefix and the
deviated step replayed, then one model step. A replay whose observations are not the recorded ones, or that ends
the episode, is counted and not scored.

Outputs, in RUN_DIR/eval/<label>/<split>/calibration/ (next_action: calibration_next_action/; or --out):
    episodes.jsonl   one record per (history, condition): success, termination, the replay check, the episode;
                     next_action: one per history: the reply, valid, returns, repeats (the deviated action again)
    summary.json     success from the deviated and from the clean histories (k/n with Wilson 95% intervals),
                     the paired outcomes (next_action: returns, valid and repeats shares), skips, the history
                     sources; config.json (run card)

Resumable: episodes already written are kept; another --limit or --seed only selects (each episode is the same
whichever histories are chosen).

    python -m eval.calibration --task_family alfworld --split seen --label steca --run_dir outputs/alfworld --limit 100
    python -m eval.calibration --task_family virtualhome --split seen --label sft --run_dir outputs/virtualhome \\
        --probe next_action --histories step_accuracy
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from eval.evaluate import model_of_label
from eval.manifest import manifest
from eval.step_accuracy import judge, normalize_action, recording_envs
from eval_agent.cli import check_policy_model, count, run_main
from eval_agent.envs import Task, add_task_family_arg, get_task_family
from eval_agent.expert_data import load_expert_data
from eval_agent.guard import RunGuard, fingerprint, identity, model_arg_names, policy_fingerprint, settings_of
from eval_agent.layout import EVAL_SUMMARY, RunDir
from eval_agent.llm import BackendUnavailable, GenerationConfig
from eval_agent.parsing import parse_reply
from eval_agent.records import read_step_records, step_key, task_step_key
from eval_agent.run_card import write_run_card
from eval_agent.runner import MAX_STEPS, Episode, ModelPolicy, Policy, RunStats, add_model_args, run_episodes
from eval_agent.stats import format_share, wilson_interval
from eval_agent.store import BadRecord, JsonlStore, read_jsonl, write_json
from eval_agent.trajectory import Trajectory

log = logging.getLogger("eval.calibration")
CODE_VERSION = 1  # raise it when a change makes the stage give other results for the same settings
CONDITIONS = ("deviated", "clean")
HISTORY_POLICY = "sft"  # the deviations are the SFT policy's (the paper's base agent)
SPLITS = ("seen", "unseen")
PROBES = ("episode", "next_action")
HISTORIES = {"seen": "calibration_set", "unseen": "step_accuracy"}  # each split's default history source


def task_split(split: str, histories: str) -> str:
    """The split whose tasks the histories play: D_c's are train tasks, step accuracy's the split's own."""
    return "train" if histories == "calibration_set" else split


@dataclass
class History:
    key: str  # task_step_key(task_key, t)
    task_key: str
    t: int
    prefix: list[str]  # the expert's replies 0..t-1
    observations: list[str]  # what they got when they were played
    deviated: str  # the deviated reply at step t
    deviated_observation: str
    expert_action: str  # the expert's action at step t, which the deviation replaced


def sources(run: RunDir, split: str, histories: str) -> dict[str, Path]:
    """The files a split's histories are built from: the main run's, for a variant too (one set of histories for
    every model of the run)."""
    run = run.base or run
    if histories == "calibration_set":
        return {"calibration": run.data_collection / "calibration.jsonl", "steps_explore": run.steps("explore"),
                "expert_data": run.expert_data()}
    acc = run.step_accuracy(HISTORY_POLICY, split)
    return {"step_records": acc / "steps.jsonl", "expert_runs": acc / "expert.jsonl"}


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SystemExit(f"error: {path} missing: {what}")
    return path


def seen_histories(files: dict[str, Path]) -> list[History]:
    """D_c's deviated steps: the explore record each row was built from, with its expert's observations."""
    rows = list(read_jsonl(_need(files["calibration"], "run data collection first (the D_c rows)"),
                           required=("key", "task_key", "t")))
    records = {r.key: r for r in read_step_records(_need(files["steps_explore"], "run sampling first"))}
    experts = {t.meta["key"]: t for t in load_expert_data(_need(files["expert_data"], "run the expert-data stage"))}
    out = []
    for row in rows:
        key = step_key(row["task_key"], row["t"], "explore")
        rec = records.get(key)
        if rec is None or rec.step is None or rec.expert_key not in experts:
            raise SystemExit(f"error: {files['calibration']}: row {row['key']!r} has no explore record {key!r} with "
                             f"a step and an expert trajectory in {files['steps_explore']}: data collection and "
                             "sampling are of different runs")
        expert = experts[rec.expert_key]
        out.append(History(task_step_key(rec.task_key, rec.t), rec.task_key, rec.t, list(rec.prefix),
                           [s.observation for s in expert.steps[: rec.t]], rec.step["text"], rec.step["observation"],
                           expert.steps[rec.t].action))
    return out


def step_accuracy_histories(files: dict[str, Path]) -> list[History]:
    """The SFT model's accepted non-expert steps in its step-accuracy records of the split."""
    what = f"run eval.step_accuracy with label {HISTORY_POLICY} on the split first"
    experts = {r["key"]: Trajectory.from_dict({k: v for k, v in r.items() if k != "key"})
               for r in read_jsonl(_need(files["expert_runs"], what))}
    out = []
    for r in read_jsonl(_need(files["step_records"], what), required=("key", "task_key", "t", "skip", "valid",
                                                                       "match", "reply", "observation",
                                                                       "expert_action")):
        if r["skip"] is None and r["valid"] and not r["match"] and r["task_key"] in experts:
            steps = experts[r["task_key"]].steps[: r["t"]]
            out.append(History(r["key"], r["task_key"], r["t"], [s.text for s in steps], [s.observation for s in steps],
                               r["reply"], r["observation"], r["expert_action"]))
    return out


def select(histories: list[History], limit: int | None, seed: int) -> list[History]:
    """`limit` histories drawn at random with `seed` (all when there are no more), in key order."""
    histories = sorted(histories, key=lambda h: (h.task_key, h.t))
    if limit is not None and limit < len(histories):
        histories = sorted(random.Random(seed).sample(histories, limit), key=lambda h: (h.task_key, h.t))
    return histories


def record_key(h: History, condition: str) -> str:
    return h.key if condition == "next" else f"{h.key}|{condition}"


def episode_record(h: History, condition: str, ep: Episode) -> dict[str, Any]:
    """One episode from a history, with whether its replay gave the recorded observations."""
    expected = h.observations + ([h.deviated_observation] if condition == "deviated" else [])
    replayed = ep.traj.steps[: len(expected)]
    after, end = len(ep.traj.steps) - len(expected), ep.traj.termination
    skip = None
    if end == "env_error":
        skip = "env_error"
    elif [s.observation for s in replayed] != expected:
        skip = "replay_differs" if len(replayed) == len(expected) else "replay_ended"
    elif after == 0 and end in ("success", "done"):
        skip = "replay_ended"  # the history itself ended the episode: nothing was left to the model
    elif after == 0 and end == "max_steps":
        skip = "no_budget_left"  # the history used the whole budget
    slim = {k: ep.traj.meta[k] for k in ("key", "task_type", "error") if k in ep.traj.meta}
    return {"key": f"{h.key}|{condition}", "history": h.key, "task_key": h.task_key, "t": h.t,
            "condition": condition, "replayed": len(expected), "skip": skip, "success": ep.traj.success,
            "reward": ep.traj.reward, "termination": ep.traj.termination,
            "steps_after": after, "trajectory": {**ep.traj.to_dict(), "meta": slim}}


def replay_skip(h: History, ep: Episode, replayed: int) -> str | None:
    """Why the replay of `replayed` history steps cannot be scored (None: it gave the recorded observations and
    left the model a step)."""
    expected = (h.observations + [h.deviated_observation])[:replayed]
    steps = ep.traj.steps
    if ep.traj.termination == "env_error":
        return "env_error"
    if [s.observation for s in steps[:replayed]] != expected:
        return "replay_differs" if len(steps) >= replayed else "replay_ended"
    if len(steps) == replayed:
        return {"context_overflow": "context_overflow", "max_steps": "no_budget_left"}.get(ep.traj.termination,
                                                                                             "replay_ended")
    return None


def next_action_record(h: History, ep: Episode) -> dict[str, Any]:
    """The model's step after the deviated history: does it return to the expert's action at t?"""
    replayed = len(h.prefix) + 1
    record: dict[str, Any] = {"key": h.key, "history": h.key, "task_key": h.task_key, "t": h.t,
                              "expert_action": h.expert_action, "deviated": h.deviated,
                              "skip": replay_skip(h, ep, replayed), "reply": None, "action": None,
                              "observation": None, "valid": None, "returns": None, "returns_accepted": None,
                              "repeats": None}
    if record["skip"] is None:
        judged = judge(ep.traj.steps[replayed], h.expert_action, ep.env.valid)
        deviated_action = parse_reply(h.deviated).action
        # the expert's action may no longer be possible after the deviation (VirtualHome refuses to grab what the
        # agent walked away from): naming it is what D_c teaches, `returns_accepted` says when it also happened
        record.update({k: judged[k] for k in ("reply", "action", "observation", "valid")},
                      returns=judged["match"] or judged["refused_match"], returns_accepted=judged["match"],
                      repeats=judged["action"] is not None and deviated_action is not None
                      and normalize_action(judged["action"]) == normalize_action(deviated_action))
    return record


def share(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "share": k / n if n else None, "ci": wilson_interval(k, n) if n else None}


def summarize(histories: list[History], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Success from deviated and from clean histories, over the histories whose two replays were both exact."""
    pairs = [(records[f"{h.key}|deviated"], records[f"{h.key}|clean"]) for h in histories]
    scored = [(d, c) for d, c in pairs if d["skip"] is None and c["skip"] is None]
    paired = Counter(("recovered" if d["success"] else "lost") if c["success"] else
                     ("helped" if d["success"] else "neither") for d, c in scored)
    return {"histories": len(histories), "scored": len(scored),
            "deviated": share(sum(d["success"] for d, _ in scored), len(scored)),
            "clean": share(sum(c["success"] for _, c in scored), len(scored)),
            "paired": {k: paired.get(k, 0) for k in ("recovered", "lost", "helped", "neither")},
            "skipped": dict(Counter(r["skip"] for pair in pairs for r in pair if r["skip"]))}


def summarize_next(histories: list[History], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How often the model returns to the expert's action after a deviated history, over those scored."""
    picked = [records[h.key] for h in histories]
    scored = [r for r in picked if r["skip"] is None]
    return {"histories": len(histories), "scored": len(scored),
            **{name: share(sum(r[name] for r in scored), len(scored))
               for name in ("returns", "returns_accepted", "valid", "repeats")},
            "skipped": dict(Counter(r["skip"] for r in picked if r["skip"]))}


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the stage's (docs/eval.md lists them)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_family_arg(p)
    p.add_argument("--split", choices=SPLITS, default="seen",
                   help="the test split the run reports (seen: by default histories from D_c, train tasks; unseen: "
                        "from the SFT model's steps on the unseen split)")
    p.add_argument("--histories", choices=tuple(sorted(set(HISTORIES.values()))),
                   help="calibration_set: D_c's deviated steps (train tasks, in-sample); step_accuracy: the SFT model's "
                        "accepted non-expert steps on the split's tasks (held out); default: calibration_set for seen, "
                        "step_accuracy for unseen")
    p.add_argument("--probe", choices=PROBES, default="episode",
                   help="episode: success after the deviated and the clean history (the paper's); next_action: the "
                        "model's next step after the deviated history, returning to the expert's action or not")
    add_model_args(p)
    p.add_argument("--run_dir", required=True, help="the run whose histories are played; outputs go to "
                                                    "RUN_DIR/eval/<label>/<split>/calibration/")
    p.add_argument("--label", help="the model, as evaluation names it: base | sft | steca | any name with --model "
                                   "(default: base)")
    p.add_argument("--base_model", help="the model --label base names (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="output folder (default: from --run_dir, --label and --split)")
    p.add_argument("--limit", type=count, default=100, help="histories drawn at random (the paper: 100 for seen)")
    p.add_argument("--seed", type=int, default=0, help="the draw's seed")
    p.add_argument("--max_steps", type=count, default=MAX_STEPS, help="episode budget, the replayed history included")
    p.add_argument("--data_root", help="task data folder (default: the task family's own lookup)")
    p.add_argument("--env_args", type=json.loads, default={}, help="JSON object of environment options")
    p.add_argument("--concurrency", type=count, default=16, help="episodes advanced together")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh whatever settings made the old results (moved aside as <out>.old)")
    return p


def parse_args(argv: list[str] | None, scripted: bool = False) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.label = args.label or "base"
    args.histories = args.histories or HISTORIES[args.split]
    if not isinstance(args.env_args, dict):
        p.error("--env_args must be a JSON object")
    if not args.model and not scripted:
        args.model = model_of_label(args)
    return args


def output(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else RunDir(args.run_dir).calibration(args.label, args.split, args.probe)


def fingerprint_of(args: argparse.Namespace, scripted: bool = False) -> dict[str, Any]:
    """The model, decoding budget and environment, the tasks and the files the histories come from; the limit
    and seed only select."""
    settings = settings_of(args, drop=model_arg_names() | {"base_model", "data_root", "limit", "seed"})
    policy_settings, policy_inputs = policy_fingerprint(args) if not scripted else ({}, {})
    family = get_task_family(args.task_family)
    inputs = {"tasks": family.data_identity(task_split(args.split, args.histories), args.data_root), **policy_inputs,
              **{name: identity(path) for name, path in sources(RunDir(args.run_dir), args.split,
                                                                args.histories).items()}}
    return fingerprint("eval.calibration", CODE_VERSION, {**settings, **policy_settings}, inputs,
                       selection={"limit": args.limit, "seed": args.seed})


def main(argv: list[str] | None = None, policy: Policy | None = None) -> dict[str, Any]:
    """Run the stage; `policy` replaces the model policy of the arguments (tests script one)."""
    args = parse_args(argv, scripted=policy is not None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = output(args)
    if policy is None:
        check_policy_model(args)
    with RunGuard({out: fingerprint_of(args, scripted=policy is not None)}, folder=True, overwrite=args.overwrite):
        return play(args, out, policy)


def play(args: argparse.Namespace, out: Path, policy: Policy | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    family = get_task_family(args.task_family)
    files = sources(RunDir(args.run_dir), args.split, args.histories)
    split = task_split(args.split, args.histories)
    try:
        available = (seen_histories if args.histories == "calibration_set" else step_accuracy_histories)(files)
        tasks = {t.key: t for t in family.load_tasks(split, data_root=args.data_root)}
    except (BadRecord, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    missing = sorted({h.task_key for h in available} - set(tasks))
    if missing:
        raise SystemExit(f"error: the histories play tasks that {args.task_family}/{split} does not "
                         f"have (e.g. {missing[0]!r}): pass the --data_root the run used")
    histories = select(available, args.limit, args.seed)
    store = JsonlStore(out / "episodes.jsonl")
    conditions = CONDITIONS if args.probe == "episode" else ("next",)
    todo = [(h, c) for h in histories for c in conditions if record_key(h, c) not in store]
    log.info("%s %s: %d histories available, %d drawn, %d episodes to run", args.task_family, args.split,
             len(available), len(histories), len(todo))
    if not available:
        log.warning("no history to play (%s): the summary counts none", ", ".join(map(str, files.values())))

    extra: dict[str, Any] = {}
    if policy is None and todo:  # nothing to play: the model is not even loaded
        policy = ModelPolicy.from_args(args, GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0))
        extra["resolved_chat_format"] = policy.chat_format.name
    card = write_run_card(out, "eval.calibration", {**vars(args), **extra})
    waiting: dict[tuple[str, tuple[str, ...]], list[tuple[History, str]]] = {}
    episodes: list[tuple[Task, list[str]]] = []
    for h, c in todo:
        prefix = h.prefix + ([h.deviated] if c != "clean" else [])
        waiting.setdefault((h.task_key, tuple(prefix)), []).append((h, c))
        episodes.append((tasks[h.task_key], prefix))

    def save(ep: Episode) -> None:
        h, c = waiting[(ep.task.key, tuple(ep.prefix))].pop()
        store.append(next_action_record(h, ep) if c == "next" else episode_record(h, c, ep))

    try:
        if not todo:
            stats = RunStats()
        elif args.probe == "episode":
            stats = run_episodes(episodes, policy, partial(family.make_env, **args.env_args), save,
                                 max_steps=args.max_steps, concurrency=args.concurrency)
        else:  # one model step after each history, in environments that record whether it was accepted
            with recording_envs(family, args.env_args) as make_env:
                stats = run_episodes(episodes, policy, make_env, save, max_steps=max(len(p) for _, p in episodes) + 1,
                                     concurrency=args.concurrency, steps_after_prefix=1)
    except BackendUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    measured = (summarize if args.probe == "episode" else summarize_next)(histories, store.records)
    summary = {"env": args.task_family, "split": args.split, "label": args.label, "model": args.model,
               "probe": args.probe, "histories_from": args.histories, "available": len(available), **measured,
               "sources": {k: str(v) for k, v in files.items()},
               "manifest": manifest(args.task_family, [h.key for h in histories]), "run": asdict(stats),
               "seconds": round(time.perf_counter() - t0, 1), "run_card": card}
    write_json(out / EVAL_SUMMARY, summary)
    if args.probe == "episode":
        log.info("%s/%s (%s): success %s from deviated histories, %s from clean ones (%d histories, %d skipped) -> %s",
                 args.task_family, args.split, args.label, format_share(summary["deviated"]["k"], summary["scored"]),
                 format_share(summary["clean"]["k"], summary["scored"]), len(histories),
                 len(histories) - summary["scored"], out)
    else:
        log.info("%s/%s (%s): returns to the expert's action after %s deviated histories, valid %s (%d skipped) -> %s",
                 args.task_family, args.split, args.label, format_share(summary["returns"]["k"], summary["scored"]),
                 format_share(summary["valid"]["k"], summary["scored"]), len(histories) - summary["scored"], out)
    return summary


if __name__ == "__main__":
    run_main(main)
