"""Quantized GEMM speed on a CUDA device (skipped without one): the kernels QuantLinear calls, fp16
activations, M = 1, 16 and 64 rows (64: the dense path of lowbit.ops.dense_path), on a 7B model's linear shapes,
against torch's fp16 and bf16 `x @ W.T` (cuBLAS) and torch's int4 weight-only kernel (tinygemm, bf16), in the
same run. Each round replays 64 calls from a CUDA graph (cuda_timing.py), operands cycling through 512 MB (more
than the L2); GB/s counts the weight's bytes (codes + scales + zeros, or the dense matrix)."""
import pytest
import torch

from cuda_timing import cycling_cuda, requires_cuda, run_graph
from lowbit.ops import aligned_from_codes, nf_table, pack_mixed, pack_uniform, prepare_lut_table, prepare_mixed_gemm
from lowbit.ops.async_dequant import async_dequant_gemm_unchecked
from lowbit.ops.lut_gemm import lut_gemm_unchecked
from lowbit.ops.mixed_gemm import mixed_gemm_unchecked
from lowbit.ops.vq_gemm import vq_gemm_unchecked

pytestmark = requires_cuda

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
ROWS = [1, 16, 64]
GROUP = 128
shape_ids = [f"{k}x{n}" for k, n in SHAPES]


def _case(benchmark, k: int, n: int, m: int) -> torch.Tensor:
    benchmark.group = f"gemm cuda K={k} N={n} M={m}"
    return torch.randn(m, k, dtype=torch.float16, device="cuda")


def _bytes(copies) -> int:
    return sum(t.numel() * t.element_size() for t in copies[0] if t is not None)


def _group_params(n: int, k: int, zeros: float | None) -> tuple:
    g = -(-k // GROUP)
    scales = (torch.rand(n, g) * 0.01).half().cuda()
    return (scales,) if zeros is None else (scales, torch.full((n, g), zeros).half().cuda())


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=shape_ids)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cuda_lut_gemm(benchmark, k, n, m, bits):
    """Affine codes through the LUT kernel (identity table with zeros), fp16 activations unrounded."""
    x = _case(benchmark, k, n, m)
    table = torch.arange(2**bits, dtype=torch.float32, device="cuda")
    copies = cycling_cuda(lambda: (pack_uniform(torch.randint(0, 2**bits, (n, k), dtype=torch.uint8), bits).cuda(),
                                   *_group_params(n, k, 2.0)))
    run_graph(benchmark, lambda x, p, s, z: lut_gemm_unchecked(x, p, s, z, table, bits, GROUP), x, copies,
              _bytes(copies))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=shape_ids)
@pytest.mark.parametrize("bits", [2, 4])
def test_cuda_async_dequant_gemm(benchmark, k, n, m, bits):
    """The aligned layout, cp.async pipeline, int8 activations (dense path from 64 rows)."""
    x = _case(benchmark, k, n, m)
    copies = cycling_cuda(lambda: (aligned_from_codes(torch.randint(0, 2**bits, (n, k), dtype=torch.uint8),
                                                      bits).cuda(), *_group_params(n, k, 2.0)))
    run_graph(benchmark, lambda x, p, s, z: async_dequant_gemm_unchecked(x, p, s, z, None, None, bits, GROUP), x,
              copies, _bytes(copies))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=shape_ids)
@pytest.mark.parametrize("bits", [2, 4])
def test_cuda_lut_gemm_int8(benchmark, k, n, m, bits):
    """The lut format (NF table, scales only) in the async kernel's table mode, int8 activations."""
    x = _case(benchmark, k, n, m)
    tq, ts = (t.cuda() for t in prepare_lut_table(nf_table(bits), bits))
    copies = cycling_cuda(lambda: (aligned_from_codes(torch.randint(0, 2**bits, (n, k), dtype=torch.uint8),
                                                      bits).cuda(), *_group_params(n, k, None)))
    run_graph(benchmark, lambda x, p, s: async_dequant_gemm_unchecked(x, p, s, None, tq, ts, bits, GROUP), x,
              copies, _bytes(copies))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=shape_ids)
