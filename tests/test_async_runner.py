"""The asynchronous episode runner (eval_agent/async_runner.py): the round runner's results, environments in
worker processes, a failed request failing only its episode, sticky routing and failover over real serve_hf
processes, seeded sampling, and a killed MC stage resuming with every key once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from eval_agent.async_runner import run_episodes_async
from eval_agent.envs import get_task_family
from eval_agent.llm import BackendUnavailable, Completion, GenerationConfig
from eval_agent.llm.openai_http import RetryPolicy
from eval_agent.records import read_rollouts, rollout_key
from eval_agent.runner import ModelPolicy, derive_seed, run_episodes
from helpers import CounterEnv, ScriptedPolicy, counter_task

REPO = Path(__file__).resolve().parent.parent
VH_TRAJECTORIES = REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl"
VH = get_task_family("virtualhome")


def collect(runner, jobs, policy, make_env, **kw):
    done = {}
    stats = runner(jobs, policy, make_env, lambda ep: done.__setitem__(ep.task.key, ep.traj.to_dict()),
                   progress=False, **kw)
    return done, stats


def test_counter_episodes_end_as_in_the_round_runner():
    """Invalid replies, the step budget with a replayed prefix, an engine error and a context overflow."""
    scripts = {"boom": ["Action: explode"], "long": [Completion(text="", finish_reason="context_overflow")],
               "ok": ["Action: count 1", "Action: count 2"],
               "bad": ["Thought: hmm", "Action: count 1", "Action: count 9", "x", "y"]}
    jobs = [counter_task("boom"), counter_task("long"), counter_task("ok"),
            (counter_task("bad", goal=9), ["Action: count 1"])]
    rounds, round_stats = collect(run_episodes, jobs, ScriptedPolicy(scripts), CounterEnv, max_steps=4, concurrency=3)
    done, stats = collect(run_episodes_async, jobs, ScriptedPolicy(scripts), CounterEnv, max_steps=4, concurrency=3,
                          env_workers=2)
    assert done == rounds
    assert [done[k]["termination"] for k in ("boom", "long", "ok", "bad")] == [
        "env_error", "context_overflow", "success", "max_steps"]
    assert (stats.episodes, stats.env_steps, stats.failed) == (round_stats.episodes, round_stats.env_steps, 0)
    assert stats.generate_calls == 7 and stats.env_cpu_s > 0  # one request per step; the workers' CPU is counted


class WhereEnv(CounterEnv):
    """Says in its task text which process and which environment object played the episode."""

    made = 0

    def __init__(self):
        WhereEnv.made += 1
        self.number = WhereEnv.made

    def reset(self, task):
        super().reset(task)
        return f"{os.getpid()} env{self.number}"


class SignallingPolicy(ScriptedPolicy):
    """ScriptedPolicy that sets `stepped` when task `b` asks for its last reply, and can fail there."""

    def __init__(self, scripts, fail: bool = False):
        super().__init__(scripts)
        self.stepped, self.fail = threading.Event(), fail

    async def act_one(self, ep):
        if ep.task.key == "b" and len(ep.traj.steps) == len(self.scripts["b"]) - 1:
            self.stepped.set()
            if self.fail:
                raise RuntimeError("the fleet is gone")
        return self.reply(ep)


def test_a_slow_write_does_not_hold_the_other_episodes():
    """`on_finish` (a stage's fsynced append) runs off the event loop: while a's record is being written, b
    keeps stepping (in the loop, a's write would wait forever for b's steps); every record is written."""
    policy = SignallingPolicy({"a": ["Action: count 1", "Action: count 2"],
                               "b": ["Action: count 1", "Action: count 2", "Action: count 3", "Action: count 4"]})
    written, b_stepped_during_a_write = [], []

    def on_finish(ep):
        if ep.task.key == "a":
            b_stepped_during_a_write.append(policy.stepped.wait(timeout=60))
        written.append(ep.task.key)

    stats = run_episodes_async([counter_task("a"), counter_task("b", goal=4)], policy, CounterEnv, on_finish,
                               concurrency=2, env_workers=1, progress=False)
    assert b_stepped_during_a_write == [True] and written == ["a", "b"] and stats.episodes == 2


def test_a_write_under_way_completes_before_the_run_stops():
    """The crash guarantee: a run that stops (here an error in another episode) has finished every write it
    started before it raises; the records written are whole (a kill: tests below and tests/test_core.py)."""
    policy = SignallingPolicy({"a": ["Action: count 1", "Action: count 2"],
                               "b": ["Action: count 1", "Action: count 2", "Action: count 3"]}, fail=True)
    written = []

    def on_finish(ep):
        policy.stepped.wait(timeout=60)  # still writing when b fails ...
        time.sleep(1)  # ... and for a while after: a slow fsync
        written.append(ep.task.key)

    with pytest.raises(RuntimeError, match="the fleet is gone"):
        run_episodes_async([counter_task("a"), counter_task("b", goal=3)], policy, CounterEnv, on_finish,
                           concurrency=2, env_workers=1, progress=False)
    assert written == ["a"]


class FailingPolicy(ScriptedPolicy):
    """ScriptedPolicy whose requests for task `down` fail as a fleet's do after the client's retries."""

    async def act_one(self, ep):
        if ep.task.key == "down":
            raise BackendUnavailable("request failed 7 times; last: endpoint X refused")
        return self.reply(ep)


def test_client_processes_give_the_one_process_results_written_here():
    """Several client processes: the same episodes as one, each written once, here (where on_finish runs), the
    work spread over the processes; a failed episode fails only itself and the run ends naming it."""
    scripts = {f"t{i}": ["Action: count 1", "Action: count 2"] for i in range(8)}
    scripts["bad"] = ["Thought: hmm", "Action: count 1", "Action: count 9", "x", "y"]
    jobs = [counter_task(k) for k in scripts if k != "bad"] + [(counter_task("bad", goal=9), ["Action: count 1"])]
    one, one_stats = collect(run_episodes_async, jobs, ScriptedPolicy(scripts), WhereEnv, max_steps=4, concurrency=4,
                             env_workers=2)
    writers = []
    many = {}

    def on_finish(ep):
        writers.append(os.getpid())
        many[ep.task.key] = ep.traj.to_dict()

    stats = run_episodes_async(jobs, ScriptedPolicy(scripts), WhereEnv, on_finish, max_steps=4, concurrency=4,
                               env_workers=2, progress=False, processes=2)
    def played(done):  # the episodes without WhereEnv's note of the process that played them
        return {k: {**d, "task_text": None} for k, d in done.items()}

    assert played(many) == played(one) and writers == [os.getpid()] * len(jobs)
    assert (stats.episodes, stats.env_steps, stats.generate_calls) == (one_stats.episodes, one_stats.env_steps,
                                                                       one_stats.generate_calls)
    assert len({d["task_text"].split()[0] for d in many.values()}) == 2  # two clients, one environment worker each
    written = []
    with pytest.raises(BackendUnavailable, match=r"1 of \d episodes failed.*down: request failed 7 times"):
        run_episodes_async([counter_task(k) for k in ("down", "t0", "t1")], FailingPolicy(scripts | {"down": []}),
                           CounterEnv, lambda ep: written.append(ep.task.key), concurrency=4, env_workers=2,
                           progress=False, processes=2)
    assert sorted(written) == ["t0", "t1"]


def test_workers_share_the_episodes_and_reuse_a_task_s_environment():
    jobs = [counter_task(f"t{i}") for i in range(8)]
    done, _ = collect(run_episodes_async, jobs, ScriptedPolicy({j.key: ["Action: count 1", "Action: count 2"]
                                                                for j in jobs}),
                      WhereEnv, concurrency=8, env_workers=2)
    assert len({d["task_text"].split()[0] for d in done.values()}) == 2  # both workers stepped
    assert str(os.getpid()) not in {d["task_text"].split()[0] for d in done.values()}  # none in this process
    # the same task one episode after another: one worker, one environment, reset again
    same = [counter_task("same") for _ in range(4)]
    texts = []
    run_episodes_async(same, ScriptedPolicy({"same": ["Action: count 1", "Action: count 2"]}), WhereEnv,
                       lambda ep: texts.append(ep.traj.task_text), concurrency=1, env_workers=2, progress=False)
    assert len(set(texts)) == 1


def fake_policy(url: str, retries: int = 1) -> ModelPolicy:
    """A model policy over the scripted server (llama-2 format: no tokenizer needed for a served name)."""
    policy = ModelPolicy.build("alfworld", "fake", GenerationConfig(max_new_tokens=8), backend="openai",
                               base_urls=url, chat_format="llama-2")
    policy.backend.client.retry = RetryPolicy(retries=retries, backoff_s=0.01, max_backoff_s=0.05)
    return policy


def test_a_request_that_keeps_failing_fails_only_its_episode(scripted_server):
    server = scripted_server()
    server.control(poison="Count to 3.", poison_reply={"status": 200, "body": "<html>oops</html>"},
                   text="Thought: go.\nAction: count 1")
    jobs = [counter_task("a"), counter_task("b", goal=3), counter_task("c")]
    done = {}
    with pytest.raises(BackendUnavailable) as err:
        run_episodes_async(jobs, fake_policy(server.url), CounterEnv, lambda ep: done.__setitem__(ep.task.key, ep),
                           max_steps=3, concurrency=3, env_workers=1, progress=False)
    assert sorted(done) == ["a", "c"]  # written; b is not, so a rerun does it
    message = str(err.value)
    assert message.startswith("1 of 3 episodes failed") and "rerun" in message
    assert f"b: request failed 2 times; last: endpoint {server.url} answered '<html>oops</html>', not JSON" in message


def test_a_fleet_that_fails_everything_stops_the_run(scripted_server):
    server = scripted_server()
    server.control(poison="Count", poison_reply={"status": 503, "body": "{}"})
    jobs = [counter_task(f"t{i}") for i in range(50)]
    with pytest.raises(BackendUnavailable, match="4 episodes in a row failed; the last: .*HTTP 503"):
        run_episodes_async(jobs, fake_policy(server.url), CounterEnv, lambda ep: None, concurrency=4, env_workers=1,
                           progress=False)
    assert server.posts() < 50  # it stopped long before trying every task


# ---- real servers: serve_hf over the tiny model on VirtualHome tasks ------------------------------------

@pytest.fixture(scope="module")
def vh_jobs():
    """Six VirtualHome jobs: three tasks, from the start and after one replayed expert step."""
    tasks = {t.key: t for t in VH.load_tasks("train")}
    rows = [json.loads(line) for line in VH_TRAJECTORIES.read_text().splitlines()[:3]]
    return [(tasks[r["key"]], [s["text"] for s in r["steps"][:t]]) for r in rows for t in (0, 1)]


def http_policy(model_dir, urls, **generation) -> ModelPolicy:
    config = GenerationConfig(max_new_tokens=8, **generation)
    return ModelPolicy.build("virtualhome", str(model_dir), config, backend="openai", base_urls=urls)


def by_job(done_list):
    """Trajectories keyed by (task, replayed prefix length, route key): one task appears in several jobs."""
    return {(d["meta"]["key"], d["meta"]["prefix"], d["meta"].get("route_key")): d for d in done_list}


def run_collecting(runner, jobs, policy, **kw):
    out = []

    def save(ep):
        d = ep.traj.to_dict()
        d["meta"]["prefix"] = len(ep.prefix)
        out.append(d)

    stats = runner(jobs, policy, VH.make_env, save, progress=False, **kw)
    return by_job(out), stats


def test_greedy_results_equal_the_round_runner_s(hf_server, tiny_model_dir, vh_jobs):
    rounds, _ = run_collecting(run_episodes, vh_jobs, ModelPolicy.build(
        "virtualhome", str(tiny_model_dir), GenerationConfig(max_new_tokens=8)), max_steps=3, concurrency=4)
    done, stats = run_collecting(run_episodes_async, vh_jobs, http_policy(tiny_model_dir, hf_server), max_steps=3,
                                 concurrency=4, env_workers=2)
    assert done == rounds and len(done) == 6  # in-process batched rounds == HTTP, asynchronous
    assert stats.generate_calls == sum(len(d["steps"]) for d in done.values()) - 3  # prefixes are replayed, not asked


class Recording(ModelPolicy):
    """Notes which endpoint answered each request, by route key; `after_reply(key, urls)` runs after each."""

    def __init__(self, policy: ModelPolicy, after_reply=None):
        super().__init__(policy.backend, policy.chat_format, policy.prompts, policy.generation)
        self.endpoints: dict[str, list[str]] = {}
        self.after_reply = after_reply

    async def act_one(self, episode):
        reply = await super().act_one(episode)
        key = episode.task.meta["route_key"]
        self.endpoints.setdefault(key, []).append(reply.meta["endpoint"])
        if self.after_reply:
            self.after_reply(key, self.endpoints[key])
        return reply


def test_sticky_routing_then_failover_when_a_replica_dies(hf_server, tiny_model_dir, vh_jobs, tmp_path):
    from conftest import start_server

    doomed, doomed_url = start_server(tiny_model_dir, tmp_path / "doomed.log")
    # each episode its own route key (as the N rollouts of one step record share one): three for each replica
    client = http_policy(tiny_model_dir, [hf_server, doomed_url]).backend.client
    keys = {url: [k for k in (f"r{i}" for i in range(100)) if client.endpoints[client._order(k)[0]].url == url][:3]
            for url in (hf_server, doomed_url)}
    jobs = [(replace(task, meta={**task.meta, "route_key": key}), prefix)
            for (task, prefix), key in zip(vh_jobs, [k for pair in zip(*keys.values()) for k in pair])]
    try:
        # both replicas healthy: every request of a route key goes to one replica, and both replicas work. Two
        # episodes at a time: a key's replica then never holds more than one other request, within the load bound
        # (with more, a key may spill to the idle replica by design: test_http_client's load-spill test)
        policy = Recording(http_policy(tiny_model_dir, [hf_server, doomed_url]))
        reference, _ = run_collecting(run_episodes_async, jobs, policy, max_steps=3, concurrency=2, env_workers=2)
        assert all(len(set(urls)) == 1 for urls in policy.endpoints.values())
        assert {u for urls in policy.endpoints.values() for u in urls} == {hf_server, doomed_url}

        # a replica dies right after answering an episode's first request: that episode goes on on the other one
        def kill_after_first_reply(key, urls):
            if urls == [doomed_url] and doomed.poll() is None:
                doomed.terminate()
                doomed.wait()

        policy = Recording(http_policy(tiny_model_dir, [hf_server, doomed_url]), kill_after_first_reply)
        policy.backend.client.retry = RetryPolicy(retries=3, backoff_s=0.05)
        done, stats = run_collecting(run_episodes_async, jobs, policy, max_steps=3, concurrency=2, env_workers=1)
        assert stats.failed == 0 and done == reference  # nothing lost; greedy: the same replies from the survivor
        assert doomed.poll() is not None
        moved = [urls for urls in policy.endpoints.values() if urls[0] == doomed_url and urls[-1] == hf_server]
        assert moved, "the episode that began on the dead replica finished on the other"
        client = policy.backend.client
        assert client.stats.failovers >= 1 and client.endpoints[1].errors >= 1
    finally:
        if doomed.poll() is None:
            doomed.terminate()
            doomed.wait()


def test_seeded_sampling_repeats(hf_server, tiny_model_dir, vh_jobs):
    """A task seed makes every request carry a seed derived from it and the step: the same rollouts again."""
    def sample(seed):
        jobs = [(replace(task, meta={**task.meta, "seed": seed}), prefix) for task, prefix in vh_jobs[::2]]
        done, _ = run_collecting(run_episodes_async, jobs, http_policy(tiny_model_dir, hf_server, temperature=1.0),
                                 max_steps=3, concurrency=3, env_workers=1)
        return {k: [s["text"] for s in d["steps"]] for k, d in done.items()}

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert derive_seed(7, "a|t0|expert|s0") == derive_seed(7, "a|t0|expert|s0") != derive_seed(7, "a|t0|expert|s1")


# ---- the MC stage over HTTP ---------------------------------------------------------------------------------

def env_workers_of(pid: int) -> list[int]:
    """The environment worker processes (multiprocessing spawn children) of `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the worker processes")
def test_mc_over_http_killed_midway_resumes_every_key_once(hf_server, tiny_model_dir, tmp_path):
    from eval_agent.records import judged
    from sampling.generate_steps import main as generate_steps
    from sampling.mc_rollouts import main as mc_rollouts

    expert = tmp_path / "expert.jsonl"
    rows = sorted((json.loads(line) for line in VH_TRAJECTORIES.read_text().splitlines()), key=lambda r: len(r["steps"]))
    expert.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    generate_steps(["--task", "virtualhome", "--kind", "expert", "--expert_data", str(expert), "--run_dir", str(tmp_path)])
    n = 3
    args = ["--task", "virtualhome", "--kind", "expert", "--n", str(n), "--model", str(tiny_model_dir),
            "--backend", "openai", "--run_dir", str(tmp_path), "--max_new_tokens", "8", "--max_steps", "6",
            "--concurrency", "2", "--env_workers", "2", "--seed", "3"]
    env = {**os.environ, "OPENAI_BASE_URL": hf_server}
    proc = subprocess.Popen([sys.executable, "-m", "sampling.mc_rollouts", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "sampling" / "mc" / "rollouts_expert.jsonl"
    records = [json.loads(line) for line in (tmp_path / "sampling" / "steps_expert.jsonl").read_text().splitlines()]
    records = [r for r in records if judged("expert", r["t"])]  # what MC rolls out (MIN_STEP)
    copied = sum(r["done"] for r in records) * n
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while proc.poll() is None and time.monotonic() < deadline:
        workers = env_workers_of(proc.pid) or workers
        if out.is_file() and len(out.read_text().splitlines()) >= copied + 2:
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(out.read_text().splitlines())
    assert copied + 2 <= written < len(records) * n, "the kill should land midway"
    assert len(workers) == 2
    deadline = time.monotonic() + 20
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(w) for w in workers), "environment workers outlived the killed stage"

    os.environ["OPENAI_BASE_URL"] = hf_server
    try:
        summary = mc_rollouts(args)
    finally:
        del os.environ["OPENAI_BASE_URL"]
    assert summary["expert"]["skipped_done"] > 0
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    expected = {rollout_key(r["key"], i) for r in records for i in range(n)}
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected
    for r in read_rollouts(out):
        assert r.seed == (None if r.from_record else derive_seed(3, r.key))


SLOW_RUN = """
import asyncio, sys
sys.path[:0] = {paths!r}
from eval_agent.async_runner import run_episodes_async
from helpers import CounterEnv, ScriptedPolicy, counter_task

class Slow(ScriptedPolicy):
    async def act_one(self, ep):
        await asyncio.sleep(1)
        return self.reply(ep)

if __name__ == "__main__":
    jobs = [counter_task(f"t{{i}}", goal=50) for i in range(40)]
    run_episodes_async(jobs, Slow({{j.key: ["Action: count 1"] * 60 for j in jobs}}), CounterEnv, lambda ep: None,
                       max_steps=60, concurrency=4, env_workers=2, progress=False, processes=2)
"""


def test_client_processes_and_their_workers_end_with_a_killed_run(tmp_path):
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN.format(paths=[str(REPO), str(REPO / "tests")]))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    deadline, clients, workers = time.monotonic() + 120, [], []
    while time.monotonic() < deadline and not (len(clients) == 2 and len(workers) == 2):
        clients = env_workers_of(proc.pid)  # the client processes are spawn children of the run
        workers = [w for c in clients for w in env_workers_of(c)]  # one environment worker each
        time.sleep(0.2)
    assert len(clients) == 2 and len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in clients + workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in clients + workers), "client processes or their workers outlived the run"
