"""Lookup-table GEMM (FLUTE-style): ``y = x @ W_hat.T`` straight from packed 2-, 3- or 4-bit codes.

``W_hat[n, k] = scales[n, g] * (table[q[n, k]] - zeros[n, g])`` with ``g = k // group_size`` and q in the
canonical packed layout (``include/lowbit/pack.h``). An NF table gives the NF formats; the identity table
``0, 1, ..., 2^bits - 1`` with zeros gives the uniform (affine) format of RTN/GPTQ, so both run through here.

CPU: the kernel picks its own path by the number of rows of x (fused unpack + lookup + FMA for small M, a
dequantized-tile GEMM for large M) and by the instruction set (AVX-512, AVX2, portable C++); the environment
variable ``LOWBIT_CPU_ISA=scalar|avx2|avx512|amx``, read once at the first call, forces a lower instruction set.
CUDA: the fused kernel below 64 rows of x, the dense path from there on (:mod:`lowbit.ops.dense_path`).

:func:`interleave_lut_codes` re-lays the codes once, offline, for the CPU GEMV (FLUTE's separation of packing
from the kernel): blocks of 32 weight rows whose words at one position are contiguous, which the 2-bit AVX-512
GEMV reads without transposing. :func:`lut_gemm` takes either layout.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from lowbit.ops._native import (_C, as_tensor, capsule, check_activations, eager_fast_path, is_cuda, stream_of,
                                with_numpy)
from lowbit.ops.dense_path import dense_from_codes, dense_matmul, use_dense_path
from lowbit.ops.pack import _unpack_op

Array = Union[torch.Tensor, np.ndarray]

#: Code widths and group sizes the LUT GEMM takes.
LUT_GEMM_BITS: tuple[int, ...] = (2, 3, 4)
LUT_GEMM_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
_CODE_DTYPES = (torch.int32, torch.uint32)
#: Weight rows per block of the interleaved code layout (:func:`interleave_lut_codes`).
LUT_INTERLEAVE_ROWS = 32


def _lut_gemm_impl(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                   table: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    if use_dense_path(x):
        codes = _unpack_op(packed, bits, x.shape[1])
        return dense_matmul(x, dense_from_codes(codes, table, scales, zeros, group_size, x.dtype))
    out = torch.empty(x.shape[0], scales.shape[0], dtype=x.dtype, device=x.device)
    _C.lut_gemm(capsule(x), capsule(packed), capsule(scales), capsule(zeros), capsule(table), capsule(out), bits,
                group_size, stream_of(x))
    return out


_lut_gemm_op = torch.library.custom_op("lowbit::lut_gemm", mutates_args=())(_lut_gemm_impl)
#: The GEMM for operands already checked (QuantLinear checks its weight once): x contiguous [M, K], the rest
#: contiguous, of the shapes and dtypes :func:`lut_gemm` requires, on x's device.
lut_gemm_unchecked = eager_fast_path(_lut_gemm_op, _lut_gemm_impl)


@_lut_gemm_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
      table: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], scales.shape[0])


def _check_param(name: str, tensor, dtypes: tuple, shape: list, device: torch.device) -> torch.Tensor:
    t = as_tensor(tensor, name)
    if t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {t.dtype}")
    if list(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of x ({device}), got {t.device}")
    return t.contiguous()


def interleave_lut_codes(packed: Array) -> torch.Tensor:
    """Canonical codes [N, W] (any bits) re-laid as [ceil(N / 32), W, 32]: element [b, w, r] is word w of weight
    row 32 * b + r, zero past N. The 2-bit CPU GEMV (AVX-512, up to 4 rows of x, 64+ weight rows) reads 32 rows'
    words at one position as two vectors, so this layout spares it a 16 x 16 transpose per 16 words (4096 x 4096
    M = 1: ~15% faster); :func:`lut_gemm` takes it on the CPU wherever it takes canonical codes (the other paths
    convert it back per call, a copy of the codes) and converts it for CUDA tensors. Make it once, at load time.

    Raises:
        TypeError: packed is not int32/uint32. ValueError: packed is not 2-dimensional.
    """
    p = as_tensor(packed, "packed")
    if p.dtype not in _CODE_DTYPES:
        raise TypeError(f"packed must have dtype int32 or uint32, got {p.dtype}")
    if p.dim() != 2:
        raise ValueError(f"packed must have 2 dimensions [N, words], got shape {list(p.shape)}")
    n, w = p.shape
    blocks = -(-n // LUT_INTERLEAVE_ROWS)
    padded = torch.zeros(blocks * LUT_INTERLEAVE_ROWS, w, dtype=p.dtype, device=p.device)
    padded[:n] = p
    return padded.view(blocks, LUT_INTERLEAVE_ROWS, w).transpose(1, 2).contiguous()


def _canonical_codes(interleaved: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`interleave_lut_codes` for N weight rows."""
    blocks, w, rows = interleaved.shape
    return interleaved.transpose(1, 2).reshape(blocks * rows, w)[:n].contiguous()


