"""The asynchronous-dequantization 2/4-bit GEMM: the aligned layout against a numpy bit-level reference, the int8
activation quantization against its formula, and the GEMM against float64 references (tight: the integer
formula over the rounded activations; loose, bounded: x @ W_hat.T), on many shapes, dtypes and group sizes;
table mode (the lut format, the table rounded to int8) likewise; each on every CPU path this machine runs
(portable, AVX2, AVX-512 VNNI, AMX tiles); bad input; torch.compile; CUDA against CPU (gpu)."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowbit
from fake_dlpack import FakeCudaTensor
from gpu_device import assert_matches_cpu, cpu_reference, to_gpu
from isa_paths import SUPPORTED_ISAS, forced_isa
from lowbit.ops import (aligned_from_codes, aligned_words_per_row, async_dequant_gemm, dequantize_lut,
                        dequantize_uniform, nf_table, pack_uniform, prepare_async_dequant, prepare_lut_table,
                        quantize_activations)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference_aligned(codes: np.ndarray, bits: int) -> np.ndarray:
    """Byte j of chunk t holds at bits [bits c, bits (c+1)) the code of k = (256 / bits) t + 32 c + j; returned
    as int32 words."""
    n, k = codes.shape
    chunk = 256 // bits
    chunks = -(-k // chunk)
    out = np.zeros((n, chunks * 32), dtype=np.uint8)
    for col in range(k):
        byte = (col // chunk) * 32 + col % 32
        out[:, byte] |= (codes[:, col].astype(np.uint8) << (bits * ((col // 32) % (8 // bits)))).astype(np.uint8)
    return out.view(np.int32)


def reference_activations(x: torch.Tensor, group_size: int):
    """(xq [M, K] int, d [M, groups]) by the formula of async_dequant.h, in float32 like the kernels."""
    xf = x.float().numpy()
    m, k = xf.shape
    groups = -(-k // group_size)
    xq = np.zeros((m, k), dtype=np.int64)
    d = np.zeros((m, groups), dtype=np.float32)
    for g in range(groups):
        cols = slice(g * group_size, min(k, (g + 1) * group_size))
        amax = np.abs(xf[:, cols]).max(axis=1)
        with np.errstate(divide="ignore"):
            mul = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        d[:, g] = amax / np.float32(127)
        xq[:, cols] = np.clip(np.rint(xf[:, cols] * mul[:, None]), -127, 127)
    return xq, d


def random_weight(n: int, k: int, group_size: int, gen: torch.Generator, bits: int = 2):
    groups = -(-k // group_size)
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.001).half()
    zeros = (torch.rand(n, groups, generator=gen) * (2**bits - 1)).half()
    return codes, scales, zeros


def reference_table(table: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    """(tq int [2^bits], table_scale) by the formula of async_dequant.h, in float32."""
    t = table.astype(np.float32)
    amax = np.abs(t).max()
    ts = np.float32(amax / np.float32(127)) if amax > 0 else np.float32(1)
    return np.clip(np.rint(t / ts), -127, 127).astype(np.int64), float(ts)


def exact_reference(xq: np.ndarray, d: np.ndarray, codes, scales, zeros, group_size: int,
                    table: np.ndarray = None, bits: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(y, bound): y[m, n] = sum_g s * d * (ts * tq[q] . xq - z * sum xq) in float64 (no table: tq[q] = q,
    ts = 1; zeros None: z = 0), and the sum over g of |each group's term|, the size fp32 accumulation errs by."""
    q = codes.numpy().astype(np.int64)
    ts = 1.0
    if table is not None:
        tq, ts = reference_table(table, bits)
        q = tq[q]
    q = q.astype(np.float64) * ts
    s = scales.double().numpy()
    z = zeros.double().numpy() if zeros is not None else np.zeros_like(s)
    m, k = xq.shape
    y = np.zeros((m, q.shape[0]))
    bound = np.zeros_like(y)
    for g in range(d.shape[1]):
        cols = slice(g * group_size, min(k, (g + 1) * group_size))
        dot = xq[:, cols].astype(np.float64) @ q[:, cols].T
        xs = xq[:, cols].sum(axis=1).astype(np.float64)
        sd = d[:, g:g + 1].astype(np.float64) * s[:, g]
        y += sd * (dot - xs[:, None] * z[:, g])
        bound += np.abs(sd * dot) + np.abs(sd * xs[:, None] * z[:, g])
    return y, bound


