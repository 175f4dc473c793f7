"""Chapter router: pick the top-k chapters of the bank for each sequence (MoE-style), and its losses."""

from __future__ import annotations

import torch
from torch import nn


class Router(nn.Module):
    def __init__(self, dim: int, num_chapters: int, init_std: float = 0.02):
        super().__init__()
        self.proj = nn.Linear(dim, num_chapters, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (B, d) -> chapter logits (B, C), in float32 for a stable softmax."""
        return self.proj(pooled).float()


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over time of x (B, T, d), counting only positions where mask (B, T) is 1."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., C) logits -> gates (..., k) = softmax probabilities of the chosen chapters, ids (..., k)."""
    probs = logits.softmax(dim=-1)
    gates, ids = probs.topk(k, dim=-1)
    return gates, ids


def router_losses(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The three auxiliary losses over a batch of routing decisions, logits (N, C).

    load_balance = C * sum_i f_i * P_i   (f_i: share of the N*k choices that went to chapter i; P_i: mean prob)
    importance   = Var(I) / Mean(I)^2     (I_i = sum over the batch of the prob of chapter i; population variance)
    z_loss       = mean(logsumexp(logits)^2)
    """
    C = logits.shape[-1]
    probs = logits.softmax(dim=-1)
    ids = logits.topk(k, dim=-1).indices  # (N, k)
    counts = torch.zeros(C, device=logits.device).index_add_(0, ids.reshape(-1), torch.ones(ids.numel(), device=logits.device))
    f = counts / ids.numel()
    importance = probs.sum(dim=0)
    return {
        "load_balance": C * (f * probs.mean(dim=0)).sum(),
        "importance": importance.var(unbiased=False) / importance.mean().pow(2),
        "z_loss": torch.logsumexp(logits, dim=-1).pow(2).mean(),
    }


def chapter_usage(ids: torch.Tensor, num_chapters: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """How many routing choices went to each chapter: (C,) counts. ids (B, k) per sequence, or (B, T, k) per
    token with mask (B, T) leaving padding tokens out; ids -1 (subject routing: nothing read) are not counted."""
    if mask is not None and ids.dim() == 3:
        ids = ids[mask.bool()]  # (N, k) for the N real tokens
    ids = ids.reshape(-1)
    return torch.bincount(ids[ids >= 0], minlength=num_chapters)  # -1: a token that read nothing
