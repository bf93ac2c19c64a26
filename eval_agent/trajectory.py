"""Structured trajectories and converters to/from the published conversation formats.

A trajectory is never handled as a sliced chat list: the task text, the steps (thought, action,
observation) and the outcome are fields. Chat lists are produced from it on demand.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

OBS_PREFIX = "Observation: "
# The types a stored trajectory's fields must have (ints where text belongs would fail deep inside, or train).
_TYPES: dict[str, tuple[type, ...]] = {"task_text": (str,), "steps": (list,), "success": (bool,),
                                       "reward": (int, float), "termination": (str, type(None)), "meta": (dict,)}
_STEP_TYPES: dict[str, tuple[type, ...]] = {"text": (str,), "thought": (str,), "action": (str, type(None)),
                                            "observation": (str,)}


def _check_types(d: dict[str, Any], types: dict[str, tuple[type, ...]], prefix: str = "") -> None:
    for name, allowed in types.items():
        if name in d and (not isinstance(d[name], allowed) or (bool not in allowed and isinstance(d[name], bool))):
            kinds = " or ".join("text" if t is str else "null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"field {prefix + name!r} must be {kinds}, got {d[name]!r:.60}")


@dataclass
class Step:
    """One agent turn and the environment's answer.

    `text` is the assistant message exactly as it appears in the history (the raw model reply, or
    the expert's "Thought: ...\\nAction: ..."); `thought`/`action` are parsed from it, `action` is
    None when the reply had no usable `Action:` (an invalid step, as in the original).
    """

    text: str
    thought: str
    action: str | None
    observation: str

    @classmethod
    def from_reply(cls, text: str, observation: str, action_parse: str = "first_line") -> "Step":
        from eval_agent.parsing import parse_reply

        parsed = parse_reply(text, action_parse)
        return cls(text=text, thought=parsed.thought, action=parsed.action, observation=observation)

    @classmethod
    def expert(cls, thought: str, action: str, observation: str) -> "Step":
        return cls(text=format_reply(thought, action), thought=thought, action=action, observation=observation)


@dataclass
class Trajectory:
    """Task text (initial observation + task description), steps and outcome of one episode."""

    task_text: str
    steps: list[Step] = field(default_factory=list)
    success: bool = False
    reward: float = 0.0
    termination: str | None = None  # success | max_steps | context_overflow | agent_error | env_error
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def actions(self) -> list[str | None]:
        return [s.action for s in self.steps]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trajectory":
        """From `to_dict` output; files written before the field was named `task_text` say `task`. A field of
        the wrong type is a ValueError naming it (the caller adds file and line)."""
        d = {("task_text" if k == "task" else k): v for k, v in d.items()}
        _check_types(d, _TYPES)
        for i, step in enumerate(d.get("steps", [])):
            if not isinstance(step, dict):
                raise ValueError(f"field 'steps' item {i} must be an object, got {step!r:.60}")
            _check_types(step, _STEP_TYPES, f"steps[{i}].")
        return cls(**{**d, "steps": [Step(**s) for s in d.get("steps", [])]})

    # ---- chat views -------------------------------------------------------------------------
    def to_messages(self, include_last_observation: bool = True) -> list[dict[str, str]]:
        """Task + alternating assistant/observation turns as OpenAI-style messages."""
        msgs = [{"role": "user", "content": self.task_text}]
        for i, s in enumerate(self.steps):
            msgs.append({"role": "assistant", "content": s.text})
            if include_last_observation or i < len(self.steps) - 1:
                msgs.append({"role": "user", "content": OBS_PREFIX + s.observation})
        return msgs

    def to_conversation(self, instruction: str, include_last_observation: bool = False) -> list[dict[str, str]]:
        """The published `from`/`value` format: instruction, "OK", task, alternating turns.

        The published SFT files end with the last assistant turn, hence the default.
        """
        msgs = [{"role": "user", "content": instruction}, {"role": "assistant", "content": "OK"}]
        msgs += self.to_messages(include_last_observation)
        return messages_to_conversation(msgs)


def format_reply(thought: str, action: str) -> str:
    return f"Thought: {thought}\nAction: {action}"


def messages_to_conversation(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    roles = {"user": "human", "assistant": "gpt"}
    return [{"from": roles[m["role"]], "value": m["content"]} for m in messages]


def conversation_to_messages(conversation: list[dict[str, str]], where: str = "conversation") -> list[dict[str, str]]:
    """Turns as published, in either schema (`from`/`value` with human/gpt, or `role`/`content` with
    user/assistant; ETO's ICL files even mix `role`/`from` with `content`), as OpenAI-style messages."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    out = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: turn {i} must be an object with 'from'/'value' or 'role'/'content', "
                             f"got {turn!r:.80}")
        role_field = next((f for f in ("from", "role") if f in turn), None)
        text_field = next((f for f in ("value", "content") if f in turn), None)
        if role_field is None or text_field is None:
            missing = "'from' (or 'role')" if role_field is None else "'value' (or 'content')"
            raise ValueError(f"{where}: turn {i} has no field {missing}")
        if turn[role_field] not in roles:
            raise ValueError(f"{where}: turn {i} field {role_field!r} has unknown role {turn[role_field]!r}")
        if not isinstance(turn[text_field], str):
            raise ValueError(f"{where}: turn {i} field {text_field!r} must be text")
        out.append({"role": roles[turn[role_field]], "content": turn[text_field]})
    return out


def trajectory_from_conversation(
    conversation: list[dict[str, str]], where: str = "conversation", meta: dict[str, Any] | None = None
) -> tuple[str | None, Trajectory]:
    """Parse a published conversation into (instruction or None, Trajectory).

    Accepts both the SFT layout (instruction, "OK", task, ...) and a bare (task, ...) layout.
    Roles must alternate user/assistant; a trailing assistant turn has an empty observation.
    """
    msgs = conversation_to_messages(conversation, where)
    instruction = None
    if len(msgs) >= 3 and msgs[0]["role"] == "user" and msgs[1]["role"] == "assistant" and msgs[1]["content"].strip() == "OK":
        instruction, msgs = msgs[0]["content"], msgs[2:]
    if not msgs or msgs[0]["role"] != "user":
        raise ValueError(f"{where}: the task turn (a human turn) is missing")
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"{where}: turn {i + (2 if instruction else 0)} should be {want}, got {m['role']}")
        if not m["content"].strip():
            raise ValueError(f"{where}: turn {i + (2 if instruction else 0)} is empty")
    traj = Trajectory(task_text=msgs[0]["content"], meta=dict(meta or {}))
    for i in range(1, len(msgs), 2):
        obs = msgs[i + 1]["content"] if i + 1 < len(msgs) else ""
        if obs.startswith(OBS_PREFIX.strip()):
            obs = obs[len(OBS_PREFIX.strip()):].lstrip(" ")
        traj.steps.append(Step.from_reply(msgs[i]["content"], obs))
    return instruction, traj
