"""`python -m eval_agent.doctor`: data counted where the stages look, endpoints probed, the API key
reported as set but its value never printed."""
import json
import os
import subprocess
import sys
from pathlib import Path

from eval_agent.doctor import main as doctor_main

REPO = Path(__file__).resolve().parent.parent
SECRET = "sk-doctor-test-8f3a91c2e7"


def doctor(*args: str, **env: str) -> tuple[dict, str]:
    res = subprocess.run([sys.executable, "-m", "eval_agent.doctor", *args], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), res.stdout + res.stderr


def test_doctor_counts_data_and_never_prints_the_key(tmp_path):
    alf = tmp_path / "alfworld"
    for split, n in (("train", 2), ("valid_seen", 1)):
        for i in range(n):
            trial = alf / "json_2.1.1" / split / f"pick_and_place_simple-X-{i}" / "trial_1"
            trial.mkdir(parents=True)
            (trial / "game.tw-pddl").write_text("{}")
    endpoints = tmp_path / "endpoints.txt"
    endpoints.write_text("http://127.0.0.1:9/v1  # nothing listens here\n")
    vh = REPO / "data" / "virtualhome"
    report, output = doctor("--endpoints", str(endpoints), "--alfworld_data", str(alf), "--vh_data", str(vh),
                            OPENAI_API_KEY=SECRET)
    assert SECRET not in output
    assert report["OPENAI_API_KEY"] == "set"
    assert report["alfworld_data"]["games"] == {"train": 2, "valid_seen": 1, "valid_unseen": 0}
    for split, file in (("seen", "vh_seen_test.jsonl"), ("unseen", "vh_unseen_test.jsonl")):
        if (vh / file).is_file():  # the generated sets (scripts/setup.sh)
            lines = sum(1 for line in (vh / file).read_text().splitlines() if line.strip())
            counted = report["virtualhome_data"][split]
            assert counted["tasks"] + counted["without_scene_graph"] == lines > 0
    assert report["endpoints"]["http://127.0.0.1:9/v1"]["status"].startswith("unreachable")
    assert set(report["versions"]) >= {"torch", "transformers", "vllm", "alfworld"}
    gpu = report["gpu"]
    assert gpu["torch"] and isinstance(gpu["devices"], list) and gpu["cuda_usable"] == (gpu["cuda_problem"] is None)

    report, output = doctor("--alfworld_data", str(tmp_path / "none"), OPENAI_API_KEY="", OPENAI_BASE_URL="")
    assert report["OPENAI_API_KEY"] == "not set" and report["endpoints"].startswith("none configured")
    assert "no json_2.1.1 folder under" in report["alfworld_data"]["error"]


def test_doctor_lists_what_a_live_server_serves(hf_server, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_BASE_URL", hf_server)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    report = json.loads(doctor_main([]))
    assert report["endpoints"][hf_server] == {"status": "ok", "models": [str(tiny_model_dir)]}
    assert SECRET not in capsys.readouterr().out
