"""The memory bank: N slots of width `width`, split into C equal chapters.

Each chapter is its own Parameter. A chapter that no sequence selected takes no part in the graph, so its
`.grad` stays None and AdamW skips it entirely: a step costs the same with 128 chapters as with 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MemoryBank(nn.Module):
    """kind: `standard` (S, d) chapters; `factorized` M = A @ B^T with A (S, r) per chapter and B (d, r) shared;
    `reduced_dim` (S, r) chapters, read by an attention that works in r dims."""

    def __init__(self, num_tokens: int, num_chapters: int, dim: int, kind: str = "standard",
                 rank: int | None = None, init_std: float = 0.02):
        super().__init__()
        self.kind, self.num_chapters = kind, num_chapters
        self.chapter_size = num_tokens // num_chapters
        S = self.chapter_size
        if kind == "factorized":
            # Var(sum_j a_ij b_kj) = r * s^4, so s = sqrt(init_std / sqrt(r)) gives M the variance init_std^2.
            s = math.sqrt(init_std / math.sqrt(rank))
            self.chapters = nn.ParameterList(nn.Parameter(torch.randn(S, rank) * s) for _ in range(num_chapters))
            self.right = nn.Parameter(torch.randn(dim, rank) * s)
            self.width = dim
        else:
            self.width = rank if kind == "reduced_dim" else dim
            self.chapters = nn.ParameterList(
                nn.Parameter(torch.randn(S, self.width) * init_std) for _ in range(num_chapters)
            )

    def read(self, chapter_ids: list[int]) -> torch.Tensor:
        """The slots of the given chapters: (U, S, width). Only these chapters enter the graph."""
        slots = torch.stack([self.chapters[i] for i in chapter_ids])  # (U, S, r or width)
        if self.kind == "factorized":
            slots = slots @ self.right.T  # (U, S, d)
        return slots

    def chapter_params(self, chapter: int) -> list[nn.Parameter]:
        """Parameters that determine chapter `chapter` (for cache invalidation)."""
        extra = [self.right] if self.kind == "factorized" else []
        return [self.chapters[chapter], *extra]
