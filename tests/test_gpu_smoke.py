"""scripts/gpu_smoke.sh --cpu: the GPU smoke test's whole path with tiny sizes on the CPU (what a CPU allows:
FSDP is skipped, ZeRO-3 runs when deepspeed is installed), ending in `gpu_smoke: ok` with its figures, in its own
work folder: nothing lands in the caller's OUT (a GPU lender's folder of files to send back)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_smoke_cpu_runs_end_to_end(tmp_path, smollm2_dir):
    out, lender = tmp_path / "smoke", tmp_path / "out"
    lender.mkdir()
    env = {**os.environ, "SMOKE_DIR": str(out), "OUT": str(lender), "FIGURES": str(tmp_path / "figures" / "smoke.json"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "scripts/gpu_smoke.sh", "--cpu"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines[-1].startswith("gpu_smoke: ok"), done.stdout[-3000:] + done.stderr[-3000:]
    assert list(lender.iterdir()) == []  # OUT untouched
    figures = json.loads((out / "figures.json").read_text())
    assert figures == json.loads((tmp_path / "figures" / "smoke.json").read_text())  # FIGURES: a copy, a few KB
    assert figures["problems"] == [] and figures["device"] == "cpu"
    assert all(figures["generation_tokens_per_s"][run] > 0 for run in ("hf", "http"))
    stages = {r["stage"]: r for r in figures["training"]}
    assert {"sft_single+resume", "steca_beta0", "steca_beta0.1"} <= stages.keys()
    sft = stages["sft_single+resume"]
    assert sft["resumed_from"] and sft["chat_format"] == "llama-2" and sft["tokens_per_s"] > 0
    assert all(r["saved_dtype"] == "float32" and r["peak_gpu_mib"] is None for r in stages.values())
    for run in ("hf", "http"):  # in process and over HTTP through serve_hf
        got = figures["sampling"][run]
        assert 0 < got["judged_explore"] <= got["steps_explore"] and got["eval_tasks"] == 1
        assert got["rollouts_explore"] == 2 * got["judged_explore"]  # MC rolls out the judged records
    assert any(s.startswith("FSDP: accelerate applies FSDP on GPUs only") for s in figures["skipped"])
    assert (out / "logs" / "sft_single.log").is_file() and (out / "base" / "config.json").is_file()
