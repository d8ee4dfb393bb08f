"""Packing low-bit codes into the canonical layout, unpacking, and dequantization (uniform, table, mixed 2/4-bit).

The layout (include/lowbit/pack.h): row n of codes q[n, :K] is cut into blocks of 32 codes; block j is stored
in ``bits`` consecutive 32-bit words forming one little-endian 32*bits-bit integer, code i at bits
[i*bits, (i+1)*bits). A row holds ``words_per_row(K, bits) = ceil(K/32) * bits`` words (int32 in torch). Groups
of ``group_size`` codes run along K, the last one short when group_size does not divide K. In the mixed layout
each group has its own width (2 or 4), and a row is the concatenation of its groups, each packed as above.

Range checks of ``pack_*`` run in the native layer on both devices: the CPU kernel scans the codes before
writing; the CUDA path runs a reduction kernel (the first bad index by atomicMin) and synchronizes.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence, Union

import numpy as np
import torch

from lowbit.ops._native import _C, as_tensor, capsule, stream_of, with_numpy

Array = Union[torch.Tensor, np.ndarray]
GroupBits = Union[torch.Tensor, np.ndarray, Sequence[int]]

BITS = (2, 3, 4)
MIXED_BITS = (2, 4)
GROUP_SIZES = (32, 64, 128)
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_WORD_DTYPES = (torch.int32, torch.uint32)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits must be 2, 3 or 4, got {bits!r}")
    return bits


def _check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size!r}")
    return group_size


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return k


def _check_out_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    return dtype


def _check_codes(codes) -> torch.Tensor:
    codes = as_tensor(codes, "codes")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must have dtype torch.uint8, got {codes.dtype}")
    if codes.dim() != 2 or codes.shape[1] < 1:
        raise ValueError(f"codes must have shape [N, K] with K >= 1, got {list(codes.shape)}")
    return codes.contiguous()


def _check_packed(packed, words: int | None) -> torch.Tensor:
    """int32/uint32 [N, words] (words None: any width), returned as a contiguous int32 view."""
    packed = as_tensor(packed, "packed")
    if packed.dtype not in _WORD_DTYPES:
        raise TypeError(f"packed must have dtype torch.int32 or torch.uint32, got {packed.dtype}")
    if packed.dim() != 2 or (words is not None and packed.shape[1] != words):
        expected = f"[N, {words}]" if words is not None else "[N, W]"
        raise ValueError(f"packed must have shape {expected}, got {list(packed.shape)}")
    return packed.contiguous().view(torch.int32)


def _check_on(t: torch.Tensor, name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of packed ({ref.device}), got {t.device}")


def _check_params(t, name: str, packed: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    t = as_tensor(t, name)
    if t.dtype != torch.float16:
        raise TypeError(f"{name} must have dtype torch.float16, got {t.dtype}")
    shape = [packed.shape[0], math.ceil(k / group_size)]
    if list(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ([N, ceil(k / group_size)]), got {list(t.shape)}")
    _check_on(t, name, packed)
    return t.contiguous()


def _group_bits_tensor(group_bits: GroupBits, k: int, group_size: int,
                       device: Union[str, torch.device]) -> torch.Tensor:
    """group_bits as a contiguous uint8 tensor [ceil(k / group_size)] on `device`, values checked eagerly."""
    if isinstance(group_bits, (torch.Tensor, np.ndarray)):
        gb = as_tensor(group_bits, "group_bits")
        if gb.dtype.is_floating_point or gb.dtype.is_complex or gb.dtype == torch.bool:
            raise TypeError(f"group_bits must have an integer dtype, got {gb.dtype}")
    else:
        gb = torch.tensor(list(group_bits), dtype=torch.int64)
    groups = math.ceil(k / group_size)
    if gb.dim() != 1 or gb.shape[0] != groups:
        raise ValueError(f"group_bits must have shape [{groups}] (ceil(k / group_size)), got {list(gb.shape)}")
    if not torch.compiler.is_compiling():
        bad = ((gb != 2) & (gb != 4)).nonzero()
        if bad.numel():
            g = int(bad[0, 0])
            raise ValueError(f"group_bits must contain only 2 and 4, got group_bits[{g}] = {int(gb[g])}")
    return gb.to(device=device, dtype=torch.uint8).contiguous()


def words_per_row(k: int, bits: int) -> int:
    """Packed 32-bit words per row of k codes of `bits` bits: ceil(k / 32) * bits."""
    return math.ceil(_check_k(k) / 32) * _check_bits(bits)


def mixed_words_per_row(k: int, group_bits: GroupBits, group_size: int) -> int:
    """Words per row of the mixed layout: the sum over groups g of ceil(len_g / 32) * group_bits[g]."""
    _check_k(k)
    _check_group_size(group_size)
    widths = _group_bits_tensor(group_bits, k, group_size, "cpu").tolist()
    return sum(math.ceil(min(group_size, k - g * group_size) / 32) * b for g, b in enumerate(widths))


def nf_table(bits: int) -> torch.Tensor:
    """The normal-float table NF``bits`` (2^bits sorted float32 values in [-1, 1], with -1, 0 and 1 in it).

    QLoRA's NF4 construction for any width: with n = 2^bits and
    ``offset = (1 - 1/(2(n-1)) + 1 - 1/(2n)) / 2``, the positive values are the standard normal quantiles
    Phi^-1(p) at the n/2 points p = linspace(offset, 1/2, n/2 + 1) without its last point, the negative values
    are -Phi^-1(p) at linspace(offset, 1/2, n/2) without its last point (n/2 - 1 of them), plus an exact 0;
    everything is divided by Phi^-1(offset), so the ends are exactly -1 and 1. The table is asymmetric (one more
    positive value), and NF4 equals the table published with QLoRA.
    """
    n = 1 << _check_bits(bits)
    offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    inv = NormalDist().inv_cdf
    positive = [inv(p) for p in np.linspace(offset, 0.5, n // 2 + 1)[:-1]]
    negative = [-inv(p) for p in np.linspace(offset, 0.5, n // 2)[:-1]]
    values = np.array(sorted(negative + [0.0] + positive), dtype=np.float64) / inv(offset)
    return torch.from_numpy(values.astype(np.float32))


@torch.library.custom_op("lowbit::pack_uniform", mutates_args=())
def _pack_uniform_op(codes: torch.Tensor, bits: int) -> torch.Tensor:
    packed = torch.empty((codes.shape[0], words_per_row(codes.shape[1], bits)), dtype=torch.int32,
                         device=codes.device)
    _C.pack_uniform(capsule(codes), capsule(packed), bits, stream_of(codes))
    return packed


@_pack_uniform_op.register_fake
def _(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes.new_empty((codes.shape[0], -(-codes.shape[1] // 32) * bits), dtype=torch.int32)


def pack_uniform(codes: Array, bits: int) -> Array:
    """Packs codes of `bits` bits into the canonical layout.

    Args:
        codes: uint8 tensor (or numpy array) [N, K], K >= 1, every value < 2^bits.
        bits: 2, 3 or 4.

    Returns:
        int32 [N, words_per_row(K, bits)] on the device of codes (numpy in, numpy out); codes past K in the
        last block of a row are zero.

    Raises:
        TypeError: codes is not uint8. ValueError: bad shape or bits, or a code >= 2^bits (the message names the
        first one as codes[row, col] = value).
    """
    _check_bits(bits)

    return with_numpy(lambda c: _pack_uniform_op(_check_codes(c), bits), codes)


@torch.library.custom_op("lowbit::unpack", mutates_args=())
def _unpack_op(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    codes = torch.empty((packed.shape[0], k), dtype=torch.uint8, device=packed.device)
    _C.unpack(capsule(packed), capsule(codes), bits, stream_of(packed))
    return codes


@_unpack_op.register_fake
def _(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    return packed.new_empty((packed.shape[0], k), dtype=torch.uint8)


def unpack(packed: Array, bits: int, k: int) -> Array:
    """The uint8 codes [N, k] stored in packed words [N, words_per_row(k, bits)] (int32 or uint32)."""
    _check_bits(bits)
    _check_k(k)
    return with_numpy(lambda p: _unpack_op(_check_packed(p, words_per_row(k, bits)), bits, k), packed)


@torch.library.custom_op("lowbit::dequantize_uniform", mutates_args=())
def _dequantize_uniform_op(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                           group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty((packed.shape[0], k), dtype=dtype, device=packed.device)
    _C.dequantize_uniform(capsule(packed), capsule(scales), capsule(zeros), capsule(out), bits, group_size,
                          stream_of(packed))
    return out


@_dequantize_uniform_op.register_fake
def _(packed, scales, zeros, bits, group_size, k, dtype):
    return packed.new_empty((packed.shape[0], k), dtype=dtype)


def dequantize_uniform(packed: Array, scales: Array, zeros: Array, bits: int, group_size: int, k: int,
                       dtype: torch.dtype = torch.float16) -> Array:
    """The weight ``w[n, i] = scales[n, g] * (q[n, i] - zeros[n, g])``, g = i // group_size, as [N, k] of `dtype`.

    Args:
        packed: int32/uint32 [N, words_per_row(k, bits)] from :func:`pack_uniform`.
        scales, zeros: float16 [N, ceil(k / group_size)] on the device of packed (zeros may be fractional).
        bits: 2, 3 or 4. group_size: 32, 64 or 128 (the last group is short when it does not divide k).
        k: codes per row (K >= 1). dtype: float32, float16 or bfloat16; the arithmetic is float32.

    Raises:
        TypeError: a wrong dtype. ValueError: a wrong shape, bits, group size, k or device.
        RuntimeError: CUDA tensors without a CUDA build or device.
    """
    _check_bits(bits)
    _check_group_size(group_size)
    _check_k(k)
    _check_out_dtype(dtype)

    def run(p: torch.Tensor) -> torch.Tensor:
        p = _check_packed(p, words_per_row(k, bits))
        s = _check_params(scales, "scales", p, k, group_size)
        z = _check_params(zeros, "zeros", p, k, group_size)
        return _dequantize_uniform_op(p, s, z, bits, group_size, k, dtype)

    return with_numpy(run, packed)


@torch.library.custom_op("lowbit::dequantize_lut", mutates_args=())
def _dequantize_lut_op(packed: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, bits: int, group_size: int,
                       k: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty((packed.shape[0], k), dtype=dtype, device=packed.device)
    _C.dequantize_lut(capsule(packed), capsule(scales), capsule(table), capsule(out), bits, group_size,
                      stream_of(packed))
    return out


@_dequantize_lut_op.register_fake
def _(packed, scales, table, bits, group_size, k, dtype):
    return packed.new_empty((packed.shape[0], k), dtype=dtype)


def dequantize_lut(packed: Array, scales: Array, table: Array, bits: int, group_size: int, k: int,
                   dtype: torch.dtype = torch.float16) -> Array:
    """The weight ``w[n, i] = scales[n, g] * table[q[n, i]]``, g = i // group_size, as [N, k] of `dtype`.

    Args:
        packed, scales, bits, group_size, k, dtype: as for :func:`dequantize_uniform`.
        table: float32 [2^bits] on the device of packed, e.g. :func:`nf_table`.
    """
    _check_bits(bits)
    _check_group_size(group_size)
    _check_k(k)
    _check_out_dtype(dtype)

    def run(p: torch.Tensor) -> torch.Tensor:
        p = _check_packed(p, words_per_row(k, bits))
        s = _check_params(scales, "scales", p, k, group_size)
        t = as_tensor(table, "table")
        if t.dtype != torch.float32:
            raise TypeError(f"table must have dtype torch.float32, got {t.dtype}")
        if list(t.shape) != [1 << bits]:
            raise ValueError(f"table must have shape [{1 << bits}] (2^bits), got {list(t.shape)}")
        _check_on(t, "table", p)
        return _dequantize_lut_op(p, s, t.contiguous(), bits, group_size, k, dtype)

    return with_numpy(run, packed)


def pack_mixed(codes: Array, group_bits: GroupBits, group_size: int) -> Array:
    """Packs codes whose K-group g is group_bits[g] (2 or 4) bits wide into the mixed layout. (Not a torch custom
    op: the output width depends on the values of group_bits; pack offline, outside compiled code.)

    Args:
        codes: uint8 [N, K]; the codes of group g must be < 2^group_bits[g].
        group_bits: ceil(K / group_size) widths (tensor, array or sequence), shared by all rows.
        group_size: 32, 64 or 128.

    Returns:
        int32 [N, mixed_words_per_row(K, group_bits, group_size)] on the device of codes.

    Raises:
        TypeError: codes is not uint8. ValueError: bad shapes, widths or group size, or a code too wide for its
        group (the message names the first one).
    """
    _check_group_size(group_size)

    def run(c: torch.Tensor) -> torch.Tensor:
        c = _check_codes(c)
        gb = _group_bits_tensor(group_bits, c.shape[1], group_size, c.device)
        words = mixed_words_per_row(c.shape[1], gb, group_size)
        packed = torch.empty((c.shape[0], words), dtype=torch.int32, device=c.device)
        _C.pack_mixed(capsule(c), capsule(gb), capsule(packed), group_size, stream_of(c))
        return packed

    return with_numpy(run, codes)


@torch.library.custom_op("lowbit::unpack_mixed", mutates_args=())
def _unpack_mixed_op(packed: torch.Tensor, group_bits: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    codes = torch.empty((packed.shape[0], k), dtype=torch.uint8, device=packed.device)
    _C.unpack_mixed(capsule(packed), capsule(group_bits), capsule(codes), group_size, stream_of(packed))
    return codes


@_unpack_mixed_op.register_fake
def _(packed, group_bits, group_size, k):
    return packed.new_empty((packed.shape[0], k), dtype=torch.uint8)


def _check_mixed_packed(packed, gb: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    words = None if torch.compiler.is_compiling() else mixed_words_per_row(k, gb, group_size)
    p = _check_packed(packed, words)
    _check_on(gb, "group_bits", p)
    return p


def unpack_mixed(packed: Array, group_bits: GroupBits, group_size: int, k: int) -> Array:
    """The uint8 codes [N, k] stored in the mixed layout (group_bits and group_size as for :func:`pack_mixed`)."""
    _check_group_size(group_size)
    _check_k(k)

    def run(p: torch.Tensor) -> torch.Tensor:
        gb = _group_bits_tensor(group_bits, k, group_size, p.device)
        return _unpack_mixed_op(_check_mixed_packed(p, gb, k, group_size), gb, group_size, k)

    return with_numpy(run, packed)


@torch.library.custom_op("lowbit::dequantize_mixed", mutates_args=())
def _dequantize_mixed_op(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_bits: torch.Tensor,
                         group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty((packed.shape[0], k), dtype=dtype, device=packed.device)
    _C.dequantize_mixed(capsule(packed), capsule(scales), capsule(zeros), capsule(group_bits), capsule(out),
                        group_size, stream_of(packed))
    return out


@_dequantize_mixed_op.register_fake
def _(packed, scales, zeros, group_bits, group_size, k, dtype):
    return packed.new_empty((packed.shape[0], k), dtype=dtype)


def dequantize_mixed(packed: Array, scales: Array, zeros: Array, group_bits: GroupBits, group_size: int, k: int,
                     dtype: torch.dtype = torch.float16) -> Array:
    """Affine dequantization of the mixed layout: ``w[n, i] = scales[n, g] * (q[n, i] - zeros[n, g])``.

    Args:
        packed: int32/uint32 [N, mixed_words_per_row(k, group_bits, group_size)] from :func:`pack_mixed`.
        scales, zeros: float16 [N, ceil(k / group_size)]. group_bits: widths 2 or 4 per group.
        group_size, k, dtype: as for :func:`dequantize_uniform`.
    """
    _check_group_size(group_size)
    _check_k(k)
    _check_out_dtype(dtype)

    def run(p: torch.Tensor) -> torch.Tensor:
        gb = _group_bits_tensor(group_bits, k, group_size, p.device)
        p = _check_mixed_packed(p, gb, k, group_size)
        s = _check_params(scales, "scales", p, k, group_size)
        z = _check_params(zeros, "zeros", p, k, group_size)
        return _dequantize_mixed_op(p, s, z, gb, group_size, k, dtype)

    return with_numpy(run, packed)


__all__ = ["pack_uniform", "unpack", "dequantize_uniform", "dequantize_lut", "pack_mixed", "unpack_mixed",
           "dequantize_mixed", "words_per_row", "mixed_words_per_row", "nf_table", "BITS", "MIXED_BITS",
           "GROUP_SIZES"]
