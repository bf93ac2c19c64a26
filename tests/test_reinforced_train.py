"""Stage 4 (reinforced training): reading our and the published training rows (bad rows name file, row and
field), the loss mask (only the chosen assistant turns), the loss against a hand computation for beta = 0 and
beta > 0, weights scaling the gradient, and the CLI end to end (published file, 2 processes over gloo,
checkpoint, resume, chat format, summary; beta > 0 with a reference model)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval_agent.chat_format import ChatFormat, resolve_chat_format
from eval_agent.smollm2 import make_tiny_model
from eval_agent.store import BadRecord
from eval_agent.training import IGNORE
from eval_agent.layout import RunDir
from tests.helpers import trained_runs
from Reinforced_train.data import encode_rows, load_rows
from Reinforced_train.loss import WeightedCollator, steca_loss

REPO = Path(__file__).resolve().parent.parent
INSTRUCTION = "Interact with a household to solve a task. Reply with Thought: ... and Action: ..."
TASK = "You are in the middle of a room. You see a shelf 1 and a desk 1.\n\nYour task is to: put a mug in desk."
DEVIATED = "Thought: The mug may be in the desk.\nAction: go to desk 1"


def turn(who: str, text: str) -> dict[str, str]:
    return {"from": who, "value": text}


def calibration_row(key: str, weight: float) -> dict:
    """A D_c row as data_collection writes it: the deviated step and its observation end the prompt."""
    return {
        "key": key, "set": "calibration", "task_key": "t0", "t": 1,
        "prompt": [turn("human", INSTRUCTION), turn("gpt", "OK"), turn("human", TASK),
                   turn("gpt", DEVIATED), turn("human", "Observation: On the desk 1, you see a pen 1.")],
        "chosen": [turn("gpt", "Thought: That was wrong, the mug is on the shelf.\nAction: go to shelf 1"),
                   turn("human", "Observation: On the shelf 1, you see a mug 1."),
                   turn("gpt", "Thought: I take it.\nAction: take mug 1 from shelf 1")],
        "rejected": [turn("gpt", "Thought: I look around.\nAction: look")],
        "deviation": 0.05, "reward": weight,
    }


def explored_row(key: str, weight: float) -> dict:
    return {
        "key": key, "set": "explored", "task_key": "t1", "t": None,
        "prompt": [turn("human", INSTRUCTION), turn("gpt", "OK"), turn("human", TASK)],
        "chosen": [turn("gpt", "Thought: Find the mug.\nAction: go to shelf 1")],
        "rejected": [turn("gpt", "Thought: Desk first.\nAction: go to desk 1"),
                     turn("human", "Observation: Nothing."), turn("gpt", "Thought: Shelf.\nAction: go to shelf 1")],
        "deviation": 0.002, "reward": weight,
    }


def published(rows: list[dict]) -> list[dict]:
    """The published final_data_rft_train.json layout: {id, prompt, chosen, rejected, deviation, reward}."""
    return [{"id": str(i), **{k: r[k] for k in ("prompt", "chosen", "rejected", "deviation", "reward")}}
            for i, r in enumerate(rows)]


ROWS = [calibration_row("c0", 1.0), explored_row("e0", 0.5)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    """The tiny policy and a differently initialised reference (so the preference margin is not 0)."""
    from transformers import AutoModelForCausalLM

    ref_dir = make_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("tiny_ref"), seed=1)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(ref_dir).eval()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def encoded(tmp_path: Path, tokenizer, rows: list[dict], fmt: str = "template", with_rejected: bool = True):
    loaded = load_rows(write_jsonl(tmp_path / "train.jsonl", rows), need_rejected=with_rejected)
    return encode_rows(loaded, ChatFormat(fmt, tokenizer), tokenizer, 4096, with_rejected=with_rejected)


@pytest.mark.parametrize("fmt", ["template", "llama-2"])
def test_only_chosen_assistant_turns_are_labelled(tmp_path, tokenizer, fmt):
    (example, _), stats = encoded(tmp_path, tokenizer, ROWS, fmt)
    end = "<|im_end|>\n" if fmt == "template" else " </s>"
    lead = "" if fmt == "template" else " "
    chosen = [t["value"] for t in ROWS[0]["chosen"] if t["from"] == "gpt"]
    assert [tokenizer.decode(r) for r in trained_runs(example["input_ids"], example["labels"])] == [
        lead + c + end for c in chosen]
    # the prompt (its "OK" and the deviated action) and the observation inside chosen are in the input only
    text = tokenizer.decode(example["input_ids"])
    assert DEVIATED in text and "you see a mug 1" in text and INSTRUCTION in text
    rejected = [tokenizer.decode(r) for r in trained_runs(example["rejected_input_ids"], example["rejected_labels"])]
    assert rejected == [lead + "Thought: I look around.\nAction: look" + end]
    assert stats["rows_out"] == 2 and stats["weight_min"] == 0.5 and stats["weight_max"] == 1.0


def test_published_json_and_our_jsonl_read_alike(tmp_path):
    (tmp_path / "final_data_rft_train.json").write_text(json.dumps(published(ROWS)))
    ours = load_rows(write_jsonl(tmp_path / "train.jsonl", ROWS), need_rejected=True)
    theirs = load_rows(tmp_path / "final_data_rft_train.json", need_rejected=True)
    assert [r.key for r in ours] == ["c0", "e0"] and [r.key for r in theirs] == ["0", "1"]
    for a, b in zip(ours, theirs):
        assert (a.prompt, a.chosen, a.rejected, a.weight) == (b.prompt, b.chosen, b.rejected, b.weight)
    assert ours[0].prompt[-2] == {"role": "assistant", "content": DEVIATED}


GOOD = calibration_row("c0", 1.0)


@pytest.mark.parametrize(
    "bad, need_rejected, message",
    [
        ({k: v for k, v in GOOD.items() if k != "reward"}, False, "missing field 'reward'"),
        ({**GOOD, "reward": "1.0"}, False, "field 'reward' must be a finite number"),
        ({**GOOD, "reward": float("nan")}, False, "field 'reward' must be a finite number"),
        ({**GOOD, "chosen": []}, False, "field 'chosen' must be a non-empty list"),
        ({**GOOD, "chosen": GOOD["chosen"][1:]}, False, "field 'chosen': turn 0 should be assistant"),
        ({**GOOD, "prompt": GOOD["prompt"][1:]}, False, "field 'prompt': turn 0 should be user"),
        ({**GOOD, "prompt": GOOD["prompt"][:4]}, False, "field 'prompt' must end with a human turn"),
        ({**GOOD, "chosen": [{"from": "gpt"}]}, False, "field 'chosen': turn 0 has no field 'value'"),
        ({**GOOD, "chosen": [turn("gpt", " ")]}, False, "field 'chosen': turn 0 is empty"),
        ({k: v for k, v in GOOD.items() if k != "rejected"}, True, "missing field 'rejected'"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, bad, need_rejected, message):
    (tmp_path / "rft.json").write_text(json.dumps([GOOD, bad]))
    with pytest.raises(BadRecord, match=rf"rft\.json: row 1\b.*{message}"):
        load_rows(tmp_path / "rft.json", need_rejected)
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(BadRecord, match=rf"train\.jsonl: line 3\b.*{message}"):
        load_rows(tmp_path / "train.jsonl", need_rejected)


def test_rows_that_do_not_fit_are_skipped_and_counted(tmp_path, tokenizer):
    loaded = load_rows(write_jsonl(tmp_path / "train.jsonl", ROWS))
    fmt = ChatFormat("template", tokenizer)
    full, _ = encode_rows(loaded, fmt, tokenizer, 4096, with_rejected=False)
    budget = len(full[0]["input_ids"]) - 3  # the first chosen turn fits, the second does not
    examples, stats = encode_rows(loaded, fmt, tokenizer, budget, with_rejected=False)
    assert stats["truncated"] == 1 and stats["rows_out"] == 2
    assert len(trained_runs(examples[0]["input_ids"], examples[0]["labels"])) == 1
    examples, stats = encode_rows(loaded, fmt, tokenizer, 20, with_rejected=False)
    assert stats["skipped_too_long"] == 2 and examples == []


def label_logps(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    """Summed log-prob of the labelled tokens: one unpadded forward, log-softmax, gather."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(logprobs[t - 1, labels[t]] for t in range(1, len(ids)) if labels[t] != IGNORE)


