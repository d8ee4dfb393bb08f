"""GPTQ (OPTQ): column-by-column rounding with second-order error feedback through the inverse Hessian's
Cholesky factor, in blocks of 128 columns with lazy updates; optional activation order with static groups,
uniform (affine) or LUT (normal-float) grids. Produces ``uniform`` or ``lut`` QuantizedWeights."""
from __future__ import annotations

import math
from typing import Optional

import torch

from lowbit.formats import QuantizedWeight
from lowbit.ops import nf_table
from lowbit.quant.rtn import _check, affine_params


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1 = U^T U, in float64.

    Dead inputs (zero diagonal: the input never varies) get H_ii = 1 so the factorization exists; their weights
    do not affect the output and are quantized as they are.
    """
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = torch.diag(h).mean()
    h.diagonal().add_(damp * mean_diag)
    for attempt in range(8):  # add more dampening if H is numerically indefinite
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h.diagonal().add_(damp * mean_diag * 2**attempt)
    else:
        raise ValueError("hessian is not positive definite even after dampening")
    hinv = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(hinv, upper=True)


class _Grid:
    """Per-group quantization grid: affine (zero real-valued, or an integer with ``integer_zero``), or
    scale * table (nearest entry)."""

    def __init__(self, kind: str, symmetric: bool, mse: bool, integer_zero: bool = False):
        self.kind, self.symmetric, self.mse, self.integer_zero = kind, symmetric, mse, integer_zero

    def params(self, w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(scale fp16, zero fp16 or None) [N, 1] for the columns w [N, len] (len may be < group_size)."""
        if self.kind == "lut":
            scale = w.abs().amax(dim=1, keepdim=True).to(torch.float32)
            return torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float16), None
        return affine_params(w, bits, group_size, self.symmetric, self.mse, self.integer_zero)

    def round(self, w: torch.Tensor, bits: int, scale: torch.Tensor, zero: Optional[torch.Tensor]):
        """(codes, dequantized values) of one column w [N] with its group's scale and zero [N]."""
        s = scale.to(torch.float64)
        if self.kind == "lut":
            table = nf_table(bits).to(device=w.device, dtype=torch.float64)
            q = (w[:, None] / s[:, None] - table[None, :]).abs().argmin(dim=1)
            return q, s * table[q]
        z = zero.to(torch.float64)
        q = torch.round(w / s + z).clamp(0, 2**bits - 1)
        return q.to(torch.int64), s * (q - z)


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, group_bits: list[int], group_size: int,
               grid: str = "uniform", symmetric: bool = False, damp: float = 0.01, block_size: int = 128,
               act_order: bool = False, mse: bool = False, integer_zero: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The GPTQ loop: (codes uint8 [N, K], scales fp16 [N, G], zeros fp16 [N, G] or None), group g at
    group_bits[g] bits. Arguments as for :func:`gptq_quantize`; inputs are assumed validated."""
    n, k = weight.shape
    device = weight.device
    w = weight.detach().to(torch.float64).clone()
    h = hessian.to(device=device, dtype=torch.float64)
    g = _Grid(grid, symmetric, mse, integer_zero)
    groups = len(group_bits)
    scales = torch.empty(n, groups, dtype=torch.float16, device=device)
    zeros = torch.empty(n, groups, dtype=torch.float16, device=device) if grid == "uniform" else None

    def set_group(gi: int, cols: torch.Tensor) -> None:
        s, z = g.params(cols, group_bits[gi], group_size)
        scales[:, gi] = s[:, 0]
        if zeros is not None:
            zeros[:, gi] = z[:, 0]

    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else None
    if act_order:  # static groups from the original weight, then work in permuted column order
        for gi in range(groups):
            set_group(gi, w[:, gi * group_size:(gi + 1) * group_size])
        w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_factor(h, damp)
    column_group = (perm if act_order else torch.arange(k, device=device)) // group_size
    codes = torch.empty(n, k, dtype=torch.int64, device=device)
    for b0 in range(0, k, block_size):
        b1 = min(k, b0 + block_size)
        w1 = w[:, b0:b1].clone()
        err = torch.empty_like(w1)
        for i in range(b1 - b0):
            col = b0 + i
            if not act_order and col % group_size == 0:
                set_group(col // group_size, w1[:, i:i + group_size])
            gi = int(column_group[col])
            q, deq = g.round(w1[:, i], group_bits[gi], scales[:, gi], None if zeros is None else zeros[:, gi])
            codes[:, col] = q
            e = (w1[:, i] - deq) / u[col, col]
            w1[:, i:] -= e[:, None] * u[col, col:b1][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.uint8), scales, zeros


def check_gptq_args(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, grid: str, block_size: int):
    """Raises ValueError for a Hessian of the wrong shape, an unknown grid or a block size not a multiple of the
    group size."""
    if grid not in ("uniform", "lut"):
        raise ValueError(f"grid must be 'uniform' or 'lut', got {grid!r}")
    k = weight.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must have shape [{k}, {k}], got {list(hessian.shape)}")
    if block_size % group_size:
        raise ValueError(f"block_size must be a multiple of group_size ({group_size}), got {block_size}")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  grid: str = "uniform", symmetric: bool = False, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, mse: bool = False, integer_zero: bool = False) -> QuantizedWeight:
    """Quantizes weight [N, K] with GPTQ given the layer Hessian [K, K] (e.g. from HessianAccumulator).

    Args:
        weight: float tensor [out_features, in_features].
        hessian: 2/n X^T X of the layer's inputs, [in_features, in_features].
        bits: 2, 3 or 4. group_size: 32, 64 or 128 (K need not be a multiple).
        grid: "uniform" (affine, a zero per group) or "lut" (normal-float table times group absmax).
        symmetric: affine grid with zero fixed at 2^(bits-1).
        damp: dampening, a fraction of the mean Hessian diagonal added to the diagonal.
        block_size: columns per lazy-update block (a multiple of group_size).
        act_order: process columns by decreasing Hessian diagonal. Groups stay static (computed from the
            unquantized weight in original column order), so the stored weight needs no permutation at run time.
        mse: choose each group's affine range by a clipping search (rtn.affine_params) instead of min/max.
        integer_zero: round each asymmetric zero to an integer, as the GPTQ checkpoint format stores them
            (needed to export with :func:`lowbit.gptq_checkpoint.save_gptq`); by default zeros are real-valued.

    Returns:
        A ``uniform`` (or ``lut``) QuantizedWeight on weight's device.
    """
    _check(weight, bits, group_size)
    check_gptq_args(weight, hessian, group_size, grid, block_size)
    device = weight.device
    groups = math.ceil(weight.shape[1] / group_size)
    codes, scales, zeros = gptq_codes(weight, hessian, [bits] * groups, group_size, grid, symmetric, damp,
                                      block_size, act_order, mse, integer_zero)
    if grid == "lut":
        return QuantizedWeight.lut(codes.cpu(), scales.cpu(), nf_table(bits), bits, group_size).to(device)
    return QuantizedWeight.uniform(codes.cpu(), scales.cpu(), zeros.cpu(), bits, group_size).to(device)


__all__ = ["gptq_quantize", "gptq_codes", "inverse_hessian_factor"]
