"""Hadamard transform speed: lowbit vs a dense `x @ H.T` in torch and vs the pure-PyTorch FWHT of the PyPI
package `hadamard-transform` (power-of-two sizes only, so 11008 is zero-padded to 16384 for it)."""
import math

import pytest
import torch
from hadamard_transform import hadamard_transform as pytorch_fwht
from hadamard_transform import pad_to_power_of_2

from lowbit.ops import hadamard_matrix, hadamard_transform

SHAPES = [(4096, 4096), (1, 11008), (2048, 576), (1, 14336)]


def _bytes(rows: int, n: int) -> int:
    return 2 * rows * n * 4  # fp32 read + write


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_lowbit(benchmark, shape):
    benchmark.group = f"hadamard {shape[0]}x{shape[1]}"
    x = torch.randn(*shape)
    benchmark(hadamard_transform, x)
    benchmark.extra_info["GB/s"] = _bytes(*shape) / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_torch_dense(benchmark, shape):
    benchmark.group = f"hadamard {shape[0]}x{shape[1]}"
    x = torch.randn(*shape)
    h = (hadamard_matrix(shape[1], torch.float32) / math.sqrt(shape[1])).T.contiguous()
    benchmark(torch.matmul, x, h)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pypi_hadamard_transform(benchmark, shape):
    benchmark.group = f"hadamard {shape[0]}x{shape[1]}"
    x = torch.randn(*shape)
    x = pad_to_power_of_2(x) if shape[1] & (shape[1] - 1) else x
    benchmark(pytorch_fwht, x)
