"""The run directory layout: one place, and the shell scripts' view of it."""
import subprocess
import sys
from pathlib import Path

from eval_agent.layout import RunDir, report_dir, run_dir_of

REPO = Path(__file__).resolve().parent.parent


def test_run_dir_paths():
    run = RunDir("out/alfworld")
    assert run.expert_data() == Path("out/alfworld/expert/train/trajectories.jsonl")
    assert run.steps("explore", 4, 1) == Path("out/alfworld/sampling/steps_explore.shard1of4.jsonl")
    assert run.rollouts("expert") == Path("out/alfworld/sampling/mc/rollouts_expert.jsonl")
    assert run.evaluation("sft", "seen") == Path("out/alfworld/eval/sft/seen")
    assert run.step_accuracy("sft", "seen") == Path("out/alfworld/eval/sft/seen/step_accuracy")
    assert run.server_endpoints == Path("out/alfworld/servers/endpoints.txt")
    assert run.server_logs("steca") == Path("out/alfworld/servers/logs/steca")
    assert run_dir_of("out", "virtualhome") == RunDir("out/virtualhome") and report_dir("out") == Path("out/report")


def test_shell_view_prints_the_same_paths():
    def path(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "eval_agent.layout", *args], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()

    assert path("--run_dir", "r", "train_set") == str(RunDir("r").train_set)
    assert path("--run_dir", "r", "evaluation", "steca", "unseen") == str(RunDir("r").evaluation("steca", "unseen"))
    assert path("--run_root", "o", "--task_family", "alfworld") == str(run_dir_of("o", "alfworld").root)
    assert path("--run_root", "o") == str(report_dir("o"))
    bad = subprocess.run([sys.executable, "-m", "eval_agent.layout", "--run_dir", "r", "nowhere"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no 'nowhere'" in bad.stderr
