"""The dense (large-M, CUDA) path of the GEMMs (lowbit.ops.dense_path): the layout decoders against the packers
they invert, the decoded weight against the dequantizers, each GEMM's dense path (forced on the CPU) against a
float64 reference of the unrounded activations times W_hat; on a GPU, the CUDA ops from 64 rows of x on (gpu)."""
import importlib
import math

import numpy as np
import pytest
import torch

from lowbit.ops import (aligned_from_codes, async_dequant_gemm, dequantize_lut, dequantize_mixed, dequantize_uniform,
                        lut_gemm, mixed_gemm, pack_mixed, pack_uniform, prepare_lut_table, prepare_mixed_gemm,
                        vq_dequantize, vq_gemm)
from lowbit.ops import dense_path
from lowbit.ops.async_dequant import codes_from_aligned
from lowbit.ops.mixed_gemm import codes_from_mixed_gemm

from gpu_device import GPU, cpu_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
GEMM_MODULES = ["lut_gemm", "async_dequant", "mixed_gemm", "vq_gemm"]


@pytest.fixture
def dense_on_cpu(monkeypatch):
    """Every GEMM takes the dense path from DENSE_PATH_MIN_ROWS rows on, on any device."""
    def forced(x):
        return x.shape[0] >= dense_path.DENSE_PATH_MIN_ROWS
    for name in GEMM_MODULES:
        monkeypatch.setattr(importlib.import_module(f"lowbit.ops.{name}"), "use_dense_path", forced)


def random_affine(n, k, bits, group_size, gen):
    groups = math.ceil(k / group_size)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.001).half()
    zeros = (torch.rand(n, groups, generator=gen) * (2**bits - 1)).half()
    return codes, scales, zeros


def w_hat(values, scales, zeros, group_size):
    """float64 s * (v - z) with v [N, K] float64 values and per-group scales and zeros (zeros None: 0)."""
    k = values.shape[1]
    s = np.repeat(scales.double().numpy(), group_size, axis=1)[:, :k]
    z = 0.0 if zeros is None else np.repeat(zeros.double().numpy(), group_size, axis=1)[:, :k]
    return s * (values - z)


