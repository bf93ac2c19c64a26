"""nDTW weighting: each distinct action embedded once, in batches, and cached (data_collection)
against one embedding call per compared action pair (the original's scheme), on the same rows with
the same encoder, measured side by side in one run. Both must give the same deviations.

Rows: a training file of the stage (train.jsonl, final_data_rft_train.json, ...) or, with
--expert_data, pairs of consecutive expert trajectories (chosen = one, rejected = the next).

    .venv/bin/python scripts/bench_ndtw.py --expert_data outputs/alfworld/expert/train/trajectories.jsonl --limit 20
    .venv/bin/python scripts/bench_ndtw.py --rows outputs/alfworld/data_collection/train.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from data_collection.datasets import actions
from data_collection.embeddings import EMBEDDERS, ActionEmbeddings, make_embedder
from data_collection.ndtw import action_deviation, ndtw
from eval_agent.expert_data import load_expert_data
from eval_agent.store import read_jsonl


def load_pairs(args: argparse.Namespace) -> list[tuple[list[str | None], list[str | None]]]:
    """(chosen actions, rejected actions) per row, rows with an empty side left out."""
    if args.rows:
        path = Path(args.rows)
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if text.lstrip().startswith("[") else list(read_jsonl(path, required=("chosen", "rejected")))
        pairs = [(actions(r["chosen"]), actions(r["rejected"])) for r in rows]
    else:
        trajs = load_expert_data(args.expert_data)
        pairs = [(a.actions, b.actions) for a, b in zip(trajs, trajs[1:] + trajs[:1])]
    return [(x, y) for x, y in pairs if x and y][: args.limit]


def per_pair(embedder, xs: list[str | None], ys: list[str | None]) -> float:
    """The original: D[i][j] from one embedding call on the two strings of each pair."""
    cost = np.ones((len(xs), len(ys)))
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            if x is not None and y is not None:
                a, b = embedder.embed([x, y]).astype(np.float64)
                cost[i, j] = 1.0 - float(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0))
    return ndtw(cost)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--rows", help="a training file: JSONL rows or a JSON list with chosen/rejected turns")
    src.add_argument("--expert_data", help="expert trajectories: consecutive ones are paired")
    p.add_argument("--limit", type=int, default=20, help="rows compared")
    p.add_argument("--embedder", choices=EMBEDDERS, default="minilm")
    p.add_argument("--embedder_path")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    pairs = load_pairs(args)
    if not pairs:
        raise SystemExit("error: no row with actions on both sides")
    embedder = make_embedder(args.embedder, args.embedder_path, args.device)
    embedder.embed(["warm up"])  # first-call costs out of both timings

    t0 = time.perf_counter()
    cache = ActionEmbeddings(embedder)
    cache.add(a for x, y in pairs for a in x + y)
    cached = [action_deviation(cache, x, y) for x, y in pairs]
    t_cached = time.perf_counter() - t0

    t0 = time.perf_counter()
    original = [per_pair(embedder, x, y) for x, y in pairs]
    t_original = time.perf_counter() - t0

    diff = max(abs(a - b) for a, b in zip(cached, original))
    n_pairs = sum(len(x) * len(y) for x, y in pairs)
    result = {"rows": len(pairs), "action_pairs": n_pairs, "distinct_actions": len(cache.vectors),
              "cached_embed_calls": cache.calls, "original_embed_calls": sum(x is not None and y is not None
                                                                             for xs, ys in pairs for x in xs for y in ys),
              "cached_s": round(t_cached, 3), "original_s": round(t_original, 3),
              "speedup": round(t_original / t_cached, 1), "max_abs_deviation_diff": diff}
    print(json.dumps(result, indent=2))
    if diff > 1e-4:
        raise SystemExit(f"error: the two schemes disagree by {diff:.2e}")


if __name__ == "__main__":
    main()
