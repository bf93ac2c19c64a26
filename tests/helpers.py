"""Small checks several test modules share."""
from eval_agent.training import IGNORE


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive trained tokens (each label must equal its token)."""
    out, cur = [], []
    for tok, label in zip(ids, labels):
        if label != IGNORE:
            assert label == tok
            cur.append(tok)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])
