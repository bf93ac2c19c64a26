"""Stage 3 (data_collection): step rewards, deviation detection, nDTW weights, the training sets and
their export, on hand-built records with exact toy embeddings, and on a real tiny sampling run."""
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from data_collection import datasets
from data_collection.build import main as build
from data_collection.deviation import DeviationConfig, check_deviation
from data_collection.embeddings import ActionEmbeddings, HFEmbedder, make_embedder, minilm_dir
from data_collection.ndtw import action_deviation, ndtw
from data_collection.step_rewards import step_rewards
from eval_agent.expert_data import alfworld_expert_trajectory
from eval_agent.envs.alfworld import INSTRUCTION, AlfWorldEnv, load_tasks
from eval_agent.guard import json_digest
from eval_agent.records import Rollout, StepRecord, read_step_records, rollout_key, step_key
from eval_agent.runner import ExpertPolicy, run_episodes
from eval_agent.store import read_jsonl
from eval_agent.trajectory import Step, Trajectory
from eval_agent.layout import RunDir
from sampling.generate_steps import main as generate_steps
from sampling.mc_rollouts import main as mc_rollouts


class ToyEmbedder:
    """Fixed vectors for named strings; any other string gets its own one-hot axis (similarity 0
    to every other string), so every distance in a test is exact."""

    name = "toy"

    def __init__(self, vectors: dict[str, list[float]] | None = None, dim: int = 64):
        self.vectors = {k: np.asarray(v, dtype=float) for k, v in (vectors or {}).items()}
        self.dim, self.next_axis, self.calls = dim, 0, 0

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = []
        for text in texts:
            if text not in self.vectors:
                vec = np.zeros(self.dim)
                vec[self.next_axis] = 1.0
                self.next_axis += 1
                self.vectors[text] = vec
            v = np.zeros(self.dim)
            v[: len(self.vectors[text])] = self.vectors[text]
            out.append(v / np.linalg.norm(v))
        return np.stack(out)


def toy(vectors: dict[str, list[float]] | None = None) -> ActionEmbeddings:
    return ActionEmbeddings(ToyEmbedder(vectors))


# ---- hand-built records ---------------------------------------------------------------------------

TASK = "You are in the middle of a room. Looking quickly around you, you see a cabinet 1 and a countertop 1.\n\nYour task is to: put a mug in cabinet."
ACTIONS = ["go to countertop 1", "take mug 1 from countertop 1", "go to cabinet 1", "open cabinet 1", "put mug 1 in/on cabinet 1"]


def expert_traj(actions: list[str] = ACTIONS) -> Trajectory:
    steps = [Step.expert(f"I will {a}.", a, f"obs after {a}") for a in actions]
    return Trajectory(task_text=TASK, steps=steps, success=True, reward=1.0, termination="success")


def reply(action: str | None) -> Step:
    text = f"Thought: maybe {action}.\nAction: {action}" if action else "Thought: hmm, not sure"
    return Step.from_reply(text, f"obs after {action}" if action else "Error Input. Your input must contains 'Action: '")


def expert_record(task_key: str, expert: Trajectory, t: int) -> StepRecord:
    last = t == len(expert.steps) - 1
    return StepRecord(key=step_key(task_key, t, "expert"), task_key=task_key, expert_key=task_key, env="alfworld",
                      task_type=None, t=t, kind="expert", task_text=expert.task_text, prefix=[s.text for s in expert.steps[:t]],
                      step=asdict(expert.steps[t]), done=last, step_success=last, step_termination="success" if last else None,
                      success=last, termination="success" if last else None, trajectory=None, error=None)


def explore_record(task_key: str, expert: Trajectory, t: int, step: Step, rest: list[Step], success: bool) -> StepRecord:
    traj = Trajectory(task_text=expert.task_text, steps=expert.steps[:t] + [step] + rest, success=success,
                      termination="success" if success else "max_steps")
    return StepRecord(key=step_key(task_key, t, "explore"), task_key=task_key, expert_key=task_key, env="alfworld",
                      task_type=None, t=t, kind="explore", task_text=expert.task_text, prefix=[s.text for s in expert.steps[:t]],
                      step=asdict(step), done=False, step_success=False, step_termination=None, success=success,
                      termination=traj.termination, trajectory=traj.to_dict(), error=None)


