"""The memory core on every architecture and memory variant (tables in conftest.py)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from memory_transformer import build_model, load_config, load_model
from memory_transformer.memory.routing import router_losses
from conftest import ARCHS, MEMORY_CASES, tiny_config, selected_chapters

CASES = [(a, m) for a in ARCHS for m in MEMORY_CASES]


def _ids(b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_vanilla_equals_plain_transformers_model(arch):
    model = build_model(tiny_config(arch, memory={"enabled": False}))
    plain = AutoModelForCausalLM.from_config(model.base.config)
    plain.load_state_dict(model.base.state_dict())
    x = _ids()
    assert torch.equal(model(x).logits, plain(x).logits)
    assert model.memory is None and model.parameter_report()["parameters"]["total"] == plain.num_parameters()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", ["standard-shared-A", "reduced_dim-shared-B", "factorized-every2-A"])
def test_zero_init_memory_on_pretrained_base_is_exact(arch, case, saved_base):
    path = saved_base(arch)
    memory = {**MEMORY_CASES[case], "wo_init": "zero"}
    model = build_model(tiny_config(arch, memory=memory, model={"pretrained": str(path)}))
    base = AutoModelForCausalLM.from_pretrained(path)
    x = _ids()
    assert torch.equal(model(x).logits, base(x).logits)
    report = model.parameter_report()["parameters"]
    assert report["trainable"] == report["total"] - report["base"] > 0  # base frozen by default


@pytest.mark.parametrize("arch,case", CASES)
def test_step_moves_memory_and_only_selected_chapters_get_gradients(arch, case):
    model = build_model(tiny_config(arch, memory=MEMORY_CASES[case]))
    x = _ids()
    out = model(x, labels=x)
    out.loss.backward()
    for b, (bank, selected) in enumerate(zip(model.memory.banks, selected_chapters(model))):
        for c, p in enumerate(bank.chapters):
            assert (p.grad is not None) == (c in selected), f"bank {b} chapter {c}"
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("memory.")}
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any(".attn.o." in n for n in moved) and any(n.startswith("memory.banks.") for n in moved)


def test_unselected_chapters_are_skipped_by_adamw():
    model = build_model(tiny_config(memory={"num_chapters": 8, "top_k": 1, "layers": [0]}))
    x = _ids(b=1)
    model(x, labels=x).loss.backward()
    (chosen,) = model.memory.decisions[0].ids.flatten().tolist()
    before = [p.detach().clone() for p in model.memory.banks[0].chapters]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt.step()
    for c, p in enumerate(model.memory.banks[0].chapters):
        assert torch.equal(p, before[c]) == (c != chosen)
        assert (p in opt.state) == (c == chosen)


def test_router_losses_equal_hand_computed_values():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p = logits.softmax(-1)
    # top-1 choices: chapter 0, chapter 1 -> f = [1/2, 1/2, 0]
    f = torch.tensor([0.5, 0.5, 0.0])
    expected_lb = 3 * (f * p.mean(0)).sum()
    imp = p.sum(0)
    expected_imp = imp.var(unbiased=False) / imp.mean() ** 2
    expected_z = torch.logsumexp(logits, -1).pow(2).mean()
    got = router_losses(logits, k=1)
    e0, e1 = math.exp(2), math.e
    p00, p11 = e0 / (e0 + 2), e1 / (e1 + 2)
    P0, P1 = (p00 + 1 / (e1 + 2)) / 2, (1 / (e0 + 2) + p11) / 2
    assert got["load_balance"].item() == pytest.approx(3 * (0.5 * P0 + 0.5 * P1), rel=1e-6)
    assert torch.allclose(got["load_balance"], expected_lb)
    assert torch.allclose(got["importance"], expected_imp)
    assert got["z_loss"].item() == pytest.approx((math.log(e0 + 2) ** 2 + math.log(e1 + 2) ** 2) / 2, rel=1e-6)
    assert torch.allclose(got["z_loss"], expected_z)


def test_aux_loss_is_added_with_its_coefficients():
    cfg = tiny_config(memory={"layers": [1], "router_loss": {"load_balance": 0.5, "importance": 0.25, "z_loss": 2.0}})
    model = build_model(cfg)
    x = _ids()
    out = model(x, labels=x)
    router = model.memory.blocks["1"].attn.router
    losses = router_losses(router(model.memory.decisions[1].pooled), k=2)
    expected = 0.5 * losses["load_balance"] + 0.25 * losses["importance"] + 2.0 * losses["z_loss"]
    assert torch.allclose(out.loss - out.lm_loss, expected)
    assert torch.equal(model(x, labels=x, router_aux=False).loss, out.lm_loss)


def _expected_memory_params(d, n_layers_mem, cfg):
    m = cfg.memory
    width = m.bank_rank if m.bank == "reduced_dim" else d
    parts = 2 if m.kv == "learned" else 1  # a learned row is [key | value]
    row = parts * width if m.bank != "factorized" else m.bank_rank
    bank = m.num_tokens * row + (parts * d * m.bank_rank if m.bank == "factorized" else 0)
    proj = (lambda i, o: i * o) if m.qkv_rank is None else (lambda i, o: m.qkv_rank * (i + o))
    kv = 0 if m.kv == "learned" else 2 * proj(width, width)
    attn = d + proj(d, width) + kv + width * d + (width if m.null_slot else 0)
    router = d * m.num_chapters if m.num_chapters > 1 else 0
    return bank, attn * n_layers_mem, router * n_layers_mem


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_info_counts_match_formulas(case):
    cfg = tiny_config(memory=MEMORY_CASES[case])
    model = build_model(cfg, device="meta")
    n_mem = len(model.memory.layer_ids)
    n_banks = len(model.memory.banks)
    bank, attn, router = _expected_memory_params(32, n_mem, cfg)
    p = model.parameter_report()["parameters"]
    assert p["memory_bank"] == bank * n_banks
    assert p["memory_attention"] == attn
    assert p["router"] == router
    mlp_per_layer = 3 * 32 * 64 + 32  # swiglu gate/up/down + norm
    assert p["memory_mlp"] == (mlp_per_layer * n_mem if cfg.memory.block_variant == "B" else 0)
    assert p["total"] == sum(p[c] for c in ("base", "memory_bank", "memory_attention", "memory_mlp", "router", "lora"))
    assert model.parameter_report()["bytes"]["total"] == 4 * p["total"]


@pytest.mark.parametrize("arch,case", [(a, c) for a in ARCHS for c in ("standard-per_layer-B", "factorized-every2-A")])
def test_save_load_round_trip_gives_equal_logits(arch, case, tmp_path):
    model = build_model(tiny_config(arch, memory=MEMORY_CASES[case]))
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x = _ids()
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_adapter_save_holds_only_memory_and_loads_exactly(saved_base, tmp_path):
    path = saved_base("qwen2")
    model = build_model(tiny_config("qwen2", model={"pretrained": str(path)}))
    model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "model.safetensors").exists()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert all(k.startswith("memory.") for k in saved)
    assert sum(v.numel() for v in saved.values()) == model.parameter_report()["parameters"]["trainable"]
    x = _ids()
    assert torch.equal(model(x).logits, load_model(tmp_path / "a")(x).logits)


@pytest.mark.parametrize("arch,case", CASES)
def test_left_padding_gives_same_rows_as_unpadded(arch, case):
    model = build_model(tiny_config(arch, memory=MEMORY_CASES[case])).eval()
    a, b = _ids(1, 10, 1), _ids(1, 6, 2)
    pad = model.tokenizer.pad_token_id
    batch = torch.cat([a, torch.cat([torch.full((1, 4), pad), b], 1)])
    mask = (torch.arange(10) >= torch.tensor([[0], [4]])).long()
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(batch, attention_mask=mask, position_ids=pos).logits
        ref_a, ref_b = model(a).logits, model(b).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], ref_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 4:], ref_b[0], atol=1e-5, rtol=1e-5)


def test_eval_kv_cache_is_reused_and_dropped_when_parameters_change():
    model = build_model(tiny_config(memory={"layers": [0]}))
    attn = model.memory.blocks["0"].attn
    x = _ids()
    model.eval()
    with torch.no_grad():
        first = model(x).logits
        cached = dict(attn._kv_cache)
        assert cached and torch.equal(model(x).logits, first)
        assert all(attn._kv_cache[c][1] is cached[c][1] for c in cached)  # reused, not recomputed
        for p in model.memory.banks[0].chapters:
            p.add_(0.5)
        changed = model(x).logits
    with torch.enable_grad():
        reference = model(x).logits  # no cache on the autograd path
    assert not torch.equal(changed, first)
    torch.testing.assert_close(changed, reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", ["A", "B"])
def test_gradient_checkpointing_gives_same_loss_and_gradients(variant):
    cfg = tiny_config(memory={"block_variant": variant})
    ref = build_model(cfg)
    ckpt = build_model(load_config(cfg.to_dict(), ["memory.gradient_checkpointing=true"]))
    ckpt.load_state_dict(ref.state_dict())
    ckpt.base.activation_checkpointing_enable()
    ref.train(), ckpt.train()
    x = _ids()
    l1, l2 = ref(x, labels=x).loss, ckpt(x, labels=x).loss
    l1.backward(), l2.backward()
    torch.testing.assert_close(l1, l2)
    g1 = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    g2 = {n: p.grad for n, p in ckpt.named_parameters() if p.grad is not None}
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-6, rtol=1e-5)
