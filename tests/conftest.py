"""Shared tiny configs and the parametrized tables every architecture and memory variant goes through."""

from __future__ import annotations

import pytest
import torch

from memory_transformer import load_config
from memory_transformer.config import ARCHS as SUPPORTED

ARCHS = list(SUPPORTED)

# One row per memory variant (PEFT-style TEST_CASES): adding a variant is adding a row.
# The defaults read learned keys and values, each query its best 8 slots; rows with "projected" cover W_k/W_v,
# rows with slot_top_k None the dense (SDPA, all slots) read.
MEMORY_CASES = {
    "standard-shared-A": {},
    "projected-dense-shared-A": {"kv": "projected", "slot_top_k": None},
    "standard-per_layer-B": {"sharing": "per_layer", "block_variant": "B"},
    "factorized-every2-A": {"bank": "factorized", "bank_rank": 8, "sharing": "every:2"},
    "reduced_dim-shared-B": {"bank": "reduced_dim", "bank_rank": 16, "block_variant": "B", "kv": "projected"},
    "lowrank_qkv-last1-A": {"qkv_rank": 8, "layers": "last:1", "kv": "projected", "slot_top_k": None},
    "dense-1chapter-A": {"num_chapters": 1, "top_k": 1, "slot_top_k": None},
    "slot_top_k4-null-A": {"slot_top_k": 4, "null_slot": True},
}


def tiny_config(arch: str = "llama", memory: dict | None = None, **sections):
    """Tiny sizes; `sections` update the other config sections (e.g. model={...}, lora={...})."""
    raw = {
        "model": {"arch": arch, "hidden_size": 32, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 64},
        "memory": {"num_tokens": 64, "num_chapters": 4, "top_k": 2, "num_heads": 4, "wo_init": "normal", **(memory or {})},
        "training": {"max_steps": 2},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return load_config(raw)


def selected_chapters(model) -> list[set[int]]:
    """Per bank, the chapters that some memory layer selected in the last forward."""
    out = [set() for _ in model.memory.banks]
    for layer, routing in model.memory.decisions.items():
        out[model.memory.bank_of[layer]] |= set(routing.ids.flatten().tolist())
    return out


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def saved_base(tmp_path):
    """Factory: a tiny randomly initialised transformers model of `arch`, saved with save_pretrained."""
    from memory_transformer import build_model

    def make(arch: str = "llama"):
        cfg = tiny_config(arch, memory={"enabled": False})
        model = build_model(cfg, seed=123)
        path = tmp_path / f"base-{arch}"
        model.base.save_pretrained(path)
        model.tokenizer.save_pretrained(path)
        return path

    return make
