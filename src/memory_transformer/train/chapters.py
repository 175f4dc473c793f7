"""`memory.shard_chapters`: a memory bank's chapters spread over the processes (the memory's expert parallelism).

Process r of W owns the chapters c with c % W == r: only those are Parameters with data on it (the others are
empty placeholders), only those are in its optimizer, so the bank and its AdamW state take 1/W of the memory on
each process. A read (`MemoryBank.read`, once per memory layer and forward, on every process alike) is a
collective: the processes agree on the union of the chapters they read, each owner puts its chapters of the
union into a buffer, a sum over processes gives every process those chapters (one owner each: the sum adds only
zeros, so the values are exact), and each process takes the ones it asked for. In the backward the gradient of
that buffer is summed over processes and each owner keeps the mean for its chapters: what DDP gives an unsharded
bank (it averages gradients; over 2 processes the division by 2 is exact). Chapters read nowhere get no gradient.

The traffic goes through a process group of its own, so it never interleaves with DDP's gradient buckets.
Evaluation and saving see the whole bank (`whole`): every chapter is gathered for the duration.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from memory_transformer.memory.bank import MemoryBank


class ChapterShards:
    """The chapters of one bank owned by this process, and the collective read of any of them."""

    def __init__(self, bank: MemoryBank, group):
        self.bank, self.group = bank, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.shapes = [tuple(p.shape) for p in bank.chapters]
        self.dtype, self.device = bank.chapters[0].dtype, bank.chapters[0].device
        self.owned = [c for c in range(len(self.shapes)) if c % self.world == self.rank]
        for c, p in enumerate(bank.chapters):
            if c % self.world != self.rank:  # the same Parameter object, without data: no gradient, no optimizer
                p.requires_grad_(False)
                p.data = p.data.new_empty(0)
        self.anchor = torch.zeros((), requires_grad=True)
        bank.fetch_from(self.read)

    def read(self, chapter_ids: list[int]) -> torch.Tensor:
        """The given chapters (U, S, row), fetched from their owners (a collective)."""
        wanted = torch.zeros(len(self.shapes), dtype=torch.int32, device=self.device)
        wanted[chapter_ids] = 1
        dist.all_reduce(wanted, group=self.group)
        union = wanted.nonzero().flatten().tolist()  # read on any process, ascending
        owned = [c for c in union if c % self.world == self.rank]
        # `self.anchor` requires grad: the backward (a collective) runs on every process, owner of a chapter
        # read here or not
        slots = _Fetch.apply(self, union, owned, self.anchor, *[self.bank.chapters[c] for c in owned])
        where = {c: i for i, c in enumerate(union)}
        return slots.index_select(0, torch.tensor([where[c] for c in chapter_ids], device=slots.device))

    def params(self) -> list[nn.Parameter]:
        """The Parameters of this process's chapters."""
        return [self.bank.chapters[c] for c in self.owned]

    def gather(self) -> None:
        """Give every placeholder its chapter's data (from its owner)."""
        full = torch.zeros(len(self.shapes), *self.shapes[0], dtype=self.dtype, device=self.device)
        for c in self.owned:
            full[c] = self.bank.chapters[c].detach()
        dist.all_reduce(full, group=self.group)
        for c, p in enumerate(self.bank.chapters):
            if c % self.world != self.rank:
                p.data = full[c].clone()
        self.bank.fetch_from(None)

    def release(self) -> None:
        """Back to this process's own chapters (the placeholders lose their data again)."""
        for c, p in enumerate(self.bank.chapters):
            if c % self.world != self.rank:
                p.data = p.data.new_empty(0)
        self.bank.fetch_from(self.read)


class _Fetch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shards: ChapterShards, union: list[int], owned: list[int], anchor: torch.Tensor,
                *params: torch.Tensor):
        buf = torch.zeros(len(union), *shards.shapes[union[0]], dtype=shards.dtype, device=shards.device)
        where = {c: i for i, c in enumerate(union)}
        for c, p in zip(owned, params):
            buf[where[c]] = p
        dist.all_reduce(buf, group=shards.group)  # one owner per row: exact
        ctx.shards, ctx.rows = shards, [where[c] for c in owned]
        return buf

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.shards.group)
        grad /= ctx.shards.world  # the mean over processes, as DDP averages
        return (None, None, None, None, *[grad[i] for i in ctx.rows])


def shard_banks(model: nn.Module) -> list[ChapterShards]:
    """Spread every bank's chapters over the processes (call once, on every process, before the optimizer and
    DDP are made); returns one `ChapterShards` per bank."""
    group = dist.new_group()  # the default backend: gloo on CPUs
    banks = {id(m): m for m in model.modules() if isinstance(m, MemoryBank)}
    return [ChapterShards(b, group) for b in banks.values()]


def chapter_names(model: nn.Module) -> list[str]:
    """Parameter names of every chapter: DDP must leave them alone (they differ between processes)."""
    return [f"{n}.chapters.{c}" for n, m in model.named_modules() if isinstance(m, MemoryBank)
            for c in range(len(m.chapters))]


@contextmanager
def whole(shards: list[ChapterShards]):
    """Within: every process holds every chapter (evaluation, saving); a collective at entry."""
    for s in shards:
        s.gather()
    try:
        yield
    finally:
        for s in shards:
            s.release()
