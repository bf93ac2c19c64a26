"""The stage's two figures (matplotlib, Agg) and the numbers behind them (kept in the summary, so
they can be checked without looking at a picture):
- the paper's Figure 3 analog: mean Monte-Carlo step reward along the normalized expert-trajectory
  position t / (T - 1), expert steps and explored steps at the same positions;
- where deviations occur: considered and deviated explored steps per step index t.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def position(t: int, length: int) -> float:
    """Step t of a T-step trajectory on [0, 1] (a one-step trajectory sits at 1)."""
    return t / (length - 1) if length > 1 else 1.0


def reward_curve(points: list[tuple[float, float]], bins: int) -> dict[str, list]:
    """Mean reward and count per equal-width position bin (empty bins: mean None)."""
    sums, counts = [0.0] * bins, [0] * bins
    for pos, reward in points:
        b = min(int(pos * bins), bins - 1)
        sums[b] += reward
        counts[b] += 1
    return {"bin_centers": [(b + 0.5) / bins for b in range(bins)],
            "mean": [s / c if c else None for s, c in zip(sums, counts)], "count": counts}


def deviations_by_step(rows: list[dict[str, Any]]) -> dict[int, dict[str, int]]:
    """Per step index t: explored steps judged (not skipped) and deviated."""
    out: dict[int, dict[str, int]] = defaultdict(lambda: {"considered": 0, "deviated": 0})
    for row in rows:
        if row["skip"] is None:
            out[row["t"]]["considered"] += 1
            out[row["t"]]["deviated"] += row["deviated"]
    return dict(sorted(out.items()))


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6, 4), dpi=100)


def plot_step_rewards(curves: dict[str, dict[str, list]], out: Path) -> None:
    plt, fig, ax = _figure()
    for name, curve in curves.items():
        xs = [x for x, m in zip(curve["bin_centers"], curve["mean"]) if m is not None]
        ys = [m for m in curve["mean"] if m is not None]
        ax.plot(xs, ys, marker="o", label=f"{name} steps")
    ax.set(xlabel="normalized position in the expert trajectory  t / (T-1)", ylabel="mean MC step reward",
           ylim=(-0.05, 1.05), title="Step reward along the expert trajectory")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def plot_deviations(by_step: dict[int, dict[str, int]], out: Path) -> None:
    plt, fig, ax = _figure()
    ts = list(by_step)
    ax.bar([t - 0.2 for t in ts], [by_step[t]["considered"] for t in ts], width=0.4, label="considered")
    ax.bar([t + 0.2 for t in ts], [by_step[t]["deviated"] for t in ts], width=0.4, label="deviated")
    ax.set(xlabel="step index t", ylabel="explored steps", title="Where deviations occur")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
