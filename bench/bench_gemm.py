"""Quantized GEMM speed (y = x W^T) on the shapes of a 7B model's linears, M = 1, 4, 16, 64 rows of x: lowbit's LUT GEMM
at 2/3/4 bits (affine codes, group 128; fp32 activations; 2-bit also over interleaved codes), the LUT GEMM for int8
activations (NF2/NF4 tables through the async kernel's table mode), the async-dequant 2/4-bit GEMM (int8
activations), the mixed 2/4-bit GEMM (2.5 bits on average) and VQ GEMM (2 bits/weight: AQLM 1x16 and 2x8) against
torch dense fp32 and bf16 and torch's int4 weight-only CPU kernel, in the same run. Operands cycle through more
memory than the L3 (bench/memory.py), so the numbers are what a decoding step sees; GB/s counts the bytes of the
weight's storage (codes + scales + zeros, or the dense matrix) and `of_bw` is that over the measured read bandwidth."""
import pytest
import torch

from lowbit.ops import (MixedGemmWeight, aligned_from_codes, async_dequant_gemm, interleave_lut_codes, lut_gemm,
                        mixed_gemm, nf_table, pack_mixed, pack_uniform, prepare_lut_table, prepare_mixed_gemm,
                        vq_gemm)
from memory import cycling, nbytes, read_bandwidth

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
ROWS = [1, 4, 16, 64]
GROUP = 128


def _case(benchmark, k: int, n: int, m: int) -> None:
    benchmark.group = f"gemm K={k} N={n} M={m}"


def _report(benchmark, weight_bytes: int) -> None:
    gbs = weight_bytes / benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = gbs / 1e9
    benchmark.extra_info["of_bw"] = gbs / read_bandwidth()


