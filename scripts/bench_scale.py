"""Monte-Carlo rollouts at GPU scale: today's round runner against the asynchronous runner, on a simulated GPU fleet.

The fleet: K replicas, each a real OpenAI-compatible HTTP server process on loopback (this script with `--serve`)
that schedules requests as vLLM does (continuous batching of up to B sequences; an engine iteration decodes one
token of every running sequence and prefills the prompt tokens of the sequences it admits that its prefix cache
does not hold) and takes the time a GPU would (`CostModel`, multiplied by a time scale). Replies are the next step
of expert trajectories, so episodes have real lengths, succeed, and the real ALFWorld engine steps them.

The cost model is fitted to published vLLM figures of Llama-3.1-8B on an A100 and carried over to the model
family of --model (its weights and KV heads), the context the calls reach and an A100-80GB (`CostModel.for_model`).

The work: the MC stage's rollouts (N per expert step record, the record's expert prefix replayed first), fed in
for a fixed time per run (the records repeat if they run out), side by side:
  round     today's runner: rounds of 16 episodes, least-busy routing, 64 requests at most (the pipeline's settings)
  async     the asynchronous runner: sticky routing, environments in ENV_WORKERS processes
  async_lb  the asynchronous runner with least-busy routing (the other routing's prefix-cache hit rate)
Per run: model calls/s, environment steps/s, the fraction of the fleet's capacity used, prefix-cache hit rate,
CPU of the environment pool and of the client; then the paper preset's MC hours on 8 replicas for --model, projected
from these figures on the paper's data (its reply lengths, the context its prompts reach, the 4,096-token cut-off).

A 2-core machine cannot step ALFWorld as fast as 8 GPUs ask (~0.2 CPU-s per call here), so the simulated GPUs
run slower by a time scale chosen to give the fleet a capacity (`--fleet_calls_per_s`) the environments can
feed: the fleet is then the bottleneck a runner has to saturate, as on a GPU node with enough cores. The
projection uses the unscaled cost model, and says how many cores the environments need at full speed.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_scale.py                 # default run, < 15 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_scale.py --vllm_cpu      # + the same runs against vLLM (CPU)
    .venv/bin/python scripts/bench_scale.py --model llama-3-8b --measured RUNS.json   # reproject an earlier --out

The last line reads `fleet_capacity_used=<fraction> speedup_vs_round_runner=<ratio>`: the asynchronous runner with
sticky routing once the fleet has filled (the regime of a stage that runs for hours; the ramp-up and the whole
window are reported beside it), and its model calls/s over today's runner's, both after their ramp-up.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere


# ---- the GPU cost model ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What of a model family sets a decode step's cost: its weights (read once an iteration) and the KV cache a
    sequence reads every iteration (2 x layers x KV heads x head size, bf16)."""

    parameters: float
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int

    @property
    def weight_bytes(self) -> float:
        return 2 * self.parameters

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


# The families the projection knows (their published configs): Llama-2-7B keeps all 32 heads' keys and values,
# 4x Llama-3-8B's cache per token (8 KV heads, grouped-query attention).
MODELS = {"llama-2-7b": ModelShape(6.74e9, layers=32, kv_heads=32, head_dim=128, hidden=4096),
          "llama-3-8b": ModelShape(8.03e9, layers=32, kv_heads=8, head_dim=128, hidden=4096),
          "mistral-7b": ModelShape(7.24e9, layers=32, kv_heads=8, head_dim=128, hidden=4096)}


@dataclass(frozen=True)
class Gpu:
    bandwidth: float  # bytes/s of its memory
    bf16_flops: float  # dense peak
    memory: float  # bytes


FIT_GPU = Gpu(1.555e12, 312e12, 40e9)  # the A100-40GB of the published figures the cost model is fitted to
PROJECTION_GPU = Gpu(2.039e12, 312e12, 80e9)  # the projection's: an A100-80GB SXM
FIT_MODEL, FIT_CONTEXT = MODELS["llama-3-8b"], 1088  # Llama-3.1-8B, 1024-token prompts + half of 128 new tokens
GPU_MEMORY_UTILIZATION = 0.9  # serve_vllm.sh's default
RESERVED_BYTES = 4e9  # activations and CUDA graphs beside the weights and the KV cache
MAX_NUM_SEQS = 256  # vLLM's default ceiling on the sequences a replica runs at once


@dataclass(frozen=True)
class CostModel:
    """Milliseconds of one engine iteration of a vLLM replica:

        base_ms + seq_ms * running sequences + kv_ms_per_token * their context tokens + prefill_ms * uncached
        prompt tokens admitted in the iteration

    The defaults are the fit to published vLLM throughput of a 7-8B model on one A100: J. Musgrave, "vLLM
    throughput-latency sweep on NVIDIA A100" (johnmusgrave.com, vLLM 0.23, Llama-3.1-8B-Instruct bf16, A100-40GB,
    1024-token prompts, 128 new tokens): ~75 tokens/s for one sequence (13.3 ms a token) and 6.6x that for 8 at
    almost the same latency (16.2 ms), hence base 12.9 ms and 0.41 ms per running sequence at its 1,088-token mean
    context, of which reading that context's KV cache (128 KiB a token at 1.555 TB/s) is 0.09 ms. Prefill: 2 x 8e9
    FLOP a token at half the A100's 312 bf16 TFLOP/s, 0.1 ms a token. `for_model` carries the fit over to another
    family, context and GPU: weights and KV reads scale with their bytes over the bandwidth, the rest stays.
    `max_batch` and `kv_tokens` (the prefix cache) are the simulated replica's.
    """

    base_ms: float = 12.9
    seq_ms: float = 0.41 - FIT_CONTEXT * FIT_MODEL.kv_bytes_per_token / FIT_GPU.bandwidth * 1e3
    kv_ms_per_token: float = FIT_MODEL.kv_bytes_per_token / FIT_GPU.bandwidth * 1e3
    context: float = FIT_CONTEXT  # mean context tokens of a running sequence, where none is given
    prefill_ms: float = 0.10
    max_batch: int = 64
    kv_tokens: int = 110_000
    block_tokens: int = 16  # vLLM's KV block: the prefix cache hits whole blocks

    @classmethod
    def for_model(cls, model: ModelShape, context: float, shared: float = 0.0, gpu: Gpu = PROJECTION_GPU) -> "CostModel":
        """The fit carried over to `model` on `gpu` with sequences of `context` tokens on average, `shared` of them
        (the instruction and example every prompt starts with) held once by the prefix cache: the KV cache's room
        (GPU_MEMORY_UTILIZATION of the memory, less the weights and RESERVED_BYTES) sets `kv_tokens` and the
        sequences a replica can run, up to vLLM's MAX_NUM_SEQS."""
        fit = cls()
        fixed_ms = fit.base_ms - FIT_MODEL.weight_bytes / FIT_GPU.bandwidth * 1e3
        kv_tokens = int((gpu.memory * GPU_MEMORY_UTILIZATION - model.weight_bytes - RESERVED_BYTES)
                        / model.kv_bytes_per_token)
        prefill_flops = 2 * model.parameters + 4 * model.layers * model.hidden * context  # weights + attention
        return cls(base_ms=fixed_ms + model.weight_bytes / gpu.bandwidth * 1e3, seq_ms=fit.seq_ms,
                   kv_ms_per_token=model.kv_bytes_per_token / gpu.bandwidth * 1e3, context=context,
                   prefill_ms=prefill_flops / (0.5 * gpu.bf16_flops) * 1e3, kv_tokens=kv_tokens,
                   max_batch=max(1, min(MAX_NUM_SEQS, int(kv_tokens / max(context - shared, 1)))))

    def iteration_ms(self, running: int, uncached: float, context_tokens: float | None = None) -> float:
        """One iteration with `running` sequences holding `context_tokens` in all (default: `context` each)."""
        context = running * self.context if context_tokens is None else context_tokens
        return self.base_ms + self.seq_ms * running + self.kv_ms_per_token * context + self.prefill_ms * uncached

    def replica_calls_per_s(self, out_tokens: float, uncached: float, batch: int | None = None) -> float:
        """Calls/s of a saturated replica: `batch` sequences always running, each call `out_tokens` iterations long
        and admitted with `uncached` prompt tokens to prefill (batch / out_tokens admissions per iteration)."""
        b = batch or self.max_batch
        return (b / out_tokens) / (self.iteration_ms(b, uncached * b / out_tokens) / 1000)


