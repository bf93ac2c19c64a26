"""Stage 1: supervised fine-tuning (warm-up) on expert trajectories with the Hugging Face Trainer.

Each trajectory becomes the conversation the model is prompted with at inference (the run's instruction, "OK",
[the run's in-context example with --icl_num 1], task, steps: eval_agent.prompts decides them once for every
stage; --row_instruction keeps each published row's own first turn, as the original), rendered by the shared
chat format; the loss covers the assistant turns only ("OK" and the trajectory's steps, each with its
end-of-turn marker), masked from the renderer's spans (`eval_agent.training`). Conversations longer than
--model_max_length lose whole trailing turns; rows where not one step fits are skipped; both counted.

Inputs and output default to the run directory's (--run_dir; eval_agent/layout.py); the recipe's
defaults are the paper's (`SFTTrainingArguments`). Runs as one process, under `torchrun` (DDP; gloo on
CPU) or under `accelerate launch` with an FSDP or DeepSpeed config (sft/configs). Gradient accumulation follows from --global_batch_size. A rerun with
the same --output_dir resumes from its last checkpoint.

Writes into --output_dir: the model and tokenizer, `steca_chat_format.json` (later stages read the
format from there), `train_summary.json` (rows, tokens, time, tokens/s, the loss log), the run card
`run_card.json` and the TensorBoard events (so two trainings under one parent folder never mix them).

    python -m sft.train --run_dir outputs/alfworld --model_name_or_path models/SmolLM2-135M-Instruct
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from transformers import AutoTokenizer, HfArgumentParser, Trainer

from eval_agent.chat_format import ChatFormat, resolve_chat_format
from eval_agent.cli import UserError, at_least, input_file, model_folder, run_main
from eval_agent.envs import REGISTRY
from eval_agent.expert_data import check_task_family, load_expert_data
from eval_agent.guard import fingerprint, identity, prompt_inputs, settings_of, training_guard, training_settings
from eval_agent.prompts import PromptBuilder, training_instruction
from eval_agent.layout import TRAINING_CARD, RunDir
from eval_agent.run_card import write_run_card
from eval_agent.smollm2 import default_model_dir
from eval_agent.trajectory import Trajectory
from eval_agent.training import (PadCollator, StageArguments, StageTrainingArguments, check_master_weights,
                                 configure_training_args, encode_conversation, finished_training, load_for_training,
                                 output_dir_from_run_dir, pad_token_id, save_dtype, sft_messages, train_and_save,
                                 trained_positions)

log = logging.getLogger("sft.train")
CODE_VERSION = 1  # raise it when a change makes the stage give other results for the same settings


@dataclass(kw_only=True)
class SFTArguments(StageArguments):
    task_family: str = field(metadata={"help": f"instruction and ICL example of: {sorted(REGISTRY)}", "aliases": ["--task"]})
    run_dir: str | None = field(default=None, metadata={"help": "the run directory: reads its expert data, writes its "
                                                                 "SFT model (eval_agent/layout.py)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "base model folder (HF format); default: "
                                                                           "the embedded SmolLM2-135M-Instruct"})
    data: str | None = field(default=None, metadata={"help": "expert trajectories: our JSONL or the published "
                                                             "alfworld_sft.json format; default: the run's"})
    icl_num: int = field(default=0, metadata={"help": "in-context examples in the training prompts: 0 (the original) "
                                                      "or 1", "aliases": ["--icl"]})
    instruction_from: str | None = field(default=None, metadata={
        "help": "the run's instruction: a published *_inst.txt or an expert file (its first row's); default: the "
                "published one beside the data, else the family's own (eval_agent/prompts.py), as every stage"})
    icl_from: str | None = field(default=None, metadata={"help": "the run's in-context example (--icl_num 1): a "
                                                                 "published *_icl.json or an expert file; default: as --instruction_from"})
    row_instruction: bool = field(default=False, metadata={
        "help": "train each row with its own instruction (a published row's first turn), as the original did, "
                "instead of the run's, the one every stage prompts with"})


@dataclass
class SFTTrainingArguments(StageTrainingArguments):
    """The paper's SFT recipe as defaults (the original's sft/my_sft.sh): 3 epochs, lr 2e-5, cosine with 3% warmup,
    2 rows per device, a checkpoint each epoch (the last kept: a rerun resumes from it)."""

    learning_rate: float = 2e-5
    num_train_epochs: float = 3
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03
    per_device_train_batch_size: int = 2
    activation_checkpointing: bool | None = True
    save_strategy: str = "epoch"
    save_total_limit: int | None = 1
    logging_steps: float = 1


def resolve_paths(args: SFTArguments) -> None:
    """Inputs from the run directory where no flag names them (the output: `output_dir_from_run_dir`)."""
    if not args.run_dir and not args.data:
        raise SystemExit("error: pass --run_dir, or --data")
    run = RunDir(args.run_dir) if args.run_dir else None
    args.model_name_or_path = args.model_name_or_path or str(default_model_dir())
    args.data = args.data or str(run.expert_data())


def training_messages(args: SFTArguments, trajs: list[Trajectory]) -> Iterator[tuple[list[dict[str, str]], set[int], bool]]:
    """(messages, trained turn indexes, whether the row's own instruction was replaced) per trajectory: the
    run's prompt (eval_agent.prompts), the row's own instruction only with --row_instruction."""
    try:
        base = PromptBuilder.for_run(args.task_family, args.icl_num, args.instruction_from, args.icl_from)
    except (OSError, ValueError) as e:  # also BadRecord: the message names file, row and field
        raise SystemExit(f"error: {e}") from None
    for traj in trajs:
        instruction = training_instruction(traj, base.instruction, own=args.row_instruction)
        own = traj.meta.get("instruction")
        messages, trained = sft_messages(dataclasses.replace(base, instruction=instruction), traj)
        yield messages, trained, bool(own) and own != instruction


def encode_dataset(args: SFTArguments, trajs: list[Trajectory], tokenizer, chat_format: ChatFormat
                   ) -> tuple[list[dict], dict]:
    """Tokenized training rows and the counts for the summary."""
    rows, stats = [], {"rows_in": 0, "truncated": 0, "skipped_too_long": 0, "tokens": 0, "trained_tokens": 0,
                       "own_instruction_replaced": 0}
    for messages, trained, replaced in training_messages(args, trajs):
        stats["rows_in"] += 1
        stats["own_instruction_replaced"] += replaced
        enc = encode_conversation(messages, chat_format, tokenizer, args.model_max_length, trained)
        first_step = min(i for i in trained if i > 1)  # the trained turns after "OK" are the steps
        if enc.num_messages <= first_step:  # not one step of the trajectory fits
            stats["skipped_too_long"] += 1
            continue
        stats["truncated"] += enc.num_messages < len(messages)
        stats["tokens"] += len(enc.input_ids)
        stats["trained_tokens"] += enc.num_trained
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    stats["rows_out"] = len(rows)
    if not rows:
        raise SystemExit(f"error: no training row fits in {args.model_max_length} tokens ({args.data})")
    if stats["own_instruction_replaced"]:
        log.warning("%d of %d rows carry an instruction of their own that is not the run's: trained with the run's, "
                    "the one every stage prompts with (--row_instruction keeps theirs)",
                    stats["own_instruction_replaced"], stats["rows_in"])
    return rows, stats


class SFTTrainer(Trainer):
    """The causal-LM loss from logits at the trained positions only (`trained_positions`): the model's own loss
    and gradient, without the LM head on the prompt's positions."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        keep = trained_positions(inputs["labels"])
        inputs = {**inputs, "logits_to_keep": keep, "shift_labels": inputs["labels"][:, keep + 1]}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def build_parser() -> HfArgumentParser:
    """The command line; its defaults are the stage's (docs/ lists them)."""
    return HfArgumentParser((SFTArguments, SFTTrainingArguments))


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args, targs = parser.parse_args_into_dataclasses(args=output_dir_from_run_dir(argv, lambda run: run.sft_model))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    resolve_paths(args)
    trajs = check_inputs(args, targs)
    targs = configure_training_args(targs, args.global_batch_size, args.precision, stage="sft")
    dtype = save_dtype(args.save_dtype, targs)
    out = Path(targs.output_dir)
    fmt_name = resolve_chat_format(args.model_name_or_path, args.chat_format)
    with training_guard(targs, {out: fingerprint_of(args, targs, fmt_name)}, args.overwrite):
        return finished_training(out, targs) or train(args, targs, fmt_name, trajs, dtype)


def check_inputs(args: SFTArguments, targs: SFTTrainingArguments) -> list[Trajectory]:
    """The settings, the base model folder, and the expert data (read here: its rows must be of the task family)."""
    model_folder(args.model_name_or_path, "base model")
    for name in ("global_batch_size", "model_max_length"):
        at_least(name, getattr(args, name), 1)
    at_least("learning_rate", targs.learning_rate, 0)
    if not (targs.num_train_epochs > 0 or targs.max_steps > 0):
        raise UserError(f"--num_train_epochs must be > 0, got {targs.num_train_epochs}")
    trajs = load_expert_data(input_file(args.data, "expert data"))
    check_task_family(trajs, args.task_family, args.data)
    return trajs


def fingerprint_of(args: SFTArguments, targs: SFTTrainingArguments, chat_format: str) -> dict:
    """The recipe, the chat format and the base model, expert data and prompt files it trains on."""
    settings = settings_of(dataclasses.asdict(args), drop={"model_name_or_path", "data", "precision", "attn_implementation",
                                                           "instruction_from", "icl_from"})
    return fingerprint("sft.train", CODE_VERSION, {**settings, **training_settings(targs), "chat_format": chat_format},
                       {"model": identity(args.model_name_or_path), "data": identity(args.data),
                        **prompt_inputs(args.task_family, args.instruction_from, args.icl_from, args.icl_num)})


def train(args: SFTArguments, targs: SFTTrainingArguments, fmt_name: str, trajs: list[Trajectory], dtype) -> dict:
    out = Path(targs.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    chat_format = ChatFormat(fmt_name, tokenizer if fmt_name == "template" else None)
    rows, stats = encode_dataset(args, trajs, tokenizer, chat_format)
    if targs.process_index == 0:
        write_run_card(out, "sft", {**vars(args), **targs.to_dict(), "chat_format": fmt_name}, TRAINING_CARD)
    log.info("%s: %d rows in, %d used (%d truncated, %d skipped: too long), %d tokens, %d trained",
             args.data, stats["rows_in"], stats["rows_out"], stats["truncated"], stats["skipped_too_long"],
             stats["tokens"], stats["trained_tokens"])

    model = load_for_training(args.model_name_or_path, args.attn_implementation)
    check_master_weights(model, targs)
    trainer = SFTTrainer(model=model, args=targs, train_dataset=rows, data_collator=PadCollator(pad_token_id(tokenizer)),
                         processing_class=tokenizer)
    return train_and_save(trainer, tokenizer, fmt_name, {**stats, "global_batch_size": args.global_batch_size}, log,
                          dtype)

if __name__ == "__main__":
    run_main(main)