@pytest.mark.parametrize("beta, token_mean", [(0.0, False), (0.0, True), (0.5, False)])
def test_loss_matches_a_hand_computation(tmp_path, tokenizer, models, beta, token_mean):
    policy, ref = models
    examples, _ = encoded(tmp_path, tokenizer, ROWS)
    batch = WeightedCollator(pad_id=tokenizer.pad_token_id)(examples)
    loss, metrics = steca_loss(policy, batch, beta, ref if beta else None, token_mean, pad_id=tokenizer.pad_token_id)
    expected = 0.0
    for e in examples:
        pi_c = label_logps(policy, e["input_ids"], e["labels"])
        nll = -pi_c / sum(label != IGNORE for label in e["labels"][1:]) if token_mean else -pi_c
        preference = 0.0
        if beta:
            pi_r = label_logps(policy, e["rejected_input_ids"], e["rejected_labels"])
            ref_c = label_logps(ref, e["input_ids"], e["labels"])
            ref_r = label_logps(ref, e["rejected_input_ids"], e["rejected_labels"])
            z = beta * ((pi_c - pi_r) - (ref_c - ref_r))
            preference = math.log1p(math.exp(-z))  # -log sigmoid(z)
            assert abs(z) > 1e-3  # the reference differs from the policy: the term is really exercised
        expected += e["weight"] * (preference + nll)
    expected /= len(examples)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert ("margin" in metrics) == bool(beta)


