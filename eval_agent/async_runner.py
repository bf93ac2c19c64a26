"""The asynchronous episode runner, for policies served over HTTP: each episode sends its next request as soon as
its observation is ready, so the servers always have work. (The round runner of eval_agent.runner waits for the
slowest reply of a round, then steps every environment one after another in the main process: right for the
in-process backend, whose one batched call is the round, not for a fleet of servers.)

- Environments live in `env_workers` processes (default: the CPU cores): resets, prefix replays and steps run
  there, in parallel with each other and with the requests. An episode stays on one worker (its environment is
  there); a worker reuses an idle environment that last played the same task (ALFWorld then skips reloading the
  game), episodes of one task go to the same worker while the load allows, and a worker steps the episodes
  waiting for a step before it starts new ones.
- `concurrency` episodes are in flight; the HTTP client bounds the requests. Step semantics are the round
  runner's (`start_episode` and `apply_reply` run in the workers). Each finished episode goes to `on_finish` in
  the main process, as with the round runner, so resume, sharding and merge keep their guarantees. `on_finish`
  (a stage's fsynced append) runs in one writer thread, one episode at a time, off the event loop: a slow fsync
  (a shared filesystem) holds only its own episode's lane, never the others in flight; the run returns, or
  raises, only once every write it started is done.
- A request that still fails after the client's retries fails only its episode: it is not written (a rerun does
  it) and the run ends with an error naming it; when as many episodes fail in a row as there are in flight, the
  run stops at once.
- The client itself (prompts, HTTP, the event loop) costs ~3 ms of CPU a call (scripts/bench_scale.py): one
  process keeps up with ~300 calls/s, fewer than 8 GPUs answer. With `client_processes` > 1 the episodes are
  spread over that many client processes by route key (a record's rollouts stay together, and sticky routing
  sends a key to the same replica from any process), each with its share of the lanes and environment workers;
  the finished episodes come back to this process, whose writer thread hands them to `on_finish` as before.
  `run_for_policy` takes one client process per ENDPOINTS_PER_CLIENT endpoints.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import itertools
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterable, Protocol

from tqdm import tqdm

from eval_agent.envs.base import Env, Task
from eval_agent.llm import BackendUnavailable, Completion
from eval_agent.llm.openai_http import Refused
from eval_agent.parsing import FIRST_LINE
from eval_agent.runner import CONCURRENCY as ROUND_CONCURRENCY
from eval_agent.runner import MAX_STEPS, Episode, Policy, RunStats, apply_reply, run_episodes, start_episode
from eval_agent.trajectory import Step, Trajectory

# Episodes in flight: enough to fill 8 replicas x 128 sequences (see openai_http.MAX_REQUESTS), so none waits
# for an episode whose environment is stepping.
CONCURRENCY = 1024
# One client process per this many endpoints: a Llama-2-7B replica answers ~20-45 calls/s (ALFWorld, VirtualHome;
# scripts/bench_scale.py), four of them ~180, within what one process's ~3 ms of CPU a call keeps up with.
ENDPOINTS_PER_CLIENT = 4


def default_env_workers() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class AsyncPolicy(Protocol):
    async def check(self) -> None:
        """Fail fast when the servers cannot be used."""

    async def act_one(self, episode: Episode) -> Completion:
        """The next reply of one episode."""

    async def aclose(self) -> None:
        """Release what the running event loop holds."""


class EnvWorkerError(RuntimeError):
    """An environment worker could not run a command (e.g. the environment cannot be built) or died."""


# ---- the environment worker processes ----------------------------------------------------------------

@dataclass
class StepDelta:
    """What one step changed in a worker's trajectory; the main process applies it to its copy."""

    step: Step
    termination: str | None
    success: bool
    reward: float
    error: str | None

    def apply(self, traj: Trajectory) -> None:
        traj.steps.append(self.step)
        traj.termination, traj.success, traj.reward = self.termination, self.success, self.reward
        if self.error is not None:
            traj.meta["error"] = self.error


