"""Floor 1: the two query functions f a score can be about (docs/protocol.md: the margin by default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Correct-class margin ``logit_y − logsumexp(other logits)``, one value per example."""
    correct = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.unsqueeze(-1), float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy."""
    return F.cross_entropy(logits, labels, reduction="none")


MEASUREMENTS = {"margin": margin, "loss": loss}
