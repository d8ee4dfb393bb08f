"""Dequantization throughput: GB/s of fp16 output written by dequantize_uniform (2/3/4 bits) and dequantize_lut
(NF4) for a 4096 x 11008 weight, and the fraction of the machine's measured read bandwidth that is
(`of_bw`, bench/memory.py). Operands cycle through more memory than the L3."""
import pytest
import torch

from lowbit.ops import dequantize_lut, dequantize_uniform, nf_table, pack_uniform
from memory import cycling, read_bandwidth

N, K, GROUP = 11008, 4096, 128


def _operands(bits: int):
    def make():
        codes = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8)
        scales, zeros = (torch.rand(N, K // GROUP) * 0.01).half(), torch.full((N, K // GROUP), 2.0).half()
        return pack_uniform(codes, bits), scales, zeros
    return cycling(make, per_copy=N * K * 2)  # the fp16 output dominates the traffic


def _report(benchmark) -> None:
    gbs = N * K * 2 / benchmark.stats.stats.median
    benchmark.extra_info["out GB/s"] = gbs / 1e9
    benchmark.extra_info["of_bw"] = gbs / read_bandwidth()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequantize_uniform(benchmark, bits):
    benchmark.group = "dequantize 11008x4096 -> fp16"
    operands = _operands(bits)
    benchmark.pedantic(lambda: dequantize_uniform(*operands(), bits, GROUP, K, torch.float16), rounds=20,
                       warmup_rounds=2)
    _report(benchmark)


def test_dequantize_lut_nf4(benchmark):
    benchmark.group = "dequantize 11008x4096 -> fp16"
    operands = _operands(4)
    table = nf_table(4)
    benchmark.pedantic(lambda: dequantize_lut(*operands()[:2], table, 4, GROUP, K, torch.float16), rounds=20,
                       warmup_rounds=2)
    _report(benchmark)


def test_torch_copy_fp16(benchmark):
    """Baseline: torch copying an fp16 matrix of the same size (read + write of the output size)."""
    benchmark.group = "dequantize 11008x4096 -> fp16"
    benchmark.extra_info["baseline"] = "torch fp16 copy"
    src = cycling(lambda: (torch.randn(N, K).half(),))
    benchmark.pedantic(lambda: src()[0].clone(), rounds=20, warmup_rounds=2)
    _report(benchmark)
