"""The DPO objective on a tensor-parallel model: sequence log-probabilities, losses, rewards, metrics.

Direct Preference Optimization (Rafailov et al. 2023) trains on pairs of responses to one prompt.
Per response it needs one number, the sum over its tokens of log p(token | prefix), under the
policy (what trains) and under the reference (the model before training). `sequence_logps`
computes it from each tensor-parallel rank's vocabulary slice of the logits, never gathered
(llama/tuning/loss.py: fairscale's vocab_parallel_cross_entropy per token, chunked and recomputed
in backward as train.chunked_cross_entropy does), so a pair costs what two SFT examples cost.

The losses are TRL 1.16's DPOTrainer's (trl/trainer/dpo_trainer.py, `_compute_loss`, with its
defaults: f_divergence_type reverse_kl, no ld_alpha, no WPO weighting), term for term:

- sigmoid: -log sigmoid(beta * delta), delta = (policy - reference)(chosen) - (policy - reference)(rejected).
  With label_smoothing eps it is conservative DPO (Mitchell's cDPO note, eq. 3):
  -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta). TRL 1.16's "sigmoid" ignores
  label_smoothing (it moved to "robust", "exo_pair" and "aot"); the expression used here is the one
  TRL's "aot" loss applies after sorting, and the one TRL's sigmoid loss had before 1.0.
- ipo (Azar et al. 2023, eq. 17): (delta_c / n_c - delta_r / n_r - 1 / (2 beta))^2 with each
  response's log-ratio divided by its number of response tokens n (at least 1), as TRL does (it
  says the IPO authors confirmed this length normalisation). label_smoothing is refused.

Rewards are beta * (policy - reference) summed log-probabilities, without normalisation, for both
losses; metrics carry TRL's names and are means over pairs, every pair weighted equally.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama.errors import UserError
from llama.tuning.data import IGNORE_INDEX
from llama.tuning.loss import chunk_token_losses

LOSSES = ("sigmoid", "ipo")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
"""TRL DPOTrainer's metric names; evaluation records prefix them with "eval_"."""


@dataclass(frozen=True)
class DPOConfig:
    """The preference objective's settings, checked when made (a UserError names the bad one)."""

    loss: str = "sigmoid"
    """"sigmoid" (DPO, Rafailov et al.; conservative DPO with label_smoothing) or "ipo" (Azar et al.)."""
    beta: float = 0.1
    """How far the policy may move from the reference: larger keeps it closer. For IPO, the tau of its paper."""
    label_smoothing: float = 0.0
    """Conservative DPO: the probability, in [0, 0.5), that a pair's preference label is wrong (sigmoid only)."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UserError(f"unknown DPO loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not (math.isfinite(self.beta) and self.beta > 0):
            raise UserError(f"beta {self.beta!r} must be a finite number above 0 (0.1 is usual; larger stays closer to the reference)")
        smoothing = self.label_smoothing
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 0.5:
            raise UserError(f"label_smoothing {smoothing!r} must be in [0, 0.5): the probability that a preference label is flipped")
        if smoothing and self.loss != "sigmoid":
            raise UserError(f"label_smoothing is conservative DPO, a sigmoid-loss option; the {self.loss} loss does not take it: "
                            f"leave it at 0 or use the sigmoid loss")


def sequence_logps(output: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Per row of labels [rows, T]: the sum over its labelled positions of log p(label | prefix), float32 [rows].

    `output` is the model's column-parallel vocabulary head and `hidden` its final-norm states
    [rows, T, dim]; labels follow HF's convention (aligned with the inputs, position t predicts
    labels[t + 1]). Only labelled positions are projected, `chunk_size` at a time, each chunk
    recomputed in backward; under tensor parallelism each rank uses only its vocabulary slice.
    Gradients reach whatever trains (the hidden states, the head). Every tensor-parallel rank gets
    the same result: the per-token values are all-reduced, then summed per row in one fixed order.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h, t = hidden[:, :-1][keep], targets[keep]  # [N, dim], [N]
    pieces = []
    for start in range(0, t.numel(), chunk_size):
        hc, tc = h[start : start + chunk_size], t[start : start + chunk_size]
        if torch.is_grad_enabled() and hc.requires_grad:
            pieces.append(checkpoint(chunk_token_losses, output, hc, tc, use_reentrant=False))
        else:
            pieces.append(chunk_token_losses(output, hc, tc))
    per_token = torch.zeros(keep.shape, dtype=torch.float32, device=hidden.device)
    if pieces:
        per_token = per_token.masked_scatter(keep, -torch.cat(pieces))
    return per_token.sum(dim=1)


def response_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Per row of labels [rows, T]: how many tokens are predicted (labelled positions 1..), IPO's normaliser."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def preference_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses [B], chosen_rewards [B], rejected_rewards [B]) from summed log-probabilities [B], as TRL 1.16 computes them.

    The rewards are detached (metrics). "ipo" needs each response's token count (response_lengths).
    Settings are assumed checked (DPOConfig); a combination that cannot be computed is a ValueError.
    """
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    if loss_type == "sigmoid":
        delta = chosen_logratios - rejected_logratios
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss divides each log-ratio by its response's token count: pass chosen_lengths and rejected_lengths")
        if label_smoothing:
            raise ValueError("label_smoothing is a sigmoid-loss option")
        chosen_avg = chosen_logratios / chosen_lengths.clamp(min=1)
        rejected_avg = rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss type {loss_type!r}; one of {', '.join(LOSSES)}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def metric_sums(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> torch.Tensor:
    """float64 [len(METRICS) + 1]: each metric summed over these pairs, then their number.

    Add the sums of several micro-batches, and all-reduce them over the data-parallel group
    (train.all_reduce_sum), before `metric_means`: the means are then over all their pairs.
    """
    columns = [losses, chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
               chosen_rewards - rejected_rewards, policy_chosen, policy_rejected]
    sums = torch.stack([column.detach().double().sum() for column in columns])
    return torch.cat([sums, sums.new_tensor([losses.numel()])])


def metric_means(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """{name: mean over the pairs} from metric_sums; prefix "eval_" gives TRL's evaluation names."""
    values = sums.tolist()
    count = max(values[-1], 1.0)
    return {f"{prefix}{name}": total / count for name, total in zip(METRICS, values)}


def pair_metrics(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                 policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """TRL's metrics of one batch of pairs: loss, rewards/chosen, rewards/rejected, rewards/accuracies
    (chosen reward strictly above rejected), rewards/margins, logps/chosen, logps/rejected."""
    return metric_means(metric_sums(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected), prefix)