@pytest.mark.parametrize("bits", [2.5])
def test_cuda_mixed_gemm(benchmark, k, n, m, bits):
    """Mixed 2/4-bit weights, a quarter of the groups 4-bit (2.5 bits on average), int8 activations."""
    x = _case(benchmark, k, n, m)
    g = -(-k // GROUP)
    widths = [4 if i % 4 == 0 else 2 for i in range(g)]
    cols = torch.tensor([widths[c // GROUP] for c in range(k)])

    def make():
        codes = (torch.rand(n, k) * 2.0**cols).floor().to(torch.uint8)
        weight = prepare_mixed_gemm(pack_mixed(codes, widths, GROUP), widths, GROUP, k)
        return (*(t.cuda() for t in weight), *_group_params(n, k, 1.0))

    copies = cycling_cuda(make)
    run_graph(benchmark, lambda x, p, r4, r2, s, z: mixed_gemm_unchecked(x, p, r4, r2, s, z, GROUP), x, copies,
              _bytes(copies))


def _vq(benchmark, k: int, n: int, m: int, r: int, e: int) -> None:
    x = _case(benchmark, k, n, m)
    codebooks = (torch.randn(r, e, 8) * 0.01).half().cuda()
    code_dtype = torch.uint8 if e == 256 else torch.int16  # as QuantizedWeight.vq stores them
    copies = cycling_cuda(lambda: (torch.randint(0, e, (n, k // 8, r), dtype=torch.int32).to(code_dtype).cuda(),
                                   torch.rand(n).half().cuda()))
    run_graph(benchmark, lambda x, c, s: vq_gemm_unchecked(x, c, codebooks, s, "auto"), x, copies, _bytes(copies))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=shape_ids)
def test_cuda_vq_gemm_2bit(benchmark, k, n, m):
    """2 bits/weight: one codebook of 2^16 codewords of 8 weights (AQLM 1x16)."""
    _vq(benchmark, k, n, m, 1, 2**16)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=shape_ids)
def test_cuda_vq_gemm_2x8_2bit(benchmark, k, n, m):
    """2 bits/weight: two residual codebooks of 256 codewords (AQLM 2x8; uint8 codes, as stored)."""
    _vq(benchmark, k, n, m, 2, 256)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=shape_ids)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_torch_dense(benchmark, k, n, m, dtype):
    x = _case(benchmark, k, n, m).to(dtype)
    copies = cycling_cuda(lambda: (torch.randn(n, k, dtype=dtype, device="cuda"),))
    run_graph(benchmark, lambda x, w: x @ w.T, x, copies, _bytes(copies),
              baseline=f"torch {str(dtype).replace('torch.', '')}")


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SHAPES, ids=shape_ids)
def test_cuda_torch_int4(benchmark, k, n, m):
    """torch's int4 weight-only CUDA kernel (tinygemm: bf16 activations, group 128)."""
    x = _case(benchmark, k, n, m).to(torch.bfloat16)

    def make():
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        packed = torch.ops.aten._convert_weight_to_int4pack(w, 8)
        return packed, torch.rand(k // GROUP, n, 2, dtype=torch.bfloat16, device="cuda")

    try:
        copies = cycling_cuda(make)
        torch.ops.aten._weight_int4pack_mm(x, *copies[0][:1], GROUP, copies[0][1])
    except (RuntimeError, AttributeError) as e:  # the op's signature moves between torch releases
        pytest.skip(f"torch's int4 CUDA kernel is not usable here: {e}")
    run_graph(benchmark, lambda x, p, sz: torch.ops.aten._weight_int4pack_mm(x, p, GROUP, sz), x, copies,
              _bytes(copies), baseline="torch int4")
