"""Named variants of a run: the paper's ablations and baselines (Tables 1, 2, 3, 6, 7) as the variables each sets
and the first pipeline stage it reruns. Everything before that stage is shared with the main run (computed once);
the variant's own stages write into RUN_DIR/variants/<name>/, a run directory of its own (eval_agent/layout.py).

    VARIANT=wo_de,delta_0.05 bash scripts/run_pipeline.sh     # the main run, then each variant
    VARIANT=table6 ...                                          # a group: every variant of one table

To add a variant, add one `Variant(...)` to VARIANTS (and to a group if it belongs to a paper table): its name,
the row title, the table, the variables it sets (any stage variable of docs/) and the first stage they change.
A variant that sets a variable of an earlier stage than it says is refused by the pipeline before it runs
anything (the shared stage's fingerprint would differ from the main run's), never silently mixed.

    python -m eval_agent.variants names table1,wo_de      # the variants a VARIANT value names, one per line
    python -m eval_agent.variants env wo_de               # NAME=value lines, shell-quoted
    python -m eval_agent.variants init --run_dir RUN_DIR --name wo_de    # writes variant.json, prints the folder
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import asdict, dataclass, field

from eval_agent.cli import run_main
from eval_agent.layout import STAGES, VARIANT_FILE, RunDir
from eval_agent.store import write_json


@dataclass(frozen=True)
class Variant:
    name: str
    title: str  # the row in the paper's table
    table: str  # the paper's table ("Table 6")
    diverges_at: str  # the first pipeline stage it reruns; the stages before it are the main run's
    env: dict[str, str] = field(default_factory=dict)  # the stage variables it sets (docs/)
    what: str = ""  # what it changes, in one line (docs/variants.md)
    paper_method: str | None = None  # the paper's row it reproduces (eval/paper_results.py), where it has one

    @property
    def shares(self) -> list[str]:
        return list(STAGES[: STAGES.index(self.diverges_at)])


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    # Table 1: other training objectives on the data STeCa collected, and rejection-sampling fine-tuning
    Variant("rft", "RFT", "Table 1", "data_collection",
            {"TRAIN_SETS": "explored", "KEEP_THRESHOLD": "inf", "WEIGHTS": "uniform"},
            "the SFT model fine-tuned on its own successful explored trajectories only, every one kept, "
            "unweighted"),
    Variant("wo_rt", "STeCa w/o RT", "Table 1", "steca", {"WEIGHTS": "uniform"},
            "the same training set, every row weighing 1: plain NLL, no reward weighting (ALFWorld's weights are "
            "1 ± 0.01·nDTW, 1.000-1.007: nearly the main run; VirtualHome's 1 ± nDTW)", "STeCa w/o RT"),
    Variant("sft_dpo", "STeCa w/ SFT+DPO", "Table 1", "steca", {"BETA": "0.1"},
            "the same training set with the DPO term (beta 0.1) against the frozen SFT model on the rejected sides",
            "STeCa w/ SFT+DPO"),
    # Table 2: other backbones (ALFWorld in the paper); the expert data is the only stage they share
    Variant("mistral_7b", "Mistral-7B", "Table 2", "sft",
            {"BASE_MODEL": "mistralai/Mistral-7B-Instruct-v0.2", "CHAT_FORMAT": "template"},
            "the whole run from Mistral-7B-Instruct-v0.2 in its own chat template"),
    Variant("llama3_8b", "Llama-3-8B-Instruct", "Table 2", "sft",
            {"BASE_MODEL": "meta-llama/Meta-Llama-3-8B-Instruct", "CHAT_FORMAT": "template"},
            "the whole run from Llama-3-8B-Instruct in its own chat template"),
    # Table 3: who reflects, who gives the step rewards
    Variant("self_reflection", "Reflection by the SFT model itself", "Table 3", "data_collection",
            {"REFLECT_BACKEND": "self"}, "reflections written by the SFT model instead of GPT-4o",
            "STeCa, reflection by the agent itself"),
    Variant("llm_step_reward", "Step rewards by an LLM", "Table 3", "data_collection", {"STEP_REWARD": "llm"},
            "step rewards scored by the reflecting LLM (GPT-4o) instead of Monte-Carlo rollouts",
            "STeCa, step reward by GPT-4o"),
    # Table 6: training without one of the three sets
    Variant("wo_dc", "STeCa w/o D_c", "Table 6", "data_collection", {"TRAIN_SETS": "expert_sub,expert_full,explored"},
            "no calibrated trajectories (D_c) in the training set"),
    Variant("wo_de", "STeCa w/o D_e", "Table 6", "data_collection", {"TRAIN_SETS": "calibration,expert_sub,expert_full"},
            "no successful explored trajectories (D_e, the exploration loss) in the training set",
            "STeCa w/o exploration loss"),
    Variant("wo_ds", "STeCa w/o D_s", "Table 6", "data_collection", {"TRAIN_SETS": "calibration,explored"},
            "no expert sub-trajectories (D_s: expert_sub and expert_full) in the training set"),
    # Table 7: the deviation threshold (delta = 0 is the main run)
    Variant("delta_m0.01", "delta = -0.01", "Table 7", "data_collection", {"DELTA": "-0.01"},
            "deviated when r(explored t) <= r(expert t-1) - 0.01"),
    Variant("delta_0.05", "delta = 0.05", "Table 7", "data_collection", {"DELTA": "0.05"},
            "deviated when r(explored t) <= r(expert t-1) + 0.05"),
    Variant("delta_0.1", "delta = 0.1", "Table 7", "data_collection", {"DELTA": "0.1"},
            "deviated when r(explored t) <= r(expert t-1) + 0.1"),
)}
GROUPS: dict[str, list[str]] = {
    "table1": ["rft", "wo_rt", "sft_dpo"],
    "table2": ["mistral_7b", "llama3_8b"],
    "table3": ["self_reflection", "llm_step_reward"],
    "table6": ["wo_dc", "wo_de", "wo_ds"],
    "table7": ["delta_m0.01", "delta_0.05", "delta_0.1"],
    "demo": ["wo_de", "delta_0.05", "sft_dpo"],  # PRESET=tiny's demo: minutes on a CPU
}
GROUPS["all"] = [name for group in ("table1", "table2", "table3", "table6", "table7") for name in GROUPS[group]]


# Variables that change only how models are evaluated: a variant that trains its own model shares the main run's
# evaluations of the models it shares, so it must evaluate as the main run does (a variant of the evaluation
# alone diverges at "eval" and evaluates every model itself).
EVAL_ONLY = ("EVAL_LIMIT", "STEPS_PER_TASK")


def check(v: Variant) -> None:
    if v.diverges_at not in STAGES:
        raise ValueError(f"variant {v.name!r}: diverges_at {v.diverges_at!r} is no stage of {STAGES}")
    if v.diverges_at != "eval" and set(v.env) & set(EVAL_ONLY):
        raise ValueError(f"variant {v.name!r} sets {sorted(set(v.env) & set(EVAL_ONLY))}, which only change the "
                         f"evaluation: the evaluations it shares with the main run would be made otherwise")
    if not v.name or any(c in v.name for c in "/ ,="):
        raise ValueError(f"variant name {v.name!r}: no spaces, '/', ',' or '='")


def resolve(spec: str) -> list[Variant]:
    """The variants a VARIANT value names (names and groups, comma-separated), each once, in order."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        group = GROUPS.get(part, [part])
        for name in group:
            if name not in VARIANTS:
                raise SystemExit(f"error: VARIANT: no variant named {name!r}; variants: {', '.join(VARIANTS)}; "
                                 f"groups: {', '.join(GROUPS)} (eval_agent/variants.py, docs/variants.md)")
            if name not in names:
                names.append(name)
    return [VARIANTS[n] for n in names]


def init(run_dir: str, v: Variant) -> RunDir:
    """Write the variant's folder description below the main run; the layout reads it."""
    if RunDir(run_dir).base is not None:
        raise SystemExit(f"error: {run_dir} is itself a variant: a variant's base is a main run")
    folder = RunDir(run_dir).variant(v.name)
    write_json(folder / VARIANT_FILE, {"base": "../..", "shares": v.shares, **asdict(v)})
    return RunDir(folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("names", help="the variants a VARIANT value names").add_argument("spec")
    sub.add_parser("env", help="the variables a variant sets, NAME=value (shell-quoted)").add_argument("name")
    q = sub.add_parser("init", help="write RUN_DIR/variants/<name>/variant.json and print the folder")
    q.add_argument("--run_dir", required=True)
    q.add_argument("--name", required=True)
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.action == "names":
        print("\n".join(v.name for v in resolve(a.spec)))
    elif a.action == "env":
        (v,) = resolve(a.name)
        print("\n".join(f"{k}={shlex.quote(val)}" for k, val in v.env.items()))
    else:
        (v,) = resolve(a.name)
        print(init(a.run_dir, v).root)


for _v in VARIANTS.values():
    check(_v)

if __name__ == "__main__":
    run_main(main)
