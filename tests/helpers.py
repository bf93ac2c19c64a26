"""Small checks and test doubles several test modules share."""
import os
import struct
from pathlib import Path

from eval_agent.envs.base import StepResult, Task
from eval_agent.llm import Completion


def change_weights_in_place(model_dir: Path) -> None:
    """Change every 4096th byte of model.safetensors' tensor data, keeping its size and modification time: weights
    trained again (or edited) in place, which a name, size and mtime cannot tell from the old ones."""
    path = model_dir / "model.safetensors"
    st = path.stat()
    with path.open("r+b") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]
        for offset in range(start, st.st_size, 4096):
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive trained tokens (each label must equal its token)."""
    from eval_agent.training import IGNORE  # imports torch: not for the tests that only need the doubles below

    out, cur = [], []
    for tok, label in zip(ids, labels):
        if label != IGNORE:
            assert label == tok
            cur.append(tok)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


class CounterEnv:
    """A tiny deterministic environment (a test double of the Env protocol; the real engines have their own
    tests): say `count <n>` for n = 1..goal in order; `explode` raises."""

    name = "counter"

    def reset(self, task):
        self.goal, self.n = task.meta["goal"], 0
        return f"Count to {self.goal}."

    def step(self, action):
        if action == "explode":
            raise RuntimeError("engine crashed")
        if action == f"count {self.n + 1}":
            self.n += 1
            return StepResult(f"You said {self.n}.", self.n == self.goal, self.n == self.goal, float(self.n == self.goal))
        return StepResult("Nothing happens.", False, False)

    def expert_action(self):
        return f"count {self.n + 1}"

    def close(self):
        pass


def counter_task(key, goal=2):
    return Task(key=key, env="counter", split="test", meta={"goal": goal})


class ScriptedPolicy:
    """Replies from a per-task script, to the round runner (`act`, recording each call's batch size) and to the
    asynchronous runner (`act_one`)."""

    asynchronous = True

    def __init__(self, scripts):
        self.scripts, self.calls = scripts, []

    def reply(self, ep):
        reply = self.scripts[ep.task.key][len(ep.traj.steps) - len(ep.prefix)]
        return reply if isinstance(reply, Completion) else Completion(text=reply, num_tokens=1)

    def act(self, episodes):
        self.calls.append(len(episodes))
        return [self.reply(ep) for ep in episodes]

    async def check(self):
        pass

    async def act_one(self, ep):
        return self.reply(ep)

    async def aclose(self):
        pass


# ---- the GPU side, faked: nvidia-smi and Python environments ------------------------------------------

FAKE_SMI = r'''#!{python}
"""nvidia-smi for the tests: answers from the JSON state in {state} (read at every call, so a test can change it)."""
import json, os, sys
state = json.load(open({state!r}))
args = " ".join(sys.argv[1:])
uuids = ["GPU-fake-%d" % i for i in range(state["gpus"])]

def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False

apps = list(state.get("apps", []))
if state.get("pids_file") and os.path.exists(state["pids_file"]):  # the vLLM stand-in's replicas hold memory
    for line in open(state["pids_file"]):
        replica = json.loads(line)
        apps.append({{"pid": replica["pid"], "gpu": int((replica.get("gpus") or "0").split(",")[0]), "mib": 1000}})
apps = [a for a in apps if alive(a["pid"])]
if args == "-L":
    print("\n".join("GPU %d: NVIDIA A100-SXM4-80GB (UUID: %s)" % (i, u) for i, u in enumerate(uuids)))
elif args == "--query-gpu=driver_version --format=csv,noheader":
    print("\n".join(state["driver"] for _ in uuids))
elif args.startswith("--query-gpu=index,uuid"):
    print("\n".join("%d, %s" % (i, u) for i, u in enumerate(uuids)))
elif args.startswith("--query-compute-apps"):
    print("\n".join("%d, %s, %d, python3" % (a["pid"], uuids[a["gpu"]], a["mib"]) for a in apps))
elif not args:
    print("| NVIDIA-SMI %s   Driver Version: %s   CUDA Version: %s |" % (state["driver"], state["driver"], state["cuda"]))
else:
    sys.exit("fake nvidia-smi: unknown arguments " + args)
'''


def fake_nvidia_smi(folder, driver="580.65.06", cuda="13.0", gpus=1, apps=(), pids_file=None) -> str:
    """A PATH whose nvidia-smi reports `gpus` GPUs with this driver (the newest CUDA it runs: `cuda`) and the
    processes `apps` ({pid, gpu, mib}; only those alive), plus the live replicas a vLLM stand-in recorded in
    `pids_file`. Rewrite `folder/smi.json` to change what it says."""
    import json
    import os
    import sys
    from pathlib import Path

    folder = Path(folder)
    (folder / "bin").mkdir(parents=True, exist_ok=True)
    state = folder / "smi.json"
    state.write_text(json.dumps({"driver": driver, "cuda": cuda, "gpus": gpus, "apps": list(apps),
                                 "pids_file": str(pids_file) if pids_file else None}))
    smi = folder / "bin" / "nvidia-smi"
    smi.write_text(FAKE_SMI.format(python=sys.executable, state=str(state)))
    smi.chmod(0o755)
    return f"{folder / 'bin'}:{os.environ['PATH']}"


def fake_python_env(folder, torch=None, vllm=None):
    """A venv-like folder whose bin/python is this python with stub packages first on its path: `torch`
    = (version, CUDA version or None for a CPU build), `vllm` = version (its `import vllm` succeeds). A test
    fixture standing for what setup.sh installs; returns the folder."""
    import sys
    from pathlib import Path

    folder = Path(folder)
    stubs = folder / "stubs"
    stubs.mkdir(parents=True, exist_ok=True)
    packages = {}
    if torch:
        version, cuda = torch
        packages["torch"] = (version, f"__version__ = {version!r}\ncuda: str | None = {cuda!r}\n")
    if vllm:
        packages["vllm"] = (vllm, "")
    for name, (version, version_py) in packages.items():
        (stubs / name).mkdir(exist_ok=True)
        (stubs / name / "__init__.py").write_text(f"__version__ = {version!r}\n")
        if version_py:
            (stubs / name / "version.py").write_text(version_py)
        dist = stubs / f"{name}-{version}.dist-info"
        dist.mkdir(exist_ok=True)
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (folder / "bin").mkdir(exist_ok=True)
    python = folder / "bin" / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{stubs}${{PYTHONPATH:+:$PYTHONPATH}}" exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return folder
