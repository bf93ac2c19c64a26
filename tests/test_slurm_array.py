"""scripts/slurm/mc_array.sbatch as two array tasks on this machine (serve_vllm.sh with the vLLM stand-in of
test_vllm.py serving the tiny model), then the merge, which checks that every key appears once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from eval_agent.layout import RunDir
from sampling.expert_tasks import shard_of
from sampling.merge import main as merge
from test_vllm import STAND_IN, free_port

REPO = Path(__file__).resolve().parent.parent
VH_TRAJECTORIES = REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl"


def keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


def test_array_tasks_write_their_shards_and_the_merge_takes_every_key_once(tmp_path, tiny_model_dir):
    fake = tmp_path / "fake_vllm_python"
    fake.write_text(STAND_IN.format(python=sys.executable))
    fake.chmod(0o755)
    rows = sorted((json.loads(line) for line in VH_TRAJECTORIES.read_text().splitlines()), key=lambda r: len(r["steps"]))
    rows = [next(r for r in rows if shard_of(r["key"], 2) == shard) for shard in (0, 1, 0)][:2]  # a task a shard
    expert = tmp_path / "expert.jsonl"
    expert.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OPENAI_BASE_URL")}
    base.update(RUN_DIR=str(run_dir), MODEL=str(tiny_model_dir), EXPERT_DATA=str(expert), TASK_FAMILY="virtualhome",
                KIND="expert", N="2", MAX_STEPS="3", MAX_NEW_TOKENS="4", ENV_WORKERS="1", PYTHON=sys.executable,
                VLLM_PY=str(fake), STAND_IN_PIDS=str(tmp_path / "pids"),
                STARTUP_TIMEOUT="180", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", SLURM_ARRAY_TASK_COUNT="2")
    tasks = []
    for shard in (0, 1):  # the two array tasks at once, as Slurm runs them
        env = {**base, "SLURM_ARRAY_TASK_ID": str(shard), "BASE_PORT": str(free_port())}
        tasks.append(subprocess.Popen(["bash", str(REPO / "scripts" / "slurm" / "mc_array.sbatch")], env=env,
                                      cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for shard, task in enumerate(tasks):
        out, err = task.communicate(timeout=600)
        assert task.returncode == 0, out[-2000:] + err[-3000:]
        assert f"shard {shard} of 2" in out
        assert (RunDir(run_dir).shard_servers(2, shard) / "logs").is_dir()  # each task its own servers' files
    sampling = run_dir / "sampling"
    shards = [keys(sampling / f"steps_expert.shard{i}of2.jsonl") for i in (0, 1)]
    assert all(shards) and not set(shards[0]) & set(shards[1])  # the tasks split over the two shards

    merge(["--what", "steps", "--kind", "expert", "--num_shards", "2", "--task", "virtualhome",
           "--expert_data", str(expert), "--run_dir", str(run_dir)])
    merge(["--what", "rollouts", "--kind", "expert", "--num_shards", "2", "--n", "2", "--task_family", "virtualhome",
           "--run_dir", str(run_dir)])
    steps = keys(sampling / "steps_expert.jsonl")
    rollouts = keys(sampling / "mc" / "rollouts_expert.jsonl")
    assert len(steps) == sum(len(r["steps"]) for r in rows)
    assert len(rollouts) == 2 * (len(steps) - len(rows))  # MC rolls out the expert steps data collection reads: t >= 1
    assert len(set(rollouts)) == len(rollouts)