def _idle_env(idle: dict[str, list[Env]], task_key: str) -> Env | None:
    """An idle environment that last played `task_key`, else any idle one."""
    for key in (task_key, *idle):
        envs = idle.get(key)
        if envs:
            env = envs.pop()
            if not envs:
                del idle[key]
            return env
    return None


def _worker_main(commands: Connection, results: Connection, make_env: Callable[[], Env], max_steps: int,
                 action_parse: str) -> None:
    """Run commands (request id, op, episode id, argument) until told to stop or the parent is gone. Steps go
    before starts: an episode waiting for its step keeps a server slot idle, a new episode has none yet."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us in order
    live: dict[int, Episode] = {}
    idle: dict[str, list[Env]] = {}
    starts: deque = deque()
    others: deque = deque()
    try:
        while True:
            try:
                while not (starts or others) or commands.poll():  # wait when idle, else take what has arrived
                    message = commands.recv()
                    if message is None:
                        return
                    (starts if message[1] == "start" else others).append(message)
            except (EOFError, OSError):  # the parent exited (even killed): nothing left to do
                return
            rid, op, eid, arg = (others or starts).popleft()
            try:
                if op == "release":
                    ep = live.pop(eid)
                    idle.setdefault(ep.task.key, []).append(ep.env)
                    continue
                if op == "start":
                    task, prefix = arg
                    ep = start_episode(task, _idle_env(idle, task.key) or make_env(), prefix, max_steps, action_parse)
                    live[eid] = ep
                    out: Any = ep.traj
                elif op == "step":
                    ep = live[eid]
                    apply_reply(ep, arg, max_steps, action_parse)
                    t = ep.traj
                    out = StepDelta(t.steps[-1], t.termination, t.success, t.reward, t.meta.get("error"))
                elif op == "cpu":
                    out = time.process_time()
                else:
                    raise ValueError(f"unknown command {op!r}")
                results.send((rid, True, out))
            except Exception as e:  # report it for this command; the worker carries on
                results.send((rid, False, f"{type(e).__name__}: {e}"))
    finally:
        for env in [ep.env for ep in live.values()] + [e for envs in idle.values() for e in envs]:
            try:
                env.close()
            except Exception:
                pass


def _send_loop(outbox: queue.SimpleQueue, conn: Connection) -> None:
    """Feed one worker from a thread, so a full pipe never blocks the event loop."""
    while True:
        message = outbox.get()
        if message is None:
            conn.close()
            return
        try:
            conn.send(message)
        except OSError:  # the worker is gone; its reader reports it
            return


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class EnvPool:
    """`workers` processes holding the environments of the episodes in flight (started with `spawn`: a fork
    would copy the main process's threads and open connections)."""

    def __init__(self, make_env: Callable[[], Env], workers: int, max_steps: int, action_parse: str = FIRST_LINE):
        if workers < 1:
            raise ValueError(f"env_workers must be >= 1, got {workers}")
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, tuple[int, asyncio.Future]] = {}
        self._ids = itertools.count()
        self._live = [0] * workers
        self._dead: dict[int, str] = {}
        self._closing = False
        ctx = multiprocessing.get_context("spawn")
        self.processes, self._outboxes = [], []
        for w in range(workers):
            cmd_recv, cmd_send = ctx.Pipe(duplex=False)
            res_recv, res_send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, args=(cmd_recv, res_send, make_env, max_steps, action_parse),
                               name=f"env-worker-{w}", daemon=True)
            proc.start()
            cmd_recv.close()
            res_send.close()
            outbox: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=_send_loop, args=(outbox, cmd_send), daemon=True).start()
            threading.Thread(target=self._receive_loop, args=(w, res_recv), daemon=True).start()
            self.processes.append(proc)
            self._outboxes.append(outbox)

    def _receive_loop(self, w: int, conn: Connection) -> None:
        while True:
            try:
                rid, ok, payload = conn.recv()
            except (EOFError, OSError):
                self._call(self._gone, w)
                return
            self._call(self._resolve, rid, ok, payload)

    def _call(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    def _resolve(self, rid: int, ok: bool, payload: Any) -> None:
        _, fut = self._pending.pop(rid, (None, None))
        if fut is None or fut.done():
            return
        if ok:
            fut.set_result(payload)
        else:
            fut.set_exception(EnvWorkerError(payload))

    def _gone(self, w: int) -> None:
        if self._closing:
            return
        proc = self.processes[w]
        proc.join(timeout=1)
        self._dead[w] = f"environment worker {w} (pid {proc.pid}) exited with code {proc.exitcode}"
        for rid, (worker, fut) in list(self._pending.items()):
            if worker == w and not fut.done():
                fut.set_exception(EnvWorkerError(self._dead[w]))
                del self._pending[rid]

    def _send(self, w: int, op: str, eid: int | None = None, arg: Any = None) -> asyncio.Future:
        if w in self._dead:
            raise EnvWorkerError(self._dead[w])
        rid = next(self._ids)
        fut = self._loop.create_future()
        self._pending[rid] = (w, fut)
        self._outboxes[w].put((rid, op, eid, arg))
        return fut

    def _worker_for(self, task_key: str) -> int:
        """The task's own worker (its idle environments are there), unless it has clearly more episodes."""
        w = _stable_hash(task_key) % len(self._live)
        least = min(range(len(self._live)), key=self._live.__getitem__)
        slack = 2 + sum(self._live) // (4 * len(self._live))
        return w if self._live[w] <= self._live[least] + slack else least

    async def start(self, task: Task, prefix: list[str]) -> tuple[tuple[int, int], Trajectory]:
        """Reset an environment to `task` and replay `prefix`: (handle, the trajectory so far)."""
        w = self._worker_for(task.key)
        eid = next(self._ids)
        self._live[w] += 1
        try:
            traj = await self._send(w, "start", eid, (task, prefix))
        except BaseException:
            self._live[w] -= 1
            raise
        return (w, eid), traj

    async def step(self, handle: tuple[int, int], reply: str) -> StepDelta:
        return await self._send(handle[0], "step", handle[1], reply)

    def release(self, handle: tuple[int, int]) -> None:
        """Give the episode's environment back to its worker's idle set (no answer awaited)."""
        w, eid = handle
        self._live[w] -= 1
        if w not in self._dead:
            self._outboxes[w].put((None, "release", eid, None))

    async def cpu_seconds(self) -> float:
        """CPU time the live workers have used so far."""
        return sum(await asyncio.gather(*(self._send(w, "cpu") for w in range(len(self.processes))
                                          if w not in self._dead)))

    def close(self) -> None:
        self._closing = True
        for outbox in self._outboxes:
            outbox.put(None)
        for proc in self.processes:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)


