"""Step accuracy on the real engines (generated ALFWorld games, VirtualHome tasks) with scripted policies whose
answers are known, so every count is exact; then the tiny model end to end, resuming, and bad input."""
import json
import sys
from pathlib import Path

import pytest

from eval.step_accuracy import chosen_steps, fingerprint_of, main as step_accuracy, normalize_action, parse_args
from eval_agent.cli import UserError
from eval_agent.envs import get_task_family
from eval_agent.expert_data import AS_TRAINING_DATA, load_expert_data
from eval_agent.guard import FingerprintMismatch
from eval_agent.layout import RunDir
from eval_agent.llm import Completion
from eval_agent.runner import ExpertPolicy, run_episodes
from eval_agent.store import write_json
from eval_agent.stats import wilson_interval
from eval_agent.trajectory import Trajectory, format_reply

REPO = Path(__file__).resolve().parent.parent

# ALFWorld answers by step index t mod 5: the expert's action, an action the engine refuses, a valid action
# the expert data never takes (it leaves no-op commands out), no action, and the expert's action in capitals
# (the engine refuses it: named, but not taken).
ALFWORLD_SCRIPT = ("expert", "fly to the moon", "inventory", None, "EXPERT")
# VirtualHome answers by parity: the expert's action in capitals at even t (the simulator takes any case), an
# action the simulator refuses at odd t.
VIRTUALHOME_SCRIPT = ("EXPERT", "dance wildly")


class ScriptedPolicy:
    """Replies by the step index t = len(prefix) from `script`, with the expert's action read from the
    stage's own expert.jsonl (the trajectories it replays; one folder, or a list of several splits' folders).
    `rounds`: how many episodes each act() call asked."""

    def __init__(self, out: Path | list[Path], script: tuple):
        self.outs, self.script, self.asked, self.rounds = out if isinstance(out, list) else [out], script, [], []
        self.expert: dict[str, list[str]] | None = None

    def act(self, episodes):
        if self.expert is None:
            self.expert = {t.meta["key"]: t.actions for out in self.outs for t in won_experts(out)}
        self.rounds.append(len(episodes))
        replies = []
        for ep in episodes:
            t = len(ep.prefix)
            self.asked.append((ep.task.key, t))
            answer = self.script[t % len(self.script)]
            if answer in ("expert", "EXPERT"):
                action = self.expert[ep.task.key][t]
                action = f"  {action.upper() if answer == 'EXPERT' else action} "
                replies.append(Completion(text=format_reply("I follow the plan.", action)))
            elif answer is None:
                replies.append(Completion(text="I am not sure what to do."))
            else:
                replies.append(Completion(text=format_reply("Let me try this.", answer)))
        return replies


def won_experts(out: Path) -> list[Trajectory]:
    """The expert runs the stage scores (it keeps a lost run too, as it went)."""
    rows = [json.loads(line) for line in (out / "expert.jsonl").read_text().splitlines()]
    return [Trajectory.from_dict({k: v for k, v in r.items() if k != "key"}) for r in rows if r["success"]]


def expected(out: Path, env: str, script: tuple, per_task: int | None = None) -> dict[str, int]:
    """Per category of the script, how many selected steps fall into it."""
    n = {"match": 0, "valid": 0, "no_action": 0, "refused_match": 0, "steps": 0}
    for traj in won_experts(out):
        for t in chosen_steps(len(traj.steps), per_task):
            match, valid, refused = outcome(env, script[t % len(script)])
            n["steps"] += 1
            n["match"] += match
            n["valid"] += valid
            n["refused_match"] += refused
            n["no_action"] += script[t % len(script)] is None
    return n


def outcome(env: str, answer: str | None) -> tuple[bool, bool, bool]:
    """(match, valid, refused_match) of a scripted answer."""
    if answer == "EXPERT":
        return (False, False, True) if env == "alfworld" else (True, True, False)
    return answer == "expert", answer in ("expert", "inventory"), False


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def test_normalize_action_and_chosen_steps():
    assert normalize_action("  Take Mug 1 from   CounterTop 1 ") == "take mug 1 from countertop 1"
    assert normalize_action("Walk to dining_room") == normalize_action("walk to dining room")
    assert normalize_action("go to desk 1") != normalize_action("go to desk 2")
    assert chosen_steps(5, None) == chosen_steps(5, 9) == [0, 1, 2, 3, 4]
    assert chosen_steps(10, 4) == [0, 3, 6, 9] and chosen_steps(7, 2) == [0, 6] and chosen_steps(7, 1) == [0]
    assert all(len(chosen_steps(n, k)) == min(n, k) for n in range(1, 30) for k in range(1, 12))


