"""The calibration-ability evaluation (eval.calibration, the paper's Figure 4) on the real VirtualHome simulator:
histories built from a run's D_c records (seen) and from the SFT model's step-accuracy records (unseen) replay
exactly (every replayed reply and observation is the recorded one), a tampered observation is caught and not
scored, the built-in expert recovers from every clean history, and a rerun resumes."""
import json
from pathlib import Path

from eval.calibration import main as calibration, select, History
from eval.step_accuracy import main as step_accuracy
from eval_agent.layout import RunDir
from eval_agent.variants import VARIANTS, init as init_variant
from eval_agent.llm import Completion
from eval_agent.records import read_step_records
from eval_agent.runner import ExpertPolicy
from eval_agent.trajectory import format_reply
from sampling.generate_steps import main as generate_steps

REPO = Path(__file__).resolve().parent.parent
VH_TRAJECTORIES = REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl"
DETOUR = "Walk to bathroom"  # a step the simulator accepts in every scene-1 task, and no expert's first steps


class Detour:
    """Step accuracy's scripted SFT model: at odd t it walks to the bathroom instead of the expert's step."""

    def act(self, episodes):
        replies = []
        for ep in episodes:
            action = DETOUR if len(ep.prefix) % 2 else ep.env.expert_action()
            replies.append(Completion(text=format_reply("I go on.", action)))
        return replies


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_replays(out: Path, histories: dict[str, tuple[list[str], list[str]]]) -> list[dict]:
    """Every scored episode replayed exactly its history's replies and got exactly the recorded observations."""
    episodes = read(out / "episodes.jsonl")
    for e in episodes:
        replies, observations = histories[e["key"]]
        steps = e["trajectory"]["steps"][: e["replayed"]]
        assert e["replayed"] == len(replies) == len(observations)
        assert [s["text"] for s in steps] == replies, e["key"]
        assert ([s["observation"] for s in steps] == observations) == (e["skip"] is None), e["key"]
    return episodes