def run_case(m, k, n, group_size, dtype, seed=0, bits=2):
    gen = torch.Generator().manual_seed(seed)
    codes, scales, zeros = random_weight(n, k, group_size, gen, bits)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = async_dequant_gemm(x, aligned_from_codes(codes, bits), scales, zeros, group_size, bits=bits)
    return x, codes, scales, zeros, y


def assert_close_to_exact(x, codes, scales, zeros, y, group_size, table=None, bits=2):
    xq, d = reference_activations(x, group_size)
    ref, bound = exact_reference(xq, d, codes, scales, zeros, group_size, table, bits)
    unit = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[y.dtype]
    err = np.abs(y.double().numpy() - ref)
    # the output's rounding (relative to the largest output) plus fp32 accumulation (relative to the terms)
    allowed = 4 * unit * (np.abs(ref).max() + 1e-30) + 1e-5 * bound + 1e-30
    assert (err <= allowed).all(), f"max error {err.max():.3g}, worst ratio to allowed {(err / allowed).max():.3g}"


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("k", [1, 31, 32, 64, 100, 128, 129, 576, 1000])
def test_aligned_layout_matches_reference(k, bits):
    gen = torch.Generator().manual_seed(k)
    codes = torch.randint(0, 2**bits, (5, k), dtype=torch.uint8, generator=gen)
    aligned = aligned_from_codes(codes, bits)
    assert aligned.dtype == torch.int32 and aligned.shape == (5, aligned_words_per_row(k, bits))
    np.testing.assert_array_equal(aligned.numpy(), reference_aligned(codes.numpy(), bits))
    np.testing.assert_array_equal(prepare_async_dequant(pack_uniform(codes, bits), k, bits).numpy(), aligned.numpy())


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 45, 128, 576, 1000])
def test_activation_quantization_matches_formula(k, dtype, group_size, isa):
    x = (torch.randn(3, k, generator=torch.Generator().manual_seed(k)) * 4).to(dtype)
    x[1, : min(k, group_size)] = 0  # an all-zero group: d = 0, codes 0
    xq, d = quantize_activations(x, group_size)
    ref_q, ref_d = reference_activations(x, group_size)
    assert xq.shape == (3, -(-k // 128) * 128) and xq.dtype == torch.int8
    np.testing.assert_array_equal(xq[:, :k].numpy(), ref_q)
    assert not xq[:, k:].any(), "padding past K must be zero"
    np.testing.assert_array_equal(d.numpy(), ref_d)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 16, 33, 64, 65, 128])
def test_rows_of_x(m, bits, isa):
    assert_close_to_exact(*run_case(m, 576, 37, 64, torch.float32, seed=m, bits=bits), 64)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("k,n", [(32, 1), (100, 5), (576, 64), (1000, 17), (1536, 20), (4096, 3)])
def test_shapes_and_groups(k, n, group_size, bits, isa):
    assert_close_to_exact(*run_case(3, k, n, group_size, torch.float32, seed=k + n, bits=bits), group_size)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 6, 70])
def test_dtypes(m, dtype, bits, isa):
    x, codes, scales, zeros, y = run_case(m, 640, 33, 128, dtype, seed=m, bits=bits)
    assert y.dtype == dtype
    assert_close_to_exact(x, codes, scales, zeros, y, 128)


@pytest.mark.parametrize("group_size", [32, 128])
def test_error_against_unrounded_activations_is_bounded(group_size):
    """|y - x @ W_hat.T| <= sum_k |W_hat[n, k]| * d[m, g(k)] / 2 (+ fp32 rounding)."""
    m, k, n = 4, 1000, 50
    x, codes, scales, zeros, y = run_case(m, k, n, group_size, torch.float32, seed=3)
    w = dequantize_uniform(pack_uniform(codes, 2), scales, zeros, 2, group_size, k).double()
    exact = x.double() @ w.T
    _, d = reference_activations(x, group_size)
    d_cols = np.repeat(d, group_size, axis=1)[:, :k]
    bound = (d_cols / 2) @ w.abs().numpy().T
    err = np.abs(y.double().numpy() - exact.numpy())
    assert (err <= bound * 1.001 + 1e-5 * np.abs(exact.numpy()).max()).all()
    rel = np.linalg.norm(y.double().numpy() - exact.numpy()) / np.linalg.norm(exact.numpy())
    assert rel < 2e-2, f"relative error {rel:.3g} of int8 activations is too large"


