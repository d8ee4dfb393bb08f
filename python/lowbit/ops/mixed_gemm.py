"""Mixed 2/4-bit GEMM: ``y = x @ W_hat.T`` for a ``mixed`` weight (each K-group 2 or 4 bits wide by
``group_bits``, ``W_hat = scales * (q - zeros)``) in one kernel, with the activations rounded to int8 per group
as in :func:`lowbit.ops.async_dequant_gemm`.

:func:`prepare_mixed_gemm` re-lays the canonical mixed layout once, offline: the 32-column runs of the 4-bit
groups (in K order) become a 4-bit aligned segment, those of the 2-bit groups a 2-bit one after it, and two run
maps (``runs4``, ``runs2``) say which 32 columns of x each segment run multiplies. The kernel walks both segments
of a row in one pass (the width is fixed per segment: no branch per element) and reads x in place, so neither x
nor the output is gathered or split (``include/lowbit/async_dequant.h``). On CUDA from 64 rows of x on, the
weight is decoded once and multiplied by torch's matmul instead (:mod:`lowbit.ops.dense_path`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Union

import numpy as np
import torch

from lowbit.ops._native import (_C, as_tensor, capsule, check_activations, eager_fast_path, is_cuda, stream_of,
                                with_numpy)
from lowbit.ops.async_dequant import (_check_group_size, _quantize_activations_impl, aligned_from_codes,
                                      aligned_words_per_row, check_group_params, codes_from_aligned)
from lowbit.ops.dense_path import dense_from_codes, dense_matmul, use_dense_path
from lowbit.ops.pack import _group_bits_tensor, unpack_mixed

Array = Union[torch.Tensor, np.ndarray]


class MixedGemmWeight(NamedTuple):
    """A mixed weight laid out for :func:`mixed_gemm`: ``packed`` int32 [N, mixed_aligned_words(R4, R2)] (the
    4-bit segment, then the 2-bit one) and the K-run of each segment run, ``runs4`` int32 [R4] and ``runs2``
    int32 [R2] (R4 + R2 = ceil(K / 32))."""
    packed: torch.Tensor
    runs4: torch.Tensor
    runs2: torch.Tensor


def mixed_aligned_words(runs4: int, runs2: int) -> int:
    """int32 words per row of the mixed aligned layout: the two segments' aligned rows."""
    return aligned_words_per_row(32 * runs4, 4) + aligned_words_per_row(32 * runs2, 2)


