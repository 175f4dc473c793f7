"""Typed experiment schema: the single source of truth for keys, types and defaults.

A config is one YAML file with the sections below. `load_config` reads it (or a dict), applies dotted
`KEY=VALUE` overrides, checks every key and type against these dataclasses, then checks the combinations
that cannot work. Any problem raises `ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml


class ConfigError(ValueError):
    """A config problem, reported as one line: `<key>: <what is wrong and what is allowed>`."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


Arch = Literal["llama", "qwen2", "qwen3", "mistral"]
ARCHS: tuple[str, ...] = get_args(Arch)  # the supported decoders


@dataclass
class ModelConfig:
    arch: Arch = "llama"
    pretrained: str | None = None  # local path or hub name; then arch and sizes come from it
    freeze_base: bool | None = None  # default: true when `pretrained` is set, false otherwise
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # default: num_heads
    intermediate_size: int | None = None  # default: 4 * hidden_size
    max_seq_len: int = 256
    # bytes (the built-in byte-level tokenizer) or a transformers tokenizer path/name; null = the base's own
    # (model.pretrained), or bytes without a base
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    tie_embeddings: bool = False


@dataclass
class RouterLossConfig:
    load_balance: float = 0.01  # Switch: C * sum_i f_i * P_i
    importance: float = 0.0  # squared coefficient of variation of chapter importance
    z_loss: float = 0.001  # mean logsumexp(logits)^2
    # memory.scope gate: the margin loss, mean relu(margin + l) on background (replayed) tokens and
    # mean relu(margin - l) on taught ones, l the gate logit, averaged over memory layers
    scope: float = 1.0


@dataclass
class MemoryConfig:
    enabled: bool = True  # false = vanilla control: exactly the base model
    num_tokens: int = 1024  # slots in one bank
    num_chapters: int = 1  # the bank is split into this many equal slices
    top_k: int = 1  # chapters each sequence reads
    layers: Union[str, list[int]] = "all"  # all | first:K | last:K | every:N | [indices]
    sharing: str = "shared"  # shared | per_layer | every:K
    bank: Literal["standard", "factorized", "reduced_dim"] = "standard"
    bank_rank: int | None = None  # required by factorized / reduced_dim
    num_heads: int = 4
    qkv_rank: int | None = None  # rank of low-rank Q (and K/V when kv=projected) projections; null = full rank
    wo_init: Literal["zero", "normal", "identity"] = "identity"  # identity: W_o = I, values 0; zero: W_o = 0
    block_variant: Literal["A", "B"] = "A"  # A: attn -> memory -> MLP; B: attn -> MLP -> memory -> MLP
    # sequence | token: a learned router picks chapters per sequence or per token; subject: each token reads the
    # chapter of the last taught subject mentioned before it, and nothing before any (memory/subjects.py); keys
    # (with scope keys): each position reads the chapter of the key it matched, a chapter per round of teaching
    # (`teach --from` adds one), and nothing out of scope (memory/scope.py)
    routing: Literal["sequence", "token", "subject", "keys"] = "sequence"
    # subject routing: the taught subjects (subject i owns chapter i mod num_chapters), or a text file with one
    # per line (path from the working directory); null with data.source synthetic_facts = the taught people.
    # Ignored by other routings (a resolved config can be re-run with memory.routing=sequence)
    subjects: Union[list[str], str, None] = None
    kv: Literal["projected", "learned"] = "learned"  # keys/values: learned directly, or W_k, W_v of one bank row
    slot_top_k: int | None = 8  # sparse read: each query reads its best slots of each chapter; null (or >= S) = all
    null_slot: bool = False  # a learned "nothing here" key with a zero value, so a query can read (almost) nothing
    # gate: a learned scope gate (WISE-style) per token, sigmoid(w . norm(h) + b), scales the memory output; trained
    # with a margin loss (memory.router_loss.scope) to be high on taught text and low on background text (needs
    # data.replay_generated or data.replay_people, variant A). Outside training (eval, no grad) a token whose gate
    # is below scope_threshold gets exactly 0 from the layer: there the model is the base's own, bit for bit
    # keys: a codebook of the frozen base's hidden states at the first memory layer, fitted before training on the
    # teaching documents against samples of the base (data.replay_generated): a document is in scope from its first
    # position that matches a key on; out of scope the memory adds exactly 0 (memory/scope.py)
    scope: Literal["none", "gate", "keys"] = "none"
    scope_threshold: float = 0.5  # gate values below it read nothing at inference
    scope_margin: float = 2.0  # the margin loss wants gate logits >= margin on taught, <= -margin on background tokens
    scope_novelty: float = 0.8  # keys: a taught state is a key when its best cosine to the background is below this
    scope_radius: float = 0.7  # keys: a key matches above b + radius * (1 - b), b its best cosine to the background
    scope_max_keys: int = 8192  # keys: at most this many (a seeded random subset of the candidates)
    # keys: the read's query also sees the mean of the states that matched a key since the position's scope opened
    # (in practice the parts of a new name): q = W_q norm(h) + W_a norm(anchor), W_a trained from 0 (memory/scope.py)
    scope_anchor: bool = False
    # keys: also keys on two consecutive states (the previous position's and this one's), fitted where this state
    # alone is not novel but the pair is (no background pair within scope_novelty on both): a name whose every
    # part the base knows alone, in an order the base never produced (memory/scope.py)
    scope_pairs: bool = False
    # keys: what a position matches. state: its hidden state within a key's radius; ngram: the ids ending at it
    # are a key's run (the shortest run of ids ending at a novel position that the base's samples never contain,
    # at most scope_ngram_tokens tokens, at least scope_ngram_chars characters other than whitespace), so a name
    # opens the scope whatever words surround it, and a word it shares with other text does not (memory/scope.py)
    scope_match: Literal["state", "ngram"] = "state"
    scope_ngram_tokens: int = 12  # ngram: a key's run is at most this many tokens (bytes: characters)
    scope_ngram_chars: int = 7  # ngram: and at least this many characters other than whitespace
    key_init_std: float = 1.0  # kv=learned: init std of the keys (values use init_std)
    router_loss: RouterLossConfig = field(default_factory=RouterLossConfig)
    gradient_checkpointing: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    quantization: Literal["none", "int8", "int4"] = "none"  # bank storage for inference (memory/quant.py)
    quant_group_size: int = 64  # int4: values per scale; must divide the bank row width
    # several processes: process r holds only the chapters c with c % W == r (and their optimizer state); each
    # step fetches the chapters read anywhere from their owners (train/chapters.py)
    shard_chapters: bool = False


