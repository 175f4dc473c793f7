"""Attach memory layers to any pre-norm `transformers` decoder (Llama, Qwen2, Qwen3, Mistral, ...).

The base model's code is not copied or patched. Its decoder layer computes

    h1 = x + self_attn(input_layernorm(x))
    out = h1 + mlp(post_attention_layernorm(h1))

and we hook two of its modules:

- variant A (attn -> memory -> MLP): a forward pre-hook on `post_attention_layernorm` turns its input h1 into
  h1 + m with m = memory(h1), and a forward hook on `mlp` adds m to the MLP output, so the layer returns
  (h1 + m) + mlp(norm(h1 + m)).
- variant B (attn -> MLP -> memory -> MLP): the pre-hook only remembers h1; the `mlp` hook computes
  h2 = h1 + mlp(...), m = memory(h2), h3 = h2 + m and returns mlp(...) + m + mlp2(norm2(h3)), so the layer
  returns h3 + mlp2(norm2(h3)).

The variant is chosen once, at install: `_hooks_a` or `_hooks_b` make the pair of hooks of one layer. Hooks are
stateless across calls (the stash lives only between the two hooks of one layer call), so they re-run correctly
under gradient checkpointing.

Runtime state (the padding mask of this forward, the routing policy, router decisions, the bypass switch) is held
here and set only through the scoped context managers `routing_by` and `bypassed` (MemoryModel's `generating`,
`scoring` and `adapters_disabled` use them). Register them before `torch.compile`: hooks added after
compilation are not seen. The state dict of the base keeps its own key names.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memory_transformer.config import MemoryConfig, bank_groups
from memory_transformer.memory.attention import AttentionArgs, MemoryAttention
from memory_transformer.memory.bank import MemoryBank
from memory_transformer.memory.routing import LearnedRouting, Policy, Routing, SubjectRouting, chapter_usage, router_losses
from memory_transformer.memory.scope import KeyRouting, ScopeKeys
from memory_transformer.memory.subjects import SubjectTracker


def decoder_layers(base: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a `transformers` causal LM (works through PEFT wrappers too)."""
    for _, module in base.named_modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "mlp"):
            if hasattr(layers[0], "post_attention_layernorm"):
                return layers
    raise ValueError(
        f"{type(base).__name__}: no decoder layers with `post_attention_layernorm` and `mlp` found; "
        "supported: pre-norm decoders such as llama, qwen2, qwen3, mistral"
    )


class MemoryBlock(nn.Module):
    """The memory of one decoder layer: cross-attention (+ router), and variant B's extra MLP."""

    def __init__(self, attn: MemoryAttention, mlp: nn.Module | None = None, norm: nn.Module | None = None):
        super().__init__()
        self.attn = attn
        self.mlp, self.norm = mlp, norm  # variant B only


