"""The paper's published results, transcribed from shared/reference/paper.md §7 (itself from two reading
reports of the ACL PDF; Wang et al., Findings of ACL 2025). Numbers are the paper's: average final
reward ×100 on the seen / unseen test splits, greedy decoding, one run each.

Only what paper.md recovered is here; a cell it marks `?` is None. Rows paper.md says were not
recovered (GPT-3.5-Turbo, GPT-4, and the unconfirmed RFT, PPO, ETO) are left out rather than guessed.
`avg` is the Average the paper prints (None where it prints none); the paper's Average is the plain
mean of the four columns (IPR: 68.625 -> 68.6; STeCa: 70.9), which tests/test_report.py checks.
"""
from __future__ import annotations

from dataclasses import dataclass

# The paper's Table 1 column order: (environment, split).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("virtualhome", "seen"), ("virtualhome", "unseen"), ("alfworld", "seen"), ("alfworld", "unseen"),
)


@dataclass(frozen=True)
class PaperRow:
    table: str  # where the paper prints it, e.g. "Table 1"
    method: str
    backbone: str
    cells: tuple[float | None, float | None, float | None, float | None]  # in COLUMNS order
    avg: float | None = None


_NONE4 = (None, None, None, None)
LLAMA2 = "Llama-2-7B-Chat"

PAPER_ROWS: tuple[PaperRow, ...] = (
    # Table 1: main results, Llama-2-7B-Chat.
    PaperRow("Table 1", "SFT", LLAMA2, _NONE4, 63.3),
    PaperRow("Table 1", "E2CL", LLAMA2, _NONE4, 68.2),
    PaperRow("Table 1", "IPR", LLAMA2, (67.6, 61.9, 70.3, 74.7), 68.6),
    PaperRow("Table 1", "STeCa w/ SFT+DPO", LLAMA2, _NONE4, 70.0),
    PaperRow("Table 1", "STeCa w/o RT", LLAMA2, _NONE4, 69.6),
    PaperRow("Table 1", "STeCa", LLAMA2, (69.6, 63.6, 74.3, 76.1), 70.9),
    # Table 2: ALFWorld only, other backbones.
    PaperRow("Table 2", "SFT", "Mistral-7B", (None, None, None, 58.2)),
    PaperRow("Table 2", "IPR", "Mistral-7B", (None, None, 71.4, 73.9)),
    PaperRow("Table 2", "STeCa", "Mistral-7B", (None, None, 73.3, 75.3)),
    PaperRow("Table 2", "SFT", "Llama-3-8B-Instruct", _NONE4),
    PaperRow("Table 2", "IPR", "Llama-3-8B-Instruct", (None, None, 72.3, 75.8)),
    PaperRow("Table 2", "STeCa", "Llama-3-8B-Instruct", (None, None, 74.9, 77.0)),
    # Table 3: reflection and step-reward sources (its first row is Table 1's STeCa).
    PaperRow("Table 3", "STeCa, reflection by the agent itself", LLAMA2, (66.0, 61.1, 71.4, 73.3)),
    PaperRow("Table 3", "STeCa, step reward by GPT-4o", LLAMA2, (69.1, 62.5, 74.1, 74.9)),
    PaperRow("Table 3", "STeCa, step reward by a reward model", LLAMA2, (68.2, 61.8, 74.0, 73.3)),
    # Table 6: loss ablation (only two cells recovered).
    PaperRow("Table 6", "STeCa w/o exploration loss", LLAMA2, (None, 60.5, None, 71.2)),
)

# Table 9: VirtualHome by the expert trajectory's length (average final reward ×100); group sizes not reported.
LENGTH_BINS: tuple[str, ...] = ("<= 7", "7-13", "> 13")  # expert steps: <= 7, 8..13, >= 14
PAPER_BY_LENGTH: dict[str, tuple[float | None, float | None, float | None]] = {
    "SFT": (76.2, None, None),
    "IPR": (None, 59.4, 42.2),
    "STeCa": (76.2, 60.0, 48.9),
}
