r"""Reply parsing, as the original does it (the action is what follows the first `Action:`, the
thought what precedes it), with the cases that broke the original handled.

Differences from the original, all of which it turned into a wasted or wrong env step:
- a role prefix the model echoes (`Assistant:`, `Gpt:`, `[/INST]` ...) is dropped;
- only the first line after `Action:` is the action (the original sent every following line,
  e.g. a second `Thought:`/`Action:` pair, to the environment as part of the command);
- an empty reply or one without `Action:` gives action None: the runner records an invalid step.

`ACTION_PARSE=original` (`mode="original"`) parses as the published code does: the text after the first
case-sensitive `Action:`, every line of it (`re.findall(r"Action:\s?(.*)", reply.strip(), re.DOTALL)[0]`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_ROLE_PREFIX = re.compile(r"^\s*(?:\[/?INST\]|(?:assistant|gpt|ai|agent|bot)\s*:)\s*", re.IGNORECASE)
_ACTION = re.compile(r"Action:\s?", re.IGNORECASE)
_THOUGHT = re.compile(r"^\s*Thought:\s?", re.IGNORECASE)
_ORIGINAL_ACTION = re.compile(r"Action:\s?(.*)", re.DOTALL)  # the published code's parse_action
FIRST_LINE, ORIGINAL = "first_line", "original"
ACTION_PARSES = (FIRST_LINE, ORIGINAL)


@dataclass(frozen=True)
class ParsedReply:
    thought: str
    action: str | None


def parse_reply(text: str, mode: str = FIRST_LINE) -> ParsedReply:
    """The thought and the action of a reply; `mode` "original": the action as the published code read it."""
    if mode not in ACTION_PARSES:
        raise ValueError(f"action parse mode must be one of {ACTION_PARSES}, got {mode!r}")
    text = (text or "").strip()
    if mode == ORIGINAL:
        found = _ORIGINAL_ACTION.findall(text)
        thought = _THOUGHT.sub("", text.split("Action:", 1)[0]).strip()
        return ParsedReply(thought=thought, action=(found[0] or None) if found else None)
    while True:
        stripped = _ROLE_PREFIX.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    m = _ACTION.search(text)
    if m is None:
        return ParsedReply(thought=_THOUGHT.sub("", text).strip(), action=None)
    thought = _THOUGHT.sub("", text[: m.start()]).strip()
    rest = text[m.end():].strip()
    action = rest.split("\n", 1)[0].strip() if rest else ""
    return ParsedReply(thought=thought, action=action or None)