def test_alfworld_scripted_policy_counts_exactly(tmp_path):
    run = RunDir(tmp_path / "run")
    out = run.step_accuracy("scripted", "seen")
    policy = ScriptedPolicy(out, ALFWORLD_SCRIPT)
    args = ["--task_family", "alfworld", "--split", "seen", "--limit", "1", "--run_dir", str(run.root),
            "--label", "scripted", "--model", "scripted"]
    summary = step_accuracy(args, policy=policy)
    want = expected(out, "alfworld", ALFWORLD_SCRIPT)
    assert summary["expert_won"] == 1 and summary["skipped"] == {}
    assert {k: summary[k] for k in want} == want and min(want.values()) > 0  # every kind of answer occurs
    assert summary["step_accuracy"] == want["match"] / want["steps"]
    assert tuple(summary["step_accuracy_ci"]) == wilson_interval(want["match"], want["steps"])
    assert sum(v["steps"] for v in summary["per_task_type"].values()) == want["steps"]
    for r in records(out):
        answer = ALFWORLD_SCRIPT[r["t"] % len(ALFWORLD_SCRIPT)]
        assert (r["match"], r["valid"], r["refused_match"]) == outcome("alfworld", answer), r
        assert (r["observation"] == "Nothing happens.") == (answer in ("fly to the moon", "EXPERT")), r
    assert json.loads((out / "summary.json").read_text())["match"] == want["match"]
    assert sorted(policy.asked) == sorted((r["task_key"], r["t"]) for r in records(out))  # each step asked once

    # the prompt of step t holds the expert's steps 0..t-1 as the training data writes them
    expert = load_expert_data(out / "expert.jsonl")[0]
    assert not any(a in ("look", "inventory") for a in expert.actions)
    assert expert.steps[0].thought != f"The expert's next step is {expert.actions[0]}."

    # a rerun asks nothing; more steps per task are not needed here, fewer reuse what is there
    again = ScriptedPolicy(out, ALFWORLD_SCRIPT)
    assert step_accuracy(args + ["--steps_per_task", "3"], policy=again)["steps"] == 3 and again.asked == []
    assert len(records(out)) == want["steps"]


def test_splits_together_give_what_each_split_gives_alone(tmp_path):
    """--split seen,unseen: one act() call asks the steps of both splits, and each split's folder holds what a
    run of that split alone writes; a rerun asks nothing."""
    common = ["--task_family", "alfworld", "--limit", "1", "--steps_per_task", "3", "--label", "scripted",
              "--model", "scripted"]
    together, alone = RunDir(tmp_path / "together"), RunDir(tmp_path / "alone")
    outs = [together.step_accuracy("scripted", split) for split in ("seen", "unseen")]
    policy = ScriptedPolicy(outs, ALFWORLD_SCRIPT)
    both = step_accuracy(common + ["--split", "seen,unseen", "--run_dir", str(together.root)], policy=policy)
    assert sorted(both) == ["seen", "unseen"] and policy.rounds == [6]  # 3 steps of each split's one task
    for split, out in zip(("seen", "unseen"), outs):
        one = step_accuracy(common + ["--split", split, "--run_dir", str(alone.root)],
                            policy=ScriptedPolicy(alone.step_accuracy("scripted", split), ALFWORLD_SCRIPT))
        assert one["split"] == both[split]["split"] == split and one["steps"] == 3
        assert {k: v for k, v in one.items() if k not in ("run", "seconds", "run_card")} == \
               {k: v for k, v in both[split].items() if k not in ("run", "seconds", "run_card")}
        assert records(out) == records(alone.step_accuracy("scripted", split))
        assert json.loads((out / "summary.json").read_text())["match"] == one["match"]
        assert all(split in r["task_key"] for r in records(out))  # valid_seen/... or valid_unseen/...
    again = ScriptedPolicy(outs, ALFWORLD_SCRIPT)
    rerun = step_accuracy(common + ["--split", "seen,unseen", "--run_dir", str(together.root)], policy=again)
    assert again.asked == [] and rerun["unseen"]["run"]["episodes"] == 0
    assert all(rerun[s]["match"] == both[s]["match"] and len(records(o)) == 3 for s, o in zip(("seen", "unseen"), outs))
    for bad, message in ((["--split", "seen,unseen", "--out", str(tmp_path / "one")], "--out is one split's folder"),
                         (["--split", "seen,seen", "--run_dir", str(together.root)], "several different ones"),
                         (["--split", ",", "--run_dir", str(together.root)], "several different ones")):
        with pytest.raises(SystemExit, match=message):
            step_accuracy(common + bad, policy=ScriptedPolicy(outs, ALFWORLD_SCRIPT))


