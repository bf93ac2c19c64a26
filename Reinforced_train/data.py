"""Weighted training rows for reinforced training: reading, checking and tokenizing them.

Reads ours (RUN_DIR/data_collection/train.jsonl) and the published `final_data_rft_train.json` as is:
`prompt`, `chosen` and `rejected` are `{"from", "value"}` turn lists, `reward` the row's weight. Tokenizing
renders `prompt + chosen` (and `prompt + rejected` for a reference term) with the shared chat format and labels
only the assistant turns of the continuation; an over-long continuation loses whole trailing turns, and a row
where not one turn fits is skipped and counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eval_agent.chat_format import ChatFormat
from eval_agent.store import BadRecord, read_rows
from eval_agent.trajectory import conversation_to_messages
from eval_agent.training import Encoded, encode_conversation


@dataclass
class WeightedRow:
    key: str
    prompt: list[dict[str, str]]  # role/content messages
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]] | None  # None when the file has no usable `rejected` and none is needed
    weight: float


def _turns(row: dict, name: str, where: str) -> list[dict[str, str]]:
    """The turns of one side as messages. An empty assistant turn is an error in `chosen` (it would train
    saying nothing); in `prompt` and `rejected` it is what the policy replied (a deviated step, say)."""
    turns = row.get(name)
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"{where}: field {name!r} must be a non-empty list of turns")
    try:
        messages = conversation_to_messages(turns, where=f"{where}: field {name!r}")
    except ValueError as e:
        raise BadRecord(str(e)) from None
    for i, m in enumerate(messages):
        if not isinstance(m["content"], str) or (name == "chosen" and m["role"] == "assistant" and not m["content"].strip()):
            raise BadRecord(f"{where}: field {name!r}: turn {i} is empty or not text")
    return messages


def _continuation(prompt: list[dict[str, str]], row: dict, name: str, where: str) -> list[dict[str, str]]:
    """`chosen` or `rejected`, checked to continue the prompt: roles alternate from the prompt's human turns."""
    turns = _turns(row, name, where)
    for i, m in enumerate(turns):
        want = "assistant" if (len(prompt) + i) % 2 else "user"
        if m["role"] != want:
            raise BadRecord(f"{where}: field {name!r}: turn {i} should be {want}, got {m['role']}")
    return turns


def parse_row(row: Any, where: str, need_rejected: bool) -> WeightedRow:
    if not isinstance(row, dict):
        raise BadRecord(f"{where}: expected a JSON object")
    for name in ("prompt", "chosen", "reward") + (("rejected",) if need_rejected else ()):
        if name not in row:
            raise BadRecord(f"{where}: missing field {name!r}")
    prompt = _turns(row, "prompt", where)
    for i, m in enumerate(prompt):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise BadRecord(f"{where}: field 'prompt': turn {i} should be {'user' if i % 2 == 0 else 'assistant'}, "
                            f"got {m['role']} (a prompt alternates from a human turn)")
    if prompt[-1]["role"] != "user":
        raise BadRecord(f"{where}: field 'prompt' must end with a human turn")
    weight = row["reward"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise BadRecord(f"{where}: field 'reward' must be a finite number >= 0, got {weight!r}")
    if not isinstance(row.get("key", ""), str) or isinstance(row.get("id"), (dict, list, bool)):
        name = "key" if "key" in row else "id"
        raise BadRecord(f"{where}: field {name!r} must be text, got {row[name]!r:.60}")
    return WeightedRow(
        key=str(row.get("key", row.get("id", where))),
        prompt=prompt,
        chosen=_continuation(prompt, row, "chosen", where),
        rejected=_continuation(prompt, row, "rejected", where) if need_rejected else None,
        weight=float(weight),
    )


def load_rows(path: str | Path, need_rejected: bool = False) -> list[WeightedRow]:
    """Every row of a training file (ours or the published format), in file order; a bad row raises
    `BadRecord` naming the file, the row (JSON list, 0-based) or line (JSONL) and the field; so does a file
    without rows."""
    rows = [parse_row(row, where, need_rejected) for where, row in read_rows(path)]
    if not rows:
        raise BadRecord(f"no rows in {path}")
    return rows


def encode_continuation(prompt: list[dict[str, str]], continuation: list[dict[str, str]], chat_format: ChatFormat,
                        tokenizer, max_len: int) -> Encoded | None:
    """`prompt + continuation` tokenized with only the continuation's assistant turns labelled; None
    when not one of them fits in `max_len` tokens."""
    messages = prompt + continuation
    trained = {i for i in range(len(prompt), len(messages)) if messages[i]["role"] == "assistant"}
    enc = encode_conversation(messages, chat_format, tokenizer, max_len, trained)
    return enc if enc.num_messages > len(prompt) else None


def encode_rows(
    rows: list[WeightedRow], chat_format: ChatFormat, tokenizer, max_len: int, with_rejected: bool,
    progress: bool = False,
) -> tuple[list[dict], dict]:
    """Trainer examples ({input_ids, labels, weight} [+ rejected_input_ids, rejected_labels]) and the counts
    for the summary: rows whose chosen (or, with `with_rejected`, rejected) continuation has no turn that
    fits are skipped; rows cut to fewer turns are counted as truncated."""
    examples = []
    stats = {"rows_in": len(rows), "truncated": 0, "skipped_too_long": 0, "tokens": 0, "trained_tokens": 0}
    for row in tqdm(rows, desc="encoding rows", unit="row", disable=not progress):
        chosen = encode_continuation(row.prompt, row.chosen, chat_format, tokenizer, max_len)
        rejected = (encode_continuation(row.prompt, row.rejected, chat_format, tokenizer, max_len)
                    if with_rejected else None)
        if chosen is None or (with_rejected and rejected is None):
            stats["skipped_too_long"] += 1
            continue
        dropped = row.chosen[chosen.num_messages - len(row.prompt):]  # turns after the last one that fits
        stats["truncated"] += any(m["role"] == "assistant" for m in dropped)
        stats["tokens"] += len(chosen.input_ids)
        stats["trained_tokens"] += chosen.num_trained
        example = {"input_ids": chosen.input_ids, "labels": chosen.labels, "weight": row.weight}
        if rejected is not None:
            example.update(rejected_input_ids=rejected.input_ids, rejected_labels=rejected.labels)
        examples.append(example)
    stats["rows_out"] = len(examples)
    weights = [e["weight"] for e in examples]
    if weights:
        stats["weight_min"], stats["weight_mean"], stats["weight_max"] = (
            min(weights), sum(weights) / len(weights), max(weights))
    return examples, stats
