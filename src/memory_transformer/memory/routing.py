"""Routing: which chapters each position reads. The router that decides, every policy that uses it, the losses.

A policy is resolved once (when the model is built, or when a generate / score call starts) and bound per memory
layer call to a `Decide`, a function (x, mask) -> Routing of the normalised hidden states x (B, T, d); the read
(attention.py) only applies the decision it is given.

- LearnedRouting: the router on the mean of the sequence (B, k) or on every token (B, T, k), as trained.
- SubjectRouting: the chapter of the last taught subject mentioned (memory/subjects.py), no router.
- GenerationRouting: the strategies of one `generate` call (sequence, rolling, hybrid, token; below).
- ContextRouting: one scoring forward of the lm-eval adapter routed on each row's context tokens only.

Generation strategies (`MemoryModel.generate(routing=...)`):
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

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

STRATEGIES = ("sequence", "rolling", "token", "hybrid")


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
    scope_logits: torch.Tensor | None = None  # memory.scope gate: the gate logits (B, T) of this read, with autograd
    _chapters: list[int] | None = field(default=None, init=False, repr=False, compare=False)
    _inverse: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def chapter_list(self) -> list[int]:
        """The distinct chapters, ascending (U,). Computed once: a decision frozen for a whole generation costs no
        `unique` and no device sync per step."""
        if self._chapters is None and self.ids.numel() == 1:  # one choice (decoding at batch 1, top-1): no sort
            self._chapters = [int(self.ids.item())]
        elif self._chapters is None:
            chapters, self._inverse = torch.unique(self.ids, return_inverse=True)
            self._chapters = chapters.tolist()
        return self._chapters

    def chapters(self) -> tuple[list[int], torch.Tensor]:
        """`chapter_list()` and each choice's index into it (same shape as ids)."""
        chapters = self.chapter_list()
        if self._inverse is None:  # one choice: made only when asked (the decoding read does not ask: 3 µs)
            self._inverse = torch.zeros_like(self.ids)
        return chapters, self._inverse


Decide = Callable[[torch.Tensor, "torch.Tensor | None"], Routing]  # (x (B, T, d), mask (B, T)) -> decision


class Router(nn.Module):
    """Chapter logits from hidden states (MoE-style): the learned part of routing."""

    def __init__(self, dim: int, num_chapters: int, top_k: int = 1, init_std: float = 0.02):
        super().__init__()
        self.top_k = top_k
        self.proj = nn.Linear(dim, num_chapters, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (..., d) -> chapter logits (..., C), in float32 for a stable softmax."""
        return F.linear(pooled, self.proj.weight).float()  # not `self.proj(...)`: a module call, 2 µs a token


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over time of x (B, T, d), counting only positions where mask (B, T) is 1."""
    if mask is None:
        return x.select(1, 0) if x.shape[1] == 1 else x.mean(dim=1)  # one position (a decoding step): its own mean
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., C) logits -> gates (..., k) = softmax probabilities of the chosen chapters, ids (..., k)."""
    probs = logits.softmax(dim=-1)
    gates, ids = probs.topk(k, dim=-1)
    return gates, ids


# -- the two learned decisions ---------------------------------------------------------------------------------
def route_sequence(router: Router | None, x: torch.Tensor, mask: torch.Tensor | None) -> Routing:
    """Sequence-level routing on the mean of the (normalised, non-padding) hidden states x (B, T, d)."""
    if router is None:
        return dense(x)
    pooled = masked_mean(x, mask)  # (B, d)
    logits = router(pooled)  # (B, C)
    gates, ids = top_k(logits, router.top_k)
    return Routing(ids, gates, logits, pooled.detach() if pooled.requires_grad else pooled)  # (detach: 1 µs a token)


def route_tokens(router: Router | None, x: torch.Tensor, mask: torch.Tensor | None) -> Routing:
    """Token-level routing: every position of x (B, T, d) picks its own top-k chapters, ids (B, T, k)."""
    if router is None:
        return dense(x)
    logits = router(x)  # (B, T, C)
    gates, ids = top_k(logits, router.top_k)
    pooled = x.detach().flatten(0, 1) if mask is None else x.detach()[mask.bool()]  # (N, d) real tokens
    return Routing(ids, gates, logits, pooled, mask)


def dense(x: torch.Tensor) -> Routing:
    """One chapter, no router: every row reads chapter 0 with gate 1."""
    ids = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
    return Routing(ids, torch.ones(x.shape[0], 1, device=x.device))


# -- policies -------------------------------------------------------------------------------------------------
class Policy(Protocol):
    def bind(self, layer: int, router: Router | None, offset: int) -> Decide:
        """The decision function of one call of memory layer `layer`; `offset` = positions already cached."""


class LearnedRouting:
    """The routing the memory was trained with: per sequence or per token."""

    def __init__(self, per_token: bool):
        self._route = route_tokens if per_token else route_sequence

    def bind(self, layer: int, router: Router | None, offset: int) -> Decide:
        return lambda x, mask: self._route(router, x, mask)


class SubjectRouting:
    """Every position reads the chapter of its subject (gate 1), or nothing (-1): `tracker` (memory/subjects.py)
    has looked the chapters up in the input ids before any layer runs."""

    def __init__(self, tracker):
        self.tracker = tracker

    def bind(self, layer: int, router: Router | None, offset: int) -> Decide:
        ids = self.tracker.chapters[..., None]  # (B, T, 1), read now: a checkpointed re-run sees the same ids
        return lambda x, mask: Routing(ids, torch.ones(ids.shape, device=ids.device), mask=mask)


class ContextRouting:
    """One scoring forward: every memory layer routes each row on its context positions, `context_mask` (B, T)
    (their hidden states do not depend on later tokens)."""

    def __init__(self, context_mask: torch.Tensor):
        self.context_mask = context_mask

    def bind(self, layer: int, router: Router | None, offset: int) -> Decide:
        return lambda x, mask: route_sequence(router, x, self.context_mask[:, -x.shape[1]:])


def generation_routing(strategy: str, window: int) -> Policy:
    """The policy of one `generate` call (module doc)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"routing: got {strategy!r}; allowed: {' | '.join(STRATEGIES)}")
    if strategy == "token":
        return LearnedRouting(per_token=True)
    if strategy == "sequence":
        return FrozenPrompt()
    return RollingRouting(window, whole_prompt=strategy == "hybrid")


