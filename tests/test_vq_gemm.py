"""VQ codebook GEMM and dequantization (lowbit.ops.vq_gemm) against a float64 reference built from the format's
definition (gather R codewords, sum, scale, matmul): every CPU strategy and code path, codebook sizes 2^8..2^16,
dtypes, batch shapes, unsigned int16 codes, numpy in/out, bad input, invalid indices, torch.compile, and CUDA
against CPU on both codebook paths (shared memory and read-only cache)."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.dlpack import to_dlpack

import lowbit
from lowbit import _C
from lowbit.ops import (VQ_CODEBOOKS, VQ_MAX_ENTRIES, VQ_MIN_ENTRIES, VQ_STRATEGIES, vq_dequantize, vq_gemm,
                        vq_gemm_cpu_strategy)

from fake_dlpack import FakeCudaTensor, _DType
from gpu_device import EMULATED, GPU, cpu_reference, on_gpu, to_gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # unit roundoff of the output
CPU_STRATEGIES = ("decode", "lut")


def make_weight(n, k, r, e, seed=0):
    """Random codes (int16 holding unsigned indices < e), fp16 codebooks [r, e, 8] and signed fp16 scales [n]."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, e, size=(n, k // 8, r), dtype=np.uint16)
    if codes.size:
        codes.flat[0] = e - 1  # always exercise the last entry (65535 is int16 -1)
    codebooks = rng.standard_normal((r, e, 8)).astype(np.float16)
    scales = (rng.uniform(0.25, 2.0, n) * rng.choice([-1.0, 1.0], n)).astype(np.float16)
    return torch.from_numpy(codes.view(np.int16)), torch.from_numpy(codebooks), torch.from_numpy(scales)


