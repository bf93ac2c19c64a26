"""What the training stages write, against eval_agent/disk.py's estimate (the pre-flight's free-disk check), and
the checkpoints a finished training drops by default (`--keep_checkpoints` keeps them; an interrupted training
still resumes from its last one)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_agent.disk import TrainingDisk, folder_parameters, run_need, tokenizer_bytes
from eval_agent.layout import RunDir
from test_reinforced_train import calibration_row, explored_row, write_jsonl

REPO = Path(__file__).resolve().parent.parent
VH_TRAJECTORIES = REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl"
TOLERANCE = 0.2  # the acceptance's: within 20% of the bytes written


def written(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoint-*"))


def sft(model: Path, data: Path, out: Path, *extra: str) -> dict:
    from sft.train import main

    return main(["--task_family", "virtualhome", "--model_name_or_path", str(model), "--data", str(data),
                 "--output_dir", str(out), "--global_batch_size", "1", "--per_device_train_batch_size", "1",
                 "--model_max_length", "512", "--precision", "fp32", "--report_to", "none", "--num_train_epochs", "2",
                 *extra])


def rft(model: Path, data: Path, out: Path, *extra: str) -> dict:
    from Reinforced_train.train import main

    return main(["--model_name_or_path", str(model), "--data", str(data), "--output_dir", str(out),
                 "--global_batch_size", "1", "--per_device_train_batch_size", "1", "--model_max_length", "512",
                 "--precision", "fp32", "--report_to", "none", *extra])


@pytest.fixture
def expert_rows(tmp_path) -> Path:
    rows = VH_TRAJECTORIES.read_text().splitlines()[:2]
    path = tmp_path / "expert.jsonl"
    path.write_text("".join(line + "\n" for line in rows))
    return path


def test_training_stages_write_what_the_estimate_says(tmp_path, tiny_model_dir, expert_rows):
    """SFT (2 epochs) and reinforced training (1 epoch) of the tiny model on the CPU: the kept checkpoint, each
    stage's folder after the default clean-up, and the two stages together, each within 20% of the estimate."""
    disk = TrainingDisk(folder_parameters(tiny_model_dir), tokenizer_bytes(tiny_model_dir), final_bytes_per_parameter=4)
    run = RunDir(tmp_path / "run")
    kept = tmp_path / "kept" / "model"
    sft(tiny_model_dir, expert_rows, kept, "--keep_checkpoints")
    [checkpoint] = checkpoints(kept)  # --save_total_limit 1: the last epoch's
    assert written(checkpoint) == pytest.approx(disk.checkpoint(), rel=TOLERANCE)
    assert written(kept) - written(checkpoint) == pytest.approx(disk.final(), rel=TOLERANCE)

    sft(tiny_model_dir, expert_rows, run.sft_model)  # the default: only the final model stays
    assert checkpoints(run.sft_model) == []
    sft_left, _ = disk.stage(2)
    assert written(run.sft_model) == pytest.approx(sft_left, rel=TOLERANCE)
    rows = write_jsonl(tmp_path / "train.jsonl", [calibration_row("c0", 1.0), explored_row("e0", 0.5)])
    rft(run.sft_model, rows, run.steca_model)
    assert checkpoints(run.steca_model) == []
    _, left = run_need([(disk, 2), (disk, 1)])
    assert written(run.sft_model) + written(run.steca_model) == pytest.approx(left, rel=TOLERANCE)


def test_an_interrupted_training_resumes_then_drops_its_checkpoints(tmp_path, tiny_model_dir, expert_rows):
    out = tmp_path / "sft" / "model"
    first = sft(tiny_model_dir, expert_rows, out, "--keep_checkpoints")
    [checkpoint] = checkpoints(out)
    # as if killed after its last checkpoint, before the summary: the rerun (default settings) resumes from it
    (out / "train_summary.json").rename(tmp_path / "train_summary.json")
    resumed = sft(tiny_model_dir, expert_rows, out)
    assert resumed["resumed_from"] == str(checkpoint) and resumed["optimizer_steps"] == first["optimizer_steps"]
    assert checkpoints(out) == []
    # killed between the summary and the clean-up: the rerun finds the training done and drops what is left
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"state")
    assert sft(tiny_model_dir, expert_rows, out) == json.loads((out / "train_summary.json").read_text())
    assert checkpoints(out) == []