@given(m=st.integers(1, 9), k=st.integers(1, 700), n=st.integers(1, 40), group_size=st.sampled_from([32, 64, 128]),
       dtype=st.sampled_from(DTYPES), bits=st.sampled_from([2, 4]), seed=st.integers(0, 2**16),
       isa=st.sampled_from(SUPPORTED_ISAS))
def test_random_configurations(m, k, n, group_size, dtype, bits, seed, isa):
    with forced_isa(isa):
        assert_close_to_exact(*run_case(m, k, n, group_size, dtype, seed=seed, bits=bits), group_size)


def run_table_case(m, k, n, group_size, dtype, bits, seed=0, with_zeros=False):
    gen = torch.Generator().manual_seed(seed)
    codes, scales, zeros = random_weight(n, k, group_size, gen, bits)
    zeros = (zeros - 2**(bits - 1)) * 0.1 if with_zeros else None
    table = nf_table(bits) if seed % 2 else torch.randn(2**bits, generator=gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = async_dequant_gemm(x, aligned_from_codes(codes, bits), scales, zeros, group_size, bits=bits, table=table)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close_to_exact(x, codes, scales, zeros, y, group_size, table.numpy(), bits)
    return x, codes, scales, zeros, table, y


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m,k,n", [(1, 576, 64), (2, 100, 5), (3, 1000, 17), (5, 32, 1), (7, 1536, 20),
                                   (16, 4096, 3), (33, 129, 9), (70, 640, 33)])
def test_table_mode_matches_exact_reference(m, k, n, group_size, bits, isa):
    run_table_case(m, k, n, group_size, torch.float32, bits, seed=m + k + n, with_zeros=bool(m % 2))


@given(m=st.integers(1, 9), k=st.integers(1, 700), n=st.integers(1, 40), group_size=st.sampled_from([32, 64, 128]),
       dtype=st.sampled_from(DTYPES), bits=st.sampled_from([2, 4]), seed=st.integers(0, 2**16),
       with_zeros=st.booleans(), isa=st.sampled_from(SUPPORTED_ISAS))
def test_table_mode_random_configurations(m, k, n, group_size, dtype, bits, seed, with_zeros, isa):
    with forced_isa(isa):
        run_table_case(m, k, n, group_size, dtype, bits, seed, with_zeros)


@pytest.mark.parametrize("bits", [2, 4])
def test_table_mode_is_close_to_the_fp32_lut(bits):
    """Against x @ W_hat.T of the fp32 table: int8 activations + the int8 table, ~1% relative error."""
    x, codes, scales, _, table, y = run_table_case(4, 1000, 50, 64, torch.float32, bits, seed=1)
    w = dequantize_lut(pack_uniform(codes, bits), scales, table, bits, 64, 1000).double()
    exact = x.double() @ w.T
    rel = float(torch.linalg.norm(y.double() - exact) / torch.linalg.norm(exact))
    assert 1e-4 < rel < 2e-2, rel


