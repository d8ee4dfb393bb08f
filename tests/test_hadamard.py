"""Hadamard transforms against float64 references: dense H_n x, scipy's Sylvester matrix, and an
independent numpy FWHT for the large sizes; dtypes, batch shapes, randomized form, errors, torch.compile."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowbit
from lowbit import _C
from lowbit.ops import (HADAMARD_FACTORS, hadamard_matrix, hadamard_supported, hadamard_transform, random_signs,
                        randomized_hadamard_transform)

from fake_dlpack import FakeCudaTensor
from gpu_device import cpu_reference, to_gpu

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative to the output's rms


def fwht_reference(x: np.ndarray, m: int) -> np.ndarray:
    """Unnormalized H_m (x) H_{2^k} applied to the last axis, in float64, by the textbook recursion."""
    n = x.shape[-1]
    p = n // m
    y = x.astype(np.float64).reshape(-1, m, p).copy()
    h = 1
    while h < p:
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        a, b = y[..., 0, :].copy(), y[..., 1, :].copy()
        y[..., 0, :], y[..., 1, :] = a + b, a - b
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:
        hm = np.array(_C.hadamard_table(m), dtype=np.float64)
        y = np.einsum("ij,rjp->rip", hm, y)
    return y.reshape(x.shape)


def assert_close(out: torch.Tensor, ref: np.ndarray, dtype: torch.dtype):
    err = np.abs(out.double().numpy() - ref).max() if ref.size else 0.0
    rms = math.sqrt(float(np.mean(ref**2))) if ref.size else 1.0
    assert err <= TOL[dtype] * max(rms, 1e-30) * 4, f"max error {err:.3g} vs rms {rms:.3g}"


@pytest.mark.parametrize("m", [m for m in HADAMARD_FACTORS if m not in (1, 40)])
def test_tables_are_hadamard(m):
    h = np.array(_C.hadamard_table(m), dtype=np.int64)
    assert h.shape == (m, m) and set(np.unique(h)) == {-1, 1}
    np.testing.assert_array_equal(h @ h.T, m * np.eye(m, dtype=np.int64))


@pytest.mark.parametrize("k", range(0, 11))
def test_sylvester_matches_scipy(k):
    n = 1 << k
    np.testing.assert_array_equal(hadamard_matrix(n).numpy(), scipy.linalg.hadamard(n))
    x = torch.randn(3, n, dtype=torch.float64)
    ref = x.numpy() @ scipy.linalg.hadamard(n).T / math.sqrt(n)
    assert_close(hadamard_transform(x.float()), ref, torch.float32)


@pytest.mark.parametrize("m", HADAMARD_FACTORS)
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 7])
def test_against_dense_matrix(m, k):
    n = m << k
    if n > 4096:
        pytest.skip("dense reference too large; covered by test_large_sizes")
    x = torch.randn(5, n, dtype=torch.float64)
    h = hadamard_matrix(n).numpy()
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))
    ref = x.numpy() @ h.T / math.sqrt(n)
    assert_close(hadamard_transform(x.float()), ref, torch.float32)


@pytest.mark.parametrize("n", [576, 1536, 4096, 8192, 11008, 14336, 16384, 32768, 140 * 128, 108 * 256, 156 * 128])
def test_large_sizes(n):
    assert hadamard_supported(n)
    p, m = _C.hadamard_factor(n)
    x = torch.randn(3, n)
    ref = fwht_reference(x.numpy(), m) / math.sqrt(n)
    assert_close(hadamard_transform(x), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576,), (1, 12), (3, 5, 64), (7, 1536), (2, 3, 4, 28), (0, 256), (4, 0, 20)])
def test_dtypes_and_batch_shapes(dtype, shape):
    x = torch.randn(shape).to(dtype)
    out = hadamard_transform(x)
    assert out.shape == x.shape and out.dtype == dtype
    m = _C.hadamard_factor(shape[-1])[1]
    ref = fwht_reference(x.double().numpy(), m) / math.sqrt(shape[-1])
    assert_close(out, ref, dtype)


def test_non_contiguous_input_is_handled():
    base = torch.randn(64, 10)
    x = base.t()  # [10, 64] with strides (1, 10)
    assert not x.is_contiguous()
    torch.testing.assert_close(hadamard_transform(x), hadamard_transform(x.contiguous()))
    sliced = torch.randn(6, 128)[::2]
    torch.testing.assert_close(hadamard_transform(sliced), hadamard_transform(sliced.contiguous()))


def test_numpy_in_numpy_out():
    x = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32)
    out = hadamard_transform(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, fwht_reference(x, 12) / math.sqrt(96), atol=1e-5)


def test_scale():
    x = torch.randn(2, 64)
    torch.testing.assert_close(hadamard_transform(x, scale=1.0), hadamard_transform(x) * 8.0)


@pytest.mark.parametrize("n", [64, 576, 1536, 12 * 4, 20, 52 * 8, 14336])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_randomized_and_inverse(n, dtype):
    s = random_signs(n, seed=n)
    x = torch.randn(3, n).to(dtype)
    y = randomized_hadamard_transform(x, s)
    m = _C.hadamard_factor(n)[1]
    ref = fwht_reference(x.double().numpy() * s.double().numpy(), m) / math.sqrt(n)
    assert_close(y, ref, dtype)
    back = randomized_hadamard_transform(y, s, inverse=True)
    assert_close(back, x.double().numpy(), dtype)
    # the inverse is s * H^T / sqrt(n): check it against the dense matrix where that is cheap
    if n <= 1536:
        h = hadamard_matrix(n).numpy()
        y64 = torch.randn(2, n, dtype=torch.float64)
        ref_inv = (y64.numpy() @ h) / math.sqrt(n) * s.double().numpy()
        assert_close(randomized_hadamard_transform(y64.float(), s, inverse=True), ref_inv, torch.float32)


def test_random_signs_reproducible():
    a, b = random_signs(100, seed=3), random_signs(100, seed=3)
    assert torch.equal(a, b) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, random_signs(100, seed=4))


@given(k=st.integers(0, 9), m=st.sampled_from(HADAMARD_FACTORS), rows=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_property_orthonormal(k, m, rows, seed):
    """H applied as forward then inverse is the identity; the normalized transform preserves norms."""
    n = m << k
    if n > 32768:
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g, dtype=torch.float32)
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-4, atol=1e-4)
    s = random_signs(n, seed=seed)
    torch.testing.assert_close(randomized_hadamard_transform(randomized_hadamard_transform(x, s), s, inverse=True),
                               x, rtol=1e-4, atol=1e-4)
    if m == 1:  # Sylvester matrices are symmetric: H H = I
        torch.testing.assert_close(hadamard_transform(y), x, rtol=1e-4, atol=1e-4)


def test_unsupported_size_names_nearest():
    with pytest.raises(ValueError, match=r"got 100; nearest supported sizes: 96 and 104"):
        hadamard_transform(torch.randn(2, 100))
    with pytest.raises(ValueError, match="32768"):
        hadamard_transform(torch.randn(1, 65536))
    for n in [100, 7, 65536, 17 * 64]:
        assert not hadamard_supported(n)


def test_bad_input():
    with pytest.raises(TypeError, match="x must have dtype float32, float16 or bfloat16, got torch.int32"):
        hadamard_transform(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        hadamard_transform([1.0, 2.0])
    with pytest.raises(ValueError, match="at least one dimension"):
        hadamard_transform(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"signs must have shape \[64\]"):
        randomized_hadamard_transform(torch.randn(2, 64), torch.ones(32))
    with pytest.raises(ValueError, match="only \\+1 and -1"):
        randomized_hadamard_transform(torch.randn(2, 64), torch.full((64,), 0.5))


def test_native_boundary_checks():
    """The binding itself refuses bad views, whatever the Python layer lets through."""
    from torch.utils.dlpack import to_dlpack
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="out must have shape \\[4, 64\\], got \\[4, 32\\]"):
        _C.hadamard_transform(to_dlpack(x), to_dlpack(torch.empty(4, 32)), None, 1.0, False, 0)
    with pytest.raises(TypeError, match="out must have the dtype of x"):
        _C.hadamard_transform(to_dlpack(x), to_dlpack(torch.empty(4, 64, dtype=torch.float16)), None, 1.0, False, 0)
    with pytest.raises(ValueError, match="x must be contiguous"):
        _C.hadamard_transform(to_dlpack(torch.randn(64, 4).t()), to_dlpack(x), None, 1.0, False, 0)
    with pytest.raises(TypeError, match="signs must have dtype float32"):
        _C.hadamard_transform(to_dlpack(x), to_dlpack(x.clone()), to_dlpack(torch.ones(64, dtype=torch.float64)),
                              1.0, False, 0)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        _C.hadamard_transform(x, to_dlpack(x), None, 1.0, False, 0)


def test_cuda_tensor_without_gpu_raises_runtime_error():
    if lowbit.cuda_available():
        pytest.skip("a GPU is present")
    fake_in, fake_out = FakeCudaTensor([2, 64]), FakeCudaTensor([2, 64])
    with pytest.raises(RuntimeError, match="hadamard_transform: got CUDA tensors"):
        _C.hadamard_transform(fake_in.capsule, fake_out.capsule, None, 1.0, False, 0)


def test_torch_compile_fullgraph():
    def f(x, s):
        return randomized_hadamard_transform(torch.relu(x) + 1.0, s) * 2.0

    x, s = torch.randn(4, 576), random_signs(576)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, s), f(x, s))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64, 256, 512, 1024, 4096, 32768, 12, 24, 96, 576, 1536, 14336,
                               20 * 512, 140 * 64, 108 * 256, 36 * 512, 11008, 156 * 32, 172])
def test_cuda_matches_cpu(n, dtype):
    from lowbit.ops._native import _C  # the module the ops call (the emulated kernels' under emulation)
    x = torch.randn(7, n).to(dtype)
    s = random_signs(n, seed=1)
    with cpu_reference():
        cpu = hadamard_transform(x)
    gpu = hadamard_transform(to_gpu(x))
    m = _C.hadamard_factor(n)[1]
    assert_close(gpu.cpu(), fwht_reference(x.double().numpy(), m) / math.sqrt(n), dtype)
    assert_close(gpu.cpu(), cpu.double().numpy(), dtype)
    y = randomized_hadamard_transform(to_gpu(x), to_gpu(s))
    back = randomized_hadamard_transform(y, to_gpu(s), inverse=True)
    assert_close(back.cpu(), x.double().numpy(), dtype)
