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
