"""Experiment tracking: --report_to resolved (auto = TensorBoard when installed), the training stage's TensorBoard
events and run name under the run directory, and the summary figures of the stages without a Trainer (MC,
evaluation) logged to the same run; nothing logged where no tracker is configured."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from eval_agent.layout import RunDir
from eval_agent.tracking import find_run_dir, installed, log_summary, resolve_report_to


@pytest.fixture(autouse=True)
def tracker_env(monkeypatch):
    """The variables configure_tracking sets for transformers' callbacks are put back after each test."""
    for name in ("TENSORBOARD_LOGGING_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE"):
        monkeypatch.setenv(name, "recorded")  # so that the teardown restores the state before the test
        monkeypatch.delenv(name)


def scalars(folder: Path) -> dict[str, float]:
    """The last value of every scalar in the TensorBoard event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = acc.Scalars(tag)[-1].value
    return out


def test_report_to_is_resolved_and_checked():
    assert resolve_report_to(["none"]) == [] and resolve_report_to("none") == []
    assert resolve_report_to(["auto"]) == (["tensorboard"] if installed("tensorboard") else [])
    with pytest.raises(SystemExit, match="--report_to mlflow: choose none, auto, tensorboard or wandb"):
        resolve_report_to(["mlflow"])
    if not installed("wandb"):
        with pytest.raises(SystemExit, match="--report_to wandb: not installed"):
            resolve_report_to("wandb")


def test_nothing_is_logged_without_a_configured_tracker(tmp_path):
    assert log_summary(tmp_path, "mc", {"success_rate": 0.5}, tmp_path / "sampling" / "mc") == []
    assert log_summary(None, "eval/sft/seen", {"success_rate": 0.5}, tmp_path) == []
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_training_and_summaries_report_to_one_tensorboard_run(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    from Reinforced_train.train import main
    from tests.test_reinforced_train import ROWS, write_jsonl

    run = RunDir(tmp_path / "myrun")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    main(["--model_name_or_path", str(tiny_model_dir), "--data", str(data), "--output_dir", str(run.steca_model),
          "--global_batch_size", "2", "--per_device_train_batch_size", "2", "--precision", "fp32", "--max_steps", "1",
          "--save_strategy", "no", "--logging_steps", "1"])  # --report_to left to its default: auto
    assert json.loads(run.tracking.read_text()) == {"report_to": ["tensorboard"], "run": "myrun"}
    card = json.loads((run.steca_model / "run_card.json").read_text())
    assert card["args"]["run_name"] == "myrun/steca" and card["args"]["report_to"] == ["tensorboard"]
    assert "train/loss" in scalars(run.steca_model / "tensorboard")

    mc = {"explore": {"records_in": 4, "success_rate": 0.25, "out": "x.jsonl"}}
    assert log_summary(run.root, "mc", mc, run.mc) == ["tensorboard"]
    assert scalars(run.mc / "tensorboard") == {"mc/explore/records_in": 4.0, "mc/explore/success_rate": 0.25}
    out = run.evaluation("sft", "seen")
    out.mkdir(parents=True)
    assert find_run_dir(out) == run.root.resolve() and find_run_dir(tmp_path / "elsewhere") is None
    assert log_summary(find_run_dir(out), "eval/sft/seen", {"success_rate": 1.0, "per_task_type": {"a": {
        "success_rate": 0.5}}}, out) == ["tensorboard"]
    assert scalars(out / "tensorboard") == {"eval/sft/seen/success_rate": 1.0,
                                             "eval/sft/seen/per_task_type/a/success_rate": 0.5}


def test_wandb_offline_groups_the_stages_of_a_run(tmp_path, tiny_model_dir, monkeypatch):
    """wandb (not pinned; skipped where it is not installed) in offline mode: the training stage and the MC
    summary are runs of one group named after the run directory."""
    pytest.importorskip("wandb")
    from Reinforced_train.train import main
    from tests.test_reinforced_train import ROWS, write_jsonl

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunDir(tmp_path / "wrun")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    main(["--model_name_or_path", str(tiny_model_dir), "--data", str(data), "--output_dir", str(run.steca_model),
          "--global_batch_size", "2", "--per_device_train_batch_size", "2", "--precision", "fp32", "--max_steps", "1",
          "--save_strategy", "no", "--logging_steps", "1", "--report_to", "wandb"])
    assert json.loads(run.tracking.read_text()) == {"report_to": ["wandb"], "run": "wrun"}
    assert os.environ["WANDB_RUN_GROUP"] == "wrun" and os.environ["WANDB_PROJECT"] == "steca"
    assert log_summary(run.root, "mc", {"explore": {"success_rate": 0.5}}, run.mc) == ["wandb"]
    offline = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 2  # the training run and the MC summary's
