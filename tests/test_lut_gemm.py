"""lowbit.ops.lut_gemm against a float64 dense reference built from codes packed here, on every CPU
instruction set this machine runs and on both CPU paths (fused small M, dequantized tiles for M >= 64);
agreement with dequantize_*, tables, zeros, dtypes, shapes, batch/numpy I/O, errors, torch.compile, CUDA."""
import contextlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit import _C
from isa_paths import SUPPORTED_ISAS, forced_isa
from lowbit.ops import cpu_isa, dequantize_lut, dequantize_uniform, lut_gemm, nf_table, pack_uniform, unpack
from lowbit.ops._native import capsule
from gpu_device import EMULATED, cpu_reference, gpu_stream, on_gpu, to_gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
LARGE_M = 64  # the CPU kernel switches to the dequantized-tile GEMM from this many rows of x on


@dataclass
class Weight:
    codes: torch.Tensor  # uint8 [N, K]
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    table: torch.Tensor
    bits: int
    group_size: int

    def dense(self) -> torch.Tensor:
        """W_hat [N, K] in float64, straight from the definition."""
        g = torch.arange(self.codes.shape[1]) // self.group_size
        value = self.table.double()[self.codes.long()]
        if self.zeros is not None:
            value = value - self.zeros.double()[:, g]
        return self.scales.double()[:, g] * value


def make_table(kind: str, bits: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "nf":
        return nf_table(bits)
    if kind == "identity":
        return torch.arange(1 << bits, dtype=torch.float32)
    return torch.randn(1 << bits, generator=gen)


def make_weight(n: int, k: int, bits: int, group_size: int, table: str = "random", zeros: bool = True,
                seed: int = 0) -> Weight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    groups = -(-k // group_size)
    sign = torch.randint(0, 2, (n, groups), generator=gen) * 2 - 1
    scales = ((torch.rand(n, groups, generator=gen) + 0.5) * 0.05 * sign).half()
    tab = make_table(table, bits, gen)
    z = None
    if zeros:
        lo, hi = (0.0, (1 << bits) - 1.0) if table == "identity" else (-0.3, 0.3)
        z = (lo + (hi - lo) * torch.rand(n, groups, generator=gen)).half()
    return Weight(codes, pack_uniform(codes, bits), scales, z, tab, bits, group_size)


def make_x(shape, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(x, w: Weight):
    return lut_gemm(x, w.packed, w.scales, w.table, w.bits, w.group_size, zeros=w.zeros)


def tolerance(dtype: torch.dtype, k: int) -> float:
    """Max error allowed, relative to max(|x| @ |W|.T): the output rounding plus fp32 accumulation over k."""
    return OUT_ROUNDING[dtype] + 4 * math.sqrt(max(k, 1)) * 2.0**-24


@contextlib.contextmanager
def single_threaded():
    """For the small float64 references: torch's thread pool is far slower than one thread on a busy 2-core CI
    machine. (It is also lowbit's OpenMP pool, so the kernels under test run outside this.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def error_and_bound(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple:
    """max |y - x @ w.T| and max (|x| @ |w|.T), in float64 (w float64 [N, K])."""
    with single_threaded():
        xd = x.double().reshape(-1, x.shape[-1])
        ref = (xd @ w.T).reshape(*x.shape[:-1], w.shape[0])
        assert y.dtype == x.dtype and y.shape == ref.shape
        if ref.numel() == 0:
            return 0.0, 0.0
        return float((y.double() - ref).abs().max()), float((xd.abs() @ w.abs().T).max())


def assert_matches(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """y == x @ w.T (w float64 [N, K]) within the tolerance of x's dtype and K."""
    err, bound = error_and_bound(y, x, w)
    assert err <= tolerance(x.dtype, x.shape[-1]) * bound, f"max error {err:.3g}, |x|@|W| max {bound:.3g}"


# ---- instruction sets --------------------------------------------------------------------------------------


def test_default_isa_is_the_best_supported():
    if os.environ.get("LOWBIT_CPU_ISA"):
        pytest.skip("LOWBIT_CPU_ISA overrides the default")
    assert cpu_isa() == SUPPORTED_ISAS[-1]
    assert cpu_isa("") == SUPPORTED_ISAS[-1]


@pytest.mark.parametrize("name", ["sse", "AVX2", "avx-512", "AMX"] + [i for i in ("avx2", "avx512", "amx")
                                                                        if i not in SUPPORTED_ISAS])
def test_isa_rejects_unknown_or_unsupported(name):
    default = cpu_isa()
    with pytest.raises(ValueError, match="scalar, avx2, avx512 or amx|cannot run"):
        cpu_isa(name)
    assert cpu_isa() == default


def test_isa_environment_variable():
    code = ("import torch; from lowbit.ops import cpu_isa as f; "
            "print(f(), f(''), f('scalar'), f(''))")
    env = dict(os.environ, LOWBIT_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["scalar"] * 4


# ---- values ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n,bits", [(32, 1, 3), (96, 5, 2), (100, 64, 4), (576, 129, 3), (1000, 5, 4),
                                      (1000, 129, 2), (1536, 64, 3)])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 16, 33, 64, 128, 130])  # 130: two row tiles of the large-M path
