"""Saving and loading a MemoryModel (safetensors only; nothing is unpickled).

A saved model is a folder:
  config.yaml                    the resolved experiment config
  model.safetensors              every weight (from-scratch or unfrozen base), or, for a frozen pretrained base,
  adapter_config.json +          only what was trained (memory, LoRA) and the name of the base:
  adapter_model.safetensors      `load_model` loads the base from there and the adapter onto it
  tokenizer files
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from memory_transformer.config import ConfigError, load_config
from memory_transformer.data.tokenizer import load_tokenizer
from memory_transformer.memory.subjects import subject_index
from memory_transformer.model import MemoryModel, build_model, component_of

ADAPTER_CONFIG, ADAPTER_WEIGHTS, FULL_WEIGHTS = "adapter_config.json", "adapter_model.safetensors", "model.safetensors"


def _is_adapter(model: MemoryModel) -> bool:
    if model.merged:
        return False
    frozen = not any(p.requires_grad for n, p in model.named_parameters() if component_of(n) == "base")
    return model.config.model.pretrained is not None and frozen


def trained_state(model: MemoryModel) -> dict[str, torch.Tensor]:
    """What an adapter save holds: every non-base weight (memory, LoRA)."""
    return {k: v for k, v in model.state_dict().items() if component_of(k) != "base"}


def save_model(model: MemoryModel, directory: str | Path, adapter: bool | None = None) -> None:
    """Adapter layout (only what was trained) for a frozen pretrained base, else every weight; `adapter`
    forces one or the other."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out / "config.yaml")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out)
    if _is_adapter(model) if adapter is None else adapter:
        save_file({k: v.contiguous() for k, v in trained_state(model).items()}, out / ADAPTER_WEIGHTS)
        base_cfg = model.base.config
        info = {"base_model": model.config.model.pretrained, "model_type": base_cfg.model_type,
                "hidden_size": base_cfg.hidden_size, "num_hidden_layers": base_cfg.num_hidden_layers}
        (out / ADAPTER_CONFIG).write_text(json.dumps(info, indent=2))
    else:
        from safetensors.torch import save_model as st_save_model

        st_save_model(model, str(out / FULL_WEIGHTS))  # handles tied embeddings


def load_model(directory: str | Path, device: str | torch.device | None = None, overrides: list[str] | None = None) -> MemoryModel:
    """Restore a model saved with `save_pretrained`: same weights, same logits."""
    src = Path(directory)
    if not (src / "config.yaml").is_file():
        raise ConfigError("", f"{src}: not a saved model (no config.yaml)")
    model = build_model(load_config(src / "config.yaml", overrides), device=device)
    load_weights(model, src)
    if (src / "tokenizer_config.json").is_file() or (src / "byte_tokenizer.json").is_file():
        model.tokenizer = load_tokenizer(str(src))
        if model.subjects is not None:  # subjects as the saved tokenizer encodes them
            model.subjects.index = subject_index(model.config, model.tokenizer)
    return model


def load_weights(model: MemoryModel, src: Path) -> None:
    """Load the weights saved in `src` (full model or adapter) into an already built `model`."""
    if (src / ADAPTER_WEIGHTS).is_file():
        _check_adapter_base(model, json.loads((src / ADAPTER_CONFIG).read_text()), src)
        weights = load_file(src / ADAPTER_WEIGHTS, device=str(model.device))
        missing = set(trained_state(model)) - set(weights)
        if missing:
            raise ConfigError("", f"{src / ADAPTER_WEIGHTS}: missing weights {sorted(missing)[:3]}")
        model.load_state_dict(weights, strict=False)
    else:
        from safetensors.torch import load_model as st_load_model

        st_load_model(model, str(src / FULL_WEIGHTS), device=str(model.device))


def _check_adapter_base(model: MemoryModel, info: dict, src: Path) -> None:
    base_cfg = model.base.config
    for key, actual in (("model_type", base_cfg.model_type), ("hidden_size", base_cfg.hidden_size),
                        ("num_hidden_layers", base_cfg.num_hidden_layers)):
        if info.get(key) != actual:
            raise ConfigError("model.pretrained", f"adapter {src} was trained on a base with {key}={info.get(key)}, "
                              f"but {model.config.model.pretrained!r} has {key}={actual}")
