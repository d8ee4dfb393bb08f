"""Vector-quantization codebook GEMM (VPTQ / AQLM style): ``y = x @ W_hat.T`` straight from codebook indices.

Format (``include/lowbit/vq.h``): K is a multiple of 8 and every run of 8 weights is a sum of R residual
codewords times a per-row scale,
``W_hat[n, 8j:8j+8] = scales[n] * sum_{r < R} codebooks[r, codes[n, j, r], :]``, with codes int16 (read as
unsigned 16-bit; uint16 accepted) or uint8 (one byte per index, for E = 256) [N, K/8, R], codebooks float16
[R, E, 8] (E = 2^c, 8 <= c <= 16), scales float16 [N] and R in {1, 2}. c = 16, R = 1 and c = 8, R = 2 are
both 2 bits per weight of index information.

CPU strategies (``strategy=``): "decode" gathers codewords and FMAs them into x (for M >= 64 it decodes tiles
of W_hat and runs a blocked GEMM); "lut" (AQLM) builds the dot products of x with every codeword once per call
and sums N * K/8 * R table lookups per row of x; "auto" (default) compares estimated costs
(:func:`vq_gemm_cpu_strategy` says which it picks). CUDA has one kernel and ignores the strategy; from 64 rows
of x on it decodes W_hat once (:func:`vq_dequantize`) and multiplies by torch's matmul (:mod:`lowbit.ops.dense_path`).
Indices >= E raise ValueError on the CPU (naming the first bad (n, j, r)); the CUDA kernels mask them with E - 1.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

from lowbit.ops._native import (_C, as_tensor, capsule, check_activations, eager_fast_path, is_cuda, stream_of,
                                with_numpy)
from lowbit.ops.dense_path import dense_matmul, use_dense_path

Array = Union[torch.Tensor, np.ndarray]

#: Vector length v (weights per codeword), residual codebook counts and the range of codebook sizes E.
VQ_VECTOR_LENGTH = 8
VQ_CODEBOOKS: tuple[int, ...] = (1, 2)
VQ_MIN_ENTRIES, VQ_MAX_ENTRIES = 256, 65536
VQ_STRATEGIES: tuple[str, ...] = ("auto", "decode", "lut")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_UINT16 = getattr(torch, "uint16", None)
_CODE_DTYPES = (torch.int16, torch.uint8) if _UINT16 is None else (torch.int16, _UINT16, torch.uint8)


def _vq_gemm_impl(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                  strategy: str) -> torch.Tensor:
    if use_dense_path(x):  # CUDA, large M: decode once, then torch's matmul
        return dense_matmul(x, _vq_dequantize_op(codes, codebooks, scales, x.dtype))
    out = torch.empty(x.shape[0], codes.shape[0], dtype=x.dtype, device=x.device)
    _C.vq_gemm(capsule(x), capsule(codes), capsule(codebooks), capsule(scales), capsule(out), strategy,
               stream_of(x))
    return out


_vq_gemm_op = torch.library.custom_op("lowbit::vq_gemm", mutates_args=())(_vq_gemm_impl)
#: The GEMM for operands already checked (QuantLinear checks its weight once): x contiguous [M, K], the rest
#: contiguous, of the shapes and dtypes :func:`vq_gemm` requires, on x's device.
vq_gemm_unchecked = eager_fast_path(_vq_gemm_op, _vq_gemm_impl)


@_vq_gemm_op.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
      strategy: str) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])


@torch.library.custom_op("lowbit::vq_dequantize", mutates_args=())
def _vq_dequantize_op(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(codes.shape[0], codes.shape[1] * VQ_VECTOR_LENGTH, dtype=dtype, device=codes.device)
    _C.vq_dequantize(capsule(codes), capsule(codebooks), capsule(scales), capsule(out), stream_of(codes))
    return out


@_vq_dequantize_op.register_fake
def _(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return codes.new_empty(codes.shape[0], codes.shape[1] * VQ_VECTOR_LENGTH, dtype=dtype)


def _check_format(codes, codebooks, scales, device: torch.device, k: Union[int, None]):
    """Validated, contiguous (codes as int16 or uint8, codebooks, scales) on `device`; k = K of x when known."""
    c = as_tensor(codes, "codes")
    if c.dtype not in _CODE_DTYPES:
        raise TypeError(f"codes must have dtype int16, uint16 or uint8, got {c.dtype}")
    if c.dim() != 3 or c.shape[2] not in VQ_CODEBOOKS:
        raise ValueError(f"codes must have shape [N, K / 8, R] with R in {VQ_CODEBOOKS}, got {list(c.shape)}")
    if k is not None and c.shape[1] * VQ_VECTOR_LENGTH != k:
        raise ValueError(f"codes must have shape [N, K / 8, R] = [N, {k // VQ_VECTOR_LENGTH}, R] for x with "
                         f"K = {k}, got {list(c.shape)}")
    if c.device != device:
        raise ValueError(f"codes must be on the device of x ({device}), got {c.device}")
    n, _, r = c.shape
    cb = as_tensor(codebooks, "codebooks")
    if cb.dtype != torch.float16:
        raise TypeError(f"codebooks must have dtype float16, got {cb.dtype}")
    if cb.dim() != 3 or cb.shape[0] != r or cb.shape[2] != VQ_VECTOR_LENGTH:
        raise ValueError(f"codebooks must have shape [R, E, 8] = [{r}, E, 8] (R from codes), got {list(cb.shape)}")
    e = cb.shape[1]
    if not (VQ_MIN_ENTRIES <= e <= VQ_MAX_ENTRIES and e & (e - 1) == 0):
        raise ValueError(f"codebooks must have E = 2^c entries, 8 <= c <= 16 (a power of two in "
                         f"[{VQ_MIN_ENTRIES}, {VQ_MAX_ENTRIES}]), got E = {e}")
    if cb.device != c.device:
        raise ValueError(f"codebooks must be on the device of codes ({c.device}), got {cb.device}")
    s = as_tensor(scales, "scales")
    if s.dtype != torch.float16:
        raise TypeError(f"scales must have dtype float16, got {s.dtype}")
    if list(s.shape) != [n]:
        raise ValueError(f"scales must have shape [{n}] (N from codes), got {list(s.shape)}")
    if s.device != c.device:
        raise ValueError(f"scales must be on the device of codes ({c.device}), got {s.device}")
    if c.dtype not in (torch.int16, torch.uint8):
        c = c.view(torch.int16)  # same bits: the kernels read unsigned 16-bit indices either way
    cb = cb.contiguous()
    if is_cuda(cb) and cb.data_ptr() % 16:
        cb = cb.clone()  # the CUDA kernels load whole 16-byte codewords
    return c.contiguous(), cb, s.contiguous()


def vq_gemm(x: Array, codes: Array, codebooks: Array, scales: Array, strategy: str = "auto") -> Array:
    """``x @ W_hat.T`` for a VQ weight W_hat [N, K] given by codes, codebooks and scales (see the module doc).

    Args:
        x: float32, float16 or bfloat16 activations [..., K] (any leading dims; numpy arrays give numpy
            results), K a multiple of 8.
        codes: int16 or uint16 [N, K / 8, R], R in {1, 2}, each value an unsigned index < E; or uint8 (indices
            < 256, for E = 256: half the memory).
        codebooks: float16 [R, E, 8], E a power of two in [256, 65536].
        scales: float16 [N].
        strategy: CPU kernel, "auto", "decode" or "lut" (ignored on CUDA).

    Returns:
        [..., N] in the dtype of x, accumulated in float32.

    Raises:
        TypeError: an argument has the wrong type or dtype. ValueError: a wrong shape, K not a multiple of 8, R
        not 1 or 2, E not a power of two in [256, 65536], an index >= E (CPU), an unknown strategy, or tensors
        on different devices. RuntimeError: CUDA tensors without a CUDA build or device.
    """
    if strategy not in VQ_STRATEGIES:
        raise ValueError(f"strategy must be one of {VQ_STRATEGIES}, got {strategy!r}")

    def run(t: torch.Tensor) -> torch.Tensor:
        t = check_activations(t)
        k = t.shape[-1]
        if k % VQ_VECTOR_LENGTH or k == 0:
            raise ValueError(f"x must have K (its last dimension) a positive multiple of {VQ_VECTOR_LENGTH}, "
                             f"got K = {k}")
        c, cb, s = _check_format(codes, codebooks, scales, t.device, k)
        y = vq_gemm_unchecked(t.reshape(-1, k).contiguous(), c, cb, s, strategy)
        return y.reshape(*t.shape[:-1], c.shape[0])

    return with_numpy(run, x)


def vq_dequantize(codes: Array, codebooks: Array, scales: Array, dtype: torch.dtype = torch.float32) -> Array:
    """The dense weight W_hat [N, K] of a VQ weight (see the module doc), in `dtype` (float32, float16 or
    bfloat16). numpy codes give a numpy array. Raises like :func:`vq_gemm`."""
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")

    def run(c: torch.Tensor) -> torch.Tensor:
        c = as_tensor(c, "codes")
        c, cb, s = _check_format(c, codebooks, scales, c.device, None)
        return _vq_dequantize_op(c, cb, s, dtype)

    return with_numpy(run, codes)


def vq_gemm_cpu_strategy(m: int, n: int, k: int, r: int, e: int) -> str:
    """The CPU strategy ("decode" or "lut") that ``strategy="auto"`` picks for x [m, k], N = n, R = r and E = e
    on this CPU."""
    return _C.vq_gemm_cpu_choice(int(m), int(n), int(k), int(r), int(e))


__all__ = ["vq_gemm", "vq_dequantize", "vq_gemm_cpu_strategy", "VQ_VECTOR_LENGTH", "VQ_CODEBOOKS",
           "VQ_MIN_ENTRIES", "VQ_MAX_ENTRIES", "VQ_STRATEGIES"]
