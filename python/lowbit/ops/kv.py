"""Quantized KV cache (KIVI-style): 2/4-bit keys per channel over groups of tokens, values per token over groups of
32 channels, and decode attention that reads the packed cache directly (include/lowbit/kv.h has the layout).

Per sequence b and KV head h, head_dim D in ``KV_HEAD_DIMS``, ``bits`` in {2, 4}, key group G in {32, 64, 128}::

    k_codes  int32 [B, H, T_groups, D, G*bits/32]   channel d of token group t: its G codes packed along tokens
    k_scale, k_zero  float16 [B, H, T_groups, D]
    v_codes  int32 [B, H, T_q, ceil(D/32)*bits]     token i: its D codes packed along channels
    v_scale, v_zero  float16 [B, H, T_q, ceil(D/32)]
    k_res, v_res     float32/float16/bfloat16 [B, H, R, D]   the newest tokens, in full precision

with T_q = T_groups * G. Codes use the canonical packing of :mod:`lowbit.ops.pack` (32 codes per ``bits``
little-endian words), so a value row is a canonical row of D codes. A value x is ``scale * (q - zero)`` with a
real-valued zero point from the group's min/max. Sequence b holds ``lengths_q[b]`` quantized tokens (a multiple
of G) followed by ``lengths_res[b]`` window tokens.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

from lowbit.ops._native import (_C, as_tensor, capsule, cuda_sm_count, eager_fast_path, is_cuda, stream_of, to_numpy,
                                with_numpy)

Array = Union[torch.Tensor, np.ndarray]

KV_BITS = (2, 4)
KV_GROUP_SIZES = (32, 64, 128)
KV_HEAD_DIMS = (64, 80, 96, 128, 256)
KV_VALUE_GROUP = 32
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_WORD_DTYPES = (torch.int32, torch.uint32)


def kv_key_words(group_size: int, bits: int) -> int:
    """int32 words holding one key channel's codes over a token group: ``group_size * bits / 32``."""
    return group_size * bits // 32


