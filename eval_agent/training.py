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
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from eval_agent.chat_format import FORMATS, ChatFormat, write_chat_format
from eval_agent.layout import RunDir
from eval_agent.prompts import PromptBuilder
from eval_agent.store import write_json
from eval_agent.trajectory import Trajectory

IGNORE = -100  # label of a token the loss skips (the Hugging Face convention)
TRAIN_SUMMARY = "train_summary.json"  # written into the output folder last: the training completed


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


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is trained in any row of `labels` [batch, length]: only there are logits
    needed. Agent rows are mostly prompt (instruction, in-context example, observations); skipping the LM head and
    its cross-entropy over a 49k vocabulary there saved 3-10% of a SmolLM2-135M step (1k tokens, 200 trained)."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(-1)


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


PRECISIONS = ("auto", "bf16", "fp32")
SAVE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here (torch's own words, e.g. a driver too old for its CUDA), or None when it can."""
    if torch.cuda.is_available():
        return None
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - whatever torch says is the reason to show
        return str(e).strip().splitlines()[0]
    return "torch.cuda.is_available() is False"


def gpu_expected() -> bool:
    """An NVIDIA driver (or a scheduler that handed out GPUs) is on this machine: a CPU run here is a mistake.
    A CUDA build of torch alone is no sign (PyPI's default torch is one, on CPU-only machines too)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return (shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").is_file()
            or (visible not in ("", "-1") and not visible.startswith("NoDevFiles")))


def check_precision(precision: str, use_cpu: bool, fp16: bool = False) -> bool:
    """Whether to train with bf16 autocast; an error where the request cannot be honoured, never a quiet fallback.

    `auto` is bf16 on a GPU that has it, else fp32. A GPU that this machine should have but torch cannot use
    (e.g. a driver older than the CUDA build of torch needs) is an error unless the CPU is asked for (`--use_cpu`);
    so is `bf16` without a GPU, except with `--use_cpu` (bf16 autocast on the CPU, how the tests simulate a GPU run).
    """
    if precision not in PRECISIONS:
        raise SystemExit(f"error: --precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if fp16:
        raise SystemExit("error: --fp16 is not supported (loss scaling, overflow at 7B); use --precision bf16 or auto")
    if use_cpu:
        return precision == "bf16"
    problem = cuda_problem()
    if problem and gpu_expected():
        raise SystemExit(f"error: this machine has an NVIDIA GPU but torch {torch.__version__} (CUDA "
                         f"{torch.version.cuda}) cannot use it: {problem}. Fix the driver or the torch build "
                         "(python -m eval_agent.doctor), or pass --use_cpu to train on the CPU on purpose")
    if problem and precision == "bf16":
        raise SystemExit(f"error: --precision bf16 needs a GPU and none is usable ({problem}); "
                         "use --precision auto/fp32, or add --use_cpu for bf16 autocast on the CPU")
    if problem:
        return False
    if not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise SystemExit(f"error: {torch.cuda.get_device_name()} has no bf16; use --precision fp32")
        return False
    return precision in ("auto", "bf16")


def configure_training_args(targs, global_batch_size: int, precision: str, stage: str | None = None):
    """`TrainingArguments` completed for this machine: gradient accumulation from the global batch (over all
    processes), bf16 autocast over fp32 weights where the GPU has it (`check_precision`), tf32 matmuls on GPUs
    (as the original), the CPU that lets torchrun run DDP over gloo, and the tracker (`eval_agent.tracking`;
    `stage` names the run, e.g. `sft`)."""
    from eval_agent.tracking import configure_tracking

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = targs.per_device_train_batch_size * world
    if global_batch_size % per_step:
        raise SystemExit(f"error: global batch {global_batch_size} is not a multiple of "
                         f"per-device batch {targs.per_device_train_batch_size} x {world} processes")
    if targs.bf16 and precision == "fp32":
        raise SystemExit("error: --bf16 contradicts --precision fp32; set the precision with --precision only")
    bf16 = check_precision("bf16" if targs.bf16 else precision, targs.use_cpu, targs.fp16)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not torch.cuda.is_available():
        raise SystemExit("error: an FSDP config without a usable GPU: accelerate applies FSDP on GPUs only and would "
                         "train unsharded; drop DIST_CONFIG on a CPU (DDP over gloo with NPROC > 1)")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # no effect on CPU
    targs = dataclasses.replace(targs, gradient_accumulation_steps=global_batch_size // per_step, bf16=bf16,
                                use_cpu=targs.use_cpu or not torch.cuda.is_available(),
                                include_num_input_tokens_seen="non_padding")
    if targs.mixed_precision != ("bf16" if bf16 else "no"):  # an accelerate config's mixed_precision, via the env
        raise SystemExit(f"error: the launcher asks for mixed precision {targs.mixed_precision!r} "
                         f"(ACCELERATE_MIXED_PRECISION) but --precision gives {'bf16' if bf16 else 'fp32'}: "
                         "remove mixed_precision from the accelerate config, --precision decides")
    return configure_tracking(targs, stage) if stage else targs


@dataclass(kw_only=True)
class StageArguments:
    """The arguments both training stages take beside transformers' (`StageTrainingArguments`): where the run is,
    the model and data they train on, the chat format, length, global batch and precision. A stage adds its own
    and may redefine one to give it another default or help."""

    run_dir: str | None = field(default=None, metadata={"help": "the run directory: reads the stage's inputs, writes "
                                                                 "its model (eval_agent/layout.py)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "the model to train (HF folder)"})
    data: str | None = field(default=None, metadata={"help": "the training data; default: the run's"})
    chat_format: str | None = field(default=None, metadata={"help": f"{FORMATS}; default: what the model folder "
                                                                    "records, else template"})
    model_max_length: int = field(default=4096, metadata={"help": "tokens per example; longer ones lose whole "
                                                                  "trailing turns"})
    global_batch_size: int = field(default=16, metadata={"help": "examples per optimizer step over all processes"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on a GPU that has it, else fp32) | bf16 "
                                                             "| fp32; weights and optimizer stay fp32"})
    save_dtype: str = field(default="auto", metadata={"help": "dtype of the saved model: auto (bf16 after bf16 training) "
                                                              "| bf16 | fp32"})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. flash_attention_2; default: "
                                                                             "transformers' choice"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh whatever settings made the output folder "
                                                             "(moved aside as <folder>.old)"})


@dataclass
class StageTrainingArguments(TrainingArguments):
    """What both training stages change in transformers' arguments before their recipes: `--report_to` defaults
    to `auto`, TensorBoard when it is installed (`eval_agent.tracking`), instead of `none`."""

    report_to: None | str | list[str] = field(
        default="auto", metadata={"help": "none | auto (tensorboard when installed) | tensorboard | wandb"})
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "keep the last checkpoint (optimizer state) of a finished training; default: "
                                         "only the final model stays (a 7B checkpoint is ~81 GB). An interrupted "
                                         "training resumes from its last checkpoint either way"})


def load_for_training(path: str, attn_implementation: str | None = None, dtype: torch.dtype = torch.float32):
    """A causal LM to train, in fp32 whatever the precision: bf16 compute comes from autocast (`bf16=True`),
    FSDP's mixed precision or DeepSpeed's bf16 mode, each over fp32 master weights. `dtype` is for frozen models
    only (a reference model may sit in bf16)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.config.use_cache = False  # no generation while training; activation checkpointing needs it off
    return model


def check_master_weights(model, targs) -> None:
    """Refuse to train weights that an optimizer step cannot move: AdamW's step at lr 3e-6 changes a weight by
    ~3e-6, far below the spacing of bf16 numbers near a typical weight (2^-8 of it), so on bf16 weights most
    updates round away and training silently does nothing. DeepSpeed keeps fp32 masters of its own."""
    if targs.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return
    low = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
    if low:
        raise SystemExit(f"error: trainable weights in {', '.join(low)} with optimizer {targs.optim}: at lr "
                         f"{targs.learning_rate:g} most updates would round away; load them in fp32 "
                         "(eval_agent.training.load_for_training) and let --precision bf16 autocast the compute")


def save_dtype(name: str, targs) -> torch.dtype:
    """The dtype of the final model: `auto` is bf16 after a bf16 run (what the next stage loads on a GPU:
    half the disk, and vLLM serves the dtype a folder records), else fp32."""
    if name not in SAVE_DTYPES:
        raise SystemExit(f"error: --save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {name!r}")
    return SAVE_DTYPES[name] or (torch.bfloat16 if targs.bf16 else torch.float32)


def save_final_model(trainer, out: Path, dtype: torch.dtype) -> None:
    """The trained weights as one plain HF folder in `dtype`, its config saying so. Every process takes part:
    FSDP gathers the full state dict onto rank 0's CPU, ZeRO-3 its 16-bit weights, one layer at a time; the
    checkpoints before stay as the launcher shards them (FSDP's SHARDED_STATE_DICT, DeepSpeed's own files)."""
    state = trainer.accelerator.get_state_dict(trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model)
    if state:  # cast on the CPU: no second copy of the weights on a GPU still holding the optimizer state
        state = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v for k, v in state.items()}
    trainer._save(str(out), state_dict=state)
    if trainer.is_world_process_zero():
        config = trainer.accelerator.unwrap_model(trainer.model).config
        config.dtype = dtype
        config.save_pretrained(out)


