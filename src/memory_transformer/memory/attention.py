"""Memory cross-attention: queries from the hidden states, keys and values from the selected bank chapters.

Shapes: B batch, T time, d model width, w attention width (d, or r for a reduced_dim bank), H heads,
h = w / H head width, C chapters, S slots per chapter, k chapters read per sequence (or per token), U distinct
chapters selected in the batch, N = B*T tokens, P = N*k (token, choice) pairs.

Two routings, one result: a token reads the concatenation of its k chapters (k*S slots), with the log of each
chapter's renormalised gate added to the scores of that chapter's slots.
- per sequence, ids (B, k): all tokens of a row share the row's chapters, so one SDPA call over (B, H, k*S) does it.
- per token, ids (B, T, k): dispatched like MoE tokens to experts. The P (token, choice) pairs are grouped by
  chapter; each selected chapter is projected once and attended by its group only; a token's k partial outputs
  are merged with softmax_c(lse_c + log gate_c) weights, which is exactly the softmax over the concatenation.
  Cost: U <= min(C, P) chapters projected, k*S slots per token, whatever C is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memory_transformer.config import MemoryConfig
from memory_transformer.memory.bank import MemoryBank
from memory_transformer.memory.dispatch import (class_order, dense_kept, null_scores, read_tokens, softmax_with_null,
                                                take)
from memory_transformer.memory.routing import Decide, LearnedRouting, Router, Routing


def projection(d_in: int, d_out: int, rank: int | None) -> nn.Module:
    """A bias-free linear map, low rank (d_in -> rank -> d_out) when `rank` is set."""
    if rank is None:
        return nn.Linear(d_in, d_out, bias=False)
    return nn.Sequential(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out, bias=False))


def project(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`m(x)` for a bias-free `projection` or W_o; a Linear as `F.linear`, without the module call and its attribute
    lookups (3 µs a projection in a decoding step of 150)."""
    return F.linear(x, m.weight) if type(m) is nn.Linear else m(x)