class MemoryStack(nn.Module):
    """All banks and memory blocks of a model; installs the hooks that splice them into the base decoder."""

    def __init__(self, cfg: MemoryConfig, base_config, layer_ids: list[int], subjects: SubjectTracker | None = None,
                 eos: int | None = None):
        super().__init__()
        self.cfg = cfg
        d = base_config.hidden_size
        eps = getattr(base_config, "rms_norm_eps", 1e-6)
        groups = bank_groups(cfg.sharing, layer_ids)
        self.layer_ids = layer_ids
        self.bank_of = dict(zip(layer_ids, groups))
        learned = cfg.kv == "learned"
        self.banks = nn.ModuleList(
            MemoryBank(cfg.num_tokens, cfg.num_chapters, d, cfg.bank, cfg.bank_rank, cfg.init_std, learned,
                       cfg.key_init_std)
            for _ in range(max(groups) + 1)
        )
        if learned and cfg.wo_init == "identity":
            for bank in self.banks:
                bank.zero_values_()
        args = AttentionArgs.from_config(cfg, d, eps)
        self.blocks = nn.ModuleDict({str(i): MemoryBlock(MemoryAttention(args)) for i in layer_ids})
        # subject routing: the model's tracker (memory/subjects.py), which also gates variant B's extra MLP
        self.subjects = subjects if cfg.routing == "subject" else None
        # memory.scope keys: the codebook deciding, at the first memory layer, which positions any layer reads
        # (and, with memory.routing keys, which chapter)
        self.scope = (ScopeKeys(d, cfg.scope_novelty, cfg.scope_radius, cfg.scope_max_keys, eos,
                                routed=cfg.routing == "keys", pairs=cfg.scope_pairs,
                                ngram=(cfg.scope_ngram_tokens, cfg.scope_ngram_chars) if cfg.scope_match == "ngram"
                                else None) if cfg.scope == "keys" else None)
        # The policy of a plain forward, resolved once; `routing_by` replaces it for one generate / score call.
        self.default_policy: Policy = (SubjectRouting(subjects) if self.subjects is not None
                                       else KeyRouting(self.scope) if cfg.routing == "keys"
                                       else LearnedRouting(per_token=cfg.routing == "token"))
        self._policy = self.default_policy
        self._ids: torch.Tensor | None = None  # this forward's input ids (memory.scope keys: eos closes the scope)
        self._mask: torch.Tensor | None = None  # this forward's attention mask (B, past + T)
        self._past = 0  # positions already in the KV cache before this forward
        self._bypass = False  # True: the hooks add nothing, the decoder computes the base model alone
        self.decisions: dict[int, Routing] = {}  # layer index -> last routing decision (read-only outside)
        self._handles: list = []

    # -- scoped state -------------------------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self._mask

    @property
    def is_bypassed(self) -> bool:
        return self._bypass

    @contextlib.contextmanager
    def routing_by(self, policy: Policy) -> Iterator[None]:
        """Within: every memory layer routes by `policy`; after: the default policy, no decisions, no mask."""
        self._policy = policy
        self.decisions.clear()
        try:
            yield
        finally:
            self._policy, self._mask = self.default_policy, None
            self.decisions.clear()

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """Within: the hooks add nothing (the base model alone); nests."""
        previous, self._bypass = self._bypass, True
        try:
            yield
        finally:
            self._bypass = previous

    def add_variant_b_mlps(self, layers: nn.ModuleList) -> None:
        """Variant B: a fresh copy of each layer's own MLP and norm type, down projection zeroed so the
        block is the identity at init."""
        for i in self.layer_ids:
            block, layer = self.blocks[str(i)], layers[i]
            block.mlp = copy.deepcopy(layer.mlp)
            block.norm = copy.deepcopy(layer.post_attention_layernorm)
            for p in block.mlp.parameters():
                nn.init.normal_(p, std=self.cfg.init_std)
            nn.init.ones_(block.norm.weight)
            last = [m for m in block.mlp.modules() if isinstance(m, nn.Linear)][-1]
            nn.init.zeros_(last.weight)

    # -- hooks ------------------------------------------------------------------------------------------
    def install(self, base: nn.Module) -> None:
        layers = decoder_layers(base)
        variant_b = self.cfg.block_variant == "B"
        if variant_b and self.blocks[str(self.layer_ids[0])].mlp is None:
            self.add_variant_b_mlps(layers)
        self._handles.append(base.register_forward_pre_hook(self._capture_inputs, with_kwargs=True))
        for i in self.layer_ids:
            pre_norm, post_mlp = self._hooks_b(i) if variant_b else self._hooks_a(i)
            layer = layers[i]
            self._handles.append(layer.post_attention_layernorm.register_forward_pre_hook(pre_norm))
            self._handles.append(layer.mlp.register_forward_hook(post_mlp))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _capture_inputs(self, module, args, kwargs):
        self._mask = kwargs.get("attention_mask")
        self._ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        self._past = cache.get_seq_length() if cache is not None else 0

    def _hooks_a(self, i: int):
        """Variant A: h1 + m into the MLP's norm, m added to the MLP's output."""
        stash: dict = {}

        def pre_norm(module, args):
            if self._bypass:
                return None
            m = self._read(i, args[0])
            stash["m"] = m
            return (args[0] + m, *args[1:])

        def post_mlp(module, args, y):
            return None if self._bypass else y + stash.pop("m")

        return pre_norm, post_mlp

    def _hooks_b(self, i: int):
        """Variant B: after the MLP, m = memory(h2) and the block's own MLP on h3 = h2 + m."""
        stash: dict = {}
        block = self.blocks[str(i)]
        # the extra MLP is the memory's too: with subject routing, nothing where nothing is read
        gate = self.subjects.gate if self.subjects is not None else (lambda t: t)

        def pre_norm(module, args):
            if not self._bypass:
                stash["h1"] = args[0]

        def post_mlp(module, args, y):
            if self._bypass:
                return None
            h2 = stash.pop("h1") + y
            m = self._read(i, h2)
            h3 = h2 + m
            return y + m + gate(block.mlp(block.norm(h3)))

        return pre_norm, post_mlp

    def _read(self, i: int, h: torch.Tensor) -> torch.Tensor:
        attn = self.blocks[str(i)].attn
        bank = self.banks[self.bank_of[i]]
        decide = self._policy.bind(i, attn.router, self._past)
        if self.scope is not None:
            if i == self.layer_ids[0]:
                self.scope.observe(h, self._ids, self._past, anchor=self.cfg.scope_anchor)
            if self.cfg.routing != "keys":  # keys routing's decision is the scope's own: -1 out of scope already
                decide = self.scope.restrict(decide)
        mask = self._mask_for(h)
        anchor = self.scope.anchor[:, -h.shape[1]:] if self.cfg.scope_anchor else None
        if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
            out, routing = checkpoint(attn, h, bank, decide, mask, anchor, use_reentrant=False)
        else:
            out, routing = attn(h, bank, decide, mask, anchor)
        self.decisions[i] = routing
        return out.to(h.dtype)

    def _mask_for(self, h: torch.Tensor) -> torch.Tensor | None:
        mask = self._mask
        if mask is None or mask.dim() != 2:
            return None
        return mask[:, -h.shape[1]:]  # with a KV cache the mask covers past + new tokens

    # -- router statistics ----------------------------------------------------------------------------------
    def router_inputs(self) -> dict[int, torch.Tensor]:
        """Detached router inputs per memory layer, from the last forward: pooled (B, d) with sequence routing,
        the N real (non-padding) tokens (N, d) with token routing."""
        return {i: r.pooled for i, r in self.decisions.items() if r.pooled is not None}

    def aux_loss(self, pooled: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Weighted router losses, summed over layers. The router sees its inputs detached, so these losses
        train the router only; the trainer passes the pooled inputs of the whole global batch."""
        pooled = self.router_inputs() if pooled is None else pooled
        coeffs = self.cfg.router_loss
        total = None
        for i, x in pooled.items():
            router = self.blocks[str(i)].attn.router
            losses = router_losses(router(x), self.cfg.top_k)
            term = (coeffs.load_balance * losses["load_balance"] + coeffs.importance * losses["importance"]
                    + coeffs.z_loss * losses["z_loss"])
            total = term if total is None else total + term
        return total

    def scope_loss(self, background: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """memory.scope gate: the weighted margin loss of the last forward's gate logits l (B, T), None without
        a gate. Per memory layer, mean relu(margin + l) over background tokens (`background` (B, T) true: the
        replayed documents) plus mean relu(margin - l) over taught tokens, both over real tokens only (`mask`
        (B, T), the attention mask); averaged over layers, times memory.router_loss.scope."""
        logits = [r.scope_logits for r in self.decisions.values() if r.scope_logits is not None]
        if not logits:
            return None
        m = self.cfg.scope_margin
        real = torch.ones_like(background, dtype=torch.bool) if mask is None else mask.bool()
        bg, taught = background.bool() & real, ~background.bool() & real
        terms = []
        for l in logits:
            low = (torch.relu(l + m) * bg).sum() / bg.sum().clamp(min=1)
            high = (torch.relu(m - l) * taught).sum() / taught.sum().clamp(min=1)
            terms.append(low + high)
        return self.cfg.router_loss.scope * torch.stack(terms).mean()

    def usage(self) -> dict[int, torch.Tensor]:
        """Chapter counts (C,) per memory layer from the last forward, for logging."""
        return {i: chapter_usage(r.ids, self.cfg.num_chapters, r.mask).cpu() for i, r in self.decisions.items()}

    def clear_cache(self) -> None:
        for block in self.blocks.values():
            block.attn.clear_cache()
