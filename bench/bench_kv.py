"""Decode attention over a long KV cache: one new query per sequence (batch 1, 32 query heads over 8 KV heads,
head_dim 128, a Llama-3-8B layer) at 4k, 16k and 64k cached tokens. lowbit's kernel reads the packed 2- and 4-bit
cache (key groups of 32 tokens, a 128-token full-precision window) against torch scaled_dot_product_attention over
an fp32 and a bf16 cache, in the same run. `cache_MB` is what each reads; the quantized caches are built once by
lowbit's own quantizers (the same layout QuantizedKVCache stores)."""
import pytest
import torch

from lowbit.ops import kv_quantize_keys, kv_quantize_values, quantized_attention_decode
from memory import read_bandwidth

HQ, HKV, D, WINDOW, GROUP = 32, 8, 128, 128, 32
CONTEXTS = [4096, 16384, 65536]


def _report(benchmark, nbytes: int) -> None:
    benchmark.extra_info["cache_MB"] = nbytes / 2**20
    benchmark.extra_info["of_bw"] = nbytes / benchmark.stats.stats.median / read_bandwidth()


def _kv(context: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(context)
    return torch.randn(1, HKV, context, D, generator=g), torch.randn(1, HKV, context, D, generator=g)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("context", CONTEXTS)
def test_lowbit_quantized_cache(benchmark, context, bits):
    benchmark.group = f"decode attention {context} tokens"
    k, v = _kv(context)
    quantized = context - WINDOW
    kq = kv_quantize_keys(k[:, :, :quantized].contiguous(), bits, GROUP)
    vq = kv_quantize_values(v[:, :, :quantized].contiguous(), bits)
    k_res, v_res = k[:, :, quantized:].contiguous(), v[:, :, quantized:].contiguous()
    lengths_q, lengths_res = torch.tensor([quantized]), torch.tensor([WINDOW])
    q = torch.randn(1, HQ, D)
    benchmark(quantized_attention_decode, q, *kq, *vq, k_res, v_res, lengths_q, lengths_res, bits, GROUP)
    _report(benchmark, sum(t.numel() * t.element_size() for t in (*kq, *vq, k_res, v_res)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("context", CONTEXTS)
def test_torch_sdpa(benchmark, context, dtype):
    benchmark.group = f"decode attention {context} tokens"
    benchmark.extra_info["baseline"] = f"sdpa {str(dtype).replace('torch.', '')}"
    k, v = (t.to(dtype) for t in _kv(context))
    q = torch.randn(1, HQ, 1, D, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    benchmark(lambda: sdpa(q, k, v, enable_gqa=True))
    _report(benchmark, 2 * k.numel() * k.element_size())
