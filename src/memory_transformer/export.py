"""Export a trained model: LoRA merged into the base, the memory weights alone, or a plain transformers folder."""

from __future__ import annotations

from pathlib import Path

from memory_transformer.config import ConfigError
from memory_transformer import lora
from memory_transformer.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_model, new_folder, save_model
from memory_transformer.model import MemoryModel


def export(checkpoint: str | Path, out: str | Path, merge_lora: bool = False, memory_only: bool = False,
           hf: bool = False, allow_base_mismatch: bool = False) -> Path:
    out = new_folder(out, "--out")
    model = load_model(checkpoint, allow_base_mismatch=allow_base_mismatch)
    if merge_lora:
        save_model(lora.merge_lora(model), out)
    elif memory_only:
        export_memory_only(model, out)
    elif hf:
        export_hf(model, out)
    return out


def export_memory_only(model: MemoryModel, out: Path) -> None:
    """config.yaml + adapter_config.json + adapter_model.safetensors with only the memory weights (and LoRA, if
    any): `load_model(out)` loads the named base and puts them on it."""
    if model.memory is None:
        raise ConfigError("memory.enabled", "this model has no memory to export")
    if model.config.model.pretrained is None:
        raise ConfigError("model.pretrained", "--memory-only needs a model whose base is a pretrained model; this "
                          "one was trained from scratch, so its base weights are part of what was trained "
                          "(export the whole folder instead)")
    save_model(model, out, adapter=True)
    assert (out / ADAPTER_CONFIG).is_file() and (out / ADAPTER_WEIGHTS).is_file()


def export_hf(model: MemoryModel, out: Path) -> None:
    """A plain `transformers` folder that `AutoModelForCausalLM.from_pretrained` loads without this package."""
    if model.memory is not None:
        raise ConfigError("memory.enabled", "a model with memory layers cannot be exported as a plain transformers "
                          "model: transformers has no memory layers to load them into (use --memory-only, or "
                          "load it with memory_transformer.load_model)")
    base = lora.merge_lora(model).base if model.config.lora.enabled else model.base
    base.save_pretrained(out)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out)
