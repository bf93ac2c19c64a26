"""Normalized dynamic time warping between two action sequences (the paper's trajectory deviation distance)
and the training weights built from it.

    D[i][j] = 1 - cos(e(x_i), e(y_j))
    C[i][j] = D[i][j] + min(C[i-1][j], C[i][j-1], C[i-1][j-1])   (first row / column: running sums)
    nDTW    = C[n-1][m-1] / sqrt(n^2 + m^2)

A distance (no exp). An empty sequence has no deviation (None).
"""
from __future__ import annotations

import math

import numpy as np

from data_collection.embeddings import ActionEmbeddings


def ndtw(cost: np.ndarray) -> float:
    """nDTW of an n x m local-cost matrix (n, m >= 1)."""
    n, m = cost.shape
    acc = np.empty((n, m))
    for i in range(n):
        for j in range(m):
            if i == 0 and j == 0:
                best = 0.0
            elif i == 0:
                best = acc[0, j - 1]
            elif j == 0:
                best = acc[i - 1, 0]
            else:
                best = min(acc[i - 1, j], acc[i, j - 1], acc[i - 1, j - 1])
            acc[i, j] = cost[i, j] + best
    return float(acc[n - 1, m - 1] / math.sqrt(n * n + m * m))


def action_deviation(embeddings: ActionEmbeddings, xs: list[str | None], ys: list[str | None]) -> float | None:
    """nDTW of two action sequences under 1 - cosine similarity; None when either is empty."""
    if not xs or not ys:
        return None
    return ndtw(embeddings.distances(xs, ys))


def weight(deviation: float, k: float, sign: int) -> float:
    """The row's reward: 1 + k * nDTW for calibrated / expert rows (sign +1), 1 - k * nDTW for
    explored successes (sign -1)."""
    return 1.0 + sign * k * deviation