def _run(benchmark, next_operands, fn, x: torch.Tensor) -> None:
    benchmark.pedantic(lambda: fn(x, *next_operands()), rounds=30, warmup_rounds=3)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lowbit_lut_gemm(benchmark, k, n, m, bits):
    _case(benchmark, k, n, m)
    g = -(-k // GROUP)

    def make():
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
        return (pack_uniform(codes, bits), (torch.rand(n, g) * 0.01).half(), torch.full((n, g), 2.0).half())

    operands = cycling(make)
    table = torch.arange(2**bits, dtype=torch.float32)
    x = torch.randn(m, k)
    _run(benchmark, operands, lambda x, p, s, z: lut_gemm(x, p, s, table, bits, GROUP, zeros=z), x)
    _report(benchmark, nbytes(operands()))


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
def test_lowbit_lut_gemm_interleaved_2bit(benchmark, k, n, m, bits=2):
    """The 2-bit LUT GEMV over codes re-laid once by interleave_lut_codes (what its AVX-512 pair path reads)."""
    _case(benchmark, k, n, m)
    g = -(-k // GROUP)

    def make():
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
        return (interleave_lut_codes(pack_uniform(codes, bits)), (torch.rand(n, g) * 0.01).half(),
                torch.full((n, g), 2.0).half())

    operands = cycling(make)
    table = torch.arange(2**bits, dtype=torch.float32)
    x = torch.randn(m, k)
    _run(benchmark, operands, lambda x, p, s, z: lut_gemm(x, p, s, table, bits, GROUP, zeros=z), x)
    _report(benchmark, nbytes(operands()))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
@pytest.mark.parametrize("bits", [2, 4])
def test_lowbit_async_dequant_gemm(benchmark, k, n, m, bits):
    _case(benchmark, k, n, m)
    g = -(-k // GROUP)

    def make():
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
        return aligned_from_codes(codes, bits), (torch.rand(n, g) * 0.01).half(), torch.full((n, g), 2.0).half()

    operands = cycling(make)
    x = torch.randn(m, k)
    _run(benchmark, operands, lambda x, p, s, z: async_dequant_gemm(x, p, s, z, GROUP, bits=bits), x)
    _report(benchmark, nbytes(operands()))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
@pytest.mark.parametrize("bits", [2, 4])
def test_lowbit_lut_gemm_int8(benchmark, k, n, m, bits):
    """The lut format (NF table, scales only) with int8 activations: async_dequant_gemm(table=...)."""
    _case(benchmark, k, n, m)
    g = -(-k // GROUP)

    def make():
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
        return aligned_from_codes(codes, bits), (torch.rand(n, g) * 0.01).half()

    operands = cycling(make)
    table = prepare_lut_table(nf_table(bits), bits)  # rounded to int8 once, as QuantLinear does at load time
    x = torch.randn(m, k)
    _run(benchmark, operands, lambda x, p, s: async_dequant_gemm(x, p, s, None, GROUP, bits=bits, table=table), x)
    _report(benchmark, nbytes(operands()))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
@pytest.mark.parametrize("bits", [2.5])
def test_lowbit_mixed_gemm(benchmark, k, n, m, bits):
    """Mixed 2/4-bit weights averaging `bits` (a quarter of the groups 4-bit at 2.5), one kernel, int8 x."""
    _case(benchmark, k, n, m)
    g = -(-k // GROUP)
    widths = [4 if (i * (bits - 2) / 2) % 1 + (bits - 2) / 2 >= 1 else 2 for i in range(g)]
    cols = torch.tensor([widths[c // GROUP] for c in range(k)])

    def make():
        codes = (torch.rand(n, k) * 2.0**cols).floor().to(torch.uint8)
        weight = prepare_mixed_gemm(pack_mixed(codes, widths, GROUP), widths, GROUP, k)
        return *weight, (torch.rand(n, g) * 0.01).half(), torch.full((n, g), 1.0).half()

    operands = cycling(make)
    x = torch.randn(m, k)
    _run(benchmark, operands, lambda x, p, r4, r2, s, z: mixed_gemm(x, MixedGemmWeight(p, r4, r2), s, z, GROUP), x)
    _report(benchmark, nbytes(operands()))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
def test_lowbit_vq_gemm_2bit(benchmark, k, n, m):
    """2 bits/weight: one codebook of 2^16 codewords of 8 weights (AQLM 1x16)."""
    _case(benchmark, k, n, m)
    codebooks = (torch.randn(1, 2**16, 8) * 0.01).half()

    def make():
        codes = torch.randint(-2**15, 2**15, (n, k // 8, 1), dtype=torch.int16)
        return codes, torch.rand(n).half()

    operands = cycling(make)
    x = torch.randn(m, k)
    _run(benchmark, operands, lambda x, c, s: vq_gemm(x, c, codebooks, s), x)
    _report(benchmark, nbytes(operands()))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
def test_lowbit_vq_gemm_2x8_2bit(benchmark, k, n, m):
    """2 bits/weight: two residual codebooks of 256 codewords of 8 weights (AQLM 2x8, the default of lowbit's VQ
    quantizer), with uint8 codes as QuantizedWeight.vq stores them."""
    _case(benchmark, k, n, m)
    codebooks = (torch.randn(2, 256, 8) * 0.01).half()

    def make():
        return torch.randint(0, 256, (n, k // 8, 2), dtype=torch.uint8), torch.rand(n).half()

    operands = cycling(make)
    x = torch.randn(m, k)
    _run(benchmark, operands, lambda x, c, s: vq_gemm(x, c, codebooks, s), x)
    _report(benchmark, nbytes(operands()))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_dense(benchmark, k, n, m, dtype):
    _case(benchmark, k, n, m)
    benchmark.extra_info["baseline"] = f"torch {str(dtype).replace('torch.', '')}"
    operands = cycling(lambda: (torch.randn(n, k, dtype=dtype),))
    x = torch.randn(m, k, dtype=dtype)
    _run(benchmark, operands, lambda x, w: x @ w.T, x)
    _report(benchmark, nbytes(operands()))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
def test_torch_int4(benchmark, k, n, m):
    """torch's own 4-bit weight-only CPU kernel (bf16 activations, group 128)."""
    _case(benchmark, k, n, m)
    benchmark.extra_info["baseline"] = "torch int4"

    def make():
        w = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 2)
        return packed, torch.rand(k // GROUP, n, 2, dtype=torch.bfloat16)

    operands = cycling(make)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    _run(benchmark, operands, lambda x, p, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, GROUP, sz), x)
    _report(benchmark, nbytes(operands()))