def prepare_mixed_gemm(packed: Array, group_bits: Union[Array, Sequence[int]], group_size: int,
                       k: int) -> MixedGemmWeight:
    """Re-lays a weight in the canonical mixed layout (:func:`lowbit.ops.pack_mixed`) for :func:`mixed_gemm`, on
    its device. Done once, at load time."""
    group_size = _check_group_size(group_size)
    p = as_tensor(packed, "packed")
    codes = as_tensor(unpack_mixed(p, group_bits, group_size, k), "codes")
    widths = _group_bits_tensor(group_bits, k, group_size, "cpu").tolist()
    n, kruns = codes.shape[0], math.ceil(k / 32)
    padded = torch.zeros(n, kruns * 32, dtype=torch.uint8, device=codes.device)
    padded[:, :k] = codes
    by_run = padded.view(n, kruns, 32)
    segments = []
    for bits in (4, 2):
        runs = [r for r in range(kruns) if widths[r * 32 // group_size] == bits]
        index = torch.tensor(runs, dtype=torch.int64, device=codes.device)
        segment = by_run.index_select(1, index).reshape(n, 32 * len(runs))
        segments.append((aligned_from_codes(segment, bits), index.to(torch.int32)))
    return MixedGemmWeight(torch.cat([segments[0][0], segments[1][0]], dim=1).contiguous(), segments[0][1],
                           segments[1][1])


def codes_from_mixed_gemm(packed: torch.Tensor, runs4: torch.Tensor, runs2: torch.Tensor, k: int) -> torch.Tensor:
    """The codes (uint8 [N, k]) of a weight in the mixed aligned layout of :func:`prepare_mixed_gemm` (given as
    its three tensors), in torch ops on packed's device."""
    n, kruns = packed.shape[0], runs4.numel() + runs2.numel()
    words4 = aligned_words_per_row(32 * runs4.numel(), 4)
    by_run = torch.empty(n, kruns, 32, dtype=torch.uint8, device=packed.device)
    for segment, runs, bits in ((packed[:, :words4], runs4, 4), (packed[:, words4:], runs2, 2)):
        if runs.numel():
            codes = codes_from_aligned(segment, 32 * runs.numel(), bits)
            by_run[:, runs.to(torch.int64)] = codes.reshape(n, runs.numel(), 32)
    return by_run.reshape(n, kruns * 32)[:, :k]


def _mixed_gemm_impl(x: torch.Tensor, packed: torch.Tensor, runs4: torch.Tensor, runs2: torch.Tensor,
                     scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    if use_dense_path(x):  # CUDA, large M: unrounded activations times the decoded weight
        codes = codes_from_mixed_gemm(packed, runs4, runs2, x.shape[1])
        return dense_matmul(x, dense_from_codes(codes, None, scales, zeros, group_size, x.dtype))
    out = torch.empty(x.shape[0], packed.shape[0], dtype=x.dtype, device=x.device)
    if not is_cuda(x):  # one native call: the activations are quantized inside it
        _C.mixed_gemm_float(capsule(x), capsule(packed), capsule(runs4), capsule(runs2), capsule(scales),
                            capsule(zeros), capsule(out), group_size)
        return out
    xq, d = _quantize_activations_impl(x, group_size)
    _C.mixed_gemm(capsule(xq), capsule(d), capsule(packed), capsule(runs4), capsule(runs2), capsule(scales),
                  capsule(zeros), capsule(out), x.shape[1], group_size, stream_of(x))
    return out


_mixed_gemm_op = torch.library.custom_op("lowbit::mixed_gemm", mutates_args=())(_mixed_gemm_impl)
#: The GEMM for operands already checked (QuantLinear checks its weight once): x contiguous [M, K], the rest
#: contiguous, of the shapes and dtypes :func:`mixed_gemm` requires, on x's device.
mixed_gemm_unchecked = eager_fast_path(_mixed_gemm_op, _mixed_gemm_impl)


@_mixed_gemm_op.register_fake
def _(x, packed, runs4, runs2, scales, zeros, group_size):
    return x.new_empty(x.shape[0], packed.shape[0])


def _check_runs(runs4: torch.Tensor, runs2: torch.Tensor, k: int, group_size: int, device: torch.device) -> None:
    """The run maps of prepare_mixed_gemm: each run of K once, each map increasing, a K-group's runs in one map."""
    kruns = math.ceil(k / 32)
    for name, r in (("runs4", runs4), ("runs2", runs2)):
        if r.dtype != torch.int32 or r.dim() != 1:
            raise TypeError(f"{name} must be an int32 vector, got {r.dtype} of shape {list(r.shape)}")
        if r.device != device:
            raise ValueError(f"{name} must be on the device of x ({device}), got {r.device}")
    if runs4.numel() + runs2.numel() == kruns and torch.compiler.is_compiling():
        return  # the values are checked by the native op on CPU at run time
    r4, r2 = runs4.cpu().to(torch.int64), runs2.cpu().to(torch.int64)
    both = torch.cat([r4, r2])
    if both.numel() != kruns or not torch.equal(torch.sort(both).values, torch.arange(kruns)):
        raise ValueError(f"runs4 and runs2 must hold each of the ceil(K / 32) = {kruns} runs of K once, got "
                         f"{runs4.numel()} + {runs2.numel()} runs")
    if bool((r4.diff() <= 0).any()) or bool((r2.diff() <= 0).any()):
        raise ValueError("runs4 and runs2 must each be increasing (as prepare_mixed_gemm makes them)")
    shared = set((r4 * 32 // group_size).tolist()) & set((r2 * 32 // group_size).tolist())
    if shared:
        raise ValueError(f"the runs of K-group {min(shared)} must all be in runs4 or all in runs2")


def mixed_gemm(x: Array, weight: MixedGemmWeight, scales: Array, zeros: Array, group_size: int) -> Array:
    """``x @ W_hat.T`` for a mixed 2/4-bit weight laid out by :func:`prepare_mixed_gemm`.

    Args:
        x: float32, float16 or bfloat16 activations [..., K] (numpy arrays give numpy results).
        weight: the :class:`MixedGemmWeight` of :func:`prepare_mixed_gemm`.
        scales, zeros: float16 [N, ceil(K/group_size)] (the ``mixed`` format's).
        group_size: 32, 64 or 128.

    Returns:
        [..., N] in the dtype of x (activations rounded to int8 per group first, as in async_dequant_gemm).

    Raises:
        TypeError / ValueError naming the argument for a wrong dtype, shape, device or run map;
        RuntimeError for CUDA tensors without a CUDA build or device.
    """
    group_size = _check_group_size(group_size)
    if not isinstance(weight, MixedGemmWeight):
        raise TypeError(f"weight must be a MixedGemmWeight (from prepare_mixed_gemm), got {type(weight).__name__}")

    def run(t: torch.Tensor) -> torch.Tensor:
        t = check_activations(t)
        if t.shape[-1] < 1:
            raise ValueError(f"x must have shape [..., K] with K >= 1, got {list(t.shape)}")
        k = t.shape[-1]
        p, runs4, runs2 = (as_tensor(v, name) for v, name in zip(weight, ("packed", "runs4", "runs2")))
        _check_runs(runs4, runs2, k, group_size, t.device)
        words = mixed_aligned_words(runs4.numel(), runs2.numel())
        if p.dtype not in (torch.int32, torch.uint32) or p.dim() != 2 or p.shape[1] != words:
            raise ValueError(f"packed must be int32 [N, {words}] (the mixed aligned layout of {runs4.numel()} 4-bit "
                             f"and {runs2.numel()} 2-bit runs), got {p.dtype} of shape {list(p.shape)}")
        if p.device != t.device:
            raise ValueError(f"packed must be on the device of x ({t.device}), got {p.device}")
        if zeros is None:
            raise TypeError("zeros must be a float16 tensor (the mixed format is affine), got None")
        params = check_group_params(scales, zeros, p.shape[0], -(-k // group_size), t.device)
        y = mixed_gemm_unchecked(t.reshape(-1, k).contiguous(), p.contiguous().view(torch.int32),
                                 runs4.contiguous(), runs2.contiguous(), *params, group_size)
        return y.reshape(*t.shape[:-1], p.shape[0])

    return with_numpy(run, x)


__all__ = ["mixed_gemm", "prepare_mixed_gemm", "MixedGemmWeight", "mixed_aligned_words"]
