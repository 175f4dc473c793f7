"""Routing strategies for generation: which chapters each position reads while `MemoryModel.generate` runs.

- sequence: route once on the (non-padding) prompt; every generated token keeps that decision.
- rolling:  the prompt is routed on its last W tokens; each generated token on the last W tokens up to itself.
- hybrid:   sequence routing for the prompt, rolling while generating.
- token:    every position picks its own chapters (what `memory.routing: token` does in training).

W is `inference.rolling_window`. "Routed on" = the router applied to the mean of the normalised hidden states of
those positions at that memory layer (padding left out). Every decision depends only on positions at or before the
one it serves, and positions of the prompt share the prompt's decision, so the KV-cache path (the prompt, then one
token per call) and the no-cache path (the whole sequence again at every step) route each position the same way.

Beam search reorders the KV cache between steps but not the rolling context kept here: use sequence or token
routing with beams (their decisions do not depend on the order of the rows).
"""

from __future__ import annotations

import torch

from memory_transformer.memory.attention import MemoryAttention, Routing

STRATEGIES = ("sequence", "rolling", "token", "hybrid")


def window_means(x: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of x (B, L, d) over each run of `window` consecutive positions, counting only mask (B, L) == 1:
    (B, L - window + 1, d), one mean per window end. `unfold` is a view: nothing of size L * window is stored."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1)
    sums = (x * m).unfold(1, window, 1).sum(-1)  # (B, L-W+1, d)
    counts = m.unfold(1, window, 1).sum(-1)  # (B, L-W+1, 1)
    return sums / counts.clamp_min(1.0)


class GenerationRouting:
    """The routing state of one `generate` call, per memory layer: the prompt's decision and, for rolling and
    hybrid, the last W-1 normalised hidden states (B, W-1, d) with their mask, the context of the next window."""

    def __init__(self, strategy: str, window: int):
        if strategy not in STRATEGIES:
            raise ValueError(f"routing: got {strategy!r}; allowed: {' | '.join(STRATEGIES)}")
        self.strategy, self.window = strategy, window
        self.prompt_len = 0
        self.prompt: dict[int, Routing] = {}  # layer -> decision for the prompt positions
        self.context: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (B, W-1, d), (B, W-1)

    def plan(self, layer: int, attn: MemoryAttention, offset: int):
        """The routing function MemoryAttention calls with (x, mask); `offset` = positions already cached."""
        return lambda x, mask: self.route(layer, attn, x, mask, offset)

    def route(self, layer: int, attn: MemoryAttention, x: torch.Tensor, mask: torch.Tensor | None,
              offset: int) -> Routing:
        """x (B, T, d): normalised hidden states of positions offset .. offset+T-1 at `layer`; mask (B, T)."""
        if layer in self.prompt and (self.strategy == "sequence" or attn.router is None):
            return self.prompt[layer]  # one decision for the whole generation (the hot path)
        if self.strategy == "token":
            return attn.route_tokens(x, mask)
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device) if mask is None else mask
        if layer not in self.prompt:  # the first call of this generate: the prompt
            self.prompt_len = x.shape[1]
            means = self._windows(layer, x, mask, 0) if self.strategy != "sequence" else None
            if self.strategy == "rolling" and attn.router is not None:  # the prompt's last W tokens = last window
                self.prompt[layer] = attn.route(means[:, -1:], None)
            else:
                self.prompt[layer] = attn.route(x, mask)
            return self.prompt[layer]
        rolled = attn.route_tokens(self._windows(layer, x, mask, offset), None)  # ids (B, T, k)
        return self._keep_prompt(rolled, self.prompt[layer], self.prompt_len - offset)

    def _windows(self, layer: int, x: torch.Tensor, mask: torch.Tensor, offset: int) -> torch.Tensor:
        """Window means (B, T, d) for the T positions of x, and the context kept for the next call."""
        B, T, d = x.shape
        if offset == 0:  # the sequence from its start (prefill, or a step without KV cache): no context
            ctx_x, ctx_m = x.new_zeros(B, self.window - 1, d), mask.new_zeros(B, self.window - 1)
        else:
            ctx_x, ctx_m = self.context[layer]
        xs, ms = torch.cat([ctx_x, x], dim=1), torch.cat([ctx_m, mask], dim=1)  # (B, W-1+T, d), (B, W-1+T)
        self.context[layer] = (xs[:, T:], ms[:, T:])
        return window_means(xs, ms, self.window)

    @staticmethod
    def _keep_prompt(rolled: Routing, prompt: Routing, n: int) -> Routing:
        """Positions of the prompt (the first n of this call; n > 0 only without a KV cache) keep its decision."""
        if n <= 0:
            return rolled
        B, T, k = rolled.ids.shape
        n = min(n, T)
        ids = torch.cat([prompt.ids[:, None].expand(B, n, k), rolled.ids[:, n:]], dim=1)  # (B, T, k)
        gates = torch.cat([prompt.gates[:, None].expand(B, n, k), rolled.gates[:, n:]], dim=1)
        return Routing(ids, gates)
