"""Where the published inputs of the paper's run live, so that the `paper` preset trains, samples,
reflects and evaluates on what the original did: its expert SFT data, its instruction and its one-shot
example. `scripts/download_data.sh` puts them beside each task family's data (ALFWORLD_DATA, VH_DATA):

    <data root>/alfworld_sft.json         ALFWorld expert trajectories (IPR/ETO's, in data.zip)
    <data root>/alfworld_inst.txt         the instruction (typos kept: the SFT data carries them)
    <data root>/alfworld_icl.json         the one-shot example (= SFT trajectory alfworld_0)
    <data root>/virtualhome_sft.json      VirtualHome expert trajectories (also named vh_sft.json, new_train_sft.json)
    <data root>/new_train_conversation.jsonl  VirtualHome training tasks, each with its expert conversation
    <data root>/virtualhome_inst.txt, virtualhome_icl.json

    python -m eval_agent.published --task_family alfworld   # NAME=path lines for the stage variables
    python -m eval_agent.published --task_family virtualhome --check_training   # the training data, counted

prints the stage variables the files fill in (EXPERT_SOURCE, INSTRUCTION_FROM, ICL_FROM) for those found;
scripts/presets.sh reads it for `PRESET=paper`, and a variable the user set is never replaced. The instruction
and example every stage prompts with are decided from the same files (eval_agent.prompts.prompt_files), and
`training_data` says which training data a family's stages will use, published or generated.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from eval_agent.cli import run_main
from eval_agent.envs import REGISTRY, get_task_family

# file name pattern -> the stage variable it fills in
FILES = {"{family}_sft.json": "EXPERT_SOURCE", "{family}_inst.txt": "INSTRUCTION_FROM", "{family}_icl.json": "ICL_FROM"}
# other names the VirtualHome SFT file has had (original-code.md 2.7, 7.1); last, the training tasks' own
# conversations (new_train_conversation.jsonl), the SFT data when no SFT file came with them
ALIASES = {"virtualhome_sft.json": ("vh_sft.json", "new_train_sft.json", "new_train_conversation.jsonl")}
# the published VirtualHome training set: 4,920 tasks (paper, Table 4)
VH_TRAIN_TASKS = 4920


def data_root(task_family: str) -> Path | None:
    """The family's data folder as the stages look it up ($ALFWORLD_DATA / $VH_DATA, else the generated set)."""
    try:
        return get_task_family(task_family).find_data_root()
    except FileNotFoundError:
        return None


def published_files(task_family: str, root: str | Path | None = None) -> dict[str, Path]:
    """Stage variable -> the published file found for it (only those found)."""
    folder = Path(root) if root else data_root(task_family)
    found: dict[str, Path] = {}
    if folder is None:
        return found
    for pattern, var in FILES.items():
        name = pattern.format(family=task_family)
        for candidate in (name, *ALIASES.get(name, ())):
            if (folder / candidate).is_file():
                found[var] = folder / candidate
                break
    if "EXPERT_SOURCE" in found:  # the SFT rows carry the instruction; the first one is ALFWorld's example
        for var in ("INSTRUCTION_FROM", "ICL_FROM"):
            found.setdefault(var, found["EXPERT_SOURCE"])
    return found


@dataclass(frozen=True)
class TrainingData:
    """Which training data a family's stages will use: `published` (the paper's training tasks and expert
    trajectories) or `generated` (this repository's), and where from."""

    kind: str            # published | generated
    tasks: Path          # the training tasks: VirtualHome's task file, ALFWorld's games folder
    expert: Path | None  # the file the expert-data stage imports; None: alfworld's handcoded expert plays the games
    why: str             # one line for messages: what the data is and, when generated, what is missing


