"""QuantizedKVCache: streaming equals one-shot quantization; update/dequantize semantics; a tiny random Llama
(GQA, head_dim 64) against the dequantized reference (tight) and the fp DynamicCache (quantization tolerance);
rotation on and off; padded batches; memory accounting; bad arguments; the fused lowbit_kv decode path."""
import pytest
import torch

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import lowbit.nn.kv_cache as kv_cache
from lowbit.nn import QuantizedKVCache, QuantizedKVLayer
from lowbit.ops import (kv_quantize_keys, kv_quantize_values, quantized_attention_decode, random_signs,
                        randomized_hadamard_transform)

PROMPT = 100  # with residual 32, group 32: the prefill leaves 96 tokens packed and 4 in the window


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, vocab_size=128, max_position_embeddings=512)
    torch.manual_seed(0)
    m = LlamaForCausalLM(config).eval()
    m.set_attn_implementation("sdpa")
    return m


def kv(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def tokens(shape, seed=1):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def attention_reference(q, k, v, scale):
    """softmax(scale q K^T) V, q [B, H_q, D], k/v [B, H_kv, L, D], in float64."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    p = torch.softmax(scale * (q.double()[:, :, None] @ k.transpose(-1, -2)), dim=-1)
    return (p @ v)[:, :, 0]


def dequantized_copy(cache):
    """A DynamicCache holding what `cache` holds, dequantized: the reference the HF path must match."""
    ref = DynamicCache()
    for i, layer in enumerate(cache.layers):
        ref.update(*layer.dequantized(), i)
    return ref


# -- layer level -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("d", [64, 96])
def test_streaming_equals_one_shot(bits, rotate, d):
    k, v = kv((2, 2, 157, d), seed=0)
    layer = QuantizedKVLayer(bits=bits, residual=40, group=32, rotate=rotate)
    start = 0
    for size in [37] + [1] * 40 + [70] + [1] * 10:
        layer.update(k[:, :, start:start + size], v[:, :, start:start + size])
        start += size
        assert layer.window_length <= 40 and layer.quantized_length % 32 == 0
        assert layer.get_seq_length() == start
    t = layer.quantized_length
    assert t == 128
    signs = random_signs(d, seed=0)
    rot = (lambda x: randomized_hadamard_transform(x, signs)) if rotate else (lambda x: x)
    whole = (*kv_quantize_keys(rot(k[:, :, :t]), bits, 32), *kv_quantize_values(rot(v[:, :, :t]), bits))
    for name, ref in zip(kv_cache._STORE, whole):
        assert torch.equal(getattr(layer, name), ref), name
    assert torch.equal(layer.k_res, k[:, :, t:]) and torch.equal(layer.v_res, v[:, :, t:])


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_returns_dequantized_past_and_exact_new_tokens(rotate, dtype):
    k, v = (x.to(dtype) for x in kv((2, 2, 101, 80), seed=1))
    layer = QuantizedKVLayer(bits=4, residual=32, group=32, rotate=rotate)
    keys, values = layer.update(k[:, :, :100], v[:, :, :100])
    assert torch.equal(keys, k[:, :, :100]) and torch.equal(values, v[:, :, :100])  # prefill attends unquantized
    past_k, past_v = layer.dequantized()
    assert past_k.dtype == dtype and past_k.shape == (2, 2, 100, 80)
    for past, x in ((past_k, k), (past_v, v)):
        err = (past.float() - x[:, :, :100].float()).norm() / x[:, :, :100].float().norm()
        assert err < 0.1, float(err)  # 4-bit, groups of 32
    keys, values = layer.update(k[:, :, 100:], v[:, :, 100:])
    assert torch.equal(keys, torch.cat([past_k, k[:, :, 100:]], 2))
    assert torch.equal(values, torch.cat([past_v, v[:, :, 100:]], 2))


def test_reorder_and_select_batch_are_exact():
    k, v = kv((3, 2, 70, 64), seed=2)
    layer = QuantizedKVLayer(bits=2, residual=16)
    layer.update(k, v)
    before = layer.dequantized()
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    layer.batch_select_indices(torch.tensor([1, 2]))
    for a, b in zip(layer.dequantized(), before):
        assert torch.equal(a, b[:2])


@pytest.mark.parametrize("group,tokens,expected", [(32, 2048, 4.19), (128, 4096, 5.25)])
def test_memory_two_bits(group, tokens, expected):
    layer = QuantizedKVLayer(bits=2, residual=128, group=group)
    k, v = kv((1, 2, tokens, 64), seed=3)
    layer.update(k.half(), v.half())
    t = tokens - 128
    per_token = 2 * (64 * 2 // 8 + 4 * 64 // group) + 2 * (64 * 2 // 8 + 4 * 2)  # codes + fp16 scale/zero
    assert layer.nbytes() == t * per_token + 2 * 128 * 2 * 64 * 2
    assert layer.fp16_nbytes() == tokens * 2 * 2 * 64 * 2
    ratio = layer.fp16_nbytes() / layer.nbytes()
    print(f"2-bit, group {group}, {tokens} tokens, residual 128, head_dim 64: {ratio:.2f}x smaller than fp16")
    assert ratio >= expected


@pytest.mark.parametrize("kwargs,name", [(dict(bits=3), "bits"), (dict(group=48), "group"),
                                         (dict(residual=-1), "residual"), (dict(rotate="yes"), "rotate")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        QuantizedKVCache(**kwargs)
    with pytest.raises(ValueError, match=name):
        QuantizedKVLayer(**kwargs)


def test_unsupported_head_dim():
    k, v = kv((1, 2, 4, 32), seed=4)
    with pytest.raises(ValueError, match="head_dim"):
        QuantizedKVCache().update(k, v, 0)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("d", [64, 96])
def test_fused_attend_matches_dequantized_attention(rotate, d):
    k, v = kv((2, 2, 75, d), seed=5)
    layer = QuantizedKVLayer(bits=2, residual=32, rotate=rotate)
    layer.update(k[:, :, :72], v[:, :, :72])
    for i in range(72, 75):
        layer.update(k[:, :, i:i + 1], v[:, :, i:i + 1])
    assert layer.quantized_length == 64 and layer.window_length == 11
    q = torch.randn(2, 4, d, generator=torch.Generator().manual_seed(6))
    ref = attention_reference(q, *layer.dequantized(), d ** -0.5)
    torch.testing.assert_close(layer.attend(q).double(), ref, rtol=1e-4, atol=1e-4)


# -- a tiny Llama ------------------------------------------------------------------------------------------------


def generate(model, ids, cache, new, mask=None, attn="sdpa"):
    """Greedy generation with scores, under attention implementation `attn`."""
    model.set_attn_implementation(attn)
    try:
        return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, cache=cache,
                              max_new_tokens=new, do_sample=False, output_scores=True, return_dict_in_generate=True)
    finally:
        model.set_attn_implementation("sdpa")


def assert_same_generation(out, ref, tol):
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("rotate", [False, True])
def test_window_holding_everything_equals_dynamic_cache(model, rotate):
    ids = tokens((2, 40))
    out = generate(model, ids, QuantizedKVCache(bits=2, residual=512, rotate=rotate), 8)
    assert_same_generation(out, generate(model, ids, DynamicCache(), 8), 1e-6)


def step_logits(model, ids, mask, cache, prefill):
    with torch.no_grad():
        prompt = model(ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache).logits
        ref = dequantized_copy(cache) if isinstance(cache, QuantizedKVCache) else None
        step = model(ids[:, prefill:], attention_mask=mask, cache=cache).logits
    return prompt, step, ref


# Tolerances against the fp cache, in units of the logits' standard deviation (about 0.2 for this model): the
# measured max errors are 0.07-0.10 (4-bit) and 0.27-0.41 (2-bit); the dequantized reference is matched to 1e-5.
@pytest.mark.parametrize("bits,tol", [(4, 0.25), (2, 0.75)])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("new", [1, 5])
def test_logits_against_dequantized_reference_and_fp_cache(model, bits, tol, rotate, new):
    ids = tokens((1, PROMPT + new))
    mask = torch.ones_like(ids)
    fp_prompt, fp_step, _ = step_logits(model, ids, mask, DynamicCache(), PROMPT)
    cache = QuantizedKVCache(bits=bits, residual=32, rotate=rotate)
    prompt, step, ref_cache = step_logits(model, ids, mask, cache, PROMPT)
    torch.testing.assert_close(prompt, fp_prompt, rtol=1e-5, atol=1e-5)  # prefill attends unquantized
    with torch.no_grad():
        ref_step = model(ids[:, PROMPT:], cache=ref_cache).logits
    torch.testing.assert_close(step, ref_step, rtol=1e-5, atol=1e-5)
    err = (step - fp_step).abs().max() / fp_step.std()
    assert 0 < err < tol, float(err)


def test_padded_batch_of_two(model):
    ids = tokens((2, PROMPT + 1), seed=2)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding
    fp_prompt, fp_step, _ = step_logits(model, ids, mask, DynamicCache(), PROMPT)
    _, step, ref_cache = step_logits(model, ids, mask, QuantizedKVCache(bits=4, residual=32), PROMPT)
    with torch.no_grad():
        ref_step = model(ids[:, PROMPT:], attention_mask=mask, cache=ref_cache).logits
    torch.testing.assert_close(step, ref_step, rtol=1e-5, atol=1e-5)
    assert (step - fp_step).abs().max() / fp_step.std() < 0.25
    _, exact, _ = step_logits(model, ids, mask, QuantizedKVCache(bits=4, residual=256), PROMPT)
    torch.testing.assert_close(exact, fp_step, rtol=1e-5, atol=1e-5)


def test_generate_greedy_tokens_mostly_match(model):
    ids = tokens((4, PROMPT), seed=3)
    ref = generate(model, ids, DynamicCache(), 8).sequences
    out = generate(model, ids, QuantizedKVCache(bits=4, residual=32), 8).sequences
    agree = (out[:, PROMPT:] == ref[:, PROMPT:]).float().mean()
    assert agree >= 0.75, float(agree)  # 0.97 measured


def count_kernel_calls(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return quantized_attention_decode(*args, **kwargs)

    monkeypatch.setattr(kv_cache, "quantized_attention_decode", counted)
    return calls


@pytest.mark.parametrize("rotate", [False, True])
def test_generate_runs_the_fused_kernel_and_matches_the_dequantize_path(model, monkeypatch, rotate):
    calls = count_kernel_calls(monkeypatch)
    ids = tokens((2, PROMPT), seed=4)
    ref = generate(model, ids, QuantizedKVCache(bits=2, residual=32, rotate=rotate), 12)
    out = generate(model, ids, QuantizedKVCache(bits=2, residual=32, rotate=rotate), 12, attn="lowbit_kv")
    assert len(calls) == 2 * 11 and calls[0] == (2, 4, 64)  # 2 layers x 11 decode steps (no group moves)
    assert_same_generation(out, ref, 1e-4)


def test_fused_path_falls_back_under_a_padding_mask(model, monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    ids = tokens((2, PROMPT), seed=5)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ref = generate(model, ids, QuantizedKVCache(bits=4, residual=32), 6, mask)
    out = generate(model, ids, QuantizedKVCache(bits=4, residual=32), 6, mask, attn="lowbit_kv")
    assert not calls
    assert_same_generation(out, ref, 1e-5)
