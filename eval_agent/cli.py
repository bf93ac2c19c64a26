"""What every stage's command line shares: the one-line report of a user error, and the checks of values
and inputs a stage runs before it starts any work: a model folder's tokenizer and weights among them (present,
and complete as their index and safetensors headers say: a copy cut short is one line naming the file, never
transformers' traceback).

A user error (a bad value, a missing or malformed input) ends a stage with one line on stderr naming the
file, line and field or the setting, and exit code 2; a real bug still shows its traceback. Set
`STECA_DEBUG=1` to see the traceback of a user error too. A command-line value argparse refuses is such a line
too, naming the flag, the accepted form and, under a stage script, the variable that set it
(`error: SFT_LR=abc: --learning_rate takes a number, got 'abc'`); the usage is printed with --help only.

    if __name__ == "__main__":
        run_main(main)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

from eval_agent.redaction import redact

DEBUG_ENV = "STECA_DEBUG"
SCRIPT_ENV = "STECA_STAGE_SCRIPT"  # set by scripts/stage_lib.sh: the stage script (from the repository root) running
USER_ERROR_EXIT = 2
REPO = Path(__file__).resolve().parent.parent
# A file that names a tokenizer: one of them must be in a model folder the stage loads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")  # a model folder's weight files (single or sharded)
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # a sharded model's list of its files
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}  # bytes per element of a safetensors dtype
MAX_HEADER = 100 << 20  # safetensors refuses larger headers
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# What argparse says of a refused value, and the accepted form of each type function it names.
_ARGUMENT = re.compile(r"^argument (?P<flag>[^:/ ]+)[^:]*: (?P<why>.*)$", re.S)
_INVALID = re.compile(r"^invalid (?P<type>\w+) value: (?P<value>.*)$", re.S)
FORMS = {"int": "an integer", "float": "a number", "count": "an integer >= 1", "natural": "an integer >= 0",
         "non_negative": "a number >= 0", "probability": "a number in (0, 1]", "loads": "a JSON value",
         "Path": "a path"}
_PASSES = re.compile(r'(--\w+) "\$\{?([A-Z][A-Z0-9_]*)')  # opt --flag "$VAR" in a stage script
_OLDER = re.compile(r"^([A-Z][A-Z0-9_]*)=\$\{\1:-\$\{([A-Z][A-Z0-9_]*):-", re.M)  # NAME=${NAME:-${OLDER:-...}}


class UserError(ValueError):
    """A problem with the user's settings or input files; the message says what and where."""


