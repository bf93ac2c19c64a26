"""The evaluation stage end to end on the real ALFWorld engine and the generated games."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.evaluate import main as evaluate

REPO = Path(__file__).resolve().parent.parent


def read_summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


def test_expert_solves_generated_unseen(tmp_path):
    summary = evaluate(["--task", "alfworld", "--split", "unseen", "--policy", "expert", "--out", str(tmp_path)])
    assert summary["num_tasks"] >= 6 and summary["success_rate"] == 1.0
    assert len(summary["per_task_type"]) == 6
    assert summary["avg_reward"] == 1.0 and summary["avg_steps"] > 1
    card = json.loads((tmp_path / "config.json").read_text())
    assert card["versions"]["alfworld"] and card["args"]["policy"] == "expert"
    files = sorted((tmp_path / "tasks").glob("*.json"))
    assert len(files) == summary["num_tasks"]
    traj = json.loads(files[0].read_text())
    assert traj["success"] and traj["steps"][0]["action"] and traj["task_text"].count("Your task is to:") == 1


def test_killed_evaluation_resumes_without_duplicates(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "eval.evaluate", "--task", "alfworld", "--split", "train", "--policy", "expert",
           "--concurrency", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "tasks").glob("*.json"))) < 2:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL) if proc.poll() is None else None
    proc.wait()
    partial = len(list((out / "tasks").glob("*.json")))
    assert partial >= 2
    summary = evaluate(["--task", "alfworld", "--split", "train", "--policy", "expert", "--out", str(out)])
    assert summary["run"]["episodes"] == summary["num_tasks"] - partial  # only the rest ran
    assert len(list((out / "tasks").glob("*.json"))) == summary["num_tasks"]
    assert summary["success_rate"] == 1.0
    assert not list(out.rglob(".*tmp*"))  # no temp files left behind


def test_model_evaluation_hf_backend(tmp_path, tiny_model_dir):
    summary = evaluate(["--task", "alfworld", "--split", "seen", "--policy", "model", "--model", str(tiny_model_dir),
                        "--backend", "hf", "--limit", "2", "--max_steps", "3", "--max_new_tokens", "16",
                        "--out", str(tmp_path)])
    assert summary["num_tasks"] == 2 and summary["success_rate"] == 0.0
    for f in (tmp_path / "tasks").glob("*.json"):
        traj = json.loads(f.read_text())
        assert len(traj["steps"]) == 3 and traj["termination"] == "max_steps"


def test_splits_evaluated_together_give_what_each_split_gives_alone(tmp_path, tiny_model_dir):
    common = ["--task", "alfworld", "--policy", "model", "--model", str(tiny_model_dir), "--backend", "hf",
              "--limit", "2", "--max_steps", "3", "--max_new_tokens", "16", "--label", "tiny"]
    together = evaluate(common + ["--split", "seen,unseen", "--run_dir", str(tmp_path / "together")])
    assert sorted(together) == ["seen", "unseen"] and together["seen"]["run"]["episodes"] == 4
    for split in ("seen", "unseen"):
        alone = evaluate(common + ["--split", split, "--run_dir", str(tmp_path / "alone")])
        assert alone["split"] == split and alone["num_tasks"] == together[split]["num_tasks"] == 2
        folders = [tmp_path / run / "eval" / "tiny" / split for run in ("together", "alone")]
        files = [sorted((f / "tasks").glob("*.json")) for f in folders]
        assert [f.name for f in files[0]] == [f.name for f in files[1]] and split in files[0][0].name
        for a, b in zip(*files):
            assert json.loads(a.read_text())["steps"] == json.loads(b.read_text())["steps"]
    again = evaluate(common + ["--split", "seen,unseen", "--run_dir", str(tmp_path / "together")])
    assert again["unseen"]["run"]["episodes"] == 0  # resumed: nothing left to play
    with pytest.raises(SystemExit):
        evaluate(common + ["--split", "seen,unseen", "--out", str(tmp_path / "one")])  # one folder, two splits
    with pytest.raises(SystemExit):
        evaluate(common + ["--split", "seen,seen", "--run_dir", str(tmp_path / "twice")])


def test_model_evaluation_http_backend_matches_hf(tmp_path, tiny_model_dir, hf_server):
    common = ["--task", "alfworld", "--split", "seen", "--policy", "model", "--limit", "2", "--max_steps", "3",
              "--max_new_tokens", "16", "--chat_format", "template"]
    endpoints = tmp_path / "endpoints.txt"
    endpoints.write_text(hf_server + "\n")
    evaluate(common + ["--model", str(tiny_model_dir), "--backend", "hf", "--out", str(tmp_path / "hf")])
    evaluate(common + ["--model", str(tiny_model_dir), "--tokenizer", str(tiny_model_dir), "--backend", "openai",
                       "--endpoints", str(endpoints), "--out", str(tmp_path / "http")])
    for f in (tmp_path / "hf" / "tasks").glob("*.json"):
        a = json.loads(f.read_text())
        b = json.loads((tmp_path / "http" / "tasks" / f.name).read_text())
        assert [s["text"] for s in a["steps"]] == [s["text"] for s in b["steps"]]


def test_unreachable_server_is_a_clear_error(tmp_path, tiny_model_dir):
    endpoints = tmp_path / "endpoints.txt"
    endpoints.write_text("http://127.0.0.1:9/v1\n")
    env = {**os.environ, "STECA_HTTP_TIMEOUT": "2"}
    res = subprocess.run(
        [sys.executable, "-m", "eval.evaluate", "--task", "alfworld", "--split", "seen", "--policy", "model",
         "--model", str(tiny_model_dir), "--backend", "openai", "--endpoints", str(endpoints), "--limit", "1",
         "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode != 0
    assert "127.0.0.1:9" in res.stderr
