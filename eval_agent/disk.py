"""What the training stages write to disk, from the model's size: the pre-flight's free-disk check and the GPU
smoke test's choice of model size compute it here (tests/test_disk.py holds it against real training runs).

A training stage (SFT, reinforced training) saves a checkpoint each epoch: fp32 weights and AdamW's two fp32
moments (12 bytes a parameter; ZeRO-3 adds its 16-bit weights: 14), the tokenizer and small files; the Trainer
writes the next checkpoint before it deletes the last, so two exist for a moment from the second epoch on. Then
the final model (`--save_dtype`: 2 bytes a parameter in bf16, 4 in fp32) and, by default, the checkpoints are
dropped (`--keep_checkpoints` keeps the last one). The task families run one after the other.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_BYTES_PER_PARAMETER = {"default": 12, "zero3": 14}  # fp32 weights + AdamW moments (+ ZeRO-3's bf16 copy)
FOLDER_FILES_BYTES = 30_000  # config, generation config, chat format, training args, trainer state, summary
PROCESS_FILES_BYTES = 16_000  # a checkpoint's rng state (and under ZeRO-3 model states), per training process
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def folder_parameters(path: str | Path) -> int | None:
    """The parameters stored in a model folder's safetensors files (each tensor once: tied weights are stored
    once), read from their headers; None without safetensors files."""
    files = sorted(Path(path).glob("*.safetensors"))
    total = 0
    for file in files:
        with file.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total or None


def tokenizer_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in map(Path(path).joinpath, TOKENIZER_FILES) if f.is_file())


@dataclass(frozen=True)
class TrainingDisk:
    """The bytes of one trained model's folders."""

    parameters: int
    extra_bytes: int = 0  # the tokenizer files, saved into every folder
    final_bytes_per_parameter: int = 2  # --save_dtype: bf16 (2) or fp32 (4)
    launcher: str = "default"  # default (one process, DDP, FSDP) | zero3
    nproc: int = 1

    def final(self) -> int:
        return self.parameters * self.final_bytes_per_parameter + self.extra_bytes + FOLDER_FILES_BYTES

    def checkpoint(self) -> int:
        return (self.parameters * CHECKPOINT_BYTES_PER_PARAMETER[self.launcher] + self.extra_bytes
                + FOLDER_FILES_BYTES + PROCESS_FILES_BYTES * self.nproc)

    def stage(self, epochs: float, save: bool = True, keep: bool = False) -> tuple[int, int]:
        """(bytes left when the stage is done, the most it holds while it runs)."""
        saves = math.ceil(epochs) if save else 0
        ckpt = self.checkpoint() if saves else 0
        peak = max(ckpt * min(saves, 2), ckpt + self.final())
        return self.final() + (ckpt if keep else 0), peak


def run_need(stages: list[tuple[TrainingDisk, float]], save: bool = True, keep: bool = False) -> tuple[int, int]:
    """(the free disk training stages run in this order need: at each stage, what the earlier ones left plus its
    peak; what they all leave) for (the model's folders, the stage's epochs) in the order the pipeline trains them:
    SFT then reinforced training, of the main run then of each variant that trains its own, family after family."""
    left, peak = 0, 0
    for disk, epochs in stages:
        stage_left, stage_peak = disk.stage(epochs, save, keep)
        peak = max(peak, left + stage_peak)
        left += stage_left
    return peak, left