def make_x(shape, dtype=torch.float32, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def reference_weight(codes, codebooks, scales) -> np.ndarray:
    """W_hat [N, K] in float64 straight from the definition: codes read as uint16."""
    idx = codes.contiguous().numpy().view(np.uint16).astype(np.int64)
    cb = codebooks.double().numpy()
    w = sum(cb[r][idx[:, :, r]] for r in range(idx.shape[2]))  # [N, J, 8]
    return (w * scales.double().numpy()[:, None, None]).reshape(idx.shape[0], idx.shape[1] * 8)


def gemm_tolerance(x, w: np.ndarray, dtype) -> float:
    """Output rounding plus fp32 accumulation over K (a generous multiple of its sqrt(K) growth), relative to
    max(|x| @ |W|.T)."""
    x64 = x.double().reshape(-1, w.shape[1]).numpy()
    return (EPS[dtype] + 8 * np.sqrt(w.shape[1]) * 2.0**-24) * max((np.abs(x64) @ np.abs(w).T).max(), 1e-30)


def assert_gemm_close(y, x, w: np.ndarray):
    """y ~ x @ w.T (w float64 [N, K]) within gemm_tolerance."""
    assert y.shape == (*x.shape[:-1], w.shape[0])
    if y.numel() == 0:
        return
    ref = x.double().reshape(-1, w.shape[1]).numpy() @ w.T
    err = np.abs(y.double().numpy().reshape(ref.shape) - ref).max()
    tol = gemm_tolerance(x, w, y.dtype)
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"


# ---- correctness ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", VQ_CODEBOOKS)
@pytest.mark.parametrize("e", [256, 4096, 65536])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_is_exact(dtype, e, r):
    """W_hat is the fp32 sum of the codewords times the scale, rounded once to the output dtype."""
    codes, cb, s = make_weight(9, 40, r, e, seed=e + r)
    idx = codes.numpy().view(np.uint16).astype(np.int64)
    w32 = sum(cb[q].float()[torch.from_numpy(idx[:, :, q])] for q in range(r)) * s.float()[:, None, None]
    out = vq_dequantize(codes, cb, s, dtype)
    assert out.dtype == dtype and out.shape == (9, 40)
    assert torch.equal(out, w32.reshape(9, 40).to(dtype))
    np.testing.assert_allclose(out.double().numpy(), reference_weight(codes, cb, s), rtol=3 * EPS[dtype],
                               atol=2.0**-24)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_rounding_extremes(dtype):
    """fp16 / bf16 outputs round the fp32 result to nearest even, subnormals and overflow to inf included."""
    special = np.array([0.0, -0.0, 6e-8, -1.2e-7, 3e-5, 6.1e-5, 1.0, -0.1, 0.33, 1000.0, 65504.0, -65504.0],
                       dtype=np.float16)
    rng = np.random.default_rng(11)
    codes, _, _ = make_weight(16, 64, 2, 256)
    cb = torch.from_numpy(rng.choice(special, size=(2, 256, 8)))
    s = torch.tensor([2.0**-10, 2.0**-14, 1.0, 3.0] * 4, dtype=torch.float16)
    idx = codes.numpy().view(np.uint16).astype(np.int64)
    w32 = (cb[0].float()[torch.from_numpy(idx[:, :, 0])] + cb[1].float()[torch.from_numpy(idx[:, :, 1])])
    w32 = (w32 * s.float()[:, None, None]).reshape(16, 64)
    out = vq_dequantize(codes, cb, s, dtype)
    assert torch.isinf(out).any() == (dtype == torch.float16)
    assert torch.equal(out, w32.to(dtype))


@pytest.mark.parametrize("r", VQ_CODEBOOKS)
@pytest.mark.parametrize("k,n", [(8, 129), (24, 7), (576, 64), (576, 130), (1000, 1)])  # 130: 3 blocks of lut rows
@pytest.mark.parametrize("m", [1, 2, 3, 7, 16, 33, 128])
def test_shapes_all_strategies(m, k, n, r):
    codes, cb, s = make_weight(n, k, r, 256, seed=m * k + n)
    x = make_x((m, k), seed=m)
    w = reference_weight(codes, cb, s)
    w_deq = vq_dequantize(codes, cb, s).double().numpy()
    outs = {st: vq_gemm(x, codes, cb, s, strategy=st) for st in VQ_STRATEGIES}
    for y in outs.values():
        assert_gemm_close(y, x, w)
    assert_gemm_close(outs["auto"], x, w_deq)
    assert torch.equal(outs["auto"], outs[vq_gemm_cpu_strategy(m, n, k, r, 256)])


@pytest.mark.parametrize("r", VQ_CODEBOOKS)
@pytest.mark.parametrize("c", range(VQ_MIN_ENTRIES.bit_length() - 1, VQ_MAX_ENTRIES.bit_length()))
def test_codebook_sizes(c, r):
    """Every E = 2^c; E * R > 32768 takes the fp16-read decode path, M >= 64 the tiled one."""
    e = 1 << c
    codes, cb, s = make_weight(7, 24, r, e, seed=c)
    w = reference_weight(codes, cb, s)
    for strategy, m in [("decode", 1), ("decode", 2), ("decode", 7), ("decode", 64), ("lut", 1), ("lut", 5)]:
        x = make_x((m, 24), seed=m)
        assert_gemm_close(vq_gemm(x, codes, cb, s, strategy=strategy), x, w)


@pytest.mark.parametrize("m", [5, 70])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(dtype, m):
    codes, cb, s = make_weight(64, 576, 2, 512, seed=3)
    x = make_x((m, 576), dtype)
    w = reference_weight(codes, cb, s)
    for strategy in CPU_STRATEGIES:
        y = vq_gemm(x, codes, cb, s, strategy=strategy)
        assert y.dtype == dtype
        assert_gemm_close(y, x, w)


# Byte codes (uint8, E = 256): the CPU kernels widen them per block of rows, so every strategy and M gives
# exactly what the same indices as int16 give (and W_hat is the same).
@pytest.mark.parametrize("r", VQ_CODEBOOKS)
@pytest.mark.parametrize("k,n", [(8, 3), (576, 130), (1000, 33)])
@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("dtype", DTYPES)
def test_byte_codes(dtype, m, k, n, r):
    codes, cb, s = make_weight(n, k, r, 256, seed=m + n)
    codes8 = codes.to(torch.uint8)
    x = make_x((m, k), dtype)
    w = reference_weight(codes, cb, s)
    for strategy in VQ_STRATEGIES:
        y = vq_gemm(x, codes8, cb, s, strategy=strategy)
        assert torch.equal(y, vq_gemm(x, codes, cb, s, strategy=strategy))
        assert_gemm_close(y, x, w)
    assert torch.equal(vq_dequantize(codes8, cb, s, dtype), vq_dequantize(codes, cb, s, dtype))


@pytest.mark.parametrize("shape", [(2, 3, 48), (1, 1, 1, 48), (48,), (0, 48), (4, 0, 48)])
def test_leading_batch_dims(shape):
    codes, cb, s = make_weight(9, 48, 2, 256)
    x = make_x(shape)
    w = reference_weight(codes, cb, s)
    for strategy in VQ_STRATEGIES:
        y = vq_gemm(x, codes, cb, s, strategy=strategy)
        assert y.shape == (*shape[:-1], 9)
        assert_gemm_close(y, x, w)


def test_zero_rows_of_weight():
    codes, cb, s = make_weight(0, 32, 1, 256)
    assert vq_gemm(make_x((3, 32)), codes, cb, s).shape == (3, 0)
    assert vq_dequantize(codes, cb, s).shape == (0, 32)


def test_non_contiguous_inputs():
    codes, cb, s = make_weight(10, 64, 2, 256)
    x = make_x((64, 6)).t()
    codes_nc = codes.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    cb_nc = torch.stack([cb, torch.zeros_like(cb)], dim=-1)[..., 0]
    s_nc = torch.stack([s, -s], dim=1)[:, 0]
    assert not (x.is_contiguous() or codes_nc.is_contiguous() or cb_nc.is_contiguous() or s_nc.is_contiguous())
    for strategy in CPU_STRATEGIES:
        assert torch.equal(vq_gemm(x, codes_nc, cb_nc, s_nc, strategy=strategy),
                           vq_gemm(x.contiguous(), codes, cb, s, strategy=strategy))
    assert torch.equal(vq_dequantize(codes_nc, cb_nc, s_nc), vq_dequantize(codes, cb, s))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_in_numpy_out(dtype):
    codes, cb, s = make_weight(5, 40, 2, 256)
    x = make_x((3, 40)).numpy().astype(dtype)
    y = vq_gemm(x, codes.numpy(), cb.numpy(), s.numpy())
    assert isinstance(y, np.ndarray) and y.dtype == dtype
    assert_gemm_close(torch.from_numpy(y), torch.from_numpy(x), reference_weight(codes, cb, s))
    assert isinstance(vq_gemm(torch.from_numpy(x), codes.numpy(), cb.numpy(), s.numpy()), torch.Tensor)
    w = vq_dequantize(codes.numpy().view(np.uint16), cb, s, torch.float16)
    assert isinstance(w, np.ndarray) and w.dtype == np.float16
    np.testing.assert_array_equal(w, vq_dequantize(codes, cb, s, torch.float16).numpy())


def test_int16_codes_read_as_unsigned():
    """Codes >= 32768 are negative in int16; int16, torch.uint16 and numpy uint16 all index entry code % 65536."""
    codes, cb, s = make_weight(6, 32, 2, 65536, seed=7)
    codes[0, 0, 0], codes[1, 2, 1] = -32768, -1  # entries 32768 and 65535
    assert (codes < 0).sum() > 10
    x = make_x((3, 32))
    w = reference_weight(codes, cb, s)
    np.testing.assert_array_equal(vq_dequantize(codes, cb, s).numpy()[0, :8],
                                  ((cb[0, 32768].float() + cb[1, codes[0, 0, 1].item() & 0xFFFF].float())
                                   * s[0].float()).numpy())
    for strategy in VQ_STRATEGIES:
        y = vq_gemm(x, codes, cb, s, strategy=strategy)
        assert_gemm_close(y, x, w)
        assert torch.equal(vq_gemm(x, codes.view(torch.uint16), cb, s, strategy=strategy), y)
        assert torch.equal(torch.from_numpy(vq_gemm(x.numpy(), codes.numpy().view(np.uint16), cb, s,
                                                    strategy=strategy)), y)


def test_auto_strategy_choice():
    for args in [(1, 4096, 4096, 1, 256), (16, 4096, 4096, 2, 4096), (1, 64, 576, 1, 65536)]:
        assert vq_gemm_cpu_strategy(*args) in CPU_STRATEGIES
    for m in (64, 128, 1000):  # large M always decodes tiles
        assert vq_gemm_cpu_strategy(m, 4096, 4096, 1, 256) == "decode"
    assert vq_gemm_cpu_strategy(1, 4096, 8192, 2, 65536) == "decode"  # the tables would exceed 64 MiB
    codes, cb, s = make_weight(48, 256, 1, 256)
    for m in (1, 4, 70):
        x = make_x((m, 256))
        assert torch.equal(vq_gemm(x, codes, cb, s), vq_gemm(x, codes, cb, s, vq_gemm_cpu_strategy(m, 48, 256, 1, 256)))


def test_lut_builds_tables_in_chunks():
    """44 vectors * R = 2 * E = 32768 floats are 23 MB per row of x: 2 rows of tables fit in 64 MiB, M = 3 takes
    two chunks."""
    codes, cb, s = make_weight(5, 352, 2, 32768, seed=9)
    x = make_x((3, 352))
    y = vq_gemm(x, codes, cb, s, strategy="lut")
    assert_gemm_close(y, x, reference_weight(codes, cb, s))
    for m in range(3):
        assert torch.equal(vq_gemm(x[m:m + 1], codes, cb, s, strategy="lut"), y[m:m + 1])


def test_lut_refuses_tables_past_int32_and_auto_decodes():
    k = 8 * 32768  # K / 8 * R * E = 2^32 table entries
    codes, cb, s = make_weight(1, k, 2, 65536)
    x = make_x((1, k))
    with pytest.raises(ValueError, match=r"more than 2\^31 - 1; use the decode strategy"):
        vq_gemm(x, codes, cb, s, strategy="lut")
    assert vq_gemm_cpu_strategy(1, 1, k, 2, 65536) == "decode"
    assert_gemm_close(vq_gemm(x, codes, cb, s), x, reference_weight(codes, cb, s))


@given(m=st.integers(1, 80), j=st.integers(1, 40), n=st.integers(0, 40), r=st.sampled_from(VQ_CODEBOOKS),
       c=st.integers(8, 11), dtype=st.sampled_from(DTYPES), strategy=st.sampled_from(VQ_STRATEGIES),
       seed=st.integers(0, 2**31 - 1))
def test_property_random_configs(m, j, n, r, c, dtype, strategy, seed):
    codes, cb, s = make_weight(n, 8 * j, r, 1 << c, seed=seed)
    x = make_x((m, 8 * j), dtype, seed=seed)
    y = vq_gemm(x, codes, cb, s, strategy=strategy)
    assert_gemm_close(y, x, reference_weight(codes, cb, s))
    assert_gemm_close(y, x, vq_dequantize(codes, cb, s).double().numpy())


def test_torch_compile_fullgraph():
    codes, cb, s = make_weight(33, 96, 2, 1024)

    def f(x):
        return vq_gemm(torch.relu(x) + 0.5, codes, cb, s) * 2.0

    x = make_x((2, 3, 96))
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


# ---- invalid indices and bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy,m,e,r", [("decode", 2, 256, 1), ("decode", 2, 32768, 2), ("decode", 64, 256, 2),
                                            ("lut", 3, 256, 1), ("lut", 3, 512, 2)])
