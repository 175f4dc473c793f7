"""Memory cross-attention: queries from the hidden states, keys and values from the selected bank chapters.

Shapes: B batch, T time, d model width, w attention width (d, or r for a reduced_dim bank), H heads,
h = w / H head width, C chapters, S slots per chapter, k chapters read per sequence, U distinct chapters
selected in the batch.
"""

from __future__ import annotations

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


class Routing:
    """A routing decision for a batch: chapter ids (B, k) and their gate probabilities (B, k)."""

    def __init__(self, ids: torch.Tensor, gates: torch.Tensor, logits: torch.Tensor | None, pooled: torch.Tensor | None):
        self.ids, self.gates, self.logits, self.pooled = ids, gates, logits, pooled


class MemoryAttention(nn.Module):
    def __init__(self, hidden: int, width: int, num_heads: int, num_chapters: int, top_k: int,
                 qkv_rank: int | None = None, wo_init: str = "zero", dropout: float = 0.0,
                 norm_eps: float = 1e-6, init_std: float = 0.02):
        super().__init__()
        self.width, self.num_heads, self.top_k, self.dropout = width, num_heads, top_k, dropout
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
        B = x.shape[0]
        if self.router is None:
            ids = torch.zeros(B, 1, dtype=torch.long, device=x.device)
            return Routing(ids, torch.ones(B, 1, device=x.device), None, None)
        pooled = masked_mean(x, mask)  # (B, d)
        logits = self.router(pooled)  # (B, C)
        gates, ids = top_k(logits, self.top_k)
        return Routing(ids, gates, logits, pooled.detach())

    # -- keys and values of the selected chapters --------------------------------------------------------
    def project_kv(self, bank: MemoryBank, chapters: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (U, S, w) for the given chapters, each projected once however many sequences read it.
        Outside autograd (eval / generation) they are cached per chapter until a parameter changes."""
        if torch.is_grad_enabled():
            slots = bank.read(chapters)  # (U, S, w)
            return self.k(slots), self.v(slots)
        ks, vs = [], []
        for c in chapters:
            key = self._version_key(bank, c)
            hit = self._kv_cache.get(c)
            if hit is None or hit[0] != key:
                slots = bank.read([c])
                hit = (key, self.k(slots)[0], self.v(slots)[0])
                self._kv_cache[c] = hit
            ks.append(hit[1])
            vs.append(hit[2])
        return torch.stack(ks), torch.stack(vs)

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
    def forward(self, h: torch.Tensor, bank: MemoryBank, routing: Routing | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """h (B, T, d) -> memory output (B, T, d) to add to the residual stream, and the routing used."""
        B, T, _ = h.shape
        H, w = self.num_heads, self.width
        x = self.norm(h)
        if routing is None:
            routing = self.route(x, mask)
        chapters, inverse = torch.unique(routing.ids, return_inverse=True)  # (U,), (B, k)
        K, V = self.project_kv(bank, chapters.tolist())  # (U, S, w)
        S = K.shape[1]
        k = routing.ids.shape[1]
        K = K[inverse].view(B, k * S, H, w // H).transpose(1, 2)  # (B, H, k*S, h)
        V = V[inverse].view(B, k * S, H, w // H).transpose(1, 2)
        q = self.q(x).view(B, T, H, w // H).transpose(1, 2)  # (B, H, T, h)
        bias = None
        if k > 1:  # weight the selected chapters by their router probabilities (renormalised over the k)
            log_g = (routing.gates / routing.gates.sum(-1, keepdim=True)).log().to(q.dtype)  # (B, k)
            bias = log_g.repeat_interleave(S, dim=1)[:, None, None, :]  # (B, 1, 1, k*S)
        out = F.scaled_dot_product_attention(q, K, V, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        out = self.o(out.transpose(1, 2).reshape(B, T, w))  # (B, T, d)
        if self.router is not None:
            # Value 1 exactly, gradient d/dg = 1/g: the LM loss tells the router which chapters helped,
            # without shrinking the output by 1/C as a plain Switch gate would at init.
            g = routing.gates.sum(-1)
            out = out * (g / g.detach()).to(out.dtype)[:, None, None]
        return out, routing
