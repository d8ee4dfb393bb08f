"""Hadamard transforms over the last dimension: plain, and randomized with a sign vector (QuIP/QuaRot)."""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

from lowbit.ops._native import _C, as_tensor, capsule, eager_fast_path, stream_of, with_numpy

Array = Union[torch.Tensor, np.ndarray]

#: Odd-size factors m such that n = 2^k * m is supported (n <= HADAMARD_MAX_N).
HADAMARD_FACTORS: tuple[int, ...] = tuple(sorted({*_C.hadamard_factors(), 40}))  # 40 runs as 2 * 20
HADAMARD_MAX_N = 32768
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def hadamard_supported(n: int) -> bool:
    """True when a Hadamard transform of size n is available (n = 2^k * m, m in HADAMARD_FACTORS)."""
    return _C.hadamard_factor(int(n)) is not None


def check_hadamard_size(n: int) -> None:
    """Raises ValueError naming the nearest supported sizes unless a transform of size n is available."""
    if not hadamard_supported(n):
        _C.hadamard_check_size(int(n))


def _hadamard_impl(x: torch.Tensor, signs: Optional[torch.Tensor], scale: float, inverse: bool) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _C.hadamard_transform(capsule(x), capsule(out), capsule(signs), scale, inverse, stream_of(x))
    return out


_hadamard_op = torch.library.custom_op("lowbit::hadamard_transform", mutates_args=())(_hadamard_impl)
#: The transform for arguments already checked: x a float tensor [..., n] of a supported n, signs None or float32
#: [n] of +-1 on x's device (QuantLinear checks its signs once, at construction).
hadamard_unchecked = eager_fast_path(_hadamard_op, _hadamard_impl)


@_hadamard_op.register_fake
def _(x: torch.Tensor, signs: Optional[torch.Tensor], scale: float, inverse: bool) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check(x, name: str = "x") -> torch.Tensor:
    x = as_tensor(x, name)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if not torch.compiler.is_compiling():
        check_hadamard_size(x.shape[-1])
    return x


def _check_signs(signs, x: torch.Tensor) -> torch.Tensor:
    signs = as_tensor(signs, "signs")
    n = x.shape[-1]
    if signs.dim() != 1 or signs.shape[0] != n:
        raise ValueError(f"signs must have shape [{n}] (the last dim of x), got {list(signs.shape)}")
    if signs.device != x.device:
        raise ValueError(f"signs must be on the device of x ({x.device}), got {signs.device}")
    signs = signs.to(torch.float32).contiguous()
    if not torch.compiler.is_compiling() and not bool((signs.abs() == 1).all()):
        raise ValueError("signs must contain only +1 and -1")
    return signs


def hadamard_transform(x: Array, scale: Optional[float] = None) -> Array:
    """Walsh-Hadamard transform of the last dimension: ``scale * H_n x`` for every row.

    Args:
        x: float32, float16 or bfloat16 tensor (or numpy array) of shape [..., n], n = 2^k * m with m in
            ``HADAMARD_FACTORS`` and n <= 32768 (this covers 576, 1536, 4096, 11008, 14336). Non-contiguous
            input is copied to a contiguous one first. Arithmetic is in float32 whatever the dtype.
        scale: multiplies the result; default 1/sqrt(n), which makes the transform orthonormal.

    Returns:
        A new tensor (array) of the shape and dtype of x. For n = 2^k (m = 1) this is the Sylvester matrix of
        ``scipy.linalg.hadamard``; otherwise H_n = H_m (x) H_{2^k} with H_m from ``hadamard_matrix``.

    Raises:
        TypeError: x is not a float tensor. ValueError: n is not supported (the message names the nearest
        supported sizes). RuntimeError: x is on a CUDA device but lowbit has no CUDA kernels or no GPU.
    """
    def run(t: torch.Tensor) -> torch.Tensor:
        t = _check(t)
        s = 1.0 / math.sqrt(t.shape[-1]) if scale is None else float(scale)
        return hadamard_unchecked(t, None, s, False)

    return with_numpy(run, x)


def randomized_hadamard_transform(x: Array, signs: Array, inverse: bool = False,
                                  scale: Optional[float] = None) -> Array:
    """The random orthogonal rotation of QuIP/QuaRot, ``H_n diag(signs)``, or its inverse.

    forward: ``scale * H_n (signs * x)``; inverse: ``signs * (scale * H_n^T x)``. With the default scale
    1/sqrt(n) the inverse undoes the forward exactly (up to rounding).

    Args:
        x: as for :func:`hadamard_transform`.
        signs: +1/-1 values of shape [n] on the device of x (any real dtype), e.g. from :func:`random_signs`.
        inverse: apply the inverse rotation.
        scale: default 1/sqrt(n).
    """
    def run(t: torch.Tensor) -> torch.Tensor:
        t = _check(t)
        s = _check_signs(signs, t)
        sc = 1.0 / math.sqrt(t.shape[-1]) if scale is None else float(scale)
        return hadamard_unchecked(t, s, sc, bool(inverse))

    return with_numpy(run, x)


def random_signs(n: int, seed: int = 0, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """A reproducible float32 vector of n random +1/-1 values."""
    g = torch.Generator().manual_seed(int(seed))
    bits = torch.randint(0, 2, (int(n),), generator=g, dtype=torch.int64)
    return (1 - 2 * bits).to(torch.float32).to(device)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The unnormalized n x n matrix H_n the transform multiplies by (entries +1/-1), as a dense tensor.

    Meant for tests and small references; n must be supported.
    """
    check_hadamard_size(n)
    p, m = _C.hadamard_factor(int(n))
    sylvester = torch.ones(1, 1, dtype=dtype)
    while sylvester.shape[0] < p:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    hm = torch.tensor(_C.hadamard_table(m), dtype=dtype) if m > 1 else torch.ones(1, 1, dtype=dtype)
    return torch.kron(hm, sylvester)


__all__ = ["hadamard_transform", "randomized_hadamard_transform", "random_signs", "hadamard_matrix",
           "hadamard_supported", "check_hadamard_size", "HADAMARD_FACTORS", "HADAMARD_MAX_N"]