def test_shapes(isa, m, k, n, bits):
    w = make_weight(n, k, bits, 128, seed=m + k + n)
    x = make_x((m, k))
    assert_matches(run(x, w), x, w.dense())


@pytest.mark.parametrize("table,zeros", [("nf", False), ("nf", True), ("identity", True), ("random", False)])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m", [5, LARGE_M + 6])
def test_formats(isa, m, bits, group_size, table, zeros):
    w = make_weight(17, 300, bits, group_size, table, zeros)  # K = 300: short last group and last block
    x = make_x((m, 300))
    assert_matches(run(x, w), x, w.dense())


@pytest.mark.parametrize("m", [2, LARGE_M])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(isa, dtype, bits, m):
    w = make_weight(40, 1000, bits, 64)  # x is staged 16 values at a time: K = 1000 has a tail of 8
    x = make_x((m, 1000), dtype)
    y = run(x, w)
    assert_matches(y, x, w.dense())
    if dtype != torch.float32:  # the same fp32 arithmetic, then one round-to-nearest-even conversion
        assert torch.equal(y, run(x.float(), w).to(dtype))


# The 2-bit pair-table GEMV (AVX-512, up to 4 rows of x, from 64 weight rows): 32 weight rows per task (N = 65,
# 69, 95 leave a partial task), 16 code words per transposed chunk (K = 300: one partial chunk; 4100: 17 chunks,
# the last of 2 words), every group size, tables with and without zeros.
@pytest.mark.parametrize("k,n", [(300, 65), (4100, 69), (576, 95)])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("table,zeros", [("nf", False), ("identity", True), ("random", True)])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_two_bit_few_rows(isa, m, k, n, group_size, table, zeros):
    w = make_weight(n, k, 2, group_size, table, zeros, seed=m + k + group_size)
    x = make_x((m, k))
    assert_matches(run(x, w), x, w.dense())


@given(m=st.integers(1, 80), k=st.integers(1, 300), n=st.integers(1, 40), bits=st.sampled_from([2, 3, 4]),
       group_size=st.sampled_from([32, 64, 128]), dtype=st.sampled_from(DTYPES),
       table=st.sampled_from(["nf", "identity", "random"]), zeros=st.booleans(),
       isa_name=st.sampled_from(SUPPORTED_ISAS), seed=st.integers(0, 2**31 - 1))
def test_random_problems(m, k, n, bits, group_size, dtype, table, zeros, isa_name, seed):
    w = make_weight(n, k, bits, group_size, table, zeros, seed)
    x = make_x((m, k), dtype, seed + 1)
    with forced_isa(isa_name):
        y = run(x, w)
    assert_matches(y, x, w.dense())


def test_reference_codes_round_trip():
    w = make_weight(7, 1000, 3, 64)
    assert torch.equal(unpack(w.packed, 3, 1000), w.codes)