# ---- the runner ------------------------------------------------------------------------------------------

async def _run(jobs: Iterable[tuple[Task, list[str]]], policy: AsyncPolicy, make_env: Callable[[], Env],
               on_finish: Callable[[Episode], None], max_steps: int, concurrency: int, env_workers: int,
               total: int | None, progress: bool) -> RunStats:
    stats, t0 = RunStats(), time.perf_counter()
    lanes = max(1, min(concurrency, total if total is not None else concurrency))
    failures: list[str] = []
    streak = 0
    await policy.check()
    pool = EnvPool(make_env, env_workers, max_steps, getattr(policy, "action_parse", FIRST_LINE))
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="on_finish")
    loop = asyncio.get_running_loop()
    bar = tqdm(total=total, disable=not progress, desc="episodes", unit="ep")

    async def episode(task: Task, prefix: list[str]) -> None:
        nonlocal streak
        handle, traj = await pool.start(task, prefix)
        ep = Episode(task=task, env=None, traj=traj, prefix=list(prefix))
        try:
            while not ep.finished:
                reply = await policy.act_one(ep)
                stats.generate_calls += 1
                stats.generated_tokens += reply.num_tokens
                if reply.finish_reason == "context_overflow":
                    ep.traj.termination = "context_overflow"
                else:
                    (await pool.step(handle, reply.text)).apply(ep.traj)
        except (BackendUnavailable, Refused) as e:
            stats.failed += 1
            streak += 1
            failures.append(f"{task.key}: {e}")
            if streak >= lanes:
                raise BackendUnavailable(f"{streak} episodes in a row failed; the last: {e}") from None
            return
        finally:
            pool.release(handle)
        streak = 0
        await loop.run_in_executor(writer, on_finish, ep)  # its lane waits for the record; the others go on
        stats.episodes += 1
        stats.env_steps += max(0, len(ep.traj.steps) - len(ep.prefix))
        bar.update(1)

    async def lane() -> None:
        for task, prefix in jobs:  # one iterator shared by all lanes: each takes the next job
            await episode(task, prefix)

    running = [asyncio.ensure_future(lane()) for _ in range(lanes)]
    try:
        await asyncio.gather(*running)
        stats.env_cpu_s = await pool.cpu_seconds()
    except BaseException:
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise
    finally:
        writer.shutdown(wait=True)  # a write under way when the run stops still completes
        bar.close()
        pool.close()
        await policy.aclose()
    stats.seconds = time.perf_counter() - t0
    if failures:
        raise BackendUnavailable(f"{len(failures)} of {stats.episodes + len(failures)} episodes failed after the "
                                 f"HTTP client's retries and were not written (rerun to do them); the first: "
                                 f"{failures[0]}")
    return stats


