"""The other CUDA kernels' speed (skipped without a device), each against torch in the same run, 64 calls per
round replayed from a CUDA graph (cuda_timing.py):
- Hadamard transform (fp16, normalized) vs a dense fp16 `x @ H.T` (cuBLAS), on [4096 x 4096] and [1 x 11008];
- dequantization of an 11008 x 4096 weight to fp16 (2 and 4 bits, group 128) vs torch copying that fp16 matrix,
  as GB/s of output;
- decode attention over a 2- and 4-bit KV cache (32 query heads over 8 KV heads, head_dim 128, a 128-token fp16
  window) at 4k, 16k and 64k tokens vs torch scaled_dot_product_attention over an fp16 cache; caches cycle
  through 512 MB so they are read from HBM."""
import math

import pytest
import torch
import torch.nn.functional as F

from cuda_timing import cycling_cuda, requires_cuda, run_graph
from lowbit.ops import hadamard_matrix, kv_quantize_keys, kv_quantize_values, pack_uniform
from lowbit.ops.hadamard import hadamard_unchecked
from lowbit.ops.kv import _attention_call
from lowbit.ops.pack import _dequantize_uniform_op

pytestmark = requires_cuda

HADAMARD_SHAPES = [(4096, 4096), (1, 11008)]
N, K, GROUP = 11008, 4096, 128
HQ, HKV, D, WINDOW, KV_GROUP = 32, 8, 128, 128, 32
CONTEXTS = [4096, 16384, 65536]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.mark.parametrize("shape", HADAMARD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_hadamard(benchmark, shape):
    benchmark.group = f"hadamard cuda {shape[0]}x{shape[1]} fp16"
    x = torch.randn(*shape, dtype=torch.float16, device="cuda")
    scale = shape[1] ** -0.5
    run_graph(benchmark, lambda x: hadamard_unchecked(x, None, scale, False), x, [()], 2 * _nbytes([x]))


@pytest.mark.parametrize("shape", HADAMARD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_hadamard_torch_dense(benchmark, shape):
    benchmark.group = f"hadamard cuda {shape[0]}x{shape[1]} fp16"
    x = torch.randn(*shape, dtype=torch.float16, device="cuda")
    h = (hadamard_matrix(shape[1], torch.float32) / math.sqrt(shape[1])).T.contiguous().half().cuda()
    run_graph(benchmark, lambda x: x @ h, x, [()], 2 * _nbytes([x]), baseline="torch dense fp16")


@pytest.mark.parametrize("bits", [2, 4])
def test_cuda_dequantize_uniform(benchmark, bits):
    benchmark.group = f"dequantize cuda {N}x{K} -> fp16"

    def make():
        codes = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8)
        scales, zeros = (torch.rand(N, K // GROUP) * 0.01).half(), torch.full((N, K // GROUP), 2.0).half()
        return tuple(t.cuda() for t in (pack_uniform(codes, bits), scales, zeros))

    copies = cycling_cuda(make)
    run_graph(benchmark, lambda _, p, s, z: _dequantize_uniform_op(p, s, z, bits, GROUP, K, torch.float16), None,
              copies, N * K * 2)


def test_cuda_dequantize_torch_copy(benchmark):
    benchmark.group = f"dequantize cuda {N}x{K} -> fp16"
    copies = cycling_cuda(lambda: (torch.randn(N, K, dtype=torch.float16, device="cuda"),))
    run_graph(benchmark, lambda _, w: w.clone(), None, copies, N * K * 2, baseline="torch fp16 copy")


def _kv(context: int):
    g = torch.Generator().manual_seed(context)
    return (torch.randn(1, HKV, context, D, generator=g).half().cuda(),
            torch.randn(1, HKV, context, D, generator=g).half().cuda())


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("context", CONTEXTS)
def test_cuda_quantized_attention(benchmark, context, bits):
    benchmark.group = f"decode attention cuda {context} tokens"
    quantized = context - WINDOW

    def make():
        k, v = _kv(context)
        return (*kv_quantize_keys(k[:, :, :quantized].contiguous(), bits, KV_GROUP),
                *kv_quantize_values(v[:, :, :quantized].contiguous(), bits),
                k[:, :, quantized:].contiguous(), v[:, :, quantized:].contiguous())

    copies = cycling_cuda(make)
    lengths_q = torch.tensor([quantized], dtype=torch.int32, device="cuda")
    lengths_res = torch.tensor([WINDOW], dtype=torch.int32, device="cuda")
    q = torch.randn(1, HQ, D, dtype=torch.float16, device="cuda")
    run_graph(benchmark, lambda q, *c: _attention_call(q, *c, lengths_q, lengths_res, bits, KV_GROUP, D ** -0.5),
              q, copies, _nbytes(copies[0]))


@pytest.mark.parametrize("context", CONTEXTS)
def test_cuda_sdpa_fp16_cache(benchmark, context):
    benchmark.group = f"decode attention cuda {context} tokens"
    copies = cycling_cuda(lambda: _kv(context))
    q = torch.randn(1, HQ, 1, D, dtype=torch.float16, device="cuda")
    run_graph(benchmark, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), q, copies,
              _nbytes(copies[0]), baseline="torch sdpa fp16")