def test_invalid_index_raises_naming_first(strategy, m, e, r):
    """CPU: an index >= E raises ValueError naming the first bad (n, j, r), on every code path."""
    codes, cb, s = make_weight(8, 48, r, e)
    codes[5, 0, 0] = e if e < 32768 else -1
    codes[1, 2, r - 1] = -1  # 65535, read unsigned; first in [N, J, R] order
    msg = rf"codes\[1, 2, {r - 1}\] = 65535 is out of range for codebooks with {e} entries"
    with pytest.raises(ValueError, match="vq_gemm: " + msg):
        vq_gemm(make_x((m, 48)), codes, cb, s, strategy=strategy)
    with pytest.raises(ValueError, match="vq_dequantize: " + msg):
        vq_dequantize(codes, cb, s)
    codes[1, 2, r - 1] = e - 1
    with pytest.raises(ValueError, match=rf"codes\[5, 0, 0\] = {e if e < 32768 else 65535} is out of range"):
        vq_gemm(make_x((m, 48)), codes, cb, s, strategy=strategy)


def _format_errors():
    """(overrides of codes / codebooks / scales, exception, message) for a [3, 16] weight with R = 1, E = 256."""
    codes, cb, s = make_weight(3, 16, 1, 256)
    return [
        ({"codes": codes.int()}, TypeError, "codes must have dtype int16, uint16 or uint8, got torch.int32"),
        ({"codes": codes.numpy().astype(np.int8)}, TypeError, "codes must have dtype int16, uint16 or uint8"),
        ({"codes": codes[:, :, 0]}, ValueError,
         r"codes must have shape \[N, K / 8, R\] with R in \(1, 2\), got \[3, 2\]"),
        ({"codes": codes.repeat(1, 1, 3)}, ValueError, r"codes must have shape .* got \[3, 2, 3\]"),
        ({"codes": [[[0]]]}, TypeError, "codes must be a torch.Tensor or numpy.ndarray, got list"),
        ({"codes": codes.repeat(1, 1, 2)}, ValueError, r"codebooks must have shape \[R, E, 8\] = \[2, E, 8\]"),
        ({"codebooks": cb.float()}, TypeError, "codebooks must have dtype float16, got torch.float32"),
        ({"codebooks": cb[:, :, :4]}, ValueError,
         r"codebooks must have shape \[R, E, 8\] = \[1, E, 8\].*\[1, 256, 4\]"),
        ({"codebooks": cb[0]}, ValueError, r"codebooks must have shape .* got \[256, 8\]"),
        ({"codebooks": cb.repeat(2, 1, 1)}, ValueError, r"codebooks must have shape .* got \[2, 256, 8\]"),
        ({"codebooks": cb[:, :200]}, ValueError, "codebooks must have E = 2.c entries.*got E = 200"),
        ({"codebooks": cb[:, :128]}, ValueError, "got E = 128"),
        ({"codebooks": cb.repeat(1, 512, 1)}, ValueError, "got E = 131072"),
        ({"codebooks": cb.to("meta")}, ValueError, r"codebooks must be on the device of codes \(cpu\), got meta"),
        ({"scales": s.repeat(2)[:4]}, ValueError, r"scales must have shape \[3\] \(N from codes\), got \[4\]"),
        ({"scales": s[:, None]}, ValueError, r"scales must have shape \[3\].*got \[3, 1\]"),
        ({"scales": s.float()}, TypeError, "scales must have dtype float16, got torch.float32"),
        ({"scales": s.to("meta")}, ValueError, "scales must be on the device of codes"),
    ], (codes, cb, s)


