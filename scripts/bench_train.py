"""Peak memory and time per training step of our beta = 0 path against the original scheme, side by side.

- ours: the policy only, one forward and backward over the chosen rows (`steca_loss` with no reference);
- original: the policy plus a frozen reference model, chosen and rejected rows concatenated into one forward
  through each (the reference under no_grad), the same loss at beta = 0 (what trl's DPO trainer ran).
Both take the same rows through the real data path (`Reinforced_train.data`) and a full AdamW step, with the
training stages' precision: fp32 weights and optimizer, bf16 autocast on a GPU (--precision), the frozen
reference in bf16 then. Each scheme runs in its own subprocess so its peak is its own: on a GPU
torch.cuda.max_memory_allocated, on the CPU the process's max RSS (getrusage; it includes the Python and torch
runtime both schemes share). A scheme that runs out of GPU memory is reported as such.

--size builds a randomly initialised Llama of that size (eval_agent.smollm2.LLAMA_SIZES, up to Llama-2-7B's
shape) with --model's tokenizer instead of loading --model's weights: the way to find the largest model each
scheme fits on one GPU (on an 80 GB H100 with full fp32 AdamW state: 3b for both, 7b for neither).

    .venv/bin/python scripts/bench_train.py --model models/SmolLM2-135M-Instruct --tokens 1024
    python scripts/bench_train.py --size 3b --tokens 2048 --activation_checkpointing     # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SCHEMES = ("ours", "original")
from eval_agent.smollm2 import LLAMA_SIZES  # noqa: E402  (after the path is set)


def synthetic_rows(rows: int, tokens: int) -> list[dict]:
    """Calibration-like rows whose chosen and rejected continuations are about `tokens` tokens long
    (a step, its thought, action and observation, is ~50 SmolLM2 tokens)."""
    def steps(prefix: str) -> list[dict]:
        out = []
        for i in range(max(1, tokens // 50)):
            out += [{"from": "gpt", "value": f"Thought: {prefix} I check place {i}.\nAction: go to cabinet {i}"},
                    {"from": "human", "value": f"Observation: On the cabinet {i}, you see a cup {i} and a plate."}]
        return out[:-1]

    prompt = [{"from": "human", "value": "Interact with a household to solve a task."}, {"from": "gpt", "value": "OK"},
              {"from": "human", "value": "You are in the middle of a room.\n\nYour task is to: put a mug in desk."}]
    return [{"key": str(i), "prompt": prompt, "chosen": steps("Next,"), "rejected": steps("Maybe"), "reward": 1.0}
            for i in range(rows)]


def run_scheme(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval_agent.chat_format import ChatFormat, resolve_chat_format
    from eval_agent.smollm2 import random_llama
    from eval_agent.training import check_precision, pad_token_id
    from Reinforced_train.data import encode_rows, parse_row
    from Reinforced_train.loss import WeightedCollator, steca_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    original = args.scheme == "original"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    fmt = resolve_chat_format(args.model, None)
    rows = [parse_row(r, f"row {i}", need_rejected=True) for i, r in enumerate(synthetic_rows(args.rows, args.tokens))]
    examples, stats = encode_rows(rows, ChatFormat(fmt, tokenizer if fmt == "template" else None), tokenizer,
                                  args.max_len, with_rejected=original)
    pad_id = pad_token_id(tokenizer)
    batch = {k: v.to(device) for k, v in WeightedCollator(pad_id)(examples).items()}
    bf16 = check_precision(args.precision, use_cpu=device.type == "cpu")

    def load(dtype: torch.dtype):  # the same weights for the policy and the reference
        model = (random_llama(tokenizer, args.size) if args.size
                 else AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32))
        return model.to(device=device, dtype=dtype)

    try:
        policy = load(torch.float32)
        if args.activation_checkpointing:
            policy.gradient_checkpointing_enable()
        ref = load(torch.bfloat16 if bf16 else torch.float32).eval().requires_grad_(False) if original else None
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for step in range(args.steps + 1):  # the first step warms up (allocator, optimizer state) and is not timed
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, _ = steca_loss(policy, batch, beta=0.0, ref_model=ref, pad_id=pad_id)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step:
                times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        return {"scheme": args.scheme, "device": str(device), "oom": True, "parameters": None}
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
    return {"scheme": args.scheme, "device": str(device), "oom": False, "precision": "bf16" if bf16 else "fp32",
            "parameters": sum(p.numel() for p in policy.parameters()), "peak_mib": round(peak / 2**20, 1),
            "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "max RSS",
            "s_per_step": round(sum(times) / len(times), 3), "loss": loss.item(),
            "chosen_tokens": stats["tokens"], "rows": stats["rows_out"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--rows", type=int, default=1, help="rows per micro-batch (the paper: 1)")
    p.add_argument("--tokens", type=int, default=1024, help="about this many tokens of chosen (and of rejected)")
    p.add_argument("--max_len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--size", choices=sorted(LLAMA_SIZES), help="a random Llama of this size (--model's tokenizer)")
    p.add_argument("--precision", default="auto", help="auto (bf16 autocast on a GPU) | bf16 | fp32; weights stay fp32")
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--scheme", choices=SCHEMES, help=argparse.SUPPRESS)  # set for the per-scheme subprocess
    args = p.parse_args()
    if args.scheme:
        print(json.dumps(run_scheme(args)))
        return
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    passthrough = [*sys.argv[1:], "--device", args.device]  # the last --device wins
    for scheme in SCHEMES:
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--scheme", scheme], capture_output=True,
                              text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode:
            raise SystemExit(f"error: scheme {scheme} failed:\n{proc.stderr[-3000:]}")
        results[scheme] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[scheme]
        if r["oom"]:
            print(f"{scheme:9s} out of GPU memory ({args.size or args.model}, {args.device})")
            continue
        print(f"{scheme:9s} peak {r['peak_mib']:9.1f} MiB ({r['peak_kind']})  {r['s_per_step']:7.3f} s/step  "
              f"loss {r['loss']:.2f}  ({r['rows']} rows, {r['chosen_tokens']} chosen tokens, "
              f"{r['parameters'] / 1e6:.1f}M parameters, {r['precision']})")
    ours, orig = results["ours"], results["original"]
    if ours["oom"] or orig["oom"]:
        return
    print(f"original / ours: peak memory x{orig['peak_mib'] / ours['peak_mib']:.2f}, "
          f"time per step x{orig['s_per_step'] / ours['s_per_step']:.2f}  ({args.size or args.model}, {args.device})")
    # the same gradient, so after the same steps the losses differ by the original's constant log 2
    print(f"loss original - ours after {args.steps + 1} steps: {orig['loss'] - ours['loss']:.4f} (log 2 = 0.6931)")


if __name__ == "__main__":
    main()