def kv_value_words(head_dim: int, bits: int) -> int:
    """int32 words holding one token's value codes: ``ceil(head_dim / 32) * bits``."""
    return -(-head_dim // 32) * bits


def kv_value_groups(head_dim: int) -> int:
    """Value scale/zero groups per token: ``ceil(head_dim / 32)``."""
    return -(-head_dim // KV_VALUE_GROUP)


# ---------------------------------------------------------------------------------------------------------------
# argument checks


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in KV_BITS:
        raise ValueError(f"bits must be 2 or 4, got {bits!r}")
    return bits


def _check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in KV_GROUP_SIZES:
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size!r}")
    return group_size


def _check_head_dim(d: int, name: str) -> int:
    if d not in KV_HEAD_DIMS:
        raise ValueError(f"the head dimension (last dim of {name}) must be one of {KV_HEAD_DIMS}, got {d}")
    return d


def _check_float(t, name: str, ndim: int, layout: str) -> torch.Tensor:
    t = as_tensor(t, name)
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {list(t.shape)}")
    return t


def _check_like(t, name: str, shape: list[int], dtypes: tuple[torch.dtype, ...], device: torch.device,
                ref: str) -> torch.Tensor:
    """`t` as a contiguous tensor of one of `dtypes` (words come back as int32), `shape`, on `device`."""
    t = as_tensor(t, name)
    if t.dtype not in dtypes:
        names = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {t.dtype}")
    if list(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of {ref} ({device}), got {t.device}")
    t = t.contiguous()
    return t.view(torch.int32) if t.dtype == torch.uint32 else t


def _check_lengths(t, name: str, batch: int, device: torch.device) -> torch.Tensor:
    t = as_tensor(t, name)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (int32 is used as is), got {t.dtype}")
    if t.dtype != torch.int32 and t.numel() and not torch.compiler.is_compiling():
        lo, hi = int(t.min()), int(t.max())
        if lo < -2**31 or hi >= 2**31:
            raise ValueError(f"{name} must fit in int32, got values in [{lo}, {hi}]")
    return _check_like(t.to(torch.int32), name, [batch], (torch.int32,), device, "q")


def _check_out_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    return dtype


def _numpy_out(numpy_in: bool, outs: tuple[torch.Tensor, ...]):
    return tuple(to_numpy(o) for o in outs) if numpy_in else outs


# ---------------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("lowbit::kv_quantize_keys", mutates_args=())
def _quantize_keys_op(k: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    codes, scale, zero = _key_buffers(k, bits, group_size)
    _C.kv_quantize_keys(capsule(k), capsule(codes), capsule(scale), capsule(zero), bits, group_size, stream_of(k))
    return codes, scale, zero


def _key_buffers(k: torch.Tensor, bits: int, group_size: int):
    b, h, t, d = k.shape
    codes = k.new_empty((b, h, t // group_size, d, kv_key_words(group_size, bits)), dtype=torch.int32)
    scale = k.new_empty((b, h, t // group_size, d), dtype=torch.float16)
    return codes, scale, torch.empty_like(scale)


@_quantize_keys_op.register_fake
def _(k: torch.Tensor, bits: int, group_size: int):
    return _key_buffers(k, bits, group_size)


@torch.library.custom_op("lowbit::kv_quantize_values", mutates_args=())
def _quantize_values_op(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, scale, zero = _value_buffers(v, bits)
    _C.kv_quantize_values(capsule(v), capsule(codes), capsule(scale), capsule(zero), bits, stream_of(v))
    return codes, scale, zero


def _value_buffers(v: torch.Tensor, bits: int):
    b, h, t, d = v.shape
    codes = v.new_empty((b, h, t, kv_value_words(d, bits)), dtype=torch.int32)
    scale = v.new_empty((b, h, t, kv_value_groups(d)), dtype=torch.float16)
    return codes, scale, torch.empty_like(scale)


@_quantize_values_op.register_fake
def _(v: torch.Tensor, bits: int):
    return _value_buffers(v, bits)


@torch.library.custom_op("lowbit::kv_dequantize_keys", mutates_args=())
def _dequantize_keys_op(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                        dtype: torch.dtype) -> torch.Tensor:
    out = _dequantize_keys_fake(codes, scale, zero, bits, group_size, dtype)
    _C.kv_dequantize_keys(capsule(codes), capsule(scale), capsule(zero), capsule(out), bits, group_size,
                          stream_of(out))
    return out


@_dequantize_keys_op.register_fake
def _dequantize_keys_fake(codes, scale, zero, bits, group_size, dtype):
    b, h, tg, d = scale.shape
    return scale.new_empty((b, h, tg * group_size, d), dtype=dtype)


@torch.library.custom_op("lowbit::kv_dequantize_values", mutates_args=())
def _dequantize_values_op(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, head_dim: int,
                          dtype: torch.dtype) -> torch.Tensor:
    out = _dequantize_values_fake(codes, scale, zero, bits, head_dim, dtype)
    _C.kv_dequantize_values(capsule(codes), capsule(scale), capsule(zero), capsule(out), bits, stream_of(out))
    return out


@_dequantize_values_op.register_fake
def _dequantize_values_fake(codes, scale, zero, bits, head_dim, dtype):
    b, h, t, _ = scale.shape
    return scale.new_empty((b, h, t, head_dim), dtype=dtype)


def _attention_impl(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                    v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, k_res: torch.Tensor,
                    v_res: torch.Tensor, lengths_q: torch.Tensor, lengths_res: torch.Tensor, bits: int,
                    group_size: int, softmax_scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    workspace = None
    if is_cuda(q):
        b, hq, d = q.shape
        sms = cuda_sm_count(q.device)
        splits = _C.kv_decode_splits(b, k_codes.shape[1], hq, v_codes.shape[2] + k_res.shape[2], sms)
        workspace = torch.empty((b, hq, splits, d + 2), dtype=torch.float32, device=q.device)
    _C.kv_attention_decode(capsule(q), capsule(k_codes), capsule(k_scale), capsule(k_zero), capsule(v_codes),
                           capsule(v_scale), capsule(v_zero), capsule(k_res), capsule(v_res), capsule(lengths_q),
                           capsule(lengths_res), capsule(out), capsule(workspace), bits, group_size, softmax_scale,
                           stream_of(q))
    return out


_attention_op = torch.library.custom_op("lowbit::kv_attention_decode", mutates_args=())(_attention_impl)
_attention_call = eager_fast_path(_attention_op, _attention_impl)  # one call per layer and decode step


@_attention_op.register_fake
def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, lengths_q, lengths_res, bits, group_size,
      softmax_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------------------------
# public functions


def kv_quantize_keys(k: Array, bits: int = 2, group_size: int = 32):
    """Quantizes keys per channel over groups of ``group_size`` consecutive tokens.

    Args:
        k: float32/float16/bfloat16 [B, H, T, D] (tensor or numpy array), T a multiple of group_size, D in
            ``KV_HEAD_DIMS``; values should lie within the float16 range.
        bits: 2 or 4.
        group_size: tokens per group, 32, 64 or 128.

    Returns:
        ``(codes, scale, zero)``: int32 [B, H, T/G, D, G*bits/32] and float16 [B, H, T/G, D] twice, on k's device
        (numpy arrays for a numpy k). Dequantization is ``scale * (code - zero)``.

    Raises:
        TypeError: k is not a float tensor. ValueError: bad shape, head_dim, bits or group_size. RuntimeError: k is
        on a CUDA device but lowbit has no CUDA kernels or no GPU.
    """
    _check_bits(bits)
    _check_group_size(group_size)
    numpy_in = isinstance(k, np.ndarray)
    t = _check_float(k, "k", 4, "[B, H, T, D]")
    _check_head_dim(t.shape[3], "k")
    if t.shape[2] % group_size:
        raise ValueError(f"the token count of k (dim 2) must be a multiple of group_size {group_size}, "
                         f"got {t.shape[2]}")
    return _numpy_out(numpy_in, _quantize_keys_op(t.contiguous(), bits, group_size))


def kv_quantize_values(v: Array, bits: int = 2):
    """Quantizes values per token over groups of 32 channels (the last group of D = 80 has 16).

    Args:
        v: float32/float16/bfloat16 [B, H, T, D], any T, D in ``KV_HEAD_DIMS``.
        bits: 2 or 4.

    Returns:
        ``(codes, scale, zero)``: int32 [B, H, T, ceil(D/32)*bits] and float16 [B, H, T, ceil(D/32)] twice.
    """
    _check_bits(bits)
    numpy_in = isinstance(v, np.ndarray)
    t = _check_float(v, "v", 4, "[B, H, T, D]")
    _check_head_dim(t.shape[3], "v")
    return _numpy_out(numpy_in, _quantize_values_op(t.contiguous(), bits))


def kv_dequantize_keys(codes: Array, scale: Array, zero: Array, bits: int = 2, group_size: int = 32,
                       dtype: torch.dtype = torch.float32) -> Array:
    """Packed keys (as from :func:`kv_quantize_keys`) back to [B, H, T_groups * group_size, D] of `dtype`."""
    _check_bits(bits)
    _check_group_size(group_size)
    _check_out_dtype(dtype)

    def run(c: torch.Tensor) -> torch.Tensor:
        s = as_tensor(scale, "scale")
        if s.dim() != 4:
            raise ValueError(f"scale must have shape [B, H, T_groups, D], got {list(s.shape)}")
        b, h, tg, d = s.shape
        _check_head_dim(d, "scale")
        c = _check_like(c, "codes", [b, h, tg, d, kv_key_words(group_size, bits)], _WORD_DTYPES, s.device, "scale")
        s = _check_like(s, "scale", [b, h, tg, d], (torch.float16,), s.device, "scale")
        z = _check_like(zero, "zero", [b, h, tg, d], (torch.float16,), s.device, "scale")
        return _dequantize_keys_op(c, s, z, bits, group_size, dtype)

    return with_numpy(run, codes)


def kv_dequantize_values(codes: Array, scale: Array, zero: Array, bits: int = 2, *, head_dim: int,
                         dtype: torch.dtype = torch.float32) -> Array:
    """Packed values (as from :func:`kv_quantize_values`) back to [B, H, T, head_dim] of `dtype`.

    head_dim is explicit because 80 and 96 pack into the same number of words and groups.
    """
    _check_bits(bits)
    _check_head_dim(head_dim, "the output (head_dim)")
    _check_out_dtype(dtype)

    def run(c: torch.Tensor) -> torch.Tensor:
        s = as_tensor(scale, "scale")
        if s.dim() != 4:
            raise ValueError(f"scale must have shape [B, H, T, ceil(D/32)], got {list(s.shape)}")
        b, h, t, _ = s.shape
        groups = kv_value_groups(head_dim)
        c = _check_like(c, "codes", [b, h, t, kv_value_words(head_dim, bits)], _WORD_DTYPES, s.device, "scale")
        s = _check_like(s, "scale", [b, h, t, groups], (torch.float16,), s.device, "scale")
        z = _check_like(zero, "zero", [b, h, t, groups], (torch.float16,), s.device, "scale")
        return _dequantize_values_op(c, s, z, bits, head_dim, dtype)

    return with_numpy(run, codes)


def quantized_attention_decode(q: Array, k_codes: Array, k_scale: Array, k_zero: Array, v_codes: Array,
                               v_scale: Array, v_zero: Array, k_res: Array, v_res: Array, lengths_q: Array,
                               lengths_res: Array, bits: int = 2, group_size: int = 32,
                               softmax_scale: Optional[float] = None) -> Array:
    """Attention of one new query per sequence over a quantized KV cache plus its full-precision window.

    For query head i of sequence b (kv head ``i // (H_q / H_kv)``, grouped-query attention), the keys are the
    ``lengths_q[b]`` dequantized tokens followed by the ``lengths_res[b]`` window tokens, and
    ``out = softmax(softmax_scale * q . K^T) V`` in float32, written in q's dtype. The packed cache is read
    directly (dequantized in registers, never copied); a sequence without tokens gets zeros.

    Args:
        q: [B, H_q, D] float32/float16/bfloat16; D in ``KV_HEAD_DIMS``; H_q a multiple of H_kv.
        k_codes, k_scale, k_zero: as from :func:`kv_quantize_keys` ([B, H_kv, T_groups, ...]).
        v_codes, v_scale, v_zero: as from :func:`kv_quantize_values`, with T_q = T_groups * group_size tokens.
        k_res, v_res: [B, H_kv, R, D] in q's dtype (R >= 0).
        lengths_q: [B] integers, each a multiple of group_size in [0, T_q]. lengths_res: [B], each in [0, R].
            Any integer dtype (converted to int32). CPU lengths are checked (ValueError); on CUDA they are not
            read back (no sync): out-of-range values are clamped to the capacity by the kernel.
        bits: 2 or 4. group_size: the key group, 32, 64 or 128.
        softmax_scale: default 1/sqrt(D).

    Returns:
        [B, H_q, D] in q's dtype, on q's device (a numpy array for a numpy q).
    """
    _check_bits(bits)
    _check_group_size(group_size)

    def run(qt: torch.Tensor) -> torch.Tensor:
        qt = _check_float(qt, "q", 3, "[B, H_q, D]").contiguous()
        b, hq, d = qt.shape
        _check_head_dim(d, "q")
        kc = as_tensor(k_codes, "k_codes")
        if kc.dim() != 5:
            raise ValueError(f"k_codes must have shape [B, H_kv, T_groups, D, G*bits/32], got {list(kc.shape)}")
        hkv, tg = kc.shape[1], kc.shape[2]
        if hkv < 1 or hq % hkv:
            raise ValueError(f"the query heads (dim 1 of q, {hq}) must be a multiple of the kv heads (dim 1 of "
                             f"k_codes, {hkv})")
        kr = as_tensor(k_res, "k_res")
        if kr.dim() != 4:
            raise ValueError(f"k_res must have shape [B, H_kv, R, D], got {list(kr.shape)}")
        r = kr.shape[2]
        tq = tg * group_size
        dev = qt.device
        kc = _check_like(kc, "k_codes", [b, hkv, tg, d, kv_key_words(group_size, bits)], _WORD_DTYPES, dev, "q")
        ks = _check_like(k_scale, "k_scale", [b, hkv, tg, d], (torch.float16,), dev, "q")
        kz = _check_like(k_zero, "k_zero", [b, hkv, tg, d], (torch.float16,), dev, "q")
        vc = _check_like(v_codes, "v_codes", [b, hkv, tq, kv_value_words(d, bits)], _WORD_DTYPES, dev, "q")
        vs = _check_like(v_scale, "v_scale", [b, hkv, tq, kv_value_groups(d)], (torch.float16,), dev, "q")
        vz = _check_like(v_zero, "v_zero", [b, hkv, tq, kv_value_groups(d)], (torch.float16,), dev, "q")
        kr = _check_like(kr, "k_res", [b, hkv, r, d], (qt.dtype,), dev, "q")
        vr = _check_like(v_res, "v_res", [b, hkv, r, d], (qt.dtype,), dev, "q")
        lq = _check_lengths(lengths_q, "lengths_q", b, dev)
        lr = _check_lengths(lengths_res, "lengths_res", b, dev)
        scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
        return _attention_call(qt, kc, ks, kz, vc, vs, vz, kr, vr, lq, lr, bits, group_size, scale)

    return with_numpy(run, q)


__all__ = ["kv_quantize_keys", "kv_quantize_values", "kv_dequantize_keys", "kv_dequantize_values",
           "quantized_attention_decode", "kv_key_words", "kv_value_words", "kv_value_groups", "KV_BITS",
           "KV_GROUP_SIZES", "KV_HEAD_DIMS", "KV_VALUE_GROUP"]
