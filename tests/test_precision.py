"""Training precision: fp32 master weights under bf16 compute, so that an update at the paper's lr 3e-6 is not
lost; the combination that loses it (bf16 weights + AdamW) is refused, shown with a real optimizer step; a GPU
asked for where none is usable is an error, never a quiet CPU run; the final model is saved in the dtype the
next stage loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eval_agent import training
from eval_agent.training import check_master_weights, check_precision, configure_training_args, load_for_training

LR = 3e-6  # the paper's reinforced-training learning rate


def adamw_step(model, dtype_autocast: torch.dtype | None) -> float:
    """One AdamW step at LR on a language-model loss; the fraction of weights that moved."""
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=dtype_autocast or torch.float32, enabled=dtype_autocast is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    optimizer.step()
    moved = sum((p.detach() != b).sum().item() for p, b in zip(model.parameters(), before))
    return moved / sum(b.numel() for b in before)


def test_fp32_masters_keep_an_update_that_bf16_weights_lose(tiny_model_dir):
    from transformers import TrainingArguments

    fp32 = load_for_training(str(tiny_model_dir))
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert adamw_step(fp32, torch.bfloat16) > 0.95  # bf16 compute, fp32 weights: (nearly) every weight moves

    bf16 = load_for_training(str(tiny_model_dir), dtype=torch.bfloat16)
    assert adamw_step(bf16, None) < 0.1  # the same step on bf16 weights: most updates round away
    targs = TrainingArguments(output_dir="unused", learning_rate=LR, report_to="none")
    with pytest.raises(SystemExit, match="lr 3e-06 most updates would round away"):
        check_master_weights(bf16, targs)
    check_master_weights(fp32, targs)  # fp32 weights pass


def test_a_gpu_asked_for_where_none_is_usable_is_an_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    monkeypatch.setattr(training, "gpu_expected", lambda: False)
    assert check_precision("auto", use_cpu=False) is False  # a CPU machine: fp32 on the CPU, as asked
    with pytest.raises(SystemExit, match="--precision bf16 needs a GPU and none is usable"):
        check_precision("bf16", use_cpu=False)
    assert check_precision("bf16", use_cpu=True) is True  # the CPU on purpose: bf16 autocast there
    with pytest.raises(SystemExit, match="--fp16 is not supported"):
        check_precision("auto", use_cpu=False, fp16=True)
    with pytest.raises(SystemExit, match="--precision must be one of"):
        check_precision("fp16", use_cpu=False)
    # a driver on the machine but CUDA unusable (e.g. older than the torch build needs): never a CPU run
    monkeypatch.setattr(training, "gpu_expected", lambda: True)
    monkeypatch.setattr(training, "cuda_problem", lambda: "The NVIDIA driver on your system is too old")
    for precision in ("auto", "fp32", "bf16"):
        with pytest.raises(SystemExit, match="has an NVIDIA GPU but torch .* too old.*--use_cpu"):
            check_precision(precision, use_cpu=False)
    assert check_precision("fp32", use_cpu=True) is False


def test_gpu_expected_reads_the_driver_and_the_scheduler(monkeypatch):
    if Path("/proc/driver/nvidia/version").is_file():
        pytest.skip("this machine has an NVIDIA driver")
    monkeypatch.setattr(training.shutil, "which", lambda name: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert not training.gpu_expected()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not training.gpu_expected()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert training.gpu_expected()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(training.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert training.gpu_expected()


def test_conflicting_precision_flags_and_fsdp_on_a_cpu_are_refused(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    monkeypatch.setattr(training, "gpu_expected", lambda: False)
    targs = TrainingArguments(output_dir=str(tmp_path / "m"), bf16=True, use_cpu=True, report_to="none")
    with pytest.raises(SystemExit, match="--bf16 contradicts --precision fp32"):
        configure_training_args(targs, 8, "fp32")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # an accelerate config's mixed_precision: fp16
    with pytest.raises(SystemExit, match="launcher asks for mixed precision 'fp16'.*--precision gives fp32"):
        configure_training_args(TrainingArguments(output_dir=str(tmp_path / "m"), report_to="none"), 8, "fp32")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SystemExit, match="FSDP config without a usable GPU"):
        configure_training_args(TrainingArguments(output_dir=str(tmp_path / "m"), report_to="none"), 8, "auto")


def test_bf16_training_moves_the_fp32_weights_and_saves_bf16(tmp_path, tiny_model_dir, monkeypatch):
    """The GPU settings simulated on the CPU (--precision bf16 --use_cpu: bf16 autocast over fp32 weights) at
    lr 3e-6 through the real SFT stage: the checkpoint's fp32 weights moved, the final model is bf16."""
    from safetensors import safe_open

    from eval_agent.expert_data import to_published
    from sft.train import main
    from tests.test_sft import TRAJ

    monkeypatch.setattr(training, "gpu_expected", lambda: False)
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(to_published([TRAJ], instruction="Solve the task.", id_prefix="alfworld")))
    out = tmp_path / "sft" / "model"
    summary = main(["--task_family", "alfworld", "--model_name_or_path", str(tiny_model_dir), "--data", str(data),
                    "--output_dir", str(out), "--precision", "bf16", "--use_cpu", "--learning_rate", str(LR),
                    "--global_batch_size", "1",
                    "--per_device_train_batch_size", "1", "--num_train_epochs", "1", "--save_strategy", "steps",
                    "--save_steps", "1", "--report_to", "none", "--lr_scheduler_type", "constant",
                    "--keep_checkpoints"])
    assert summary["precision"] == "bf16 autocast, fp32 weights" and summary["saved_dtype"] == "bfloat16"
    assert summary["parameters"] > 0 and summary["optimizer_steps"] == 1

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    start, step1 = tensors(tiny_model_dir / "model.safetensors"), tensors(out / "checkpoint-1" / "model.safetensors")
    assert {t.dtype for t in step1.values()} == {torch.float32}  # the checkpoint holds the fp32 masters
    moved = sum((step1[k] != start[k]).sum().item() for k in start) / sum(t.numel() for t in start.values())
    assert moved > 0.5, moved
    final = tensors(out / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
