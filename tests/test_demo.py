"""The two demos end to end at toy sizes: tables, JSON, plots, matched LoRA rank, base reuse."""

import json
import shutil

import pytest

from memory_transformer import load_config
from memory_transformer.config import ConfigError
from memory_transformer.demo import matching_intermediate_size, run_adapter_demo, run_demo
from memory_transformer.model import build_model
from memory_transformer.resolve import resolve_config

TINY = {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "intermediate_size": 64, "max_seq_len": 64, "tokenizer": "bytes"}


def _base_cfg():
    return load_config({"model": TINY, "memory": {"enabled": False},
                        "data": {"num_people": 4, "people": [0, 2], "samples_per_epoch": 8},
                        "training": {"max_steps": 2, "batch_size": 4, "log_with": ["none"], "logging_steps": 1}})


def _teach_cfg():
    return load_config({"model": {"pretrained": "unused", "max_seq_len": 64},
                        "memory": {"num_tokens": 64, "layers": [1], "num_heads": 4},
                        "data": {"num_people": 4, "people": [2, 4], "samples_per_epoch": 8},
                        "training": {"max_steps": 2, "batch_size": 4, "log_with": ["none"], "logging_steps": 1}})


def test_adapter_demo_compares_methods_at_matched_parameters_and_reuses_the_base(tmp_path, capsys):
    out = tmp_path / "demo"
    results = run_adapter_demo(_base_cfg(), _teach_cfg(), str(out))
    assert set(results) == {"base", "memory", "lora", "memory+lora"}
    mem, lora, both = results["memory"], results["lora"], results["memory+lora"]
    assert both["trainable"] == mem["trainable"] + lora["trainable"]
    per_rank = 2 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))  # 2 layers: q, o; k, v (2 kv heads); mlp
    assert abs(lora["trainable"] - mem["trainable"]) <= per_rank  # the closest LoRA rank
    for r in (mem, lora, both):
        assert 0.0 <= r["recall_new"] <= 1.0 and 0.0 <= r["recall_old"] <= 1.0 and r["tokens_per_s"] > 0
        assert r["bits_per_param"] >= 0.0
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["memory"]["trainable"] == mem["trainable"]
    assert (out / "comparison.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "LoRA rank" in table and "memory+lora" in table
    again = run_adapter_demo(_base_cfg(), _teach_cfg(), str(out), {"lora-r2": ["memory.enabled=false",
                                                                               "lora.enabled=true", "lora.r=2"]})
    assert "== base: reusing" in capsys.readouterr().out
    assert set(again) == {"base", "lora-r2"} and again["base"] == results["base"]
    assert again["lora-r2"]["trainable"] == 2 * per_rank
    third = run_adapter_demo(_base_cfg(), _teach_cfg(), str(out), {"lora-r2": ["memory.enabled=false",
                                                                               "lora.enabled=true", "lora.r=2"]})
    assert "== lora-r2: reusing" in capsys.readouterr().out and third == again  # same config: not retrained
    with pytest.raises(ConfigError, match="already holds a run"):  # changed config, same name: refused
        run_adapter_demo(_base_cfg(), _teach_cfg(), str(out), {"lora-r2": ["memory.enabled=false",
                                                                           "lora.enabled=true", "lora.r=3"]})
    other_base = load_config(_base_cfg().to_dict(), ["data.seed=1"])  # another base, same folder: refused
    with pytest.raises(ConfigError) as refused:
        run_adapter_demo(other_base, _teach_cfg(), str(out), {"lora-r2": ["memory.enabled=false"]})
    assert str(refused.value) == (f"training.output_dir: {out / 'base'} holds a base trained with another config: "
                                  "data.seed differs; choose another output folder or delete that one")
    moved = tmp_path / "moved"  # the same base in another folder: reused
    moved.mkdir()
    for name in ("base", "base_hf", "base_result.json"):
        (shutil.copytree if (out / name).is_dir() else shutil.copy)(out / name, moved / name)
    capsys.readouterr()
    run_adapter_demo(_base_cfg(), _teach_cfg(), str(moved), {"lora-r2": ["memory.enabled=false", "lora.enabled=true",
                                                                        "lora.r=2"]})
    assert f"== base: reusing {moved / 'base_hf'}" in capsys.readouterr().out


def test_adapter_demo_adds_lora_gated_by_the_same_lookup_when_memory_routes_by_subject():
    from memory_transformer.demo import METHODS, adapter_methods

    assert adapter_methods(_teach_cfg()) == METHODS
    subject = resolve_config(load_config(_teach_cfg().to_dict(), ["memory.routing=subject", "memory.num_chapters=2"]))
    methods = adapter_methods(subject)
    assert list(methods) == ["memory", "lora", "memory+lora", "lora-gated", "memory-keys"]
    keys = load_config(subject.to_dict(), methods["memory-keys"])
    assert (keys.memory.routing, keys.memory.scope, keys.memory.num_chapters) == ("keys", "keys", 1)
    assert (keys.data.replay_generated, keys.data.replay_fraction) == (1024, 0.0)
    gated = load_config(subject.to_dict(), methods["lora-gated"])
    assert (gated.memory.enabled, gated.lora.enabled, gated.lora.gate) == (False, True, "subject")
    assert gated.memory.subjects == subject.memory.subjects and len(gated.memory.subjects) == 2


def test_demo_compares_vanilla_and_memory(tmp_path):
    cfg = load_config({"model": TINY, "memory": {"num_tokens": 64, "num_heads": 4},
                       "data": {"num_people": 3, "samples_per_epoch": 8},
                       "training": {"max_steps": 2, "batch_size": 4, "log_with": ["none"], "logging_steps": 1}})
    results = run_demo(cfg, str(tmp_path / "demo"))
    assert results["memory"]["parameters"] > results["vanilla"]["parameters"]
    assert results["memory"]["trainable"] == results["memory"]["parameters"]
    assert json.loads((tmp_path / "demo" / "comparison.json").read_text())["vanilla"]["knowledge_bits"] > 0
    assert (tmp_path / "demo" / "comparison.png").exists()


def test_demo_methods_reuse_runs_with_the_same_config(tmp_path, capsys):
    cfg = load_config({"model": TINY, "memory": {"num_tokens": 64, "num_heads": 4},
                       "data": {"num_people": 3, "samples_per_epoch": 8},
                       "training": {"max_steps": 2, "batch_size": 4, "log_with": ["none"], "logging_steps": 1}})
    methods = {"wide": ["memory.enabled=false", "model.intermediate_size=96"]}
    first = run_demo(cfg, str(tmp_path / "demo"), methods)
    assert set(first) == {"wide"} and first["wide"]["tokens_per_s"] > 0
    assert first["wide"]["parameters"] == 2 * 3 * 32 * (96 - 64) + sum(
        p.numel() for p in build_model(load_config(cfg.to_dict(), ["memory.enabled=false"])).parameters())
    again = run_demo(cfg, str(tmp_path / "demo"), methods)
    assert "== wide: reusing" in capsys.readouterr().out and again == first
    # a run saved before a config key existed is reused (the key's default keeps the old behaviour) ...
    saved = tmp_path / "demo" / "wide" / "result.json"
    prior = json.loads(saved.read_text())
    del prior["config"]["memory"]["subjects"], prior["config"]["lora"]["gate"]
    saved.write_text(json.dumps(prior))
    assert run_demo(cfg, str(tmp_path / "demo"), methods) == first
    assert "== wide: reusing" in capsys.readouterr().out
    # ... one whose config changed is not: the run folder refuses to be overwritten
    with pytest.raises(ConfigError, match="already holds a run"):
        run_demo(cfg, str(tmp_path / "demo"), {"wide": [*methods["wide"], "training.lr=0.5"]})


def test_matching_intermediate_size_spends_the_memory_parameters_on_the_mlp():
    cfg = load_config({"model": TINY, "memory": {"num_tokens": 64, "num_heads": 4}, "training": {"max_steps": 1}})

    def total(overrides):
        return sum(p.numel() for p in build_model(load_config(cfg.to_dict(), overrides)).parameters())

    width = matching_intermediate_size(cfg)
    memory = total(["memory.enabled=true"])
    per_unit = 3 * 32 * 2  # gate, up, down rows of 2 layers
    assert width > 64
    assert abs(total(["memory.enabled=false", f"model.intermediate_size={width}"]) - memory) <= per_unit / 2