@pytest.mark.parametrize("bits", [2, 4])
def test_prepare_lut_table(bits):
    table = torch.linspace(-1.5, 0.75, 2**bits)
    tq, ts = prepare_lut_table(table, bits)
    assert tq.dtype == torch.int8 and tq.shape == (16,) and ts.dtype == torch.float32 and ts.shape == (1,)
    ref_q, ref_s = reference_table(table.numpy(), bits)
    np.testing.assert_array_equal(tq.numpy(), np.tile(ref_q, 16 // 2**bits))
    assert float(ts) == ref_s and int(tq.abs().max()) == 127
    zq, zs = prepare_lut_table(torch.zeros(2**bits), bits)
    assert not zq.any() and float(zs) == 1.0
    with pytest.raises(ValueError, match=rf"table must be a float tensor of shape \[{2**bits}\]"):
        prepare_lut_table(torch.zeros(2**bits + 1), bits)
    with pytest.raises(ValueError, match="table must be a float tensor"):
        prepare_lut_table(torch.zeros(2**bits, dtype=torch.int32), bits)
    with pytest.raises(ValueError, match="table must be finite"):
        prepare_lut_table(torch.full((2**bits,), float("nan")), bits)


@pytest.mark.parametrize("bits", [2, 4])
def test_prepared_table_gives_the_same_output(bits):
    gen = torch.Generator().manual_seed(bits)
    codes, scales, zeros = random_weight(9, 300, 64, gen, bits)
    packed, table, x = aligned_from_codes(codes, bits), torch.randn(2**bits, generator=gen), torch.randn(3, 300)
    ref = async_dequant_gemm(x, packed, scales, zeros, 64, bits=bits, table=table)
    y = async_dequant_gemm(x, packed, scales, zeros, 64, bits=bits, table=prepare_lut_table(table, bits))
    assert torch.equal(y, ref)
    tq, ts = prepare_lut_table(table, bits)
    for bad, match in [((tq,), "got a tuple of 1"), ((tq.int(), ts), r"table_q must be int8 of shape \[16\]"),
                       ((tq[:8], ts), r"table_q must be int8 of shape \[16\]"),
                       ((tq, ts.double()), r"table_scale must be float32 of shape \[1\]")]:
        with pytest.raises(ValueError, match=match):
            async_dequant_gemm(x, packed, scales, zeros, 64, bits=bits, table=bad)


def test_table_mode_runs_all_table_entries():
    """Every code of a 4-bit row hits its own table entry (bytes 8..15 of the table come from the high half)."""
    k = 128
    codes = torch.arange(16, dtype=torch.uint8).view(16, 1).repeat(1, k)  # row n: code n, y[n] = ts tq[n] k
    table = torch.arange(16, dtype=torch.float32) - 7.5
    x = torch.ones(1, k)
    y = async_dequant_gemm(x, aligned_from_codes(codes, 4), torch.ones(16, 1).half(), None, 128, bits=4, table=table)
    tq, ts = reference_table(table.numpy(), 4)
    np.testing.assert_allclose(y[0].numpy(), tq * ts * k, rtol=1e-6)


def test_batch_dims_and_numpy():
    gen = torch.Generator().manual_seed(1)
    codes, scales, zeros = random_weight(9, 300, 64, gen)
    packed = aligned_from_codes(codes)
    x = torch.randn(2, 3, 300, generator=gen)
    y = async_dequant_gemm(x, packed, scales, zeros, 64)
    assert y.shape == (2, 3, 9)
    torch.testing.assert_close(y.reshape(6, 9), async_dequant_gemm(x.reshape(6, 300), packed, scales, zeros, 64))
    y_np = async_dequant_gemm(x.numpy(), packed, scales, zeros, 64)
    assert isinstance(y_np, np.ndarray)
    np.testing.assert_array_equal(y_np, y.numpy())


def test_empty_rows_and_outputs():
    gen = torch.Generator().manual_seed(2)
    codes, scales, zeros = random_weight(4, 64, 32, gen)
    assert async_dequant_gemm(torch.zeros(0, 64), aligned_from_codes(codes), scales, zeros, 32).shape == (0, 4)
    empty = aligned_from_codes(torch.zeros(0, 64, dtype=torch.uint8))
    y = async_dequant_gemm(torch.randn(3, 64), empty, scales[:0], zeros[:0], 32)
    assert y.shape == (3, 0)


@pytest.mark.parametrize("m", [1, 3, 6, 16, 40])
def test_cpu_paths_agree(m):
    """Every CPU path computes the same integers (portable, AVX2, AVX-512 VNNI, AMX tiles from 16 rows of x on), 2
    and 4 bits, table mode with and without zeros, odd K (a half-filled last 64-byte load), activations quantized
    by each path too."""
    g = torch.Generator().manual_seed(5)
    k = 700
    c2 = torch.randint(0, 4, (21, k), dtype=torch.uint8, generator=g)
    c4 = torch.randint(0, 16, (21, k), dtype=torch.uint8, generator=g)
    s = (torch.rand(21, 11, generator=g) * 0.02).half()
    z = (torch.rand(21, 11, generator=g) * 3).half()
    x = torch.randn(m, k, generator=g)
    t2, t4 = torch.randn(4, generator=g), torch.randn(16, generator=g)
    outs = []
    for isa in SUPPORTED_ISAS:
        with forced_isa(isa):
            y = torch.cat([async_dequant_gemm(x, aligned_from_codes(c2), s, z, 64),
                           async_dequant_gemm(x, aligned_from_codes(c4, 4), s, z, 64, bits=4),
                           async_dequant_gemm(x, aligned_from_codes(c2), s, None, 64, table=t2),
                           async_dequant_gemm(x, aligned_from_codes(c4, 4), s, z, 64, bits=4, table=t4)])
            outs.append((y, *quantize_activations(x, 64)))
    for isa, (y, xq, d) in zip(SUPPORTED_ISAS[1:], outs[1:]):
        torch.testing.assert_close(y, outs[0][0], rtol=1e-5, atol=1e-6, msg=lambda e: f"{isa}: {e}")
        assert torch.equal(xq, outs[0][1]) and torch.equal(d, outs[0][2]), isa


@pytest.mark.skipif("amx" not in SUPPORTED_ISAS, reason="needs AMX-INT8 (Sapphire Rapids or later)")
@pytest.mark.parametrize("with_zeros", [True, False])
@pytest.mark.parametrize("table", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m,k,n", [(16, 1, 1), (17, 31, 33), (33, 129, 70), (48, 576, 31), (100, 1000, 5),
                                   (64, 256, 64)])
def test_amx_tiles_match_exact_reference(m, k, n, group_size, bits, table, with_zeros):
    """The AMX path (rows of x >= 16): short last groups, N and M not multiples of the 32 x 32 tile block, one
    or two x tiles in the last block, against the integer formula and against the AVX-512 row kernels."""
    gen = torch.Generator().manual_seed(m * k + n)
    codes, scales, zeros = random_weight(n, k, group_size, gen, bits)
    zeros = zeros if with_zeros else None
    tab = torch.randn(2**bits, generator=gen) if table else None
    x = torch.randn(m, k, generator=gen)
    packed = aligned_from_codes(codes, bits)
    outs = {}
    for isa in ("avx512", "amx"):
        with forced_isa(isa):
            outs[isa] = async_dequant_gemm(x, packed, scales, zeros, group_size, bits=bits, table=tab)
    assert_close_to_exact(x, codes, scales, zeros, outs["amx"], group_size, tab.numpy() if table else None, bits)
    torch.testing.assert_close(outs["amx"], outs["avx512"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad,match,exc", [
    (dict(group_size=48), "group_size must be one of", ValueError),
    (dict(bits=3), "bits must be one of", ValueError),
    (dict(x=torch.zeros(2, 64, dtype=torch.int32)), "x must have dtype", TypeError),
    (dict(packed=torch.zeros(3, 16, dtype=torch.int32)), r"packed must be int32 \[N, 8\]", ValueError),
    (dict(packed=torch.zeros(3, 8, dtype=torch.int64)), "packed must be int32", ValueError),
    (dict(scales=torch.zeros(3, 2)), "scales must have dtype float16", TypeError),
    (dict(zeros=torch.zeros(3, 3).half()), r"zeros must have shape \[3, 2\]", ValueError),
    (dict(x=torch.zeros(2, 0)), "K >= 1", ValueError),
    (dict(table=torch.zeros(16)), r"table must be a float tensor of shape \[4\]", ValueError),
    (dict(table=torch.zeros(4, dtype=torch.int64)), "table must be a float tensor", ValueError),
    (dict(table=[0.0, 1.0, 2.0, 3.0]), "table must be a torch.Tensor", TypeError),
])
def test_bad_input(bad, match, exc):
    args = dict(x=torch.randn(2, 64), packed=aligned_from_codes(torch.zeros(3, 64, dtype=torch.uint8)),
                scales=torch.ones(3, 2).half(), zeros=torch.zeros(3, 2).half(), group_size=32)
    args.update(bad)
    with pytest.raises(exc, match=match):
        async_dequant_gemm(**args)


def test_bad_codes_and_activations():
    with pytest.raises(ValueError, match="codes must be 2-bit"):
        aligned_from_codes(torch.full((2, 40), 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="codes must be 4-bit"):
        aligned_from_codes(torch.full((2, 40), 16, dtype=torch.uint8), 4)
    with pytest.raises(TypeError, match="codes must be a uint8 tensor"):
        aligned_from_codes(torch.zeros(2, 40, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x must have shape \[M, K\]"):
        quantize_activations(torch.zeros(2, 3, 4), 32)


def test_native_checks_xq_width():
    xq = torch.zeros(2, 64, dtype=torch.int8)  # must be padded to 128
    with pytest.raises(ValueError, match="xq"):
        lowbit._C.async_dequant_gemm(*(torch.utils.dlpack.to_dlpack(t) for t in (
            xq, torch.zeros(2, 2), torch.zeros(3, 8, dtype=torch.int32), torch.ones(3, 2).half(),
            torch.zeros(3, 2).half())), None, None, torch.utils.dlpack.to_dlpack(torch.zeros(2, 3)), 64, 2, 32, 0)


def test_native_requires_table_and_scale_together():
    d = [torch.utils.dlpack.to_dlpack(t) for t in (
        torch.zeros(2, 128, dtype=torch.int8), torch.zeros(2, 2), torch.zeros(3, 8, dtype=torch.int32),
        torch.ones(3, 2).half(), torch.zeros(16, dtype=torch.int8), torch.zeros(2, 3))]
    with pytest.raises(ValueError, match="table_q and table_scale must be given together"):
        lowbit._C.async_dequant_gemm(d[0], d[1], d[2], d[3], None, d[4], None, d[5], 64, 2, 32, 0)


def test_native_float_activations_checks():
    """The CPU entry that quantizes x inside the call checks x like quantize_activations, and CPU only."""
    def call(x, group_size=32):
        caps = [torch.utils.dlpack.to_dlpack(t) for t in (
            torch.zeros(3, 8, dtype=torch.int32), torch.ones(3, 2).half(), torch.zeros(3, 2).half(), torch.zeros(2, 3))]
        lowbit._C.async_dequant_gemm_float(x, caps[0], caps[1], caps[2], None, None, caps[3], 2, group_size)

    with pytest.raises(TypeError, match="x must have dtype"):
        call(torch.utils.dlpack.to_dlpack(torch.zeros(2, 64, dtype=torch.int32)))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        call(torch.utils.dlpack.to_dlpack(torch.zeros(2, 4, 16)))
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        call(torch.utils.dlpack.to_dlpack(torch.zeros(2, 64)), 48)
    with pytest.raises(ValueError, match="x must be a CPU tensor"):
        fake = FakeCudaTensor((2, 64))
        call(fake.capsule)
    with pytest.raises(ValueError, match=r"scales"):  # the GEMM's own checks follow
        lowbit._C.async_dequant_gemm_float(*(torch.utils.dlpack.to_dlpack(t) for t in (
            torch.zeros(2, 64), torch.zeros(3, 8, dtype=torch.int32), torch.ones(3, 5).half())), None, None, None,
            torch.utils.dlpack.to_dlpack(torch.zeros(2, 3)), 2, 32)


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(4)
    codes, scales, zeros = random_weight(16, 256, 128, gen)
    packed = aligned_from_codes(codes)
    x = torch.randn(3, 256, generator=gen)

    def f(x):
        return async_dequant_gemm(x, packed, scales, zeros, 128) * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 4, 5, 16, 63])  # from 64 rows on CUDA takes the dense path (test_dense_path)
@pytest.mark.parametrize("k,n,group_size", [(576, 64, 64), (4096, 1000, 128), (1000, 33, 32), (11008, 256, 128)])
def test_cuda_matches_cpu(m, k, n, group_size, dtype, bits):
    with cpu_reference():
        x, codes, scales, zeros, y = run_case(m, k, n, group_size, dtype, seed=m + k, bits=bits)
        packed = aligned_from_codes(codes, bits)
        xq_cpu, d_cpu = quantize_activations(x, group_size)
    xq_gpu, d_gpu = quantize_activations(to_gpu(x), group_size)
    torch.testing.assert_close(xq_gpu.cpu(), xq_cpu, rtol=0, atol=0)
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, rtol=0, atol=0)
    y_gpu = async_dequant_gemm(to_gpu(x), to_gpu(packed), to_gpu(scales), to_gpu(zeros), group_size, bits=bits)
    assert_close_to_exact(x, codes, scales, zeros, y_gpu.cpu(), group_size)
    assert_matches_cpu(y_gpu, y)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 4, 5, 63])
@pytest.mark.parametrize("k,n,group_size", [(576, 64, 64), (4096, 1000, 128), (1000, 33, 32)])
def test_cuda_table_mode_matches_cpu(m, k, n, group_size, dtype, bits):
    with cpu_reference():
        x, codes, scales, zeros, table, y = run_table_case(m, k, n, group_size, dtype, bits, seed=m + k,
                                                           with_zeros=True)
        packed = aligned_from_codes(codes, bits)
    y_gpu = async_dequant_gemm(to_gpu(x), to_gpu(packed), to_gpu(scales), to_gpu(zeros), group_size, bits=bits,
                               table=to_gpu(table))
    assert_close_to_exact(x, codes, scales, zeros, y_gpu.cpu(), group_size, table.numpy(), bits)
    assert_matches_cpu(y_gpu, y)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4])
def test_cuda_prepare_matches_cpu(bits):
    codes = torch.randint(0, 2**bits, (7, 1000), dtype=torch.uint8)
    with cpu_reference():
        aligned = aligned_from_codes(codes, bits)
    torch.testing.assert_close(prepare_async_dequant(pack_uniform(to_gpu(codes), bits), 1000, bits).cpu(),
                               aligned, rtol=0, atol=0)