# ---- the simulated replica (a server process) ----------------------------------------------------------------

class BlockCache:
    """vLLM-style automatic prefix caching: full blocks of a sequence are keyed by the hash of everything up to
    them; a prompt hits its leading blocks that are cached; least recently used blocks go first."""

    def __init__(self, max_blocks: int, block_chars: int):
        self.max_blocks, self.block_chars = max_blocks, block_chars
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def _hashes(self, text: str) -> Iterator[int]:
        h = 0
        for i in range(0, len(text) - self.block_chars + 1, self.block_chars):
            h = hash((h, text[i:i + self.block_chars]))
            yield h

    def hit_blocks(self, text: str) -> int:
        n = 0
        for h in self._hashes(text):
            if h not in self.blocks:
                break
            self.blocks.move_to_end(h)
            n += 1
        return n

    def add(self, text: str) -> None:
        for h in self._hashes(text):
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)


@dataclass
class Sequence:
    prompt: str
    reply: str
    prompt_tokens: int
    out_tokens: int
    done: asyncio.Future
    generated: int = 0


class Replica:
    """One simulated GPU: continuous batching under the cost model, time multiplied by `scale`."""

    def __init__(self, cost: CostModel, scale: float, experts: list[tuple[str, list[str]]], turn_marker: str,
                 chars_per_token: float):
        self.cost, self.scale, self.experts = cost, scale, experts
        self.turn_marker, self.cpt = turn_marker, chars_per_token
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.wake = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        """An empty prefix cache and zero counters (between runs; nothing is in flight then)."""
        self.cache = BlockCache(self.cost.kv_tokens // self.cost.block_tokens,
                                int(round(self.cost.block_tokens * self.cpt)))
        self.counters = dict(calls=0, prompt_tokens=0, cached_tokens=0, output_tokens=0, busy_s=0.0, slot_s=0.0,
                             iterations=0)

    def tokens(self, text: str) -> int:
        return math.ceil(len(text) / self.cpt)

    def reply_for(self, prompt: str) -> str | None:
        """The expert's next step of the episode in `prompt`: its task text, and the steps it has taken."""
        for task_text, replies in self.experts:
            at = prompt.rfind(task_text)
            if at >= 0:
                step = prompt.count(self.turn_marker, at) - 1  # the last marker opens the reply asked for
                return replies[min(step, len(replies) - 1)]
        return None

    async def complete(self, prompt: str) -> tuple[str, int, int]:
        reply = self.reply_for(prompt)
        if reply is None:
            raise KeyError("no expert trajectory's task text in the prompt")
        seq = Sequence(prompt, reply, self.tokens(prompt), self.tokens(reply) + 1,  # + EOS
                       asyncio.get_running_loop().create_future())
        self.waiting.append(seq)
        self.wake.set()
        await seq.done
        return reply, self.tokens(prompt), seq.out_tokens

    async def engine(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.running and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            c = self.counters  # a reset between runs replaces them
            uncached = 0
            while self.waiting and len(self.running) < self.cost.max_batch:
                seq = self.waiting.popleft()
                cached = min(seq.prompt_tokens, self.cache.hit_blocks(seq.prompt) * self.cost.block_tokens)
                self.cache.add(seq.prompt)
                uncached += seq.prompt_tokens - cached
                c["prompt_tokens"] += seq.prompt_tokens
                c["cached_tokens"] += cached
                self.running.append(seq)
            start = loop.time()
            context = sum(seq.prompt_tokens + seq.generated for seq in self.running)  # the KV cache read
            await asyncio.sleep(self.scale * self.cost.iteration_ms(len(self.running), uncached, context) / 1000)
            took = loop.time() - start
            c["iterations"] += 1
            c["busy_s"] += took
            c["slot_s"] += took * len(self.running)
            still = []
            for seq in self.running:
                seq.generated += 1
                if seq.generated < seq.out_tokens:
                    still.append(seq)
                    continue
                self.cache.add(seq.prompt + seq.reply)  # the reply's blocks are cached as it is generated
                c["calls"] += 1
                c["output_tokens"] += seq.out_tokens
                if not seq.done.done():
                    seq.done.set_result(None)
            self.running = still

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "running": len(self.running), "waiting": len(self.waiting),
                "cpu_s": time.process_time()}


