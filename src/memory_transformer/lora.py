"""LoRA through `peft`: added to a MemoryModel's base, optionally gated by the subject lookup, matched in
trainable parameters to the memory, merged into the base weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from memory_transformer.config import Config, ConfigError

if TYPE_CHECKING:
    from memory_transformer.model import MemoryModel


def _lora_config(cfg: Config):
    from peft import LoraConfig

    lc = cfg.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                      task_type="CAUSAL_LM")


def add_lora(model: MemoryModel, cfg: Config) -> None:
    """Wrap the base in a PEFT LoRA model. The memory hooks stay on the inner modules, which PEFT keeps."""
    from peft import get_peft_model

    try:
        model.base = get_peft_model(model.base, _lora_config(cfg))
    except ValueError as e:
        raise ConfigError("lora.target_modules", f"{cfg.lora.target_modules}: {str(e).splitlines()[0]}") from None
    if cfg.lora.gate == "subject":
        _gate_lora(model)


def _gate_lora(model: MemoryModel) -> None:
    """LoRA's update B(A(x)) only at the positions that read a taught subject: each lora_B output (B, T', out) is
    replaced by 0 outside the last T' positions' mask (T' < T when only the last logits are computed)."""
    from peft.tuners.lora import Linear as LoraLinear, LoraLayer

    tracker = model.subjects
    for name, module in model.base.named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, LoraLinear):
            raise ConfigError("lora.target_modules", f"lora.gate subject gates Linear layers only, not "
                              f"{name.split('.')[-1]} ({type(module).__name__})")
        if isinstance(module, nn.Linear) and ".lora_B." in f".{name}.":
            module.register_forward_hook(
                lambda mod, args, out: tracker.gate(out))


def lora_params_per_rank(model: MemoryModel, targets: list[str]) -> int:
    """Trainable parameters that one unit of LoRA rank adds on `targets`: sum of (in + out) over the Linear
    layers whose name ends with a target."""
    # a plain Linear, or PEFT's LoRA wrapper of one (which also has in/out_features)
    return sum(m.in_features + m.out_features for name, m in model.base.named_modules()
               if name.split(".")[-1] in targets and hasattr(m, "in_features"))


def matching_lora_rank(model: MemoryModel) -> tuple[int, int]:
    """(LoRA rank, its trainable parameters) closest to the memory's trainable parameters."""
    p = model.parameter_report()["parameters"]
    memory = sum(p[c] for c in ("memory_bank", "memory_attention", "memory_mlp", "router"))
    per_rank = lora_params_per_rank(model, model.config.lora.target_modules)
    r = max(1, round(memory / per_rank)) if per_rank else 0
    return r, r * per_rank


def merge_lora(model: MemoryModel) -> MemoryModel:
    """Fold LoRA into the base weights (PEFT `merge_and_unload`); memory layers stay as they are."""
    if not model.config.lora.enabled:
        raise ConfigError("lora.enabled", "this model has no LoRA to merge")
    if model.config.lora.gate != "none":
        raise ConfigError("lora.gate", f"a LoRA gated by {model.config.lora.gate} changes only some positions; "
                          "merged into the base weights it would change all of them: not merged")
    model.base = model.base.merge_and_unload()
    model.config.lora.enabled = False
    model.merged = True  # its base weights differ from `model.pretrained`: always save them in full
    return model
