"""Stage 2 (sampling): step records and Monte-Carlo rollouts on the real engines with the tiny model.

Expert trajectories come from alfworld's built-in expert on the generated games, and from the
generated VirtualHome training trajectories (the shortest ones, to keep rollouts cheap)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval_agent.envs.alfworld import AlfWorldEnv, load_tasks
from eval_agent.records import judged, read_rollouts, read_step_records, rollout_key
from eval_agent.runner import ExpertPolicy, run_episodes
from eval_agent.store import read_jsonl
from eval_agent.layout import RunDir
from sampling.expert_tasks import shard_of
from sampling.generate_steps import main as generate_steps
from sampling.mc_rollouts import main as mc_rollouts
from sampling.merge import main as merge

REPO = Path(__file__).resolve().parent.parent
VH_TRAJECTORIES = REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl"
FAST = ["--max_new_tokens", "8", "--max_steps", "6", "--concurrency", "4"]


@pytest.fixture(scope="module")
def vh_expert(tmp_path_factory) -> Path:
    """The four shortest generated VirtualHome expert trajectories (4-5 steps)."""
    rows = sorted((json.loads(line) for line in VH_TRAJECTORIES.read_text().splitlines()), key=lambda r: len(r["steps"]))
    path = tmp_path_factory.mktemp("vh") / "expert.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return path


def keys_of(path: Path) -> list[str]:
    """Every key line by line, duplicates included (what a resumed run must not produce)."""
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


def vh_args(expert: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--task", "virtualhome", "--expert_data", str(expert), "--run_dir", str(run_dir), *extra]


def test_expert_records_reproduce_alfworld_expert(tmp_path):
    tasks = load_tasks("train")[:2]
    trajs = {}
    run_episodes(tasks, ExpertPolicy(), lambda: AlfWorldEnv(expert=True), lambda ep: trajs.__setitem__(ep.task.key, ep.traj),
                 concurrency=2, progress=False)
    expert = tmp_path / "expert.jsonl"
    expert.write_text("".join(json.dumps({"key": k, **t.to_dict()}) + "\n" for k, t in trajs.items()))

    summary = generate_steps(["--task", "alfworld", "--kind", "expert", "--expert_data", str(expert), "--run_dir", str(tmp_path)])
    assert summary["expert"]["written"] == sum(len(t.steps) for t in trajs.values())
    for rec in read_step_records(RunDir(tmp_path).steps("expert")):
        step = trajs[rec.task_key].steps[rec.t]
        assert (rec.step["action"], rec.step["observation"]) == (step.action, step.observation), rec.key
        assert rec.prefix == [s.text for s in trajs[rec.task_key].steps[: rec.t]]
        last = rec.t == len(trajs[rec.task_key].steps) - 1
        assert rec.done == last and rec.step_success == last and rec.trajectory is None
    assert (RunDir(tmp_path).sampling / "config.json").is_file()
    # rerun: nothing left to do
    assert generate_steps(["--task", "alfworld", "--kind", "expert", "--expert_data", str(expert),
                           "--run_dir", str(tmp_path)])["expert"]["written"] == 0


def test_mc_killed_midway_resumes_every_key_once(tmp_path, vh_expert, tiny_model_dir):
    generate_steps(vh_args(vh_expert, tmp_path, "--kind", "expert"))
    every = read_step_records(RunDir(tmp_path).steps("expert"))
    records = [r for r in every if judged(r.kind, r.t)]  # MC rolls out what data collection reads: expert t >= 1
    assert len(records) == len(every) - len({r.task_key for r in every})
    n = 3
    cmd = [sys.executable, "-m", "sampling.mc_rollouts", "--task", "virtualhome", "--kind", "expert", "--n", str(n),
           "--model", str(tiny_model_dir), "--run_dir", str(tmp_path), *FAST, "--concurrency", "2"]
    out = RunDir(tmp_path).rollouts("expert")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    copied = sum(r.done for r in records) * n  # written first, before any model call
    while proc.poll() is None and time.monotonic() < deadline:
        if out.is_file() and len(out.read_text().splitlines()) >= copied + 2:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert copied + 2 <= len(keys_of(out)) < len(records) * n, "the kill should land midway"

    summary = mc_rollouts(cmd[3:])
    assert summary["expert"]["skipped_done"] > 0
    keys = keys_of(out)
    expected = {rollout_key(r.key, i) for r in records for i in range(n)}
    assert len(keys) == len(set(keys)) == len(expected) == n * len(records)  # MC counts = N x step records
    assert set(keys) == expected
    rollouts = read_rollouts(out)
    done = {r.key for r in records if r.done}
    assert done and all(r.from_record == (r.record_key in done) for r in rollouts)
    assert all(r.success for r in rollouts if r.from_record)  # the expert's last step wins


def test_shards_partition_keys_and_merge_checks_completeness(tmp_path, vh_expert):
    shards = 3
    for i in range(shards):
        generate_steps(vh_args(vh_expert, tmp_path, "--kind", "expert", "--num_shards", str(shards), "--shard_id", str(i)))
    generate_steps(vh_args(vh_expert, tmp_path / "whole", "--kind", "expert"))
    whole = set(keys_of(RunDir(tmp_path / "whole").steps("expert")))
    parts = [keys_of(RunDir(tmp_path).steps("expert", shards, i)) for i in range(shards)]
    assert set().union(*parts) == whole and sum(map(len, parts)) == len(whole)
    for i, part in enumerate(parts):  # a task and all its steps go to one shard
        assert all(shard_of(k.split("|")[0], shards) == i for k in part)

    margs = ["--what", "steps", "--kind", "expert", "--num_shards", str(shards), "--task", "virtualhome",
             "--expert_data", str(vh_expert), "--run_dir", str(tmp_path)]
    assert merge(margs)["expert"]["records"] == len(whole)
    assert set(keys_of(RunDir(tmp_path).steps("expert"))) == whole

    victim = next(RunDir(tmp_path).steps("expert", shards, i) for i in range(shards) if parts[i])
    lines = victim.read_text().splitlines(keepends=True)
    victim.write_text("".join(lines[1:]))
    with pytest.raises(SystemExit, match=r"1 missing \(e\.g\. "):
        merge(margs)


class BrokenEnv:
    """A VirtualHome environment whose engine raises on one action of one task."""

    def __init__(self, inner, task_key: str, action: str):
        self.inner, self.task_key, self.action, self.name = inner, task_key, action, inner.name

    def reset(self, task):
        self.current = task.key
        return self.inner.reset(task)

    def step(self, action):
        if self.current == self.task_key and action == self.action:
            raise RuntimeError("engine crashed")
        return self.inner.step(action)

    def expert_action(self):
        return self.inner.expert_action()

    def close(self):
        self.inner.close()


def test_crash_in_one_episode_is_recorded_and_the_stage_carries_on(tmp_path, vh_expert, tiny_model_dir, monkeypatch):
    import eval_agent.envs.virtualhome as vh

    first = json.loads(vh_expert.read_text().splitlines()[0])
    real_make_env = vh.make_env
    monkeypatch.setattr(vh, "make_env", lambda **kw: BrokenEnv(real_make_env(**kw), first["key"], first["steps"][1]["action"]))
    summary = generate_steps(vh_args(vh_expert, tmp_path, "--kind", "both", "--model", str(tiny_model_dir), *FAST))
    for kind in ("expert", "explore"):
        records = read_step_records(RunDir(tmp_path).steps(kind))
        assert len(records) == summary[kind]["records_expected"] == summary[kind]["written"]
        broken = [r for r in records if r.task_key == first["key"] and r.t >= (1 if kind == "expert" else 2)]
        assert broken and all(r.done and r.termination == "env_error" and "engine crashed" in r.error for r in broken)
        assert all(r.error is None for r in records if r.task_key != first["key"])
    # the random tiny model writes no `Action:`: an invalid step, recorded with the original's observation
    explore = read_step_records(RunDir(tmp_path).steps("explore"))
    assert any(r.step and r.step["action"] is None and r.step["observation"].startswith("Error Input") for r in explore)
    for r in explore:  # the greedy episode starts with the replayed expert prefix
        if r.error is None:
            assert [s["text"] for s in r.trajectory["steps"][: r.t]] == r.prefix and r.trajectory["steps"][r.t] == r.step
    # rollouts of records an error ended are copied, not rolled out, and the stage goes on (every record: MIN_STEP 0)
    mc = mc_rollouts(["--task", "virtualhome", "--kind", "explore", "--n", "2", "--model", str(tiny_model_dir),
                      "--run_dir", str(tmp_path), "--min_step", "0", *FAST])
    assert mc["explore"]["rollouts_expected"] == 2 * len(explore) == len(keys_of(RunDir(tmp_path).rollouts("explore")))
    assert mc["explore"]["copied_from_done_records"] >= 2


def test_both_kinds_roll_out_in_one_runner_call_each_into_its_own_file(tmp_path, vh_expert, tiny_model_dir, monkeypatch):
    import sampling.mc_rollouts as mc

    generate_steps(vh_args(vh_expert, tmp_path, "--kind", "both", "--model", str(tiny_model_dir), *FAST))
    calls = []
    real = mc.run_for_policy
    monkeypatch.setattr(mc, "run_for_policy", lambda jobs, *a, **k: calls.append(list(jobs)) or real(jobs, *a, **k))
    summary = mc_rollouts(["--task", "virtualhome", "--kind", "both", "--n", "2", "--model", str(tiny_model_dir),
                           "--run_dir", str(tmp_path), *FAST])
    assert len(calls) == 1 and {task.meta["rollout"]["kind"] for task, _ in calls[0]} == {"expert", "explore"}
    for kind in ("expert", "explore"):
        records = [r for r in read_step_records(RunDir(tmp_path).steps(kind)) if judged(kind, r.t)]
        rollouts = read_rollouts(RunDir(tmp_path).rollouts(kind))
        assert {r.key for r in rollouts} == {rollout_key(r.key, i) for r in records for i in range(2)}
        assert summary[kind]["records_before_min_step"] == (1 if kind == "expert" else 2) * len({r.task_key for r in records})
        assert all(r.kind == kind for r in rollouts) and summary[kind]["rolled_out"] == len(calls[0]) - sum(
            task.meta["rollout"]["kind"] != kind for task, _ in calls[0])
    assert mc_rollouts(["--task", "virtualhome", "--kind", "both", "--n", "2", "--model", str(tiny_model_dir),
                        "--run_dir", str(tmp_path), *FAST])["explore"]["rolled_out"] == 0 and len(calls) == 1


def test_bad_expert_file_names_file_line_and_field(tmp_path, vh_expert, tiny_model_dir):
    good = vh_expert.read_text().splitlines()
    missing = tmp_path / "missing.jsonl"
    row = json.loads(good[1])
    del row["steps"]
    missing.write_text(good[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(SystemExit, match=rf"{missing}: line 2: missing field 'steps'"):
        generate_steps(vh_args(missing, tmp_path, "--kind", "expert"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(good[0] + "\n{not json\n")
    with pytest.raises(SystemExit, match=rf"{broken}:2: not valid JSON"):
        generate_steps(vh_args(broken, tmp_path, "--kind", "expert"))
    # a step-record file missing a field, read by the MC stage
    steps = tmp_path / "steps.jsonl"
    generate_steps(vh_args(vh_expert, tmp_path, "--kind", "expert", "--limit", "1"))
    rec = next(read_jsonl(RunDir(tmp_path).steps("expert")))
    del rec["prefix"]
    steps.write_text(json.dumps(rec) + "\n")
    with pytest.raises(SystemExit, match=rf"{steps}:1: missing field 'prefix'"):
        mc_rollouts(["--task", "virtualhome", "--kind", "expert", "--steps", str(steps), "--run_dir", str(tmp_path),
                     "--model", str(tiny_model_dir)])