def test_a_task_key_in_two_splits_is_recorded_in_each(tmp_path):
    """The same tasks as both splits (--data_root): one runner call, each record in its own split's folder."""
    lines = (get_task_family("virtualhome").find_data_root() / "vh_unseen_test.jsonl").read_text().splitlines()[:2]
    for split in ("seen", "unseen"):
        (tmp_path / f"vh_{split}_test.jsonl").write_text("".join(line + "\n" for line in lines))
    run = RunDir(tmp_path / "run")
    outs = [run.step_accuracy("scripted", split) for split in ("seen", "unseen")]
    policy = ScriptedPolicy(outs, VIRTUALHOME_SCRIPT)
    both = step_accuracy(["--task_family", "virtualhome", "--split", "seen,unseen", "--data_root", str(tmp_path),
                          "--steps_per_task", "2", "--run_dir", str(run.root), "--label", "scripted", "--model", "m"],
                         policy=policy)
    assert policy.rounds == [8] and both["seen"]["steps"] == both["unseen"]["steps"] == 4
    assert records(outs[0]) == records(outs[1]) and len({r["key"] for r in records(outs[0])}) == 4


def test_virtualhome_scripted_policy_counts_exactly(tmp_path):
    out = tmp_path / "vh"
    summary = step_accuracy(["--task_family", "virtualhome", "--split", "unseen", "--limit", "3", "--out", str(out),
                             "--steps_per_task", "4"], policy=ScriptedPolicy(out, VIRTUALHOME_SCRIPT))
    want = expected(out, "virtualhome", VIRTUALHOME_SCRIPT, per_task=4)
    assert summary["expert_won"] == 3 and summary["skipped"] == {}
    assert {k: summary[k] for k in want} == want and 0 < want["match"] < want["steps"]
    assert want["valid"] == want["match"] and want["refused_match"] == 0  # any case is taken; "dance wildly" never
    assert all(r["observation"].startswith("Nothing happens.") != r["valid"] for r in records(out))


def test_tasks_the_expert_loses_are_listed_not_scored(tmp_path):
    """A task whose goal its program cannot reach: the expert's run is kept as it went and the task is left out."""
    family = get_task_family("virtualhome")
    rows = [json.loads(line) for line in (family.find_data_root() / "vh_unseen_test.jsonl").read_text().splitlines()[:2]]
    rows[1]["revised_graph"]["revised_add_edges"].append({"from_id": 1, "relation_type": "ON", "to_id": 2})
    (tmp_path / "vh_unseen_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    summary = step_accuracy(["--task_family", "virtualhome", "--split", "unseen", "--data_root", str(tmp_path),
                             "--expert_max_steps", "25", "--steps_per_task", "2", "--out", str(out)],
                            policy=ScriptedPolicy(out, VIRTUALHOME_SCRIPT))
    lost = family.load_tasks("unseen", data_root=tmp_path)[1].key
    assert summary["expert_won"] == 1 and summary["expert_failed"] == [lost] and summary["steps"] == 2
    assert {r["task_key"] for r in records(out)} == {family.load_tasks("unseen", data_root=tmp_path)[0].key}
    with pytest.raises(UserError, match="unknown VirtualHome split"):
        step_accuracy(["--task_family", "virtualhome", "--split", "dev", "--out", str(out)])


def test_virtualhome_expert_runs_read_like_the_training_data():
    family = get_task_family("virtualhome")
    task = family.load_tasks("train", limit=1)[0]
    runs = {}
    run_episodes([task], ExpertPolicy(), family.make_env, lambda ep: runs.__setitem__(ep.task.key, ep.traj),
                 progress=False)
    ours = AS_TRAINING_DATA["virtualhome"](runs[task.key], task.key)
    data = next(t for t in load_expert_data(family.find_data_root() / "vh_train_trajectories.jsonl")
                if t.meta["key"] == task.key)
    assert ours.task_text == data.task_text and ours.steps == data.steps and ours.success