def kept_scores(q: torch.Tensor, K: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's best m slots per chapter, q (B, T, H, h), K (B, k, H, S, h): their scaled scores
    (B, H, T, k, m), with autograd, and their rows (B, H, T*k*m, 1) in the (B, H, k*S, h) layout of `rows_of`.
    All S scores are computed to choose, outside autograd; only the kept ones are recomputed with it, so the
    backward pass costs m, not S, per query and chapter. Scores in float32."""
    B, T, H, hd = q.shape
    k, S = K.shape[1], K.shape[3]
    with torch.no_grad():  # (a chapter's gate and the scale do not change the order within a chapter)
        top = torch.einsum("bthd,bkhsd->bhtks", q, K).topk(m, dim=-1)  # (B, H, T, k, m)
    rows = (top.indices + S * torch.arange(k, device=q.device)[:, None]).reshape(B, H, T * k * m, 1)
    if not torch.is_grad_enabled():  # nothing to differentiate (generation): the chosen scores are the kept ones
        return top.values.float() * hd ** -0.5, rows
    keys = rows_of(K, rows).view(B, H, T, k, m, hd)
    return (q.permute(0, 2, 1, 3)[:, :, :, None, None, :] * keys).sum(-1).float() * hd ** -0.5, rows


def rms_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    """`norm(x)`, the same numbers and gradients in every dtype (tests/test_routing.py): torch's CPU `rms_norm` is a
    composite of ~20 aten ops (dtype round trips inside `mean`), 8 µs of a 180 µs decoding step; this is 6."""
    xf = x.float()  # as torch's: statistics in float32, the output in x's dtype
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight).type_as(x)


def rows_of(X: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of X (B, k, H, S, h), seen as (B, H, k*S, h), at `rows` (B, H, n, 1) -> (B, H, n, h)."""
    B, k, H, S, h = X.shape
    return X.transpose(1, 2).reshape(B, H, k * S, h).gather(2, rows.expand(-1, -1, -1, h))


def _weights(projection: nn.Module) -> list[nn.Parameter]:
    """The parameters of a `projection`; a bias-free Linear's without walking the module tree."""
    if isinstance(projection, nn.Linear) and projection.bias is None:
        return [projection.weight]
    return list(projection.parameters())


@dataclass
class AttentionArgs:
    """What one memory cross-attention layer is built from (`from_config` for a model's memory)."""

    hidden: int  # d, the decoder's width
    width: int  # w, the attention width: d, or the bank rank of a reduced_dim bank
    num_heads: int
    num_chapters: int = 1
    top_k: int = 1
    qkv_rank: int | None = None
    wo_init: str = "zero"
    dropout: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    routing: str = "sequence"  # the decision used when none is given: sequence | token (| subject: none)
    learned_kv: bool = False
    slot_top_k: int | None = None  # None: every slot of the selected chapters
    null_slot: bool = False
    scope_threshold: float | None = None  # None: no scope gate; else memory.scope gate with this threshold
    anchor: bool = False  # memory.scope_anchor: the query also sees the mean of the states that matched a key

    @classmethod
    def from_config(cls, c: MemoryConfig, hidden: int, norm_eps: float) -> AttentionArgs:
        return cls(hidden, c.bank_rank if c.bank == "reduced_dim" else hidden, c.num_heads, c.num_chapters, c.top_k,
                   c.qkv_rank, c.wo_init, c.dropout, norm_eps, c.init_std, c.routing, c.kv == "learned",
                   c.slot_top_k, c.null_slot, c.scope_threshold if c.scope == "gate" else None, c.scope_anchor)


class MemoryAttention(nn.Module):
    """The read: q from the hidden states, K/V of the chapters a routing decision selects (cached outside
    autograd), softmax attention, W_o. It decides nothing: the decision comes from a policy (routing.py). It holds
    the layer's `Router` parameters (checkpoint keys `...attn.router.*`) for the policies to use."""

    def __init__(self, args: AttentionArgs):
        super().__init__()
        a = args
        self.width, self.num_heads, self.top_k, self.dropout = a.width, a.num_heads, a.top_k, a.dropout
        self.slot_top_k = a.slot_top_k
        self.norm = nn.RMSNorm(a.hidden, eps=a.norm_eps)
        self.q = projection(a.hidden, a.width, a.qkv_rank)
        # Learned keys and values are read from the bank row as they are: no W_k, W_v.
        self.k = None if a.learned_kv else projection(a.width, a.width, a.qkv_rank)
        self.v = None if a.learned_kv else projection(a.width, a.width, a.qkv_rank)
        self.o = nn.Linear(a.width, a.hidden, bias=False)
        # The null slot: key learned per head, value 0. Score 0 at init.
        self.null_key = nn.Parameter(torch.zeros(a.num_heads, a.width // a.num_heads)) if a.null_slot else None
        for lin in (m for m in self.modules() if isinstance(m, nn.Linear)):
            nn.init.normal_(lin.weight, std=a.init_std)
        if a.wo_init == "zero":  # the layer adds exactly 0 at init: a pretrained model is unchanged
            nn.init.zeros_(self.o.weight)
        elif a.wo_init == "identity":  # W_o = I and zero values (W_v here, the bank's for learned values):
            nn.init.eye_(self.o.weight)  # also 0 at init, but the values get gradient from the first step
            if self.v is not None:
                nn.init.zeros_([m for m in self.v.modules() if isinstance(m, nn.Linear)][-1].weight)
        # memory.scope_anchor: q = W_q norm(h) + W_a norm(anchor); W_a starts at 0, so the read starts as without it
        self.anchor = projection(a.hidden, a.width, a.qkv_rank) if a.anchor else None
        if self.anchor is not None:
            nn.init.zeros_([m for m in self.anchor.modules() if isinstance(m, nn.Linear)][-1].weight)
        # The scope gate (memory.scope gate): a per-token logit l = w . norm(h) + b; created after the init loop
        # above, so its weight gets its own init; bias 0 puts every token at sigmoid(0) = 0.5 at init.
        self.scope_threshold = a.scope_threshold
        self.scope = None
        if a.scope_threshold is not None:
            self.scope = nn.Linear(a.hidden, 1)
            nn.init.normal_(self.scope.weight, std=a.init_std)
            nn.init.zeros_(self.scope.bias)
        looked_up = a.routing in ("subject", "keys")  # chapters looked up in the ids / the scope's keys: no router
        self.router = Router(a.hidden, a.num_chapters, a.top_k, a.init_std) if a.num_chapters > 1 and not looked_up \
            else None
        # The decision when the caller gives none (the layer used alone); a lookup needs the model around it.
        self.policy = None if looked_up else LearnedRouting(per_token=a.routing == "token")
        self._kv_cache: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        self._stack_buffer: torch.Tensor | None = None  # project_kv's stacked cache hits (not state)

    # -- keys and values of the selected chapters --------------------------------------------------------
    def project_kv(self, bank: MemoryBank, chapters: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (U, H, S, h) for the given chapters, each projected once however many sequences read it.
        Outside autograd (eval / generation) they are cached per chapter, head-major and contiguous (the layout
        SDPA reads fastest), until a parameter changes; one chapter is then returned without any copy."""
        if torch.is_grad_enabled():
            return self._kv(bank.read(chapters))
        hits = [self._cached_kv(bank, c) for c in chapters]
        if len(hits) == 1:
            return hits[0][1][None], hits[0][2][None]
        # Stacked into a buffer kept between calls (valid until the next call): a new one would be page-faulted
        # afresh at every prefill of a token-routed generation.
        U, (H, S, hd) = len(hits), hits[0][1].shape
        buf = self._stack_buffer
        if buf is None or buf.numel() < 2 * U * H * S * hd or buf.dtype != hits[0][1].dtype \
                or buf.device != hits[0][1].device or buf.is_inference() != torch.is_inference_mode_enabled():
            buf = self._stack_buffer = hits[0][1].new_empty(2 * U * H * S * hd)
        K, V = buf[:2 * U * H * S * hd].view(2, U, H, S, hd).unbind()
        return torch.stack([k for _, k, _ in hits], out=K), torch.stack([v for _, _, v in hits], out=V)

    def _cached_kv(self, bank: MemoryBank, chapter: int) -> tuple[tuple, torch.Tensor, torch.Tensor]:
        key = self._version_key(bank, chapter)
        hit = self._kv_cache.get(chapter)
        if hit is None or hit[0] != key:
            K, V = self._kv(bank.read([chapter]))
            hit = (key, K[0].contiguous(), V[0].contiguous())
            self._kv_cache[chapter] = hit
        return hit

    def _kv(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank rows (U, S, row) -> K, V (U, H, S, h): projected by W_k, W_v, or the two halves of the row."""
        if self.k is None:
            return self._heads(slots[..., :self.width]), self._heads(slots[..., self.width:])
        return self._heads(self.k(slots)), self._heads(self.v(slots))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(U, S, w) -> (U, H, S, h), a view."""
        return t.view(*t.shape[:2], self.num_heads, -1).transpose(1, 2)

    def _version_key(self, bank: MemoryBank, chapter: int) -> tuple:
        # In-place updates (optimizer steps, load_state_dict) bump `_version`; `.to()` makes new storage.
        # Looked up at every call (a Parameter may be replaced); `.parameters()` of a Linear walks the module
        # tree, a third of a decoding step's cache check.
        params = bank.chapter_params(chapter)
        if self.k is not None:
            params = [*params, *_weights(self.k), *_weights(self.v)]
        return tuple([(p._version, p.data_ptr(), p.dtype, p.device) for p in params])

    def clear_cache(self) -> None:
        self._kv_cache.clear()
        self._stack_buffer = None

    def _apply(self, fn, *args, **kwargs):
        self._stack_buffer = None  # `.to()`, `.half()`, ...: not kept on the old device or dtype
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    # -- the read ------------------------------------------------------------------------------------------
    def forward(self, h: torch.Tensor, bank: MemoryBank, decide: Decide | None = None,
                mask: torch.Tensor | None = None, anchor: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """h (B, T, d) -> memory output (B, T, d) to add to the residual stream, and the routing used.
        `decide` (x, mask) -> Routing: a policy bound to this call (routing.py); None: the layer's own.
        `anchor` (B, T, d): memory.scope_anchor's mean matched state of each position's scope (memory/scope.py)."""
        B, T, _ = h.shape
        H, w = self.num_heads, self.width
        x = rms_norm(h, self.norm)
        routing = (decide or self._own_decision())(x, mask)
        q = project(self.q, x)
        if self.anchor is not None:
            if anchor is None:
                raise ValueError("memory.scope_anchor: the read needs the scope's anchors (MemoryStack); call the "
                                 "model, not the memory layer alone")
            q = q + project(self.anchor, rms_norm(anchor.to(h.dtype), self.norm))
        q = q.view(B, T, H, w // H)  # (B, T, H, h)
        if routing.ids.dim() == 3 and bool((routing.ids < 0).any()):  # some tokens read nothing (subject routing)
            out = self._read_some(q, bank, routing)
        elif routing.ids.dim() == 2 or T == 1:  # per-token routing of one token per row is per-sequence routing
            out = self._read_sequences(q, bank, routing)
        else:
            out = self._read_tokens(q, bank, routing)
        out = project(self.o, out)  # (B, T, d)
        if torch.is_grad_enabled() and self.router is not None:
            # Value 1 exactly, gradient d/dg = 1/g: the LM loss tells the router which chapters helped,
            # without shrinking the output by 1/C as a plain Switch gate would at init. Outside autograd it is
            # exactly x * 1.0, so it is skipped there (generation).
            g = routing.gates.sum(-1)  # (B,) or (B, T)
            g = (g / g.detach()).to(out.dtype)
            out = out * (g[:, None, None] if g.dim() == 1 else g[..., None])
        if self.scope is not None:
            out, logits = self._scoped(out, x)
            routing = dataclasses.replace(routing, scope_logits=logits)  # a new decision: one may be shared
        return out, routing

    def _scoped(self, out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scope gate on the memory output (B, T, d): returns the gated output and the gate logits (B, T)
        (float32). The gate sees the normed hidden states detached, so its margin loss trains the gate only.
        Training (grad on): out * sigmoid(l). Otherwise: out * sigmoid(l) where sigmoid(l) >= threshold and
        exactly 0 elsewhere (torch.where: those positions add nothing, the model there is the base's own)."""
        logits = self.scope(x.detach()).squeeze(-1).float()  # (B, T)
        p = torch.sigmoid(logits)
        scaled = out * p[..., None].to(out.dtype)
        if self.training and torch.is_grad_enabled():
            return scaled, logits
        return torch.where((p >= self.scope_threshold)[..., None], scaled, torch.zeros_like(out)), logits

    def _own_decision(self) -> Decide:
        if self.policy is None:
            raise ValueError("memory.routing subject or keys: the chapters come from the input ids or the scope's "
                             "keys (MemoryStack); call the model, not the memory layer alone")
        return self.policy.bind(0, self.router, 0)

    def _read_sequences(self, q: torch.Tensor, bank: MemoryBank, routing: Routing) -> torch.Tensor:
        """Every token of row b attends to the concatenation of row b's k chapters. q (B, T, H, h) -> (B, T, w)."""
        B, T, H, hd = q.shape
        chapters = routing.chapter_list()
        if len(chapters) == 1 and routing.ids.shape[-1] == 1 and self.null_key is None \
                and not torch.is_grad_enabled():  # generation: few ops per token
            _, K, V = self._cached_kv(bank, chapters[0])  # (H, S, h), as `project_kv` would return them
            return self._read_one_chapter(q, K, V)
        chapters, inverse = routing.chapters()
        K, V = self.project_kv(bank, chapters)  # (U, H, S, h)
        S = K.shape[2]
        inverse, gates = inverse.view(B, -1), routing.gates.view(B, -1)  # (B, k); (B, 1, k) when T == 1
        k = inverse.shape[1]
        # Each selected chapter is weighted by its router probability (renormalised over the k).
        log_g = (gates / gates.sum(-1, keepdim=True)).log() if k > 1 else None  # (B, k)
        dropout = self.dropout if self.training else 0.0
        sparse = self.slot_top_k is not None and self.slot_top_k < S
        if sparse or self.null_key is not None:
            if len(chapters) == 1:  # views of the one chapter (decode: the cached K/V, no copy per token)
                Kb, Vb = K[None].expand(B, k, H, S, hd), V[None].expand(B, k, H, S, hd)
            else:
                Kb, Vb = take(K, inverse), take(V, inverse)  # (B, k, H, S, h)
            return self._read_sequences_sparse(q, Kb, Vb, log_g, dropout)
        if len(chapters) == 1:  # one chapter for all rows (always at batch 1, top_k 1): a view, no copy
            K, V = K.expand(B, H, S, hd), V.expand(B, H, S, hd)
        else:  # (B, k, H, S, h) -> (B, H, k*S, h)
            K = take(K, inverse).transpose(1, 2).reshape(B, H, k * S, hd)
            V = take(V, inverse).transpose(1, 2).reshape(B, H, k * S, hd)
        bias = None if log_g is None else log_g.to(q.dtype).repeat_interleave(S, dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, attn_mask=bias, dropout_p=dropout)
        return out.transpose(1, 2).reshape(B, T, H * hd)

    def _read_one_chapter(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Outside autograd, every row reading the same one chapter K, V (H, S, h) with k = 1 (no gate bias), no
        null slot: the read of `_read_sequences` without its bookkeeping. q (B, T, H, h) -> (B, T, w)."""
        if self.slot_top_k is not None and self.slot_top_k < K.shape[1]:
            return self._read_kept_one_chapter(q, K, V)
        B, T, H, hd = q.shape
        K, V = K.expand(B, -1, -1, -1), V.expand(B, -1, -1, -1)  # views, no copy
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, dropout_p=dropout)
        return out.transpose(1, 2).reshape(B, T, H * hd)

    def _read_kept_one_chapter(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Outside autograd, every row reading the same one chapter K, V (H, S, h) with slot top-k (no null
        slot): `_read_sequences_sparse` in a handful of ops, for decoding. q (B, T, H, h) -> (B, T, w)."""
        B, T, H, hd = q.shape
        qh = q.reshape(B * T, H, hd).transpose(0, 1)  # (H, N, h)
        top = torch.bmm(qh, K.transpose(1, 2)).topk(self.slot_top_k, dim=-1)  # (H, N, m)
        probs = (top.values.float() * hd ** -0.5).softmax(dim=-1).to(V.dtype)  # (H, N, m)
        idx = top.indices.reshape(H, -1, 1).expand(-1, -1, hd)  # (H, N*m, h)
        picked = V.gather(1, idx).view(H, B * T, -1, hd)  # the kept slots' values, (H, N, m, h)
        out = (probs.unsqueeze(-1) * picked).sum(-2)  # (H, N, h)
        return out.transpose(0, 1).reshape(B, T, H * hd)

    def _read_sequences_sparse(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                               log_g: torch.Tensor | None, dropout: float) -> torch.Tensor:
        """The read with slot top-k and/or the null slot. q (B, T, H, h), K, V (B, k, H, S, h) -> (B, T, w).

        Each query keeps its best `slot_top_k` slots of each chapter; the kept scores of all k chapters (plus
        the null slot's) share one softmax. Unkept slots get probability 0, so no gradient reaches them."""
        B, T, H, hd = q.shape
        sparse = self.slot_top_k is not None and self.slot_top_k < K.shape[3]
        if sparse:
            top, rows = kept_scores(q, K, self.slot_top_k)  # (B, H, T, k, m), (B, H, T*k*m, 1)
        else:
            top = torch.einsum("bthd,bkhsd->bhtks", q, K).float() * hd ** -0.5  # (B, H, T, k, S)
        if log_g is not None:
            top = top + log_g[:, None, None, :, None]
        flat = top.flatten(-2)  # (B, H, T, k*m)
        null = None if self.null_key is None else null_scores(q, self.null_key).permute(0, 2, 1)  # (B, H, T)
        probs = softmax_with_null(flat, null, dim=-1)
        if dropout:
            probs = F.dropout(probs, dropout)
        if not sparse:
            out = torch.einsum("bhtks,bkhsd->bthd", probs.view(top.shape).to(V.dtype), V)
            return out.reshape(B, T, H * hd)
        picked = rows_of(V, rows).view(B, H, T, -1, hd)  # the kept slots' values, (B, H, T, k*m, h)
        out = (probs.to(V.dtype)[..., None] * picked).sum(-2)  # (B, H, T, h)
        return out.transpose(1, 2).reshape(B, T, H * hd)

    def _read_some(self, q: torch.Tensor, bank: MemoryBank, routing: Routing) -> torch.Tensor:
        """Per-token routing where chapter id -1 means "read nothing": those tokens get exactly 0 (so does the
        layer's output, W_o having no bias), the others read as in `_read_tokens`. q (B, T, H, h) -> (B, T, w)."""
        B, T, H, hd = q.shape
        reads = (routing.ids >= 0).all(-1)  # (B, T)
        out = q.new_zeros(B, T, H * hd)
        if bool(reads.any()):
            part = Routing(routing.ids[reads][None], routing.gates[reads][None])  # one row of the n reading tokens
            out[reads] = self._read_tokens(q[reads][None], bank, part)[0].to(out.dtype)  # float32 under autocast
        return out

    def _reads_rows(self, bank: MemoryBank) -> bool:
        """Training a float bank of learned K/V with slot top-k: gather the kept rows (`MemoryBank.kv_rows`)
        instead of taking them from a stacked, differentiable copy of every selected chapter. Not with chapters
        held by other processes (`bank.fetch`, memory.shard_chapters): those come through `read`; nor where the
        dense read of the kept slots is cheaper (`dispatch.dense_kept`), unless row-sparse gradients are asked for
        (`MemoryBank.use_sparse_grad`)."""
        return (torch.is_grad_enabled() and self.k is None and bank.kind != "factorized" and not bank.bits
                and bank.fetch is None and self.slot_top_k is not None and self.slot_top_k < bank.chapter_size
                and (bank.sparse_grad or not dense_kept(bank.chapter_size, self.slot_top_k,
                                                        self.width // self.num_heads)))

    def _read_tokens(self, q: torch.Tensor, bank: MemoryBank, routing: Routing) -> torch.Tensor:
        """Every token attends to its own k chapters, MoE-style dispatch. q (B, T, H, h) -> (B, T, w)."""
        B, T, H, hd = q.shape
        chapters, inverse = routing.chapters()  # (U,), (B, T, k)
        # chapters read in the order of the dispatch's batches, so that each batch is a slice of K, V, not a copy
        order = class_order(inverse.reshape(-1), len(chapters))
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        chapters, inverse = [chapters[i] for i in order.tolist()], rank[inverse]
        rows = None
        if self._reads_rows(bank):  # the bank enters autograd only through the kept rows
            slots = bank.scratch_read(chapters)  # (U, S, 2w), outside autograd
            K, V = self._kv(slots)
            rows = bank.kv_rows(chapters, slots, H)
        else:
            K, V = self.project_kv(bank, chapters)  # (U, H, S, h): each selected chapter once
        dropout = self.dropout if self.training else 0.0
        out = read_tokens(q.reshape(B * T, H, hd), K, V, inverse.reshape(B * T, -1),
                          routing.gates.reshape(B * T, -1), self.slot_top_k, self.null_key, dropout, rows)
        return out.reshape(B, T, H * hd)