def lut_gemm(x: Array, packed: Array, scales: Array, table: Array, bits: int, group_size: int,
             zeros: Optional[Array] = None) -> Array:
    """``x @ W_hat.T`` for a weight stored as packed codes, a lookup table and per-group scales (and zeros).

    Args:
        x: float32, float16 or bfloat16 activations of shape [..., K] (any leading batch dims; numpy arrays
            give numpy results).
        packed: int32 (or uint32) codes of shape [N, ceil(K / 32) * bits] in the canonical layout, or
            [ceil(N / 32), ceil(K / 32) * bits, 32] from :func:`interleave_lut_codes`; codes past K in the last
            32-code block are ignored.
        scales: float16 [N, ceil(K / group_size)]; the last group may be short.
        table: float32 [2 ** bits], the value of each code.
        bits: 2, 3 or 4. group_size: 32, 64 or 128.
        zeros: None (zero = 0) or float16 like scales, subtracted from the table value before scaling.

    Returns:
        [..., N] in the dtype of x, accumulated in float32.

    Raises:
        TypeError: an argument has the wrong type or dtype. ValueError: a wrong shape, device, bits or
        group_size (the message names the argument, what was expected and what came). RuntimeError: CUDA tensors
        without a CUDA build or device.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in LUT_GEMM_BITS:
        raise ValueError(f"bits must be one of {LUT_GEMM_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in LUT_GEMM_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {LUT_GEMM_GROUP_SIZES}, got {group_size!r}")

    def run(t: torch.Tensor) -> torch.Tensor:
        t = check_activations(t)
        k = t.shape[-1]
        p = as_tensor(packed, "packed")
        words = -(-k // 32) * bits
        if p.dim() == 2:
            n = p.shape[0]
            p = _check_param("packed", p, _CODE_DTYPES, [n, words], t.device)
        elif p.dim() == 3:  # interleaved: N comes from the scales
            s_t = as_tensor(scales, "scales")
            if s_t.dim() != 2:
                raise ValueError(f"scales must have 2 dimensions [N, groups], got shape {list(s_t.shape)}")
            n = s_t.shape[0]
            p = _check_param("packed", p, _CODE_DTYPES, [-(-n // LUT_INTERLEAVE_ROWS), words, LUT_INTERLEAVE_ROWS],
                             t.device)
            if is_cuda(p):
                p = _canonical_codes(p, n)
        else:
            raise ValueError(f"packed must have 2 dimensions [N, ceil(K / 32) * bits] (or 3 when interleaved), "
                             f"got shape {list(p.shape)}")
        group_shape = [n, -(-k // group_size)]
        s = _check_param("scales", scales, (torch.float16,), group_shape, t.device)
        z = None if zeros is None else _check_param("zeros", zeros, (torch.float16,), group_shape, t.device)
        tab = _check_param("table", table, (torch.float32,), [1 << bits], t.device)
        y = lut_gemm_unchecked(t.reshape(-1, k).contiguous(), p, s, z, tab, bits, group_size)
        return y.reshape(*t.shape[:-1], n)

    return with_numpy(run, x)


__all__ = ["lut_gemm", "interleave_lut_codes", "LUT_GEMM_BITS", "LUT_GEMM_GROUP_SIZES", "LUT_INTERLEAVE_ROWS"]