@dataclass
class LoRAConfig:
    """LoRA through `peft` (the baseline to compare memory with, or combined with it). Implies a frozen base."""

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # subject: LoRA changes only the positions where a taught subject (memory.subjects) is read, as subject-routed
    # memory does; the baseline that shares its guarantee on untaught subjects. Such a LoRA cannot be merged.
    gate: Literal["none", "subject"] = "none"
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class DataConfig:
    source: str = "synthetic_facts"  # synthetic_facts | a local file (.txt/.jsonl/.parquet) | hf:<dataset name>
    num_people: int = 60
    # synthetic_facts: demo (the corpus settings were tuned on) or confirm (other first, middle and last names,
    # templates, questions and value pools: to confirm a setting on data it was not tuned on)
    corpus: Literal["demo", "confirm"] = "demo"
    people: list[int] | None = None  # [start, stop]: use only people[start:stop] of the corpus
    replay_people: list[int] | None = None  # [start, stop]: mix documents of these (already known) people in
    # ... as this share of the training documents (replay baseline); 0 with memory.scope keys: the samples of
    # data.replay_generated are only the background the keys are fitted against, not trained on
    replay_fraction: float = 0.1
    replay_generated: int | None = None  # or this many samples of the frozen pretrained model: replay, no old data
    replay_temperature: float = 1.0  # sampling temperature of replay_generated (below 1: fewer, cleaner samples)
    replay_loss: Literal["lm", "distill"] = "lm"  # replayed tokens: next-token loss, or KL to the frozen base
    # synthetic_facts, pretraining: this share of each epoch's documents are paragraphs of the standard library's
    # docstrings (the "train" split; locality probes use the others), so a base has real prose to model
    prose_fraction: float = 0.0
    seed: int = 0
    path: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    cache_dir: str | None = None  # local JSONL cache for hub datasets
    mode: Literal["pretraining", "instruction_finetuning"] = "pretraining"
    text_field: str = "text"
    messages_field: str = "messages"
    eval_fraction: float = 0.05
    qa_fraction: float = 0.25  # synthetic facts: share of question/answer documents in training
    samples_per_epoch: int | None = None  # synthetic facts: documents drawn per epoch (default 4 per person)
    max_samples: int | None = None