class FrozenPrompt:
    """sequence: the prompt's decision, per layer, for the whole generation."""

    def __init__(self):
        self.prompt: dict[int, Routing] = {}  # layer -> decision for the prompt positions

    def bind(self, layer: int, router: Router | None, offset: int) -> Decide:
        return lambda x, mask: self.route(layer, router, x, mask)

    def route(self, layer: int, router: Router | None, x: torch.Tensor, mask: torch.Tensor | None) -> Routing:
        if layer not in self.prompt:  # the first call of this generate: the prompt
            self.prompt[layer] = route_sequence(router, x, _ones_if_none(x, mask))
        return self.prompt[layer]  # one decision for the whole generation (the hot path)


class RollingRouting:
    """rolling / hybrid: the prompt's decision for its positions, then each position routed on the window of W
    positions ending at it. Keeps, per layer, the last W-1 normalised hidden states (B, W-1, d) with their mask."""

    def __init__(self, window: int, whole_prompt: bool):
        self.window, self.whole_prompt = window, whole_prompt  # whole_prompt: hybrid
        self.prompt_len = 0
        self.prompt: dict[int, Routing] = {}  # layer -> decision for the prompt positions
        self.context: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (B, W-1, d), (B, W-1)

    def bind(self, layer: int, router: Router | None, offset: int) -> Decide:
        return lambda x, mask: self.route(layer, router, x, mask, offset)

    def route(self, layer: int, router: Router | None, x: torch.Tensor, mask: torch.Tensor | None,
              offset: int) -> Routing:
        """x (B, T, d): normalised hidden states of positions offset .. offset+T-1 at `layer`; mask (B, T)."""
        if layer in self.prompt and router is None:
            return self.prompt[layer]
        mask = _ones_if_none(x, mask)
        if layer not in self.prompt:  # the first call of this generate: the prompt
            self.prompt_len = x.shape[1]
            means = self._windows(layer, x, mask, 0)
            if not self.whole_prompt and router is not None:  # the prompt's last W tokens = its last window
                self.prompt[layer] = route_sequence(router, means[:, -1:], None)
            else:
                self.prompt[layer] = route_sequence(router, x, mask)
            return self.prompt[layer]
        rolled = route_tokens(router, self._windows(layer, x, mask, offset), None)  # ids (B, T, k)
        return _keep_prompt(rolled, self.prompt[layer], self.prompt_len - offset)

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


def _ones_if_none(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.long, device=x.device) if mask is None else mask


def _keep_prompt(rolled: Routing, prompt: Routing, n: int) -> Routing:
    """Positions of the prompt (the first n of this call; n > 0 only without a KV cache) keep its decision."""
    if n <= 0:
        return rolled
    B, T, k = rolled.ids.shape
    n = min(n, T)
    ids = torch.cat([prompt.ids[:, None].expand(B, n, k), rolled.ids[:, n:]], dim=1)  # (B, T, k)
    gates = torch.cat([prompt.gates[:, None].expand(B, n, k), rolled.gates[:, n:]], dim=1)
    return Routing(ids, gates)


def window_means(x: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of x (B, L, d) over each run of `window` consecutive positions, counting only mask (B, L) == 1:
    (B, L - window + 1, d), one mean per window end. `unfold` is a view: nothing of size L * window is stored."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1)
    sums = (x * m).unfold(1, window, 1).sum(-1)  # (B, L-W+1, d)
    counts = m.unfold(1, window, 1).sum(-1)  # (B, L-W+1, 1)
    return sums / counts.clamp_min(1.0)


# -- losses and statistics ----------------------------------------------------------------------------------
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