@pytest.mark.parametrize("m", [3, LARGE_M])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_agrees_with_dequantize_uniform(isa, bits, m):
    w = make_weight(29, 1000, bits, 64, "identity", zeros=True)
    dq = dequantize_uniform(w.packed, w.scales, w.zeros, bits, 64, 1000, dtype=torch.float32).double()
    np.testing.assert_allclose(dq.numpy(), w.dense().numpy(), rtol=1e-6, atol=1e-7)
    x = make_x((m, 1000))
    assert_matches(run(x, w), x, dq)


@pytest.mark.parametrize("m", [3, LARGE_M])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_agrees_with_dequantize_lut(isa, bits, m):
    w = make_weight(29, 1000, bits, 128, "nf", zeros=False)
    dq = dequantize_lut(w.packed, w.scales, w.table, bits, 128, 1000, dtype=torch.float32).double()
    np.testing.assert_allclose(dq.numpy(), w.dense().numpy(), rtol=1e-6, atol=1e-7)
    x = make_x((m, 1000))
    assert_matches(run(x, w), x, dq)


@pytest.mark.parametrize("m", [1, LARGE_M])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_past_k_are_ignored(isa, bits, m):
    w = make_weight(9, 100, bits, 32)
    x = make_x((m, 100))
    clean = run(x, w)
    past_k = torch.zeros(9, 32, dtype=torch.uint8)
    past_k[:, 100 % 32:] = (1 << bits) - 1  # the last block holds codes 96..99; set every code after them
    dirty = w.packed.clone()
    dirty[:, -bits:] |= pack_uniform(past_k, bits)
    assert not torch.equal(dirty, w.packed) and torch.equal(unpack(dirty, bits, 100), w.codes)
    assert torch.equal(lut_gemm(x, dirty, w.scales, w.table, bits, 32, zeros=w.zeros), clean)


@pytest.mark.parametrize("m", [1, LARGE_M])
def test_single_code_per_output(isa, m):
    """A one-hot x picks out one weight: y[i, n] = W_hat[n, k_i] exactly (no accumulation error)."""
    w = make_weight(6, 1000, 3, 64, "random", zeros=True)
    cols = torch.arange(m) * 997 % 1000
    x = torch.zeros(m, 1000)
    x[torch.arange(m), cols] = 1.0
    expected = w.dense()[:, cols].T
    np.testing.assert_allclose(run(x, w).double().numpy(), expected.numpy(), rtol=1e-6, atol=0)


def test_uint32_codes_equal_int32():
    w = make_weight(17, 200, 3, 64)
    x = make_x((4, 200))
    y = lut_gemm(x, w.packed.view(torch.uint32), w.scales, w.table, 3, 64, zeros=w.zeros)
    assert torch.equal(y, run(x, w))


# ---- shapes and containers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(96,), (2, 3, 96), (2, 1, 35, 96), (1, 70, 96)])
def test_leading_batch_dims(shape):
    w = make_weight(11, 96, 4, 32)
    x = make_x(shape)
    y = run(x, w)
    assert y.shape == (*shape[:-1], 11)
    assert torch.equal(y.reshape(-1, 11), run(x.reshape(-1, 96), w))
    assert_matches(y, x, w.dense())