async def _http(replica: Replica, model: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal HTTP/1.1 keep-alive server: GET /health, /v1/models, /stats; POST /v1/completions, /reset."""
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            method, path = line.decode().split(" ")[:2]
            length = 0
            while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = header.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            status, out = 200, {}
            if method == "GET" and path == "/v1/models":
                out = {"object": "list", "data": [{"id": model, "object": "model"}]}
            elif method == "GET" and path == "/stats":
                out = replica.stats()
            elif method == "POST" and path == "/reset":
                replica.reset()
            elif method == "POST" and path == "/v1/completions":
                req = json.loads(body)
                try:
                    text, prompt_tokens, out_tokens = await replica.complete(req["prompt"])
                    out = {"id": "sim", "object": "text_completion", "model": model,
                           "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": out_tokens}}
                except KeyError as e:
                    status, out = 400, {"error": {"message": str(e)}}
            elif not (method == "GET" and path == "/health"):
                status, out = 404, {"error": {"message": f"no route {method} {path}"}}
            data = json.dumps(out).encode()
            writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (status, len(data), data))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


def serve(args: argparse.Namespace) -> None:
    """`--serve`: one simulated replica until SIGTERM."""
    experts = [(r["task_text"], r["replies"]) for r in map(json.loads, Path(args.experts).read_text().splitlines())]
    cost = CostModel(**json.loads(args.cost))

    async def main() -> None:
        replica = Replica(cost, args.time_scale, experts, args.turn_marker, args.chars_per_token)
        engine = asyncio.ensure_future(replica.engine())
        server = await asyncio.start_server(lambda r, w: _http(replica, "sim", r, w), "127.0.0.1", 0)
        print(f"serving sim on http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        engine.cancel()
        server.close()

    asyncio.run(main())


# ---- the fleet, from the benchmark's side ----------------------------------------------------------------------

def get_json(url: str, method: str = "GET") -> dict[str, Any]:
    request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def fleet(k: int, experts_file: Path, cost: CostModel, scale: float, turn_marker: str,
          chars_per_token: float) -> Iterator[list[str]]:
    """K replica processes; yields their base URLs; stops them (SIGTERM, waited for) on exit."""
    cmd = [sys.executable, __file__, "--serve", "--experts", str(experts_file), "--cost", json.dumps(asdict(cost)),
           "--time_scale", str(scale), "--turn_marker", turn_marker, "--chars_per_token", str(chars_per_token)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    try:
        urls = []
        for p in procs:
            line = p.stdout.readline()
            if not line.startswith("serving "):
                raise SystemExit(f"error: a simulated replica did not start (exit code {p.poll()})")
            urls.append(line.split()[-1])
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


class Monitor:
    """Samples the fleet's counters (summed over replicas) every `period` s in a thread."""

    def __init__(self, urls: list[str], period: float = 1.0):
        self.urls, self.period = urls, period
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self) -> dict[str, float]:
        total: dict[str, float] = {"main_cpu_s": time.process_time(), "env_cpu_s": children_cpu_s()}
        for u in self.urls:
            for k, v in get_json(u.removesuffix("/v1") + "/stats").items():
                total[k] = total.get(k, 0) + v
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.snapshot()))
            self._stop.wait(self.period)

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), self.snapshot()))

    def at(self, t: float) -> dict[str, float]:
        """The counters at time `t`, interpolated between samples."""
        before = max((s for s in self.samples if s[0] <= t), default=self.samples[0], key=lambda s: s[0])
        after = min((s for s in self.samples if s[0] >= t), default=self.samples[-1], key=lambda s: s[0])
        if after[0] == before[0]:
            return before[1]
        w = (t - before[0]) / (after[0] - before[0])
        return {k: before[1][k] + w * (after[1][k] - before[1][k]) for k in before[1]}


# ---- the work ---------------------------------------------------------------------------------------------------

class TimeUp(Exception):
    """The run's time is over."""


class Feed:
    """Rollout jobs for one run: the records' N rollouts in the MC stage's order, again with new keys when they
    run out, for `seconds` from the first one; then the policy's next call raises TimeUp, which stops the runner
    (its episodes in flight are dropped) and the figures come from that window. Counts the expert steps the
    started episodes replay."""

    def __init__(self, jobs: list, seconds: float, fill: int):
        self.jobs, self.seconds, self.fill = jobs, seconds, fill
        self.started = self.replayed = 0
        self.t0 = self.filled_at = 0.0
        self.deadline = math.inf

    def run(self, fn, policy, *args, **kwargs) -> None:
        """`fn(self, policy, ...)` (a runner) until the time is up."""
        try:
            fn(self, Timed(policy, self), *args, **kwargs)
        except TimeUp:
            pass

    def __iter__(self):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + self.seconds
        for cycle in itertools.count():
            for task, prefix in self.jobs:
                if cycle:
                    task = replace(task, meta={**task.meta, "route_key": f"{task.meta['route_key']}#{cycle}"})
                self.started += 1
                self.replayed += len(prefix)
                yield task, prefix


class Timed:
    """A policy whose calls raise TimeUp once the feed's time is over; it notes the end of the ramp-up, when the
    first `fill` episodes have all asked the fleet (after their resets and prefix replays)."""

    def __init__(self, policy: Any, feed: Feed):
        self.policy, self.feed = policy, feed
        self.asynchronous = policy.asynchronous
        self.asked = 0  # episodes that have asked at least once

    def _check_time(self, episodes: list) -> None:
        now = time.monotonic()
        if now >= self.feed.deadline:
            raise TimeUp
        for ep in episodes:
            if not getattr(ep, "asked", False):
                ep.asked = True
                self.asked += 1
        if not self.feed.filled_at and self.asked >= self.feed.fill:
            self.feed.filled_at = now

    def act(self, episodes: list) -> list:
        self._check_time(episodes)
        return self.policy.act(episodes)

    async def act_one(self, episode: Any) -> Any:
        self._check_time([episode])
        return await self.policy.act_one(episode)

    async def check(self) -> None:
        await self.policy.check()

    async def aclose(self) -> None:
        await self.policy.aclose()


def children_cpu_s() -> float:
    """CPU seconds of this process's live children that are environment workers (psutil; 0 without it)."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0.0
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(child.cmdline()):
                times = child.cpu_times()
                total += times.user + times.system
    return total


def expert_trajectories(split: str, data_root: str | None, cache: Path) -> list[dict[str, Any]]:
    """ALFWorld's built-in expert on every game of the split (cached: ~1 min for the 24 generated games)."""
    if cache.is_file():
        return [json.loads(line) for line in cache.read_text().splitlines()]
    from eval_agent.envs.alfworld import AlfWorldEnv, load_tasks
    from eval_agent.runner import ExpertPolicy, run_episodes

    print(f"playing ALFWorld's expert on the {split} games once (cached in {cache}) ...", file=sys.stderr)
    rows = []
    run_episodes(load_tasks(split, data_root=data_root), ExpertPolicy(), lambda: AlfWorldEnv(expert=True),
                 lambda ep: rows.append({"key": ep.task.key, **ep.traj.to_dict()}),
                 concurrency=4, progress=False)
    rows = [r for r in rows if r["success"]]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def rollout_jobs(rows: list[dict[str, Any]], tasks: dict, n: int, seed: int) -> list:
    """(task, prefix) of the N rollouts of every expert step record that has steps left, as the MC stage queues
    them (a record's rollouts side by side, routed by the record, seeded per rollout)."""
    from eval_agent.records import rollout_key, step_key
    from eval_agent.runner import derive_seed

    jobs = []
    for row in rows:
        replies = [s["text"] for s in row["steps"]]
        for t in range(len(replies) - 1):
            record = step_key(row["key"], t, "expert")
            for i in range(n):
                key = rollout_key(record, i)
                meta = {**tasks[row["key"]].meta, "route_key": record, "seed": derive_seed(seed, key)}
                jobs.append((replace(tasks[row["key"]], meta=meta), replies[: t + 1]))
    return jobs


