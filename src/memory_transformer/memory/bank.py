"""The memory bank: N slots, split into C equal chapters.

Each chapter is its own Parameter. A chapter that no sequence selected takes no part in the graph, so its
`.grad` stays None and AdamW skips it entirely: a step costs the same with 128 chapters as with 1.

For inference a trained bank can be quantized in place (`quantize_`, see memory/quant.py): each chapter then
becomes two buffers, `q.<c>` and `scale.<c>`, and `read` dequantizes only the chapters it is asked for.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from memory_transformer.memory.quant import dequantize, quantize


class Buffers(nn.Module):
    """Tensors registered as buffers named "0", "1", ... (state dict keys `<name>.<i>`), indexable like a list."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(str(i), t)

    def __getitem__(self, i: int) -> torch.Tensor:
        return getattr(self, str(i))

    def __len__(self) -> int:
        return len(self._buffers)


Rows = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _GatherRows(torch.autograd.Function):
    """table (R, h) (a no-grad copy of the chapters `params`, row-major) at idx (any shape) -> (*idx.shape, h).
    Backward: one gradient per chapter, the gathered rows' gradients added in with `index_add_` (deterministic,
    like `dispatch.take`; the rows sorted stably by chapter first): a dense chapter-sized one, or with `sparse`
    a row-sparse one (COO over the chapter's slots) holding only the slots read."""

    @staticmethod
    def forward(ctx, table, idx, sparse, *params):
        ctx.save_for_backward(idx)
        ctx.table_shape, ctx.chapter_shape, ctx.sparse = table.shape, params[0].shape, sparse
        return table.index_select(0, idx.reshape(-1)).view(*idx.shape, table.shape[1])

    @staticmethod
    def backward(ctx, grad):
        if not any(ctx.needs_input_grad[3:]):
            return (None,) * len(ctx.needs_input_grad)
        (idx,) = ctx.saved_tensors
        U, hd = len(ctx.needs_input_grad) - 3, grad.shape[-1]
        rows_per_chapter = ctx.table_shape[0] // U
        idx, order = idx.reshape(-1).sort(stable=True)  # rows grouped by chapter
        grad = grad.reshape(-1, hd).index_select(0, order)
        if ctx.sparse:
            return (None, None, None, *_row_sparse(idx, grad, U, ctx.chapter_shape))
        counts = torch.bincount(idx // rows_per_chapter, minlength=U).tolist()
        # One tensor per chapter, not views of one bank-sized buffer: freed and reallocated every step, chapter-
        # sized blocks come back from the heap while a bank-sized one is page-faulted afresh (18 ms vs 115 ms).
        grads = []
        for c, (i, g) in enumerate(zip(idx.split(counts), grad.split(counts))):
            zero = g.new_zeros(rows_per_chapter, hd)
            grads.append(zero.index_add_(0, i - c * rows_per_chapter, g).view(ctx.chapter_shape))
        return (None, None, None, *grads)


def _row_sparse(idx: torch.Tensor, grad: torch.Tensor, U: int, chapter_shape) -> list[torch.Tensor]:
    """Gradients (R, h) of the table rows idx (R,), sorted -> one coalesced sparse COO gradient per chapter of
    shape `chapter_shape` (S, row), over the slots of which any head read the key or the value."""
    S, hd = chapter_shape[0], grad.shape[1]
    parts = chapter_shape[1] // hd  # table rows per slot: (key|value, head)
    slot = idx // parts  # (R,) over the U*S slots, sorted
    slots, inverse = torch.unique_consecutive(slot, return_inverse=True)  # (n,)
    at = inverse * parts + idx % parts  # each table row's place among the read slots' rows
    slots_of = torch.bincount(slots // S, minlength=U).tolist()  # per chapter: its slots read
    rows_of = torch.bincount(idx // (S * parts), minlength=U).tolist()  # and its table rows gathered
    grads, start = [], 0
    # Per chapter, as the dense gradients: chapter-sized blocks come back from the heap, one tensor for all the
    # read slots of the bank (100 MB at 128 chapters) is page-faulted afresh at every step (63 ms).
    for c, (s, a, g) in enumerate(zip(slots.split(slots_of), at.split(rows_of), grad.split(rows_of))):
        values = g.new_zeros(s.numel() * parts, hd).index_add_(0, a - start, g).view(s.numel(), chapter_shape[1])
        grads.append(torch.sparse_coo_tensor((s - c * S)[None], values, chapter_shape, is_coalesced=True,
                                             check_invariants=False))
        start += s.numel() * parts
    return grads


class MappedChapters:
    """Read-only stand-in for `Buffers`: chapter i is the tensor `<prefix><i>` of a safetensors file, read from
    the memory-mapped file when asked for (only its bytes are touched), never held. Not state: a bank mapped
    this way has no chapters in its state dict."""

    def __init__(self, file, prefix: str, n: int):
        self.file, self.prefix, self.n = file, prefix, n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.file.get_tensor(f"{self.prefix}{i}")

    def __len__(self) -> int:
        return self.n

    def nbytes(self) -> int:
        return sum(math.prod(s.get_shape()) * _ITEMSIZE[s.get_dtype()]
                   for s in (self.file.get_slice(f"{self.prefix}{i}") for i in range(self.n)))


_ITEMSIZE = {"I8": 1, "U8": 1, "F16": 2, "BF16": 2, "F32": 4}


class MemoryBank(nn.Module):
    """kind: `standard` (S, d) chapters; `factorized` M = A @ B^T with A (S, r) per chapter and B (d, r) shared;
    `reduced_dim` (S, r) chapters, read by an attention that works in r dims.

    With `learned_kv` a row holds a key and a value side by side, [key (w) | value (w)], read directly by the
    attention (no W_k, W_v); keys start with std `key_init_std` so that scores are selective from step one,
    values with `init_std`."""

    def __init__(self, num_tokens: int, num_chapters: int, dim: int, kind: str = "standard",
                 rank: int | None = None, init_std: float = 0.02, learned_kv: bool = False,
                 key_init_std: float = 1.0):
        super().__init__()
        self.kind, self.num_chapters, self.learned_kv = kind, num_chapters, learned_kv
        self.bits, self.group_size = 0, 0  # 0 = float Parameters; 8 or 4 after `quantize_`
        self._scratch: torch.Tensor | None = None  # `scratch_read`'s buffer (not state)
        self.sparse_grad = False  # `kv_rows` gives row-sparse chapter gradients: see `use_sparse_grad`
        self.fetch = None  # chapters held by other processes: see `fetch_from`
        self.chapter_size = num_tokens // num_chapters
        S, parts = self.chapter_size, 2 if learned_kv else 1
        self.width = rank if kind == "reduced_dim" else dim  # attention width w
        if kind == "factorized":
            # Var(sum_j a_ij b_kj) = r * s^4, so s = sqrt(init_std / sqrt(r)) gives M the variance init_std^2.
            s = math.sqrt(init_std / math.sqrt(rank))
            self.chapters = nn.ParameterList(nn.Parameter(torch.randn(S, rank) * s) for _ in range(num_chapters))
            self.right = nn.Parameter(torch.randn(parts * dim, rank) * s)
            if learned_kv:  # M's key columns come from B's first rows
                with torch.no_grad():
                    self.right[:dim] *= key_init_std / init_std
        else:
            self.chapters = nn.ParameterList(
                nn.Parameter(torch.randn(S, parts * self.width) * init_std) for _ in range(num_chapters)
            )
            if learned_kv:
                with torch.no_grad():
                    for p in self.chapters:
                        p[:, :self.width] *= key_init_std / init_std

    def zero_values_(self) -> None:
        """Learned keys and values: set every value to 0 (keys untouched)."""
        assert self.learned_kv and not self.bits
        with torch.no_grad():
            if self.kind == "factorized":
                self.right[self.right.shape[0] // 2:] = 0
            else:
                for p in self.chapters:
                    p[:, self.width:] = 0

    def read(self, chapter_ids: list[int]) -> torch.Tensor:
        """The slots of the given chapters: (U, S, row), row = width (2 * width with learned keys and values).
        Only these chapters enter the graph (float bank) or get dequantized (quantized bank)."""
        if self.bits:
            slots = torch.stack([self.dequantize(i) for i in chapter_ids])  # (U, S, r or row)
        elif self.fetch is not None:
            slots = self.fetch(chapter_ids)  # (U, S, r or row)
        else:
            slots = torch.stack([self.chapters[i] for i in chapter_ids])  # (U, S, r or row)
        if self.kind == "factorized":
            slots = slots @ self.right.T  # (U, S, row)
        return slots

    def scratch_read(self, chapter_ids: list[int]) -> torch.Tensor:
        """`read` outside autograd into a buffer the bank keeps and reuses: (U, S, row), valid until the next
        call. A fresh bank-sized tensor costs its page faults at every step (on this CPU: 143 ms to stack
        128 chapters into a new tensor, 26 ms into a reused one)."""
        assert self.kind != "factorized" and not self.bits
        chapters = [self.chapters[i] for i in chapter_ids]
        shape = (len(chapters), *chapters[0].shape)
        buf = self._scratch
        if buf is None or buf.numel() < math.prod(shape) or buf.dtype != chapters[0].dtype \
                or buf.device != chapters[0].device:
            buf = self._scratch = torch.empty(math.prod(shape), dtype=chapters[0].dtype, device=chapters[0].device)
        with torch.no_grad():
            return torch.stack(chapters, out=buf[:math.prod(shape)].view(shape))

    def _apply(self, fn, *args, **kwargs):
        self._scratch = None  # `.to()`, `.half()`, ...: not kept on the old device or dtype
        return super()._apply(fn, *args, **kwargs)

    def kv_rows(self, chapters: list[int], slots: torch.Tensor, heads: int) -> Rows:
        """Learned K/V, float bank: a function (pair_chapter (P,), slot (P, H, m)) -> keys, values (P, H, m, h), the
        kept slots' key and value rows of each pair's chapter (an index into `chapters`), with autograd to the
        chapter Parameters. `slots` = `read(chapters)` taken outside autograd (U, S, 2w): the rows are gathered
        from it, and the backward pass writes each chapter's gradient once, where the read through a stacked
        bank builds and copies several bank-sized gradients (stack, slices, head views)."""
        assert self.learned_kv and self.kind != "factorized" and not self.bits and not slots.requires_grad
        U, S, row = slots.shape
        hd = row // (2 * heads)
        table = slots.view(U * S * 2 * heads, hd)  # one row per (chapter, slot, key|value, head)
        params = [self.chapters[c] for c in chapters]

        def rows(pair_chapter: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            head = torch.arange(heads, device=slot.device)[None, :, None]  # (1, H, 1)
            key = ((pair_chapter[:, None, None] * S + slot) * 2) * heads + head  # (P, H, m)
            idx = torch.stack([key, key + heads], dim=-1)  # (P, H, m, 2): the key row, the value row
            kv = _GatherRows.apply(table, idx, self.sparse_grad, *params)  # (P, H, m, 2, h)
            return kv[..., 0, :], kv[..., 1, :]

        return rows

    def use_sparse_grad(self, sparse: bool = True) -> None:
        """Row-sparse chapter gradients from `kv_rows` (`training.bank_optimizer: lazy_adam`, like
        `nn.Embedding(sparse=True)`): only the slots read get a gradient row. The other reads (`read`: the dense
        read, projected K/V, sequence routing) still give dense chapter gradients."""
        self.sparse_grad = sparse

    def fetch_from(self, fetch) -> None:
        """Read chapters through `fetch(chapter_ids) -> (U, S, r or row)` (train/chapters.py: chapters sharded over
        processes), or again from this bank's own Parameters with None."""
        self.fetch = fetch

    def chapter_params(self, chapter: int) -> list[torch.Tensor]:
        """Tensors that determine chapter `chapter` (for cache invalidation): Parameters, or the buffers of a
        quantized chapter."""
        extra = [self.right] if self.kind == "factorized" else []
        if self.bits and isinstance(self.q, MappedChapters):
            return extra  # a read-only file: the chapter never changes
        # `_parameters`, not `chapters[chapter]`: ParameterList's indexing (a failed attribute lookup, then the
        # module's `__getattr__`) is 3 µs of a decoding step, which checks its K/V cache at every token
        own = [self.q[chapter], self.scale[chapter]] if self.bits else [self.chapters._parameters[str(chapter)]]
        return [*own, *extra]

    # -- quantized storage (inference) ---------------------------------------------------------------------
    def quantize_(self, bits: int, group_size: int = 64) -> None:
        """Replace the float chapters (the A factors of a factorized bank) by `bits`-bit buffers in place.
        The shared B of a factorized bank stays float but is frozen: a quantized bank is not trained."""
        assert not self.bits and bits in (8, 4), (self.bits, bits)
        dtype, device = self.chapters[0].dtype, self.chapters[0].device
        self.num_values = sum(p.numel() for p in self.chapters)
        parts = 2 if self.learned_kv and self.kind != "factorized" else 1  # rows of [key | value]: a scale each
        stored = [quantize(p.detach(), bits, group_size, parts) for p in self.chapters]  # [(q, scale)] per chapter
        del self.chapters
        self.q, self.scale = Buffers([q for q, _ in stored]), Buffers([s for _, s in stored])
        # Empty float buffer: follows `.to(dtype)` so reads come out in the model's current dtype. Not saved.
        self.register_buffer("out_dtype", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.bits, self.group_size = bits, group_size
        if self.kind == "factorized":
            self.right.requires_grad_(False)

    @classmethod
    def mapped(cls, path: str, prefix: str, num_tokens: int, num_chapters: int, dim: int, bits: int,
               group_size: int = 64, dtype: torch.dtype = torch.float32, **kwargs) -> MemoryBank:
        """A quantized bank read from a safetensors file (`<prefix>q.<i>`, `<prefix>scale.<i>` as a quantized
        bank saves them; `<prefix>right` for a factorized one) without loading it: the file is memory-mapped and
        `read` dequantizes only the chapters asked for, so resident memory grows with the chapters read, not
        with the bank (which may be larger than RAM). Inference only; `kwargs` as for the constructor."""
        from safetensors import safe_open

        with torch.device("meta"):  # the float chapters are never materialised
            bank = cls(num_tokens, num_chapters, dim, **kwargs)
        file = safe_open(path, framework="pt")
        del bank.chapters
        bank.q, bank.scale = MappedChapters(file, f"{prefix}q.", num_chapters), \
            MappedChapters(file, f"{prefix}scale.", num_chapters)
        bank.register_buffer("out_dtype", torch.empty(0, dtype=dtype), persistent=False)
        per_slot = kwargs["rank"] if bank.kind == "factorized" else bank.width * (2 if bank.learned_kv else 1)
        bank.bits, bank.group_size, bank.num_values = bits, group_size, num_tokens * per_slot
        if bank.kind == "factorized":
            bank.right = nn.Parameter(file.get_tensor(f"{prefix}right").to(dtype), requires_grad=False)
        return bank

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # int8 checkpoints of learned [key | value] rows saved with one scale per row, (S, 1), before the two
        # halves got a scale each: take the saved shape (dequantize reads the number of parts from it).
        if self.bits == 8 and isinstance(self.scale, Buffers):
            for i in range(len(self.scale)):
                saved, own = state_dict.get(f"{prefix}scale.{i}"), self.scale[i]
                if saved is not None and saved.shape[:-1] == own.shape[:-1] and saved.shape != own.shape:
                    self.scale._buffers[str(i)] = own.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantize(self, chapter: int) -> torch.Tensor:
        """One quantized chapter as floats: (S, r or row) in the model dtype."""
        return dequantize(self.q[chapter], self.scale[chapter], self.bits, self.group_size, self.out_dtype.dtype)

    def stored_footprint(self) -> tuple[int, int]:
        """(values, bytes) held in quantized buffers: values = the quantized entries (2 per byte for int4,
        scales not counted), bytes include the scales. (0, 0) for a float bank, whose Parameters count instead."""
        if not self.bits:
            return 0, 0
        if isinstance(self.q, MappedChapters):
            return self.num_values, self.q.nbytes() + self.scale.nbytes()
        nbytes = sum(t.numel() * t.element_size() for buf in (self.q, self.scale) for t in buf.buffers())
        return self.num_values, nbytes