def test_unseen_histories_from_step_accuracy_replay_exactly(tmp_path):
    run = RunDir(tmp_path / "virtualhome")
    base = ["--task_family", "virtualhome", "--run_dir", str(run.root)]
    step_accuracy(base + ["--split", "unseen", "--label", "sft", "--limit", "3"], policy=Detour())
    acc = run.step_accuracy("sft", "unseen")
    deviations = [r for r in read(acc / "steps.jsonl") if r["valid"] and not r["match"]]
    assert deviations and all(r["action"] == DETOUR for r in deviations)
    experts = {r["key"]: r for r in read(acc / "expert.jsonl")}
    want = {}
    for r in deviations:
        steps = experts[r["task_key"]]["steps"][: r["t"]]
        replies, observations = [s["text"] for s in steps], [s["observation"] for s in steps]
        want[f"{r['key']}|deviated"] = (replies + [r["reply"]], observations + [r["observation"]])
        want[f"{r['key']}|clean"] = (replies, observations)

    argv = base + ["--split", "unseen", "--label", "expert"]
    summary = calibration(argv, policy=ExpertPolicy())
    out = run.calibration("expert", "unseen")
    episodes = check_replays(out, want)
    assert len(episodes) == 2 * len(deviations) == 2 * summary["histories"] and summary["available"] == len(deviations)
    assert summary["scored"] == len(deviations) and summary["skipped"] == {}
    # the built-in expert plays the rest of the program: from every clean history it wins
    assert summary["clean"]["k"] == summary["clean"]["n"] == len(deviations)
    assert summary["deviated"]["k"] == sum(e["success"] for e in episodes if e["condition"] == "deviated")
    paired = summary["paired"]
    assert paired["recovered"] == summary["deviated"]["k"] and paired["recovered"] + paired["lost"] == len(deviations)
    assert summary["sources"]["step_records"] == str(acc / "steps.jsonl")

    # a rerun resumes (nothing played); a smaller limit only selects, from the same draw
    again = calibration(argv + ["--limit", "1"], policy=ExpertPolicy())
    assert again["run"]["episodes"] == 0 and again["histories"] == 1 and again["available"] == len(deviations)

    # an observation that is not what the simulator gives: that replay is caught and not scored
    records = read(acc / "steps.jsonl")
    tampered = next(r for r in records if r["key"] == deviations[0]["key"])
    tampered["observation"] = "You walk to the moon."
    (acc / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = calibration(argv + ["--overwrite"], policy=ExpertPolicy())
    assert summary["skipped"] == {"replay_differs": 1} and summary["scored"] == len(deviations) - 1
    bad = next(e for e in read(out / "episodes.jsonl") if e["key"] == f"{deviations[0]['key']}|deviated")
    assert bad["skip"] == "replay_differs" and bad["trajectory"]["steps"][bad["replayed"] - 1]["observation"] != \
        "You walk to the moon."


def test_seen_histories_from_d_c_rows_replay_exactly(tmp_path, tiny_model_dir):
    """Real explore records of the tiny model on a VirtualHome train task, rows of D_c for the ones with a step."""
    run = RunDir(tmp_path / "virtualhome")
    run.expert_data().parent.mkdir(parents=True)
    run.expert_data().write_text(VH_TRAJECTORIES.read_text().splitlines()[0] + "\n")
    generate_steps(["--task_family", "virtualhome", "--kind", "explore", "--run_dir", str(run.root), "--model",
                    str(tiny_model_dir), "--max_new_tokens", "6", "--max_steps", "8", "--icl_num", "0"])
    records = [r for r in read_step_records(run.steps("explore")) if r.step is not None and r.t >= 1]
    assert records
    run.data_collection.mkdir(parents=True)
    (run.data_collection / "calibration.jsonl").write_text("".join(
        json.dumps({"key": f"calibration|{r.task_key}|t{r.t}", "task_key": r.task_key, "t": r.t}) + "\n"
        for r in records))
    expert = json.loads(run.expert_data().read_text())
    want = {}
    for r in records:
        observations = [s["observation"] for s in expert["steps"][: r.t]]
        want[f"{r.task_key}|t{r.t}|deviated"] = (r.prefix + [r.step["text"]], observations + [r.step["observation"]])
        want[f"{r.task_key}|t{r.t}|clean"] = (r.prefix, observations)
    summary = calibration(["--task_family", "virtualhome", "--run_dir", str(run.root), "--split", "seen", "--label",
                           "expert", "--limit", "2", "--seed", "1"], policy=ExpertPolicy())
    episodes = check_replays(run.calibration("expert", "seen"), want)
    assert len(episodes) == 2 * min(2, len(records)) and summary["available"] == len(records)
    assert summary["skipped"] == {} and summary["clean"]["k"] == summary["clean"]["n"] == summary["scored"]


def test_the_draw_is_seeded_and_kept_in_key_order():
    hs = [History(f"t{i}|t1", f"t{i}", 1, [], [], "x", "y", "z") for i in range(10)]
    first = select(hs, 4, seed=0)
    assert first == select(list(reversed(hs)), 4, seed=0) and len(first) == 4
    assert [h.task_key for h in first] == sorted(h.task_key for h in first)
    assert select(hs, 4, seed=1) != first and select(hs, 20, seed=0) == hs


class AfterDeviation:
    """A scripted model for the next-action probe: after a deviated history it either takes the expert's action the
    deviation replaced (`returns`) or the deviated action again."""

    def __init__(self, experts: dict[str, dict], go_back: bool):
        self.experts, self.go_back = experts, go_back

    def act(self, episodes):
        replies = []
        for ep in episodes:
            t = len(ep.prefix) - 1  # the deviated step is the last of the prefix
            action = self.experts[ep.task.key]["steps"][t]["action"] if self.go_back else DETOUR
            replies.append(Completion(text=format_reply("I go back.", action)))
        return replies


def test_next_action_probe_on_held_out_histories_of_the_seen_split(tmp_path):
    """Histories from the SFT model's step-accuracy records of the seen test split (held out from training); the
    next step after each: a model that goes back to the expert's action returns on every one, one that repeats the
    deviation on none; a variant plays the main run's histories into its own folder."""
    run = RunDir(tmp_path / "virtualhome")
    base = ["--task_family", "virtualhome", "--run_dir", str(run.root)]
    step_accuracy(base + ["--split", "seen", "--label", "sft", "--limit", "3"], policy=Detour())
    acc = run.step_accuracy("sft", "seen")
    deviations = [r for r in read(acc / "steps.jsonl") if r["valid"] and not r["match"]]
    experts = {r["key"]: r for r in read(acc / "expert.jsonl")}
    assert deviations
    argv = base + ["--split", "seen", "--probe", "next_action", "--histories", "step_accuracy"]

    back = calibration(argv + ["--label", "steca"], policy=AfterDeviation(experts, go_back=True))
    assert back["histories_from"] == "step_accuracy" and back["probe"] == "next_action"
    assert back["scored"] == back["histories"] == len(deviations) and back["skipped"] == {}
    records = read(run.calibration("steca", "seen", "next_action") / "episodes.jsonl")
    assert back["returns"]["k"] == len(deviations) and back["repeats"]["k"] == 0
    # after the detour the simulator may refuse the expert's action (it was to act on something back there)
    assert back["returns_accepted"]["k"] == back["valid"]["k"] == sum(r["valid"] for r in records) > 0
    assert sorted(r["key"] for r in records) == sorted(r["key"] for r in deviations)
    assert all(r["expert_action"] == experts[r["task_key"]]["steps"][r["t"]]["action"] for r in records)
    assert not run.calibration("steca", "seen").exists()  # the episode probe's folder is another

    stuck = calibration(argv + ["--label", "sft"], policy=AfterDeviation(experts, go_back=False))
    assert stuck["returns"]["k"] == 0 and stuck["repeats"]["k"] == stuck["scored"] == len(deviations)
    assert stuck["returns_accepted"]["k"] == 0

    variant = init_variant(str(run.root), VARIANTS["wo_dc"])
    mirrored = calibration(["--task_family", "virtualhome", "--run_dir", str(variant.root)] + argv[4:]
                           + ["--label", "steca"], policy=AfterDeviation(experts, go_back=True))
    assert mirrored["sources"]["step_records"] == str(acc / "steps.jsonl") and mirrored["histories"] == len(deviations)
    assert (variant.calibration("steca", "seen", "next_action") / "summary.json").is_file()