def test_non_contiguous_and_offset_inputs():
    w = make_weight(11, 96, 2, 32)
    x = make_x((96, 5)).T
    assert not x.is_contiguous()
    expected = run(x.contiguous(), w)
    assert torch.equal(run(x, w), expected)
    x_offset = torch.cat([torch.ones(3, 96), x])[3:]
    assert x_offset.storage_offset() == 3 * 96
    assert torch.equal(run(x_offset, w), expected)
    fortran = dict(packed=w.packed.T.contiguous().T, scales=w.scales.T.contiguous().T,
                   zeros=w.zeros.T.contiguous().T, table=torch.stack([w.table, w.table], 1)[:, 1])
    assert not any(t.is_contiguous() for t in fortran.values())
    assert torch.equal(lut_gemm(x, bits=2, group_size=32, **fortran), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_in_numpy_out(dtype):
    w = make_weight(13, 100, 3, 64)
    x = make_x((2, 4, 100)).numpy().astype(dtype)
    y = lut_gemm(x, w.packed.numpy(), w.scales.numpy(), w.table.numpy(), 3, 64, zeros=w.zeros.numpy())
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == (2, 4, 13)
    assert_matches(torch.from_numpy(y), torch.from_numpy(x), w.dense())


@pytest.mark.parametrize("m,n", [(0, 7), (5, 0), (0, 0)])
def test_empty(isa, m, n):
    w = make_weight(max(n, 1), 100, 2, 32)
    packed, scales, zeros = w.packed[:n], w.scales[:n], w.zeros[:n]
    x = make_x((m, 100), torch.float16)
    y = lut_gemm(x, packed, scales, w.table, 2, 32, zeros=zeros)
    assert y.shape == (m, n) and y.dtype == torch.float16


# ---- errors ------------------------------------------------------------------------------------------------


def _call(w: Weight, x=None, **override):
    args = dict(packed=w.packed, scales=w.scales, table=w.table, bits=w.bits, group_size=w.group_size, zeros=w.zeros)
    args.update(override)
    return lut_gemm(make_x((3, 100)) if x is None else x, **args)


@pytest.mark.parametrize("override,error,match", [
    (dict(bits=5), ValueError, "bits must be one of"),
    (dict(bits=1), ValueError, "bits must be one of"),
    (dict(group_size=48), ValueError, "group_size must be one of"),
    (dict(group_size=256), ValueError, "group_size must be one of"),
    (dict(packed="codes"), TypeError, "packed must be a torch.Tensor"),
    (dict(packed=torch.zeros(7, 12, dtype=torch.int64)), TypeError, "packed must have dtype int32 or uint32"),
    (dict(packed=torch.zeros(7, 12, dtype=torch.uint8)), TypeError, "packed must have dtype int32 or uint32"),
    (dict(packed=torch.zeros(84, dtype=torch.int32)), ValueError, "packed must have 2 dimensions"),
    (dict(packed=torch.zeros(7, 9, dtype=torch.int32)), ValueError, r"packed must have shape \[7, 12\]"),
    (dict(scales=torch.ones(7, 2)), TypeError, "scales must have dtype float16"),
    (dict(scales=torch.ones(7, 1, dtype=torch.float16)), ValueError, r"scales must have shape \[7, 2\]"),
    (dict(scales=torch.ones(2, 7, dtype=torch.float16)), ValueError, r"scales must have shape \[7, 2\]"),
    (dict(zeros=torch.ones(7, 3, dtype=torch.float16)), ValueError, r"zeros must have shape \[7, 2\]"),
    (dict(zeros=torch.ones(7, 2, dtype=torch.bfloat16)), TypeError, "zeros must have dtype float16"),
    (dict(table=torch.ones(16)), ValueError, r"table must have shape \[8\]"),
    (dict(table=torch.ones(4)), ValueError, r"table must have shape \[8\]"),
    (dict(table=torch.ones(8, dtype=torch.float64)), TypeError, "table must have dtype float32"),
    (dict(table=torch.ones(8, dtype=torch.float16)), TypeError, "table must have dtype float32"),
])
def test_bad_arguments(override, error, match):
    w = make_weight(7, 100, 3, 64)  # packed [7, 12], scales [7, 2], table [8]
    with pytest.raises(error, match=match):
        _call(w, **override)


@pytest.mark.parametrize("x,error,match", [
    (torch.ones(3, 100, dtype=torch.int32), TypeError, "x must have dtype float32, float16 or bfloat16"),
    (torch.ones(3, 100, dtype=torch.float64), TypeError, "x must have dtype float32, float16 or bfloat16"),
    (torch.tensor(1.0), ValueError, "x must have at least one dimension"),
    (torch.ones(3, 64), ValueError, r"packed must have shape \[7, 6\]"),  # K inconsistent with packed [7, 12]
    (torch.ones(3, 129), ValueError, r"packed must have shape \[7, 15\]"),
    ([[1.0] * 100], TypeError, "x must be a torch.Tensor or numpy.ndarray"),
])
def test_bad_x(x, error, match):
    w = make_weight(7, 100, 3, 64)
    with pytest.raises(error, match=match):
        _call(w, x=x)


def test_native_checks_out():
    """The bindings check what the Python layer builds itself (out), and bits/group_size again."""
    w = make_weight(7, 100, 3, 64)
    x = make_x((3, 100))

    def native(out, bits=3, group_size=64):
        _C.lut_gemm(capsule(x), capsule(w.packed), capsule(w.scales), capsule(w.zeros), capsule(w.table),
                    capsule(out), bits, group_size, 0)

    with pytest.raises(TypeError, match="out must have the dtype of x"):
        native(torch.empty(3, 7, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"out must have shape \[3, 7\], got \[3, 8\]"):
        native(torch.empty(3, 8))
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        native(torch.empty(3, 7), bits=5)
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        native(torch.empty(3, 7), group_size=48)
    out = torch.empty(3, 7)
    native(out)
    assert_matches(out, x, w.dense())


# ---- torch.compile -----------------------------------------------------------------------------------------


def test_torch_compile_fullgraph():
    w = make_weight(24, 160, 4, 32, "nf", zeros=True)

    def f(x):
        return torch.relu(lut_gemm(x, w.packed, w.scales, w.table, 4, 32, zeros=w.zeros)) * 2.0

    x = make_x((2, 3, 160))
    compiled = torch.compile(f, fullgraph=True)
    y = compiled(x)
    assert y.shape == (2, 3, 24)
    assert torch.equal(y, f(x))


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration of the custom op, checked by torch."""
    w = make_weight(24, 160, 3, 64)
    x = make_x((3, 160), torch.bfloat16)
    torch.library.opcheck(torch.ops.lowbit.lut_gemm.default, (x, w.packed, w.scales, None, w.table, 3, 64))


# ---- CUDA --------------------------------------------------------------------------------------------------


def _to_cuda(w: Weight) -> dict:
    return dict(packed=to_gpu(w.packed), scales=to_gpu(w.scales), table=to_gpu(w.table), bits=w.bits,
                group_size=w.group_size, zeros=to_gpu(w.zeros))


@pytest.mark.gpu
@pytest.mark.parametrize("k,table,zeros", [(1000, "random", True), (4096, "nf", False), (576, "identity", True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 16, 63])  # from 64 rows on CUDA takes the dense path (test_dense_path)
def test_cuda_matches_cpu(m, bits, dtype, k, table, zeros):
    x = make_x((m, k), dtype)
    with cpu_reference():
        w = make_weight(129, k, bits, 128 if k == 4096 else 64, table, zeros)
        y_cpu = run(x, w)
    y_cuda = lut_gemm(to_gpu(x), **_to_cuda(w))
    assert on_gpu(y_cuda)
    y_cuda = y_cuda.cpu()
    assert_matches(y_cuda, x, w.dense())
    assert_matches(y_cpu, x, w.dense())
    _, bound = error_and_bound(y_cpu, x, w.dense())
    assert float((y_cuda.double() - y_cpu.double()).abs().max()) <= 2 * tolerance(dtype, k) * bound


@pytest.mark.gpu
def test_cuda_batch_dims_and_stream():
    with cpu_reference():
        w = make_weight(33, 1000, 3, 32)
    x = to_gpu(make_x((2, 5, 1000)))
    args = _to_cuda(w)
    with gpu_stream():
        y = lut_gemm(x, **args)
    assert y.shape == (2, 5, 33)
    assert_matches(y.cpu(), x.cpu(), w.dense())


@pytest.mark.gpu
@pytest.mark.skipif(EMULATED, reason="a CPU tensor among CUDA ones: under emulation both are CPU tensors")
@pytest.mark.parametrize("on_cpu", ["packed", "scales", "zeros", "table"])
def test_cuda_device_mismatch(on_cpu):
    w = make_weight(7, 100, 3, 64)
    args = _to_cuda(w)
    args[on_cpu] = getattr(w, on_cpu)
    with pytest.raises(ValueError, match=f"{on_cpu} must be on the device of x"):
        lut_gemm(to_gpu(make_x((3, 100))), **args)


def test_info_reports_the_active_path(capsys):
    from lowbit.cli import main
    with forced_isa("scalar"):
        main(["info"])
    info = json.loads(capsys.readouterr().out)
    assert info["cpu_isa"] == "scalar" and "cpu_features" in info
