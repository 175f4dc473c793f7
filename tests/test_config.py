import subprocess
import sys
from pathlib import Path

import pytest

from memory_transformer import ConfigError, load_config
from memory_transformer.config import bank_groups, resolve_layers

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def test_there_are_example_configs():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "base_small.yaml", "vanilla_control.yaml", "adapter_qwen2.5_1.5b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_validates(path):
    cfg = load_config(path)
    assert cfg.training.output_dir


BASE = {"training": {"max_steps": 1}}


def _err(raw, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config({**BASE, **raw}, overrides)
    return str(e.value)


ERRORS = [
    ({"memory": {"num_chapter": 2}}, "memory.num_chapter: unknown key (did you mean 'memory.num_chapters'?); allowed: "),
    ({"modle": {}}, "modle: unknown key (did you mean 'model'?); allowed: model, memory, lora, data, training, inference"),
    ({"memory": {"num_tokens": "many"}}, "memory.num_tokens: got 'many'; allowed: an integer"),
    ({"memory": {"enabled": "yes"}}, "memory.enabled: got 'yes'; allowed: true/false"),
    ({"memory": {"bank": "huge"}}, "memory.bank: got 'huge'; allowed: standard | factorized | reduced_dim"),
    ({"memory": {"num_tokens": 100, "num_chapters": 3}},
     "memory.num_chapters: must divide memory.num_tokens (100) into equal chapters, got 3"),
    ({"memory": {"num_chapters": 4, "top_k": 5}}, "memory.top_k: must be between 1 and memory.num_chapters (4), got 5"),
    ({"memory": {"layers": [0, 9]}}, "memory.layers: layer index 9 out of range: the model has layers 0..3"),
    ({"memory": {"layers": "middle"}},
     "memory.layers: got 'middle'; allowed: all, first:K, last:K, every:N, or a list of layer indices"),
    ({"memory": {"bank": "factorized"}}, "memory.bank_rank: required (a positive integer) when memory.bank is factorized"),
    ({"memory": {"bank": "reduced_dim"}}, "memory.bank_rank: required (a positive integer) when memory.bank is reduced_dim"),
    ({"memory": {"sharing": "some"}}, "memory.sharing: got 'some'; allowed: shared, per_layer, every:K"),
    ({"model": {"hidden_size": 30}}, "model.num_heads: must divide model.hidden_size (30), got 4"),
    ({"memory": {"routing": "chapter"}}, "memory.routing: got 'chapter'; allowed: sequence | token | subject"),
    ({"inference": {"routing": "random"}}, "inference.routing: got 'random'; allowed: sequence | rolling | token | hybrid"),
    ({"inference": {"rolling_window": 0}}, "inference.rolling_window: must be a positive integer, got 0"),
    ({"inference": {"max_new_tokens": -1}}, "inference.max_new_tokens: must be a positive integer, got -1"),
    ({"inference": {"top_k": 0}}, "inference.top_k: must be a positive integer, got 0"),
    ({"inference": {"temperature": 0.0}}, "inference.temperature: must be > 0 (use inference.greedy for argmax), got 0.0"),
    ({"inference": {"top_p": 1.5}}, "inference.top_p: must be in (0, 1], got 1.5"),
    ({"training": {"bank_optimizer": "sgd"}}, "training.bank_optimizer: got 'sgd'; allowed: adamw | lazy_adam"),
    ({"inference": {"window": 8}}, "inference.window: unknown key (did you mean 'inference.rolling_window'?); allowed: "),
]


@pytest.mark.parametrize("raw,message", ERRORS, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(ERRORS)])
def test_config_errors_name_the_key(raw, message):
    assert _err(raw).startswith(message)


def test_overrides_are_dotted_and_yaml_typed():
    cfg = load_config(BASE, ["memory.top_k=2", "memory.num_chapters=4", "memory.layers=[0, 2]",
                             "training.lr={base: 0.1, router: 0.2}", "model.pretrained=null"])
    assert (cfg.memory.top_k, cfg.memory.layers, cfg.model.pretrained) == (2, [0, 2], None)
    assert (cfg.training.lr.base, cfg.training.lr.router, cfg.training.lr.memory_bank) == (0.1, 0.2, None)
    assert _err({}, ["memory.top_k"]).startswith("override 'memory.top_k' must look like KEY=VALUE")


def test_layer_specs_and_sharing_groups():
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers("first:2", 4) == [0, 1]
    assert resolve_layers("last:1", 4) == [3]
    assert resolve_layers("every:2", 5) == [1, 3]
    assert resolve_layers([3, 0], 4) == [0, 3]
    assert bank_groups("shared", [0, 1, 2]) == [0, 0, 0]
    assert bank_groups("per_layer", [0, 1, 2]) == [0, 1, 2]
    assert bank_groups("every:2", [0, 1, 2, 3, 4]) == [0, 0, 1, 1, 2]


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("memory:\n  num_tokens: 10\n  num_chapters: 4\ntraining:\n  max_steps: 1\n")
    r = subprocess.run([sys.executable, "-m", "memory_transformer", "info", "--config", str(cfg)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == "error: memory.num_chapters: must divide memory.num_tokens (10) into equal chapters, got 4\n"
    assert r.stdout == ""


def test_cli_missing_config_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "memory_transformer", "info", "--config", str(tmp_path / "no.yaml")],
                       capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (2, f"error: config file not found: {tmp_path / 'no.yaml'}\n")


def test_exponent_without_a_dot_is_a_number_in_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 3e-4\n  max_steps: 1\n")
    cfg = load_config(str(path), ["training.weight_decay=1E-2", "memory.init_std=+2e-3"])
    assert (cfg.training.lr, cfg.training.weight_decay, cfg.memory.init_std) == (3e-4, 1e-2, 2e-3)
    with pytest.raises(ConfigError, match=r"training.max_steps: got '1e3'; allowed: an integer"):
        load_config(str(path), ["training.max_steps=1e3"])


def test_resolve_step_checks_the_corpus_size():
    from memory_transformer.resolve import resolve_config

    cfg = load_config({**BASE, "data": {"num_people": 5000}})  # the schema reads no data
    with pytest.raises(ConfigError, match=r"^data.num_people: the synthetic corpus has 1 to 4800 people, got 5000$"):
        resolve_config(cfg)
    confirm = load_config({**BASE, "data": {"num_people": 5000, "corpus": "confirm"}})  # middle names: more people
    assert resolve_config(confirm).data.num_people == 5000
    with pytest.raises(ConfigError, match=r"^data.num_people: the synthetic corpus has 1 to 59616 people, got 70000$"):
        resolve_config(load_config({**BASE, "data": {"num_people": 70000, "corpus": "confirm"}}))
