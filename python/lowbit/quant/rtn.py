"""Round-to-nearest quantizers: affine (asymmetric or symmetric) into the ``uniform`` format, and normal-float
rounding into the ``lut`` format. Groups run along in_features; a short last group is handled as is."""
from __future__ import annotations

import math

import torch

from lowbit.formats import GROUP_SIZES, QuantizedWeight
from lowbit.ops import nf_table


def _check(weight: torch.Tensor, bits: int, group_size: int, allowed_bits=(2, 3, 4)) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a float tensor, got {weight.dtype}")
    if bits not in allowed_bits:
        raise ValueError(f"bits must be one of {allowed_bits}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """weight [N, K] as [N, G, group_size] float32, the short last group padded by repeating its last column."""
    n, k = weight.shape
    groups = math.ceil(k / group_size)
    w = weight.detach().to(torch.float32)
    pad = groups * group_size - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, groups, group_size)


def _minmax_params(w: torch.Tensor, bits: int, symmetric: bool, shrink: float = 1.0, integer_zero: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and zero [N, G] whose grid spans shrink * [min, max] of each group of w [N, G, gs].

    The asymmetric zero is real-valued (-min / scale, as fp16), so the grid's ends are the group's extremes, as in
    llama.cpp's Q4_1; with ``integer_zero`` the range is widened to hold 0 and the zero rounded to an integer (the
    GPTQ checkpoint convention)."""
    qmax = 2**bits - 1
    if symmetric:
        scale = 2 * shrink * w.abs().amax(dim=2) / qmax
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    elif integer_zero:
        lo, hi = shrink * w.amin(dim=2).clamp(max=0), shrink * w.amax(dim=2).clamp(min=0)
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, qmax)
    else:
        lo, hi = w.amin(dim=2), w.amax(dim=2)
        mid, half = (lo + hi) / 2, shrink * (hi - lo) / 2
        scale = 2 * half / qmax
        zero = -(mid - half) / torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.where(scale > 0, zero, -mid)  # a constant group: scale 1, codes round(mid - mid) = 0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float16)
    return scale, zero.to(torch.float16)


def affine_params(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, mse: bool = False,
                  integer_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group fp16 scale and zero [N, G] for round-to-nearest at `bits` (zero real-valued unless
    ``integer_zero``; see :func:`_minmax_params`).

    min/max of each group by default; with ``mse`` the range is shrunk by the factor in 1.0, 0.95, ..., 0.5
    that minimizes the group's squared rounding error (clipping a few large weights to resolve the rest finer,
    which matters most at 2 bits).
    """
    w = grouped(weight, group_size)
    if not mse:
        return _minmax_params(w, bits, symmetric, integer_zero=integer_zero)
    k = weight.shape[1]
    valid = (torch.arange(w.shape[1] * group_size, device=w.device) < k).reshape(1, w.shape[1], group_size)
    best, best_err = None, None
    for shrink in torch.linspace(1.0, 0.5, 11).tolist():
        scale, zero = _minmax_params(w, bits, symmetric, shrink, integer_zero)
        s, z = scale.float()[..., None], zero.float()[..., None]
        deq = s * (torch.round(w / s + z).clamp(0, 2**bits - 1) - z)
        err = (((deq - w) ** 2) * valid).sum(dim=2)
        if best is None:
            best, best_err = (scale, zero), err
        else:
            better = err < best_err
            best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
            best_err = torch.minimum(err, best_err)
    return best


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_size: int) -> torch.Tensor:
    """uint8 codes [N, K]: round(w / scale + zero) clamped to [0, 2^bits - 1], per group."""
    n, k = weight.shape
    w = grouped(weight, group_size)
    q = torch.round(w / scale.float()[..., None] + zero.float()[..., None]).clamp(0, 2**bits - 1)
    return q.reshape(n, -1)[:, :k].to(torch.uint8)


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                 mse: bool = False, integer_zero: bool = False) -> QuantizedWeight:
    """Round-to-nearest into the ``uniform`` format: w ~ scale * (q - zero) per group of `group_size` along K.

    Args:
        weight: [out_features, in_features] float tensor.
        bits: 2, 3 or 4.
        group_size: 32, 64 or 128 (K need not be a multiple: the last group is short).
        symmetric: zero fixed at 2^(bits-1) and scale from the group's max |w| (else the group's min/max).
        mse: search a clipped range per group (see :func:`affine_params`) instead of plain min/max.
        integer_zero: round the asymmetric zero to an integer (the range then holds 0), as GPTQ checkpoints do.
    """
    _check(weight, bits, group_size)
    scale, zero = affine_params(weight, bits, group_size, symmetric, mse, integer_zero)
    codes = quantize_codes(weight, scale, zero, bits, group_size)
    return QuantizedWeight.uniform(codes.cpu(), scale.cpu(), zero.cpu(), bits, group_size).to(weight.device)


def nf_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128) -> QuantizedWeight:
    """Normal-float rounding into the ``lut`` format: w ~ absmax(group) * NF_bits[q], q the nearest table entry."""
    _check(weight, bits, group_size)
    n, k = weight.shape
    w = grouped(weight, group_size)
    scale = w.abs().amax(dim=2)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float16)
    table = nf_table(bits).to(torch.float32)
    normalized = (w / scale.float()[..., None]).reshape(n, -1)[:, :k]
    midpoints = (table[1:] + table[:-1]) / 2
    codes = torch.bucketize(normalized.contiguous().cpu(), midpoints).to(torch.uint8)
    return QuantizedWeight.lut(codes, scale.cpu(), table, bits, group_size).to(weight.device)


__all__ = ["rtn_quantize", "nf_quantize", "affine_params", "quantize_codes", "grouped"]
