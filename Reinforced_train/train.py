"""Stage 4: STeCa reinforced training of the SFT model on the weighted training set.

Reads our merged set (RUN_DIR/data_collection/train.jsonl) or the published `final_data_rft_train.json`
as is (`Reinforced_train.data`), renders each row with the chat format the SFT folder records, and
trains with `steca_loss` (`Reinforced_train.loss`): with --beta 0 (the paper) a weight-scaled,
sequence-summed NLL of the chosen assistant turns given the prompt, with no reference model and no
rejected forward; with --beta > 0 the original's sigmoid-DPO term against the frozen SFT model
(--ref_model, default the policy's folder) is added.

Inputs and output default to the run directory's (--run_dir; eval_agent/layout.py); the recipe's
defaults are the paper's (`SteCaTrainingArguments`). Runs as one process, under `torchrun` (DDP; gloo on
CPU) or `accelerate launch` with an FSDP or DeepSpeed config (sft/configs; beta > 0 under DeepSpeed is refused). Gradient accumulation follows
from --global_batch_size. A rerun with the same --output_dir resumes from its last checkpoint.

Writes into --output_dir: the model and tokenizer, `steca_chat_format.json`, `train_summary.json`,
the run card `run_card.json` and the TensorBoard events.

    python -m Reinforced_train.train --run_dir outputs/alfworld
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments

from eval_agent.chat_format import ChatFormat, resolve_chat_format
from eval_agent.cli import at_least, input_file, model_folder, run_main
from eval_agent.guard import fingerprint, identity, require_output, settings_of, training_guard, training_settings
from eval_agent.layout import TRAINING_CARD, RunDir
from eval_agent.run_card import write_run_card
from eval_agent.training import (StageArguments, StageTrainingArguments, check_master_weights,
                                 configure_training_args, finished_training, load_for_training, output_dir_from_run_dir,
                                 pad_token_id, save_dtype, train_and_save)
from Reinforced_train.data import encode_rows, load_rows
from Reinforced_train.loss import WeightedCollator, steca_loss

log = logging.getLogger("Reinforced_train.train")
CODE_VERSION = 1  # raise it when a change makes the stage give other results for the same settings


@dataclass(kw_only=True)
class SteCaArguments(StageArguments):
    run_dir: str | None = field(default=None, metadata={"help": "the run directory: reads its SFT model and training "
                                                                 "set, writes its STeCa model (eval_agent/layout.py)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "the SFT model folder (HF format): the "
                                                                           "policy's start; default: the run's"})
    data: str | None = field(default=None, metadata={"help": "weighted rows: our train.jsonl or the published "
                                                             "final_data_rft_train.json; default: the run's"})
    beta: float = field(default=0.0, metadata={"help": "weight of the DPO term; 0 (the paper): no reference model"})
    weights: str = field(default="reward", metadata={"help": "reward: each row weighs its `reward` (STeCa) | uniform: "
                                                             "every row weighs 1, plain NLL (STeCa w/o RT, RFT)"})
    ref_model: str | None = field(default=None, metadata={"help": "frozen reference for beta > 0; default: the SFT folder"})
    nll_reduction: str = field(default="sum", metadata={"help": "sum (the original: log-probs summed per row) | mean (per token)"})
    global_batch_size: int = field(default=15, metadata={"help": "rows per optimizer step over all processes"})


@dataclass
class SteCaTrainingArguments(StageTrainingArguments):
    """The paper's reinforced-training recipe as defaults (the original's Reinforced_train/steca_train.sh): one
    epoch, lr 3e-6, constant schedule after 10% warmup, one row per device, a checkpoint each epoch."""

    learning_rate: float = 3e-6
    num_train_epochs: float = 1
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: float = 0.1
    per_device_train_batch_size: int = 1
    activation_checkpointing: bool | None = True
    save_strategy: str = "epoch"
    save_total_limit: int | None = 1
    logging_steps: float = 1


def resolve_paths(args: SteCaArguments) -> None:
    """Inputs from the run directory where no flag names them (the output: `output_dir_from_run_dir`)."""
    if not args.run_dir and not (args.model_name_or_path and args.data):
        raise SystemExit("error: pass --run_dir, or --model_name_or_path and --data")
    run = RunDir(args.run_dir) if args.run_dir else None
    args.model_name_or_path = args.model_name_or_path or str(run.sft_model)
    args.data = args.data or str(run.train_set)


class SteCaTrainer(Trainer):
    """`Trainer` with the STeCa loss; the batch is a mean over rows, so Trainer divides it by the
    accumulation steps (and DDP/FSDP average over processes): the mean over the global batch."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args, beta: float = 0.0, ref_model=None, token_mean: bool = False, pad_id: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # our loss needs no token count gathered over processes
        self.beta, self.token_mean, self.pad_id = beta, token_mean, pad_id
        self.ref_model = None if ref_model is None else self._prepare_reference(ref_model)
        self._metric_sums: dict[str, float] = {}
        self._metric_count = 0

    def _prepare_reference(self, ref_model):
        """Frozen, in eval mode, placed like the policy: on the device, or under FSDP sharded with the
        policy's plugin settings as accelerate wraps the policy (as TRL does; sync_module_states also
        gives it rank 0's weights under RAM-efficient loading). Not under DeepSpeed or FSDP2."""
        ref_model.eval().requires_grad_(False)
        if self.is_deepspeed_enabled or getattr(self.accelerator, "is_fsdp2", False):
            raise SystemExit("error: --beta > 0 supports DDP and FSDP (DIST_CONFIG=sft/configs/fsdp.yaml), "
                             "not DeepSpeed or FSDP2")
        if not self.is_fsdp_enabled:
            return ref_model.to(self.args.device)
        from accelerate.utils.fsdp_utils import ensure_weights_retied
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        plugin, device = self.accelerator.state.fsdp_plugin, self.accelerator.device
        plugin.set_auto_wrap_policy(ref_model)
        return FSDP(ref_model, sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
                    cpu_offload=plugin.cpu_offload, auto_wrap_policy=plugin.auto_wrap_policy,
                    mixed_precision=plugin.mixed_precision_policy, sync_module_states=plugin.sync_module_states,
                    backward_prefetch=plugin.backward_prefetch, forward_prefetch=plugin.forward_prefetch,
                    use_orig_params=plugin.use_orig_params, limit_all_gathers=plugin.limit_all_gathers,
                    param_init_fn=ensure_weights_retied(plugin.param_init_fn, ref_model, device),
                    device_id=device).eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = steca_loss(model, inputs, self.beta, self.ref_model, self.token_mean, self.pad_id)
        for name, value in metrics.items():
            self._metric_sums[name] = self._metric_sums.get(name, 0.0) + value
        self._metric_count += 1
        return (loss, metrics) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the means of the loss metrics (this process's micro-batches) since the last log."""
        if "loss" in logs and self._metric_count:
            logs |= {name: round(total / self._metric_count, 4) for name, total in self._metric_sums.items()}
            self._metric_sums, self._metric_count = {}, 0
        super().log(logs, *args, **kwargs)


def configure(args: SteCaArguments, targs: TrainingArguments) -> TrainingArguments:
    if args.nll_reduction not in ("sum", "mean"):
        raise SystemExit(f"error: --nll_reduction must be sum or mean, got {args.nll_reduction!r}")
    if args.beta < 0:
        raise SystemExit(f"error: --beta must be >= 0, got {args.beta}")
    if args.weights not in ("reward", "uniform"):
        raise SystemExit(f"error: --weights must be reward or uniform, got {args.weights!r}")
    targs = configure_training_args(targs, args.global_batch_size, args.precision, stage="steca")
    # Trainer would drop the columns the model's forward does not take (the weights, the rejected rows)
    return dataclasses.replace(targs, remove_unused_columns=False)


def build_trainer(args: SteCaArguments, targs: TrainingArguments, examples: list[dict], tokenizer) -> SteCaTrainer:
    model = load_for_training(args.model_name_or_path, args.attn_implementation)
    check_master_weights(model, targs)
    ref_model = None
    if args.beta:  # frozen: in bf16 when the compute is, half the memory of an fp32 copy
        ref_model = load_for_training(args.ref_model or args.model_name_or_path, args.attn_implementation,
                                      torch.bfloat16 if targs.bf16 else torch.float32)
    pad_id = pad_token_id(tokenizer)
    return SteCaTrainer(model=model, args=targs, train_dataset=examples, data_collator=WeightedCollator(pad_id),
                        processing_class=tokenizer, beta=args.beta, ref_model=ref_model,
                        token_mean=args.nll_reduction == "mean", pad_id=pad_id)


def build_parser() -> HfArgumentParser:
    """The command line; its defaults are the stage's (docs/ lists them)."""
    return HfArgumentParser((SteCaArguments, SteCaTrainingArguments))


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args, targs = parser.parse_args_into_dataclasses(args=output_dir_from_run_dir(argv, lambda run: run.steca_model))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    resolve_paths(args)
    check_inputs(args)
    targs = configure(args, targs)
    out = Path(targs.output_dir)
    fmt_name = resolve_chat_format(args.model_name_or_path, args.chat_format)
    with training_guard(targs, {out: fingerprint_of(args, targs, fmt_name)}, args.overwrite):
        return finished_training(out, targs) or train(args, targs, fmt_name)


def check_inputs(args: SteCaArguments) -> None:
    model_folder(args.model_name_or_path, "SFT model")
    if args.beta and args.ref_model:
        model_folder(args.ref_model, "reference model")
    input_file(args.data, "training set")
    for name in ("global_batch_size", "model_max_length"):
        at_least(name, getattr(args, name), 1)


def fingerprint_of(args: SteCaArguments, targs: TrainingArguments, chat_format: str) -> dict:
    """The recipe, the chat format, the SFT model, the training set and the reference model of beta > 0."""
    settings = settings_of(dataclasses.asdict(args), drop={"model_name_or_path", "data", "ref_model", "precision",
                                                           "attn_implementation"})
    inputs = {"model": identity(args.model_name_or_path), "data": identity(args.data),
              "ref_model": identity(args.ref_model or args.model_name_or_path) if args.beta else None}
    return fingerprint("reinforced_train", CODE_VERSION,
                       {**settings, **training_settings(targs), "chat_format": chat_format}, inputs)


def train(args: SteCaArguments, targs: TrainingArguments, fmt_name: str) -> dict:
    out = Path(targs.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    chat_format = ChatFormat(fmt_name, tokenizer if fmt_name == "template" else None)
    rows = load_rows(args.data, need_rejected=args.beta > 0)
    if args.weights == "uniform":
        rows = [dataclasses.replace(row, weight=1.0) for row in rows]
    examples, stats = encode_rows(rows, chat_format, tokenizer, args.model_max_length, with_rejected=args.beta > 0,
                                  progress=targs.process_index == 0)
    require_output(len(examples), f"no training row fits in {args.model_max_length} tokens ({args.data})")
    if targs.process_index == 0:
        write_run_card(out, "reinforced_train", {**vars(args), **targs.to_dict(), "chat_format": fmt_name},
                       TRAINING_CARD)
    log.info("%s: %d rows in, %d used (%d truncated, %d skipped: too long), %d tokens, %d trained, weights %.4g..%.4g",
             args.data, stats["rows_in"], stats["rows_out"], stats["truncated"], stats["skipped_too_long"],
             stats["tokens"], stats["trained_tokens"], stats["weight_min"], stats["weight_max"])

    trainer = build_trainer(args, targs, examples, tokenizer)
    extra = {"beta": args.beta, "weights": args.weights, "reference_model": (args.ref_model or args.model_name_or_path) if args.beta else None,
             "nll_reduction": args.nll_reduction, "global_batch_size": args.global_batch_size}
    return train_and_save(trainer, tokenizer, fmt_name, {**stats, **extra}, log, save_dtype(args.save_dtype, targs))

if __name__ == "__main__":
    run_main(main)
