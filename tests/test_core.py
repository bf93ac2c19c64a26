"""Trajectories, converters, reply parsing, chat formats, the JSONL store."""
import json

import pytest

from eval_agent.chat_format import ChatFormat, resolve_chat_format, write_chat_format
from eval_agent.parsing import parse_reply
from eval_agent.store import BadRecord, JsonlStore, merge_jsonl, read_jsonl
from eval_agent.trajectory import Step, Trajectory, trajectory_from_conversation

CONV = [
    {"from": "human", "value": "Interact with a household."},
    {"from": "gpt", "value": "OK"},
    {"from": "human", "value": "You are in a room.\n\nYour task is to: put a mug in cabinet."},
    {"from": "gpt", "value": "Thought: Find a mug.\nAction: go to countertop 1"},
    {"from": "human", "value": "Observation: On the countertop 1, you see a mug 1."},
    {"from": "gpt", "value": "Thought: Take it.\nAction: take mug 1 from countertop 1"},
]


@pytest.mark.parametrize(
    "reply, thought, action",
    [
        ("Thought: go.\nAction: go to sink 1", "go.", "go to sink 1"),
        ("Action: open fridge 1", "", "open fridge 1"),
        ("Thought: no action here", "no action here", None),
        ("", "", None),
        ("   ", "", None),
        ("Gpt: Thought: t\nAction: look", "t", "look"),
        ("Assistant: [/INST] Thought: t\nAction: look", "t", "look"),
        ("Thought: a\nAction: go to x\nObservation: fake\nThought: b\nAction: go to y", "a", "go to x"),
        ("Thought: a\nAction:", "a", None),
        ("Thought: a\nAction:go to x", "a", "go to x"),
    ],
)
def test_parse_reply(reply, thought, action):
    parsed = parse_reply(reply)
    assert (parsed.thought, parsed.action) == (thought, action)


def test_conversation_round_trip():
    instruction, traj = trajectory_from_conversation(CONV)
    assert instruction == "Interact with a household."
    assert traj.task_text.startswith("You are in a room.")
    assert traj.actions == ["go to countertop 1", "take mug 1 from countertop 1"]
    assert traj.steps[0].observation == "On the countertop 1, you see a mug 1."
    assert traj.to_conversation(instruction) == CONV
    again = Trajectory.from_dict(json.loads(json.dumps(traj.to_dict())))
    assert again == traj
    msgs = traj.to_messages()
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]


@pytest.mark.parametrize(
    "conv, message",
    [
        ([{"from": "gpt", "value": "x"}], "task turn"),
        ([{"from": "human", "value": "t"}, {"from": "human", "value": "u"}], "turn 1 should be assistant"),
        ([{"from": "human", "value": "t"}, {"from": "gpt", "value": "  "}], "turn 1 is empty"),
        ([{"from": "human"}], "turn 0 has no field 'value'"),
        ([{"from": "system", "value": "x"}], "unknown role"),
    ],
)
def test_bad_conversation_names_the_turn(conv, message):
    with pytest.raises(ValueError, match=message):
        trajectory_from_conversation(conv, where="f.json: row 3")


def test_expert_step_text():
    s = Step.expert("t", "go to x", "obs")
    assert s.text == "Thought: t\nAction: go to x"


@pytest.fixture(scope="module")
def tokenizer():
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct"
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"{path} missing: run scripts/setup.sh")
    return AutoTokenizer.from_pretrained(path)


MESSAGES = [
    {"role": "user", "content": "inst"},
    {"role": "assistant", "content": "OK"},
    {"role": "user", "content": "task"},
    {"role": "assistant", "content": "Thought: a\nAction: b"},
]


def test_llama2_matches_fastchat_layout():
    fmt = ChatFormat("llama-2")
    assert fmt.render(MESSAGES[:3]) == "<s>[INST] inst [/INST] OK </s><s>[INST] task [/INST]"
    text, spans = fmt.render_with_spans(MESSAGES)
    assert [text[a:b] for a, b in spans] == [" OK </s>", " Thought: a\nAction: b </s>"]
    # the inference prompt is a prefix of the training text: same format both ways
    assert text.startswith(fmt.render(MESSAGES[:3]))


def test_template_spans(tokenizer):
    fmt = ChatFormat("template", tokenizer)
    text, spans = fmt.render_with_spans(MESSAGES)
    assert [text[a:b] for a, b in spans] == ["OK<|im_end|>\n", "Thought: a\nAction: b<|im_end|>\n"]
    assert text.startswith(fmt.render(MESSAGES[:3]))


def test_chat_format_is_recorded_not_guessed(tmp_path):
    assert resolve_chat_format(tmp_path, None) == "template"
    assert resolve_chat_format(tmp_path, "llama-2") == "llama-2"
    write_chat_format(tmp_path, "llama-2")
    assert resolve_chat_format(tmp_path, None) == "llama-2"
    with pytest.raises(ValueError, match="trained with chat format 'llama-2'"):
        resolve_chat_format(tmp_path, "template")


def test_store_resume_and_torn_tail(tmp_path):
    path = tmp_path / "r.jsonl"
    store = JsonlStore(path)
    store.append({"key": "a", "v": 1})
    store.append({"key": "b", "v": 2})
    with path.open("a") as f:
        f.write('{"key": "c", "v"')  # killed mid-write
    again = JsonlStore(path)
    assert again.torn_lines == 1 and set(again.records) == {"a", "b"}
    again.append({"key": "c", "v": 3})
    assert [r["key"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_bad_jsonl_names_file_line_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"key": "a"}\n{"nokey": 1}\n')
    with pytest.raises(BadRecord, match=r"bad.jsonl:2: missing field 'key'"):
        list(read_jsonl(path))
    path.write_text('{"key": "a"}\nnot json\n')
    with pytest.raises(BadRecord, match=r"bad.jsonl:2: not valid JSON"):
        JsonlStore(path)


def test_merge_rejects_duplicate_keys(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"key": "x"}\n')
    (tmp_path / "b.jsonl").write_text('{"key": "y"}\n')
    assert merge_jsonl([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "m.jsonl") == 2
    (tmp_path / "c.jsonl").write_text('{"key": "x"}\n')
    with pytest.raises(ValueError, match="appears in"):
        merge_jsonl([tmp_path / "a.jsonl", tmp_path / "c.jsonl"], tmp_path / "m2.jsonl")


def test_protocol_card_hides_secrets_only():
    from eval_agent.run_card import run_card

    card = run_card("x", {"api_key": "sk-1", "hf_token": "hf_1", "max_new_tokens": 64, "key": "alfworld/1", "empty_key": None})
    assert card["args"] == {"api_key": "<set>", "hf_token": "<set>", "max_new_tokens": 64, "key": "<set>", "empty_key": None}
