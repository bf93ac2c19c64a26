"""What the report's parts share in how they show results (eval/report.py, eval/signals.py, eval/tables.py): the
environment, split and model names, the missing-cell mark, number format, LaTeX escaping, a figure saved atomically."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval_agent.store import staged

ENV_TITLES = {"virtualhome": "VirtualHome", "alfworld": "ALFWorld"}
# The split names eval.evaluate accepts for the two test splits.
SPLIT_NAMES = {"seen": "seen", "valid_seen": "seen", "dev": "seen",
               "unseen": "unseen", "valid_unseen": "unseen", "test": "unseen"}
OUR_LABELS = {"base": "Base model", "sft": "SFT", "steca": "STeCa"}
MISSING = "–"


@dataclass
class Row:
    method: str
    backbone: str
    source: str  # "ours" or "paper Table N"
    cells: list[float | None]  # in COLUMNS order
    average: float | None
    average_computed: bool = False  # a paper row whose Average the paper does not print: ours, from its cells


def mean_of(values: list[float | None]) -> float | None:
    """The paper's Average: the plain mean of the four columns, only when all four are there."""
    return sum(values) / len(values) if values and all(v is not None for v in values) else None


def label_order(label: str) -> tuple[int, str]:
    order = list(OUR_LABELS)
    return (order.index(label) if label in order else len(order), label)


def fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def latex_escape(text: str) -> str:
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--",
               "×": r"$\times$", "†": r"$^\dagger$"}
    return "".join(special.get(ch, ch) for ch in text)


def save_png(fig: Any, path: Path, dpi: int) -> None:
    """Save a matplotlib figure under a temp name and rename it, then free it."""
    import matplotlib.pyplot as plt

    with staged(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
