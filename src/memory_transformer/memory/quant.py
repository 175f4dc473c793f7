"""Quantized storage for memory banks (inference only): 8-bit per row, 4-bit packed per group.

Both are symmetric absmax schemes, so 0 maps to 0 exactly and there is no zero point to store:
- int8: q = round(x / s) in [-127, 127], one scale s = absmax / 127 per row, or per half row when a row holds
  [key | value] (`kv: learned`: keys start with std 1, values at 0, and one scale for both would round the
  values away).
- int4: q = round(x / s) in [-7, 7] (not [-8, 7]: a symmetric range keeps +absmax and -absmax both exact),
  one scale s = absmax(group) / 7 per `group_size` consecutive values of a row; q + 8 (a nibble in 1..15) is
  packed two to a byte, low nibble first.

Scales are stored in fp16: an int4 value then costs 0.5 + 2 / group_size bytes (0.53 at group 64, 0.133x of
fp32), an int8 value 1 + 2 / width (1 + 4 / row with a learned key and value per row). Scales are rounded up
to fp16, so no value is clipped and |x - dequantize(q)| <= s / 2 holds for the stored s. fp16 limits bank values to |x| < 7 * 65504 (int4).

There is no quantization-aware training: a model is trained in float, then converted with
`model.quantize_model`.
"""

from __future__ import annotations

import torch

from memory_transformer.config import ConfigError

SCALE_DTYPE = torch.float16
BITS = {"int8": 8, "int4": 4}
INT8_MAX, INT4_MAX = 127, 7


def _fp16_scale(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """absmax / qmax as fp16, rounded up: then |x| / s <= qmax, no value is clipped and |x - q s| <= s / 2."""
    s = (absmax.float() / qmax).clamp_min(2.0**-24)  # all-zero rows: any positive scale gives q = 0
    s16 = s.to(SCALE_DTYPE)
    up = torch.nextafter(s16, torch.full_like(s16, float("inf")))  # one fp16 step up (matters for subnormals)
    return torch.where(s16.float() < s, up, s16)


# ---------------------------------------------------------------------------------------------------------
# int8: one scale per row, or per equal part of a row


def quantize_int8(x: torch.Tensor, parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., W) float, W divisible by parts -> q (..., W) int8, scale (..., parts) fp16 with x ~ q * scale
    (each part of a row scaled on its own)."""
    split = x.detach().float().unflatten(-1, (parts, x.shape[-1] // parts))  # (..., P, W/P)
    scale = _fp16_scale(split.abs().amax(-1), INT8_MAX)  # (..., P)
    q = (split / scale.float()[..., None]).round().clamp(-INT8_MAX, INT8_MAX)
    return q.flatten(-2).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (..., W) int8, scale (..., P) -> (..., W) in `dtype`."""
    split = q.float().unflatten(-1, (scale.shape[-1], -1)) * scale.float()[..., None]  # (..., P, W/P)
    return split.flatten(-2).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# int4: per-group scales, two values per byte


def pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """nibbles (..., n) integers in 0..15 -> (..., ceil(n / 2)) uint8, element 2i in the low half of byte i.
    An odd n is padded with one zero nibble; `unpack_int4(packed, n)` drops it again."""
    u = nibbles.to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.cat([u, u.new_zeros(*u.shape[:-1], 1)], dim=-1)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """packed (..., m) uint8 -> nibbles (..., n) uint8 in 0..15 (n defaults to 2m)."""
    low, high = packed & 0x0F, packed >> 4
    nibbles = torch.stack([low, high], dim=-1).flatten(-2)  # (..., 2m), interleaved back to original order
    return nibbles if n is None else nibbles[..., :n]


def quantize_int4(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., W) float, W divisible by group_size -> packed (..., ceil(W / 2)) uint8, scales (..., W / g) fp16."""
    W = x.shape[-1]
    if W % group_size:
        raise ConfigError("memory.quant_group_size", f"must divide the bank row width ({W}) for int4 quantization, got {group_size}")
    groups = x.detach().float().unflatten(-1, (W // group_size, group_size))  # (..., W/g, g)
    scales = _fp16_scale(groups.abs().amax(-1), INT4_MAX)  # (..., W/g)
    q = (groups / scales.float()[..., None]).round().clamp(-INT4_MAX, INT4_MAX)
    return pack_int4((q + 8).flatten(-2)), scales  # nibble = q + 8 in 1..15


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed (..., ceil(W / 2)) uint8, scales (..., W / g) -> (..., W) in `dtype`."""
    W = scales.shape[-1] * group_size
    q = unpack_int4(packed, W).float() - 8  # (..., W) in -7..7 (a stray nibble 0 would read as -8)
    groups = q.unflatten(-1, (scales.shape[-1], group_size)) * scales.float()[..., None]  # (..., W/g, g)
    return groups.flatten(-2).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# Dispatch by bit width (what a bank calls) and whole-model conversion


def quantize(x: torch.Tensor, bits: int, group_size: int, parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 with a scale per row part (`parts` per row), or int4 with a scale per group of `group_size`."""
    return quantize_int8(x, parts) if bits == 8 else quantize_int4(x, group_size)


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_int8(q, scale, dtype) if bits == 8 else dequantize_int4(q, scale, group_size, dtype)
