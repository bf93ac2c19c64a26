"""Paired comparison of a run's models on the items they share: calibration ability, step accuracy, valid actions
and success, each as k/n with its Wilson 95% interval, and the differences SFT - base, STeCa - SFT and STeCa - each
variant's STeCa (w/o D_c, ...) with Newcombe's paired 95% interval (eval_agent/stats.py). Every model is scored on
the same items, so a difference is measured item by item, not between two separate samples:
- calibration ability: the held-out deviated histories of eval.calibration's next-action probe (does the model's
  next step return to the expert's action the deviation replaced?);
- step accuracy and valid actions: the expert's steps of the test tasks (eval.step_accuracy);
- success: the test tasks (eval.evaluate).
The items of a metric are those every model measured on it has a scored record of, pooled over the test splits
(the per-split counts are in the JSON); a model without records of a metric is left out of that column.

    python -m eval.compare --run virtualhome=outputs/pipeline-small/virtualhome --out outputs/pipeline-small/report

eval.report adds the same section to report.md / report.json and its sentences to the plain-language reading.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from eval_agent.cli import run_main
from eval_agent.layout import VARIANT_FILE, RunDir
from eval_agent.stats import format_share, paired_difference_interval, wilson_interval
from eval_agent.store import BadRecord, read_jsonl, write_atomic, write_json

SPLITS = ("seen", "unseen")
Items = dict[str, bool]  # item key -> outcome


def calibration_items(run: RunDir, label: str, split: str) -> Items | None:
    path = run.calibration(label, split, "next_action") / "episodes.jsonl"
    if not path.is_file():
        return None
    return {r["key"]: bool(r["returns"]) for r in read_jsonl(path, required=("key", "skip", "returns"))
            if r["skip"] is None}


def step_items(field: str) -> Callable[[RunDir, str, str], Items | None]:
    def read(run: RunDir, label: str, split: str) -> Items | None:
        path = run.step_accuracy(label, split) / "steps.jsonl"
        if not path.is_file():
            return None
        return {r["key"]: bool(r[field]) for r in read_jsonl(path, required=("key", "skip", field))
                if r["skip"] is None}
    return read


def success_items(run: RunDir, label: str, split: str) -> Items | None:
    folder = run.evaluation(label, split) / "tasks"
    if not folder.is_dir():
        return None
    items = {}
    for path in sorted(folder.glob("*.json")):
        try:
            items[path.stem] = bool(json.loads(path.read_text())["success"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BadRecord(f"{path}: not an episode result with a field 'success' ({e})") from None
    return items


@dataclass(frozen=True)
class Metric:
    name: str
    title: str
    items: Callable[[RunDir, str, str], Items | None]
    what: str  # what one item is, for the reading


METRICS = (
    Metric("calibration", "calibration ability", calibration_items, "held-out deviated histories"),
    Metric("step_accuracy", "step accuracy", step_items("match"), "expert steps"),
    Metric("valid", "valid actions", step_items("valid"), "expert steps"),
    Metric("success", "success", success_items, "test tasks"),
)


@dataclass(frozen=True)
class Model:
    name: str
    run: RunDir
    label: str


def models_of(run_dir: str | Path) -> list[Model]:
    """The run's base, SFT and STeCa models, then each variant's own STeCa model (RUN_DIR/variants/<name>/)."""
    run = RunDir(run_dir)
    models = [Model(name, run, label) for label, name in (("base", "Base"), ("sft", "SFT"), ("steca", "STeCa"))]
    for spec in sorted(run.variants.glob(f"*/{VARIANT_FILE}")):
        variant = RunDir(spec.parent)
        if "steca" in variant.eval_labels:
            models.append(Model(json.loads(spec.read_text()).get("title", spec.parent.name), variant, "steca"))
    return models


def pairs_of(models: list[Model]) -> list[tuple[Model, Model]]:
    """(first, second) for the differences first - second: SFT - base, STeCa - SFT, STeCa - each variant."""
    by_name = {m.name: m for m in models}
    pairs = [(by_name[a], by_name[b]) for a, b in (("SFT", "Base"), ("STeCa", "SFT")) if a in by_name and b in by_name]
    return pairs + [(by_name["STeCa"], m) for m in models[3:] if "STeCa" in by_name]


@dataclass
class Difference:
    metric: str
    first: str
    second: str
    cells: tuple[int, int, int, int]  # items right for both, the first only, the second only, neither
    difference: float
    ci: tuple[float, float]

    @property
    def excludes_zero(self) -> bool:
        return self.ci[0] > 0 or self.ci[1] < 0

    def text(self) -> str:
        return f"{self.difference:+.2f} [{self.ci[0]:+.2f}, {self.ci[1]:+.2f}]"


@dataclass
class Comparison:
    env: str
    models: list[str]
    shares: dict[str, dict[str, tuple[int, int]]]  # metric -> model -> (k, n) on the shared items
    per_split: dict[str, dict[str, dict[str, tuple[int, int]]]]  # split -> metric -> model -> (k, n)
    differences: list[Difference]


def paired(first: Items, second: Items, keys: list[str]) -> tuple[int, int, int, int]:
    a = sum(first[k] and second[k] for k in keys)
    b = sum(first[k] and not second[k] for k in keys)
    c = sum(second[k] and not first[k] for k in keys)
    return a, b, c, len(keys) - a - b - c


def compare(env: str, run_dir: str | Path) -> Comparison:
    """Every metric of every model of the run on the items all of them measured, and the paired differences."""
    models = models_of(run_dir)
    shares: dict[str, dict[str, tuple[int, int]]] = {}
    per_split: dict[str, dict[str, dict[str, tuple[int, int]]]] = {s: {} for s in SPLITS}
    differences = []
    for metric in METRICS:
        outcomes: dict[str, Items] = {}
        split_keys: dict[str, set[str]] = {}
        for m in models:
            pooled: Items = {}
            for split in SPLITS:
                items = metric.items(m.run, m.label, split)
                pooled.update({f"{split}|{k}": v for k, v in (items or {}).items()})
            if pooled:
                outcomes[m.name] = pooled
        if not outcomes:
            continue
        keys = sorted(set.intersection(*(set(o) for o in outcomes.values())))
        shares[metric.name] = {name: (sum(o[k] for k in keys), len(keys)) for name, o in outcomes.items()}
        for split in SPLITS:
            split_keys[split] = {k for k in keys if k.startswith(f"{split}|")}
            per_split[split][metric.name] = {name: (sum(o[k] for k in split_keys[split]), len(split_keys[split]))
                                             for name, o in outcomes.items()}
        for first, second in pairs_of(models):
            if keys and first.name in outcomes and second.name in outcomes:
                cells = paired(outcomes[first.name], outcomes[second.name], keys)
                differences.append(Difference(metric.name, first.name, second.name, cells, (cells[1] - cells[2]) / len(keys),
                                              paired_difference_interval(*cells)))
    return Comparison(env, [m.name for m in models], shares, per_split, differences)


def share_text(k: int, n: int) -> str:
    return format_share(k, n) if n else "–"


def to_markdown(comparisons: list[Comparison]) -> str:
    """Per environment: the models side by side, then the paired differences (bold: the interval excludes 0)."""
    out = []
    for c in comparisons:
        metrics = [m for m in METRICS if m.name in c.shares]
        if not metrics:
            continue
        out += [f"### Paired comparison, {c.env}: the models on the same items", "",
                "| model | " + " | ".join(m.title for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for name in c.models:
            out.append(f"| {name} | " + " | ".join(share_text(*c.shares[m.name][name]) if name in c.shares[m.name]
                                                  else "–" for m in metrics) + " |")
        out += ["", "| difference (paired 95% interval) | " + " | ".join(m.title for m in metrics) + " |",
                "|---" * (len(metrics) + 1) + "|"]
        for first, second in dict.fromkeys((d.first, d.second) for d in c.differences):
            cells = []
            for m in metrics:
                d = next((d for d in c.differences if (d.metric, d.first, d.second) == (m.name, first, second)), None)
                cells.append("–" if d is None else (f"**{d.text()}**" if d.excludes_zero else d.text()))
            out.append(f"| {first} − {second} | " + " | ".join(cells) + " |")
        out += ["", "k/n = share [Wilson 95% interval] on the items every model listed has a scored record of, both "
                "test splits pooled; calibration ability: the next step after a held-out deviated history is the "
                "expert's action it replaced. Differences: Newcombe's interval for paired proportions; **bold**: it "
                "excludes 0.", ""]
    return "\n".join(out)


def reading(comparisons: list[Comparison]) -> list[str]:
    """One sentence per difference asked about: which exclude zero, which do not."""
    sentences = []
    for c in comparisons:
        titles = {m.name: m.title for m in METRICS}
        for first, second in dict.fromkeys((d.first, d.second) for d in c.differences):
            ds = [d for d in c.differences if (d.first, d.second) == (first, second)]
            moved = [f"{titles[d.metric]} {d.text()}" for d in ds if d.excludes_zero]
            held = [f"{titles[d.metric]} {d.text()}" for d in ds if not d.excludes_zero]
            text = f"{c.env}, {first} − {second} on the same items: "
            text += (f"differs on {'; '.join(moved)} (the interval excludes 0)" if moved else "no difference excludes 0")
            if held:
                text += f"; within noise: {'; '.join(held)}"
            sentences.append(text + ".")
    return sentences


def to_json(comparisons: list[Comparison]) -> list[dict[str, Any]]:
    return [{**{k: v for k, v in asdict(c).items() if k != "differences"},
             "differences": [{**asdict(d), "excludes_zero": d.excludes_zero} for d in c.differences],
             "intervals": {metric: {name: wilson_interval(k, n) if n else None for name, (k, n) in by_model.items()}
                           for metric, by_model in c.shares.items()}} for c in comparisons]


def from_runs(runs: list[str]) -> list[Comparison]:
    """`[ENV=]RUN_DIR` specs as eval.report takes them; a run without any record gives no comparison."""
    out = []
    for spec in runs:
        env, _, path = spec.rpartition("=")
        c = compare(env or Path(path).name, path)
        if c.shares:
            out.append(c)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="[ENV=]RUN_DIR", help="a run directory (repeatable)")
    p.add_argument("--out", required=True, help="folder for compare.md and compare.json")
    args = p.parse_args(argv)
    try:
        comparisons = from_runs(args.run)
    except BadRecord as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = to_markdown(comparisons) + "\n".join(reading(comparisons)) + "\n"
    write_atomic(out / "compare.md", text)
    result = to_json(comparisons)
    write_json(out / "compare.json", result)
    print(text, end="")
    return result


if __name__ == "__main__":
    run_main(main)
