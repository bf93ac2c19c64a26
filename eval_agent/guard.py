"""Resume only what the same settings made, and one writer per output.

Every stage records, beside each output, the *fingerprint* of its run: the settings that determine the
results (decoding, steps, N, seeds, chat format, instruction, a per-stage code version) and the identity of
every input by content (`content_digest`): data files hashed whole up to HASH_LIMIT, a model
folder's weight files up to WEIGHTS_HASH_LIMIT, beyond that their size, safetensors header and sampled blocks;
its other files hashed whole). A rerun with the same fingerprint resumes; another one is
refused with the settings that differ named, unless `--overwrite` (or STECA_ON_CHANGE=move_aside, which the
pipeline sets) moves the old results aside first. Settings that do not change results (concurrency, endpoints,
shards, progress) are not part of it, so they may change between a run and its resumption.

One writer per output: a lock file beside it names the holder (pid, host, start, command); a second run fails
at once. A lock left by a dead process of this host is taken over (the holder keeps an flock on it, so "dead"
is known for sure); a lock from another host never is: the error says how to remove it.

STECA_FINGERPRINT=1 makes a stage print its fingerprints (one JSON line per output) and exit before any work;
the pipeline compares them with its stage markers, which also record the state of each output the stage left
(`output_state`): a marker stands for exactly the outputs and settings present now.

    fp=$(STECA_FINGERPRINT=1 bash sampling/mc_rollouts.sh)
    python -m eval_agent.guard marker-status RUN_DIR/pipeline/mc.done <<< "$fp"   # exit 0: done with these settings
    python -m eval_agent.guard marker-write RUN_DIR/pipeline/mc.done --seconds 12 <<< "$fp"
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from eval_agent.cli import UserError, run_main, safetensors_header, weight_files
from eval_agent.layout import FINGERPRINT_FILE, RUN_CARD, TRACKING_DIR, TRAINING_CARD, fingerprint_path, lock_path
from eval_agent.store import aside_names, is_staged, move_aside, write_json

log = logging.getLogger("guard")

FINGERPRINT_ENV = "STECA_FINGERPRINT"  # 1: print the fingerprints and exit
ON_CHANGE_ENV = "STECA_ON_CHANGE"  # error (default) | move_aside: what a changed fingerprint does
HASH_LIMIT = 1 << 30  # data files up to this size are hashed whole, larger ones sampled
WEIGHTS_HASH_LIMIT = 64 << 20  # weight files likewise (a 7B model's 13 GB would take minutes)
SAMPLES, SAMPLE_BYTES = 256, 16 << 10  # a sampled file: 4 MiB read whatever its size
NOT_MODEL_FILES = {FINGERPRINT_FILE, "train_summary.json", TRAINING_CARD}  # written beside a model, not part of it
NOT_RESULT_ENTRIES = {RUN_CARD, TRAINING_CARD, TRACKING_DIR}  # in a folder output: what a run writes beside results
# How `differences` names a changed part of an input's identity.
CHANGED_PARTS = {"weights": "weights", "files": "config or tokenizer files", "sha256": "content", "size": "content",
                 "mtime_ns": "content", "tasks": "task file content", "games": "games"}
# Arguments that never change a stage's results: where it writes, how fast it runs, where the servers are.
NOT_RESULTS = frozenset({"run_dir", "out", "output_dir", "overwrite", "concurrency", "num_shards", "shard_id",
                         "backend", "endpoints", "max_requests", "env_workers", "export", "label", "embed_device",
                         "embed_batch_size", "reflect_cache", "reflect_concurrency", "reflect_timeout",
                         "reflect_http_retries"})


# ---- identities of inputs -------------------------------------------------------------------------------

def json_digest(obj: Any) -> str:
    """A short digest of a JSON-able value (keys sorted): equal digests, equal values."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def content_digest(path: Path, full_limit: int) -> str:
    """A file's content digest: all of it up to `full_limit` bytes, beyond that its size, safetensors header and
    evenly spaced blocks (weights trained again or changed in place differ in every block)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= full_limit:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(f"sampled {size}".encode())
        if path.suffix == ".safetensors":
            h.update(safetensors_header(path)[0])
        for i in range(SAMPLES):
            f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def weights_fingerprint(model: str | Path) -> str | None:
    """A local model folder's weight files by name and content (sampled beyond WEIGHTS_HASH_LIMIT: weights
    trained again or changed in place, whatever their size and modification time); None for a served model name."""
    files = weight_files(model)
    if not files:
        return None
    return json_digest([(p.name, content_digest(p, WEIGHTS_HASH_LIMIT)) for p in files])


def file_identity(path: Path) -> dict[str, Any]:
    return {"path": str(path), "sha256": content_digest(path, HASH_LIMIT)}


def folder_identity(path: Path) -> dict[str, Any]:
    """A model folder: its weights and its other top-level files (config, tokenizer, chat format) by content;
    checkpoints and what the stages write beside the model are not part of it."""
    weights = set(weight_files(path))
    others = sorted(p for p in path.iterdir() if p.is_file() and p not in weights and p.name not in NOT_MODEL_FILES
                    and not p.name.endswith(".lock"))
    return {"path": str(path), "weights": weights_fingerprint(path),
            "files": json_digest([(p.name, file_identity(p)["sha256"]) for p in others])}


def identity(value: str | Path | None) -> dict[str, Any] | None:
    """What an input is: a file by content, a (model) folder by its files, else its name (a model served
    over HTTP or on the Hub: nothing more is known about it here)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return file_identity(path)
    if path.is_dir():
        return folder_identity(path)
    return {"name": str(value)}