@dataclass
class RunResult:
    name: str
    window_s: float  # from the first job to the end of the feed
    fill_s: float | None  # the ramp-up: until the first `concurrency` episodes had all asked the fleet
    calls_per_s: float  # model calls over the window
    steady_calls_per_s: float  # ... after the ramp-up (the regime of a stage that runs for hours)
    env_steps_per_s: float  # agent steps plus the expert steps replayed before them, over the window
    capacity_calls_per_s: float  # the fleet saturated with this run's requests (tokens out and uncached per call)
    capacity_used: float  # over the window
    steady_capacity_used: float
    steady_slots_busy: float  # running sequences / (K x B), after the ramp-up
    steady_queued: float  # requests waiting at the replicas (all batch slots busy), after the ramp-up
    hit_rate: float  # prompt tokens the replicas' prefix caches held
    hit_rate_early: float  # ... over the first --seconds_lb of the run (the same phase in every run)
    out_tokens_per_call: float
    uncached_tokens_per_call: float
    env_cpu_s_per_call: float  # the environment pool's CPU (the main process's for today's runner) / calls
    env_pool_cpu_use: float  # of the cores the environments run on
    main_cpu_use: float
    main_cpu_s_per_call: float  # the main process's CPU / calls after the ramp-up (today's runner: with the
    # environments; at the fleet's 4 calls/s its fixed costs weigh: measure_client gives the client's own)
    fleet_cpu_use: float  # the simulated replicas' processes, all together
    load_1min: float  # the machine's load average at the end (other jobs slow everything here)


def hit_rate(first: dict[str, float], last: dict[str, float]) -> float:
    return (last["cached_tokens"] - first["cached_tokens"]) / max(last["prompt_tokens"] - first["prompt_tokens"], 1)


def measure(name: str, args: argparse.Namespace, urls: list[str], jobs: list, policy_options: dict[str, Any],
            cost: CostModel, scale: float) -> RunResult:
    from eval_agent.async_runner import run_episodes_async
    from eval_agent.envs.alfworld import make_env
    from eval_agent.llm import GenerationConfig
    from eval_agent.runner import ModelPolicy, run_episodes

    for u in urls:
        get_json(u.removesuffix("/v1") + "/reset", "POST")
    asynchronous = name != "round"
    concurrency = args.concurrency if asynchronous else args.round_concurrency
    seconds = {"round": args.seconds_round, "async": args.seconds_async, "async_lb": args.seconds_lb}[name]
    gen = GenerationConfig(max_new_tokens=512, temperature=1.0)
    policy = ModelPolicy.build("alfworld", "sim", gen, backend="openai", base_urls=urls, tokenizer=args.tokenizer,
                               **policy_options)
    feed = Feed(jobs, seconds, concurrency)
    workers = args.env_workers or len(os.sched_getaffinity(0))
    with Monitor(urls) as monitor:
        if asynchronous:
            feed.run(run_episodes_async, policy, make_env, lambda ep: None, concurrency=concurrency,
                     env_workers=workers, progress=False)
        else:
            feed.run(run_episodes, policy, make_env, lambda ep: None, concurrency=concurrency, progress=False)
    policy.backend.close()
    end = feed.deadline
    first, last = monitor.at(feed.t0), monitor.at(end)
    d = {k: last[k] - first[k] for k in last}
    window = end - feed.t0
    if d["calls"] < 1:
        raise SystemExit(f"error: no model call finished in the {window:.0f} s of run {name}: give it more time")
    calls = d["calls"]
    out_tokens, uncached = d["output_tokens"] / calls, (d["prompt_tokens"] - d["cached_tokens"]) / calls
    capacity = len(urls) * cost.replica_calls_per_s(out_tokens, uncached) / scale
    fill_at = feed.filled_at or None
    steady = [x for t, x in monitor.samples if fill_at is not None and fill_at <= t <= end]
    s0 = monitor.at(fill_at) if fill_at is not None else first
    steady_s = end - (fill_at if fill_at is not None else feed.t0)
    steady_calls = max(last["calls"] - s0["calls"], 1)
    cpu_key = "env_cpu_s" if asynchronous else "main_cpu_s"  # today's runner steps them in the main process
    env_cpu = last[cpu_key] - s0[cpu_key]
    mean = (lambda key: sum(x[key] for x in steady) / len(steady)) if steady else (lambda key: float("nan"))
    return RunResult(
        name=name, window_s=round(window, 1), fill_s=None if fill_at is None else round(fill_at - feed.t0, 1),
        calls_per_s=calls / window, steady_calls_per_s=steady_calls / steady_s,
        env_steps_per_s=(calls + feed.replayed) / window, capacity_calls_per_s=capacity,
        capacity_used=calls / window / capacity, steady_capacity_used=steady_calls / steady_s / capacity,
        steady_slots_busy=mean("running") / (len(urls) * cost.max_batch), steady_queued=mean("waiting"),
        hit_rate=hit_rate(first, last), out_tokens_per_call=out_tokens,
        hit_rate_early=hit_rate(first, monitor.at(min(end, feed.t0 + args.seconds_lb))),
        uncached_tokens_per_call=uncached, env_cpu_s_per_call=env_cpu / steady_calls,
        env_pool_cpu_use=env_cpu / steady_s / (workers if asynchronous else 1), main_cpu_use=d["main_cpu_s"] / window,
        main_cpu_s_per_call=(last["main_cpu_s"] - s0["main_cpu_s"]) / steady_calls,
        fleet_cpu_use=d["cpu_s"] / window, load_1min=os.getloadavg()[0])


def measure_client(args: argparse.Namespace, experts_file: Path, cost: CostModel, turn_marker: str, cpt: float,
                   rows: list[dict[str, Any]], tasks: dict, calls: int = 3000) -> float:
    """The client's own CPU a call at full speed: the asynchronous policy (the prompt rendered, the request sent,
    the reply parsed: the main process's work per call) asking --replicas replicas that answer at once (time
    scale 0) with the runner's default requests in flight (as on a GPU node); no environment (theirs is counted
    apart). In the fleet runs the fleet's 4 calls/s would spread the main process's fixed costs (its threads, the
    monitor) over few calls, and fewer requests would be in flight."""
    from eval_agent.async_runner import CONCURRENCY
    from eval_agent.llm import GenerationConfig
    from eval_agent.llm.openai_http import MAX_REQUESTS
    from eval_agent.runner import Episode, ModelPolicy
    from eval_agent.trajectory import Trajectory

    episodes = []
    for row in rows:
        traj = Trajectory.from_dict({k: v for k, v in row.items() if k != "key"})
        episodes += [Episode(task=tasks[row["key"]], env=None, traj=Trajectory(traj.task_text, traj.steps[:i]))
                     for i in range(len(traj.steps))]

    async def ask(urls: list[str]) -> float:
        policy = ModelPolicy.build("alfworld", "sim", GenerationConfig(max_new_tokens=512, temperature=1.0),
                                   backend="openai", base_urls=urls, tokenizer=args.tokenizer, routing="sticky",
                                   max_requests=MAX_REQUESTS)
        await policy.check()
        lanes = asyncio.Semaphore(CONCURRENCY)

        async def one(ep: Episode) -> None:
            async with lanes:
                await policy.act_one(ep)

        t0 = time.process_time()
        await asyncio.gather(*(one(episodes[i % len(episodes)]) for i in range(calls)))
        cpu = time.process_time() - t0
        await policy.aclose()
        return cpu / calls

    with fleet(args.replicas, experts_file, cost, 0.0, turn_marker, cpt) as urls:
        return asyncio.run(ask(urls))


# ---- the projection ---------------------------------------------------------------------------------------------

