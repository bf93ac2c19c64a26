"""Turning conversations into training examples, shared by the training stages (SFT, reinforced
training): token ids, a loss mask that covers chosen assistant turns only, whole-turn truncation,
a padding collator, and the train-resume-save loop both stages run.

The mask comes from the chat format by construction: `ChatFormat.render_with_spans` gives the
character span of every assistant turn (its text and end-of-turn marker) and the tokenizer's offset
mapping places each token in the text. The text is tokenized in pieces cut at the end of every
assistant turn, so that no token straddles the end of an answer (with a BPE tokenizer on `llama-2`
text, `</s><s>` would otherwise merge into `><` across two turns): the answer's tokens are then the
ones the model itself generates before it stops. A token straddling the *start* of an answer means
the tokenizer does not fit the format; that is an error, never a silent half-masked token.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerState
from transformers.trainer_utils import get_last_checkpoint

from eval_agent.chat_format import ChatFormat, write_chat_format
from eval_agent.layout import RunDir
from eval_agent.prompts import PromptBuilder
from eval_agent.store import write_json
from eval_agent.trajectory import Trajectory

IGNORE = -100  # label of a token the loss skips (the Hugging Face convention)


@dataclass
class Encoded:
    """A tokenized conversation. `num_messages` < the messages given when trailing turns were cut."""

    input_ids: list[int]
    labels: list[int]
    num_messages: int

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def encode_conversation(
    messages: list[dict[str, str]],
    chat_format: ChatFormat,
    tokenizer,
    max_len: int | None = None,
    trained: set[int] | None = None,
) -> Encoded:
    """Token ids and labels of `messages`; labels are the ids of the assistant turns whose message
    index is in `trained` (default: every assistant turn) and IGNORE elsewhere.

    Truncation drops whole trailing turns: the example ends with the last assistant turn that fits
    in `max_len` tokens, so no answer is ever trained half-way. When not even the first assistant
    turn fits, the example is empty (`num_messages` 0) and the caller skips it.
    """
    text, spans = chat_format.render_with_spans(messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = set(turns) if trained is None else trained
    cuts = [0] + [end for _, end in spans]
    pieces = [text[a:b] for a, b in zip(cuts, cuts[1:])]
    enc = tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = []
    labels: list[int] = []
    kept = 0
    for turn, (start, _), piece_start, piece_ids, offsets in zip(
        turns, spans, cuts, enc["input_ids"], enc["offset_mapping"]
    ):
        if max_len is not None and len(ids) + len(piece_ids) > max_len:
            break
        for tok, (a, b) in zip(piece_ids, offsets):
            a, b = a + piece_start, b + piece_start
            if a < start < b:
                raise ValueError(f"token {text[a:b]!r} straddles the start of assistant turn {turn}: "
                                 f"the tokenizer does not fit chat format {chat_format.name!r}")
            labels.append(tok if a >= start and turn in trained else IGNORE)
            ids.append(tok)
        kept = turn + 1
    return Encoded(input_ids=ids, labels=labels, num_messages=kept)


def sft_messages(prompts: PromptBuilder, traj: Trajectory) -> tuple[list[dict[str, str]], set[int]]:
    """The training conversation of an expert trajectory and the assistant turns to train.

    Layout as prompted at inference: instruction, "OK", [in-context example], task, steps; it ends
    with the last answer (the final observation teaches nothing). Trained: "OK" (as the original
    FastChat training did) and every step of the trajectory; never the in-context example's turns,
    which would otherwise be learned once per row.
    """
    messages = prompts.messages(traj, include_last_observation=False)
    icl_end = 2 + (len(prompts.icl_example.to_messages(include_last_observation=False)) if prompts.icl_example else 0)
    trained = {i for i, m in enumerate(messages) if m["role"] == "assistant" and not 2 <= i < icl_end}
    return messages, trained


@dataclass
class PadCollator:
    """Right-pads a batch of `Encoded`-like dicts; padded positions get no attention and no loss."""

    pad_id: int

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)

        def pad(seq: list[int], value: int) -> list[int]:
            return seq + [value] * (width - len(seq))

        return {
            "input_ids": torch.tensor([pad(r["input_ids"], self.pad_id) for r in rows]),
            "labels": torch.tensor([pad(r["labels"], IGNORE) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
        }


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else unk, else eos (pad positions are masked, so any id works)."""
    for tid in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise ValueError("the tokenizer has no pad, unk or eos token to pad with")


