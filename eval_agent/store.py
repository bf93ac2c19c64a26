"""Resumable JSONL I/O: every record has a stable `key`; a stage reads what exists, skips the keys
already done and appends. Each append is flushed and fsynced, so a kill loses at most the line
being written; a torn last line is detected and cut off on the next open (it was never a record).
Merged final files are written to a temp name and renamed.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from eval_agent.cli import UserError


class BadRecord(UserError):
    """A line that is not a JSON object with a `key`; the message names file and line."""


def _jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line; a line that is not JSON raises naming it."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise BadRecord(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def read_jsonl(path: str | Path, required: Iterable[str] = ("key",)) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSONL file; bad lines raise with file, line and field."""
    path = Path(path)
    for lineno, rec in _jsonl_lines(path):
        if not isinstance(rec, dict):
            raise BadRecord(f"{path}:{lineno}: expected a JSON object")
        for name in required:
            if name not in rec:
                raise BadRecord(f"{path}:{lineno}: missing field {name!r}")
        yield rec


class JsonlStore:
    """Append-only keyed records in one JSONL file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.torn_lines = self._cut_torn_tail()
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for rec in read_jsonl(self.path):
                self.records[rec["key"]] = rec  # a key written twice keeps the last copy

    def _cut_torn_tail(self) -> int:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0
        with self.path.open("rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return 0
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
        return 1

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict[str, Any]) -> None:
        if "key" not in record:
            raise ValueError("a record needs a 'key'")
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = record


def move_aside(*paths: Path) -> list[Path]:
    """Rename the existing ones of `paths` (files or folders) to `<name>.old`, or `.old2`, `.old3`, ...: one
    number free for all of them, so results and what belongs to them stay together and an older copy is never
    replaced. Returns the new names."""
    return [p.rename(new) for p, new in zip(paths, aside_names(*paths)) if p.exists()]


def aside_names(*paths: Path) -> list[Path]:
    """The names `move_aside` gives `paths`: `.old`, `.old2`, ..., the first number free for all of them."""
    n = 1
    while any(p.with_name(f"{p.name}.old{n if n > 1 else ''}").exists() for p in paths):
        n += 1
    return [p.with_name(f"{p.name}.old{n if n > 1 else ''}") for p in paths]


STAGING_MARK = ".tmp"


@contextlib.contextmanager
def staged(path: str | Path) -> Iterator[Path]:
    """A hidden temp name beside `path` to write to; renamed onto `path` when the block ends without error,
    so readers never see a partial file (a kill leaves only the temp, which `is_staged` recognises)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{STAGING_MARK}{os.getpid()}")
    yield tmp
    tmp.replace(path)


def is_staged(name: str) -> bool:
    """A temp file of `staged`: a writer killed before its rename left it, and it holds no result."""
    return name.startswith(".") and STAGING_MARK in name


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a temp file + rename, so readers never see a partial file."""
    with staged(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def merge_jsonl(sources: Iterable[str | Path], out: str | Path) -> int:
    """Merge keyed JSONL files into `out` (temp + rename); a key appearing twice is an error."""
    seen: dict[str, str] = {}
    lines = []
    for src in sources:
        for rec in read_jsonl(src):
            if rec["key"] in seen:
                raise ValueError(f"key {rec['key']!r} appears in {seen[rec['key']]} and {src}")
            seen[rec["key"]] = str(src)
            lines.append(json.dumps(rec, ensure_ascii=False))
    write_atomic(out, "".join(line + "\n" for line in lines))
    return len(lines)


def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of a JSON list or a JSONL file, `where` naming the file and the row
    ("f.json: row 3", 0-based) or line ("f.jsonl: line 4") for error messages; blank lines are skipped."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        head = f.read(64).lstrip()
    if head.startswith("["):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BadRecord(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        for i, row in enumerate(rows):
            yield f"{path}: row {i}", row
        return
    for lineno, row in _jsonl_lines(path):
        yield f"{path}: line {lineno}", row