# The paper's data (Table 4): trajectories and average turns; two kinds of step records (expert, explore), N = 5.
PAPER_DATA = {"alfworld": (2851, 10.1), "virtualhome": (4920, 11.5)}
SFT_SUCCESS = 0.633  # the SFT policy's average success (Table 1): the share of rollouts that end by succeeding
MAX_MODEL_LEN = 4096  # serve_vllm.sh's: a prompt longer than that ends its episode (context_overflow)


@dataclass(frozen=True)
class CallProfile:
    """One task family's model calls: `reply` tokens generated (with the end-of-turn token), `step` tokens a step
    adds to the next prompt (reply, observation, turn markers), `prefix` tokens every prompt of a task starts
    with (instruction, "OK", the example, the task), `shared` of them the same in every prompt (held once by the
    prefix cache), `uncached` tokens a call prefills under sticky routing, and the environment's CPU-s a call."""

    reply: float
    step: float
    prefix: float
    shared: float
    uncached: float
    env_cpu_s: float


# The paper's ALFWorld data, counted on a sample of the published alfworld_sft.json (17 trajectories of a public
# copy, LTSure/on-policy-cold-start@3ab240e data/alfworld_sft.json: 40 replies, 26 observations, 9 task turns)
# in the llama-2 format with the published instruction and example (= alfworld_0), with SmolLM2's tokenizer (the
# Llama tokenizers are not at hand offline): a reply is 40.5 tokens + the end of turn, an observation 31.3 (the
# generated data's templated thoughts: ~23 a reply).
PAPER_ALFWORLD_TOKENS = {"reply": 41.5, "step": 81.2, "prefix": 905, "shared": 772}


def rollout_calls(turns: float, profile: CallProfile, max_steps: int = 40,
                  max_len: int = MAX_MODEL_LEN) -> dict[str, Any]:
    """Calls per rollout and the context a call's sequence holds, when it succeeds as the expert does and when it
    fails: a failed rollout runs to the step budget (which counts the replayed prefix) or to the step whose
    prompt no longer fits `max_len` tokens, whichever comes first. Rollouts start after step t of an L-step
    expert trajectory, t = 0 .. L-1 alike; a call's prompt holds the prefix and the steps before it."""
    length = round(turns)
    last = min(max_steps, int((max_len - profile.prefix) / profile.step) + 1)  # steps whose prompt fits

    def context(end: int) -> float:  # the mean context over the calls of rollouts ending at step `end`
        steps = [j for t in range(length) for j in range(t + 1, end)]
        return profile.prefix + profile.step * sum(steps) / len(steps) + profile.reply / 2

    succeed = (turns - 1) / 2  # calls after step t, averaged over t
    return {"succeed": succeed, "fail": max(last - 1 - succeed, 0.0), "last_step": last,
            "context_succeed": context(length), "context_fail": context(last)}