def assert_gemm_close(y, x, w):
    """y against x @ w.T in float64 (x as given, w exact), within the rounding of w and y to x's dtype."""
    unit = UNIT[x.dtype]
    xd = x.double().numpy()
    ref = xd @ w.T
    bound = 3 * unit * (np.abs(xd) @ np.abs(w).T) + 2 * unit * np.abs(ref) + 1e-30
    err = np.abs(y.double().numpy() - ref)
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst error / bound {(err / bound).max():.3g}"


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("k", [1, 31, 32, 64, 100, 128, 129, 576, 1000])
def test_codes_from_aligned_inverts_aligned_from_codes(k, bits):
    codes = torch.randint(0, 2**bits, (5, k), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
    back = codes_from_aligned(aligned_from_codes(codes, bits), k, bits)
    assert back.dtype == torch.uint8 and torch.equal(back, codes)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("k,widths", [(100, None), (576, None), (256, [4, 4]), (256, [2, 2]), (1000, None)])
def test_codes_from_mixed_gemm_inverts_prepare(k, widths, group_size):
    gen = torch.Generator().manual_seed(k + group_size)
    groups = math.ceil(k / group_size)
    if widths is None or len(widths) != groups:
        widths = [int(b) for b in torch.randint(0, 2, (groups,), generator=gen) * 2 + 2]
    cols = torch.tensor([widths[c // group_size] for c in range(k)])
    codes = (torch.rand(6, k, generator=gen) * 2.0**cols).floor().clamp(max=(2**cols - 1).float()).to(torch.uint8)
    weight = prepare_mixed_gemm(pack_mixed(codes, widths, group_size), widths, group_size, k)
    assert torch.equal(codes_from_mixed_gemm(weight.packed, weight.runs4, weight.runs2, k), codes)


@pytest.mark.parametrize("chunk", [1 << 24, 300])  # 300 elements: one row per chunk
@pytest.mark.parametrize("k,group_size", [(100, 32), (576, 128), (1000, 64)])
def test_dense_from_codes_matches_the_dequantizers(k, group_size, chunk, monkeypatch):
    monkeypatch.setattr(dense_path, "_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(k)
    for bits in (2, 3, 4):
        codes, scales, zeros = random_affine(7, k, bits, group_size, gen)
        packed = pack_uniform(codes, bits)
        got = dense_path.dense_from_codes(codes, None, scales, zeros, group_size, torch.float32)
        want = dequantize_uniform(packed, scales, zeros, bits, group_size, k, torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        table = torch.randn(2**bits, generator=gen)
        got = dense_path.dense_from_codes(codes, table, scales, None, group_size, torch.float16)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, dequantize_lut(packed, scales, table, bits, group_size, k, torch.float16))
        with_zeros = dense_path.dense_from_codes(codes, table, scales, zeros, group_size, torch.float32)
        ref = w_hat(table.double().numpy()[codes.long().numpy()], scales, zeros, group_size)
        np.testing.assert_allclose(with_zeros.double().numpy(), ref, rtol=1e-6, atol=1e-7)


def test_cpu_never_takes_the_dense_path():
    assert not dense_path.use_dense_path(torch.zeros(4096, 8))


# ---- each GEMM's dense path, forced on the CPU; the same cases run on CUDA below --------------------------------
# (the inputs and references are computed on the host under cpu_reference(), the GEMM on `device`)

def lut_case(m, k, n, bits, group_size, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(m + k + bits)
    codes, scales, zeros = random_affine(n, k, bits, group_size, gen)
    table = torch.randn(2**bits, generator=gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = w_hat(table.double().numpy()[codes.long().numpy()], scales, zeros, group_size)
    with cpu_reference():
        packed = pack_uniform(codes, bits)
    args = [t.to(device) for t in (packed, scales, table)]
    y = lut_gemm(x.to(device), *args, bits, group_size, zeros=zeros.to(device))
    return y.cpu(), x, w


def async_case(m, k, n, bits, group_size, dtype, table, device="cpu"):
    gen = torch.Generator().manual_seed(m + k + bits)
    codes, scales, zeros = random_affine(n, k, bits, group_size, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    with cpu_reference():
        if table:
            tq, ts = prepare_lut_table(torch.randn(2**bits, generator=gen), bits)
            values = (tq[:2**bits].double() * ts.double()).numpy()[codes.long().numpy()]  # the rounded table's values
            tab = (tq.to(device), ts.to(device))
        else:
            values, tab = codes.double().numpy(), None
        packed = aligned_from_codes(codes, bits).to(device)
    y = async_dequant_gemm(x.to(device), packed, scales.to(device), zeros.to(device), group_size, bits=bits,
                           table=tab)
    return y.cpu(), x, w_hat(values, scales, zeros, group_size)


def mixed_case(m, k, n, group_size, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(m + k)
    groups = math.ceil(k / group_size)
    widths = [int(b) for b in torch.randint(0, 2, (groups,), generator=gen) * 2 + 2]
    cols = torch.tensor([widths[c // group_size] for c in range(k)])
    codes = (torch.rand(n, k, generator=gen) * 2.0**cols).floor().clamp(max=(2**cols - 1).float()).to(torch.uint8)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.001).half()
    zeros = (torch.rand(n, groups, generator=gen) * 3).half()
    with cpu_reference():
        packed = pack_mixed(codes, widths, group_size)
        weight = prepare_mixed_gemm(packed, widths, group_size, k)
        w = dequantize_mixed(packed, scales, zeros, widths, group_size, k, torch.float32).double().numpy()
    weight = type(weight)(*(t.to(device) for t in weight))
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = mixed_gemm(x.to(device), weight, scales.to(device), zeros.to(device), group_size)
    return y.cpu(), x, w


def vq_case(m, k, n, r, e, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(m + k + r)
    codes = torch.randint(0, e, (n, k // 8, r), generator=gen).to(torch.int32).to(torch.int16)
    codebooks = (torch.randn(r, e, 8, generator=gen) * 0.1).half()
    scales = (torch.rand(n, generator=gen) + 0.5).half()
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = vq_gemm(x.to(device), codes.to(device), codebooks.to(device), scales.to(device))
    with cpu_reference():
        w = vq_dequantize(codes, codebooks, scales, torch.float32).double().numpy()
    return y.cpu(), x, w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [64, 97])
def test_lut_gemm_dense_path(m, dtype, dense_on_cpu):
    for bits, k, group_size in ((2, 576, 128), (3, 100, 32), (4, 1000, 64)):
        assert_gemm_close(*lut_case(m, k, 33, bits, group_size, dtype))


@pytest.mark.parametrize("table", [False, True], ids=["uniform", "table"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [64, 97])
def test_async_dequant_dense_path_uses_unrounded_activations(m, dtype, table, dense_on_cpu):
    for bits, k, group_size in ((2, 576, 64), (4, 1000, 32), (2, 129, 128)):
        assert_gemm_close(*async_case(m, k, 40, bits, group_size, dtype, table))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_gemm_dense_path(dtype, dense_on_cpu):
    for k, group_size in ((576, 64), (1000, 32), (256, 128)):
        assert_gemm_close(*mixed_case(70, k, 21, group_size, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r,e", [(1, 256), (2, 256), (1, 4096)])
def test_vq_gemm_dense_path(r, e, dtype, dense_on_cpu):
    assert_gemm_close(*vq_case(64, 96, 19, r, e, dtype))


def test_below_the_threshold_the_fused_kernels_run(dense_on_cpu):
    """One row fewer: the async GEMM rounds x to int8 again, so it misses the unrounded reference's tolerance."""
    y, x, w = async_case(dense_path.DENSE_PATH_MIN_ROWS - 1, 576, 40, 2, 64, torch.float32, False)
    with pytest.raises(AssertionError):
        assert_gemm_close(y, x, w)


# ---- CUDA ------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [64, 200])
def test_cuda_lut_gemm_dense_path(m, dtype):
    for bits, k, group_size in ((2, 4096, 128), (3, 100, 32), (4, 1000, 64)):
        assert_gemm_close(*lut_case(m, k, 257, bits, group_size, dtype, device=GPU))


@pytest.mark.gpu
@pytest.mark.parametrize("table", [False, True], ids=["uniform", "table"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [64, 200])
def test_cuda_async_dequant_dense_path(m, dtype, table):
    for bits, k, group_size in ((2, 4096, 128), (4, 1000, 32), (2, 129, 128)):
        assert_gemm_close(*async_case(m, k, 257, bits, group_size, dtype, table, device=GPU))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_mixed_gemm_dense_path(dtype):
    for k, group_size in ((576, 64), (4096, 128)):
        assert_gemm_close(*mixed_case(100, k, 130, group_size, dtype, device=GPU))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r,e", [(1, 65536), (2, 256)])
def test_cuda_vq_gemm_dense_path(r, e, dtype):
    assert_gemm_close(*vq_case(128, 1024, 70, r, e, dtype, device=GPU))
