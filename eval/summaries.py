"""Reading the evaluation summaries the report shows: each file checked field by field, a bad one an error naming it.
A summary is what its label says: the run's models' labels (base, sft, steca) must be a model's evaluation, `expert`
the built-in expert's; a summary whose model changed after it was made is shown with a warning."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from eval.formatting import ENV_TITLES, OUR_LABELS, SPLIT_NAMES
from eval_agent.guard import input_changed
from eval_agent.layout import FINGERPRINT_FILE


@dataclass
class Cell:
    """One of our table cells: what one summary.json says, and where it came from."""
    label: str
    env: str
    split: str
    value: float  # the metric ×100
    num_tasks: int
    success_rate: float
    avg_reward: float
    summary: str
    config: str | None
    model: str | None
    policy: str | None
    model_changed: str | None = None  # what changed of the model since the summary was made


def fail(path: Path | str, why: str) -> NoReturn:
    raise SystemExit(f"error: {path}: {why}")


def load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(path, f"not a readable JSON file ({e})")
    if not isinstance(data, dict):
        fail(path, "expected a JSON object")
    return data


def read_summary(path: Path, label: str, metric: str) -> Cell:
    """One cell from an eval.evaluate summary.json, checked field by field, with the model path its
    run card (config.json beside it, else the copy inside the summary) records."""
    summary = load_json(path)
    for field in ("env", "split", "num_tasks", "success_rate", "avg_reward"):
        if field not in summary:
            fail(path, f"missing field {field!r} (not a summary.json of eval.evaluate?)")
    if summary["env"] not in ENV_TITLES:
        fail(path, f"field 'env' is {summary['env']!r}; the table has {sorted(ENV_TITLES)}")
    if summary["split"] not in SPLIT_NAMES:
        fail(path, f"field 'split' is {summary['split']!r}; the table has the test splits seen and unseen")
    num_tasks = summary["num_tasks"]
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks <= 0:
        fail(path, f"field 'num_tasks' is {num_tasks!r}: no task was evaluated")
    for field in ("success_rate", "avg_reward"):
        v = summary[field]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            fail(path, f"field {field!r} is {v!r}, expected a fraction in [0, 1]")
    config = path.parent / "config.json"
    card = load_json(config) if config.is_file() else summary.get("run_card") or {}
    args = card.get("args") or {}
    check_label(path, label, args.get("policy"))
    return Cell(label=label, env=summary["env"], split=SPLIT_NAMES[summary["split"]], value=100 * summary[metric],
                num_tasks=num_tasks, success_rate=summary["success_rate"], avg_reward=summary["avg_reward"],
                summary=str(path), config=str(config) if config.is_file() else None,
                model=args.get("model"), policy=args.get("policy"), model_changed=model_changed(path.parent))


def check_label(path: Path, label: str, policy: str | None) -> None:
    """The run's models' labels name a model's evaluation, `expert` the built-in expert's: an expert's 100.0 shown
    as "SFT (ours)" would be a wrong result."""
    if label in OUR_LABELS and policy not in (None, "model"):
        fail(path, f"labelled {label} ({OUR_LABELS[label]}), but made by the {policy} policy: label it {policy} "
                   f"(--summary {policy}=...), or evaluate the model (POLICY=model)")
    if label == "expert" and policy == "model":
        fail(path, "labelled expert (the built-in expert), but made by a model: label it by its model")


def model_changed(folder: Path) -> str | None:
    """What changed of the evaluated model since the evaluation (its fingerprint records the model's identity);
    None when nothing did or it cannot be told (no fingerprint, a served model, a folder no longer there)."""
    record = folder / FINGERPRINT_FILE
    try:
        recorded = json.loads(record.read_text())["inputs"]["model"] if record.is_file() else None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return input_changed(recorded)
