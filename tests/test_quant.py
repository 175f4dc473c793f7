"""Quantized memory banks: round-trip error bounds, packing, bytes, checkpoints, logits, lazy dequantization."""

import pytest
import torch
from safetensors.torch import load_file

from memory_transformer import ConfigError, build_model, load_model
from memory_transformer.memory.quant import (
    dequantize_int4, dequantize_int8, pack_int4, quantize_int4, quantize_int8, unpack_int4,
)
from memory_transformer.model import quantize_model
from conftest import MEMORY_CASES, tiny_config


def _ids(b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t), generator=g)


def _rows():
    """(6, 64) rows of very different magnitudes, including an all-zero row and one in fp16's subnormal range."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g)
    return x * torch.tensor([1.0, 0.02, 300.0, 0.0, 1e-6, 5.0])[:, None]


# -- pure functions ---------------------------------------------------------------------------------------


def test_int8_error_is_at_most_half_a_scale_per_row():
    x = _rows()
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and q.shape == (6, 64) and scale.shape == (6, 1) and scale.dtype == torch.float16
    assert q.abs().max() <= 127
    err = (dequantize_int8(q, scale) - x).abs()  # (6, 64)
    assert (err <= scale.float() / 2).all()
    assert torch.equal(dequantize_int8(q, scale)[3], torch.zeros(64))  # zero row stays exactly zero
    assert (q.abs().amax(-1)[[0, 1, 2, 5]] == 127).all()  # the absmax value uses the full range


def test_int8_scales_keys_and_values_of_a_learned_row_apart():
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randn(16, 32, generator=g), 0.02 * torch.randn(16, 32, generator=g)], -1)  # [key | value]
    q, scale = quantize_int8(rows, parts=2)
    assert q.shape == (16, 64) and scale.shape == (16, 2)
    back = dequantize_int8(q, scale)
    assert ((back - rows).abs().unflatten(-1, (2, 32)) <= scale.float()[..., None] / 2).all()
    values = rows[:, 32:]
    rel = lambda b: ((b[:, 32:] - values).norm() / values.norm()).item()  # noqa: E731
    assert rel(back) < 0.01
    assert rel(dequantize_int8(*quantize_int8(rows))) > 0.2  # one scale per row: the values are mostly lost


@pytest.mark.parametrize("group", [8, 16, 64])
def test_int4_error_is_at_most_half_a_scale_per_group(group):
    x = _rows().view(2, 3, 64)  # leading dims are kept
    packed, scales = quantize_int4(x, group)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 32)
    assert scales.shape == (2, 3, 64 // group) and scales.dtype == torch.float16
    nibbles = unpack_int4(packed)
    assert nibbles.min() >= 1 and nibbles.max() <= 15  # symmetric [-7, 7] stored as q + 8
    deq = dequantize_int4(packed, scales, group)
    err = (deq - x).unflatten(-1, (64 // group, group)).abs()  # (2, 3, W/g, g)
    assert (err <= scales.float()[..., None] / 2).all()


def test_int4_group_must_divide_the_row():
    with pytest.raises(ConfigError, match=r"memory.quant_group_size: must divide the bank row width \(48\)"):
        quantize_int4(torch.randn(2, 48), 32)


def test_pack_unpack_is_exact_for_all_nibble_pairs():
    a, b = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], -1)  # (256, 2): every (low, high) combination
    packed = pack_int4(pairs)
    assert packed.shape == (256, 1) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0].long(), pairs[:, 0] + 16 * pairs[:, 1])  # element 0 in the low nibble
    assert torch.equal(unpack_int4(packed).long(), pairs)
    assert sorted(packed.flatten().tolist()) == list(range(256))


@pytest.mark.parametrize("n", [1, 3, 15, 16, 33])
def test_pack_unpack_round_trips_odd_and_even_lengths(n):
    x = torch.randint(0, 16, (4, n), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = pack_int4(x)
    assert packed.shape == (4, (n + 1) // 2)
    assert torch.equal(unpack_int4(packed, n), x)


# -- banks in a model -------------------------------------------------------------------------------------


def _model(bits=None, group=64, **memory):
    """A tiny float model with a 256-slot bank of width 64 (projected K/V, every slot read; quantized when `bits`
    is given)."""
    memory = {"num_tokens": 256, "kv": "projected", "slot_top_k": None, **memory}
    model = build_model(tiny_config(model={"hidden_size": 64}, memory=memory))
    return quantize_model(model, bits, group) if bits else model


@pytest.mark.parametrize("bits,max_ratio", [(8, 0.27), (4, 0.15)])
def test_quantized_bank_bytes(bits, max_ratio):
    fp, q = _model().parameter_report(), _model(bits).parameter_report()
    ratio = q["bytes"]["memory_bank"] / fp["bytes"]["memory_bank"]
    expected = {8: (1 + 2 / 64) / 4, 4: (0.5 + 2 / 64) / 4}[bits]  # a value + its share of one fp16 scale
    assert ratio == pytest.approx(expected) and ratio <= max_ratio
    assert q["parameters"]["memory_bank"] == fp["parameters"]["memory_bank"] == 256 * 64  # stored values
    assert q["parameters"]["trainable"] == fp["parameters"]["trainable"] - 256 * 64
    assert q["bytes"]["total"] - fp["bytes"]["total"] == q["bytes"]["memory_bank"] - fp["bytes"]["memory_bank"]


@pytest.mark.parametrize("bits", [8, 4])
def test_saved_file_shrinks_by_the_bank_bytes(bits, tmp_path):
    fp, q = _model(), _model(bits)
    fp.save_pretrained(tmp_path / "fp")
    q.save_pretrained(tmp_path / "q")
    on_disk = (tmp_path / "fp" / "model.safetensors").stat().st_size - (tmp_path / "q" / "model.safetensors").stat().st_size
    saved = fp.parameter_report()["bytes"]["memory_bank"] - q.parameter_report()["bytes"]["memory_bank"]
    assert abs(on_disk - saved) < 2048  # only the safetensors header (key names) differs
    assert saved > 0.7 * fp.parameter_report()["bytes"]["memory_bank"]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_quantized_checkpoint_loads_to_identical_logits(case, bits, tmp_path):
    model = build_model(tiny_config(memory=MEMORY_CASES[case])).eval()
    quantize_model(model, bits, group_size=8)  # 8 divides every row width in the table (32, 16, 8)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.config.memory.quantization == f"int{bits}" and loaded.config.memory.quant_group_size == 8
    for a, b in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a[0] == b[0] and a[1].dtype == b[1].dtype and torch.equal(a[1], b[1])
    bank = loaded.memory.banks[0]
    assert bank.q[0].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert not any(n.startswith("memory.banks.") and p.requires_grad for n, p in loaded.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, loaded(_ids()).logits)


def test_quantized_adapter_holds_bank_buffers_and_loads_exactly(saved_base, tmp_path):
    model = build_model(tiny_config(model={"pretrained": str(saved_base())},
                                    memory={"quant_group_size": 16, "kv": "projected"}))
    quantize_model(model, 4, 16)
    model.save_pretrained(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert all(k.startswith("memory.") for k in saved)
    assert {f"memory.banks.0.{kind}.{c}" for kind in ("q", "scale") for c in range(4)} <= saved.keys()
    assert saved["memory.banks.0.q.0"].shape == (16, 16) and saved["memory.banks.0.scale.0"].shape == (16, 2)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, load_model(tmp_path / "a")(_ids()).logits)


def _memory_effect(model, x):
    """Logits with and without the memory layers (hooks removed, then put back)."""
    with torch.no_grad():
        full = model(x).logits
        model.memory.remove()
        plain = model(x).logits
        model.memory.install(model.base)
    return full, plain


# Rounding noise is s / sqrt(12) per value, s = absmax / qmax ~ 2.4 sigma / qmax for 64 Gaussian values:
# ~0.5% of the bank's rms for int8, ~10% for int4; the memory's effect on the logits inherits it.
@pytest.mark.parametrize("kv", ["projected", "learned"])
@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.2)])
def test_quantized_logits_are_close_to_the_float_model(bits, tol, kv):
    model = _model(kv=kv).eval()
    x = _ids()
    fp, plain = _memory_effect(model, x)
    quantize_model(model, bits, 64)
    with torch.no_grad():
        q = model(x).logits
    # Relative to what the memory contributes, not to the logits (which the base model dominates).
    rel = (q - fp).norm() / (fp - plain).norm()
    assert rel < tol


def test_only_selected_chapters_are_dequantized():
    model = _model(8, num_chapters=8, top_k=1, layers=[0])
    bank = model.memory.banks[0]
    calls = []
    original = bank.dequantize
    bank.dequantize = lambda c: calls.append(c) or original(c)
    x = _ids(b=1)
    model.train()
    model(x)
    selected = model.memory.decisions[0].ids.flatten().tolist()
    assert calls == selected  # 1 of 8 chapters
    calls.clear()
    model.eval()
    with torch.no_grad():
        first = model(x).logits
        assert calls == selected
        calls.clear()
        assert torch.equal(model(x).logits, first) and calls == []  # K/V cached: nothing dequantized
        bank.q[selected[0]].neg_()  # an in-place change of the buffer invalidates the cache
        assert not torch.equal(model(x).logits, first) and calls == selected


def test_factorized_bank_quantizes_the_chapter_factors_and_keeps_b_float():
    model = _model(4, group=8, bank="factorized", bank_rank=16)
    bank = model.memory.banks[0]
    assert bank.q[0].shape == (64, 8) and bank.scale[0].shape == (64, 2)  # A: (S=64, r=16) packed
    assert bank.right.dtype == torch.float32 and not bank.right.requires_grad
    assert bank.read([0, 3]).shape == (2, 64, 64)
    report = model.parameter_report()
    assert report["parameters"]["memory_bank"] == 256 * 16 + 64 * 16
    assert report["bytes"]["memory_bank"] == 256 * 16 // 2 + 256 * 2 * 2 + 64 * 16 * 4


def test_reads_come_out_in_the_model_dtype():
    model = quantize_model(build_model(tiny_config(model={"dtype": "bfloat16"}, memory={"quant_group_size": 16})), 4, 16)
    bank = model.memory.banks[0]
    assert bank.scale[0].dtype == torch.float16 and bank.read([1]).dtype == torch.bfloat16
    assert torch.isfinite(model(_ids()).logits).all()


# -- configuration ----------------------------------------------------------------------------------------


def test_building_a_quantized_model_for_training_is_an_error():
    cfg = tiny_config(memory={"quantization": "int8"})
    with pytest.raises(ConfigError) as e:
        build_model(cfg, for_training=True)
    assert str(e.value) == ("memory.quantization: quantized banks are for inference: train with "
                            "memory.quantization=none, then `memory-transformer quantize`")
    assert build_model(tiny_config(), for_training=True).memory is not None
    assert build_model(cfg).memory.banks[0].bits == 8  # inference build is fine


@pytest.mark.parametrize("memory,width", [({}, 32), ({"bank": "factorized", "bank_rank": 8}, 8),
                                          ({"bank": "reduced_dim", "bank_rank": 12}, 12)])
def test_int4_group_size_must_divide_the_row_width(memory, width):
    with pytest.raises(ConfigError, match=rf"^memory.quant_group_size: must divide the bank row width \({width}\)"):
        tiny_config(memory={**memory, "quantization": "int4", "quant_group_size": 24})
    tiny_config(memory={**memory, "quantization": "int8", "quant_group_size": 24})  # per-row: no group


def test_quantize_model_rejects_bad_requests():
    model = _model()
    with pytest.raises(ConfigError, match="bits must be 8 or 4"):
        quantize_model(model, 3)
    with pytest.raises(ConfigError, match=r"memory.quant_group_size: must divide the bank row width \(64\)"):
        quantize_model(model, 4, 48)
    assert model.config.memory.quantization == "none" and model.memory.banks[0].bits == 0  # left untouched
    quantize_model(model, 4)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, 8)


def test_int8_learned_rows_saved_with_one_scale_per_row_still_load(tmp_path):
    float_model = build_model(tiny_config(memory={"kv": "learned"})).eval()
    chapters = [p.detach().clone() for p in float_model.memory.banks[0].chapters]
    model = quantize_model(float_model, 8)
    bank = model.memory.banks[0]
    assert bank.scale[0].shape == (16, 2)  # [key | value] rows: a scale per half
    old = {k: v for k, v in model.state_dict().items()}
    for i, c in enumerate(chapters):  # the earlier format: one scale per row
        old[f"memory.banks.0.q.{i}"], old[f"memory.banks.0.scale.{i}"] = quantize_int8(c)
    model.load_state_dict(old)
    assert bank.scale[0].shape == (16, 1)
    q, scale = quantize_int8(chapters[2])
    assert torch.equal(bank.read([2])[0], dequantize_int8(q, scale))
    assert torch.isfinite(model(_ids()).logits).all()
