"""One chat-format renderer for training and inference, so a model is prompted exactly as it was trained.

`ChatFormat.render(messages)` gives the prompt string; `render_with_spans(messages)` gives the same string plus
the character spans of every assistant turn (text and end-of-turn marker), from which training masks the loss
through the tokenizer's offset mapping, never by token-length arithmetic. Formats, chosen by configuration and
never guessed from a model name: `template` (the tokenizer's chat template) or `llama-2` (FastChat's template
byte for byte, the published checkpoints' format, with its leading `<s>`: every backend tokenizes the rendered
text without adding special tokens).
"""
from __future__ import annotations

import json
from pathlib import Path

from eval_agent.cli import UserError

FORMATS = ("template", "llama-2")
FORMAT_FILE = "steca_chat_format.json"  # written into model folders by the training stages


class ChatFormat:
    def __init__(self, name: str, tokenizer=None):
        if name not in FORMATS:
            raise ValueError(f"unknown chat format {name!r}; choose from {FORMATS}")
        if name == "template" and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
            raise UserError("chat format 'template' needs a tokenizer with a chat template; use --chat_format llama-2")
        self.name = name
        self.tokenizer = tokenizer

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Prompt string for `messages` (alternating, starting with a user turn)."""
        if self.name == "template":
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        from fastchat.conversation import get_conv_template

        conv = get_conv_template("llama-2")
        conv.set_system_message("")
        for i, m in enumerate(messages):
            conv.append_message(conv.roles[i % 2], m["content"])
        if add_generation_prompt and messages and messages[-1]["role"] == "user":
            conv.append_message(conv.roles[1], None)
        return "<s>" + conv.get_prompt()

    def render_with_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """Full conversation text and the (start, end) char spans of each assistant turn.

        A span is what rendering the turn adds after the generation prompt of the turns before it:
        the assistant text plus the format's end-of-turn marker. Raises if the format is not
        prefix-stable (then training and inference would disagree).
        """
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1], add_generation_prompt=False)
            if not upto.startswith(before):
                raise ValueError(f"chat format {self.name!r} is not prefix-stable at turn {i}")
            end = len(upto)
            if self.name == "llama-2" and upto.endswith("<s>"):
                end -= len("<s>")  # the next turn's BOS, not part of this answer
            spans.append((len(before), end))
        text = self.render(messages, add_generation_prompt=False)
        for s, e in spans:
            if e > len(text):
                raise ValueError(f"chat format {self.name!r} is not prefix-stable")
        return text, spans


def recorded_chat_format(model_dir: str | Path) -> str | None:
    path = Path(model_dir) / FORMAT_FILE
    if path.is_file():
        return json.loads(path.read_text())["chat_format"]
    return None


def resolve_chat_format(model_dir: str | Path, requested: str | None) -> str:
    """The format a model folder was trained with wins; asking for another one is an error.

    Folders with no record (base models) use `requested`, else the tokenizer's template.
    """
    recorded = recorded_chat_format(model_dir)
    if recorded and requested and requested != recorded:
        raise UserError(
            f"{model_dir} was trained with chat format {recorded!r} ({FORMAT_FILE}); refusing {requested!r}"
        )
    return recorded or requested or "template"


def write_chat_format(model_dir: str | Path, name: str) -> None:
    if name not in FORMATS:
        raise ValueError(f"unknown chat format {name!r}")
    (Path(model_dir) / FORMAT_FILE).write_text(json.dumps({"chat_format": name}) + "\n")