@dataclass
class LRConfig:
    """Learning rate per component; null = the `base` value."""

    base: float = 1e-3
    memory_bank: float | None = None
    memory_attention: float | None = None  # also variant B's memory MLP
    router: float | None = None
    lora: float | None = None


@dataclass
class WeightDecayConfig:
    """Weight decay per component; null = the `base` value."""

    base: float = 0.0
    memory_bank: float | None = None
    memory_attention: float | None = None
    router: float | None = None
    lora: float | None = None


@dataclass
class TrainingConfig:
    output_dir: str = "runs/default"
    max_steps: int | None = None
    num_epochs: float | None = None
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: Union[float, LRConfig] = 1e-3
    weight_decay: Union[float, WeightDecayConfig] = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float | None = 1.0
    # memory_bank group: adamw = fused AdamW like every group. lazy_adam = row-sparse chapter gradients (token
    # routing with slot top-k: the slots read) and a lazy AdamW: AdamW's update on the values read (a head's key or
    # value of a slot) only; the others keep their moments undecayed and get no weight decay. Cheaper steps when a
    # batch reads many chapters; not AdamW's math. One process only (docs/design.md)
    bank_optimizer: Literal["adamw", "lazy_adam"] = "adamw"
    seed: int = 0
    logging_steps: int = 10
    eval_steps: int | None = None
    eval_recall_people: int | None = None  # synthetic facts: recall at evaluations probes the first N people; null = all
    save_steps: int | None = None
    save_total_limit: int | None = 2
    best_metric: str = "eval_loss"
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0
    max_bad_steps: int = 5
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    gradient_checkpointing: bool = False
    # several processes: ddp = every process holds the whole model; fsdp = FSDP2 shards the model over them
    # (memory banks replicated); one process ignores it
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # components kept as they are (not trained), e.g. [memory_attention] for a later round of teaching: the read
    # the earlier rounds' slots were written for stays the same (docs/experiments.md, issue 17's rounds)
    freeze: list[Literal["memory_bank", "memory_attention", "memory_mlp", "router", "lora"]] = field(
        default_factory=list)


@dataclass
class InferenceConfig:
    # sequence: route once on the prompt; rolling: re-route on the last `rolling_window` tokens while generating
    # (the prompt on its last W); token: every token picks its own chapters; hybrid: sequence for the prompt,
    # rolling while generating; null = as trained (`memory.routing`; must be null with subject or keys routing).
    routing: Literal["sequence", "rolling", "token", "hybrid"] | None = None
    rolling_window: int = 32
    max_new_tokens: int = 64
    greedy: bool = True  # false = sample with temperature / top_k / top_p
    temperature: float = 1.0
    top_k: int | None = None  # sampling: keep the k most likely tokens; null = all
    top_p: float = 1.0  # sampling: nucleus mass


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------------------
# Loading: YAML/dict -> overrides -> typed dataclasses -> cross-field checks


