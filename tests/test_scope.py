"""memory.scope gate: exact zero below the threshold at inference, the margin loss, config errors, training."""

import json

import pytest
import torch

from memory_transformer import ConfigError, build_model, load_config
from memory_transformer.config import check_training
from memory_transformer.memory.routing import Routing
from memory_transformer.model import component_of
from memory_transformer.train.trainer import train
from conftest import tiny_config

GATE = {"scope": "gate", "wo_init": "normal", "num_chapters": 1, "top_k": 1}


def _ids(b=2, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t), generator=g)


def _gated(memory: dict | None = None):
    model = build_model(tiny_config("llama", memory={**GATE, **(memory or {})}))
    model.eval()
    return model


def test_closed_gate_positions_equal_the_base_bit_for_bit():
    # memory in the last decoder layer only: after it everything is per position, so a closed position sees no
    # memory at all, whatever the other positions read
    model = _gated({"layers": "last:1"})
    layer = model.memory.layer_ids[0]
    with torch.no_grad():
        model.memory.blocks[str(layer)].attn.scope.weight.normal_(std=1.0)  # about half the tokens closed
    x = _ids()
    with torch.no_grad():
        logits = model(x).logits
        p = torch.sigmoid(model.memory.decisions[layer].scope_logits)
        with model.adapters_disabled():
            base = model(x).logits
    closed = p < 0.5
    assert closed.any() and (~closed).any()
    assert torch.equal(logits[closed], base[closed])
    assert not torch.allclose(logits[~closed], base[~closed])  # open positions do read the memory


def test_gate_closed_everywhere_gives_the_base_model_exactly():
    model = _gated()  # every layer has memory
    for block in model.memory.blocks.values():
        torch.nn.init.constant_(block.attn.scope.bias, -5.0)
    x = _ids()
    with torch.no_grad():
        logits = model(x).logits
        with model.adapters_disabled():
            base = model(x).logits
    assert torch.equal(logits, base)


def test_training_scales_by_the_gate_without_threshold():
    model = _gated({"layers": "last:1"})
    layer = model.memory.layer_ids[0]
    attn = model.memory.blocks[str(layer)].attn
    torch.nn.init.constant_(attn.scope.bias, -5.0)  # sigmoid ~ 0.007: closed at inference, small in training
    model.train()
    x = _ids()
    with torch.no_grad():
        with model.adapters_disabled():
            base = model(x).logits
    logits = model(x).logits
    assert not torch.equal(logits, base)
    logits.sum().backward()
    assert attn.scope.weight.grad is not None and attn.scope.bias.grad.abs().sum() > 0


def test_margin_loss_equals_hand_computed_value():
    model = _gated({"scope_margin": 2.0, "router_loss": {"scope": 0.5}})
    ids, gates = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
    a = torch.tensor([[1.0, -3.0, 0.5], [4.0, -1.0, 0.0]])
    model.memory.decisions.clear()
    model.memory.decisions.update({0: Routing(ids, gates, scope_logits=a),
                                   1: Routing(ids, gates, scope_logits=torch.zeros(2, 3))})
    background = torch.tensor([[0, 1, 1], [0, 0, 1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # layer 0: background real tokens -3, 0.5 -> relu(l + 2) = 0, 2.5 -> 1.25; taught 1, 4, -1 -> relu(2 - l) =
    # 1, 0, 3 -> 4/3. Layer 1 (all 0): 2 + 2. Mean over layers, times 0.5.
    expected = 0.5 * ((1.25 + 4 / 3) + 4.0) / 2
    assert model.memory.scope_loss(background, mask).item() == pytest.approx(expected, rel=1e-6)


def test_gate_parameters_are_memory_attention():
    model = _gated()
    names = [n for n, _ in model.named_parameters() if ".attn.scope." in n]
    assert names and {component_of(n) for n in names} == {"memory_attention"}


def test_off_has_no_gate_parameters():
    model = build_model(tiny_config("llama"))
    assert not any(".attn.scope." in n for n, _ in model.named_parameters())


def test_gate_without_background_data_is_a_config_error():
    cfg = tiny_config("llama", memory=GATE)
    with pytest.raises(ConfigError, match=r"memory.scope: .*data.replay_generated"):
        check_training(cfg)
    check_training(tiny_config("llama", memory=GATE, data={"num_people": 6, "replay_people": [0, 3]}))


@pytest.mark.parametrize("key,value,match", [
    ("block_variant", "B", r"memory.scope: gate needs memory.block_variant A"),
    ("scope_threshold", 1.0, r"memory.scope_threshold: must be in \(0, 1\)"),
    ("scope_margin", -1.0, r"memory.scope_margin: must be >= 0"),
])
def test_gate_config_checks(key, value, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config("llama", memory={**GATE, key: value})


def test_training_with_replayed_people_logs_the_scope_loss(tmp_path):
    raw = {
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "max_seq_len": 64},
        "memory": {"num_tokens": 64, "num_chapters": 1, "top_k": 1, "num_heads": 4, "scope": "gate"},
        "data": {"num_people": 6, "people": [3, 6], "replay_people": [0, 3], "replay_fraction": 0.5,
                 "samples_per_epoch": 24},
        "training": {"max_steps": 3, "batch_size": 4, "grad_accum_steps": 2, "logging_steps": 1,
                     "log_with": ["none"], "output_dir": str(tmp_path / "run"), "save_total_limit": None},
    }
    train(load_config(raw), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("eval")]
    assert all(r["scope_loss"] > 0 for r in steps)