# ---- several client processes ------------------------------------------------------------------------

def _client_main(jobs: Connection, results: Connection, policy: AsyncPolicy, make_env: Callable[[], Env],
                 max_steps: int, concurrency: int, env_workers: int) -> None:
    """One client process: the runner over the jobs the parent sends (None: no more), each finished episode sent
    back to be written there, then ("stats", RunStats) or ("error", the exception). The parent gone (the job
    pipe closed: it exited, even killed, or is done with us) ends it at once; its environment workers follow."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    incoming: queue.SimpleQueue = queue.SimpleQueue()

    def receive() -> None:
        while True:
            try:
                incoming.put(jobs.recv())
            except (EOFError, OSError):
                os._exit(1)  # nothing this process could still send would be written

    threading.Thread(target=receive, daemon=True).start()
    try:
        stats = asyncio.run(_run(iter(incoming.get, None), policy, make_env, lambda ep: results.send(("episode", ep)),
                                 max_steps, concurrency, env_workers, None, False))
        results.send(("stats", stats))
    except Exception as e:  # the parent raises it once it has written what came back
        results.send(("error", e))


def _run_clients(jobs: Iterable[tuple[Task, list[str]]], policy: AsyncPolicy, make_env: Callable[[], Env],
                 on_finish: Callable[[Episode], None], max_steps: int, concurrency: int, env_workers: int,
                 total: int | None, progress: bool, processes: int) -> RunStats:
    """The runner in `processes` client processes (spawned: the policy and `make_env` must pickle); this process
    deals the jobs out by route key and writes every finished episode that comes back (`on_finish`, in order of
    arrival, one at a time)."""
    ctx = multiprocessing.get_context("spawn")
    arrived: queue.SimpleQueue = queue.SimpleQueue()
    procs, senders = [], []
    for k in range(processes):
        job_recv, job_send = ctx.Pipe(duplex=False)
        res_recv, res_send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_client_main, name=f"client-{k}",
                           args=(job_recv, res_send, policy, make_env, max_steps, max(1, concurrency // processes),
                                 max(1, env_workers // processes)))
        proc.start()
        job_recv.close()
        res_send.close()
        procs.append(proc)
        senders.append(job_send)
        threading.Thread(target=_forward, args=(k, res_recv, arrived), daemon=True).start()

    def deal() -> None:  # in a thread: a client slow to take its jobs must not stop the writes
        try:
            for task, prefix in jobs:
                senders[_stable_hash(task.meta.get("route_key", task.key)) % processes].send((task, prefix))
            for conn in senders:
                conn.send(None)
        except OSError:  # a client is gone: its reader reports it
            pass

    threading.Thread(target=deal, daemon=True).start()
    stats, t0, errors, running = RunStats(), time.perf_counter(), [], processes
    bar = tqdm(total=total, disable=not progress, desc="episodes", unit="ep")
    try:
        while running:
            k, kind, payload = arrived.get()
            if kind == "episode":
                on_finish(payload)
                bar.update(1)
                continue
            running -= 1
            if kind == "stats":
                for name in ("episodes", "env_steps", "generate_calls", "generated_tokens", "failed", "env_cpu_s"):
                    setattr(stats, name, getattr(stats, name) + getattr(payload, name))
            else:
                errors.append(payload if kind == "error" else EnvWorkerError(
                    f"client process {k} (pid {procs[k].pid}) exited with code {procs[k].exitcode}"))
    except BaseException:  # interrupted: the clients stop now (their environment workers follow)
        for proc in procs:
            proc.terminate()
        raise
    finally:
        bar.close()
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
    stats.seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return stats


def _forward(k: int, conn: Connection, arrived: queue.SimpleQueue) -> None:
    """What client process k sends, into the parent's queue; ("gone", None) when it ends without a last word."""
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            arrived.put((k, "gone", None))
            return
        arrived.put((k, kind, payload))
        if kind != "episode":
            return