def run_main(main: Callable[[], Any]) -> Any:
    """Run a stage's `main`: a user error becomes one line and exit code 2 (the traceback with STECA_DEBUG=1), a
    value the command line refuses too (`argument_error`)."""
    from eval_agent.llm import BackendUnavailable

    refuse, argparse.ArgumentParser.error = argparse.ArgumentParser.error, argument_error
    try:
        return main()
    except SystemExit as e:
        if isinstance(e.code, str):  # raise SystemExit("error: ...")
            print(redact(e.code), file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)
        raise
    except (UserError, FileNotFoundError, BackendUnavailable) as e:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(redact(f"error: {e}"), file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    finally:
        argparse.ArgumentParser.error = refuse


def argument_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """argparse's refusal as one line: the flag, the accepted form, and under a stage script the variable that
    set the value; the usage only with --help."""
    m = _ARGUMENT.match(message)
    if not m:  # not one argument's: missing or unknown flags
        raise UserError(f"{parser.prog}: {message} (--help lists the options)")
    flag, why = m["flag"], m["why"]
    invalid = _INVALID.match(why)
    if invalid:
        value, text = invalid["value"].strip("'"), f"{flag} takes {FORMS.get(invalid['type'], invalid['type'])}, got " \
                                                  f"{invalid['value']}"
    else:
        given = re.search(r"(?:got|choice:) '?([^'\s,)]*)", why)
        value, text = given[1] if given else None, f"{flag}: {why}"
    variable = script_variable(flag, value)
    raise UserError(f"{variable}: {text}" if variable else text)


def script_variable(flag: str, value: str | None) -> str | None:
    """`NAME=value`, the variable of the running stage script (STECA_STAGE_SCRIPT) that passes `flag`: the one set
    to `value` in the environment (older names included), else the script's name for it; None outside a script."""
    script = os.environ.get(SCRIPT_ENV)
    if not script or not (REPO / script).is_file():
        return None
    text = (REPO / script).read_text()
    for sourced in re.findall(r"^source ([\w/]+\.sh)", text, re.M):
        if (REPO / sourced).is_file():
            text += (REPO / sourced).read_text()
    names = [var for f, var in _PASSES.findall(text) if f == flag]
    older = [old for name, old in _OLDER.findall(text) if name in names]
    given = [n for n in names + older if value is not None and os.environ.get(n) == value]
    if given:
        return f"{given[-1]}={value}"
    return names[-1] if names else None


# ---- argparse types: a bad value is refused before anything runs ----------------------------------------

def count(text: str) -> int:
    """An integer >= 1 (tasks, samples, steps, episodes in flight); leave the flag out for "all"."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value} (leave it unset for the default)")
    return value


def natural(text: str) -> int:
    """An integer >= 0 (retries, a first step)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def at_least(name: str, value: float, low: float) -> None:
    """For settings parsed elsewhere (the training stages' dataclasses)."""
    if not value >= low:
        raise UserError(f"--{name} must be >= {low:g}, got {value}")


def per_split(args: argparse.Namespace) -> list[argparse.Namespace]:
    """`--split seen,unseen`: the arguments once per split, in the order given, for a stage that runs several
    splits in one process, each into its own folder (so `--out`, one folder, takes one split)."""
    splits = [s for s in args.split.split(",") if s]
    if not splits or len(set(splits)) < len(splits):
        raise SystemExit(f"error: --split {args.split!r}: give one split or several different ones, comma-separated")
    if len(splits) > 1 and args.out:
        raise SystemExit("error: --out is one split's folder: with several splits pass --run_dir")
    return [argparse.Namespace(**{**vars(args), "split": s}) for s in splits]


# ---- inputs ---------------------------------------------------------------------------------------------

def input_file(path: str | Path, what: str) -> Path:
    """`path`, which must be a non-empty file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    if path.stat().st_size == 0 or not path.read_bytes()[:65536].strip():
        raise UserError(f"{what} is empty: {path}")
    return path


def is_hub_id(name: str) -> bool:
    """`org/name` that is no local path: a model on the Hugging Face Hub (when its first part is no local
    folder: `models/foo` with a `models/` folder here means a local model folder that is missing)."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists() and not Path(name.split("/")[0]).is_dir()


def model_folder(name: str, what: str = "model", weights: bool = True) -> str:
    """A model to load with transformers: a folder with a tokenizer and (unless only its tokenizer is used) complete
    weights (`check_weights`), or a Hugging Face Hub id."""
    path = Path(name)
    if path.is_dir():
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise UserError(f"{what} folder {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): "
                            "save the tokenizer into it, or pass a complete model folder")
        if weights:
            check_weights(path, what)
        return name
    if not is_hub_id(name):
        raise UserError(f"{what} folder not found: {name}")
    return name


def check_policy_model(args: argparse.Namespace) -> None:
    """The model of a policy stage (`eval_agent.runner.add_model_args`): a folder for the in-process backend;
    over HTTP `--model` is the served name, and only a --tokenizer folder is checked."""
    if args.backend == "hf":
        model_folder(args.model)
    if args.tokenizer:
        model_folder(args.tokenizer, "tokenizer", weights=False)


# ---- model weights -----------------------------------------------------------------------------------

def weight_files(folder: str | Path) -> list[Path]:
    return sorted(p for pattern in WEIGHT_PATTERNS for p in Path(folder).glob(pattern))


def safetensors_header(path: Path) -> tuple[bytes, dict]:
    """The raw JSON header of a safetensors file and its parsed form; UserError when the file cannot have one."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or not 2 <= n <= min(MAX_HEADER, size - 8):
            raise UserError(f"{path}: not a complete safetensors file ({size} bytes: its header is cut short or "
                            "unreadable); copy or save the model again")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: the safetensors header is not JSON (a damaged file); copy or save the model "
                        "again") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: the safetensors header is not a JSON object; copy or save the model again")
    return raw, header


def check_safetensors(path: Path) -> None:
    """The file holds every byte its header promises, each tensor as many as its dtype and shape take."""
    raw, header = safetensors_header(path)
    end = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = tensor["data_offsets"]
            want = math.prod(tensor["shape"]) * DTYPE_BYTES[tensor["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name!r} has no readable dtype, shape and offsets in its header") from None
        if stop - begin != want:
            raise UserError(f"{path}: tensor {name!r} takes {stop - begin} bytes, its dtype and shape need {want}")
        end = max(end, stop)
    size, expected = path.stat().st_size, 8 + len(raw) + end
    if size != expected:
        raise UserError(f"{path}: {'truncated' if size < expected else 'longer than its header says'}: {size} bytes, "
                        f"the header gives {expected}; copy or save the model again")


def check_weights(folder: str | Path, what: str = "model") -> None:
    """A local model folder's weights, present and complete (the index's shards, each safetensors file whole)."""
    folder = Path(folder)
    files = weight_files(folder)
    for index in (folder / name for name in INDEXES):
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise UserError(f"{index}: not a weight index (no weight_map)") from None
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                raise UserError(f"{what} folder {folder}: {len(missing)} of the {len(shards)} weight files "
                                f"{index.name} names are missing (e.g. {missing[0]}); copy the whole folder")
    if not files:
        raise UserError(f"{what} folder {folder} has no weights (model.safetensors, pytorch_model.bin or their "
                        "shards): pass a complete model folder, or save the model into it")
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path)
        elif path.stat().st_size == 0:
            raise UserError(f"{path}: empty; copy or save the model again")
