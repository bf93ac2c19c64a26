"""scripts/bench_train.py on the CPU with a tiny random Llama (--size): both schemes run in their own process
with the training stages' precision, and the original's loss differs from ours by its constant log 2."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_train_compares_both_schemes_on_a_random_model(smollm2_dir):
    done = subprocess.run([sys.executable, "scripts/bench_train.py", "--model", str(smollm2_dir), "--size", "tiny",
                           "--tokens", "100", "--steps", "1", "--device", "cpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"^ours .* MiB \(max RSS\).*M parameters, fp32\)$", out, re.M)
    assert re.search(r"^original .* MiB \(max RSS\)", out, re.M) and "original / ours: peak memory x" in out
    gap = float(re.search(r"after 2 steps: (-?[\d.]+)", out).group(1))
    assert abs(gap - 0.6931) < 0.01
