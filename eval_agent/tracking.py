"""Experiment tracking (TensorBoard or Weights & Biases, as transformers names them) for one run directory.

The training stages choose the tracker (`--report_to`: none | tensorboard | wandb; `auto`, the default, is
TensorBoard when it is installed, else none), name the tracker run after the run directory (`<run>/<stage>`, e.g.
`alfworld/sft`; wandb groups a run directory's stages under `<run>`) and record the choice in RUN_DIR/tracking.json.
The stages without a Trainer (Monte-Carlo rollouts, evaluation) read that record and log their summary figures to
the same tracker: TensorBoard event files beside each stage's output (`tensorboard --logdir RUN_DIR` shows them
all), wandb runs in the run directory's group. No record, or `none`: nothing is logged.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from eval_agent.layout import TRACKING_DIR, RunDir
from eval_agent.store import write_json

TRACKERS = ("tensorboard", "wandb")
WANDB_PROJECT = "steca"  # WANDB_PROJECT overrides it
log = logging.getLogger("eval_agent.tracking")
_set_here: dict[str, str] = {}  # the environment variables this module set, and to what


def _set_env(name: str, value: str) -> None:
    """Set `name` (read by transformers' callbacks) unless the user did: a value set here before is replaced, so
    a second stage in the same process gets its own."""
    if name not in os.environ or os.environ[name] == _set_here.get(name):
        os.environ[name] = _set_here[name] = value


def installed(tracker: str) -> bool:
    return importlib.util.find_spec(tracker) is not None


def resolve_report_to(report_to: str | list[str] | None) -> list[str]:
    """The trackers to use: `auto` is TensorBoard when installed, else none; a named one must be installed."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if names in (["auto"], ["all"]):  # `all` would start every integration that happens to be installed
        return ["tensorboard"] if installed("tensorboard") else []
    if names in ([], ["none"]):
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise SystemExit(f"error: --report_to {' '.join(unknown)}: choose none, auto, {' or '.join(TRACKERS)}")
    missing = [n for n in names if not installed(n)]
    if missing:
        raise SystemExit(f"error: --report_to {' '.join(missing)}: not installed (pip install {' '.join(missing)})")
    return names


def configure_tracking(targs, stage: str):
    """`TrainingArguments` reporting to the resolved trackers under the run directory's name; the choice is
    recorded in RUN_DIR/tracking.json (the main process writes it) for the stages that follow."""
    out = Path(targs.output_dir)
    run = RunDir(out.parent.parent)
    report_to = resolve_report_to(targs.report_to)
    name = f"{run.root.resolve().name}/{stage}" + ("" if out in (run.sft_model, run.steca_model) else f"/{out.name}")
    if "tensorboard" in report_to:  # in the output folder: two trainings under one parent never share it
        _set_env("TENSORBOARD_LOGGING_DIR", str(out / TRACKING_DIR))
    if "wandb" in report_to:
        _set_env("WANDB_PROJECT", WANDB_PROJECT)
        _set_env("WANDB_RUN_GROUP", run.root.resolve().name)
        _set_env("WANDB_JOB_TYPE", stage)
    run_name = targs.run_name if targs.run_name not in (None, targs.output_dir) else name
    if targs.process_index == 0 and report_to:
        write_json(run.tracking, {"report_to": report_to, "run": run.root.resolve().name})
    return dataclasses.replace(targs, report_to=report_to, run_name=run_name)


def _numbers(figures: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) summary, keyed `a/b/c`."""
    out: dict[str, float] = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            out |= _numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def find_run_dir(out: str | Path, levels: int = 3) -> Path | None:
    """The run directory above a stage's output folder (e.g. RUN_DIR/eval/<label>/<split>): the nearest of it
    and its `levels` parents that holds a tracking record; None outside a tracked run."""
    out = Path(out).resolve()
    return next((d for d in [out, *out.parents][: levels + 1] if RunDir(d).tracking.is_file()), None)


def log_summary(run_dir: str | Path | None, stage: str, figures: dict[str, Any], stage_dir: str | Path) -> list[str]:
    """Log the numeric figures of a stage's summary to the trackers RUN_DIR/tracking.json names; returns them.
    TensorBoard events go to `stage_dir`/tensorboard, a wandb run joins the run directory's group."""
    record = RunDir(run_dir).tracking if run_dir is not None else None
    if record is None or not record.is_file():
        return []
    config = json.loads(record.read_text())
    numbers = _numbers(figures)
    done = []
    for tracker in config.get("report_to", []):
        if not installed(tracker):
            log.warning("%s names %s, which is not installed here: %s summary not logged", record, tracker, stage)
            continue
        if tracker == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(log_dir=str(Path(stage_dir) / TRACKING_DIR)) as writer:
                for key, value in numbers.items():
                    writer.add_scalar(f"{stage}/{key}", value, 0)
        elif tracker == "wandb":
            import wandb

            with wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), group=config["run"],
                            job_type=stage, name=f"{config['run']}/{stage}", reinit="create_new") as run:
                run.log({f"{stage}/{k}": v for k, v in numbers.items()})
                run.summary.update(numbers)
        done.append(tracker)
    if done:
        log.info("%s summary (%d figures) logged to %s", stage, len(numbers), ", ".join(done))
    return done
