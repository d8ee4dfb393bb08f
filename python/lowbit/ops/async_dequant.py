"""Asynchronous-dequantization GEMM: ``y = x @ W_hat.T`` for a 2- or 4-bit ``uniform`` weight re-laid once into
the aligned layout, with the activations quantized on the fly to int8 per row and weight group.

The aligned layout (``include/lowbit/async_dequant.h``): each row is cut into chunks of 256 / bits codes stored in
32 bytes; byte j of chunk t holds at bits [bits c, bits (c+1)) the code of k = (256 / bits) t + 32 c + j. One
32-byte load and one shift + mask give 32 codes that meet 32 contiguous activations: wide, aligned loads on both
backends (16-byte ``cp.async`` copies, two stages deep, on CUDA; AVX2 ``vpmaddubsw`` or AVX-512 ``vpdpbusd`` on
CPU, and from 16 rows of x on, where the CPU has AMX-INT8, tile dot products over the codes unpacked group by
group into L1, the same integers). :func:`prepare_async_dequant` makes it from the canonical layout of
:func:`lowbit.ops.pack_uniform` (checkpoints keep the canonical layout).

Precision: x is rounded per (row, group) to int8 with scale max|x| / 127 (:func:`quantize_activations`); the GEMM
is then exact in integers inside a group and fp32 across groups. The result equals ``x_q @ W_hat.T`` for the
rounded activations x_q to fp32 rounding; against the unrounded x it differs by at most
``sum_g |W_hat| * d_g / 2`` per output, about 0.4% of the group's largest activation per weight.

Table mode (the ``lut`` format: ``W_hat = scales * (table[q] - zeros)``, e.g. NF2/NF4): the table is rounded
once to int8 (:func:`prepare_lut_table`: scale max|table| / 127) and the kernel looks codes up in registers
(``vpshufb`` on CPU, ``prmt`` on CUDA), so it is the LUT GEMM for int8 activations, exact in integers for the
rounded table; each weight moves by at most ``scales * max|table| / 254`` from the fp32 table's value.

CUDA from 64 rows of x on (:mod:`lowbit.ops.dense_path`): the weight is decoded once to x's dtype and multiplied
by torch's matmul, the activations unrounded.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from lowbit.ops._native import (_C, as_tensor, capsule, check_activations, eager_fast_path, is_cuda, stream_of,
                                with_numpy)
from lowbit.ops.dense_path import dense_from_codes, dense_matmul, use_dense_path
from lowbit.ops.pack import unpack

Array = Union[torch.Tensor, np.ndarray]

#: Code widths and group sizes the GEMM takes (a group is a whole number of 32-code runs).
ASYNC_DEQUANT_BITS: tuple[int, ...] = (2, 4)
ASYNC_DEQUANT_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
_XQ_PAD = 128  # activation rows are padded to a multiple of the largest chunk


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ASYNC_DEQUANT_BITS:
        raise ValueError(f"bits must be one of {ASYNC_DEQUANT_BITS}, got {bits!r}")
    return bits


def aligned_words_per_row(k: int, bits: int = 2) -> int:
    """int32 words per row of the aligned layout: ceil(k * bits / 256) * 8."""
    return -(-int(k) // (256 // _check_bits(bits))) * 8


def _check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in \
            ASYNC_DEQUANT_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {ASYNC_DEQUANT_GROUP_SIZES}, got {group_size!r}")
    return group_size


def aligned_from_codes(codes: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """The aligned layout (int32 [N, aligned_words_per_row(K, bits)]) of codes given as uint8 [N, K]."""
    _check_bits(bits)
    codes = as_tensor(codes, "codes")
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError(f"codes must be a uint8 tensor [N, K], got {codes.dtype} of shape {list(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes must be {bits}-bit (0..{2**bits - 1}), got a maximum of {int(codes.max())}")
    n, k = codes.shape
    chunk, runs = 256 // bits, 8 // bits
    kp = -(-k // chunk) * chunk
    if kp == 0 or n == 0:
        return torch.zeros(n, kp // chunk * 8, dtype=torch.int32, device=codes.device)
    padded = torch.zeros(n, kp, dtype=torch.uint8, device=codes.device)
    padded[:, :k] = codes
    by_run = padded.view(n, kp // chunk, runs, 32)  # [n, chunk, c, j]: k = chunk_codes * t + 32 * c + j
    shifts = (torch.arange(runs, dtype=torch.uint8, device=codes.device) * bits).view(1, 1, runs, 1)
    chunk_bytes = (by_run << shifts).sum(dim=2, dtype=torch.uint8)  # the fields of a byte never overlap
    return chunk_bytes.reshape(n, kp // chunk * 32).view(torch.int32)


def codes_from_aligned(packed: torch.Tensor, k: int, bits: int = 2) -> torch.Tensor:
    """The codes (uint8 [N, k]) of a weight in the aligned layout: the inverse of :func:`aligned_from_codes`, in
    torch ops on packed's device."""
    _check_bits(bits)
    n, words = packed.shape
    chunk, runs = 256 // bits, 8 // bits
    chunk_bytes = packed.contiguous().view(torch.uint8).view(n, words // 8, 1, 32)
    shifts = (torch.arange(runs, dtype=torch.uint8, device=packed.device) * bits).view(1, 1, runs, 1)
    by_run = (chunk_bytes >> shifts) & (2**bits - 1)  # [n, chunk, c, j]: k = chunk_codes * t + 32 * c + j
    return by_run.reshape(n, words // 8 * chunk)[:, :k]


def prepare_async_dequant(packed: Array, k: int, bits: int = 2) -> torch.Tensor:
    """Re-lays a canonical packed weight (int32 [N, ceil(K/32)*bits], from pack_uniform) into the aligned layout
    the GEMM reads, on the same device. Done once, at load time."""
    return aligned_from_codes(as_tensor(unpack(packed, _check_bits(bits), k), "codes"), bits)


def _quantize_activations_impl(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    xq = torch.empty(m, -(-k // _XQ_PAD) * _XQ_PAD, dtype=torch.int8, device=x.device)
    d = torch.empty(m, -(-k // group_size), dtype=torch.float32, device=x.device)
    _C.quantize_activations(capsule(x), capsule(xq), capsule(d), group_size, stream_of(x))
    return xq, d


_quantize_activations_op = torch.library.custom_op("lowbit::quantize_activations",
                                                   mutates_args=())(_quantize_activations_impl)


@_quantize_activations_op.register_fake
def _(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    return (x.new_empty(m, -(-k // _XQ_PAD) * _XQ_PAD, dtype=torch.int8),
            x.new_empty(m, -(-k // group_size), dtype=torch.float32))


def prepare_lut_table(table: Array, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table_q int8 [16], table_scale float32 [1]) of a float table [2 ** bits], on its device: table_scale =
    max|table| / 127 (1 for an all-zero table), table_q[i] = rint(table[i mod 2 ** bits] / table_scale). What the
    table mode of :func:`async_dequant_gemm` multiplies; done once, at load time."""
    _check_bits(bits)
    t = as_tensor(table, "table")
    if not t.dtype.is_floating_point or list(t.shape) != [2**bits]:
        raise ValueError(f"table must be a float tensor of shape [{2**bits}], got {t.dtype} of shape "
                         f"{list(t.shape)}")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError("table must be finite")
    amax = t.abs().max()
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).reshape(1)
    q = torch.clamp(torch.round(t / scale), -127, 127).to(torch.int8)
    return q.repeat(16 // 2**bits).contiguous(), scale.contiguous()


def _async_dequant_gemm_impl(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                             zeros: Optional[torch.Tensor], table_q: Optional[torch.Tensor],
                             table_scale: Optional[torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    if use_dense_path(x):  # CUDA, large M: unrounded activations times the decoded weight
        values = None if table_q is None else table_q[:2**bits].to(torch.float32) * table_scale
        codes = codes_from_aligned(packed, x.shape[1], bits)
        return dense_matmul(x, dense_from_codes(codes, values, scales, zeros, group_size, x.dtype))
    out = torch.empty(x.shape[0], packed.shape[0], dtype=x.dtype, device=x.device)
    if not is_cuda(x):  # one native call: the activations are quantized inside it
        _C.async_dequant_gemm_float(capsule(x), capsule(packed), capsule(scales), capsule(zeros), capsule(table_q),
                                    capsule(table_scale), capsule(out), bits, group_size)
        return out
    xq, d = _quantize_activations_impl(x, group_size)
    _C.async_dequant_gemm(capsule(xq), capsule(d), capsule(packed), capsule(scales), capsule(zeros),
                          capsule(table_q), capsule(table_scale), capsule(out), x.shape[1], bits, group_size,
                          stream_of(x))
    return out


_async_dequant_gemm_op = torch.library.custom_op("lowbit::async_dequant_gemm",
                                                 mutates_args=())(_async_dequant_gemm_impl)
#: The GEMM for operands already checked (QuantLinear checks its weight once): x contiguous [M, K], the rest
#: contiguous, of the shapes and dtypes :func:`async_dequant_gemm` requires, on x's device.
async_dequant_gemm_unchecked = eager_fast_path(_async_dequant_gemm_op, _async_dequant_gemm_impl)


@_async_dequant_gemm_op.register_fake
def _(x, packed, scales, zeros, table_q, table_scale, bits, group_size):
    return x.new_empty(x.shape[0], packed.shape[0])


def quantize_activations(x: Array, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq int8 [M, ceil(K/128)*128], d float32 [M, ceil(K/group_size)]): x [M, K] rounded per row and group to
    ``xq * d`` (symmetric, max |x| -> 127; zero past K). What :func:`async_dequant_gemm` multiplies."""
    t = check_activations(x)
    if t.dim() != 2:
        raise ValueError(f"x must have shape [M, K], got {list(t.shape)}")
    return _quantize_activations_op(t.contiguous(), _check_group_size(group_size))


def check_group_params(scales: Array, zeros: Optional[Array], n: int, groups: int,
                       device: torch.device) -> list[Optional[torch.Tensor]]:
    """[scales, zeros] checked as float16 [n, groups] on `device` (zeros may be None) and made contiguous."""
    params: list[Optional[torch.Tensor]] = []
    for name, v in (("scales", scales), ("zeros", zeros)):
        if v is None and name == "zeros":
            params.append(None)
            continue
        v = as_tensor(v, name)
        if v.dtype != torch.float16:
            raise TypeError(f"{name} must have dtype float16, got {v.dtype}")
        if list(v.shape) != [n, groups]:
            raise ValueError(f"{name} must have shape [{n}, {groups}], got {list(v.shape)}")
        if v.device != device:
            raise ValueError(f"{name} must be on the device of x ({device}), got {v.device}")
        params.append(v.contiguous())
    return params


def _table_operands(table, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(table_q, table_scale) of a float table or of a pair from prepare_lut_table, checked, on `device`."""
    if isinstance(table, tuple):
        if len(table) != 2:
            raise ValueError(f"table must be a float table or the pair (table_q, table_scale) of prepare_lut_table, "
                             f"got a tuple of {len(table)}")
        tq, ts = as_tensor(table[0], "table_q"), as_tensor(table[1], "table_scale")
        if tq.dtype != torch.int8 or list(tq.shape) != [16]:
            raise ValueError(f"table_q must be int8 of shape [16], got {tq.dtype} of shape {list(tq.shape)}")
        if ts.dtype != torch.float32 or list(ts.shape) != [1]:
            raise ValueError(f"table_scale must be float32 of shape [1], got {ts.dtype} of shape {list(ts.shape)}")
    else:
        tq, ts = prepare_lut_table(table, bits)
    for name, v in (("table", tq), ("table_scale", ts)):
        if v.device != device:
            raise ValueError(f"{name} must be on the device of x ({device}), got {v.device}")
    return tq.contiguous(), ts.contiguous()


def async_dequant_gemm(x: Array, packed: Array, scales: Array, zeros: Optional[Array], group_size: int,
                       bits: int = 2, table: Optional[Union[Array, tuple[torch.Tensor, torch.Tensor]]] = None) -> Array:
    """``x @ W_hat.T`` for a 2- or 4-bit weight in the aligned layout: ``W_hat = scales * (q - zeros)``
    (``uniform``), or ``scales * (table[q] - zeros)`` with a table (``lut``, the table rounded to int8).

    Args:
        x: float32, float16 or bfloat16 activations [..., K] (numpy arrays give numpy results).
        packed: int32 [N, aligned_words_per_row(K, bits)], from :func:`prepare_async_dequant` or
            :func:`aligned_from_codes`.
        scales: float16 [N, ceil(K/group_size)] (the last group may be short). zeros: float16 like scales, or
            None for zero = 0.
        group_size: 32, 64 or 128. bits: 2 (default) or 4.
        table: None (the codes are the values), a float table [2 ** bits], or that table already rounded by
            :func:`prepare_lut_table` (the pair ``(table_q, table_scale)``, which skips the rounding per call).

    Returns:
        [..., N] in the dtype of x (activations rounded to int8 per group first; see the module docstring).

    Raises:
        TypeError / ValueError naming the argument for a wrong dtype, shape, device or group size;
        RuntimeError for CUDA tensors without a CUDA build or device.
    """
    group_size, bits = _check_group_size(group_size), _check_bits(bits)

    def run(t: torch.Tensor) -> torch.Tensor:
        t = check_activations(t)
        if t.shape[-1] < 1:
            raise ValueError(f"x must have shape [..., K] with K >= 1, got {list(t.shape)}")
        k = t.shape[-1]
        p = as_tensor(packed, "packed")
        words = aligned_words_per_row(k, bits)
        if p.dtype not in (torch.int32, torch.uint32) or p.dim() != 2 or p.shape[1] != words:
            raise ValueError(f"packed must be int32 [N, {words}] (aligned {bits}-bit layout for K = {k}), "
                             f"got {p.dtype} of shape {list(p.shape)}")
        if p.device != t.device:
            raise ValueError(f"packed must be on the device of x ({t.device}), got {p.device}")
        params = check_group_params(scales, zeros, p.shape[0], -(-k // group_size), t.device)
        tables = (None, None) if table is None else _table_operands(table, bits, t.device)
        y = async_dequant_gemm_unchecked(t.reshape(-1, k).contiguous(), p.contiguous().view(torch.int32), *params,
                                         *tables, bits, group_size)
        return y.reshape(*t.shape[:-1], p.shape[0])

    return with_numpy(run, x)


__all__ = ["async_dequant_gemm", "prepare_async_dequant", "prepare_lut_table", "aligned_from_codes",
           "codes_from_aligned", "aligned_words_per_row", "quantize_activations",
           "ASYNC_DEQUANT_BITS", "ASYNC_DEQUANT_GROUP_SIZES"]
