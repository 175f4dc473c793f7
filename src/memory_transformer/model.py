"""The model facade: a `transformers` causal LM with memory layers, built from a config (a fresh decoder or a
pretrained one). Saving and loading: io.py; LoRA: lora.py."""

from __future__ import annotations

import contextlib
from pathlib import Path

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from memory_transformer.config import Config, ConfigError, load_config, resolve_layers
from memory_transformer.data.tokenizer import load_tokenizer
from memory_transformer.inject import MemoryStack
from memory_transformer.lora import add_lora
from memory_transformer.resolve import resolve_config
from memory_transformer.memory.quant import BITS
from memory_transformer.memory.routing import ContextRouting, generation_routing
from memory_transformer.memory.scope import windows_of
from memory_transformer.memory.subjects import SubjectTracker, track_subjects

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPONENTS = ("base", "memory_bank", "memory_attention", "memory_mlp", "router", "memory_scope", "lora")


def component_of(name: str) -> str:
    """Which component a parameter belongs to, from its name in `MemoryModel.named_parameters()`."""
    if "lora_" in name:
        return "lora"
    if name.startswith("memory.banks."):
        return "memory_bank"
    if name.startswith("memory.scope."):  # memory.scope keys: the codebook (buffers, never trained)
        return "memory_scope"
    if name.startswith("memory.blocks."):
        if ".attn.router." in name:
            return "router"
        return "memory_attention" if ".attn." in name else "memory_mlp"
    return "base"


@dataclass
class MemoryLMOutput(CausalLMOutputWithPast):
    """The base model's output; with labels and router losses, `loss = lm_loss + router_loss`."""

    lm_loss: torch.FloatTensor | None = None
    router_loss: torch.FloatTensor | None = None


