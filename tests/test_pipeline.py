"""The whole pipeline (scripts/run_pipeline.sh) end to end for both environments with the tiny model:
killed in the middle of the ALFWorld Monte-Carlo stage, rerun, and every stage's outputs checked."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from eval_agent.layout import report_dir, run_dir_of
from eval_agent.records import read_rollouts, read_step_records
from eval_agent.store import read_jsonl

REPO = Path(__file__).resolve().parent.parent
STAGES = ("expert_data", "sft", "steps", "mc", "data_collection", "steca", "eval")
N = 2
SMALL = {"PRESET": "tiny", "EXPERT_LIMIT": "2", "SFT_EPOCHS": "1", "SFT_BATCH": "2", "SAMPLE_LIMIT": "1", "N": str(N),
         "MAX_STEPS": "5", "MAX_NEW_TOKENS": "8", "RFT_BATCH": "2", "EVAL_LIMIT": "1", "CONCURRENCY": "4",
         "REFLECT_BACKEND": "self", "GRAD_CKPT": "0"}


def pipeline(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(["bash", "scripts/run_pipeline.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


def test_pipeline_both_envs_killed_and_resumed(tmp_path, tiny_model_dir):
    root = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(SMALL, TASK_FAMILY="both", RUN_ROOT=str(root), BASE_MODEL=str(tiny_model_dir), OMP_NUM_THREADS="1")

    # 1. kill the whole process group once the ALFWorld rollouts have started to come in
    first = pipeline(env)
    rollouts = run_dir_of(root, "alfworld").rollouts("expert")
    deadline = time.monotonic() + 600
    while lines(rollouts) < 1 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, f"the pipeline ended before the rollouts began:\n{first.stdout.read()[-3000:]}"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not run_dir_of(root, "alfworld").marker("mc").exists()

    # 2. the rerun skips the completed stages and finishes everything
    second = pipeline(env)
    out, _ = second.communicate(timeout=1200)
    assert second.returncode == 0, out[-4000:]
    for stage in ("expert_data", "sft", "steps"):
        assert f"alfworld: {stage}: done, skipped" in out

    for family in ("alfworld", "virtualhome"):
        run = run_dir_of(root, family)
        assert all(run.marker(s).is_file() for s in STAGES), family
        assert lines(run.expert_data()) == 2
        assert json.loads((run.sft_model / "train_summary.json").read_text())["rows_out"] == 2
        for kind in ("expert", "explore"):
            records = read_step_records(run.steps(kind))
            assert records and len({r.task_key for r in records}) == 1  # SAMPLE_LIMIT=1
            path = run.rollouts(kind)
            assert len(keys(path)) == len(set(keys(path))) == N * len(records), (family, kind)
            assert {r.record_key for r in read_rollouts(path)} == {r.key for r in records}
        summary = json.loads(run.collection_summary.read_text())
        train = list(read_jsonl(run.train_set))
        assert train and all(r["chosen"][0]["from"] == "gpt" and r["reward"] > 0 for r in train)
        published = json.loads((run.data_collection / "final_data_rft_train.json").read_text())
        assert len(published) == len(train) and set(published[0]) >= {"id", "prompt", "chosen", "rejected", "reward"}
        assert summary["train"]["rows"] == len(train) == sum(v["kept"] for v in summary["sets"].values())
        assert summary["inputs"]["rollouts"] == {k: N * v for k, v in summary["inputs"]["step_records"].items()}
        assert (run.steca_model / "steca_chat_format.json").is_file()
        assert json.loads((run.sft / "config.json").read_text())["stage"] == "sft"  # run cards beside the models
        assert json.loads((run.steca / "config.json").read_text())["stage"] == "reinforced_train"
        for label in ("base", "sft", "steca"):
            for split in ("seen", "unseen"):
                s = json.loads(run.eval_summary(label, split).read_text())
                assert (s["env"], s["num_tasks"]) == (family, 1) and 0.0 <= s["success_rate"] <= 1.0
    table = (report_dir(root) / "report.md").read_text()
    assert all(f"{name} (ours)" in table for name in ("Base model", "SFT", "STeCa"))
    assert (report_dir(root) / "report.png").read_bytes()[:4] == b"\x89PNG"
