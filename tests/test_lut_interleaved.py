"""lut_gemm over codes re-laid by interleave_lut_codes: the layout itself, bitwise agreement with the canonical
codes on every CPU instruction set and path (the AVX-512 pair GEMV reads it directly, the other paths convert
it), the float64 reference, errors, and CUDA (converted in Python)."""
import pytest
import torch

from lowbit.ops import LUT_INTERLEAVE_ROWS, interleave_lut_codes, lut_gemm, pack_uniform
from gpu_device import cpu_reference, to_gpu
from test_lut_gemm import DTYPES, LARGE_M, assert_matches, make_weight, make_x, run


def run_interleaved(x, w):
    return lut_gemm(x, interleave_lut_codes(w.packed), w.scales, w.table, w.bits, w.group_size, zeros=w.zeros)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 64, 100])
def test_layout(n):
    packed = torch.randint(-2**31, 2**31 - 1, (n, 6), dtype=torch.int32)
    inter = interleave_lut_codes(packed)
    blocks = -(-n // LUT_INTERLEAVE_ROWS)
    assert inter.shape == (blocks, 6, LUT_INTERLEAVE_ROWS) and inter.dtype == torch.int32
    for r in range(blocks * LUT_INTERLEAVE_ROWS):
        expected = packed[r] if r < n else torch.zeros(6, dtype=torch.int32)
        assert torch.equal(inter[r // LUT_INTERLEAVE_ROWS, :, r % LUT_INTERLEAVE_ROWS], expected)


# N = 65, 69, 95: a partial last block of 32 rows; K = 300 / 4100: partial 16-word chunks; N = 33 and 1: below
# the pair path's 64 rows; M = 1-4 the pair path (2-bit, AVX-512), 7 and LARGE_M the other paths (converted).
@pytest.mark.parametrize("k,n", [(300, 65), (4100, 69), (576, 95), (128, 33), (64, 1)])
@pytest.mark.parametrize("m", [1, 2, 4, 7, LARGE_M])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_matches_canonical(isa, bits, m, k, n):
    w = make_weight(n, k, bits, 64, "random", zeros=True, seed=k + n + m)
    x = make_x((m, k), seed=m)
    y = run_interleaved(x, w)
    assert torch.equal(y, run(x, w))
    assert_matches(y, x, w.dense())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("zeros", [False, True])
def test_dtypes_groups_zeros(isa, dtype, group_size, zeros):
    w = make_weight(70, 1000, 2, group_size, "nf" if not zeros else "identity", zeros)
    x = make_x((3, 1000), dtype)
    y = run_interleaved(x, w)
    assert y.dtype == dtype and torch.equal(y, run(x, w))
    assert_matches(y, x, w.dense())


def test_bad_input():
    w = make_weight(40, 256, 2, 64)
    inter = interleave_lut_codes(w.packed)
    x = make_x((1, 256))
    with pytest.raises(ValueError, match=r"packed must have shape \[2, 16, 32\], got \[2, 16, 31\]"):
        lut_gemm(x, inter[:, :, :31], w.scales, w.table, 2, 64, zeros=w.zeros)
    with pytest.raises(ValueError, match=r"packed must have shape \[2, 16, 32\], got \[2, 24, 32\]"):
        lut_gemm(x, interleave_lut_codes(pack_uniform(w.codes, 3)), w.scales, w.table, 2, 64, zeros=w.zeros)
    with pytest.raises(ValueError, match="packed must have shape"):  # scales of 70 rows want 3 blocks
        lut_gemm(x, inter, torch.ones(70, 4, dtype=torch.float16), w.table, 2, 64)
    with pytest.raises(ValueError, match="scales must have 2 dimensions"):
        lut_gemm(x, inter, w.scales.flatten(), w.table, 2, 64)
    with pytest.raises(ValueError, match="packed must have 2 dimensions"):
        lut_gemm(x, inter[None], w.scales, w.table, 2, 64)
    with pytest.raises(TypeError, match="packed must have dtype int32 or uint32, got torch.float32"):
        interleave_lut_codes(w.packed.float())
    with pytest.raises(ValueError, match=r"packed must have 2 dimensions \[N, words\], got shape \[2, 16, 32\]"):
        interleave_lut_codes(inter)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, LARGE_M])
def test_cuda(m):
    with cpu_reference():
        w = make_weight(70, 1000, 2, 64)
        interleaved = interleave_lut_codes(w.packed)
    x = make_x((m, 1000), torch.float16)
    y = lut_gemm(to_gpu(x), to_gpu(interleaved), to_gpu(w.scales), to_gpu(w.table), 2, 64, zeros=to_gpu(w.zeros))
    y_canonical = lut_gemm(to_gpu(x), to_gpu(w.packed), to_gpu(w.scales), to_gpu(w.table), 2, 64,
                           zeros=to_gpu(w.zeros))
    assert torch.equal(y.cpu(), y_canonical.cpu())
    assert_matches(y.cpu(), x, w.dense())