def load_config(source: str | Path | dict | Config | None = None, overrides: list[str] | None = None) -> Config:
    """Read a config from a YAML path, a dict or a Config, apply `KEY=VALUE` overrides, validate."""
    if isinstance(source, Config):
        source = source.to_dict()
    if source is None:
        raw: dict = {}
    elif isinstance(source, dict):
        raw = _deep_copy(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError("", f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("", f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError("", f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError("", f"override {item!r} must look like KEY=VALUE (e.g. memory.top_k=2)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(key, "cannot set a sub-key of a non-mapping value")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(prefix, f"expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            full = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(full, f"unknown key{hint}; allowed: {', '.join(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in raw.items()}
    return cls(**kwargs)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {type(None): "null", int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, str(tp)
    )


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming the key and the allowed values."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"got {value!r}; allowed: {_describe(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(key, f"got {value!r}; allowed: {_describe(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"got {value!r}; allowed: {_describe(tp)}")
        return [_coerce(typing.get_args(tp)[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, f"{key}.")
        raise ConfigError(key, f"got {value!r}; allowed: {_describe(tp)}")
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; every user means the number
    ok = {
        type(None): value is None,
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(key, f"got {value!r}; allowed: {_describe(tp)}")
    return float(value) if tp is float else value


# ---------------------------------------------------------------------------------------------------------
# Cross-field checks (everything that type checks cannot see)

_LAYER_SPEC = re.compile(r"^(all|first:\d+|last:\d+|every:\d+)$")
_SHARING_SPEC = re.compile(r"^(shared|per_layer|every:\d+)$")


def validate(cfg: Config) -> None:
    """Everything a model or an evaluation needs. `check_training` adds what only training needs."""
    m, mem, t = cfg.model, cfg.memory, cfg.training
    _check_ranges(cfg)
    if m.pretrained is None and m.hidden_size % m.num_heads:
        raise ConfigError("model.num_heads", f"must divide model.hidden_size ({m.hidden_size}), got {m.num_heads}")
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
        raise ConfigError("model.num_kv_heads", f"must divide model.num_heads ({m.num_heads}), got {kv}")
    if mem.enabled:
        _check_memory(mem, m)
    if cfg.lora.enabled and not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules", "must name at least one module (e.g. q_proj, v_proj)")
    if cfg.data.replay_people is not None and cfg.data.source != "synthetic_facts":
        raise ConfigError("data.replay_people", f"needs data.source synthetic_facts (the people are its own), got "
                          f"{cfg.data.source}; to replay without old documents use data.replay_generated")
    for key in ("people", "replay_people"):
        p = getattr(cfg.data, key)
        if p is not None and (len(p) != 2 or not 0 <= p[0] < p[1] <= cfg.data.num_people):
            raise ConfigError(f"data.{key}", f"must be [start, stop] with 0 <= start < stop <= data.num_people "
                              f"({cfg.data.num_people}), got {p}")
    _check_replay(cfg)
    if cfg.data.prose_fraction and (cfg.data.source != "synthetic_facts" or cfg.data.mode != "pretraining"):
        raise ConfigError("data.prose_fraction", f"mixes prose into synthetic_facts pretraining documents; got "
                          f"data.source {cfg.data.source}, data.mode {cfg.data.mode}")
    if cfg.data.mode == "instruction_finetuning" and (m.tokenizer == "bytes" or (m.tokenizer, m.pretrained) == (None, None)):
        raise ConfigError(
            "data.mode", "instruction_finetuning needs a chat template: set model.tokenizer to a transformers tokenizer"
        )
    for tracker in t.log_with:
        if tracker not in ("tensorboard", "wandb", "trackio", "none"):
            raise ConfigError("training.log_with", f"unknown tracker {tracker!r}; allowed: tensorboard, wandb, trackio")
    if mem.enabled and mem.routing in ("subject", "keys"):
        _check_lookup_routing(cfg)


def _check_replay(cfg: Config) -> None:
    d = cfg.data
    if d.replay_loss == "distill":
        if d.replay_people is None and d.replay_generated is None:
            raise ConfigError("data.replay_loss", "distill needs replayed documents: set data.replay_people or "
                              "data.replay_generated")
        if cfg.model.pretrained is None or cfg.model.freeze_base is False:
            raise ConfigError("data.replay_loss", "distill learns replayed tokens from the frozen pretrained model: "
                              "needs model.pretrained with a frozen base (model.freeze_base not false)")
        if d.mode != "pretraining":
            raise ConfigError("data.replay_loss", f"distill supports data.mode pretraining only, got {d.mode}")
    replays = d.replay_people is not None or d.replay_generated is not None
    if replays and d.replay_fraction == 0 and not (cfg.memory.enabled and cfg.memory.scope == "keys"):
        raise ConfigError("data.replay_fraction", "0 replays nothing (only memory.scope keys uses the samples "
                          "without training on them); set a share in (0, 1)")
    if d.replay_generated is None:
        return
    if d.replay_people is not None:
        raise ConfigError("data.replay_generated", "replays samples of the model; data.replay_people replays "
                          "known documents: set one of them, not both")
    if cfg.model.pretrained is None:
        raise ConfigError("data.replay_generated", "needs model.pretrained: samples of a randomly initialised "
                          "model hold no knowledge to keep")
    if d.mode != "pretraining":
        raise ConfigError("data.replay_generated", f"supports data.mode pretraining only, got {d.mode}")


def check_training(cfg: Config) -> None:
    """What training needs beyond `validate`: a length, and something to train."""
    t, m = cfg.training, cfg.model
    if t.max_steps is None and t.num_epochs is None:
        raise ConfigError("training.max_steps", "set training.max_steps or training.num_epochs")
    frozen = m.freeze_base if m.freeze_base is not None else m.pretrained is not None
    if frozen and not cfg.memory.enabled and not cfg.lora.enabled:
        raise ConfigError("model.freeze_base", "the base is frozen and there is neither memory (memory.enabled) "
                          "nor LoRA (lora.enabled): nothing to train")
    d = cfg.data
    if cfg.memory.enabled and cfg.memory.scope == "keys":
        _check_scope_keys(cfg, frozen)
    if not (cfg.memory.enabled and cfg.memory.scope == "gate"):
        return
    if d.replay_generated is None and d.replay_people is None:
        raise ConfigError("memory.scope", "gate is trained to stay closed on background text: set "
                          "data.replay_generated (samples of the frozen base) or data.replay_people")
    if d.mode != "pretraining":
        raise ConfigError("memory.scope", f"gate supports data.mode pretraining only (its background tokens are "
                          f"marked when documents are packed), got {d.mode}")


def _check_scope_keys(cfg: Config, frozen: bool) -> None:
    """memory.scope keys: fitted on the frozen base's hidden states against samples of it."""
    if cfg.data.replay_generated is None:
        raise ConfigError("memory.scope", "keys are fitted against background text: set data.replay_generated "
                          "(samples of the frozen base; no old data needed)")
    if not frozen:
        raise ConfigError("memory.scope", "keys are the frozen base's hidden states: a trained base "
                          "(model.freeze_base false) would move them")
    if cfg.lora.enabled:
        raise ConfigError("memory.scope", "keys are the frozen base's hidden states: LoRA (lora.enabled) would "
                          "move them; use LoRA or memory with keys, not both")


# Numeric ranges: (test, what it must be). A null value passes (it means a default, or "off").
_AT_LEAST_1 = (lambda v: v >= 1, "must be a positive integer")
_POSITIVE = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_FRACTION = (lambda v: 0 <= v < 1, "must be in [0, 1)")
_OPEN_FRACTION = (lambda v: 0 < v < 1, "must be in (0, 1)")
_SHARE = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
_RANGES = {
    "model": dict(hidden_size=_AT_LEAST_1, num_layers=_AT_LEAST_1, num_heads=_AT_LEAST_1, num_kv_heads=_AT_LEAST_1,
                  intermediate_size=_AT_LEAST_1, max_seq_len=_AT_LEAST_1),
    "memory": dict(num_tokens=_AT_LEAST_1, num_chapters=_AT_LEAST_1, num_heads=_AT_LEAST_1, bank_rank=_AT_LEAST_1,
                   qkv_rank=_AT_LEAST_1, slot_top_k=(lambda v: v >= 1, "must be null or at least 1"),
                   key_init_std=_POSITIVE, init_std=_POSITIVE, dropout=_FRACTION, quant_group_size=_AT_LEAST_1,
                   scope_threshold=_OPEN_FRACTION, scope_margin=_NON_NEGATIVE,
                   scope_novelty=(lambda v: -1 < v < 1, "must be a cosine in (-1, 1)"),
                   scope_radius=(lambda v: 0 <= v < 1, "must be in [0, 1)"), scope_max_keys=_AT_LEAST_1,
                   scope_ngram_tokens=_AT_LEAST_1, scope_ngram_chars=_AT_LEAST_1),
    "memory.router_loss": dict(load_balance=_NON_NEGATIVE, importance=_NON_NEGATIVE, z_loss=_NON_NEGATIVE,
                               scope=_NON_NEGATIVE),
    "lora": dict(r=_AT_LEAST_1, alpha=_POSITIVE, dropout=_FRACTION),
    "data": dict(num_people=_AT_LEAST_1, replay_fraction=_FRACTION, prose_fraction=_FRACTION, replay_generated=_AT_LEAST_1,
                 replay_temperature=_POSITIVE, eval_fraction=_FRACTION, qa_fraction=_SHARE,
                 samples_per_epoch=_AT_LEAST_1, max_samples=_AT_LEAST_1),
    "training": dict(max_steps=_AT_LEAST_1, num_epochs=_POSITIVE, batch_size=_AT_LEAST_1,
                     grad_accum_steps=_AT_LEAST_1, lr=_POSITIVE, weight_decay=_NON_NEGATIVE,
                     warmup_steps=_NON_NEGATIVE, grad_clip=_POSITIVE, logging_steps=_AT_LEAST_1,
                     eval_steps=_AT_LEAST_1, save_steps=_AT_LEAST_1, save_total_limit=_AT_LEAST_1,
                     early_stopping_patience=_AT_LEAST_1, early_stopping_threshold=_NON_NEGATIVE,
                     max_bad_steps=_AT_LEAST_1, eval_recall_people=_AT_LEAST_1),
    "inference": dict(rolling_window=_AT_LEAST_1, max_new_tokens=_AT_LEAST_1, top_k=_AT_LEAST_1,
                      temperature=(lambda v: v > 0, "must be > 0 (use inference.greedy for argmax)"),
                      top_p=(lambda v: 0 < v <= 1, "must be in (0, 1]")),
}


def _check_ranges(cfg: Config) -> None:
    for section, keys in _RANGES.items():
        node = cfg
        for part in section.split("."):
            node = getattr(node, part)
        for key, (ok, must) in keys.items():
            value = getattr(node, key)
            # a per-component map (training.lr, training.weight_decay): every value set in it
            values = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else {"": value}
            for sub, v in values.items():
                if v is not None and not ok(v):
                    raise ConfigError(f"{section}.{key}{'.' + sub if sub else ''}", f"{must}, got {v}")


def _check_memory(mem: MemoryConfig, m: ModelConfig) -> None:
    if mem.num_tokens % mem.num_chapters:
        raise ConfigError(
            "memory.num_chapters",
            f"must divide memory.num_tokens ({mem.num_tokens}) into equal chapters, got {mem.num_chapters}",
        )
    if not 1 <= mem.top_k <= mem.num_chapters:
        raise ConfigError("memory.top_k", f"must be between 1 and memory.num_chapters ({mem.num_chapters}), got {mem.top_k}")
    if mem.bank in ("factorized", "reduced_dim") and not mem.bank_rank:
        raise ConfigError("memory.bank_rank", f"required (a positive integer) when memory.bank is {mem.bank}")
    if isinstance(mem.layers, str) and not _LAYER_SPEC.match(mem.layers):
        raise ConfigError("memory.layers", f"got {mem.layers!r}; allowed: all, first:K, last:K, every:N, or a list of layer indices")
    if not _SHARING_SPEC.match(mem.sharing):
        raise ConfigError("memory.sharing", f"got {mem.sharing!r}; allowed: shared, per_layer, every:K")
    if m.pretrained is None:  # with a pretrained base the layer count is known only after loading
        resolve_layers(mem.layers, m.num_layers)
    dim = mem.bank_rank if mem.bank == "reduced_dim" else m.hidden_size
    if m.pretrained is None and dim % mem.num_heads:
        raise ConfigError("memory.num_heads", f"must divide the memory attention width ({dim}), got {mem.num_heads}")
    if mem.wo_init == "identity" and mem.bank == "reduced_dim":
        raise ConfigError("memory.wo_init", "identity (the default) needs the memory width to equal the model "
                          "width; set memory.wo_init to zero or normal with bank reduced_dim")
    _check_quantization(mem, m)
    if mem.scope != "none" and mem.block_variant != "A":
        raise ConfigError("memory.scope", f"{mem.scope} needs memory.block_variant A (variant B's extra MLP is not "
                          "scoped, so a closed scope would not leave the base's output)")
    if mem.scope_anchor and mem.scope != "keys":
        raise ConfigError("memory.scope_anchor", "the anchor is the mean of the states that matched a scope key: "
                          f"needs memory.scope keys, got {mem.scope}")
    if mem.scope_pairs and mem.scope != "keys":
        raise ConfigError("memory.scope_pairs", f"pair keys are scope keys: needs memory.scope keys, got {mem.scope}")
    if mem.scope_match != "state" and mem.scope != "keys":
        raise ConfigError("memory.scope_match", f"{mem.scope_match} matches scope keys: needs memory.scope keys, "
                          f"got {mem.scope}")


def _check_quantization(mem: MemoryConfig, m: ModelConfig) -> None:
    # A row is what gets quantized: (S, d) chapters ((S, 2d) with learned K/V: groups must not straddle the
    # key/value border, so they divide d), or the (S, r) chapters / A factors of the other kinds.
    row = mem.bank_rank if mem.bank != "standard" else m.hidden_size
    if mem.quantization == "int4" and (m.pretrained is None or mem.bank != "standard") and row % mem.quant_group_size:
        raise ConfigError("memory.quant_group_size",
                          f"must divide the bank row width ({row}) for int4 quantization, got {mem.quant_group_size}")


def uses_subjects(cfg: Config) -> bool:
    """Whether the model looks subjects up: subject-routed memory or a subject-gated LoRA."""
    return (cfg.memory.enabled and cfg.memory.routing == "subject") or (cfg.lora.enabled and cfg.lora.gate == "subject")


def _check_lookup_routing(cfg: Config) -> None:
    """Subject and keys routing: one chapter per token, looked up (no router), whatever the generation strategy."""
    mem = cfg.memory
    one, what = {
        "subject": ("the one chapter of a token's subject", "its subject's chapter"),
        "keys": ("the one chapter of the key a token matched", "the chapter of the key it matched"),
    }[mem.routing]
    if mem.routing == "keys" and mem.scope != "keys":
        raise ConfigError("memory.routing", f"keys routes by the keys of memory.scope keys: set memory.scope keys, "
                          f"got {mem.scope}")
    if mem.top_k != 1:
        raise ConfigError("memory.top_k", f"{mem.routing} routing reads {one}: must be 1, got {mem.top_k}")
    if cfg.inference.routing is not None:
        raise ConfigError("inference.routing", f"must be null with memory.routing {mem.routing} (every position "
                          f"reads {what}), got {cfg.inference.routing}")


def resolve_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """Turn `memory.layers` into sorted layer indices for a model with `num_layers` decoder layers."""
    if isinstance(spec, list):
        for i in spec:
            if not 0 <= i < num_layers:
                raise ConfigError("memory.layers", f"layer index {i} out of range: the model has layers 0..{num_layers - 1}")
        if len(set(spec)) != len(spec) or not spec:
            raise ConfigError("memory.layers", f"must be a non-empty list of distinct indices, got {spec}")
        return sorted(spec)
    if spec == "all":
        return list(range(num_layers))
    kind, n = spec.split(":")
    n = int(n)
    if n <= 0 or (kind != "every" and n > num_layers):
        raise ConfigError("memory.layers", f"{spec!r}: K must be between 1 and the number of layers ({num_layers})")
    if kind == "first":
        return list(range(n))
    if kind == "last":
        return list(range(num_layers - n, num_layers))
    return list(range(n - 1, num_layers, n))  # every:N -> layers N-1, 2N-1, ...


def bank_groups(sharing: str, layers: list[int]) -> list[int]:
    """Bank index for each memory layer: shared -> all 0; per_layer -> 0..L-1; every:K -> groups of K."""
    if sharing == "shared":
        return [0] * len(layers)
    k = 1 if sharing == "per_layer" else int(sharing.split(":")[1])
    if k <= 0:
        raise ConfigError("memory.sharing", f"every:K needs K >= 1, got {sharing!r}")
    return [i // k for i in range(len(layers))]