class MemoryModel(nn.Module):
    """A `transformers` causal LM with memory layers spliced in. Behaves like the base model:
    `forward(input_ids, attention_mask=None, labels=None)` returns `.loss` and `.logits`; `generate(...)`
    uses the normal KV cache."""

    def __init__(self, config: Config, base: nn.Module, tokenizer=None):
        super().__init__()
        self.config, self.base, self.tokenizer = config, base, tokenizer
        # subject routing (memory) and/or a subject-gated LoRA; its hook runs before the memory's
        self.subjects: SubjectTracker | None = track_subjects(config, tokenizer, base)
        self.memory: MemoryStack | None = None
        if config.memory.enabled:
            n_layers = base.config.num_hidden_layers
            layers = resolve_layers(config.memory.layers, n_layers)
            eos = tokenizer.eos_token_id if tokenizer is not None and config.data.mode == "pretraining" else None
            self.memory = MemoryStack(config.memory, base.config, layers, self.subjects, eos)
            self.memory.to(dtype=next(base.parameters()).dtype)
            self.memory.install(base)
        self.merged = False  # LoRA folded into the base weights (lora.merge_lora): save the base in full

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, router_aux: bool = True, **kwargs):
        """Like the base model's forward. With labels, `.loss` includes the router losses of this batch unless
        `router_aux=False` (the trainer adds them once over the global batch instead)."""
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        out = MemoryLMOutput(**out)
        if self.memory is not None and labels is not None and router_aux:
            out.router_loss = self.memory.aux_loss()
            if out.router_loss is not None:
                out.lm_loss = out.loss
                out.loss = out.loss + out.router_loss
        return out

    @torch.no_grad()
    def generate(self, *args, routing: str | None = None, **kwargs):
        """`transformers` generate (KV cache, batching with left padding). Arguments not given take their
        `inference` defaults (max_new_tokens, greedy or temperature/top_k/top_p sampling). `routing` picks how
        memory chapters are chosen: sequence | rolling | token | hybrid (default `inference.routing`, which
        defaults to the routing the memory was trained with, `memory.routing`; see memory/routing.py). A memory
        with subject or keys routing takes no strategy: every position reads its subject's chapter
        (memory/subjects.py), or its key's (memory/scope.py)."""
        kwargs = {**self._generation_defaults(kwargs), **kwargs}
        gen_cfg = kwargs.get("generation_config") or getattr(self.base, "generation_config", None)
        per_row = "subject routing" if self.subjects is not None else \
            "memory.scope keys" if self.memory is not None and self.memory.scope is not None else None
        if per_row and (kwargs.get("num_beams") or getattr(gen_cfg, "num_beams", 1) or 1) > 1:
            raise ValueError(f"num_beams: {per_row} keeps what each row has read so far, which beam search "
                             "reorders; use greedy decoding or sampling")
        try:
            with self.generating(routing):
                return self.base.generate(*args, **kwargs)
        finally:
            if self.subjects is not None:
                self.subjects.reset()

    @contextlib.contextmanager
    def generating(self, strategy: str | None = None):
        """Within: the memory routes as one generation with `strategy` (memory/routing.py; default
        `inference.routing`, else `memory.routing`). Subject and keys routing take none. Decisions are cleared
        after."""
        if self.memory is None:
            yield self
            return
        routing = self.config.memory.routing
        if routing in ("subject", "keys"):  # every position reads its subject's / its key's chapter: no strategy
            if strategy is not None:
                raise ValueError(f"routing: a memory with {routing} routing routes by {routing}; got {strategy!r}, "
                                 "leave it unset")
            policy = self.memory.default_policy
        else:
            inf = self.config.inference
            policy = generation_routing(strategy or inf.routing or self.config.memory.routing, inf.rolling_window)
        with self.memory.routing_by(policy):
            yield self

    @contextlib.contextmanager
    def scoring(self, context_mask: torch.Tensor | None = None):
        """Within: forwards that score rows. With `context_mask` (B, T) (1 on each row's context tokens) and
        sequence routing, the chapters are chosen on the context alone, as `generate` routes a prompt. After: no
        decisions or mask are kept, so a score does not depend on the previous batch."""
        if self.memory is None:
            yield self
            return
        use_context = context_mask is not None and self.config.memory.routing == "sequence"
        with self.memory.routing_by(ContextRouting(context_mask) if use_context else self.memory.default_policy):
            yield self

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Within: the frozen base model alone (memory reads skipped, LoRA off), e.g. as a distillation teacher."""
        lora = self.base.disable_adapter() if self.config.lora.enabled else contextlib.nullcontext()
        memory = self.memory.bypassed() if self.memory is not None else contextlib.nullcontext()
        with memory, lora:
            yield self

    def _generation_defaults(self, given: dict) -> dict:
        inf = self.config.inference
        out = {} if "max_length" in given else {"max_new_tokens": inf.max_new_tokens}
        out["do_sample"] = given.get("do_sample", not inf.greedy)
        if out["do_sample"]:  # top_k 0 = no top-k filter in transformers
            out.update(temperature=inf.temperature, top_k=inf.top_k or 0, top_p=inf.top_p)
        return out

    def parameter_report(self) -> dict[str, dict[str, int]]:
        """Parameters and bytes per component, plus total and trainable. A quantized bank counts its stored
        values as parameters (none trainable) and its buffers, scales included, as bytes."""
        params = {c: 0 for c in (*COMPONENTS, "total", "trainable")}
        nbytes = dict.fromkeys(params, 0)
        for name, p in self.named_parameters():
            c = component_of(name)
            for key in (c, "total", *(["trainable"] if p.requires_grad else [])):
                params[key] += p.numel()
                nbytes[key] += p.numel() * p.element_size()
        for name, buffer in self.memory.named_buffers("memory") if self.memory is not None else []:
            if component_of(name) == "memory_scope":  # not parameters, but saved with the adapter
                for key in ("memory_scope", "total"):
                    nbytes[key] += buffer.numel() * buffer.element_size()
        for bank in self.memory.banks if self.memory is not None else []:
            values, stored = bank.stored_footprint()  # quantized buffers (not Parameters); (0, 0) when float
            for key in ("memory_bank", "total"):
                params[key] += values
                nbytes[key] += stored
        return {"parameters": params, "bytes": nbytes}

    @torch.no_grad()
    def fit_scope(self, taught: dict[str, torch.Tensor], background: dict[str, torch.Tensor],
                  batch_size: int = 16, seed: int = 0) -> dict[str, int]:
        """memory.scope keys: fit the codebook (memory/scope.py) on the frozen base's hidden states at the first
        memory layer. `taught` and `background` are examples (input_ids, attention_mask (N, T)); a `replay`
        tensor in `taught` marks tokens that are not taught (left out), and so are the positions of a row before
        its first end-of-sequence token. Returns counts for the log."""
        from memory_transformer.inject import decoder_layers

        norm = decoder_layers(self.base)[min(self.memory.layer_ids)].post_attention_layernorm
        found: list[torch.Tensor] = []
        handle = norm.register_forward_pre_hook(lambda module, args: found.append(args[0]))

        pairs = self.memory.scope.pairs  # memory.scope_pairs: also each state's previous one

        def states(ex: dict[str, torch.Tensor], keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            """The kept positions' states, and (pairs) their previous positions' (zeros where that one is not
            kept: a pair is taught only where both its positions are)."""
            out, before = [], []
            for i in range(0, len(ex["input_ids"]), batch_size):
                rows = slice(i, i + batch_size)
                found.clear()
                self.base(input_ids=ex["input_ids"][rows].to(self.device),
                          attention_mask=ex["attention_mask"][rows].to(self.device))
                h, k = found[0].float(), keep[rows].to(self.device)
                out.append(h[k].cpu())
                if pairs:
                    prev = F.pad(h[:, :-1] * k[:, :-1, None], (0, 0, 1, 0))  # position t holds t - 1's state
                    before.append(prev[k].cpu())
            return torch.cat(out), torch.cat(before) if pairs else None

        ids, real = taught["input_ids"], taught["attention_mask"].bool()
        # Taught states only where the document's beginning is in the same row (after an end-of-sequence token):
        # a row that starts inside a document gives its first positions states without context (position 0 sees
        # only its own token), which any text starting with that token would reproduce. For the same reason, not
        # a document's first token: its state says only which token starts the document (a new name's first
        # letter, in a bio that starts with the name), and any text starting with it would open the scope.
        eos = ids == self.tokenizer.eos_token_id
        keep = real & (eos.long().cumsum(1) > 0) & ~F.pad(eos[:, :-1], (1, 0), value=False)
        if "replay" in taught:
            keep &= ~taught["replay"].bool()
        seen = background["attention_mask"].bool()
        try:
            with eval_mode(self), self.adapters_disabled():
                taught_states, taught_prev = states(taught, keep)
                background_states, background_prev = states(background, seen)
        finally:
            handle.remove()
        runs = {}
        if self.memory.scope.ngram is not None:  # memory.scope_match ngram: the ids ending at each kept position's
            width = self.memory.scope.ngram[0]  # word's end (a novel first letter of a word is not a key: "in A")
            inside = keep & ~eos  # a run never holds the end-of-sequence token (which closes the scope)
            texts = [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]  # each token decoded alone
            continues = torch.tensor([text[:1].isalnum() for text in texts], device=ids.device)  # within a word
            ends = word_ends(ids, inside, continues)
            windows = windows_of(ids, width, inside).gather(1, ends[..., None].expand(-1, -1, width))
            runs = {"taught_windows": windows[keep],
                    "background_windows": windows_of(background["input_ids"], width, seen)[seen],
                    "chars": torch.tensor([len("".join(text.split())) for text in texts])}  # but whitespace
        # memory.routing keys: a run's keys open the bank's last chapter (a later round's new one, teach.py)
        return self.memory.scope.fit(taught_states, background_states, seed, self.config.memory.num_chapters - 1,
                                     taught_prev, background_prev, **runs)

    def save_pretrained(self, directory: str | Path) -> None:
        from memory_transformer.io import save_model

        save_model(self, directory)


def word_ends(ids: torch.Tensor, keep: torch.Tensor, continues: torch.Tensor) -> torch.Tensor:
    """ids, keep (B, T) -> (B, T): each position's word's last position (the last of the kept positions after it
    whose tokens continue the word)."""
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device).expand(B, -1)
    stops = torch.where(continues[ids] & keep, T, positions)  # the positions that do not continue a word
    first_stop = stops.flip(1).cummin(1).values.flip(1)  # at or after each position
    return torch.cat([first_stop[:, 1:], torch.full((B, 1), T, device=ids.device)], 1) - 1


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Within: `model` in eval mode; after: the mode it had (train or eval)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------
# Building


def _base_config(cfg: Config, tokenizer):
    from transformers import AutoConfig

    m = cfg.model
    kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads or m.num_heads,
        intermediate_size=m.intermediate_size or 4 * m.hidden_size, max_position_embeddings=m.max_seq_len,
        tie_word_embeddings=m.tie_embeddings, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        initializer_range=cfg.memory.init_std,
    )
    if m.arch in ("qwen3", "mistral"):
        kwargs["head_dim"] = m.hidden_size // m.num_heads
    if m.arch == "mistral":
        kwargs["sliding_window"] = None
    return AutoConfig.for_model(m.arch, **kwargs)


def _load_base(cfg: Config, tokenizer, device: str | torch.device | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg.model
    dtype = DTYPES[m.dtype]
    if m.pretrained is None:
        base_cfg = _base_config(cfg, tokenizer)
        with torch.device(device or "cpu"):
            return AutoModelForCausalLM.from_config(base_cfg, attn_implementation=m.attn_implementation, dtype=dtype)
    if str(device) == "meta":  # shapes only (for `info`): no weights are read
        base_cfg = AutoConfig.from_pretrained(m.pretrained)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(base_cfg, attn_implementation=m.attn_implementation, dtype=dtype)
    try:
        base = AutoModelForCausalLM.from_pretrained(m.pretrained, attn_implementation=m.attn_implementation, dtype=dtype)
    except OSError as e:
        raise ConfigError("model.pretrained", f"cannot load {m.pretrained!r}: {str(e).splitlines()[0]}") from None
    return base.to(device) if device else base


def build_model(config: Config | dict | str, device: str | torch.device | None = None, seed: int | None = None,
                for_training: bool = False) -> MemoryModel:
    """A MemoryModel for `config`: a fresh randomly initialised decoder of `model.arch`, or the pretrained
    `model.pretrained`, with memory attached when `memory.enabled`. `device="meta"` builds shapes only.

    With `memory.quantization` int8/int4 the banks are built as quantized buffers (to load a quantized
    checkpoint into). Those are for inference only: there is no quantization-aware training, so
    `for_training=True` with a quantized config is an error; train in float, then quantize."""
    cfg = resolve_config(config if isinstance(config, Config) else load_config(config))
    if for_training and cfg.memory.enabled and cfg.memory.quantization != "none":
        raise ConfigError("memory.quantization", "quantized banks are for inference: train with "
                          "memory.quantization=none, then `memory-transformer quantize`")
    tokenizer = load_tokenizer(*tokenizer_source(cfg))
    torch.manual_seed(cfg.training.seed if seed is None else seed)
    base = _load_base(cfg, tokenizer, device)
    if len(tokenizer) > base.config.vocab_size:
        raise ConfigError("model.tokenizer", f"{cfg.model.tokenizer or cfg.model.pretrained} has {len(tokenizer)} "
                          f"tokens, more than the base model's vocabulary ({base.config.vocab_size})")
    if cfg.model.pretrained is not None and cfg.memory.enabled:
        resolve_layers(cfg.memory.layers, base.config.num_hidden_layers)  # clear error if out of range
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            model = MemoryModel(cfg, base, tokenizer)
    else:
        with torch.device(device or "cpu"):
            model = MemoryModel(cfg, base, tokenizer)
    freeze = cfg.model.freeze_base if cfg.model.freeze_base is not None else cfg.model.pretrained is not None
    if freeze:
        base.requires_grad_(False)
    if cfg.lora.enabled:
        add_lora(model, cfg)
    _freeze(model, cfg.training.freeze, for_training)
    if for_training and model.memory is not None and cfg.training.bank_optimizer == "lazy_adam":
        for bank in model.memory.banks:  # a lazy AdamW steps the rows read: gradients row-sparse
            bank.use_sparse_grad()
    if model.memory is not None and cfg.memory.quantization != "none":
        for bank in model.memory.banks:  # buffers of the right shapes; a checkpoint load fills them
            bank.quantize_(BITS[cfg.memory.quantization], cfg.memory.quant_group_size)
    return model


def _freeze(model: MemoryModel, components: list[str], for_training: bool) -> None:
    """`training.freeze`: the parameters of these components are not trained."""
    if not components:
        return
    for name, p in model.named_parameters():
        if component_of(name) in components:
            p.requires_grad_(False)
    if for_training and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("training.freeze", f"{components} leaves nothing to train (the base is frozen too)")


def tokenizer_source(cfg: Config) -> tuple[str, str]:
    """(tokenizer name, the config key that chose it): an explicit model.tokenizer wins over the base's own."""
    m = cfg.model
    if m.tokenizer is not None:
        return m.tokenizer, "model.tokenizer"
    return (m.pretrained, "model.pretrained") if m.pretrained is not None else ("bytes", "model.tokenizer")


def quantize_model(model: MemoryModel, bits: int, group_size: int = 64) -> MemoryModel:
    """Convert a trained model's memory banks to `bits`-bit storage in place (8 or 4) and record it in
    `model.config.memory`, so that `save_pretrained` + `load_model` rebuild the same buffers and load them.
    The result is for inference: the banks have no Parameters left to train."""
    mem = model.config.memory
    name = {8: "int8", 4: "int4"}.get(bits)
    if name is None:
        raise ConfigError("memory.quantization", f"bits must be 8 or 4, got {bits}")
    if model.memory is None:
        raise ConfigError("memory.enabled", "the model has no memory bank to quantize")
    if mem.quantization != "none":
        raise ConfigError("memory.quantization", f"the banks are already quantized ({mem.quantization})")
    # Validate the new keys with the whole config (group size vs row width) before touching any weight.
    load_config(model.config, [f"memory.quantization={name}", f"memory.quant_group_size={group_size}"])
    for bank in model.memory.banks:
        bank.quantize_(bits, group_size)
    mem.quantization, mem.quant_group_size = name, group_size  # the MemoryStack shares this object
    for block in model.memory.blocks.values():
        block.attn.clear_cache()  # K/V of the float chapters
    return model
