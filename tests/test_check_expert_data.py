"""Expert data checked against the engine (sft/check_expert_data.py): trajectories replayed in the real
VirtualHome simulator, the first divergence of each that does not replay, and the option that drops them
when the data is imported (sft.make_expert_data --source --check_replay --replay_keep)."""
from __future__ import annotations

import json
from pathlib import Path

from eval_agent.expert_data import load_expert_data
from eval_agent.layout import RunDir
from eval_agent.trajectory import Step
from sft import make_expert_data
from sft.check_expert_data import check, same_observation, summarize

REPO = Path(__file__).resolve().parent.parent
VH = REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl"


def three(tmp_path: Path) -> Path:
    """The first three generated trajectories: one as is, one with an action the simulator rejects at
    step 1, one whose recorded observation at step 2 is not what the simulator shows."""
    trajs = load_expert_data(VH)[:3]
    bad = trajs[1].steps[1]
    trajs[1].steps[1] = Step.expert(bad.thought, "Walk to spaceship", bad.observation)
    trajs[2].steps[2].observation = "spaceship is OPEN. "
    path = tmp_path / "expert.jsonl"
    path.write_text("".join(json.dumps({"key": t.meta["key"], **t.to_dict()}) + "\n" for t in trajs))
    return path


def test_replay_reports_exact_success_and_first_divergence(tmp_path):
    path = three(tmp_path)
    trajs = load_expert_data(path)
    ok, rejected, other_obs = check(trajs, "virtualhome", progress=False)
    assert ok["replayed"] and ok["success"] and ok["divergence"] is None
    assert not rejected["replayed"] and rejected["divergence"] == {
        "step": 1, "action": "Walk to spaceship", "data": trajs[1].steps[1].observation, "engine": "Nothing happens."}
    assert not other_obs["replayed"] and other_obs["success"]  # the actions all work: only the data's text differs
    assert other_obs["divergence"]["step"] == 2 and other_obs["divergence"]["data"] == "spaceship is OPEN. "
    summary = summarize([ok, rejected, other_obs])
    assert (summary["trajectories"], summary["replayed_exactly"], summary["first_divergence_step"]) == (3, 1, {1: 1, 2: 1})
    assert summary["diverged_with_nothing_happens"] == 1


def test_observations_compared_as_the_original_printed_them():
    assert same_observation("a is CLEAN, b ON c. ", "a is CLEAN,  b ON c.", "virtualhome")
    assert same_observation("b ON c, a is CLEAN. ", "a is CLEAN, b ON c. ", "virtualhome")  # hash order
    assert not same_observation("b ON c, a is CLEAN. ", "a is CLEAN, b ON c. ", "alfworld")


def test_import_keeps_only_what_replays(tmp_path):
    path = three(tmp_path)
    run = RunDir(tmp_path / "run")
    stats = make_expert_data.main(["--task_family", "virtualhome", "--run_dir", str(run.root), "--source", str(path),
                                   "--check_replay", "--replay_keep", "replayed"])
    assert stats["dropped_by_replay"] == 2 and stats["kept"] == 1
    (kept,) = load_expert_data(run.expert_data())
    assert kept.meta["key"] == load_expert_data(path)[0].meta["key"]
    report = [json.loads(line) for line in (run.expert_data().parent / "replay.jsonl").read_text().splitlines()]
    assert [r["replayed"] for r in report] == [True, False, False]


def test_official_vh_data_does_not_abort_the_expert_stage(tmp_path, monkeypatch):
    """VH_DATA pointing at the official download (test tasks only, as the README says to export it): the
    expert trajectories come from the generated set, as the training tasks do."""
    official = tmp_path / "official"
    official.mkdir()
    for name in ("vh_seen_test.jsonl", "vh_unseen_test.jsonl"):
        (official / name).write_text((REPO / "data" / "virtualhome" / name).read_text())
    monkeypatch.setenv("VH_DATA", str(official))
    run = RunDir(tmp_path / "run")
    stats = make_expert_data.main(["--task_family", "virtualhome", "--run_dir", str(run.root), "--limit", "2"])
    assert stats["kept"] == 2 and len(load_expert_data(run.expert_data())) == 2