def project(family: str, profile: CallProfile, model: str, capacity_used: float, client_cpu_per_call: float,
            today_round_s: float, replicas: int = 8, n: int = 5, max_steps: int = 40,
            cores: tuple[int, ...] = (16, 128)) -> dict[str, Any]:
    """MC hours of the paper preset: model calls / the fleet's rate (the cost model for `model` at the context the
    calls reach), or the CPU the node's cores give the environments and the client, or what the runner's client
    processes (one per ENDPOINTS_PER_CLIENT replicas) keep up with, whichever is the slowest."""
    from eval_agent.async_runner import ENDPOINTS_PER_CLIENT

    clients = -(-replicas // ENDPOINTS_PER_CLIENT)
    trajectories, turns = PAPER_DATA[family]
    records = 2 * trajectories * turns
    calls = rollout_calls(turns, profile, max_steps)
    mixes = {"all_succeed": (1.0, calls["succeed"], 0.0), "sft_success": (SFT_SUCCESS, calls["succeed"], calls["fail"])}
    out: dict[str, Any] = {"model": model, "step_records": round(records), "rollouts": round(records * n),
                           "profile": {k: round(v, 3) for k, v in asdict(profile).items()},
                           "last_step_of_a_failed_rollout": calls["last_step"], "client_processes": clients,
                           "today_calls_per_s": round(16 / today_round_s, 2)}
    for what, (share, ok, bad) in mixes.items():
        per_rollout = share * ok + (1 - share) * bad
        context = (share * ok * calls["context_succeed"] + (1 - share) * bad * calls["context_fail"]) / per_rollout
        cost = CostModel.for_model(MODELS[model], context, profile.shared)
        rate = replicas * cost.replica_calls_per_s(profile.reply, profile.uncached) * capacity_used
        c = records * n * per_rollout
        gpu_h, env_h, client_h = c / rate / 3600, c * profile.env_cpu_s / 3600, c * client_cpu_per_call / 3600
        out[what] = {"model_calls": round(c), "mean_context_tokens": round(context), "max_batch": cost.max_batch,
                     "iteration_ms": round(cost.iteration_ms(cost.max_batch, profile.uncached * cost.max_batch
                                                             / profile.reply), 1),
                     "calls_per_s_8_replicas": round(rate, 1), "gpu_bound_hours": round(gpu_h, 1),
                     "env_cpu_hours": round(env_h), "env_cores_to_keep_up": math.ceil(rate * profile.env_cpu_s),
                     "client_cores_at_fleet_rate": round(rate * client_cpu_per_call, 2),
                     "one_client_hours": round(max(gpu_h, client_h), 1),
                     **{f"hours_with_{k}_cores": round(max(gpu_h, (env_h + client_h) / k, client_h / clients), 1)
                        for k in cores},
                     "today_hours": round(c / (16 / today_round_s) / 3600, 1)}
    return out


def round_seconds(cost: CostModel, replies_tokens: list[float], uncached: float, env_cpu_per_call: float,
                  scale: float = 1.0, per_round: int = 16, replicas: int = 8) -> float:
    """One round of today's runner: the slowest of `per_round` replies (each replica decoding ~per_round/replicas
    sequences, the prefill of their uncached prompt tokens first), then every environment stepped in turn."""
    import random

    rng = random.Random(0)
    longest = sum(max(rng.choices(replies_tokens, k=per_round)) for _ in range(2000)) / 2000
    batch = per_round / replicas
    model_s = (cost.iteration_ms(batch, uncached * batch) + longest * cost.iteration_ms(batch, 0)) / 1000
    return scale * model_s + per_round * env_cpu_per_call


def prompt_tokens(tokenizer, family: str, trajectories: list, fmt) -> tuple[float, float, float]:
    """(prefix, shared, step) tokens of `family`'s prompts in chat format `fmt` (our instruction and example):
    the mean prefix of the trajectories' tasks, the part every prompt shares, and what a step adds."""
    from eval_agent.prompts import PromptBuilder
    from eval_agent.trajectory import Trajectory

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompts = PromptBuilder.for_task(family)
    prefixes = [count(fmt.render(prompts.messages(Trajectory(t.task_text, [])))) for t in trajectories]
    shared = count(fmt.render(prompts.messages(Trajectory("", []))))
    steps = [(count(fmt.render(prompts.messages(t))) - count(fmt.render(prompts.messages(Trajectory(t.task_text, [])))))
             / len(t.steps) for t in trajectories if t.steps]
    return sum(prefixes) / len(prefixes), shared, sum(steps) / len(steps)


def vh_calls_profile(tokenizer, fmt, uncached_per_step_token: float) -> tuple[CallProfile, list[float]]:
    """VirtualHome (no published SFT data: our generated trajectories): the call profile, with the environment's
    CPU-s per call measured here (a reset per ~5 calls, steps), and the reply lengths."""
    from eval_agent.envs import get_task_family
    from eval_agent.trajectory import Trajectory

    rows = [json.loads(line) for line in (REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl")
            .read_text().splitlines()[:40]]
    trajectories = [Trajectory.from_dict({k: v for k, v in r.items() if k != "key"}) for r in rows]
    replies = [len(tokenizer(s.text, add_special_tokens=False)["input_ids"]) + 1 for t in trajectories for s in t.steps]
    prefix, shared, step = prompt_tokens(tokenizer, "virtualhome", trajectories[:10], fmt)
    family = get_task_family("virtualhome")
    tasks = {t.key: t for t in family.load_tasks("train")}
    env = family.make_env()
    t0 = time.process_time()
    calls = 0
    for r in rows[:20]:
        env.reset(tasks[r["key"]])
        for s in r["steps"]:
            env.step(s["action"])
        calls += (len(r["steps"]) - 1) / 2  # a rollout's calls per reset, averaged over the record's step
    env.close()
    profile = CallProfile(reply=sum(replies) / len(replies), step=step, prefix=prefix, shared=shared,
                          uncached=step * uncached_per_step_token, env_cpu_s=(time.process_time() - t0) / calls)
    return profile, replies


# ---- vLLM on this CPU -------------------------------------------------------------------------------------------

def vllm_metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:"):
            name, _, value = line.rpartition(" ")
            key = name.split("{")[0]
            with contextlib.suppress(ValueError):
                out[key] = out.get(key, 0.0) + float(value)
    return out


def vllm_runs(args: argparse.Namespace, rows: list[dict[str, Any]], tasks: dict) -> dict[str, Any]:
    """The round and the asynchronous runner against one vLLM replica serving SmolLM2 on this CPU (its real
    replies: untrained, so most rollouts run to the step budget), each for a fixed time."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_rollouts import vllm_server

    from eval_agent.async_runner import run_episodes_async
    from eval_agent.envs.alfworld import make_env
    from eval_agent.llm import GenerationConfig
    from eval_agent.runner import ModelPolicy, run_episodes

    jobs = rollout_jobs(rows, tasks, args.n, args.seed)
    gen = GenerationConfig(max_new_tokens=args.vllm_max_new_tokens, temperature=1.0)
    results = {}
    with vllm_server(args.tokenizer, 4096, args.vllm_threads_bind, timeout=900) as (url, start_s):
        for name in ("round", "async"):
            policy = ModelPolicy.build("alfworld", args.tokenizer, gen, backend="openai", base_urls=url,
                                       routing="least_busy" if name == "round" else "sticky")
            concurrency = args.round_concurrency if name == "round" else args.vllm_concurrency
            feed = Feed(jobs, args.vllm_seconds, concurrency)
            before, samples = vllm_metrics(url), []
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(1.0):
                    m = vllm_metrics(url)
                    samples.append(m.get("vllm:num_requests_waiting", 0) + m.get("vllm:num_requests_running", 0))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            if name == "round":
                feed.run(run_episodes, policy, make_env, lambda ep: None, max_steps=args.vllm_max_steps,
                         concurrency=concurrency, progress=False)
            else:
                feed.run(run_episodes_async, policy, make_env, lambda ep: None, max_steps=args.vllm_max_steps,
                         concurrency=concurrency, env_workers=args.env_workers or None, progress=False)
            stop.set()
            sampler.join()
            after = vllm_metrics(url)
            policy.backend.close()
            window = feed.deadline - feed.t0
            calls = after.get("vllm:request_success_total", 0) - before.get("vllm:request_success_total", 0)
            queries = after.get("vllm:prefix_cache_queries_total", 0) - before.get("vllm:prefix_cache_queries_total", 0)
            hits = after.get("vllm:prefix_cache_hits_total", 0) - before.get("vllm:prefix_cache_hits_total", 0)
            results[name] = {"calls_per_s": round(calls / window, 3),
                             "env_steps_per_s": round((calls + feed.replayed) / window, 3),
                             "server_busy": round(sum(s >= 1 for s in samples) / max(len(samples), 1), 3),
                             "server_requests_in_flight_mean": round(sum(samples) / max(len(samples), 1), 1),
                             "hit_rate": round(hits / queries, 3) if queries else None, "seconds": round(window, 1)}
        results["vllm_start_s"] = round(start_s, 1)
    results["speedup"] = round(results["async"]["calls_per_s"] / max(results["round"]["calls_per_s"], 1e-9), 2)
    return results


# ---- main -----------------------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="llama-2-7b",
                   help="the model family the projection (and the simulated replicas' cost) is for")
    p.add_argument("--measured", help="a JSON an earlier run wrote with --out: its runs' figures instead of new "
                                      "runs (the projection for another --model)")
    p.add_argument("--replicas", type=int, default=8, help="simulated GPU replicas")
    p.add_argument("--max_batch", type=int, default=28,
                   help="sequences a simulated replica runs at once (the cost model's default is 64; 28 keeps the "
                        "episodes a 2-core machine must hold in flight, K x B, within what it can start quickly)")
    p.add_argument("--fleet_calls_per_s", type=float, default=4.0,
                   help="the simulated fleet's capacity: its GPUs slow down to this (what 2 cores' environments feed)")
    p.add_argument("--n", type=int, default=5, help="rollouts per step record")
    p.add_argument("--concurrency", type=int, help="asynchronous runner's episodes in flight (default 1.1 x K x B)")
    p.add_argument("--round_concurrency", type=int, default=16, help="today's runner: episodes per round")
    p.add_argument("--env_workers", type=int, help="default: the CPU cores")
    p.add_argument("--seconds_round", type=float, default=150.0)
    p.add_argument("--seconds_async", type=float, default=400.0)
    p.add_argument("--seconds_lb", type=float, default=120.0,
                   help="least-busy run; the routings' hit rates are compared over this many first seconds")
    p.add_argument("--split", default="train")
    p.add_argument("--data_root", help="ALFWorld data (default: the generated games)")
    p.add_argument("--cache_dir", default=str(REPO / "outputs" / "bench_scale"), help="expert trajectories' cache")
    p.add_argument("--tokenizer", default=str(REPO / "models" / "SmolLM2-135M-Instruct"),
                   help="chat template of the prompts (and the model vLLM serves with --vllm_cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="round,async,async_lb",
                   help="which simulated-fleet runs (comma-separated; the projection needs round and async)")
    p.add_argument("--vllm_cpu", action="store_true", help="also run both runners against vLLM serving on this CPU")
    p.add_argument("--vllm_seconds", type=float, default=120.0)
    p.add_argument("--vllm_concurrency", type=int, default=64)
    p.add_argument("--vllm_max_steps", type=int, default=40)
    p.add_argument("--vllm_max_new_tokens", type=int, default=48)
    p.add_argument("--vllm_threads_bind", default="0", help="VLLM_CPU_OMP_THREADS_BIND: '0' = one core")
    p.add_argument("--out", help="also write the figures as JSON here")
    # --serve: one simulated replica (started by the benchmark itself)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--experts", help=argparse.SUPPRESS)
    p.add_argument("--cost", help=argparse.SUPPRESS)
    p.add_argument("--time_scale", type=float, help=argparse.SUPPRESS)
    p.add_argument("--turn_marker", help=argparse.SUPPRESS)
    p.add_argument("--chars_per_token", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # stop the replicas on the way out

    from eval_agent.chat_format import ChatFormat
    from eval_agent.envs.alfworld import load_tasks
    from eval_agent.prompts import PromptBuilder
    from eval_agent.trajectory import Trajectory
    from transformers import AutoTokenizer

    t_start = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    fmt, prompts = ChatFormat("template", tokenizer), PromptBuilder.for_run("alfworld")
    rows = expert_trajectories(args.split, args.data_root, Path(args.cache_dir) / f"alfworld_expert_{args.split}.jsonl")
    tasks = {t.key: t for t in load_tasks(args.split, data_root=args.data_root)}
    rows = [r for r in rows if r["key"] in tasks]
    # what one reply and one prompt cost in tokens (the simulated servers count characters / chars_per_token)
    sample = [(Trajectory.from_dict({k: v for k, v in r.items() if k != "key"}), i)
              for r in rows[:8] for i in range(len(r["steps"]))]
    texts = [fmt.render(prompts.messages(Trajectory(t.task_text, t.steps[:i]))) for t, i in sample]
    cpt = sum(map(len, texts)) / sum(len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in texts)
    turn_marker = fmt.render([{"role": "user", "content": "x"}])[len(fmt.render([{"role": "user", "content": "x"}],
                                                                                 add_generation_prompt=False)):]
    reply_tokens = [math.ceil(len(s["text"]) / cpt) + 1 for r in rows for s in r["steps"]]
    new_tokens = sum(len(s["text"]) + len(s["observation"]) + 2 * len(turn_marker) for r in rows for s in r["steps"]
                     ) / len(reply_tokens) / cpt  # what a step adds to the next prompt

    # the simulated replicas: --model's cost carried to this data's contexts (each sequence's own in an iteration),
    # as many sequences as two cores' environments can keep in flight
    shared = len(tokenizer(fmt.render(prompts.messages(Trajectory("", []))), add_special_tokens=False)["input_ids"])
    context = sum(map(len, texts)) / len(texts) / cpt + sum(reply_tokens) / len(reply_tokens) / 2
    cost = replace(CostModel.for_model(MODELS[args.model], context, shared), max_batch=args.max_batch)
    real_capacity = args.replicas * cost.replica_calls_per_s(sum(reply_tokens) / len(reply_tokens), new_tokens)
    scale = real_capacity / args.fleet_calls_per_s
    args.concurrency = args.concurrency or math.ceil(1.1 * args.replicas * args.max_batch)
    jobs = rollout_jobs(rows, tasks, args.n, args.seed)
    print(f"{len(rows)} expert trajectories ({sum(len(r['steps']) for r in rows)} steps), {len(jobs)} rollout jobs; "
          f"{args.replicas} simulated replicas x {args.max_batch} sequences, time scale {scale:.1f} "
          f"(capacity {real_capacity:.0f} -> {args.fleet_calls_per_s} calls/s); {cpt:.2f} characters a token",
          file=sys.stderr)

    results: dict[str, RunResult] = {}
    runs = [("round", {"routing": "least_busy", "max_requests": 64}),
            ("async", {"routing": "sticky", "max_requests": args.concurrency}),
            ("async_lb", {"routing": "least_busy", "max_requests": args.concurrency})]
    runs = [run for run in runs if run[0] in args.runs.split(",")]
    if args.measured:  # the runs of an earlier --out: project for another --model without measuring again
        earlier = json.loads(Path(args.measured).read_text())
        try:
            results = {name: RunResult(**run) for name, run in earlier["runs"].items()}
        except TypeError as e:
            raise SystemExit(f"error: {args.measured}: not the runs this bench_scale.py writes ({e}): measure again") from None
        scale, runs = earlier["time_scale"], []
        print(f"runs {', '.join(results)} taken from {args.measured} (time scale {scale:.1f})", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        experts_file = Path(tmp) / "experts.jsonl"
        experts_file.write_text("".join(json.dumps({"task_text": r["task_text"],
                                                    "replies": [s["text"] for s in r["steps"]]}) + "\n" for r in rows))
        urls = stack.enter_context(fleet(args.replicas, experts_file, cost, scale, turn_marker, cpt)) if runs else []
        for name, options in runs:
            print(f"run {name} ({options['routing']} routing) ...", file=sys.stderr)
            results[name] = measure(name, args, urls, jobs, options, cost, scale)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in asdict(results[name]).items()}), file=sys.stderr)
        stack.close()  # the fleet's replicas stop: the client is measured against replicas of its own
        client = measure_client(args, experts_file, cost, turn_marker, cpt, rows, tasks)
        print(f"client: {client * 1000:.2f} ms of CPU a call at full speed", file=sys.stderr)
    report: dict[str, Any] = {"runs": {k: asdict(v) for k, v in results.items()}, "time_scale": scale,
                              "client_cpu_s_per_call": client}
    if "round" in results and "async" in results:
        report.update(projection(results, args, cost, scale, tokenizer, reply_tokens, new_tokens, client))
    if args.vllm_cpu:
        report["vllm_cpu"] = vllm_runs(args, rows, tasks)
    report["seconds"] = round(time.monotonic() - t_start)
    print_report(report, args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if "projection" in report:
        print(f"fleet_capacity_used={results['async'].steady_capacity_used:.3f} "
              f"speedup_vs_round_runner={report['speedup_vs_round_runner']:.1f}")


def projection(results: dict[str, RunResult], args: argparse.Namespace, cost: CostModel, scale: float, tokenizer,
               sim_replies: list[int], sim_step: float, client_cpu_s: float) -> dict[str, Any]:
    """The speed-up, and the paper preset's MC hours on 8 GPUs for --model, projected from the runs' figures:
    the fleet's capacity used, the environments' and the client's CPU a call, and the prefill a step costs under
    sticky routing (measured here), on the paper's ALFWorld data (PAPER_ALFWORLD_TOKENS) and our VirtualHome data."""
    from eval_agent.chat_format import ChatFormat

    a, r = results["async"], results["round"]
    speedup = a.steady_calls_per_s / r.steady_calls_per_s
    uncached_per_step_token = a.uncached_tokens_per_call / sim_step  # the share of a step's tokens prefilled
    alfworld = CallProfile(**PAPER_ALFWORLD_TOKENS, uncached=PAPER_ALFWORLD_TOKENS["step"] * uncached_per_step_token,
                           env_cpu_s=a.env_cpu_s_per_call)
    vh, vh_replies = vh_calls_profile(tokenizer, ChatFormat("llama-2"), uncached_per_step_token)
    sim_reply = sum(sim_replies) / len(sim_replies)
    projected = {}
    for family, profile, replies, env_cpu in (("alfworld", alfworld, [x * alfworld.reply / sim_reply for x in sim_replies],
                                                r.env_cpu_s_per_call),
                                               ("virtualhome", vh, vh_replies, vh.env_cpu_s)):
        # today's round at full GPU speed (the dilated fleet hides how long the main process steps environments)
        context = rollout_calls(PAPER_DATA[family][1], profile)["context_fail"]
        today = round_seconds(CostModel.for_model(MODELS[args.model], context, profile.shared), replies,
                              r.uncached_tokens_per_call * profile.step / sim_step, env_cpu)
        projected[family] = project(family, profile, args.model, a.steady_capacity_used, client_cpu_s,
                                    today)
    check = round_seconds(cost, sim_replies, r.uncached_tokens_per_call, r.env_cpu_s_per_call, scale=scale,
                          per_round=args.round_concurrency, replicas=args.replicas)
    projected["rests_on"] = {
        "records": "2 kinds x trajectories x average turns (paper Table 4: ALFWorld 2,851 x 10.1, VirtualHome "
                   "4,920 x 11.5), N = 5",
        "calls_per_rollout": "(turns - 1) / 2 when it succeeds as the expert does; a failed one runs to MAX_STEPS = "
                             f"40 or to the step whose prompt passes MAX_MODEL_LEN = {MAX_MODEL_LEN}; sft_success: "
                             "63.3% succeed (the SFT average, Table 1)",
        "model": {"name": args.model, **asdict(MODELS[args.model]),
                  "kv_bytes_per_token": MODELS[args.model].kv_bytes_per_token},
        "gpu": {"projection": asdict(PROJECTION_GPU), "fit": asdict(FIT_GPU), "memory_utilization": GPU_MEMORY_UTILIZATION,
                "reserved_bytes": RESERVED_BYTES, "max_num_seqs": MAX_NUM_SEQS},
        "cost_fit": asdict(CostModel()),
        "tokens": "ALFWorld: the published data's sample (PAPER_ALFWORLD_TOKENS); VirtualHome: our generated "
                  "trajectories, llama-2 format; SmolLM2's tokenizer for both",
        "measured_here": {"capacity_used": round(a.steady_capacity_used, 3),
                          "uncached_share_of_a_step": round(uncached_per_step_token, 3),
                          "alfworld_env_cpu_s_per_call": round(a.env_cpu_s_per_call, 4),
                          "virtualhome_env_cpu_s_per_call": round(vh.env_cpu_s, 4),
                          "client_cpu_s_per_call": round(client_cpu_s, 5)},
        "today": "rounds of 16: the slowest reply at 2 sequences per replica plus 16 environment steps in turn; the "
                 f"same formula at this run's time scale predicts {args.round_concurrency / check:.2f} calls/s for "
                 f"the measured {r.steady_calls_per_s:.2f}"}
    return {"speedup_vs_round_runner": speedup, "projection": projected}


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    rows = [("model calls/s (window)", "calls_per_s", "{:.2f}"),
            ("model calls/s (after ramp-up)", "steady_calls_per_s", "{:.2f}"),
            ("env steps/s (incl. replays)", "env_steps_per_s", "{:.2f}"),
            ("fleet capacity (calls/s)", "capacity_calls_per_s", "{:.2f}"),
            ("capacity used (window)", "capacity_used", "{:.1%}"),
            ("capacity used (after ramp-up)", "steady_capacity_used", "{:.1%}"),
            ("batch slots busy (after ramp-up)", "steady_slots_busy", "{:.1%}"),
            ("requests queued at replicas", "steady_queued", "{:.1f}"),
            ("prefix-cache hit rate", "hit_rate", "{:.1%}"),
            (f"  ... over the first {args.seconds_lb:.0f} s", "hit_rate_early", "{:.1%}"),
            ("uncached prompt tokens/call", "uncached_tokens_per_call", "{:.0f}"),
            ("env CPU-s per call", "env_cpu_s_per_call", "{:.3f}"),
            ("env pool CPU use (per worker)", "env_pool_cpu_use", "{:.1%}"),
            ("main process CPU use", "main_cpu_use", "{:.1%}"), ("fleet processes' CPU use", "fleet_cpu_use", "{:.1%}"),
            ("ramp-up (s)", "fill_s", "{}"), ("measured window (s)", "window_s", "{:.0f}"),
            ("load average at the end", "load_1min", "{:.1f}")]
    runs = report["runs"]
    print(f"\n{'':34}" + "".join(f"{n:>10}" for n in runs))
    for label, key, f in rows:
        print(f"{label:34}" + "".join(f"{f.format(runs[n][key]):>10}" for n in runs))
    print(f"time scale {report['time_scale']:.1f}, {args.replicas} replicas x {args.max_batch} sequences")
    if "vllm_cpu" in report:
        print("\nvLLM on this CPU (SmolLM2-135M, one replica): " + json.dumps(report["vllm_cpu"]))
    if "projection" not in report:
        return
    print(f"speed-up of the asynchronous runner over today's (calls/s after ramp-up): "
          f"{report['speedup_vs_round_runner']:.1f}x")
    for family in ("alfworld", "virtualhome"):
        pr = report["projection"][family]
        x = pr["profile"]
        print(f"\n{family} ({pr['model']}): {pr['step_records']:,} step records, {pr['rollouts']:,} rollouts; a call "
              f"generates {x['reply']:.1f} tokens and prefills {x['uncached']:.1f}, a step adds {x['step']:.1f}, "
              f"prompts start with {x['prefix']:.0f} ({x['shared']:.0f} shared); a failed rollout ends at step "
              f"{pr['last_step_of_a_failed_rollout']}; environments {x['env_cpu_s']:.3f} CPU-s a call; "
              f"{pr['client_processes']} client processes; today's runner {pr['today_calls_per_s']} calls/s")
        for what in ("all_succeed", "sft_success"):
            x = pr[what]
            print(f"  {what:12} {x['model_calls']:>12,} calls at {x['mean_context_tokens']:,} tokens of context, "
                  f"{x['max_batch']} sequences a replica, {x['iteration_ms']} ms an iteration: "
                  f"{x['calls_per_s_8_replicas']} calls/s on 8 GPUs; GPU-bound {x['gpu_bound_hours']} h, with 16 cores "
                  f"{x['hours_with_16_cores']} h, with 128 cores {x['hours_with_128_cores']} h ({x['env_cores_to_keep_up']} "
                  f"cores of environments, {x['client_cores_at_fleet_rate']} of the client's; one client process "
                  f"{x['one_client_hours']} h); today {x['today_hours']} h")
    print("\nprojection rests on: " + json.dumps(report["projection"]["rests_on"], indent=1))


if __name__ == "__main__":
    main()