def client_processes(policy: Policy) -> int:
    """Client processes for a policy served over HTTP: one per ENDPOINTS_PER_CLIENT endpoints."""
    urls = getattr(getattr(policy, "backend", None), "urls", None) or [None]
    return -(-len(urls) // ENDPOINTS_PER_CLIENT)


def run_episodes_async(tasks: Iterable[tuple[Task, list[str]] | Task], policy: AsyncPolicy,
                       make_env: Callable[[], Env], on_finish: Callable[[Episode], None], max_steps: int = MAX_STEPS,
                       concurrency: int = CONCURRENCY, env_workers: int | None = None, total: int | None = None,
                       progress: bool = True, processes: int = 1) -> RunStats:
    """Run every task (optionally with a prefix of replies to replay) to the end, as `run_episodes` does, in
    `processes` client processes.

    `make_env` is called in the worker processes, so it must pickle (a module-level function, a class, or a
    `functools.partial` of one); with `processes` > 1 the policy too.
    """
    jobs = (t if isinstance(t, tuple) else (t, []) for t in tasks)
    if total is None and hasattr(tasks, "__len__"):
        total = len(tasks)  # type: ignore[arg-type]
    if total == 0:
        return RunStats()  # nothing to do: no workers, no server needed
    workers = env_workers or default_env_workers()
    if processes > 1:
        return _run_clients(jobs, policy, make_env, on_finish, max_steps, concurrency, workers, total, progress,
                            processes)
    return asyncio.run(_run(jobs, policy, make_env, on_finish, max_steps, concurrency, workers, total, progress))


def run_for_policy(tasks: Iterable[tuple[Task, list[str]] | Task], policy: Policy, make_env: Callable[[], Env],
                   on_finish: Callable[[Episode], None], max_steps: int = MAX_STEPS, concurrency: int | None = None,
                   env_workers: int | None = None, progress: bool = True) -> RunStats:
    """The runner that suits the policy: asynchronous when it is served over HTTP, batched rounds otherwise
    (the in-process backend, the expert). `concurrency` None: that runner's default."""
    if getattr(policy, "asynchronous", False):
        return run_episodes_async(tasks, policy, make_env, on_finish, max_steps,  # type: ignore[arg-type]
                                  concurrency or CONCURRENCY, env_workers, progress=progress,
                                  processes=client_processes(policy))
    return run_episodes(tasks, policy, make_env, on_finish, max_steps, concurrency or ROUND_CONCURRENCY,
                        progress=progress)