def test_labels_name_models_as_in_evaluation():
    from eval_agent.smollm2 import default_model_dir

    run = RunDir("r")
    assert parse_args(["--task_family", "alfworld", "--run_dir", "r", "--label", "sft"]).model == str(run.sft_model)
    assert parse_args(["--task_family", "alfworld", "--run_dir", "r", "--label", "steca"]).model == str(run.steca_model)
    assert parse_args(["--task_family", "alfworld", "--run_dir", "r"]).model == str(default_model_dir())  # label base
    assert parse_args(["--task_family", "alfworld", "--run_dir", "r", "--base_model", "m0"]).model == "m0"
    assert parse_args(["--task_family", "alfworld", "--run_dir", "r", "--label", "mine", "--model", "m1"]).model == "m1"
    with pytest.raises(SystemExit, match="--label 'mine' names no model of the run"):
        parse_args(["--task_family", "alfworld", "--run_dir", "r", "--label", "mine"])


def test_bad_input(tmp_path):
    with pytest.raises(SystemExit):
        step_accuracy(["--task_family", "alfworld", "--model", "m"])  # neither --out nor --run_dir/--label
    with pytest.raises(SystemExit):
        step_accuracy(["--task_family", "alfworld", "--out", str(tmp_path), "--env_args", "[1]"])
    out = tmp_path / "broken"
    argv = ["--task_family", "alfworld", "--split", "seen", "--limit", "1", "--out", str(out)]
    write_json(out / "fingerprint.json", fingerprint_of(parse_args(argv, scripted=True)))  # this run's own
    (out / "steps.jsonl").write_text('{"key": "a"}\nnot json\n')
    with pytest.raises(SystemExit, match=r"steps.jsonl:2: not valid JSON.*--overwrite"):
        step_accuracy(argv, policy=ScriptedPolicy(out, ALFWORLD_SCRIPT))



def test_tiny_model_through_the_stage_script_and_settings_guard(tmp_path, tiny_model_dir):
    """eval/step_accuracy.sh with LABEL=sft finds the run's SFT model through the layout and passes only the
    knobs that are set; a rerun with other settings is refused, --overwrite starts fresh."""
    import os
    import subprocess

    run = RunDir(tmp_path / "run")
    run.sft.mkdir(parents=True)
    run.sft_model.symlink_to(tiny_model_dir)
    env = {**os.environ, "TASK_FAMILY": "alfworld", "RUN_DIR": str(run.root), "LABEL": "sft", "SPLIT": "unseen",
           "EVAL_LIMIT": "1", "STEPS_PER_TASK": "2", "MAX_NEW_TOKENS": "8", "PYTHON": sys.executable}
    done = subprocess.run(["bash", "eval/step_accuracy.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = run.step_accuracy("sft", "unseen")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["model"] == str(run.sft_model) and summary["label"] == "sft"
    assert len(records(out)) == 2 and all(r["reply"] is not None for r in records(out))
    card = json.loads((out / "config.json").read_text())
    assert card["stage"] == "eval.step_accuracy" and card["args"]["concurrency"] == 16  # Python's default

    args = ["--task_family", "alfworld", "--split", "unseen", "--limit", "1", "--steps_per_task", "2",
            "--run_dir", str(run.root), "--label", "sft"]
    with pytest.raises(FingerprintMismatch, match="other settings.*model"):
        step_accuracy(args + ["--max_new_tokens", "8", "--model", "another/model"],
                      policy=ScriptedPolicy(out, ALFWORLD_SCRIPT))
    with pytest.raises(FingerprintMismatch, match="other settings.*max_new_tokens"):
        step_accuracy(args + ["--max_new_tokens", "9", "--model", str(run.sft_model)],
                      policy=ScriptedPolicy(out, ALFWORLD_SCRIPT))
    fresh = step_accuracy(args + ["--model", "another/model", "--overwrite"], policy=ScriptedPolicy(out, ALFWORLD_SCRIPT))
    old = out.with_name("step_accuracy.old")
    assert fresh["steps"] == 2 and (old / "steps.jsonl").is_file() and (old / "expert.jsonl").is_file()


def test_a_first_step_without_an_action_is_counted_not_a_crash(tmp_path):
    """At t = 0 nothing has been stepped yet: a reply without `Action:` there is no action, not an index error."""
    out = tmp_path / "vh"
    summary = step_accuracy(["--task_family", "virtualhome", "--split", "unseen", "--limit", "2", "--out", str(out),
                             "--steps_per_task", "2"], policy=ScriptedPolicy(out, (None, "EXPERT")))
    first = [r for r in records(out) if r["t"] == 0]
    assert first and all(r["action"] is None and r["valid"] is False for r in first)
    assert summary["no_action"] == sum(r["action"] is None for r in records(out)) >= len(first)
    assert summary["skipped"] == {}