def rollouts_for(rec: StepRecord, mc: float | None, n: int) -> list[Rollout]:
    """n rollouts whose mean success is `mc` (None: no rollouts)."""
    if mc is None:
        return []
    wins = round(mc * n)
    return [Rollout(key=rollout_key(rec.key, i), record_key=rec.key, task_key=rec.task_key, t=rec.t, kind=rec.kind,
                    sample=i, success=i < wins, reward=float(i < wins), steps=1, termination=None, actions=[],
                    from_record=False, error=None) for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


N = 5
EXPERT_MC = [0.2, 0.4, 0.6, 0.8, 1.0]


def fixture_run(run_dir: Path) -> dict:
    """Two tasks with known outcomes (n = 5 rollouts per record):
    A: the greedy episode from t=0 copies the expert and wins -> one explored (D_e) row, nDTW 0;
       t=2: the same action as the expert (not deviated; an expert_sub row: MC 0.2 < 0.6);
       t=3: no rollouts (missing MC).
    B: the greedy episode from t=0 fails -> one expert_full row;
       t=2: "go to drawer 1", MC 0 <= expert MC(1) 0.4, continuation of 2 steps failed -> deviated (D_c);
            expert MC(2) 0.6 > 0 + 0.01 and failed -> also an expert_sub row;
       t=3: a reply without `Action:` with MC 0.8 <= 0.6? no -> not deviated (reward higher);
       t=4: "look", MC 0 but its greedy continuation is empty -> not deviated.
    C: t=2: an empty reply, MC 0 -> deviated (a D_c row: the empty reply stays in its prompt) and an
       expert_sub row (the empty reply on its rejected side)."""
    expert = expert_traj()
    ka, kb, kc = "train/task-a/trial_1", "train/task-b/trial_1", "train/task-c/trial_1"
    experts = [{"key": k, **expert.to_dict()} for k in (ka, kb, kc)]
    write_jsonl(run_dir / "expert.jsonl", experts)
    records = {"expert": [], "explore": []}
    mc = {}
    for k in (ka, kb, kc):
        for t in range(len(ACTIONS)):
            rec = expert_record(k, expert, t)
            records["expert"].append(rec)
            mc[rec.key] = EXPERT_MC[t]
    wrong = [reply("go to sinkbasin 1"), reply("look")]
    explore = [
        (explore_record(ka, expert, 0, expert.steps[0], expert.steps[1:], True), 0.6),
        (explore_record(ka, expert, 2, reply(ACTIONS[2]), wrong, False), 0.2),
        (explore_record(ka, expert, 3, reply("go to drawer 1"), wrong, False), None),
        (explore_record(kb, expert, 0, reply("go to drawer 1"), wrong, False), 0.0),
        (explore_record(kb, expert, 2, reply("go to drawer 1"), wrong, False), 0.0),
        (explore_record(kb, expert, 3, reply(None), wrong, False), 0.8),
        (explore_record(kb, expert, 4, reply("look"), [], False), 0.0),
        (explore_record(kc, expert, 2, Step.from_reply(" \n ", "Error Input. Your input must contains 'Action: '"),
                        wrong, False), 0.0),
    ]
    for rec, value in explore:
        records["explore"].append(rec)
        mc[rec.key] = value
    for kind in ("expert", "explore"):
        write_jsonl(RunDir(run_dir).steps(kind), [r.to_dict() for r in records[kind]])
        write_jsonl(RunDir(run_dir).rollouts(kind),
                    [ro.to_dict() for r in records[kind] for ro in rollouts_for(r, mc[r.key], N)])
    return {"expert": expert, "a": ka, "b": kb, "c": kc}


def fixture_args(run_dir: Path, *extra: str) -> list[str]:
    return ["--task", "alfworld", "--run_dir", str(run_dir), "--expert_data", str(run_dir / "expert.jsonl"),
            "--n", str(N), *extra]


# ---- unit tests -------------------------------------------------------------------------------------

def test_step_rewards_mean_count_and_missing():
    expert = expert_traj()
    recs = [expert_record("k", expert, t) for t in range(4)]
    rolls = rollouts_for(recs[0], 0.6, 5) + rollouts_for(recs[1], 0.5, 2) + rollouts_for(recs[2], 1.0, 6)
    rolls += [rolls[0]]  # a key written twice counts once
    rolls += rollouts_for(expert_record("other", expert, 0), 1.0, 1)  # a record not in the step file
    rewards, stats = step_rewards(recs, rolls, n=5)
    assert [(rewards[r.key].reward, rewards[r.key].samples) for r in recs] == [(0.6, 5), (0.5, 2), (1.0, 6), (None, 0)]
    assert stats["missing_samples"] == 1 and stats["missing_examples"] == [recs[3].key]
    assert (stats["fewer_samples"], stats["more_samples"]) == (1, 1)
    assert (stats["duplicate_rollout_keys"], stats["rollouts_of_unknown_records"]) == (1, 1)
    # MC rolls out only what is judged: the expert's step 0 (and explored steps 0 and 1) need no rollouts
    explored = [StepRecord(**{**vars(r), "key": r.key.replace("expert", "explore"), "kind": "explore"}) for r in recs]
    _, stats = step_rewards([recs[0], *explored[:2]], [], n=5)
    assert stats["missing_samples"] == 0 and stats["not_judged_without_samples"] == 3
    _, stats = step_rewards([recs[0], *explored[:2]], [], n=5, min_step=1)
    assert stats["missing_samples"] == 2 and stats["missing_examples"] == [recs[0].key, explored[1].key]


def judge(step: Step, r_explored, r_prev, cfg=DeviationConfig(), rest=None, success=False, t=2, emb=None, expert_step=None):
    expert = expert_traj()
    rec = explore_record("k", expert, t, step, [reply("look")] if rest is None else rest, success)
    return check_deviation(rec, expert_step or expert.steps[t], r_explored, r_prev, emb or toy(), cfg)


def test_deviation_reward_criterion_and_its_boundaries():
    step = reply("go to drawer 1")
    assert judge(step, 0.4, 0.4)["deviated"]  # equal: deviated under the original's <=
    assert not judge(step, 0.4, 0.4, DeviationConfig(strict=True))["deviated"]  # not under <
    assert judge(step, 0.2, 0.4, DeviationConfig(strict=True))["deviated"]
    assert not judge(step, 0.6, 0.4)["deviated"]
    assert judge(step, 0.6, 0.4, DeviationConfig(delta=0.2))["deviated"]  # 0.6 <= 0.4 + 0.2
    assert not judge(step, 0.6, 0.4, DeviationConfig(delta=0.2, strict=True))["reward_not_higher"]
    assert not judge(step, 0.4, 0.4, DeviationConfig(delta=-0.01))["deviated"]


def test_deviation_similarity_threshold_identical_and_missing_action():
    expert_action = ACTIONS[2]
    emb = toy({expert_action: [0.6, 0.8], "go to cabinet 2": [0.8, 0.6], "go to drawer 1": [1.0, 0.0]})
    close = judge(reply("go to cabinet 2"), 0.0, 0.4, emb=emb)
    assert close["similarity"] == pytest.approx(0.96) and not close["dissimilar"] and not close["deviated"]
    far = judge(reply("go to drawer 1"), 0.0, 0.4, emb=emb)
    assert far["similarity"] == pytest.approx(0.6) and far["deviated"]
    sim = far["similarity"]  # boundary: deviated only when similarity < threshold
    assert not judge(reply("go to drawer 1"), 0.0, 0.4, DeviationConfig(sim_threshold=sim), emb=emb)["deviated"]
    assert judge(reply("go to drawer 1"), 0.0, 0.4, DeviationConfig(sim_threshold=sim + 1e-9), emb=emb)["deviated"]
    same = judge(reply(expert_action), 0.0, 0.4, emb=emb)
    assert same["similarity"] == pytest.approx(1.0) and not same["action_differs"] and not same["deviated"]
    # a reply without `Action:`: a different action with similarity 0 (the original crashed)
    missing = judge(reply(None), 0.0, 0.4, emb=emb)
    assert missing["explored_action"] is None and missing["similarity"] == 0.0 and missing["deviated"]
    # the expert step without an action cannot be judged
    bad_expert = Step(text="Thought: x", thought="x", action=None, observation="o")
    assert judge(reply("look"), 0.0, 0.4, expert_step=bad_expert)["skip"] == "expert_action_missing"


def test_deviation_continuation_min_step_and_missing_values():
    step = reply("go to drawer 1")
    assert not judge(step, 0.0, 0.4, success=True)["deviated"]  # the greedy continuation won
    no_rest = judge(step, 0.0, 0.4, rest=[])
    assert no_rest["has_continuation"] is False and not no_rest["deviated"]
    assert judge(step, 0.0, 0.4, t=1)["skip"] == "before_min_step"
    assert judge(step, 0.0, 0.4, DeviationConfig(min_step=1), t=1)["deviated"]
    assert judge(step, None, 0.4)["skip"] == "missing_mc_explored"
    assert judge(step, 0.0, None)["skip"] == "missing_mc_expert_prev"
    # t = 0 with min_step 0: there is no expert value "at t-1": a counted skip, not a crash
    row = judge(step, 0.0, None, DeviationConfig(min_step=0), t=0)
    assert row["skip"] == "missing_mc_expert_prev" and not row["deviated"]


def test_ndtw_against_hand_computed_values():
    emb = toy({"a": [1, 0], "b": [0, 1], "c": [0.6, 0.8]})
    # D = [[0, .4, 1], [1, .2, 0]] -> C = [[0, .4, 1.4], [1, .2, .2]] -> 0.2 / sqrt(2^2 + 3^2)
    assert action_deviation(emb, ["a", "b"], ["a", "c", "b"]) == pytest.approx(0.2 / math.sqrt(13), abs=1e-12)
    assert action_deviation(emb, ["a", "b", "c"], ["a", "b", "c"]) == pytest.approx(0.0, abs=1e-12)
    # D = [[1, 1]] (distinct one-hot strings) -> C = [[1, 2]] -> 2 / sqrt(1 + 4)
    assert action_deviation(toy(), ["x"], ["y", "z"]) == pytest.approx(2 / math.sqrt(5))
    # a missing action is at distance 1 from anything, another missing action included
    assert action_deviation(emb, [None], [None]) == pytest.approx(1 / math.sqrt(2))
    assert action_deviation(emb, [], ["a"]) is None
    assert ndtw(np.array([[0.5]])) == pytest.approx(0.5 / math.sqrt(2))


def test_each_distinct_action_is_embedded_once_in_one_call():
    embedder = ToyEmbedder()
    emb = ActionEmbeddings(embedder)
    rows = [datasets.make_row("expert_sub", f"k{i}", 2, [], [{"role": "assistant", "content": f"Action: {a}"}
                                                              for a in ("x", "y", "x")],
                              [{"role": "assistant", "content": "Action: y"}]) for i in range(50)]
    datasets.weigh(rows, emb, k=0.01, keep_threshold=0.013)
    assert embedder.calls == 1 and sorted(emb.vectors) == ["x", "y"]
    emb.add(["x", "y", None])
    assert embedder.calls == 1


def rows_with(set_name: str, chosen: list[str], rejected: list[str]) -> dict:
    turns = lambda actions: [{"role": "assistant", "content": f"Thought: t\nAction: {a}"} for a in actions]
    return datasets.make_row(set_name, "k", 0, [], turns(chosen), turns(rejected))


def test_weights_and_keep_threshold():
    emb = toy({"a": [1, 0], "b": [0.6, 0.8]})  # distance 0.4
    rows = [rows_with("calibration", ["a"], ["b"]), rows_with("expert_full", ["a", "a"], ["b"]),
            rows_with("explored", ["a"], ["a"]), rows_with("explored", ["a"], ["b"])]
    datasets.weigh(rows, emb, k=0.01, keep_threshold=0.013)
    dev = 0.4 / math.sqrt(2)
    assert rows[0]["deviation"] == pytest.approx(dev) and rows[0]["reward"] == pytest.approx(1 + 0.01 * dev)
    assert rows[1]["reward"] == pytest.approx(1 + 0.01 * 0.8 / math.sqrt(5)) and rows[1]["kept"]
    assert rows[2]["reward"] == pytest.approx(1.0) and rows[2]["kept"]
    assert rows[3]["reward"] == pytest.approx(1 - 0.01 * dev) and not rows[3]["kept"]  # dev 0.28 >= 0.013
    datasets.weigh(rows, emb, k=1.0, keep_threshold=dev)  # the boundary: kept only when dev < threshold
    assert not rows[3]["kept"] and rows[3]["reward"] == pytest.approx(1 - dev)
    empty = rows_with("explored", ["a"], [])
    datasets.weigh([empty], emb, k=1.0, keep_threshold=1.0)
    assert empty["deviation"] is None and not empty["kept"]


def test_published_export_format():
    row = rows_with("calibration", ["a"], ["b"])
    row["prompt"] = datasets.turns([{"role": "user", "content": "  task \n"}])
    row.update(deviation=0.5, reward=1.005)
    out = datasets.published([row, row])
    assert [r["id"] for r in out] == ["0", "1"]
    assert set(out[0]) == {"id", "prompt", "chosen", "rejected", "deviation", "reward"}
    assert out[0]["prompt"] == [{"from": "human", "value": "task"}]
    assert out[0]["chosen"] == [{"from": "gpt", "value": "Thought: t\nAction: a"}]


@pytest.fixture(scope="module")
def minilm():
    return make_embedder("minilm")


def test_minilm_from_the_package_mean_pooled(minilm):
    assert (minilm_dir() / "model.safetensors").is_file()
    vecs = minilm.embed(["go to cabinet 1", "go to cabinet 2", "heat mug 1 with microwave 1"])
    assert vecs.shape == (3, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.1
    # identical action sequences stay under VirtualHome's keep threshold despite float noise
    emb = ActionEmbeddings(minilm)
    row = rows_with("explored", ["go to cabinet 1", "open cabinet 1"], ["go to cabinet 1", "open cabinet 1"])
    datasets.weigh([row], emb, k=1.0, keep_threshold=1e-6)
    assert row["deviation"] < 1e-12 and row["kept"]


def test_bert_cls_embedder_on_a_local_random_bert(tmp_path):
    """The original's bert-base-uncased [CLS] path, on a tiny random BERT (the hub is out of reach)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_dir())  # bert-base-uncased's WordPiece vocabulary
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    emb = make_embedder("bert-cls", str(tmp_path))
    assert isinstance(emb, HFEmbedder) and emb.pooling == "cls"
    vec = emb.embed(["open cabinet 1"])[0]
    with torch.no_grad():
        cls = model.eval()(**tok(["open cabinet 1"], return_tensors="pt")).last_hidden_state[0, 0]
    assert np.allclose(vec, (cls / cls.norm()).numpy(), atol=1e-5)


# ---- the whole stage on hand-built records ------------------------------------------------------------

def read(path: Path) -> list[dict]:
    return list(read_jsonl(path))


def check_row_schema(row: dict) -> None:
    assert set(row) >= {"key", "set", "task_key", "t", "prompt", "chosen", "rejected", "deviation", "reward"}
    assert [t["from"] for t in row["prompt"][:3]] == ["human", "gpt", "human"] and row["prompt"][1]["value"] == "OK"
    for side in ("prompt", "chosen", "rejected"):
        roles = [t["from"] for t in row[side]]
        assert all(a != b for a, b in zip(roles, roles[1:])), (side, roles)  # alternating
        assert all(t["value"] == t["value"].strip() for t in row[side])
    assert row["prompt"][-1]["from"] == "human" and row["chosen"][0]["from"] == "gpt" and row["chosen"][-1]["from"] == "gpt"


def test_fixture_run_end_to_end_with_self_reflection(tmp_path, tiny_model_dir):
    fx = fixture_run(tmp_path)
    expert, kb = fx["expert"], fx["b"]
    reflect = ["--reflect_backend", "self", "--model", str(tiny_model_dir), "--reflect_retries", "0",
               "--reflect_max_tokens", "8"]
    summary = build(fixture_args(tmp_path, *reflect), embeddings=toy())
    out = RunDir(tmp_path).data_collection

    rewards = {r["key"]: r for r in read(out / "step_rewards.jsonl")}
    assert len(rewards) == 15 + 8 and rewards[step_key(kb, 2, "explore")]["reward"] == 0.0
    assert rewards[step_key(fx["a"], 3, "explore")] == {**rewards[step_key(fx["a"], 3, "explore")], "reward": None, "samples": 0}
    devs = {r["key"]: r for r in read(out / "deviations.jsonl")}
    assert len(devs) == 8 and [k for k, d in devs.items() if d["deviated"]] == [step_key(kb, 2, "explore"),
                                                                             step_key(fx["c"], 2, "explore")]
    assert devs[step_key(fx["a"], 2, "explore")]["action_differs"] is False
    assert devs[step_key(fx["a"], 3, "explore")]["skip"] == "missing_mc_explored"
    assert devs[step_key(kb, 3, "explore")]["reward_not_higher"] is False
    assert devs[step_key(kb, 4, "explore")]["has_continuation"] is False
    assert summary["deviation"]["skipped"] == {"before_min_step": 2, "missing_mc_explored": 1}
    assert summary["deviation"]["by_step"][2] == {"considered": 3, "deviated": 2}
    assert summary["deviation"]["calibrated_digest"] == json_digest(sorted(k for k, d in devs.items() if d["deviated"]))

    # B's and C's reflections by the tiny random model are garbage: counted, the rows skipped (the default)
    refl = summary["reflections"]
    assert refl["by_backend"] == {"self": 2} and refl["requests"] == 2 and refl["calls"] == 2
    assert refl["ok"] == 0 and refl["invalid_skipped"] == 2
    assert summary["sets"]["calibration"] == {"rows": 0, "kept": 0, "skipped": {"invalid_reflection": 2}}
    assert read(out / "calibration.jsonl") == []
    assert summary["sets"]["expert_sub"]["skipped"] == {"missing_mc": 1}  # A t=3

    # D_s: expert MC(t) > explored MC(t) + 0.01 and the greedy continuation failed: A t=2 (0.6 > 0.2,
    # even with the expert's action), B t=2 (0.6 > 0) and t=4 (1.0 > 0); B t=3 (0.8 = 0.8) is a tie
    subs = read(out / "expert_sub.jsonl")
    assert [(r["set"], r["task_key"], r["t"]) for r in subs] == [
        ("expert_sub", fx["a"], 2), ("expert_sub", kb, 2), ("expert_sub", kb, 4), ("expert_sub", fx["c"], 2),
        ("expert_full", kb, 0)]
    assert subs[3]["rejected"][0]["value"] == ""  # C's empty reply, kept as what the policy did
    sub = subs[1]
    assert sub["prompt"] == datasets.turns(datasets.expert_prompt(INSTRUCTION, expert, 2))
    assert [t["value"] for t in sub["chosen"] if t["from"] == "gpt"] == [s.text for s in expert.steps[2:]]
    assert sub["rejected"][0]["value"] == reply("go to drawer 1").text
    # 3 expert actions vs 3 distinct policy actions, all orthogonal: C[2][2] = 3 -> 3 / sqrt(18)
    assert sub["deviation"] == pytest.approx(3 / math.sqrt(18)) and sub["reward"] == pytest.approx(1 + 0.01 * 3 / math.sqrt(18))
    full = subs[4]
    assert len(full["prompt"]) == 3 and len(full["chosen"]) == 2 * len(ACTIONS) - 1
    explored = read(out / "explored.jsonl")
    assert len(explored) == 1 and explored[0]["deviation"] == pytest.approx(0.0) and explored[0]["kept"]
    assert explored[0]["reward"] == pytest.approx(1.0)

    train = read(out / "train.jsonl")
    assert [r["set"] for r in train] == ["expert_sub"] * 4 + ["expert_full", "explored"]
    for row in train:
        check_row_schema(row)
    final = json.loads((out / "final_data_rft_train.json").read_text())
    assert final == datasets.published(train)
    assert (out / "config.json").is_file() and json.loads((out / "config.json").read_text())["stage"] == "data_collection.build"
    for png in ("step_reward_by_position.png", "deviations_by_step.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = summary["step_reward_by_position"]["expert"]
    assert curve["mean"][0] == pytest.approx(0.2) and curve["mean"][-1] == pytest.approx(1.0)

    # rerun with the templated fallback: the row is kept, and the reflection comes from the cache
    summary = build(fixture_args(tmp_path, *reflect, "--reflection_fallback"), embeddings=toy())
    assert summary["reflections"]["calls"] == 0 and summary["reflections"]["cache_hits"] == 2
    cal, cal_c = read(out / "calibration.jsonl")
    check_row_schema(cal_c)
    assert cal_c["task_key"] == fx["c"] and cal_c["prompt"][-2] == {"from": "gpt", "value": ""}
    check_row_schema(cal)
    assert cal["meta"]["fallback"] and not cal["meta"]["reflection_ok"] and cal["meta"]["reflection_backend"] == "self"
    deviated = reply("go to drawer 1")
    assert cal["prompt"] == datasets.turns(datasets.expert_prompt(INSTRUCTION, expert, 2)) + [
        {"from": "gpt", "value": deviated.text}, {"from": "human", "value": f"Observation: {deviated.observation}"}]
    assert cal["chosen"][0]["value"] == datasets.FALLBACK_THOUGHT.format(action=ACTIONS[2])
    assert cal["chosen"][1:] == datasets.turns(datasets.continuation(expert.steps[2:]))[1:]
    assert [t["value"] for t in cal["rejected"] if t["from"] == "gpt"] == [reply("go to sinkbasin 1").text, reply("look").text]
    # 3 calibrated actions vs 2 policy actions, all orthogonal: C[2][1] = 3 -> 3 / sqrt(13)
    assert cal["deviation"] == pytest.approx(3 / math.sqrt(13)) and cal["reward"] == pytest.approx(1 + 0.01 * 3 / math.sqrt(13))
    assert summary["sets"]["calibration"] == {"rows": 2, "kept": 2, "skipped": {}}
    assert json.loads((out / "final_data_rft_train.json").read_text())[0]["chosen"] == cal["chosen"]

    # the same rerun: the same files, no LLM call
    files = ("step_rewards.jsonl", "deviations.jsonl", "calibration.jsonl", "expert_sub.jsonl", "explored.jsonl",
             "train.jsonl", "final_data_rft_train.json")
    before = {f: (out / f).read_bytes() for f in files}
    again = build(fixture_args(tmp_path, *reflect, "--reflection_fallback"), embeddings=toy())
    assert again["reflections"]["calls"] == 0 and {f: (out / f).read_bytes() for f in files} == before


def corrupt(path: Path, lineno: int, change) -> None:
    lines = path.read_text().splitlines()
    rec = json.loads(lines[lineno - 1])
    change(rec)
    lines[lineno - 1] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("file,change,message", [
    (("steps", "explore"), lambda r: r.pop("success"), r":2: missing field 'success'"),
    (("steps", "explore"), lambda r: r.update(t="2"), r":2: field 't' must be int, got '2'"),
    (("steps", "explore"), lambda r: r.update(kind="expert"), r":2: field 'kind' is 'expert' in the explore file"),
    (("steps", "explore"), lambda r: r["step"].pop("action"), r":2: field 'step' needs exactly"),
    (("steps", "explore"), lambda r: r["trajectory"]["steps"][0].pop("text"), r":2: field 'trajectory' needs 'steps'"),
    (("rollouts", "expert"), lambda r: r.update(success="yes"), r":2: field 'success' must be bool"),
    (("steps", "expert"), lambda r: r.update(expert_key="nope"), r"replays expert trajectory 'nope'"),
    (("steps", "expert"), lambda r: r.update(prefix=["x"]), r"its replayed prefix differs"),
])
def test_bad_input_rows_name_file_line_and_field(tmp_path, file, change, message):
    fixture_run(tmp_path)
    what, kind = file
    path = getattr(RunDir(tmp_path), what)(kind)
    corrupt(path, 2, change)
    with pytest.raises(SystemExit, match=rf"error: {path}.*{message}"):
        build(fixture_args(tmp_path), embeddings=toy())


def test_missing_sampling_file_says_what_to_run(tmp_path):
    fixture_run(tmp_path)
    (RunDir(tmp_path).rollouts("explore")).unlink()
    with pytest.raises(SystemExit, match=r"rollouts_explore.jsonl missing: run the sampling stage first"):
        build(fixture_args(tmp_path), embeddings=toy())


# ---- the whole stage on a real tiny sampling run ------------------------------------------------------

def test_stage_on_a_real_tiny_alfworld_sampling_run(tmp_path, tiny_model_dir):
    """alfworld's expert on one generated game (as the SFT expert data: templated thoughts, no-op
    steps left out), the tiny model explores and rolls out (n=2), then the stage with MiniLM and
    the tiny model's own reflections."""
    task = load_tasks("train", limit=1)[0]
    trajs = {}
    run_episodes([task], ExpertPolicy(), lambda: AlfWorldEnv(expert=True), lambda ep: trajs.__setitem__(ep.task.key, ep.traj),
                 concurrency=1, progress=False)
    expert_file = tmp_path / "expert.jsonl"
    write_jsonl(expert_file, [{"key": k, **alfworld_expert_trajectory(t, k).to_dict()} for k, t in trajs.items()])
    fast = ["--model", str(tiny_model_dir), "--max_new_tokens", "4", "--max_steps", "6", "--concurrency", "16", "--icl_num", "0"]
    generate_steps(["--task", "alfworld", "--kind", "both", "--expert_data", str(expert_file), "--run_dir", str(tmp_path), *fast])
    mc_rollouts(["--task", "alfworld", "--kind", "both", "--n", "2", "--run_dir", str(tmp_path), *fast])

    args = ["--task", "alfworld", "--run_dir", str(tmp_path), "--expert_data", str(expert_file), "--n", "2",
            "--reflect_backend", "self", "--model", str(tiny_model_dir), "--reflect_retries", "0", "--reflect_max_tokens", "8"]
    summary = build(args)
    out = RunDir(tmp_path).data_collection
    explore = read_step_records(RunDir(tmp_path).steps("explore"))
    expert = read_step_records(RunDir(tmp_path).steps("expert"))
    assert len(read(out / "step_rewards.jsonl")) == len(explore) + len(expert)
    # MC rolled out the records data collection judges (explored t >= 2, expert t >= 1), two each, and no other
    assert all(r["samples"] == (2 if r["t"] >= (2 if r["kind"] == "explore" else 1) else 0)
               for r in read(out / "step_rewards.jsonl"))
    assert all(summary["step_rewards"][kind]["missing_samples"] == 0 for kind in ("expert", "explore"))
    devs = read(out / "deviations.jsonl")
    assert len(devs) == len(explore) == summary["deviation"]["explored_steps"]
    judged = [d for d in devs if d["skip"] is None]
    assert all(d["t"] >= 2 for d in judged) and summary["deviation"]["judged"] == len(judged)
    assert all(d["deviated"] == all(d[c] for c in ("reward_not_higher", "continuation_failed", "action_differs",
                                                  "dissimilar", "has_continuation")) for d in judged)
    n_dev = sum(d["deviated"] for d in devs)
    refl = summary["reflections"]
    # every deviated step is reflected on by the tiny model itself (its whitespace replies stay in the
    # prompt; only the expert's turns are in chosen)
    asked = n_dev - summary["sets"]["calibration"]["skipped"].get("empty_chosen_turn", 0)
    assert refl["requests"] == asked and refl.get("calls", 0) == asked
    assert refl["by_backend"] == ({"self": asked} if asked else {})
    cal = read(out / "calibration.jsonl")
    assert len(cal) == asked - refl["invalid_skipped"]
    # every candidate of a set is a row or a counted skip: t = 0, the greedy episode failed
    # (expert_full) or won (explored); t >= 2, expert MC(t) > explored MC(t) + 0.01 after a failure (expert_sub)
    mc = {r["key"]: r["reward"] for r in read(out / "step_rewards.jsonl")}
    t0 = next(r for r in explore if r.t == 0)
    sub_candidates = sum(r.t >= 2 and not r.success and mc[step_key(r.task_key, r.t, "expert")] > mc[r.key] + 0.01
                         for r in explore)
    sets = {s: read(out / f) for s, f in (("sub", "expert_sub.jsonl"), ("explored", "explored.jsonl"))}
    made = {"expert_sub": sum(r["set"] == "expert_sub" for r in sets["sub"]),
            "expert_full": sum(r["set"] == "expert_full" for r in sets["sub"]), "explored": len(sets["explored"])}
    for name, candidates in (("expert_sub", sub_candidates), ("expert_full", not t0.success), ("explored", t0.success)):
        assert made[name] == summary["sets"][name]["rows"]
        assert made[name] + sum(summary["sets"][name]["skipped"].values()) == candidates, name
    train = read(out / "train.jsonl")
    assert len(train) == sum(r["kept"] for rows in (cal, *sets.values()) for r in rows) == summary["train"]["rows"]
    for row in train:
        check_row_schema(row)
        assert row["reward"] == pytest.approx(1 + (-0.01 if row["set"] == "explored" else 0.01) * row["deviation"])
    assert json.loads((out / "final_data_rft_train.json").read_text()) == datasets.published(train)
    assert (out / "plots" / "step_reward_by_position.png").is_file()


def test_only_an_empty_chosen_turn_drops_a_row():
    turn = lambda role, value: {"from": role, "value": value}  # noqa: E731
    row = {"prompt": [turn("human", "task"), turn("gpt", "")], "chosen": [turn("gpt", "Thought: t\nAction: look")],
           "rejected": [turn("gpt", "")]}
    assert not datasets.has_empty_chosen_turn(row)  # the policy's empty replies in prompt / rejected are data
    assert datasets.has_empty_chosen_turn({**row, "chosen": [turn("gpt", "")]})  # it would train saying nothing


# ---- LLM step rewards (Table 3): a chat model scores each step -------------------------------------------

@pytest.mark.parametrize("text, reward", [
    ("Score: 7", 0.7), ("**Score:** 10", 1.0), ("score = 3.5", 0.35), ("Thought: close.\nScore: 0\n", 0.0),
    ("Score: 11", None), ("Score: -1", None), ("I would say 5.", None), ("", None), (None, None),
])
def test_clean_score(text, reward):
    from data_collection.step_rewards import clean_score

    cleaned = clean_score(text)
    assert (None if cleaned.text is None else float(cleaned.text)) == reward
    assert (cleaned.error is None) == (reward is not None)
    assert clean_score("Thought: let me think", truncated=True).error == "cut at the token limit before a score"


def test_llm_step_rewards_from_a_real_chat_server(tmp_path, hf_server, tiny_model_dir, monkeypatch):
    """--step_reward llm against serve_hf's chat route: every record with a step is asked (the tiny random
    model's replies hold no score: each is asked once more, then counted), no rollout is read, and a rerun
    asks nothing."""
    from data_collection.step_rewards import SCORE_REQUEST, score_messages

    monkeypatch.setenv("REFLECT_BASE_URL", hf_server)
    monkeypatch.setenv("REFLECT_API_KEY", "EMPTY")
    fx = fixture_run(tmp_path)
    for kind in ("expert", "explore"):
        RunDir(tmp_path).rollouts(kind).unlink()  # not needed, not read
    argv = fixture_args(tmp_path, "--step_reward", "llm", "--reflect_backend", "chat", "--reflect_model",
                        str(tiny_model_dir), "--reflect_retries", "1")
    summary = build(argv, embeddings=toy())
    out = RunDir(tmp_path).data_collection
    rewards = read(out / "step_rewards.jsonl")
    assert len(rewards) == 15 + 8 and {r["source"] for r in rewards} == {"llm"}
    llm = summary["step_rewards"]["llm"]
    assert summary["step_rewards"]["source"] == "llm" and summary["inputs"]["rollouts"] == {}
    # the three tasks share one expert trajectory: 5 distinct expert histories, 7 explored ones, each asked once
    # per attempt (a second attempt for every reply without a score)
    assert (llm["backend"], llm["model"], llm["requests"], llm["calls"]) == ("chat", str(tiny_model_dir), 23, 24)
    scored = sum(r["reward"] is not None for r in rewards)
    assert scored == llm["ok"] and all(0 <= r["reward"] <= 1 for r in rewards if r["reward"] is not None)
    assert all(r["error"] for r in rewards if r["reward"] is None)
    cache = read(out / "step_score_cache.jsonl")
    assert len(cache) == 24 and {c["backend"] for c in cache} == {"chat"}
    # what the model was asked: the interaction through the step, the request in the last turn
    history = datasets.step_history(INSTRUCTION, fx["expert"], explore_record(fx["b"], fx["expert"], 2,
                                                                                reply("go to drawer 1"), [], False))
    asked = score_messages(history)
    assert asked[:-1] == history[:-1] and asked[-1]["content"].endswith(SCORE_REQUEST)
    assert asked[-1]["content"].startswith("Observation: obs after go to drawer 1")
    again = build(argv, embeddings=toy())
    assert (again["step_rewards"]["llm"]["calls"], again["step_rewards"]["llm"]["cache_hits"]) == (0, 46)  # per record
    assert read(out / "step_rewards.jsonl") == rewards