FORMAT_ERRORS, FORMAT = _format_errors()


@pytest.mark.parametrize("override,exc,match", FORMAT_ERRORS)
def test_bad_format_raises(override, exc, match):
    args = {**dict(zip(("codes", "codebooks", "scales"), FORMAT)), **override}
    with pytest.raises(exc, match=match):
        vq_gemm(make_x((2, 16)), **args)
    with pytest.raises(exc, match=match):
        vq_dequantize(**args)


@pytest.mark.parametrize("x,strategy,exc,match", [
    (make_x((2, 12)), "auto", ValueError, r"x must have K \(its last dimension\) a positive multiple of 8, got K = 12"),
    (make_x((2, 0)), "decode", ValueError, "positive multiple of 8, got K = 0"),
    (make_x((2, 24)), "auto", ValueError, r"codes must have shape \[N, K / 8, R\] = \[N, 3, R\] for x with K = 24"),
    (torch.ones(2, 16, dtype=torch.int32), "auto", TypeError,
     "x must have dtype float32, float16 or bfloat16, got torch.int32"),
    (make_x((2, 16)).double(), "lut", TypeError, "x must have dtype .* got torch.float64"),
    (torch.tensor(1.0), "auto", ValueError, "x must have at least one dimension"),
    ([[0.0] * 16], "auto", TypeError, "x must be a torch.Tensor or numpy.ndarray, got list"),
    (make_x((2, 16)), "fast", ValueError, r"strategy must be one of \('auto', 'decode', 'lut'\), got 'fast'"),
    (make_x((2, 16)), "LUT", ValueError, "strategy must be one of"),
    (make_x((2, 16)).to("meta"), "auto", ValueError, r"codes must be on the device of x \(meta\), got cpu"),
])
def test_bad_gemm_input_raises(x, strategy, exc, match):
    with pytest.raises(exc, match=match):
        vq_gemm(x, *FORMAT, strategy=strategy)


