"""The Python side of scripts/gpu_smoke.sh: the smoke model, the reinforced-training rows, waiting for a
server, and the final check with its figures (which also reloads the SFT folders and generates from them).

    python scripts/gpu_smoke.py size --tokenizer models/SmolLM2-135M-Instruct --work WORK --device cuda [--size 1b]
    python scripts/gpu_smoke.py model --tokenizer models/SmolLM2-135M-Instruct --size 0.5b --out WORK/base
    python scripts/gpu_smoke.py rows --run_dir RUN
    python scripts/gpu_smoke.py wait-url FILE --pid PID [--timeout 180]
    python scripts/gpu_smoke.py check WORK --device cuda [--peak_tflops 989]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from eval_agent.layout import RunDir  # noqa: E402  (after the path is set)
from eval_agent.records import judged  # noqa: E402
from eval_agent.smollm2 import LLAMA_SIZES  # noqa: E402

# Dense bf16 peak of one GPU (no sparsity), by a piece of its name; --peak_tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


# The default model size on a GPU, then the smaller ones to fall back on when its files do not fit the disk.
GPU_SIZES = ("0.5b", "tiny")


def size_parameters(tokenizer_dir: str, size: str) -> int:
    """The parameters of the smoke model of `size` (built on the meta device: no memory, no time)."""
    import torch
    from transformers import AutoTokenizer

    from eval_agent.smollm2 import random_llama

    with torch.device("meta"):
        model = random_llama(AutoTokenizer.from_pretrained(tokenizer_dir), size)
    return sum(p.numel() for p in model.parameters())  # tied weights once, as the checkpoints hold them


def smoke_bytes(parameters: int, extra: int, device: str, zero3: bool) -> int:
    """The most the smoke's folders hold at once: the base model (fp32), SFT with its two kept checkpoints and
    one set aside for the resume, the ZeRO-3 SFT and both reinforced trainings (their final models, and the
    largest checkpoint while one of them trains)."""
    from eval_agent.disk import TrainingDisk

    final = 2 if device == "cuda" else 4
    plain = TrainingDisk(parameters, extra, final)
    sharded = TrainingDisk(parameters, extra, final, "zero3") if zero3 else plain
    base = 4 * parameters + extra
    sft = 3 * plain.checkpoint() + plain.final()
    later = [sharded.stage(1)] * (2 if zero3 else 1) + [plain.stage(1)]  # SFT ZeRO-3, beta 0, beta 0.1
    return base + sft + sum(left for left, _ in later) + max(peak - left for left, peak in later)


def pick_size(tokenizer_dir: str, work: str, device: str, zero3: bool, wanted: str | None) -> str:
    """`wanted` if its files fit the work folder's free disk, else an error; without one the first default size
    (GPU: 0.5b, then tiny; CPU: tiny) that fits."""
    from eval_agent.disk import tokenizer_bytes

    free = shutil.disk_usage(work).free
    candidates = [wanted] if wanted else (GPU_SIZES if device == "cuda" else ("tiny",))
    needs = {}
    for size in candidates:
        needs[size] = smoke_bytes(size_parameters(tokenizer_dir, size), tokenizer_bytes(tokenizer_dir), device, zero3)
        if needs[size] <= free:
            if size != candidates[0]:
                print(f"[gpu_smoke] the {candidates[0]} model needs {needs[candidates[0]] / 1e9:.1f} GB of disk, "
                      f"{free / 1e9:.1f} GB free under {work}: using {size}", file=sys.stderr)
            return size
    raise SystemExit(f"error: the smoke test's files need {min(needs.values()) / 1e9:.1f} GB of disk "
                     f"({', '.join(f'{k}: {v / 1e9:.1f} GB' for k, v in needs.items())}), {free / 1e9:.1f} GB free "
                     f"under {work}: free some, or set SMOKE_DIR to a larger disk" + ("" if wanted is None else
                                                                                      " or SIZE to a smaller model"))


def make_model(tokenizer_dir: str, size: str, out: str) -> Path:
    """The smoke model: a randomly initialised fp32 Llama of `size` with the tokenizer of `tokenizer_dir`."""
    from transformers import AutoConfig

    from eval_agent.smollm2 import make_tiny_model

    path = make_tiny_model(tokenizer_dir, out, size=size)
    config = AutoConfig.from_pretrained(path)
    print(f"{size} Llama ({config.num_hidden_layers} layers, {config.hidden_size} wide) -> {path}")
    return path


def reinforced_rows(run: RunDir) -> int:
    """The run's training set in data_collection's format from its expert trajectories (chosen) and the policy's
    own greedy episodes from step 0 (rejected): the smoke skips data collection (its embedding model is ~90 MB)."""
    from eval_agent.expert_data import load_expert_data
    from eval_agent.store import read_jsonl
    from eval_agent.trajectory import Trajectory

    expert, steps, out = run.expert_data("train"), run.steps("explore"), run.train_set
    explored = {r["expert_key"]: Trajectory.from_dict(r["trajectory"]) for r in read_jsonl(steps)
                if r["t"] == 0 and r.get("trajectory") and r["trajectory"]["steps"]}
    rows = []
    for traj in load_expert_data(expert):
        policy = explored.get(traj.meta.get("key"))
        if policy is None:
            continue
        instruction = traj.meta.get("instruction") or "Solve the task."
        chosen, rejected = traj.to_conversation(instruction), policy.to_conversation(instruction)
        rows.append({"key": traj.meta["key"], "prompt": chosen[:3], "chosen": chosen[3:], "rejected": rejected[3:],
                     "reward": 1.0})
    if not rows:
        raise SystemExit(f"error: no expert trajectory of {expert} has an explored episode in {steps}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} reinforced-training rows -> {out}")
    return len(rows)


def wait_url(path: str, pid: int, timeout: float) -> str:
    """The base URL serve_hf prints ("serving ... URL") once /health answers; fails if the server exits."""
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise SystemExit(f"error: the server (pid {pid}) exited during startup") from None
        lines = [line for line in Path(path).read_text().splitlines() if line.startswith("serving ")] \
            if Path(path).exists() else []
        url = url or (lines[0].split()[-1] if lines else None)
        if url:
            try:
                with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                pass
        time.sleep(0.2)  # poll interval
    raise SystemExit(f"error: no healthy server within {timeout:.0f} s")


def generate(model_dir: str, dtype: str, tokens: int = 8) -> str:
    """Reload a trained folder as the next stage would and generate greedily in its recorded chat format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval_agent.chat_format import ChatFormat, resolve_chat_format

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device).eval()
    if str(model.dtype).removeprefix("torch.") != dtype:
        raise SystemExit(f"error: {model_dir} loads as {model.dtype}, expected {dtype}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    name = resolve_chat_format(model_dir, None)
    prompt = ChatFormat(name, tokenizer if name == "template" else None).render(
        [{"role": "user", "content": "Your task is to: put a mug in the desk."}])
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    if out.shape[1] != ids.shape[1] + tokens:
        raise SystemExit(f"error: generated {out.shape[1] - ids.shape[1]} tokens, expected {tokens}")
    text = tokenizer.decode(out[0, ids.shape[1]:])
    print(f"{model_dir}: {model.dtype} on {device}, chat format {name}, generated {tokens} tokens: {text!r}")
    return text


def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def check(out: Path, device: str, given_peak: float | None) -> dict:
    """Every stage's output is there and counted right; the training figures (peak GPU memory, tokens/s,
    model FLOPs utilisation = 6 x parameters x tokens/s over the GPUs' bf16 peak) go to OUT/figures.json."""
    import torch

    plan = json.loads((out / "plan.json").read_text())
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_tflops(name, given_peak) if device == "cuda" else None
    problems, training = [], []
    for stage in plan["training"]:
        folder = getattr(RunDir(out / stage["run"]), stage["model"])
        path = folder / "train_summary.json"
        if not path.is_file():
            problems.append(f"{stage['name']}: no {path}")
            continue
        s = json.loads(path.read_text())
        tflops = 6 * s["parameters"] * s["tokens_per_s"] / 1e12
        row = {"stage": stage["name"], "launcher": stage["launcher"], "optimizer_steps": s["optimizer_steps"],
               "train_seconds": s["train_seconds"], "tokens_per_s": s["tokens_per_s"], "peak_gpu_mib": s["peak_gpu_mib"],
               "model_tflops": round(tflops, 2),
               "mfu": round(tflops / (peak * s["world_size"]), 4) if peak else None,
               "saved_dtype": s["saved_dtype"], "precision": s["precision"], "resumed_from": s["resumed_from"],
               "chat_format": s["chat_format"]}
        training.append(row)
        if s["saved_dtype"] != plan["saved_dtype"]:
            problems.append(f"{stage['name']}: saved {s['saved_dtype']}, expected {plan['saved_dtype']}")
        if stage.get("resumed") and not s["resumed_from"]:
            problems.append(f"{stage['name']}: did not resume")
        elif stage.get("resumed") and s["resumed_from"].endswith(f"-{s['optimizer_steps']}"):
            problems.append(f"{stage['name']}: resumed from its last checkpoint (nothing trained after the resume)")
        if s["chat_format"] != "llama-2":
            problems.append(f"{stage['name']}: chat format {s['chat_format']}")
        if stage.get("beta") and not any("margin" in h for h in s["log_history"]):
            problems.append(f"{stage['name']}: beta > 0 logged no preference margin")
        if stage.get("generate"):
            generate(str(folder), plan["saved_dtype"])  # raises if it does not reload or generate
    counts, generation = {}, {}
    for run in plan["sampling"]:
        root = RunDir(out / run["run"])
        got = {}
        for kind in ("expert", "explore"):
            steps = root.steps(kind)
            records = [json.loads(line) for line in steps.open()] if steps.is_file() else []
            got[f"steps_{kind}"] = len(records)
            if kind == "explore":
                got["judged_explore"] = sum(judged(kind, r["t"]) for r in records)
        if run.get("mc"):  # MC rolls out the records data collection judges (eval_agent.records.MIN_STEP)
            rollouts = root.rollouts("explore")
            got["rollouts_explore"] = sum(1 for _ in rollouts.open()) if rollouts.is_file() else 0
            if got["rollouts_explore"] != got["judged_explore"] * plan["n"]:
                problems.append(f"{run['name']}: {got['rollouts_explore']} rollouts for {got['judged_explore']} judged "
                                f"records x {plan['n']}")
        if run.get("eval"):
            summary = root.eval_summary(run["eval"], "seen")
            data = json.loads(summary.read_text()) if summary.is_file() else {}
            got["eval_tasks"] = data.get("num_tasks", 0)
            stats = data.get("run", {})
            generation[run["name"]] = round(stats["generated_tokens"] / stats["seconds"], 1) if stats.get("seconds") else None
            if got["eval_tasks"] != plan["eval_limit"]:
                problems.append(f"{run['name']}: evaluated {got['eval_tasks']} tasks, expected {plan['eval_limit']}")
        if not got["steps_explore"] or (run.get("expert", True) and not got["steps_expert"]):
            problems.append(f"{run['name']}: no step records ({got})")
        counts[run["name"]] = got
    figures = {"device": name, "peak_bf16_tflops": peak, "training": training, "sampling": counts,
               "generation_tokens_per_s": generation, "skipped": plan.get("skipped", []), "problems": problems}
    (out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"{'stage':<22}{'launcher':<10}{'steps':>6}{'seconds':>9}{'tokens/s':>11}{'peak GPU MiB':>14}{'MFU':>8}")
    for r in training:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = r["peak_gpu_mib"] if r["peak_gpu_mib"] is not None else "n/a"
        print(f"{r['stage']:<22}{r['launcher']:<10}{r['optimizer_steps']:>6}{r['train_seconds']:>9}"
              f"{r['tokens_per_s']:>11}{mem:>14}{mfu:>8}")
    for run, got in counts.items():
        rate = f"; evaluation generated {generation[run]} tokens/s" if generation.get(run) else ""
        print(f"{run}: " + ", ".join(f"{k} {v}" for k, v in got.items()) + rate)
    for reason in plan.get("skipped", []):
        print(f"skipped: {reason}")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    return figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    z = sub.add_parser("size")
    z.add_argument("--tokenizer", required=True)
    z.add_argument("--work", required=True)
    z.add_argument("--device", choices=("cuda", "cpu"), required=True)
    z.add_argument("--zero3", choices=("0", "1"), default="0")
    z.add_argument("--size", choices=sorted(LLAMA_SIZES))
    m = sub.add_parser("model")
    m.add_argument("--tokenizer", required=True)
    m.add_argument("--size", choices=sorted(LLAMA_SIZES), default="0.5b")
    m.add_argument("--out", required=True)
    r = sub.add_parser("rows")
    r.add_argument("--run_dir", required=True)
    w = sub.add_parser("wait-url")
    w.add_argument("file")
    w.add_argument("--pid", type=int, required=True)
    w.add_argument("--timeout", type=float, default=180)
    c = sub.add_parser("check")
    c.add_argument("out")
    c.add_argument("--device", choices=("cuda", "cpu"), required=True)
    c.add_argument("--peak_tflops", type=float, help="bf16 peak of one GPU; default: by the GPU's name")
    a = p.parse_args(argv)
    if a.cmd == "size":
        print(pick_size(a.tokenizer, a.work, a.device, a.zero3 == "1", a.size))
    elif a.cmd == "model":
        make_model(a.tokenizer, a.size, a.out)
    elif a.cmd == "rows":
        reinforced_rows(RunDir(a.run_dir))
    elif a.cmd == "wait-url":
        print(wait_url(a.file, a.pid, a.timeout))
    else:
        check(Path(a.out), a.device, a.peak_tflops)


if __name__ == "__main__":
    main()