def fingerprint(stage: str, version: int, settings: dict[str, Any], inputs: dict[str, Any],
                selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint of one output, as JSON would give it back (tuples become lists), so a stored one compares
    equal to a fresh one. `selection`: settings that choose which records a stage reports on, where each record
    is the same whichever are chosen (an evaluation's task limit): a run may resume under another selection, the
    pipeline still reruns the stage for it."""
    fp = {"stage": stage, "version": version, "settings": settings, "inputs": inputs, "selection": selection or {}}
    return json.loads(json.dumps(fp, sort_keys=True, default=str))


def settings_of(args: argparse.Namespace | dict[str, Any], drop: set[str] | frozenset[str] = frozenset()
                ) -> dict[str, Any]:
    """Every argument except those that do not change results (NOT_RESULTS) and `drop` (the stage's inputs,
    which go into the fingerprint by identity). Leaving out by name, never picking in: a new argument is part of
    the fingerprint until someone decides it does not change results."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    return {k: v for k, v in values.items() if k not in NOT_RESULTS and k not in drop}


def model_arg_names() -> set[str]:
    """The arguments of a model policy (`eval_agent.runner.add_model_args`)."""
    from eval_agent.runner import add_model_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    return set(vars(p.parse_args([])))


def prompt_inputs(task_family: str, instruction_from: str | None, icl_from: str | None, icl_num: int = 1
                  ) -> dict[str, Any]:
    """The run's prompt files as eval_agent.prompts.prompt_files decides them, by identity (None: the family's
    own): a stage that renders prompts is redone when what it would prompt with changes, named or found."""
    from eval_agent.prompts import prompt_files

    instruction, example = prompt_files(task_family, instruction_from, icl_from)
    return {"instruction_from": identity(instruction), **({"icl_from": identity(example)} if icl_num else {})}


def policy_fingerprint(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings, inputs) of the model policy a stage prompts: its model arguments, the chat format as the model
    folder resolves it, and the model, tokenizer and the run's prompt files by identity."""
    from eval_agent.chat_format import resolve_chat_format

    files = ("model", "tokenizer")
    settings = settings_of({k: v for k, v in vars(args).items() if k in model_arg_names()},
                           drop={*files, "instruction_from", "icl_from"})
    settings["chat_format"] = (resolve_chat_format(args.model, args.chat_format) if Path(args.model).is_dir()
                               else args.chat_format or "template")
    return settings, {**{k: identity(getattr(args, k)) for k in files},
                      **prompt_inputs(args.task_family, args.instruction_from, args.icl_from, args.icl_num)}


# TrainingArguments that change what is trained (of its ~150 fields most say where to log or how fast to run;
# the global batch size, the stages' own argument, stands for micro-batch x processes x accumulation).
TRAINING_SETTINGS = ("learning_rate", "num_train_epochs", "max_steps", "lr_scheduler_type", "lr_scheduler_kwargs",
                     "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                     "optim", "optim_args", "seed", "data_seed", "bf16", "fp16", "label_smoothing_factor",
                     "neftune_noise_alpha", "train_sampling_strategy", "dataloader_drop_last",
                     "average_tokens_across_devices", "remove_unused_columns", "label_names")


def training_settings(targs) -> dict[str, Any]:
    return {k: getattr(targs, k) for k in TRAINING_SETTINGS}


def _content(ident: Any) -> Any:
    """An input's identity without where it lies."""
    return {n: v for n, v in ident.items() if n != "path"} if isinstance(ident, dict) else ident


def _comparable(fp: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The fingerprint without where things are (a run directory moved elsewhere is the same run), and to
    resume, without the selection."""
    inputs = {k: _content(ident) for k, ident in fp.get("inputs", {}).items()}
    drop = {"inputs", "output"} | ({"selection"} if resume else set())
    return {**{k: v for k, v in fp.items() if k not in drop}, "inputs": inputs}


def same(a: dict[str, Any], b: dict[str, Any], resume: bool = True) -> bool:
    """Whether results made under `a` may be resumed under `b` (`resume=False`: whether the runs are the same)."""
    return _comparable(a, resume) == _comparable(b, resume)


def _show(value: Any) -> str:
    if isinstance(value, dict) and ("path" in value or "name" in value):
        return str(value.get("path") or value.get("name"))
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one `name: old -> new` per setting or input."""
    out = []
    for key in ("stage", "version"):
        if old.get(key) != new.get(key):
            out.append(f"{'code version' if key == 'version' else key}: {old.get(key)} -> {new.get(key)}")
    for part in ("settings", "selection"):
        a, b = old.get(part, {}), new.get(part, {})
        out += [f"{k}: {_show(a.get(k))} -> {_show(b.get(k))}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    a, b = _comparable(old, False)["inputs"], _comparable(new, False)["inputs"]
    out += [f"{k}: {_input_change(old['inputs'].get(k), new['inputs'].get(k))}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]
    return out


def input_changed(recorded: dict[str, Any] | None) -> str | None:
    """What changed of a local input since its identity was recorded (`model: weights changed (...)` without the
    name); None when nothing did, or when it is no local file or folder now (a served model, moved away)."""
    if not isinstance(recorded, dict) or "path" not in recorded or not Path(recorded["path"]).exists():
        return None
    now = identity(recorded["path"])
    return None if _content(now) == _content(recorded) else _input_change(recorded, now)


def _input_change(was: Any, now: Any) -> str:
    """What changed of an input: its content (a model's weights, its config or tokenizer files), wherever it lies
    (`content changed (expert.jsonl)`, `weights changed (models/a -> models/b)`), or which one it is (a served
    model's name)."""
    if not (isinstance(was, dict) and isinstance(now, dict)) or "name" in was or "name" in now:
        return f"{_show(was)} -> {_show(now)}"
    parts = sorted({CHANGED_PARTS.get(k, k) for k in was.keys() | now.keys()
                    if k != "path" and was.get(k) != now.get(k)})
    where = _show(now) if was.get("path") == now.get("path") else f"{_show(was)} -> {_show(now)}"
    return f"{' and '.join(parts)} changed ({where})"


# ---- one writer per output ------------------------------------------------------------------------------

def _proc_start(pid: int) -> str | None:
    """The process's start time since boot (Linux), which tells a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _proc_start(pid)
    return started is None or now is None or now == started


class LockHeld(UserError):
    """Another run writes this output."""


class Lock:
    """An exclusive claim on one output, held for the stage's lifetime. The lock file says who holds it; the
    holder also keeps an flock on it, which dies with the process, so a leftover file of a dead process on this
    host is recognised for sure and taken over."""

    def __init__(self, path: Path, output: Path):
        self.path, self.output = path, output
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # retried only when the file changed under us
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    continue
                created = False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live holder; or, on a file just created, a run checking it
                holder = self._holder()
                if created:
                    self.path.unlink()
                os.close(fd)
                raise self._held(holder) from None
            try:
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:  # released and removed meanwhile
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            if not created:
                self._take_over(fd)
            self._write_holder(fd)
            self.fd = fd
            return
        raise UserError(f"{self.path}: could not take the lock (it keeps changing); retry")

    def _take_over(self, fd: int) -> None:
        """The flock was free: the holder (if any) is gone, unless the file comes from another host, where an
        flock says nothing, or from a live process of this host that never took one."""
        holder = self._holder()
        if not holder and time.time() - os.fstat(fd).st_mtime < 10:
            os.close(fd)  # just created by a starting run that has not written its name yet
            raise self._held({})
        if holder.get("host", socket.gethostname()) != socket.gethostname() or (
                holder.get("pid") and _alive(holder["pid"], holder.get("pid_start"))):
            os.close(fd)
            raise self._held(holder)
        log.warning("%s: taking over the lock of pid %s, which is gone (started %s)", self.output,
                    holder.get("pid"), holder.get("started"))

    def _write_holder(self, fd: int) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "pid_start": _proc_start(os.getpid()), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)

    def _holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _held(self, holder: dict[str, Any]) -> LockHeld:
        if not holder:
            return LockHeld(f"{self.output} is being written by another run that is starting ({self.path}); "
                            "wait for it to finish")
        who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} ({holder.get('command')})"
        if holder.get("host") != socket.gethostname():
            return LockHeld(f"{self.output} is being written by {who}. A lock from another host is never taken over: "
                            f"if that run is gone, remove {self.path} and rerun")
        return LockHeld(f"{self.output} is being written by {who}: wait for it to finish or stop it "
                        "(two writers would duplicate or mix results)")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding the flock: a waiting run then sees the file gone
        os.close(self.fd)
        self.fd = None


# ---- the guard a stage runs under -------------------------------------------------------------------------

def holds_results(entry: Path) -> bool:
    """Whether an entry of a folder output is a result: not the run card, which a run writes before its first
    result (a run that failed before producing anything leaves no results for another run's settings to clash
    with), nor the tracker's event files, nor an empty file or a folder of none."""
    if entry.name in NOT_RESULT_ENTRIES:
        return False
    if entry.is_dir():
        return any(f.stat().st_size > 0 for f in entry.rglob("*") if f.is_file())
    return entry.stat().st_size > 0


def own_entries(path: Path) -> list[Path]:
    """What a folder output holds of its stage's: not another stage's output nested in it (step accuracy inside
    its evaluation, known by its fingerprint or, while its writer starts, by its lock: the two run side by side),
    not locks, not a temp file left by a killed writer."""
    return [p for p in path.iterdir() if p.name != FINGERPRINT_FILE and not p.name.endswith(".lock")
            and not is_staged(p.name) and not (p / FINGERPRINT_FILE).is_file() and not lock_path(p).exists()]


class FingerprintMismatch(UserError):
    """The output holds results made with other settings."""


class RunGuard:
    """A stage's claim on its outputs (files, or folders with `folder=True`), each with its fingerprint:

        with RunGuard({path: fingerprint(...)}, folder=False, overwrite=args.overwrite):
            ...  # resume or start the work

    On entry: STECA_FINGERPRINT=1 prints the fingerprints and exits; else every output is locked, and its
    recorded fingerprint must be the same as this run's (or there are no results yet). `--overwrite` moves the
    old results aside first. A stage that rebuilds its output whole (`resumes=False`: nothing of the old results
    is reused) needs no --overwrite: results of other settings are moved aside, never mixed into. `keep`: files
    of a folder carried into the fresh one (a cache whose entries are keyed by all that determines them).
    `primary=False` (a training rank other than 0) checks nothing: rank 0 does it for all.
    """

    def __init__(self, outputs: dict[Path, dict[str, Any]], folder: bool, overwrite: bool = False,
                 primary: bool = True, resumes: bool = True, keep: tuple[str, ...] = ()):
        self.outputs = {Path(p): fp for p, fp in outputs.items()}
        self.folder, self.overwrite, self.primary, self.keep = folder, overwrite, primary, keep
        self.resumes = resumes
        self.locks: list[Lock] = []
        on_change = os.environ.get(ON_CHANGE_ENV, "error")
        if on_change not in ("error", "move_aside"):
            raise UserError(f"{ON_CHANGE_ENV} must be error or move_aside, got {on_change!r}")
        self.move_on_change = on_change == "move_aside"

    def __enter__(self) -> "RunGuard":
        if os.environ.get(FINGERPRINT_ENV) == "1":
            for path, fp in self.outputs.items():
                print(json.dumps({"output": str(path), **fp}, sort_keys=True))
            sys.stdout.flush()
            raise SystemExit(0)
        if not self.primary:
            return self
        try:
            for path in self.outputs:
                lock = Lock(lock_path(path), path)
                lock.acquire()
                self.locks.append(lock)
            for path, fp in self.outputs.items():
                self._claim(path, fp)
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks = []

    def _has_results(self, path: Path) -> bool:
        if self.folder:
            return path.is_dir() and any(holds_results(p) for p in own_entries(path))
        return path.is_file() and path.stat().st_size > 0

    def _claim(self, path: Path, fp: dict[str, Any]) -> None:
        record = fingerprint_path(path, self.folder)
        old = None
        if record.is_file():
            try:
                old = json.loads(record.read_text())
            except json.JSONDecodeError:
                old = {}
        has_results = self._has_results(path)
        changed = has_results and (old is None or not same(old, fp))
        if has_results and (self.overwrite or (changed and (self.move_on_change or not self.resumes))):
            self._move_aside(path, record)
        elif changed:
            why = ("no fingerprint is recorded (made by hand or by an older version)" if old is None
                   else "; ".join(differences(old, fp)) or "its fingerprint is unreadable")
            raise FingerprintMismatch(
                f"{path} holds results made with other settings ({why}). Resuming would mix them: pass another "
                f"RUN_DIR / OUT, or add --overwrite (the old results are moved aside, never deleted)")
        if self.folder:
            path.mkdir(parents=True, exist_ok=True)
        write_json(record, fp)

    def _move_aside(self, path: Path, record: Path) -> None:
        if self.folder:  # only this stage's entries: a nested output stays where its writer (maybe running) writes
            moved = aside_names(path)
            moved[0].mkdir()
            for p in own_entries(path) + [record]:
                if p.exists():
                    p.rename(moved[0] / p.name)
        else:
            moved = move_aside(path, record)
        log.warning("old results moved aside: %s -> %s", path, moved[0])
        for name in self.keep:
            if (moved[0] / name).is_file():
                path.mkdir(parents=True, exist_ok=True)
                shutil.copy2(moved[0] / name, path / name)


@contextlib.contextmanager
def training_guard(targs, outputs: dict[Path, dict[str, Any]], overwrite: bool) -> Iterator[RunGuard]:
    """RunGuard for a training stage under torchrun / accelerate: rank 0 checks, locks and moves aside while
    the other ranks wait, so none of them reads the output folder before it is settled."""
    guard = RunGuard(outputs, folder=True, overwrite=overwrite, primary=targs.process_index == 0)
    with contextlib.ExitStack() as stack:
        with targs.main_process_first(local=False, desc="run guard"):
            stack.enter_context(guard)
        yield guard


def require_output(produced: int, message: str) -> None:
    """A stage that produced nothing fails (the pipeline then never marks it done)."""
    if produced == 0:
        raise UserError(message)


# ---- pipeline markers -----------------------------------------------------------------------------------

def _read_fingerprints(text: str) -> list[dict[str, Any]]:
    """The fingerprint lines a stage printed under STECA_FINGERPRINT=1 (other lines are ignored)."""
    out = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(line)
            if isinstance(obj, dict) and "stage" in obj and "settings" in obj:
                out.append(obj)
    return out


def output_state(output: str | Path) -> dict[str, Any] | None:
    """What an output holds now, for a pipeline marker: the fingerprint recorded with it and the name, size and
    modification time of each of its files (of a folder, its own ones: `own_entries`); None when it is missing.
    Whatever a later run does to the output (moves it aside, starts it afresh under other settings, resumes it)
    changes its state."""
    path = Path(output)
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files = sorted(f for e in own_entries(path) for f in ([e] if e.is_file() else e.rglob("*")) if f.is_file())
        root = path
    else:
        return None
    record = fingerprint_path(path, folder=path.is_dir())
    try:
        recorded = _comparable(json.loads(record.read_text()), resume=False) if record.is_file() else None
    except json.JSONDecodeError:
        recorded = "unreadable"
    stats = [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return {"fingerprint": json_digest(recorded), "files": json_digest(stats)}


def _output_changes(name: str, was: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    if now is None:
        return [f"{name}: missing"]
    if was is None or was.get("fingerprint") != now["fingerprint"]:
        return [f"{name}: made with other settings since (an interrupted or failed run)"]
    return [f"{name}: changed since (rewritten, moved or resumed)"] if was.get("files") != now["files"] else []


def marker_changes(marker: Path, fingerprints: list[dict[str, Any]]) -> list[str] | None:
    """None when the marker says the stage completed with these fingerprints and its outputs are still the ones it
    completed, else what differs."""
    if not marker.is_file():
        return ["not run yet"]
    try:
        record = json.loads(marker.read_text())
        done, states = record["fingerprints"], record["outputs"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return ["a marker without fingerprints and outputs (an older version)"]
    if len(done) != len(fingerprints) or len(states) != len(done):
        return [f"{len(done)} outputs -> {len(fingerprints)}"]
    changes = []
    for old, new, state in zip(done, fingerprints, states):
        name = Path(new.get("output", "")).name
        if not same(old, new, resume=False):
            changes += [f"{name}: {d}" for d in differences(old, new)]
        elif "output" in new:
            changes += _output_changes(name, state, output_state(new["output"]))
    return changes or None


def main(argv: list[str] | None = None) -> int:
    """marker-status MARKER: exit 0 when the stage completed with the fingerprints on stdin and its outputs are
    still what it completed, else 1 (and say what changed); marker-write MARKER: record them as completed, with
    the state of each output."""
    p = argparse.ArgumentParser(description="The pipeline's stage markers, which carry the stage's fingerprints.")
    p.add_argument("action", choices=("marker-status", "marker-write"))
    p.add_argument("marker", type=Path)
    p.add_argument("--seconds", type=float, help="marker-write: how long the stage took")
    a = p.parse_args(argv)
    fingerprints = _read_fingerprints(sys.stdin.read())
    if a.action == "marker-write":
        states = [output_state(fp["output"]) if "output" in fp else None for fp in fingerprints]
        write_json(a.marker, {"fingerprints": fingerprints, "outputs": states, "seconds": a.seconds})
        return 0
    changes = marker_changes(a.marker, fingerprints)
    if changes is None:
        return 0
    if a.marker.is_file():
        print(f"== {a.marker.stem}: changed since it completed ({'; '.join(changes[:6])}): rerun, older results "
              "moved aside", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(run_main(main))