def gradient(model, batch, beta=0.0, ref=None) -> torch.Tensor:
    model.zero_grad()
    steca_loss(model, batch, beta, ref)[0].backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_doubling_a_weight_doubles_that_rows_gradient(tmp_path, tokenizer, models, beta):
    policy, ref = models
    examples, _ = encoded(tmp_path, tokenizer, ROWS)
    ref = ref if beta else None

    def grad(w0: float, w1: float) -> torch.Tensor:
        rows = [{**examples[0], "weight": w0}, {**examples[1], "weight": w1}]
        return gradient(policy, WeightedCollator(tokenizer.pad_token_id)(rows), beta, ref)

    row0 = grad(1.0, 0.0)
    assert row0.norm() > 0
    assert torch.allclose(grad(2.0, 0.0), 2 * row0, rtol=1e-4, atol=1e-7)
    assert torch.allclose(grad(2.0, 1.0) - grad(1.0, 1.0), row0, rtol=1e-3, atol=1e-6)


def test_prompt_and_user_tokens_get_no_gradient(tmp_path, tokenizer, models):
    policy, _ = models
    examples, _ = encoded(tmp_path, tokenizer, ROWS[:1], with_rejected=False)
    logits = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        logits.append(output)

    handle = policy.lm_head.register_forward_hook(keep)
    try:
        gradient(policy, WeightedCollator(tokenizer.pad_token_id)(examples))
    finally:
        handle.remove()
    # position t predicts token t + 1: the LM head runs exactly where token t + 1 is labelled (trained_positions),
    # and each of those logits gets a gradient
    labelled = torch.tensor([label != IGNORE for label in examples[0]["labels"][1:]])
    assert logits[0].shape[1] == labelled.sum() == sum(label != IGNORE for label in examples[0]["labels"]) > 0
    assert bool((logits[0].grad[0].abs().sum(-1) > 0).all())


def test_trainer_batches_carry_the_weights(tmp_path, tiny_model_dir, tokenizer):
    from Reinforced_train.train import SteCaArguments, build_trainer, configure
    from transformers import TrainingArguments

    args = SteCaArguments(model_name_or_path=str(tiny_model_dir), data="", global_batch_size=2)
    targs = configure(args, TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to="none"))
    examples, _ = encoded(tmp_path, tokenizer, ROWS, with_rejected=False)
    batch = next(iter(build_trainer(args, targs, examples, tokenizer).get_train_dataloader()))
    assert sorted(batch["weight"].tolist()) == [0.5, 1.0] and "rejected_input_ids" not in batch


