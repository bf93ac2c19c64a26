"""Stage 1 (SFT): expert data (published format, ALFWorld expert runs, VirtualHome), the loss mask
token by token for both chat formats, whole-turn truncation, and a 2-process CPU training run
(torchrun, gloo) of the tiny model through sft/sft.sh that reloads and resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval_agent.chat_format import ChatFormat, resolve_chat_format
from eval_agent.expert_data import alfworld_thoughts, load_expert_data, to_published
from eval_agent.prompts import PromptBuilder
from eval_agent.store import BadRecord
from eval_agent.trajectory import Step, Trajectory
from eval_agent.training import IGNORE, PadCollator, encode_conversation, sft_messages
from tests.helpers import trained_runs

REPO = Path(__file__).resolve().parent.parent
VH_TRAJECTORIES = REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl"

TRAJ = Trajectory(
    task_text="You are in the middle of a room.\n\nYour task is to: put a mug in desk.",
    steps=[
        Step.expert("I need to find a mug. I will check shelf 1.", "go to shelf 1", "On the shelf 1, you see a mug 1."),
        Step.expert("I found the mug 1. I will take it.", "take mug 1 from shelf 1", "You pick up the mug 1."),
        Step.expert("Now I put the mug 1 in/on the desk 1.", "put mug 1 in/on desk 1", "You put the mug 1 in/on the desk 1."),
    ],
    success=True, reward=1.0, termination="success",
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("fmt_name", ["template", "llama-2"])
def test_loss_mask_is_exactly_the_assistant_turns(tokenizer, fmt_name):
    fmt = ChatFormat(fmt_name, tokenizer)
    messages = PromptBuilder(instruction="Solve the task.").messages(TRAJ, include_last_observation=False)
    text, spans = fmt.render_with_spans(messages)
    enc = encode_conversation(messages, fmt, tokenizer)
    assert enc.num_messages == len(messages)
    # the tokens are the text (up to the last answer's end) and nothing else
    assert tokenizer.decode(enc.input_ids) == text[: spans[-1][1]]
    trained = [tokenizer.decode(r) for r in trained_runs(enc.input_ids, enc.labels)]
    assert trained == [text[a:b] for a, b in spans]  # "OK" + each step, each with its end marker
    end = "<|im_end|>\n" if fmt_name == "template" else " </s>"
    assert trained[0] == ("OK" if fmt_name == "template" else " OK") + end
    assert all(t.endswith(end) for t in trained) and trained[1].strip().startswith(TRAJ.steps[0].text)


def test_icl_example_turns_are_not_trained(tokenizer):
    fmt = ChatFormat("template", tokenizer)
    prompts = PromptBuilder.for_run("alfworld", icl_num=1)
    messages, trained = sft_messages(prompts, TRAJ)
    enc = encode_conversation(messages, fmt, tokenizer, trained=trained)
    texts = [tokenizer.decode(r) for r in trained_runs(enc.input_ids, enc.labels)]
    assert texts == ["OK<|im_end|>\n"] + [s.text + "<|im_end|>\n" for s in TRAJ.steps]
    assert prompts.icl_example.steps[0].text in tokenizer.decode(enc.input_ids)  # in the prompt, not the loss


def test_truncation_drops_whole_trailing_turns(tokenizer):
    fmt = ChatFormat("template", tokenizer)
    messages = PromptBuilder(instruction="Solve the task.").messages(TRAJ, include_last_observation=False)
    full = encode_conversation(messages, fmt, tokenizer)
    cut = encode_conversation(messages, fmt, tokenizer, max_len=len(full.input_ids) - 3)
    assert cut.num_messages == len(messages) - 2  # the last observation and the last answer are gone
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)] and cut.labels == full.labels[: len(cut.labels)]
    assert tokenizer.decode(trained_runs(cut.input_ids, cut.labels)[-1]) == TRAJ.steps[1].text + "<|im_end|>\n"
    assert encode_conversation(messages, fmt, tokenizer, max_len=5).num_messages == 0


def test_collator_pads_without_loss():
    batch = PadCollator(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_trainer_loss_and_gradient_from_the_trained_positions_equal_the_models_own(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from sft.train import SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [{"input_ids": list(range(10, 40)), "labels": [IGNORE] * 20 + list(range(30, 40))},
            {"input_ids": list(range(50, 70)), "labels": [IGNORE] * 5 + list(range(55, 60)) + [IGNORE] * 10}]
    batch = PadCollator(pad_id=0)(rows)
    trainer = SFTTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))

    def loss_and_gradient(compute) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    own, own_grad = loss_and_gradient(lambda: model(**batch).loss)
    ours, our_grad = loss_and_gradient(lambda: trainer.compute_loss(model, batch))
    assert ours == pytest.approx(own, rel=1e-6) and torch.allclose(our_grad, own_grad, atol=1e-7)


def test_published_format_round_trip_json_and_jsonl(tmp_path):
    rows = to_published([TRAJ], instruction="Solve the task.", id_prefix="alfworld")
    assert [t["from"] for t in rows[0]["conversations"][:3]] == ["human", "gpt", "human"]
    assert rows[0]["conversations"][1]["value"] == "OK" and rows[0]["conversations"][-1]["from"] == "gpt"
    (tmp_path / "sft.json").write_text(json.dumps(rows))
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("sft.json", "sft.jsonl"):
        (traj,) = load_expert_data(tmp_path / name)
        assert traj.task_text == TRAJ.task_text and [s.text for s in traj.steps] == [s.text for s in TRAJ.steps]
        assert [s.observation for s in traj.steps[:-1]] == [s.observation for s in TRAJ.steps[:-1]]
        assert traj.meta == {"key": "alfworld_0", "instruction": "Solve the task."}


GOOD = to_published([TRAJ], instruction="Solve the task.", id_prefix="alfworld")[0]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({**GOOD, "conversations": GOOD["conversations"][:3] + GOOD["conversations"][4:]}, "turn 3 should be assistant"),
        ({**GOOD, "conversations": GOOD["conversations"][:3] + [{"from": "gpt", "value": "  "}]}, "turn 3 is empty"),
        ({k: v for k, v in GOOD.items() if k != "id"}, "missing field 'id'"),
        ({"id": "x"}, "missing field 'key'"),
        ({"key": "x", "task": "t", "steps": [{"text": "hi"}]}, "not a trajectory"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, bad, message):
    (tmp_path / "sft.json").write_text(json.dumps([GOOD, bad]))
    with pytest.raises(BadRecord, match=rf"sft\.json: row 1\b.*{message}"):
        load_expert_data(tmp_path / "sft.json")
    (tmp_path / "sft.jsonl").write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(BadRecord, match=rf"sft\.jsonl: line 3\b.*{message}"):
        load_expert_data(tmp_path / "sft.jsonl")


def test_templated_thoughts_follow_the_action_kind():
    actions = ["go to shelf 1", "go to drawer 1", "open drawer 1", "take mug 1 from drawer 1", "close drawer 1",
               "go to microwave 1", "heat mug 1 with microwave 1", "go to cabinet 1", "open cabinet 1",
               "put mug 1 in/on cabinet 1"]
    thoughts = alfworld_thoughts(actions, seed="k")
    assert thoughts == alfworld_thoughts(actions, seed="k")  # deterministic per task
    assert "find a mug" in thoughts[0] and "shelf 1" in thoughts[0] and "drawer 1" in thoughts[1]
    assert "open" in thoughts[2] and "take it" in thoughts[3] and "close the drawer 1" in thoughts[4]
    assert thoughts[5] == "Now I need to heat the mug 1, so I will go to microwave 1."
    assert "heat the mug 1 with the microwave 1" in thoughts[6] and "cabinet 1" in thoughts[7]
    assert "put the mug 1 in it" in thoughts[8] and "put the mug 1 in/on the cabinet 1" in thoughts[9]


@pytest.fixture(scope="module")
def games(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("alfworld")
    subprocess.run([sys.executable, "scripts/make_alfworld_games.py", "--out", str(out)], cwd=REPO, check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def expert_file(games, tmp_path_factory) -> Path:
    from sft.make_expert_data import main

    out = tmp_path_factory.mktemp("expert") / "expert_train.jsonl"
    summary = main(["--task", "alfworld", "--data_root", str(games), "--limit", "4", "--out", str(out),
                    "--export", str(out.with_suffix(".json"))])
    assert summary["kept"] == 4 and summary["failed"] == 0
    return out


def test_alfworld_expert_data_is_templated_replayable_and_resumable(expert_file, games):
    from eval_agent.envs.alfworld import load_tasks, make_env
    from eval_agent.runner import start_episode
    from sft.make_expert_data import main

    trajs = load_expert_data(expert_file)
    assert len(trajs) == 4 and all(t.success for t in trajs)
    for t in trajs:
        assert all(s.action != "look" and s.thought and "expert's next step" not in s.thought for s in t.steps)
        assert t.task_text.count("Your task is to:") == 1 and t.meta["game_file"].endswith("game.tw-pddl")
    # the recorded replies replay to a win in a fresh environment
    task = load_tasks("train", data_root=games, limit=1)[0]
    ep = start_episode(task, make_env(), prefix=[s.text for s in trajs[0].steps])
    assert ep.traj.success and [s.observation for s in ep.traj.steps] == [s.observation for s in trajs[0].steps]
    # published export reads back as the same trajectories
    published = load_expert_data(expert_file.with_suffix(".json"))
    assert [p.steps[0].text for p in published] == [t.steps[0].text for t in trajs]
    exported = json.loads(expert_file.with_suffix(".json").read_text())
    assert to_published(published, "x", "alfworld")[0]["game_file"] == exported[0]["game_file"] == (
        "data/json_2.1.1/" + task.key)
    again = main(["--task", "alfworld", "--data_root", str(games), "--limit", "4", "--out", str(expert_file)])
    assert again["run"] == 0 and again["kept"] == 4


@pytest.mark.skipif(not VH_TRAJECTORIES.is_file(), reason=f"{VH_TRAJECTORIES} missing: run scripts/setup.sh")
def test_virtualhome_training_trajectories(tmp_path):
    from sft.make_expert_data import main

    summary = main(["--task", "virtualhome", "--limit", "5", "--out", str(tmp_path / "vh.jsonl")])
    assert summary["kept"] == 5
    trajs = load_expert_data(tmp_path / "vh.jsonl")
    assert all(t.success and t.steps and t.task_text.startswith("The task is") for t in trajs)


def sft(env: dict[str, str], returncode: int = 0) -> dict | str:
    """Run sft/sft.sh and return the training summary (or, for a run that must fail, its stderr)."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run(["bash", "sft/sft.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == returncode, proc.stderr[-4000:]
    return json.loads((Path(env["OUT"]) / "train_summary.json").read_text()) if returncode == 0 else proc.stderr


