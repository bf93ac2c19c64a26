"""Where the published inputs of the paper's run live, so that the `paper` preset trains, samples,
reflects and evaluates on what the original did: its expert SFT data, its instruction and its one-shot
example. `scripts/download_data.sh` puts them beside each task family's data (ALFWORLD_DATA, VH_DATA):

    <data root>/alfworld_sft.json         ALFWorld expert trajectories (IPR/ETO's, in data.zip)
    <data root>/alfworld_inst.txt         the instruction (typos kept: the SFT data carries them)
    <data root>/alfworld_icl.json         the one-shot example (= SFT trajectory alfworld_0)
    <data root>/virtualhome_sft.json      VirtualHome expert trajectories (data.zip, when it has them)
    <data root>/virtualhome_inst.txt, virtualhome_icl.json

    python -m eval_agent.published --task_family alfworld   # NAME=path lines for the stage variables

prints the stage variables the files fill in (EXPERT_SOURCE, INSTRUCTION_FROM, ICL_FROM) for those found;
scripts/presets.sh reads it for `PRESET=paper`, and a variable the user set is never replaced.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from eval_agent.cli import run_main
from eval_agent.envs import REGISTRY, get_task_family

# file name pattern -> the stage variable it fills in
FILES = {"{family}_sft.json": "EXPERT_SOURCE", "{family}_inst.txt": "INSTRUCTION_FROM", "{family}_icl.json": "ICL_FROM"}
# other names the VirtualHome SFT file has had (original-code.md 7.1)
ALIASES = {"virtualhome_sft.json": ("vh_sft.json", "new_train_sft.json")}


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Print NAME=path for the published files found for a task family.")
    p.add_argument("--task_family", choices=sorted(REGISTRY), required=True)
    p.add_argument("--data_root", help="default: the family's data folder ($ALFWORLD_DATA / $VH_DATA)")
    return p


def main(argv: list[str] | None = None) -> str:
    a = build_parser().parse_args(argv)
    text = "".join(f"{var}={shlex.quote(str(path))}\n" for var, path in published_files(a.task_family, a.data_root).items())
    print(text, end="")
    return text


if __name__ == "__main__":
    run_main(main)
