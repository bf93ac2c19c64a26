"""Shared fixtures: the tiny random model (real SmolLM2 tokenizer) and serve_hf server processes."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

# One torch thread unless the caller says otherwise (also for the server subprocesses): on a small,
# shared machine two OpenMP threads spin against other load, and tiny-model generation got 10-15x
# slower with 2 threads than with 1 while anything else ran.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
SERVER_START_S = 180.0
SLOWEST_FIRST = ("test_pipeline.py", "test_compare.py", "test_vllm.py", "test_gpu_smoke.py", "test_sft.py", "test_evaluate.py")


def pytest_collection_modifyitems(config, items) -> None:
    """The slowest files first: with one worker per core (scripts/test.sh) the longest file starts at once and
    the workers finish together; the rest keep their order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"{SMOLLM2} missing: run scripts/setup.sh (converts the embedded SmolLM2)")
    return SMOLLM2


@pytest.fixture(scope="session")
def vh_expert(tmp_path_factory) -> Path:
    """The two shortest generated VirtualHome expert trajectories."""
    rows = sorted((json.loads(line) for line in (REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl")
                   .read_text().splitlines()), key=lambda r: len(r["steps"]))
    path = tmp_path_factory.mktemp("vh") / "expert.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    from eval_agent.smollm2 import make_tiny_model

    return make_tiny_model(smollm2_dir, tmp_path_factory.mktemp("tiny_model"))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_server(model_dir: Path, log_path: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """Start serve_hf on a free port; return the process and its base URL once /health answers."""
    cmd = [sys.executable, "-m", "eval_agent.llm.serve_hf", "--model", str(model_dir), "--port", "0", *args]
    return start_process(cmd, log_path, health="/health")


def start_process(cmd: list[str], log_path: Path, health: str = "/v1/models") -> tuple[subprocess.Popen, str]:
    """Start a server process that prints `serving ... URL` when it listens; return it and its base URL once
    `health` (a path from the server root) answers 200."""
    with open(log_path, "wb") as log:  # stderr to a file: a full pipe would block the server
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + SERVER_START_S

    def fail(why: str) -> None:
        _stop(proc)
        pytest.fail(f"{cmd[1:3]} {why}; stderr tail:\n{log_path.read_text()[-3000:]}")

    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            fail(f"printed no ready line within {SERVER_START_S:.0f} s")
        if line is None:
            fail(f"exited with {proc.wait()}")
        if line.startswith("serving "):
            url = line.split()[-1]
            break
    while True:  # the socket listens before the ready line; this is one round trip in practice
        try:
            with urllib.request.urlopen(url.removesuffix("/v1") + health, timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            fail(f"never answered {health}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def serve_hf(tmp_path_factory):
    """Factory: `serve_hf(model_dir, *extra_args)` -> base URL; every server stops at session end."""
    procs: list[subprocess.Popen] = []

    def start(model_dir: Path, *args: str) -> str:
        proc, url = start_server(model_dir, tmp_path_factory.mktemp("serve_hf") / "stderr.log", *args)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        _stop(proc)


@pytest.fixture(scope="session")
def hf_server(serve_hf, tiny_model_dir) -> str:
    """Base URL (http://127.0.0.1:PORT/v1) of serve_hf over the tiny model, served as str(tiny_model_dir)."""
    return serve_hf(tiny_model_dir)


class ScriptedServer:
    """tests/scripted_server.py as its own process: `control(script=..., poison=..., text=...)` changes what it
    answers, `posts()` counts the POSTs it answered."""

    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url
        self.root = url.removesuffix("/v1")

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.root + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def control(self, **settings) -> None:
        self._call("/control", settings)

    def posts(self) -> int:
        return self._call("/stats")["posts"]


@pytest.fixture(scope="session")
def scripted_server(tmp_path_factory):
    """Factory: `scripted_server(model="fake")` -> a ScriptedServer process; all stop at session end."""
    procs: list[subprocess.Popen] = []

    def start(model: str = "fake") -> ScriptedServer:
        cmd = [sys.executable, str(REPO / "tests" / "scripted_server.py"), "--model", model]
        proc, url = start_process(cmd, tmp_path_factory.mktemp("scripted") / "stderr.log")
        procs.append(proc)
        return ScriptedServer(proc, url)

    yield start
    for proc in procs:
        _stop(proc)