def steca_train(env: dict[str, str]) -> dict:
    """Run Reinforced_train/steca_train.sh and return the training summary."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run(["bash", "Reinforced_train/steca_train.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((Path(env["OUT"]) / "train_summary.json").read_text())


def test_old_name_data_never_reaches_reinforced_training(tmp_path):
    """DATA named the SFT data (sft/sft.sh still reads it as EXPERT_DATA); this stage refuses it, naming TRAIN_SET."""
    env = {**os.environ, "PYTHON": sys.executable, "DATA": str(tmp_path / "expert.jsonl"), "RUN_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", "Reinforced_train/steca_train.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "set TRAIN_SET" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "steca").exists()


def test_pipeline_takes_data_as_the_sft_data(tmp_path, smollm2_dir):
    """In the pipeline DATA is what it meant, the expert file SFT trains on (EXPERT_SOURCE), and no stage sees it:
    the pre-flight reads it as such (here: a file that is not there) before any stage."""
    env = {k: v for k, v in os.environ.items() if k not in ("EXPERT_SOURCE", "EXPERT_DATA", "TRAIN_SET")}
    env.update(PYTHON=sys.executable, DATA=str(tmp_path / "none.json"), RUN_ROOT=str(tmp_path / "run"), PRESET="tiny",
               TASK_FAMILY="alfworld", BASE_MODEL=str(smollm2_dir), HF_HUB_OFFLINE="1")
    proc = subprocess.run(["bash", "scripts/run_pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and f"EXPERT_SOURCE={tmp_path / 'none.json'}: " in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


def test_published_file_trains_on_two_processes_and_resumes(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "final_data_rft_train.json"
    data.write_text(json.dumps(published([calibration_row(f"c{i}", 1.0 + 0.01 * i) for i in range(3)]
                                         + [explored_row("e0", 0.99)])))
    out = RunDir(tmp_path).steca_model
    env = {"MODEL": str(tiny_model_dir), "TRAIN_SET": str(data), "OUT": str(out), "NPROC": "2", "BATCH": "2",
           "MICRO_BATCH": "1", "LR": "1e-3", "MAX_LEN": "1024", "PRECISION": "fp32",
           "KEEP_CHECKPOINTS": "1"}
    summary = steca_train(env)
    assert summary["world_size"] == 2 and summary["gradient_accumulation_steps"] == 1
    assert summary["rows_in"] == summary["rows_out"] == 4 and summary["optimizer_steps"] == 2
    assert summary["beta"] == 0 and summary["reference_model"] is None and summary["chat_format"] == "template"
    logged = [h for h in summary["log_history"] if "loss" in h]
    assert len(logged) == 2 and all(h["nll"] > 0 and "margin" not in h for h in logged)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert resolve_chat_format(out, None) == "template"
    card = json.loads((out / "run_card.json").read_text())
    assert card["stage"] == "reinforced_train" and card["args"]["learning_rate"] == 1e-3
    assert card["args"]["lr_scheduler_type"] == "constant_with_warmup" and card["args"]["remove_unused_columns"] is False
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert steca_train({**env, "NPROC": "1"}) == summary  # finished: not trained or saved again
    (out / "train_summary.json").rename(tmp_path / "train_summary.json")  # as if killed before the summary
    resumed = steca_train({**env, "NPROC": "1"})  # same global batch on one process: nothing left to train
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["optimizer_steps"] == 2


def test_beta_above_zero_trains_against_the_reference(tmp_path, tiny_model_dir):
    from Reinforced_train.train import main

    data = write_jsonl(tmp_path / "train.jsonl", [calibration_row("c0", 1.0), explored_row("e0", 0.5)])
    out = RunDir(tmp_path).steca_model
    summary = main(["--model_name_or_path", str(tiny_model_dir), "--data", str(data), "--beta", "0.1",
                    "--global_batch_size", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
                    "--precision", "fp32", "--warmup_steps", "0", "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none",
                    "--num_train_epochs", "2", "--output_dir", str(out)])
    assert summary["reference_model"] == str(tiny_model_dir) and summary["optimizer_steps"] == 2
    logged = [h for h in summary["log_history"] if "loss" in h]
    assert logged[0]["margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as its reference
    assert logged[1]["margin"] != pytest.approx(0.0, abs=1e-4)
    assert (out / "train_summary.json").is_file() and resolve_chat_format(out, None) == "template"


def test_empty_policy_replies_outside_chosen_are_data(tmp_path):
    """A deviated step or a rejected reply the policy left empty is what it did: the row loads."""
    row = {**GOOD, "rejected": [turn("gpt", "")]}
    row["prompt"] = row["prompt"][:-2] + [turn("gpt", ""), row["prompt"][-1]]
    (tmp_path / "rft.json").write_text(json.dumps([row]))
    [loaded] = load_rows(tmp_path / "rft.json", need_rejected=True)
    assert loaded.prompt[-2] == {"role": "assistant", "content": ""} and loaded.rejected[0]["content"] == ""
