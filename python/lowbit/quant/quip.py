"""QuIP: incoherence processing with randomized Hadamard transforms on both sides of W (and the conjugated
Hessian), then LDLQ rounding, which is GPTQ's rounding on the incoherent problem. The sign vectors are kept so
QuantLinear can rotate x and y at run time."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import QuantizedWeight
from lowbit.ops import hadamard_supported, random_signs, randomized_hadamard_transform
from lowbit.quant.gptq import gptq_quantize


@dataclass
class IncoherentWeight:
    """A weight quantized in the rotated basis: W ~ diag(signs_out) H_N^T W_q H_K diag(signs_in)."""
    weight: QuantizedWeight
    signs_in: torch.Tensor
    signs_out: torch.Tensor


def rotate_weight(weight: torch.Tensor, signs_in: torch.Tensor, signs_out: torch.Tensor) -> torch.Tensor:
    """U W V^T with U = H_N diag(signs_out), V = H_K diag(signs_in) (normalized Hadamard), in float32."""
    w = randomized_hadamard_transform(weight.to(torch.float32).contiguous(), signs_in)  # rows: W V^T
    return randomized_hadamard_transform(w.t().contiguous(), signs_out).t().contiguous()  # columns: U (.)


def rotate_hessian(hessian: torch.Tensor, signs_in: torch.Tensor) -> torch.Tensor:
    """V H V^T: the Hessian of the rotated inputs x' = V x, in float64 (rotated in float32, symmetrized)."""
    h = randomized_hadamard_transform(hessian.to(torch.float32).contiguous(), signs_in)  # H V^T
    h = randomized_hadamard_transform(h.t().contiguous(), signs_in).t()  # V (H V^T)
    h = h.to(torch.float64)
    return (h + h.T) / 2


def quip_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 2, group_size: int = 128,
                  seed: int = 0, **gptq_options) -> IncoherentWeight:
    """QuIP: rotate W and H by random-sign Hadamard transforms, then GPTQ/LDLQ-round the rotated weight.

    Args:
        weight: [out_features, in_features]; both sizes must be supported by the Hadamard transform
            (2^k * m, see lowbit.ops.HADAMARD_FACTORS).
        hessian: [in_features, in_features] input Hessian of the layer.
        bits, group_size: as for GPTQ; ``gptq_options`` (grid, symmetric, damp, act_order...) pass through.
        seed: seeds the two sign vectors (the in-vector from `seed`, the out-vector from `seed + 1`).
    """
    n, k = weight.shape
    for name, size in (("out_features", n), ("in_features", k)):
        if not hadamard_supported(size):
            raise ValueError(f"quip needs Hadamard-supported sizes; {name} = {size} is not (see HADAMARD_FACTORS)")
    device = weight.device
    s_in, s_out = random_signs(k, seed, device), random_signs(n, seed + 1, device)
    w = rotate_weight(weight, s_in, s_out)
    h = rotate_hessian(hessian.to(device), s_in)
    q = gptq_quantize(w, h, bits=bits, group_size=group_size, **gptq_options)
    return IncoherentWeight(q, s_in, s_out)


__all__ = ["quip_quantize", "IncoherentWeight", "rotate_weight", "rotate_hessian"]