def configure_training_args(targs, global_batch_size: int, precision: str):
    """`TrainingArguments` completed for this machine: gradient accumulation from the global batch
    (over all processes), bf16 where the GPU has it (`precision` auto | bf16 | fp32), tf32 matmuls on
    GPUs (as the original), and the CPU fallback that lets torchrun run DDP over gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = targs.per_device_train_batch_size * world
    if global_batch_size % per_step:
        raise SystemExit(f"error: global batch {global_batch_size} is not a multiple of "
                         f"per-device batch {targs.per_device_train_batch_size} x {world} processes")
    if precision not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"error: --precision must be auto, bf16 or fp32, got {precision!r}")
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    bf16 = precision == "bf16" or (precision == "auto" and gpu_bf16)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # no effect on CPU
    # without a GPU, transformers only runs distributed (DDP over gloo) when told to use the CPU
    return dataclasses.replace(targs, gradient_accumulation_steps=global_batch_size // per_step, bf16=bf16,
                               use_cpu=targs.use_cpu or not torch.cuda.is_available(),
                               include_num_input_tokens_seen="non_padding")


def train_and_save(trainer, tokenizer, chat_format_name: str, summary: dict[str, Any], log) -> dict[str, Any]:
    """Train (resuming from the output folder's last checkpoint), save the model where later stages load it
    (weights, tokenizer, chat format) and `train_summary.json`: `summary` plus what the run measured."""
    out = Path(trainer.args.output_dir)
    resume = get_last_checkpoint(str(out)) if out.is_dir() else None
    seen_before = 0
    if resume:
        log.info("resuming from %s", resume)
        seen_before = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json")).num_input_tokens_seen
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    state = trainer.state
    trainer.model.config.use_cache = True  # the saved model generates with its KV cache
    trainer.save_model(str(out))  # every process takes part (FSDP gathers the full state dict); rank 0 writes
    summary = {
        **summary,
        "chat_format": chat_format_name,
        "epochs": trainer.args.num_train_epochs,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "world_size": trainer.args.world_size,
        "optimizer_steps": state.global_step,
        "resumed_from": resume,
        "train_loss": result.training_loss,
        "train_seconds": round(seconds, 1),
        "tokens_seen": state.num_input_tokens_seen,  # trained sequences, all processes, all epochs, no padding
        "tokens_per_s": round((state.num_input_tokens_seen - seen_before) / seconds, 1),  # this run's
        "log_history": state.log_history,
    }
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
        write_chat_format(out, chat_format_name)
        write_json(out / "train_summary.json", summary)
    log.info("trained %d steps in %.1fs (%.0f tokens/s), final loss %.4f -> %s", summary["optimizer_steps"],
             seconds, summary["tokens_per_s"], result.training_loss, out)
    return summary


def output_dir_from_run_dir(argv: list[str] | None, model_dir: Callable[[RunDir], Path]) -> list[str]:
    """`argv` with `--output_dir <the run directory's model folder>` added when --run_dir is given and no
    --output_dir is: before parsing, since TrainingArguments derives its logging folder from it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = {a.split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    if "__output_dir" in given:
        return argv
    if "__run_dir" not in given:
        raise SystemExit("error: pass --run_dir (the model goes into the run directory) or --output_dir")
    i = next(i for i, a in enumerate(argv) if a.split("=", 1)[0].replace("-", "_") == "__run_dir")
    run_dir = argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1]
    return argv + ["--output_dir", str(model_dir(RunDir(run_dir)))]