def training_data(task_family: str, data_root: str | Path | None = None,
                  expert_source: str | Path | None = None) -> TrainingData:
    """The training data as the stages look it up (`expert_source`: EXPERT_SOURCE, an expert file named by the
    user or the paper preset, which the expert-data stage imports). Raises FileNotFoundError without data."""
    if task_family == "alfworld":
        from eval_agent.envs import alfworld

        root = alfworld.find_data_root(data_root)
        tasks, expert = root / "json_2.1.1" / "train", Path(expert_source) if expert_source else None
        if root.resolve() == (alfworld.REPO / "data" / "alfworld").resolve():
            return TrainingData("generated", tasks, expert, f"the generated games in {root} (ALFWORLD_DATA is not set)")
        if expert is None:
            return TrainingData("generated", tasks, None, f"the games in {root} played by alfworld's handcoded expert "
                                "(templated thoughts): EXPERT_SOURCE names no expert file (alfworld_sft.json)")
        return TrainingData("published", tasks, expert, f"the games in {root}, expert trajectories {expert}")
    if task_family != "virtualhome":
        raise ValueError(f"unknown task family {task_family!r}; choose from {sorted(REGISTRY)}")
    from eval_agent.envs import virtualhome

    root = virtualhome.find_data_root(data_root)
    tasks = virtualhome.train_task_file(root)
    if tasks.name != virtualhome.PUBLISHED_TRAIN:
        expert = Path(expert_source) if expert_source else tasks.parent / "vh_train_trajectories.jsonl"
        missing = ("" if root.resolve() == virtualhome.GENERATED.resolve()
                   else f": {root} has no {virtualhome.PUBLISHED_TRAIN} (the published training tasks)")
        return TrainingData("generated", tasks, expert, f"the generated training tasks {tasks}{missing}")
    expert = Path(expert_source) if expert_source else published_files(task_family, root)["EXPERT_SOURCE"]
    return TrainingData("published", tasks, expert, f"the published training tasks {tasks}, expert trajectories {expert}")


def training_counts(task_family: str, data: TrainingData) -> dict[str, int]:
    """What the training data holds, every row parsed: tasks (VirtualHome: and those with a scene graph, which
    the stages run), expert trajectories, and how many of those are of a training task."""
    from eval_agent.expert_data import load_expert_data, task_of, task_tail

    family = get_task_family(task_family)
    if task_family == "virtualhome":
        from eval_agent.envs import virtualhome

        found, missing = virtualhome.read_split("train", data.tasks.parent)
        counts = {"tasks": len(found) + len(missing), "with_scene_graph": len(found)}
    else:
        found = family.load_tasks("train", data_root=data.tasks.parents[1])
        counts = {"tasks": len(found)}
    if data.expert is not None:
        trajs = load_expert_data(data.expert)
        by_tail = {task_tail(t.key): t for t in found}
        counts.update(expert_trajectories=len(trajs), of_a_task=sum(task_of(t, by_tail) is not None for t in trajs))
    return counts


def check_training(task_family: str, data_root: str | Path | None = None, expected: int | None = None) -> tuple[bool, str]:
    """(ok, one line as scripts/download_data.sh prints its checks). Generated data is reported, not a failure
    (the download may not have the training files; PRESET=paper's pre-flight decides); published data must have
    `expected` tasks and expert trajectories of them."""
    data = training_data(task_family, data_root)
    if data.kind == "generated":
        return True, f"--   {task_family} training data: generated: {data.why}"
    counts = training_counts(task_family, data)
    text = ", ".join(f"{k} {v}" for k, v in counts.items())
    ok = counts["tasks"] >= (expected or 0) and counts.get("of_a_task", 1) > 0
    want = f" (expected {expected} tasks)" if expected else ""
    return ok, f"{'ok  ' if ok else 'BAD '} {task_family} training data: published: {text}{want}; {data.why}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Print NAME=path for the published files found for a task family.")
    p.add_argument("--task_family", choices=sorted(REGISTRY), required=True)
    p.add_argument("--data_root", help="default: the family's data folder ($ALFWORLD_DATA / $VH_DATA)")
    p.add_argument("--check_training", action="store_true",
                   help="instead: the training data the stages will use, counted (exit 1 when published data is short)")
    return p


def main(argv: list[str] | None = None) -> str:
    a = build_parser().parse_args(argv)
    if a.check_training:
        expected = VH_TRAIN_TASKS if a.task_family == "virtualhome" else None
        try:
            ok, text = check_training(a.task_family, a.data_root, expected)
        except (OSError, ValueError) as e:  # also BadRecord: named by file, line and field
            ok, text = False, f"BAD  {a.task_family} training data: {e}"
        print(text)
        if not ok:
            sys.exit(1)
        return text
    text = "".join(f"{var}={shlex.quote(str(path))}\n" for var, path in published_files(a.task_family, a.data_root).items())
    print(text, end="")
    return text


if __name__ == "__main__":
    run_main(main)
