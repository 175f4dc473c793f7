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

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from memory_transformer.memory.bank import MemoryBank
from memory_transformer.memory.router import Router, masked_mean, top_k


def projection(d_in: int, d_out: int, rank: int | None) -> nn.Module:
    """A bias-free linear map, low rank (d_in -> rank -> d_out) when `rank` is set."""
    if rank is None:
        return nn.Linear(d_in, d_out, bias=False)
    return nn.Sequential(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out, bias=False))


@dataclass
class Routing:
    """A routing decision: chapter ids and their gate probabilities, (B, k) per sequence or (B, T, k) per token.
    `pooled` is the detached router input for the router losses: (B, d), or (N, d) over the real tokens;
    `mask` (B, T) marks the real tokens of a per-token decision (padding is left out of usage statistics)."""

    ids: torch.Tensor
    gates: torch.Tensor
    logits: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    _chapters: tuple[list[int], torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def chapters(self) -> tuple[list[int], torch.Tensor]:
        """The distinct chapters as a list (U,) and each choice's index into it (same shape as ids). Computed
        once: a decision frozen for a whole generation costs no `unique` and no device sync per step."""
        if self._chapters is None:
            chapters, inverse = torch.unique(self.ids, return_inverse=True)
            self._chapters = (chapters.tolist(), inverse)
        return self._chapters


RoutingPlan = Routing | Callable[[torch.Tensor, torch.Tensor | None], Routing] | None


def attend_with_lse(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, dropout: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q (n, H, h) to one chapter's K, V (H, S, h): output (n, H, h) and the log-sum-exp
    of the scores (n, H), which merging partial outputs needs.

    Not SDPA: it does not return the LSE. `aten._scaled_dot_product_flash_attention_for_cpu` does, but only on
    CPU and with the LSE outside autograd (torch 2.13: `lse.requires_grad` is False), while the merge weights
    must pass gradients back to the scores. One matmul + logsumexp is exact, differentiable on any device, and
    costs the same n*S scores SDPA would compute. Scores and softmax in float32 (bf16 models too)."""
    scores = (q.transpose(0, 1) @ K.transpose(1, 2)).float() * q.shape[-1] ** -0.5  # (H, n, S)
    lse = scores.logsumexp(dim=-1)  # (H, n)
    probs = F.dropout(scores.softmax(dim=-1), dropout) if dropout else scores.softmax(dim=-1)
    out = probs.to(V.dtype) @ V  # (H, n, h)
    return out.transpose(0, 1), lse.transpose(0, 1)


class MemoryAttention(nn.Module):
    def __init__(self, hidden: int, width: int, num_heads: int, num_chapters: int, top_k: int,
                 qkv_rank: int | None = None, wo_init: str = "zero", dropout: float = 0.0,
                 norm_eps: float = 1e-6, init_std: float = 0.02, routing: str = "sequence"):
        super().__init__()
        self.width, self.num_heads, self.top_k, self.dropout = width, num_heads, top_k, dropout
        self.routing = routing  # default decision when none is given: "sequence" or "token"
        self.norm = nn.RMSNorm(hidden, eps=norm_eps)
        self.q = projection(hidden, width, qkv_rank)
        self.k = projection(width, width, qkv_rank)
        self.v = projection(width, width, qkv_rank)
        self.o = nn.Linear(width, hidden, bias=False)
        for lin in (m for m in self.modules() if isinstance(m, nn.Linear)):
            nn.init.normal_(lin.weight, std=init_std)
        if wo_init == "zero":  # the layer adds exactly 0 at init: a pretrained model is unchanged
            nn.init.zeros_(self.o.weight)
        self.router = Router(hidden, num_chapters, init_std) if num_chapters > 1 else None
        self._kv_cache: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    # -- routing ---------------------------------------------------------------------------------------
    def route(self, x: torch.Tensor, mask: torch.Tensor | None) -> Routing:
        """Sequence-level routing on the mean of the (normalised, non-padding) hidden states x (B, T, d)."""
        if self.router is None:
            return self._dense(x)
        pooled = masked_mean(x, mask)  # (B, d)
        logits = self.router(pooled)  # (B, C)
        gates, ids = top_k(logits, self.top_k)
        return Routing(ids, gates, logits, pooled.detach())

    def route_tokens(self, x: torch.Tensor, mask: torch.Tensor | None) -> Routing:
        """Token-level routing: every position of x (B, T, d) picks its own top-k chapters, ids (B, T, k)."""
        if self.router is None:
            return self._dense(x)
        logits = self.router(x)  # (B, T, C)
        gates, ids = top_k(logits, self.top_k)
        pooled = x.detach().flatten(0, 1) if mask is None else x.detach()[mask.bool()]  # (N, d) real tokens
        return Routing(ids, gates, logits, pooled, mask)

    def _dense(self, x: torch.Tensor) -> Routing:
        """One chapter, no router: every row reads chapter 0 with gate 1."""
        ids = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        return Routing(ids, torch.ones(x.shape[0], 1, device=x.device))

    def _decide(self, x: torch.Tensor, mask: torch.Tensor | None, plan: RoutingPlan) -> Routing:
        """A given decision, the decision of a plan (x, mask) -> Routing (generation strategies), or our own."""
        if isinstance(plan, Routing):
            return plan
        if plan is not None:
            return plan(x, mask)
        return self.route_tokens(x, mask) if self.routing == "token" else self.route(x, mask)

    # -- keys and values of the selected chapters --------------------------------------------------------
    def project_kv(self, bank: MemoryBank, chapters: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (U, H, S, h) for the given chapters, each projected once however many sequences read it.
        Outside autograd (eval / generation) they are cached per chapter, head-major and contiguous (the layout
        SDPA reads fastest), until a parameter changes; one chapter is then returned without any copy."""
        if torch.is_grad_enabled():
            slots = bank.read(chapters)  # (U, S, w)
            return self._heads(self.k(slots)), self._heads(self.v(slots))
        hits = [self._cached_kv(bank, c) for c in chapters]
        if len(hits) == 1:
            return hits[0][1][None], hits[0][2][None]
        return torch.stack([k for _, k, _ in hits]), torch.stack([v for _, _, v in hits])

    def _cached_kv(self, bank: MemoryBank, chapter: int) -> tuple[tuple, torch.Tensor, torch.Tensor]:
        key = self._version_key(bank, chapter)
        hit = self._kv_cache.get(chapter)
        if hit is None or hit[0] != key:
            slots = bank.read([chapter])  # (1, S, w)
            hit = (key, self._heads(self.k(slots))[0].contiguous(), self._heads(self.v(slots))[0].contiguous())
            self._kv_cache[chapter] = hit
        return hit

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(U, S, w) -> (U, H, S, h), a view."""
        return t.view(*t.shape[:2], self.num_heads, -1).transpose(1, 2)

    def _version_key(self, bank: MemoryBank, chapter: int) -> tuple:
        # In-place updates (optimizer steps, load_state_dict) bump `_version`; `.to()` makes new storage.
        params = [*bank.chapter_params(chapter), *self.k.parameters(), *self.v.parameters()]
        return tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)

    def clear_cache(self) -> None:
        self._kv_cache.clear()

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    # -- the read ------------------------------------------------------------------------------------------
    def forward(self, h: torch.Tensor, bank: MemoryBank, routing: RoutingPlan = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """h (B, T, d) -> memory output (B, T, d) to add to the residual stream, and the routing used."""
        B, T, _ = h.shape
        H, w = self.num_heads, self.width
        x = self.norm(h)
        routing = self._decide(x, mask, routing)
        q = self.q(x).view(B, T, H, w // H)  # (B, T, H, h)
        if routing.ids.dim() == 2 or T == 1:  # per-token routing of one token per row is per-sequence routing
            out = self._read_sequences(q, bank, routing)
        else:
            out = self._read_tokens(q, bank, routing)
        out = self.o(out)  # (B, T, d)
        if self.router is not None and torch.is_grad_enabled():
            # Value 1 exactly, gradient d/dg = 1/g: the LM loss tells the router which chapters helped,
            # without shrinking the output by 1/C as a plain Switch gate would at init. Outside autograd it is
            # exactly x * 1.0, so it is skipped there (generation).
            g = routing.gates.sum(-1)  # (B,) or (B, T)
            g = (g / g.detach()).to(out.dtype)
            out = out * (g[:, None, None] if g.dim() == 1 else g[..., None])
        return out, routing

    def _read_sequences(self, q: torch.Tensor, bank: MemoryBank, routing: Routing) -> torch.Tensor:
        """Every token of row b attends to the concatenation of row b's k chapters. q (B, T, H, h) -> (B, T, w)."""
        B, T, H, hd = q.shape
        chapters, inverse = routing.chapters()
        K, V = self.project_kv(bank, chapters)  # (U, H, S, h)
        S = K.shape[2]
        inverse, gates = inverse.view(B, -1), routing.gates.view(B, -1)  # (B, k); (B, 1, k) when T == 1
        k = inverse.shape[1]
        if len(chapters) == 1:  # one chapter for all rows (always at batch 1, top_k 1): a view, no copy
            K, V = K.expand(B, H, S, hd), V.expand(B, H, S, hd)
        else:  # (B, k, H, S, h) -> (B, H, k*S, h)
            K = K[inverse].transpose(1, 2).reshape(B, H, k * S, hd)
            V = V[inverse].transpose(1, 2).reshape(B, H, k * S, hd)
        bias = None
        if k > 1:  # weight the selected chapters by their router probabilities (renormalised over the k)
            log_g = (gates / gates.sum(-1, keepdim=True)).log().to(q.dtype)  # (B, k)
            bias = log_g.repeat_interleave(S, dim=1)[:, None, None, :]  # (B, 1, 1, k*S)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, attn_mask=bias, dropout_p=dropout)
        return out.transpose(1, 2).reshape(B, T, H * hd)

    def _read_tokens(self, q: torch.Tensor, bank: MemoryBank, routing: Routing) -> torch.Tensor:
        """Every token attends to its own k chapters, MoE-style dispatch. q (B, T, H, h) -> (B, T, w)."""
        B, T, H, hd = q.shape
        k = routing.ids.shape[-1]
        choice = routing.ids.reshape(-1)  # (P,): pair p is token p // k, choice p % k
        order = torch.argsort(choice, stable=True)  # pairs grouped by chapter
        chapters, counts = torch.unique_consecutive(choice[order], return_counts=True)  # (U,), (U,)
        K, V = self.project_kv(bank, chapters.tolist())  # (U, H, S, h): each selected chapter once
        groups = q.reshape(B * T, H, hd)[order // k].split(counts.tolist())  # per chapter: (n_u, H, h)
        dropout = self.dropout if self.training else 0.0
        parts = [attend_with_lse(g, K[u], V[u], dropout) for u, g in enumerate(groups)]
        unsort = torch.empty_like(order)
        unsort[order] = torch.arange(order.numel(), device=order.device)
        out = torch.cat([o for o, _ in parts])[unsort].view(B * T, k, H, hd)  # back in pair order
        lse = torch.cat([l for _, l in parts])[unsort].view(B * T, k, H)
        gates = routing.gates.reshape(B * T, k, 1)
        # Chapter c's share of the token's softmax over all k*S slots: g_c Z_c / sum_c' g_c' Z_c'.
        weight = (lse + (gates / gates.sum(1, keepdim=True)).log()).softmax(dim=1)  # (N, k, H)
        out = (weight.unsqueeze(-1).to(out.dtype) * out).sum(dim=1)  # (N, H, h)
        return out.reshape(B, T, H * hd)
