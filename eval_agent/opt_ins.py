"""What a run opted into that makes its numbers not the paper's, recorded where a reader of a table meets it.

`PRESET=paper` refuses these in the pre-flight unless the user opts in by name (eval_agent/preflight.py):
- training on this repository's generated data (`ALLOW_GENERATED_DATA=1`): the expert trajectories SFT learns
  from, or the training tasks sampling and MC play, are not the published ones;
- reflection, or LLM step rewards, by the SFT model itself (`REFLECT_BACKEND=self`): the paper's Table 3 rows,
  not its STeCa.

Every training stage's run card (`run_card.json` in its model folder, eval_agent/run_card.py) and data
collection's record them under `opt_ins` ({label: what it means}), from the settings the stage ran with; the
report reads the cards of the stages that made a model and puts the labels after the row name:
`STeCa (ours) [self-reflection, generated data]`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from eval_agent.layout import RUN_CARD, TRAINING_CARD, RunDir

REPO = Path(__file__).resolve().parent.parent
GENERATED_DATA = "generated data"
SELF_REFLECTION = "self-reflection"
SELF_SCORED = "step rewards by itself"
# The stages that read training data, and so record whether it is generated.
TRAINING_STAGES = ("sft.make_expert_data", "sft", "sampling.generate_steps", "sampling.mc_rollouts",
                   "data_collection.build")
SETS_NEEDING_REFLECTION = ("calibration",)  # data_collection's D_c: a reflective thought per row


def _generated_root(task_family: str) -> Path:
    return (REPO / "data" / task_family).resolve()


def _is_generated(path: str | Path, task_family: str) -> bool:
    """A file or folder of the set scripts/setup.sh generates in data/<family>."""
    resolved = Path(path).resolve()
    return resolved == _generated_root(task_family) or _generated_root(task_family) in resolved.parents


def expert_source(env: Mapping[str, str], run_dir: str | Path | None = None) -> str | None:
    """The expert file a run trains on: EXPERT_DATA (read as is by every stage), else what the run's expert-data
    stage imported (its run card), else EXPERT_SOURCE; None: the stage generates the trajectories."""
    if env.get("EXPERT_DATA"):
        return env["EXPERT_DATA"]
    if run_dir is not None:
        card = RunDir(run_dir).expert_data("train").parent / RUN_CARD
        if card.is_file():
            return (json.loads(card.read_text()).get("args") or {}).get("source")
    return env.get("EXPERT_SOURCE") or None


def generated_training_data(task_family: str, env: Mapping[str, str], data_root: str | None = None,
                            run_dir: str | Path | None = None) -> dict[str, str]:
    """{"tasks" | "expert": what is this repository's generated set, in words}: the training tasks sampling and MC
    play, the expert trajectories SFT learns from (empty: both are the published data).

    Read from the data roots and the expert file the stages would use (eval_agent/published.py fills EXPERT_SOURCE
    in for PRESET=paper): the one place that says which training data a family uses."""
    from eval_agent.envs import alfworld, virtualhome

    found = {}
    expert = expert_source(env, run_dir)
    if task_family == "alfworld":
        root = data_root or alfworld.user_data_root(env.get("ALFWORLD_DATA")) or _generated_root("alfworld")
        if _is_generated(root, "alfworld"):
            found["tasks"] = "alfworld: the training games are the generated ones (data/alfworld)"
        if expert is None:
            found["expert"] = ("alfworld: SFT trains on alfworld's handcoded expert with templated thoughts, not on the "
                               "published alfworld_sft.json")
    else:
        root = Path(data_root or env.get("VH_DATA") or virtualhome.GENERATED)
        try:
            tasks: Path | None = virtualhome.task_file("train", root)
        except FileNotFoundError:
            tasks = None
        if tasks is None or _is_generated(tasks, "virtualhome"):
            found["tasks"] = ("virtualhome: sampling and MC play the generated scene-1 training tasks (data/virtualhome), "
                              "not the published training set")
        if expert is None or _is_generated(expert, "virtualhome"):
            found["expert"] = ("virtualhome: SFT trains on the generated trajectories, not on the published "
                               "virtualhome_sft.json")
    return found


def reflection_is_chat(env: Mapping[str, str], backend: str | None = None) -> bool:
    """Whether reflection (and LLM step rewards) go to a chat endpoint: REFLECT_BACKEND=chat, or auto with a key
    (data_collection.reflection.reflect_backend resolves auto the same way)."""
    backend = backend or env.get("REFLECT_BACKEND") or "auto"
    return backend == "chat" or (backend == "auto" and bool(env.get("REFLECT_API_KEY") or env.get("OPENAI_API_KEY")))


def asks_reflecting_model(env: Mapping[str, str]) -> list[str]:
    """What data collection asks the reflecting model for with these settings: reflections (D_c in TRAIN_SETS),
    step rewards (STEP_REWARD=llm)."""
    sets = env.get("TRAIN_SETS") or ",".join(SETS_NEEDING_REFLECTION)
    asks = ["reflections"] if any(s in sets.split(",") for s in SETS_NEEDING_REFLECTION) else []
    return asks + (["step rewards"] if env.get("STEP_REWARD") == "llm" else [])


def card_opt_ins(stage: str, args: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """{label: what it means} for one stage's run card, from its arguments and the environment it ran in."""
    env = os.environ if env is None else env
    family = args.get("task_family")
    if stage not in TRAINING_STAGES or family not in ("alfworld", "virtualhome"):
        return {}
    out, run_dir = {}, args.get("run_dir")
    if stage == "sft.make_expert_data":  # the stage that imports the expert file (or generates the trajectories)
        env, run_dir = {**env, "EXPERT_DATA": args.get("source") or "", "EXPERT_SOURCE": ""}, None
    generated = generated_training_data(family, env, args.get("data_root"), run_dir)
    if generated:
        out[GENERATED_DATA] = "; ".join(generated.values())
    if stage == "data_collection.build" and not reflection_is_chat(env, args.get("reflect_backend")):
        if "calibration" in (args.get("train_sets") or ()):
            out[SELF_REFLECTION] = "the calibrated trajectories' reflective thoughts were written by the SFT model " \
                                   "itself, not by GPT-4o (the paper's Table 3 row)"
        if args.get("step_reward") == "llm":
            out[SELF_SCORED] = "step rewards scored by the SFT model itself, not by GPT-4o"
    return out


# ---- the report's side -------------------------------------------------------------------------------------

def _cards(run: RunDir, label: str) -> list[Path]:
    """The run cards of the stages that made the model `label` names (none for the base model or the expert)."""
    if label == "sft":
        return [run.sft_model / TRAINING_CARD]
    if label == "steca":
        return [run.sft_model / TRAINING_CARD, run.data_collection / RUN_CARD, run.steca_model / TRAINING_CARD]
    return []


def run_of_summary(summary: str | Path) -> RunDir | None:
    """The run directory of RUN_DIR/eval/<label>/<split>/summary.json (None for a summary elsewhere)."""
    path = Path(summary)
    return RunDir(path.parents[3]) if len(path.parents) > 3 and path.parents[2].name == "eval" else None


def run_opt_ins(run: RunDir, label: str) -> list[str]:
    """The opt-in labels of the model `label` names in `run`, from the run cards of the stages that made it."""
    found: list[str] = []
    for card in _cards(run, label):
        if card.is_file():
            found += [k for k in json.loads(card.read_text()).get("opt_ins") or {} if k not in found]
    return found


def model_opt_ins(summaries: Iterable[str | Path], label: str) -> list[str]:
    """The opt-in labels of the model `label` names, over the runs of the given evaluation summaries, in order."""
    found: list[str] = []
    for summary in summaries:
        run = run_of_summary(summary)
        found += [k for k in (run_opt_ins(run, label) if run else []) if k not in found]
    return found


def row_name(method: str, labels: list[str]) -> str:
    """`STeCa (ours)` -> `STeCa (ours) [self-reflection, generated data]`."""
    return f"{method} [{', '.join(labels)}]" if labels else method
