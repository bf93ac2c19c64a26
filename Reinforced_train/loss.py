"""The STeCa reinforced-training loss and the batches it reads.

    loss_i = w_i * ( -log sigma(beta * [(pi_c - pi_r) - (ref_c - ref_r)])  -  pi_c )      L = mean_i loss_i

pi_c, pi_r, ref_c, ref_r are log-probabilities summed over the assistant tokens of the chosen and rejected
continuations under the policy and the frozen reference (the original's `dpo_with_sft_loss`). At beta = 0 (the
paper) the first term is the constant log 2: without a reference model it is dropped, so no reference is loaded
and no rejected forward runs, with the same gradient. `token_mean` divides each row's NLL by its trained tokens;
the preference term always uses sums, as DPO does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eval_agent.training import IGNORE, PadCollator, trained_positions


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens, and how many there are (logits only where a
    row has one: `trained_positions`)."""
    keep = trained_positions(labels)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    targets = labels[:, keep + 1]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view_as(targets).sum(-1), (targets != IGNORE).sum(-1)


def _pad_to(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, width - t.shape[1]), value=value)


def _chosen_and_rejected(batch: dict[str, torch.Tensor], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Chosen rows then rejected rows in one batch (one forward per model, as the original)."""
    width = max(batch["input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    return tuple(
        torch.cat([_pad_to(batch[name], width, value), _pad_to(batch["rejected_" + name], width, value)])
        for name, value in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE))
    )


def steca_loss(model, batch: dict[str, torch.Tensor], beta: float = 0.0, ref_model=None,
               token_mean: bool = False, pad_id: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch loss (a mean over its rows) and metrics to log. `ref_model` None means the beta = 0 path."""
    if ref_model is None and beta != 0:
        raise ValueError("beta > 0 needs the reference model")
    weights = batch["weight"]
    rows = len(weights)
    if ref_model is None:
        logp_chosen, n_chosen = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        preference = torch.zeros_like(logp_chosen)
        metrics = {}
    else:
        both = _chosen_and_rejected(batch, pad_id)
        logp, n = sequence_logps(model, *both)
        with torch.no_grad():
            ref_logp, _ = sequence_logps(ref_model, *both)
        logp_chosen, logp_rejected, n_chosen = logp[:rows], logp[rows:], n[:rows]
        margin = (logp_chosen - logp_rejected) - (ref_logp[:rows] - ref_logp[rows:])
        preference = -F.logsigmoid(beta * margin)
        metrics = {"margin": margin.mean().item(), "preference_accuracy": (margin > 0).float().mean().item()}
    nll = -logp_chosen / n_chosen.clamp(min=1) if token_mean else -logp_chosen
    loss = (weights * (preference + nll)).mean()
    metrics |= {"nll": nll.mean().item(), "chosen_tokens": n_chosen.float().mean().item()}
    return loss, metrics


@dataclass
class WeightedCollator:
    """Pads chosen (and rejected) token rows and carries each row's weight (the data's `reward`)."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pad = PadCollator(self.pad_id)
        batch = pad(rows)
        batch["weight"] = torch.tensor([float(r["weight"]) for r in rows])
        if "rejected_input_ids" in rows[0]:
            rejected = pad([{"input_ids": r["rejected_input_ids"], "labels": r["rejected_labels"]} for r in rows])
            batch |= {"rejected_" + name: t for name, t in rejected.items()}
        return batch
