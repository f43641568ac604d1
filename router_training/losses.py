"""GenARM's pairwise loss, defined once: the reward model's loss, the router's preference term on the mix (teacher
forced and on cached features) and their evaluations all call :func:`pair_loss`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pair_loss(lp_chosen: torch.Tensor, lp_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """``-log sigmoid(beta * (log p(chosen) - log p(rejected)))``, mean over pairs (no reference model: GenARM)."""
    return -F.logsigmoid(beta * (lp_chosen - lp_rejected)).mean()
