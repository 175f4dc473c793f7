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

Hooks are stateless across calls (the stash lives only between the two hooks of one layer call), so they
re-run correctly under gradient checkpointing. Register them before `torch.compile`: hooks added after
compilation are not seen. The state dict of the base keeps its own key names.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memory_transformer.config import MemoryConfig, bank_groups
from memory_transformer.memory.attention import MemoryAttention, Routing
from memory_transformer.memory.bank import MemoryBank
from memory_transformer.memory.router import chapter_usage, router_losses
from memory_transformer.memory.strategies import GenerationRouting
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


class RuntimeState:
    """Per-forward state shared by the hooks: the padding mask, the generation routing strategy, router stats."""

    def __init__(self):
        self.attention_mask: torch.Tensor | None = None
        self.past_length = 0  # generation: positions already in the KV cache before this forward
        self.generation: GenerationRouting | None = None  # set by MemoryModel.generate for one call
        self.routing: dict[int, Routing] = {}  # layer index -> last routing decision
        self.bypass = False  # True: the hooks add nothing, the decoder computes the base model alone


class MemoryStack(nn.Module):
    """All banks and memory blocks of a model; installs the hooks that splice them into the base decoder."""

    def __init__(self, cfg: MemoryConfig, base_config, layer_ids: list[int]):
        super().__init__()
        self.cfg = cfg
        d = base_config.hidden_size
        eps = getattr(base_config, "rms_norm_eps", 1e-6)
        width = cfg.bank_rank if cfg.bank == "reduced_dim" else d
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
        self.blocks = nn.ModuleDict({str(i): self._block(d, width, eps) for i in layer_ids})
        self.state = RuntimeState()
        self.subjects: SubjectTracker | None = None  # subject routing: set by MemoryModel (needs the tokenizer)
        self._handles: list = []

    def _block(self, d: int, width: int, eps: float) -> MemoryBlock:
        c = self.cfg
        attn = MemoryAttention(d, width, c.num_heads, c.num_chapters, c.top_k, c.qkv_rank, c.wo_init,
                               c.dropout, eps, c.init_std, c.routing, c.kv == "learned", c.slot_top_k, c.null_slot)
        return MemoryBlock(attn)

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
        if self.cfg.block_variant == "B" and self.blocks[str(self.layer_ids[0])].mlp is None:
            self.add_variant_b_mlps(layers)
        self._handles.append(base.register_forward_pre_hook(self._capture_inputs, with_kwargs=True))
        for i in self.layer_ids:
            stash: dict = {}
            layer = layers[i]
            self._handles.append(layer.post_attention_layernorm.register_forward_pre_hook(self._pre_norm(i, stash)))
            self._handles.append(layer.mlp.register_forward_hook(self._post_mlp(i, stash)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _capture_inputs(self, module, args, kwargs):
        self.state.attention_mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        if self.state.generation is not None:
            self.state.past_length = cache.get_seq_length() if cache is not None else 0

    def _pre_norm(self, i: int, stash: dict):
        def hook(module, args):
            if self.state.bypass:
                return None
            h1 = args[0]
            if self.cfg.block_variant == "B":
                stash["h1"] = h1
                return None
            m = self._read(i, h1)
            stash["m"] = m
            return (h1 + m, *args[1:])

        return hook

    def _post_mlp(self, i: int, stash: dict):
        def hook(module, args, y):
            if self.state.bypass:
                return None
            if self.cfg.block_variant == "A":
                return y + stash.pop("m")
            block = self.blocks[str(i)]
            h2 = stash.pop("h1") + y
            m = self._read(i, h2)
            h3 = h2 + m
            extra = block.mlp(block.norm(h3))
            if self.subjects is not None:  # the extra MLP is the memory's too: nothing where nothing is read
                extra = torch.where(self.subjects.reads(), extra, 0)
            return y + m + extra

        return hook

    def _read(self, i: int, h: torch.Tensor) -> torch.Tensor:
        attn = self.blocks[str(i)].attn
        bank = self.banks[self.bank_of[i]]
        gen = self.state.generation
        plan = gen.plan(i, attn, self.state.past_length) if gen is not None else None  # None: attn's own routing
        mask = self._mask_for(h)
        if self.subjects is not None:
            ids = self.subjects.chapters[..., None]  # (B, T, 1)
            plan = Routing(ids, torch.ones(ids.shape, device=ids.device), mask=mask)
        if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
            out, routing = checkpoint(attn, h, bank, plan, mask, use_reentrant=False)
        else:
            out, routing = attn(h, bank, plan, mask)
        self.state.routing[i] = routing
        return out.to(h.dtype)

    def _mask_for(self, h: torch.Tensor) -> torch.Tensor | None:
        mask = self.state.attention_mask
        if mask is None or mask.dim() != 2:
            return None
        return mask[:, -h.shape[1]:]  # with a KV cache the mask covers past + new tokens

    # -- router statistics ----------------------------------------------------------------------------------
    def router_inputs(self) -> dict[int, torch.Tensor]:
        """Detached router inputs per memory layer, from the last forward: pooled (B, d) with sequence routing,
        the N real (non-padding) tokens (N, d) with token routing."""
        return {i: r.pooled for i, r in self.state.routing.items() if r.pooled is not None}

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

    def usage(self) -> dict[int, torch.Tensor]:
        """Chapter counts (C,) per memory layer from the last forward, for logging."""
        return {i: chapter_usage(r.ids, self.cfg.num_chapters, r.mask).cpu() for i, r in self.state.routing.items()}

    def clear_cache(self) -> None:
        for block in self.blocks.values():
            block.attn.clear_cache()
