"""The large-M path of the GEMMs on CUDA: decode the weight once into a dense [N, K] matrix in x's dtype, then one
torch matmul (cuBLAS, tensor cores).

From :data:`DENSE_PATH_MIN_ROWS` rows of x on, a GEMM is compute-bound: the fused CUDA kernels (CUDA cores, the
codes re-read for every few rows of x) lose to a dense tensor-core GEMM, and decoding N * K weights once costs
about what reading and writing them costs, which the matmul's M * N * K work hides. Each GEMM's custom op calls
:func:`use_dense_path` and, where it says so, multiplies by :func:`dense_from_codes` (or the VQ decoder) with
:func:`dense_matmul`; the user never picks. The CPU kernels choose their own large-M path inside (dequantized
tiles in cache, AMX tiles), so this runs on CUDA only; its functions are plain torch ops on any device, which is
how the CPU tests check them.

The decoded weight is the format's ``W_hat`` rounded once to x's dtype; the async-dequant and mixed GEMMs do not
round the activations to int8 on this path (so they are more accurate here than their fused kernels).
"""
from __future__ import annotations

from typing import Optional

import torch

from lowbit.ops._native import is_cuda

#: Rows of x from which a CUDA GEMM takes the dense path (the CPU kernels' own large-M switch is also 64).
#: Not yet tuned on a GPU.
DENSE_PATH_MIN_ROWS = 64
_CHUNK_ELEMENTS = 1 << 24  # weights decoded per step: bounds the fp32 / int64 temporaries (256 MB of int64 index)


def use_dense_path(x: torch.Tensor) -> bool:
    """Whether a GEMM with activations x [M, K] takes the dense path: CUDA and M >= DENSE_PATH_MIN_ROWS."""
    return is_cuda(x) and x.shape[0] >= DENSE_PATH_MIN_ROWS


def dense_from_codes(codes: torch.Tensor, values: Optional[torch.Tensor], scales: torch.Tensor,
                     zeros: Optional[torch.Tensor], group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``W_hat[n, k] = scales[n, g] * (v[n, k] - zeros[n, g])`` (g = k // group_size) in `dtype`, where v is
    ``values[codes]`` (a float32 table) or the codes themselves when values is None.

    codes: uint8 [N, K]; scales and zeros: float16 [N, ceil(K / group_size)] (zeros None: 0). Computed in fp32
    and rounded once; rows are decoded in chunks so the temporaries stay bounded.
    """
    n, k = codes.shape
    groups = scales.shape[1]
    out = torch.empty(n, k, dtype=dtype, device=codes.device)
    step = max(1, _CHUNK_ELEMENTS // max(groups * group_size, 1))
    for r0 in range(0, n, step):
        c = codes[r0:r0 + step]
        rows = c.shape[0]
        v = torch.zeros(rows, groups * group_size, dtype=torch.float32, device=codes.device)
        v[:, :k] = c.to(torch.float32) if values is None else values[c.to(torch.int64)]
        g = v.view(rows, groups, group_size)
        if zeros is not None:
            g.sub_(zeros[r0:r0 + step].to(torch.float32).unsqueeze(2))
        g.mul_(scales[r0:r0 + step].to(torch.float32).unsqueeze(2))
        out[r0:r0 + step] = v[:, :k]
    return out


def dense_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for x [M, K] and a dense weight [N, K] of x's dtype: the matmul of the dense path."""
    return torch.matmul(x, weight.t())


__all__ = ["DENSE_PATH_MIN_ROWS", "use_dense_path", "dense_from_codes", "dense_matmul"]