def train_and_save(trainer, tokenizer, chat_format_name: str, summary: dict[str, Any], log,
                   dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Train (resuming from the output folder's last checkpoint), save the model where later stages load it
    (weights in `dtype`, tokenizer, chat format) and `train_summary.json`: `summary` plus what the run measured."""
    out = Path(trainer.args.output_dir)
    resume = get_last_checkpoint(str(out)) if out.is_dir() else None
    seen_before = 0
    if resume:
        log.info("resuming from %s", resume)
        seen_before = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json")).num_input_tokens_seen
    # counted before the launcher wraps the model; ZeRO-3 has partitioned it already (ds_numel: the full size)
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    state = trainer.state
    trainer.model.config.use_cache = True  # the saved model generates with its KV cache
    save_final_model(trainer, out, dtype)
    summary = {
        **summary,
        "chat_format": chat_format_name,
        "epochs": trainer.args.num_train_epochs,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "world_size": trainer.args.world_size,
        "precision": "bf16 autocast, fp32 weights" if trainer.args.bf16 else "fp32",
        "saved_dtype": str(dtype).removeprefix("torch."),
        "optimizer_steps": state.global_step,
        "resumed_from": resume,
        "train_loss": result.training_loss,
        "train_seconds": round(seconds, 1),
        "tokens_seen": state.num_input_tokens_seen,  # trained sequences, all processes, all epochs, no padding
        "tokens_per_s": round((state.num_input_tokens_seen - seen_before) / seconds, 1),  # this run's
        "parameters": parameters,
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
        "log_history": state.log_history,
    }
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
        write_chat_format(out, chat_format_name)
        write_json(out / TRAIN_SUMMARY, summary)  # the training is complete: its checkpoints are not needed any more
    drop_checkpoints(out, trainer.args)
    log.info("trained %d steps in %.1fs (%.0f tokens/s), final loss %.4f -> %s", summary["optimizer_steps"],
             seconds, summary["tokens_per_s"], result.training_loss, out)
    return summary


def drop_checkpoints(output_dir: str | Path, targs) -> list[Path]:
    """Delete the checkpoints (weights, optimizer state) of a finished training in `output_dir`, unless
    --keep_checkpoints: only called once its final model and summary are written, so an interrupted training
    still resumes from its last checkpoint. The main process does it; returns what it deleted."""
    if targs.keep_checkpoints or targs.process_index != 0:
        return []
    dropped = sorted(p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir())
    for path in dropped:
        shutil.rmtree(path)  # training state, not a result: the final model beside it is the stage's output
    if dropped:
        logging.getLogger(__name__).info("%s: dropped %d checkpoint(s) of the finished training (--keep_checkpoints "
                                         "keeps them)", output_dir, len(dropped))
    return dropped


def finished_training(output_dir: str | Path, targs=None) -> dict[str, Any] | None:
    """The summary of a training that completed in `output_dir`, else None. A rerun of a finished training
    returns it instead of saving the model again: new weight files would look like a new model downstream.
    With `targs`, checkpoints a kill left behind after the summary was written are dropped (`drop_checkpoints`)."""
    path = Path(output_dir) / TRAIN_SUMMARY
    if not path.is_file():
        return None
    logging.getLogger(__name__).info("%s: trained already with these settings (%s): nothing to do", output_dir, path.name)
    if targs is not None:
        drop_checkpoints(output_dir, targs)
    return json.loads(path.read_text())


def output_dir_from_run_dir(argv: list[str] | None, model_dir: Callable[[RunDir], Path]) -> list[str]:
    """`argv` with `--output_dir <the run directory's model folder>` added when --run_dir is given and no
    --output_dir is: before parsing, since TrainingArguments derives its logging folder from it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = {a.split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("-")}
    if given & {"__output_dir", "__help", "_h"}:  # --help prints the help whatever else is missing
        return argv
    if "__run_dir" not in given:
        raise SystemExit("error: pass --run_dir (the model goes into the run directory) or --output_dir")
    i = next(i for i, a in enumerate(argv) if a.split("=", 1)[0].replace("-", "_") == "__run_dir")
    run_dir = argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1]
    return argv + ["--output_dir", str(model_dir(RunDir(run_dir)))]
