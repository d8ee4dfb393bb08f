"""Mixed 2/4-bit allocation: each K-group gets 2 or 4 bits under an average-bits budget, chosen greedily by the
Hessian-weighted error each width would cost it; then GPTQ with the chosen width per group (``mixed`` format)."""
from __future__ import annotations

import math

import torch

from lowbit.formats import QuantizedWeight
from lowbit.quant.gptq import check_gptq_args, gptq_codes
from lowbit.quant.rtn import _check, affine_params, quantize_codes


def group_errors(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per K-group error sum_n sum_{k in g} H_kk (w - w_rtn)^2 of round-to-nearest at `bits` [G]."""
    k = weight.shape[1]
    scale, zero = affine_params(weight, bits, group_size)
    codes = quantize_codes(weight, scale, zero, bits, group_size).to(torch.float64)
    s = scale.double().repeat_interleave(group_size, 1)[:, :k]
    z = zero.double().repeat_interleave(group_size, 1)[:, :k]
    err = (weight.double() - s * (codes - z)) ** 2 * torch.diag(hessian).double()[None, :]
    per_column = err.sum(dim=0)
    groups = math.ceil(k / group_size)
    padded = torch.zeros(groups * group_size, dtype=torch.float64, device=weight.device)
    padded[:k] = per_column
    return padded.reshape(groups, group_size).sum(dim=1)


def allocate_bits(weight: torch.Tensor, hessian: torch.Tensor, average_bits: float, group_size: int) -> torch.Tensor:
    """uint8 [G] of 2s and 4s: the groups whose error drops most from 2 to 4 bits get 4 bits, as many as the
    budget allows (average over weights, counting the short last group by its length, at most `average_bits`)."""
    if not 2.0 <= average_bits <= 4.0:
        raise ValueError(f"average_bits must be between 2 and 4, got {average_bits}")
    k = weight.shape[1]
    groups = math.ceil(k / group_size)
    lengths = [min(group_size, k - g * group_size) for g in range(groups)]
    gain = group_errors(weight, hessian, 2, group_size) - group_errors(weight, hessian, 4, group_size)
    bits = torch.full((groups,), 2, dtype=torch.uint8)
    budget = (average_bits - 2.0) * k  # extra bits to spend, 2 per weight of an upgraded group
    for g in torch.argsort(gain.cpu(), descending=True).tolist():
        if 2 * lengths[g] <= budget + 1e-9:
            bits[g] = 4
            budget -= 2 * lengths[g]
    return bits


def mixed_quantize(weight: torch.Tensor, hessian: torch.Tensor, average_bits: float = 2.5, group_size: int = 128,
                   damp: float = 0.01, block_size: int = 128, act_order: bool = False) -> QuantizedWeight:
    """GPTQ into the ``mixed`` format with 2/4 bits per K-group allocated under `average_bits` (e.g. 2.5)."""
    _check(weight, 4, group_size)
    check_gptq_args(weight, hessian, group_size, "uniform", block_size)
    group_bits = allocate_bits(weight, hessian, average_bits, group_size)
    codes, scales, zeros = gptq_codes(weight, hessian, group_bits.tolist(), group_size, "uniform", False, damp,
                                      block_size, act_order)
    return QuantizedWeight.mixed(codes.cpu(), scales.cpu(), zeros.cpu(), group_bits, group_size).to(weight.device)


__all__ = ["mixed_quantize", "allocate_bits", "group_errors"]
