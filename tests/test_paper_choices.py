"""The paper's remaining choices as flags: D_c from each task's first deviated step (paper 3.2) vs every
deviated step (the published code), and the original's transcript-style reflection prompt vs ours."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from data_collection.build import build_parser, first_per_task
from data_collection.reflection import ORIGINAL_REQUEST, ReflectionRequest, reflection_messages

HISTORY = [{"role": "user", "content": "Interact with a household. "}, {"role": "assistant", "content": "OK"},
           {"role": "user", "content": "Your task is to: open drawer."},
           {"role": "assistant", "content": "Thought: Sink.\nAction: go to sinkbasin 1"},
           {"role": "user", "content": "Observation: On the sinkbasin 1, you see nothing."}]


def test_first_deviated_step_per_task_only():
    rec = lambda task, t: SimpleNamespace(task_key=task, t=t)  # noqa: E731
    deviated = [(rec("a", 2), {}), (rec("a", 5), {}), (rec("b", 4), {}), (rec("b", 3), {}), (rec("c", 7), {})]
    assert [(r.task_key, r.t) for r, _ in first_per_task(deviated)] == [("a", 2), ("b", 3), ("c", 7)]
    args = build_parser().parse_args(["--task_family", "alfworld", "--run_dir", "r"])
    assert args.calibrate == "every" and args.reflect_prompt == "ours"  # the published code's behaviour by default


def test_original_reflection_prompt_is_one_transcript_message():
    req = ReflectionRequest(key="k", history=HISTORY, expert_action="go to drawer 1")
    (msg,) = reflection_messages(req, "original")
    assert msg["role"] == "user"
    assert msg["content"] == (
        "Human: Interact with a household.\n\nGpt: OK\n\nHuman: Your task is to: open drawer.\n\n"
        "Gpt: Thought: Sink.\nAction: go to sinkbasin 1\n\nHuman: Observation: On the sinkbasin 1, you see nothing."
        + ORIGINAL_REQUEST.format(action="go to drawer 1"))
    assert "The next step ground truth action is: go to drawer 1. Please provide the thought" in msg["content"]
    ours = reflection_messages(req)
    assert [m["role"] for m in ours] == [m["role"] for m in HISTORY] and "go to drawer 1" in ours[-1]["content"]
    with pytest.raises(ValueError, match="prompt style"):
        reflection_messages(req, "transcript")