def test_dequantize_bad_dtype():
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16, got torch.float64"):
        vq_dequantize(*FORMAT, dtype=torch.float64)


def test_native_boundary_checks():
    """The bindings refuse bad views themselves, whatever the Python layer lets through."""
    codes, cb, s = FORMAT
    x, out = make_x((2, 16)), torch.empty(2, 3)

    def gemm(x=x, codes=codes, cb=cb, s=s, out=out, strategy="auto"):
        _C.vq_gemm(to_dlpack(x), to_dlpack(codes), to_dlpack(cb), to_dlpack(s), to_dlpack(out), strategy, 0)

    gemm()
    torch.testing.assert_close(out, vq_gemm(x, codes, cb, s), rtol=0, atol=0)
    with pytest.raises(ValueError, match="vq_gemm: strategy must be 'auto', 'decode' or 'lut', got 'fast'"):
        gemm(strategy="fast")
    with pytest.raises(ValueError, match="vq_gemm: x must have K .* got K = 12"):
        gemm(x=make_x((2, 12)))
    with pytest.raises(ValueError, match="vq_gemm: x must have 2 dimensions"):
        gemm(x=make_x((1, 2, 16)))
    with pytest.raises(ValueError, match="vq_gemm: codes must be contiguous"):
        gemm(codes=codes.permute(1, 0, 2).contiguous().permute(1, 0, 2))
    with pytest.raises(ValueError, match=r"R \(residual codebooks\) 1 or 2, got R = 3"):
        gemm(codes=codes.repeat(1, 1, 3))
    with pytest.raises(ValueError, match="vq_gemm: codebooks must have E = 2.c entries .* got E = 384"):
        gemm(cb=cb.repeat(1, 2, 1)[:, :384].contiguous())
    with pytest.raises(ValueError, match=r"vq_gemm: out must have shape \[2, 3\], got \[3, 2\]"):
        gemm(out=torch.empty(3, 2))
    with pytest.raises(TypeError, match="vq_gemm: out must have the dtype of x"):
        gemm(out=torch.empty(2, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match="vq_gemm: codes must have dtype"):
        gemm(codes=codes.int())
    with pytest.raises(ValueError, match=r"vq_dequantize: out must have shape \[3, 16\]"):
        _C.vq_dequantize(to_dlpack(codes), to_dlpack(cb), to_dlpack(s), to_dlpack(torch.empty(3, 8)), 0)
    with pytest.raises(TypeError, match="vq_dequantize: out must have dtype"):
        _C.vq_dequantize(to_dlpack(codes), to_dlpack(cb), to_dlpack(s),
                         to_dlpack(torch.empty(3, 16, dtype=torch.int32)), 0)


def _fake_cuda(shape, code, bits):
    """A capsule marked CUDA device 0 with DLPack dtype (code, bits): 0 int, 2 float."""
    fake = FakeCudaTensor(shape)
    fake.managed.dl_tensor.dtype = _DType(code, bits, 1)
    return fake


def test_cuda_tensors_without_gpu_raise_runtime_error():
    if lowbit.cuda_available():
        pytest.skip("a GPU is present")
    x, out = _fake_cuda([2, 16], 2, 32), _fake_cuda([2, 3], 2, 32)
    codes, cb, s = _fake_cuda([3, 2, 1], 0, 16), _fake_cuda([1, 256, 8], 2, 16), _fake_cuda([3], 2, 16)
    with pytest.raises(RuntimeError, match="vq_gemm: got CUDA tensors"):
        _C.vq_gemm(x.capsule, codes.capsule, cb.capsule, s.capsule, out.capsule, "auto", 0)
    w = _fake_cuda([3, 16], 2, 32)
    with pytest.raises(RuntimeError, match="vq_dequantize: got CUDA tensors"):
        _C.vq_dequantize(codes.capsule, cb.capsule, s.capsule, w.capsule, 0)


# ---- CUDA ----------------------------------------------------------------------------------------------------

# (R, E): codebook bytes R * E * 16 against the kernel's 96 KiB of shared memory. The largest shared-memory
# configurations (64 KiB: R = 1, E = 4096 and R = 2, E = 2048) and the smallest read-only-cache ones (128 KiB).
CUDA_CODEBOOKS = [(1, 256), (1, 4096), (2, 2048), (1, 8192), (2, 4096), (2, 65536)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 4, 5, 33])
@pytest.mark.parametrize("r,e", CUDA_CODEBOOKS)
def test_cuda_matches_cpu(r, e, m, dtype):
    """N = 4099 rows outnumber one pass of the shared-memory grid; K = 264 gives lane 0 two vectors."""
    n, k = 4099, 264
    codes, cb, s = make_weight(n, k, r, e, seed=e + m)
    x = make_x((m, k), dtype)
    w = reference_weight(codes, cb, s)
    gpu = vq_gemm(to_gpu(x), to_gpu(codes), to_gpu(cb), to_gpu(s))
    assert on_gpu(gpu) and gpu.dtype == dtype
    assert_gemm_close(gpu.cpu(), x, w)
    with cpu_reference():
        cpu = vq_gemm(x, codes, cb, s, strategy="decode")
    assert (gpu.cpu().double() - cpu.double()).abs().max() <= 2 * gemm_tolerance(x, w, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("r", VQ_CODEBOOKS)
def test_cuda_byte_codes_match_cpu(r, m, dtype):
    """uint8 codes (E = 256) on CUDA: the kernels templated on the code type; M = 64 takes the dense path."""
    codes, cb, s = make_weight(300, 264, r, 256, seed=m)
    codes8 = codes.to(torch.uint8)
    x = make_x((m, 264), dtype)
    gpu = vq_gemm(to_gpu(x), to_gpu(codes8), to_gpu(cb), to_gpu(s))
    assert torch.equal(gpu, vq_gemm(to_gpu(x), to_gpu(codes), to_gpu(cb), to_gpu(s)))
    assert_gemm_close(gpu.cpu(), x, reference_weight(codes, cb, s))
    with cpu_reference():
        cpu = vq_dequantize(codes8, cb, s, dtype)
    assert torch.equal(vq_dequantize(to_gpu(codes8), to_gpu(cb), to_gpu(s), dtype).cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r,e", [(1, 256), (2, 65536)])
def test_cuda_dequantize_matches_cpu(r, e, dtype):
    codes, cb, s = make_weight(130, 1000, r, e, seed=5)
    gpu = vq_dequantize(to_gpu(codes), to_gpu(cb), to_gpu(s), dtype)
    assert on_gpu(gpu)
    with cpu_reference():
        cpu = vq_dequantize(codes, cb, s, dtype)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("r,e", [(1, 256), (2, 4096)])
def test_cuda_masks_invalid_indices(r, e):
    """CUDA reads index & (E - 1) for an index >= E, without an error (the CPU raises instead)."""
    codes, cb, s = make_weight(40, 64, r, e, seed=2)
    rng = np.random.default_rng(3)
    bad = codes.numpy().view(np.uint16).copy()
    bad |= (rng.integers(0, 65536 // e, size=bad.shape) * e).astype(np.uint16)
    assert (bad >= e).sum() > 10
    bad = torch.from_numpy(bad.view(np.int16))
    x = make_x((3, 64))
    got = vq_gemm(to_gpu(x), to_gpu(bad), to_gpu(cb), to_gpu(s)).cpu()
    assert torch.equal(got, vq_gemm(to_gpu(x), to_gpu(codes), to_gpu(cb), to_gpu(s)).cpu())
    with cpu_reference():
        cpu = vq_dequantize(codes, cb, s)
    assert torch.equal(vq_dequantize(to_gpu(bad), to_gpu(cb), to_gpu(s)).cpu(), cpu)


@pytest.mark.gpu
def test_cuda_layouts_and_edge_cases():
    """Batch dims, non-contiguous x, uint16 codes, codebooks not 16-byte aligned, empty M / N."""
    codes, cb, s = make_weight(70, 96, 2, 1024, seed=4)
    codes_d, cb_d, s_d = to_gpu(codes), to_gpu(cb), to_gpu(s)
    x = make_x((2, 3, 96))
    w = reference_weight(codes, cb, s)
    y = vq_gemm(to_gpu(x), codes_d, cb_d, s_d)
    assert y.shape == (2, 3, 70)
    assert_gemm_close(y.cpu(), x, w)
    xt = to_gpu(make_x((96, 5))).t()
    assert torch.equal(vq_gemm(xt, codes_d, cb_d, s_d), vq_gemm(xt.contiguous(), codes_d, cb_d, s_d))
    assert torch.equal(vq_gemm(to_gpu(x), codes_d.view(torch.uint16), cb_d, s_d), y)
    flat = torch.empty(cb.numel() + 4, dtype=torch.float16, device=GPU)
    cb_off = flat[4:].view(cb.shape)  # 8 bytes past an aligned allocation
    cb_off.copy_(cb_d)
    assert cb_off.data_ptr() % 16
    assert torch.equal(vq_gemm(to_gpu(x), codes_d, cb_off, s_d), y)
    assert torch.equal(vq_dequantize(codes_d, cb_off, s_d), vq_dequantize(codes_d, cb_d, s_d))
    assert vq_gemm(torch.empty(0, 96, device=GPU), codes_d, cb_d, s_d).shape == (0, 70)
    assert vq_gemm(to_gpu(x), codes_d[:0], cb_d, s_d[:0]).shape == (2, 3, 0)
    assert vq_dequantize(codes_d[:0], cb_d, s_d[:0]).shape == (0, 96)


@pytest.mark.gpu
@pytest.mark.skipif(EMULATED, reason="a CPU tensor among CUDA ones: under emulation both are CPU tensors")
def test_cuda_device_mismatch():
    """Split from test_cuda_layouts_and_edge_cases: weight tensors on the CPU next to CUDA ones."""
    codes, cb, s = make_weight(70, 96, 2, 1024, seed=4)
    codes_d, cb_d, s_d = to_gpu(codes), to_gpu(cb), to_gpu(s)
    x = make_x((2, 3, 96))
    with pytest.raises(ValueError, match=r"codes must be on the device of x \(cuda:0\), got cpu"):
        vq_gemm(to_gpu(x), codes, cb_d, s_d)
    with pytest.raises(ValueError, match="codebooks must be on the device of codes"):
        vq_gemm(to_gpu(x), codes_d, cb, s_d)