def test_two_process_cpu_training_reloads_and_resumes(tmp_path, tiny_model_dir, expert_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft" / "model"
    env = {"MODEL": str(tiny_model_dir), "DATA": str(expert_file), "OUT": str(out), "CHAT_FORMAT": "llama-2",
           "NPROC": "2", "BATCH": "2", "MICRO_BATCH": "1", "EPOCHS": "3", "LR": "1e-3", "WARMUP": "0",
           "MAX_LEN": "1024", "PRECISION": "fp32", "KEEP_CHECKPOINTS": "1"}
    summary = sft(env)
    assert summary["world_size"] == 2 and summary["gradient_accumulation_steps"] == 1
    assert summary["rows_in"] == summary["rows_out"] == 4 and summary["optimizer_steps"] == 6
    assert summary["truncated"] >= 1 and summary["tokens_per_s"] > 0  # 1024 tokens cut the longer games
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1
    # the folder reloads, and records the format it was trained with
    assert resolve_chat_format(out, None) == "llama-2"
    with pytest.raises(ValueError, match="trained with chat format 'llama-2'"):
        resolve_chat_format(out, "template")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(ChatFormat("llama-2").render([{"role": "user", "content": "hi"}]), add_special_tokens=False,
              return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2
    card = json.loads((out / "run_card.json").read_text())
    assert card["stage"] == "sft" and card["args"]["chat_format"] == "llama-2" and card["args"]["learning_rate"] == 1e-3
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"  # the HF config is intact
    # a rerun with more epochs is refused in one line: resuming would mix two recipes into one model
    stderr = sft({**env, "NPROC": "1", "EPOCHS": "4"}, returncode=2)
    assert "num_train_epochs: 3.0 -> 4.0" in stderr.splitlines()[-1] and "Traceback" not in stderr
    # the finished training, rerun on one process (same global batch): nothing trained, nothing saved again
    weights = (out / "model.safetensors").stat().st_mtime_ns
    assert sft({**env, "NPROC": "1"}) == summary and (out / "model.safetensors").stat().st_mtime_ns == weights
    # killed after its last checkpoint, before the summary: the rerun resumes from the checkpoint
    (out / "train_summary.json").rename(tmp_path / "train_summary.json")
    resumed = sft({**env, "NPROC": "1"})
    assert resumed["resumed_from"].endswith("checkpoint-6") and resumed["optimizer_steps"] == 6
