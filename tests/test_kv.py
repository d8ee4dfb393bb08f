"""Quantized KV cache (include/lowbit/kv.h): key/value quantization bit-exact against a numpy model of the documented
formula, streaming, dequantization, decode attention against a float64 softmax over the dequantized cache plus the
window (tight) and over the original cache (loose), ragged batches, GQA, dtypes, errors, torch.compile, CUDA vs CPU."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.dlpack import to_dlpack

from lowbit import _C
from lowbit.ops import (KV_HEAD_DIMS, kv_dequantize_keys, kv_dequantize_values, kv_quantize_keys,
                        kv_quantize_values, quantized_attention_decode)

from gpu_device import cpu_reference, on_gpu, sm_count, to_gpu

F32 = np.float32
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |out - ref| over max(1, max |ref|) for attention over the same (dequantized) cache: fp32 arithmetic, then the
# rounding of the output to q's dtype (half an ulp: 2^-11 fp16, 2^-8 bf16)
ATT_TOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


# ---------------------------------------------------------------------------------------------------------------
# numpy model of kv.h


def affine_ref(lo: np.ndarray, hi: np.ndarray, bits: int):
    """fp16 (scale, zero) of groups with float32 extremes lo, hi: kv.h's formula, operation by operation in fp32."""
    amax = np.maximum(np.abs(lo), np.abs(hi))
    s = np.maximum(np.maximum((hi - lo) / F32(2**bits - 1), amax * F32(2.0**-14)), F32(2.0**-24))
    scale = np.minimum(s, F32(65504)).astype(np.float16)
    zero = (-lo / scale.astype(F32)).astype(np.float16)
    return scale, zero


def codes_ref(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    q = np.rint(x / scale.astype(F32) + zero.astype(F32))
    return np.clip(q, 0, 2**bits - 1).astype(np.uint32)


def pack_ref(codes: np.ndarray, bits: int) -> np.ndarray:
    """Canonical packing along the last axis (a multiple of 32): code i at bits [i*b, i*b + b) -> int32 words."""
    per = 32 // bits
    c = codes.astype(np.uint32).reshape(*codes.shape[:-1], -1, per)
    return np.bitwise_or.reduce(c << (np.arange(per, dtype=np.uint32) * bits), axis=-1).view(np.int32)


def unpack_ref(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    per = 32 // bits
    w = words.view(np.uint32)[..., None] >> (np.arange(per, dtype=np.uint32) * bits)
    return (w & (2**bits - 1)).reshape(*words.shape[:-1], words.shape[-1] * per)[..., :n]


def quantize_keys_ref(k: torch.Tensor, bits: int, group: int):
    x = k.float().numpy()
    b, h, t, d = x.shape
    xg = x.reshape(b, h, t // group, group, d)
    scale, zero = affine_ref(xg.min(3), xg.max(3), bits)
    q = codes_ref(xg, scale[:, :, :, None], zero[:, :, :, None], bits)
    return pack_ref(np.swapaxes(q, 3, 4), bits), scale, zero


def quantize_values_ref(v: torch.Tensor, bits: int):
    x = v.float().numpy()
    d = x.shape[-1]
    groups = -(-d // 32)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, groups * 32 - d)]
    xg = np.pad(x, pad, mode="edge").reshape(*x.shape[:-1], groups, 32)  # edge padding keeps each min/max
    scale, zero = affine_ref(xg.min(-1), xg.max(-1), bits)
    q = codes_ref(xg, scale[..., None], zero[..., None], bits).reshape(*x.shape[:-1], groups * 32)
    q[..., d:] = 0
    return pack_ref(q, bits), scale, zero


def dequantize_keys_ref(codes, scale, zero, bits: int, group: int) -> np.ndarray:
    q = unpack_ref(np.asarray(codes), bits, group).astype(F32)  # [B, H, Tg, D, G]
    x = np.asarray(scale)[..., None].astype(F32) * (q - np.asarray(zero)[..., None].astype(F32))
    b, h, tg, d, _ = x.shape
    return np.swapaxes(x, 3, 4).reshape(b, h, tg * group, d)


def dequantize_values_ref(codes, scale, zero, bits: int, head_dim: int) -> np.ndarray:
    q = unpack_ref(np.asarray(codes), bits, head_dim).astype(F32)
    g = np.arange(head_dim) // 32
    return np.asarray(scale).astype(F32)[..., g] * (q - np.asarray(zero).astype(F32)[..., g])


def attention_ref(q, k_q, v_q, k_res, v_res, lengths_q, lengths_res, softmax_scale) -> np.ndarray:
    """float64 softmax(scale * q K^T) V per sequence over its first lengths_q cache and lengths_res window tokens."""
    q, k_q, v_q, k_res, v_res = (np.asarray(a, dtype=np.float64) for a in (q, k_q, v_q, k_res, v_res))
    out = np.zeros_like(q)
    rep = q.shape[1] // k_q.shape[1]
    for b, (lq, lr) in enumerate(zip(lengths_q, lengths_res)):
        if lq + lr == 0:
            continue
        keys = np.repeat(np.concatenate([k_q[b, :, :lq], k_res[b, :, :lr]], 1), rep, axis=0)
        vals = np.repeat(np.concatenate([v_q[b, :, :lq], v_res[b, :, :lr]], 1), rep, axis=0)
        s = np.einsum("hd,hnd->hn", q[b], keys) * softmax_scale
        p = np.exp(s - s.max(-1, keepdims=True))
        out[b] = np.einsum("hn,hnd->hd", p / p.sum(-1, keepdims=True), vals)
    return out


# ---------------------------------------------------------------------------------------------------------------
# data


def key_data(shape, dtype, seed: int) -> torch.Tensor:
    """Keys with per-channel offsets and scales, plus edge groups: all zero, constant, far from 0 with a tiny
    range, and near the fp16 limit."""
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(d, generator=g)) + 3 * torch.randn(d, generator=g)
    x[..., :32, 0] = 0.0
    x[..., :32, 1] = 1.25
    x[..., 2] = 1000.0 + 1e-3 * torch.randn(x[..., 2].shape, generator=g)
    x[..., 3] = 6e4 * torch.rand(x[..., 3].shape, generator=g) - 3e4
    return x.to(dtype)


def value_data(shape, dtype, seed: int) -> torch.Tensor:
    """Values with per-token scales, plus all-zero, constant and large rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g))
    x[..., 0, :] = 0.0
    x[..., 1, :] = -0.75
    x[..., 2, :] = (1e4 * torch.randn(x[..., 2, :].shape, generator=g)).clamp(-6e4, 6e4)
    return x.to(dtype)


def randn(*shape, seed: int = 0, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def make_cache(b, h_kv, t_q, r, d, bits, group, dtype=torch.float32, lengths_q=None, lengths_res=None, seed=0):
    """A random cache: float keys/values for t_q quantized slots and an r-token window, quantized with lowbit.
    Window slots past lengths_res are NaN and scales/zeros past lengths_q are NaN, so reading them shows."""
    g = torch.Generator().manual_seed(seed)
    offset = 2 * torch.randn(d, generator=g)  # key channels sit away from 0, as in real models
    k = (torch.randn(b, h_kv, t_q + r, d, generator=g) + offset).to(dtype)
    v = torch.randn(b, h_kv, t_q + r, d, generator=g).to(dtype)
    lengths_q = torch.full((b,), t_q) if lengths_q is None else torch.tensor(lengths_q)
    lengths_res = torch.full((b,), r) if lengths_res is None else torch.tensor(lengths_res)
    kc, ks, kz = kv_quantize_keys(k[:, :, :t_q], bits, group)
    vc, vs, vz = kv_quantize_values(v[:, :, :t_q], bits)
    k_res, v_res = k[:, :, t_q:].clone(), v[:, :, t_q:].clone()
    for i in range(b):
        lq, lr = int(lengths_q[i]), int(lengths_res[i])
        for t in (ks, kz):
            t[i, :, lq // group:] = float("nan")
        for t in (vs, vz):
            t[i, :, lq:] = float("nan")
        k_res[i, :, lr:] = float("nan")
        v_res[i, :, lr:] = float("nan")
    return dict(k=k, v=v, args=(kc, ks, kz, vc, vs, vz, k_res, v_res, lengths_q.int(), lengths_res.int()))


def reference(q, cache, bits, group, softmax_scale=None):
    """attention_ref over the cache's dequantized tokens (numpy model) and its window."""
    d = q.shape[-1]
    kc, ks, kz, vc, vs, vz, k_res, v_res, lq, lr = cache["args"]
    kd, vd = dequantize_keys_ref(kc, ks, kz, bits, group), dequantize_values_ref(vc, vs, vz, bits, d)
    scale = 1 / math.sqrt(d) if softmax_scale is None else softmax_scale
    return attention_ref(q.double(), kd, vd, k_res.double(), v_res.double(), lq.tolist(), lr.tolist(), scale)


def decode(q, cache, bits, group, softmax_scale=None):
    return quantized_attention_decode(q, *cache["args"], bits=bits, group_size=group, softmax_scale=softmax_scale)


def assert_attention_close(out: torch.Tensor, ref: np.ndarray, dtype=torch.float32):
    assert out.dtype == dtype and torch.isfinite(out).all()
    vmax = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(out.double().numpy() - ref).max())
    assert err <= ATT_TOL[dtype] * vmax, f"max error {err:.3g} (tolerance {ATT_TOL[dtype] * vmax:.3g})"


# ---------------------------------------------------------------------------------------------------------------
# quantization and dequantization


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("d", KV_HEAD_DIMS)
def test_quantize_keys_bit_exact(d, group, bits, dtype):
    k = key_data((2, 2, 2 * group, d), dtype, seed=d + group)
    codes, scale, zero = kv_quantize_keys(k, bits, group)
    ref_codes, ref_scale, ref_zero = quantize_keys_ref(k, bits, group)
    assert codes.dtype == torch.int32 and codes.shape == (2, 2, 2, d, group * bits // 32)
    np.testing.assert_array_equal(scale.numpy().view(np.uint16), ref_scale.view(np.uint16))
    np.testing.assert_array_equal(zero.numpy().view(np.uint16), ref_zero.view(np.uint16))
    np.testing.assert_array_equal(codes.numpy(), ref_codes)
    assert np.isfinite(zero.numpy()).all() and (scale.numpy() > 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("d", KV_HEAD_DIMS)
def test_quantize_values_bit_exact(d, bits, dtype):
    v = value_data((2, 3, 37, d), dtype, seed=d)
    codes, scale, zero = kv_quantize_values(v, bits)
    ref_codes, ref_scale, ref_zero = quantize_values_ref(v, bits)
    assert codes.shape == (2, 3, 37, -(-d // 32) * bits) and scale.shape == (2, 3, 37, -(-d // 32))
    np.testing.assert_array_equal(scale.numpy().view(np.uint16), ref_scale.view(np.uint16))
    np.testing.assert_array_equal(zero.numpy().view(np.uint16), ref_zero.view(np.uint16))
    np.testing.assert_array_equal(codes.numpy(), ref_codes)


def test_constant_and_zero_groups_use_the_floors():
    k = torch.zeros(1, 1, 32, 64)
    k[..., 1] = 3.0
    k[..., 2] = 1000.0
    _, scale, zero = kv_quantize_keys(k, 2, 32)
    assert scale[0, 0, 0, 0].item() == 2.0**-24 and zero[0, 0, 0, 0].item() == 0.0
    assert scale[0, 0, 0, 1].item() == np.float16(3.0 * 2**-14)
    assert abs(zero[0, 0, 0, 2].item()) <= 2**14 + 16  # the amax floor keeps the zero point in fp16 range
    deq = kv_dequantize_keys(*kv_quantize_keys(k, 4, 32), bits=4, group_size=32)
    torch.testing.assert_close(deq, k, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantize_keys_exact(group, bits, dtype):
    for d in (80, 128):
        k = key_data((2, 1, group * 3, d), torch.float32, seed=group)
        codes, scale, zero = kv_quantize_keys(k, bits, group)
        out = kv_dequantize_keys(codes, scale, zero, bits, group, dtype=dtype)
        ref = torch.from_numpy(dequantize_keys_ref(codes, scale, zero, bits, group)).to(dtype)
        assert out.dtype == dtype and torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("d", KV_HEAD_DIMS)
def test_dequantize_values_exact(d, bits, dtype):
    v = value_data((1, 2, 19, d), torch.float32, seed=d)
    codes, scale, zero = kv_quantize_values(v, bits)
    out = kv_dequantize_values(codes, scale, zero, bits, head_dim=d, dtype=dtype)
    ref = torch.from_numpy(dequantize_values_ref(codes, scale, zero, bits, d)).to(dtype)
    assert out.shape == v.shape and out.dtype == dtype and torch.equal(out, ref)


def test_numpy_in_numpy_out():
    k = key_data((1, 2, 64, 96), torch.float32, seed=5)
    codes, scale, zero = kv_quantize_keys(k.numpy(), 4, 64)
    assert all(isinstance(a, np.ndarray) for a in (codes, scale, zero))
    np.testing.assert_array_equal(codes, kv_quantize_keys(k, 4, 64)[0].numpy())
    deq = kv_dequantize_keys(codes, scale, zero, 4, 64)
    assert isinstance(deq, np.ndarray) and np.array_equal(deq, dequantize_keys_ref(codes, scale, zero, 4, 64))
    vc, vs, vz = kv_quantize_values(k.numpy(), 2)
    assert isinstance(vc, np.ndarray) and np.array_equal(vc, quantize_values_ref(k, 2)[0])
    deq = kv_dequantize_values(vc, vs, vz, 2, head_dim=96)
    assert isinstance(deq, np.ndarray) and np.array_equal(deq, dequantize_values_ref(vc, vs, vz, 2, 96))


def test_non_contiguous_inputs():
    k = key_data((1, 2, 64, 128), torch.float16, seed=6)
    strided = k.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous()
    for got, want in zip(kv_quantize_keys(strided, 2, 32), kv_quantize_keys(k, 2, 32)):
        assert torch.equal(got, want)
    for got, want in zip(kv_quantize_values(strided, 4), kv_quantize_values(k, 4)):
        assert torch.equal(got, want)


def test_uint32_codes_accepted():
    k = key_data((1, 1, 32, 64), torch.float32, seed=2)
    codes, scale, zero = kv_quantize_keys(k, 2, 32)
    out = kv_dequantize_keys(codes.view(torch.uint32), scale, zero, 2, 32)
    assert torch.equal(out, kv_dequantize_keys(codes, scale, zero, 2, 32))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [32, 128])
def test_streaming_equals_one_shot(group, bits):
    k = key_data((2, 2, 4 * group, 128), torch.float16, seed=3)
    v = value_data((2, 2, 4 * group, 128), torch.float16, seed=4)
    parts = [kv_quantize_keys(k[:, :, i:i + group], bits, group) for i in range(0, k.shape[2], group)]
    for streamed, whole in zip(zip(*parts), kv_quantize_keys(k, bits, group)):
        assert torch.equal(torch.cat(streamed, dim=2), whole)
    cuts = [0, 1, 8, 9, 40, 4 * group]  # values are per token: any chunking
    parts = [kv_quantize_values(v[:, :, a:b], bits) for a, b in zip(cuts, cuts[1:])]
    for streamed, whole in zip(zip(*parts), kv_quantize_values(v, bits)):
        assert torch.equal(torch.cat(streamed, dim=2), whole)


def test_empty_inputs():
    codes, scale, zero = kv_quantize_keys(torch.randn(2, 2, 0, 64), 2, 32)
    assert codes.shape == (2, 2, 0, 64, 2) and scale.shape == (2, 2, 0, 64)
    assert kv_dequantize_keys(codes, scale, zero, 2, 32).shape == (2, 2, 0, 64)
    codes, scale, zero = kv_quantize_values(torch.randn(2, 2, 0, 80), 4)
    assert codes.shape == (2, 2, 0, 12) and kv_dequantize_values(codes, scale, zero, 4, head_dim=80).shape[2] == 0


@given(seed=st.integers(0, 2**31 - 1), exponent=st.integers(-30, 12), d=st.sampled_from(KV_HEAD_DIMS),
       group=st.sampled_from([32, 64, 128]), bits=st.sampled_from([2, 4]), dtype=st.sampled_from(DTYPES))
def test_property_quantization_bit_exact_and_bounded(seed, exponent, d, group, bits, dtype):
    rng = np.random.default_rng(seed)
    shape = (1, 1, group, d)
    x = rng.standard_normal(shape) * 2.0**exponent * rng.lognormal(0, 1, d) + rng.standard_normal(d) * 2.0**exponent
    x = torch.from_numpy(np.clip(x, -6e4, 6e4).astype(F32)).to(dtype)
    codes, scale, zero = kv_quantize_keys(x, bits, group)
    for got, want in zip((codes, scale, zero), quantize_keys_ref(x, bits, group)):
        np.testing.assert_array_equal(got.numpy().view(want.dtype), want)
    # |x - x^| <= scale * (1/2 + the fp16 rounding of the zero point) + what the fp16 scale's (2^b - 1) steps do not
    # cover of the range (subnormal scales), plus fp32 rounding of x / scale + zero
    xf = x.float().numpy().astype(np.float64)
    err = np.abs(kv_dequantize_keys(codes, scale, zero, bits, group).numpy() - xf).max(2)
    s, z = scale.numpy()[:, :, 0].astype(np.float64), zero.numpy()[:, :, 0]
    uncovered = np.maximum(0, xf.max(2) - xf.min(2) - (2**bits - 1) * s)
    bound = s * (0.51 + np.spacing(np.abs(z)).astype(np.float64) / 2) + uncovered + 1e-6 * np.abs(xf).max(2)
    assert (err <= bound).all()
    vc, vs, vz = kv_quantize_values(x, bits)
    for got, want in zip((vc, vs, vz), quantize_values_ref(x, bits)):
        np.testing.assert_array_equal(got.numpy().view(want.dtype), want)


# ---------------------------------------------------------------------------------------------------------------
# decode attention

RAGGED_Q = [256, 0, 128, 0, 64]  # full cache, window only, no window, nothing at all, partial
RAGGED_RES = [40, 37, 0, 0, 1]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("d", KV_HEAD_DIMS)
def test_attention_matches_dequantized_reference(d, group, bits):
    lengths_q = [x - x % group for x in RAGGED_Q]
    cache = make_cache(5, 2, 256, 40, d, bits, group, lengths_q=lengths_q, lengths_res=RAGGED_RES, seed=d)
    q = randn(5, 4, d, seed=group + bits)
    out = decode(q, cache, bits, group)
    assert_attention_close(out, reference(q, cache, bits, group))
    assert torch.equal(out[3], torch.zeros(4, d))  # an empty sequence gets zeros


@pytest.mark.parametrize("rep", [1, 2, 4, 7])
def test_attention_gqa(rep):
    cache = make_cache(3, 2, 128, 20, 128, 4, 32, lengths_q=[128, 64, 32], lengths_res=[20, 3, 0], seed=rep)
    q = randn(3, 2 * rep, 128, seed=rep)
    assert_attention_close(decode(q, cache, 4, 32), reference(q, cache, 4, 32))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_q_dtypes(dtype, bits):
    cache = make_cache(4, 2, 128, 48, 96, bits, 64, dtype, lengths_q=[128, 0, 64, 128], lengths_res=[48, 9, 0, 17])
    q = randn(4, 8, 96, seed=bits, dtype=dtype)
    out = decode(q, cache, bits, 64)
    assert_attention_close(out, reference(q, cache, bits, 64), dtype)


def test_attention_softmax_scale():
    cache = make_cache(2, 2, 64, 16, 64, 2, 32, seed=1)
    q = randn(2, 4, 64, seed=1)
    default = decode(q, cache, 2, 32)
    assert torch.equal(default, decode(q, cache, 2, 32, softmax_scale=1 / 8))
    sharp = decode(q, cache, 2, 32, softmax_scale=0.7)
    assert_attention_close(sharp, reference(q, cache, 2, 32, 0.7))
    assert (sharp - default).abs().max() > 0.05


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("b, h_kv", [(1, 1), (3, 2)])
def test_attention_long_sequence(b, h_kv, bits):
    """2048 cache tokens: the online softmax runs over many blocks (split over threads when b * h_kv is small)."""
    cache = make_cache(b, h_kv, 2048, 100, 128, bits, 64, lengths_res=[100] * (b - 1) + [77], seed=7)
    q = randn(b, 4 * h_kv, 128, seed=b)
    assert_attention_close(decode(q, cache, bits, 64), reference(q, cache, bits, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_large_scores_are_stable(dtype):
    """q scaled by 100: scores in the hundreds overflow exp() without the running maximum."""
    cache = make_cache(2, 2, 256, 33, 64, 4, 32, dtype, lengths_q=[256, 0], lengths_res=[33, 33], seed=9)
    q = randn(2, 4, 64, seed=9, scale=100.0, dtype=dtype)
    scores = np.einsum("hd,hnd->hn", q[1, ::2].double().numpy(), cache["k"][1, :, 256:].double().numpy()) / 8
    assert scores.max() > 100  # exp(100) overflows float32
    assert_attention_close(decode(q, cache, 4, 32), reference(q, cache, 4, 32), dtype)


def test_attention_zero_capacity_gives_zeros():
    cache = make_cache(2, 1, 0, 0, 80, 2, 32)
    out = decode(randn(2, 3, 80), cache, 2, 32)
    assert torch.equal(out, torch.zeros(2, 3, 80))


@pytest.mark.parametrize("bits, mean_cos, worst_cos, max_rel", [(2, 0.8, 0.6, 0.55), (4, 0.98, 0.95, 0.15)])
def test_attention_close_to_unquantized(bits, mean_cos, worst_cos, max_rel):
    """Against the original float cache: quantization error only. Over 8 seeds the cosine similarity of the 64 head
    outputs to the unquantized ones is 0.87-0.88 on average (worst head 0.76) at 2 bits and 0.994 (0.99) at 4 bits,
    the relative error 0.40-0.44 and 0.08; a kernel misreading codes, scales or zeros lands far below."""
    cache = make_cache(4, 4, 512, 32, 128, bits, 32, seed=11)
    q = randn(4, 16, 128, seed=11)
    k, v = cache["k"], cache["v"]
    ref = attention_ref(q, k[:, :, :512], v[:, :, :512], k[:, :, 512:], v[:, :, 512:], [512] * 4, [32] * 4,
                        1 / math.sqrt(128))
    out = decode(q, cache, bits, 32).double().numpy()
    cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.mean() > mean_cos and cos.min() > worst_cos, f"cosine similarity {cos.mean():.4f}, {cos.min():.4f}"
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < max_rel, f"relative error {rel:.3f}"


def test_window_only_is_exact_attention():
    cache = make_cache(2, 2, 64, 50, 256, 2, 32, lengths_q=[0, 0], lengths_res=[50, 13], seed=13)
    q = randn(2, 2, 256, seed=13)
    k, v = cache["k"], cache["v"]
    ref = attention_ref(q, k[:, :, :0], v[:, :, :0], k[:, :, 64:], v[:, :, 64:], [0, 0], [50, 13], 1 / 16)
    assert_attention_close(decode(q, cache, 2, 32), ref)


def test_attention_numpy_and_int64_lengths():
    cache = make_cache(2, 1, 64, 8, 64, 4, 32, lengths_q=[64, 32], lengths_res=[8, 2], seed=3)
    q = randn(2, 2, 64, seed=3)
    args = [a.numpy() for a in cache["args"][:8]] + [a.long() for a in cache["args"][8:]]
    out = quantized_attention_decode(q.numpy(), *args, bits=4, group_size=32)
    assert isinstance(out, np.ndarray) and np.array_equal(out, decode(q, cache, 4, 32).numpy())


@given(data=st.data(), d=st.sampled_from(KV_HEAD_DIMS), group=st.sampled_from([32, 64]),
       bits=st.sampled_from([2, 4]), rep=st.sampled_from([1, 2, 3, 4]), h_kv=st.integers(1, 2))
def test_property_attention_ragged(data, d, group, bits, rep, h_kv):
    b = data.draw(st.integers(1, 3))
    tg, r = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 20))
    lengths_q = data.draw(st.lists(st.integers(0, tg).map(lambda n: n * group), min_size=b, max_size=b))
    lengths_res = data.draw(st.lists(st.integers(0, r), min_size=b, max_size=b))
    cache = make_cache(b, h_kv, tg * group, r, d, bits, group, lengths_q=lengths_q, lengths_res=lengths_res,
                       seed=data.draw(st.integers(0, 1000)))
    q = randn(b, h_kv * rep, d, seed=data.draw(st.integers(0, 1000)))
    out = decode(q, cache, bits, group)
    assert_attention_close(out, reference(q, cache, bits, group))
    for i in range(b):
        if lengths_q[i] + lengths_res[i] == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))


def test_torch_compile_fullgraph():
    cache = make_cache(2, 2, 64, 24, 64, 4, 32, lengths_q=[64, 32], lengths_res=[24, 5], seed=21)
    k_res, v_res, lq, lr = cache["args"][6:]
    k, v = cache["k"][:, :, :64], cache["v"][:, :, :64]

    def f(q, k, v):
        kc, ks, kz = kv_quantize_keys(k, 4, 32)
        vc, vs, vz = kv_quantize_values(v, 4)
        out = quantized_attention_decode(q * 2.0, kc, ks, kz, vc, vs, vz, k_res, v_res, lq, lr, bits=4,
                                         group_size=32)
        deq = kv_dequantize_keys(kc, ks, kz, 4, 32) + kv_dequantize_values(vc, vs, vz, 4, head_dim=64)
        return out + 1.0, deq.sum(2)

    q = randn(2, 4, 64, seed=21)
    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(q, k, v), f(q, k, v)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------------
# errors


def small_cache():
    return make_cache(2, 2, 64, 8, 64, 2, 32, lengths_q=[64, 32], lengths_res=[8, 0])


def call_with(cache, q=None, **changes):
    names = ["k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res", "v_res", "lengths_q",
             "lengths_res"]
    kwargs = dict(zip(names, cache["args"]))
    kwargs.update(changes)
    q = torch.randn(2, 4, 64) if q is None else q
    return quantized_attention_decode(q, bits=kwargs.pop("bits", 2), group_size=kwargs.pop("group_size", 32),
                                      **kwargs)


def test_quantize_errors():
    with pytest.raises(ValueError, match=r"head dimension \(last dim of k\).*got 72"):
        kv_quantize_keys(torch.randn(1, 1, 32, 72))
    with pytest.raises(ValueError, match=r"head dimension \(last dim of v\).*got 72"):
        kv_quantize_values(torch.randn(1, 1, 3, 72))
    with pytest.raises(ValueError, match="token count of k .* multiple of group_size 64, got 96"):
        kv_quantize_keys(torch.randn(1, 1, 96, 64), 2, 64)
    for fn in (lambda: kv_quantize_keys(torch.randn(1, 1, 32, 64), 3),
               lambda: kv_quantize_values(torch.randn(1, 1, 1, 64), 3),
               lambda: kv_quantize_keys(torch.randn(1, 1, 32, 64), True)):
        with pytest.raises(ValueError, match="bits must be 2 or 4"):
            fn()
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128, got 16"):
        kv_quantize_keys(torch.randn(1, 1, 32, 64), 2, 16)
    with pytest.raises(TypeError, match="k must have dtype float32, float16 or bfloat16, got torch.float64"):
        kv_quantize_keys(torch.randn(1, 1, 32, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="v must have dtype"):
        kv_quantize_values(torch.ones(1, 1, 1, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"k must have shape \[B, H, T, D\], got \[32, 64\]"):
        kv_quantize_keys(torch.randn(32, 64))
    with pytest.raises(TypeError, match="k must be a torch.Tensor or numpy.ndarray, got list"):
        kv_quantize_keys([[[[0.0] * 64] * 32]])


def test_dequantize_errors():
    codes, scale, zero = kv_quantize_keys(torch.randn(1, 2, 64, 64), 2, 32)
    with pytest.raises(ValueError, match=r"codes must have shape \[1, 2, 2, 64, 4\]"):
        kv_dequantize_keys(codes, scale, zero, 4, 32)  # 2-bit codes read as 4-bit
    with pytest.raises(ValueError, match=r"codes must have shape \[1, 2, 1, 64, 4\]"):
        kv_dequantize_keys(codes, scale[:, :, :1], zero[:, :, :1], 2, 64)
    with pytest.raises(TypeError, match="scale must have dtype torch.float16"):
        kv_dequantize_keys(codes, scale.float(), zero, 2, 32)
    with pytest.raises(TypeError, match="codes must have dtype"):
        kv_dequantize_keys(codes.long(), scale, zero, 2, 32)
    with pytest.raises(ValueError, match="zero must have shape"):
        kv_dequantize_keys(codes, scale, zero[:, :1], 2, 32)
    with pytest.raises(TypeError, match="dtype must be torch.float32, torch.float16 or torch.bfloat16"):
        kv_dequantize_keys(codes, scale, zero, 2, 32, dtype=torch.float64)
    vc, vs, vz = kv_quantize_values(torch.randn(1, 2, 5, 80), 2)
    with pytest.raises(ValueError, match=r"codes must have shape \[1, 2, 5, 8\]"):
        kv_dequantize_values(vc, vs, vz, 2, head_dim=128)
    with pytest.raises(ValueError, match=r"head dimension \(last dim of the output \(head_dim\)\).*got 72"):
        kv_dequantize_values(vc, vs, vz, 2, head_dim=72)
    with pytest.raises(ValueError, match="bits must be 2 or 4, got 3"):
        kv_dequantize_values(vc, vs, vz, 3, head_dim=80)


def test_attention_shape_and_dtype_errors():
    cache = small_cache()
    kc, ks, kz, vc, vs, vz, k_res, v_res, lq, lr = cache["args"]
    cases = [
        (ValueError, r"head dimension \(last dim of q\).*got 72", dict(q=torch.randn(2, 4, 72))),
        (ValueError, r"query heads \(dim 1 of q, 3\) must be a multiple of the kv heads \(dim 1 of k_codes, 2\)",
         dict(q=torch.randn(2, 3, 64))),
        (ValueError, r"k_codes must have shape \[3, 2, 2, 64, 2\]", dict(q=torch.randn(3, 4, 64))),
        (ValueError, r"k_codes must have shape \[2, 2, 2, 64, 4\]", dict(bits=4)),
        (ValueError, r"k_codes must have shape \[2, 2, 2, 64, 4\], got \[2, 2, 2, 64, 2\]", dict(group_size=64)),
        (ValueError, r"v_codes must have shape \[2, 2, 64, 4\]", dict(v_codes=vc[:, :, :32])),
        (ValueError, r"v_scale must have shape", dict(v_scale=vs[:, :1])),
        (ValueError, r"k_zero must have shape", dict(k_zero=kz[..., :32])),
        (ValueError, r"v_res must have shape \[2, 2, 8, 64\]", dict(v_res=v_res[:, :, :4])),
        (ValueError, r"k_res must have shape \[B, H_kv, R, D\]", dict(k_res=k_res[0])),
        (ValueError, r"lengths_q must have shape \[2\]", dict(lengths_q=torch.tensor([64, 32, 0]))),
        (TypeError, r"k_res must have dtype torch.float32", dict(k_res=k_res.half())),
        (TypeError, r"q must have dtype float32, float16 or bfloat16", dict(q=torch.randn(2, 4, 64).double())),
        (TypeError, r"k_scale must have dtype torch.float16", dict(k_scale=ks.float())),
        (TypeError, r"v_codes must have dtype", dict(v_codes=vc.to(torch.int16))),
        (TypeError, r"lengths_res must have an integer dtype", dict(lengths_res=lr.float())),
        (ValueError, r"bits must be 2 or 4, got 3", dict(bits=3)),
        (ValueError, r"group_size must be 32, 64 or 128, got 48", dict(group_size=48)),
    ]
    for exc, pattern, changes in cases:
        with pytest.raises(exc, match=pattern):
            call_with(cache, **changes)


@pytest.mark.parametrize("lengths_q, lengths_res, pattern", [
    ([64, 33], [8, 0], r"lengths_q\[1\] must be a multiple of group_size 32 in \[0, 64\].*got 33"),
    ([96, 32], [8, 0], r"lengths_q\[0\] must be a multiple of group_size 32 in \[0, 64\].*got 96"),
    ([-32, 32], [8, 0], r"lengths_q\[0\] .* got -32"),
    ([64, 32], [8, 9], r"lengths_res\[1\] must be in \[0, 8\] \(the window capacity R\), got 9"),
    ([64, 32], [-1, 0], r"lengths_res\[0\] must be in \[0, 8\].*got -1"),
])
def test_attention_length_errors(lengths_q, lengths_res, pattern):
    with pytest.raises(ValueError, match=pattern):
        call_with(small_cache(), lengths_q=torch.tensor(lengths_q), lengths_res=torch.tensor(lengths_res))


def test_attention_int64_length_beyond_int32_is_rejected():
    """2^32 + 64 must not wrap to 64 in the conversion of int64 lengths to int32."""
    with pytest.raises(ValueError, match="lengths_q"):
        call_with(small_cache(), lengths_q=torch.tensor([2**32 + 64, 32]))


def test_binding_checks_buffers():
    """The native module checks the buffers it is handed, independently of the Python layer."""
    k = torch.randn(1, 1, 32, 64)
    codes, scale, zero = (t.contiguous() for t in kv_quantize_keys(k, 2, 32))
    with pytest.raises(ValueError, match="kv_quantize_keys: .*codes"):
        _C.kv_quantize_keys(to_dlpack(k), to_dlpack(codes[..., :1].contiguous()), to_dlpack(scale),
                            to_dlpack(zero), 2, 32, 0)
    with pytest.raises(TypeError, match="kv_quantize_keys: .*scale"):
        _C.kv_quantize_keys(to_dlpack(k), to_dlpack(codes), to_dlpack(scale.float()), to_dlpack(zero), 2, 32, 0)
    with pytest.raises(ValueError, match="kv_dequantize_keys: out must be contiguous"):
        _C.kv_dequantize_keys(to_dlpack(codes), to_dlpack(scale), to_dlpack(zero),
                              to_dlpack(torch.empty(1, 1, 64, 32).transpose(2, 3)), 2, 32, 0)


# ---------------------------------------------------------------------------------------------------------------
# CUDA vs CPU


def to_cuda(cache):
    return dict(cache, args=tuple(to_gpu(a) for a in cache["args"]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("d", KV_HEAD_DIMS)
def test_cuda_quantize_dequantize_match_cpu(d, group, bits, dtype):
    k = key_data((2, 3, 3 * group, d), dtype, seed=d)
    v = value_data((2, 3, 3 * group + 5, d), dtype, seed=d)
    with cpu_reference():
        kq, vq = kv_quantize_keys(k, bits, group), kv_quantize_values(v, bits)
        k_cpu = kv_dequantize_keys(*kq, bits, group, dtype=dtype)
        v_cpu = kv_dequantize_values(*vq, bits, head_dim=d, dtype=dtype)
    for cpu, gpu in zip(kq, kv_quantize_keys(to_gpu(k), bits, group)):
        assert on_gpu(gpu) and torch.equal(gpu.cpu(), cpu)
    for cpu, gpu in zip(vq, kv_quantize_values(to_gpu(v), bits)):
        assert on_gpu(gpu) and torch.equal(gpu.cpu(), cpu)
    out = kv_dequantize_keys(*(to_gpu(t) for t in kq), bits, group, dtype=dtype)
    assert torch.equal(out.cpu(), k_cpu)
    out = kv_dequantize_values(*(to_gpu(t) for t in vq), bits, head_dim=d, dtype=dtype)
    assert torch.equal(out.cpu(), v_cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("d", KV_HEAD_DIMS)
def test_cuda_attention_matches_cpu(d, bits, dtype):
    for group, rep in ((32, 1), (64, 4), (128, 12)):  # 12 query heads per kv head: two CUDA head tiles
        lengths_q = [x - x % group for x in RAGGED_Q]
        q = randn(5, 2 * rep, d, seed=rep, dtype=dtype)
        with cpu_reference():
            cache = make_cache(5, 2, 256, 40, d, bits, group, dtype, lengths_q, RAGGED_RES, seed=d + rep)
            cpu = decode(q, cache, bits, group)
        gpu = decode(to_gpu(q), to_cuda(cache), bits, group)
        assert on_gpu(gpu)
        ref = reference(q, cache, bits, group)
        assert_attention_close(gpu.cpu(), ref, dtype)
        assert_attention_close(cpu, gpu.cpu().double().numpy(), dtype)
        assert torch.equal(gpu[3].cpu(), torch.zeros(2 * rep, d, dtype=dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("b, h_kv, rep", [(1, 1, 8), (2, 8, 4)])
def test_cuda_attention_long_context_split_k(b, h_kv, rep, bits):
    """16k cache tokens: the CUDA decode splits the sequence over blocks and merges the splits by log-sum-exp."""
    from lowbit.ops._native import _C  # the module the ops call (the emulated kernels' under emulation)
    assert _C.kv_decode_splits(b, h_kv, h_kv * rep, 16384 + 128, sm_count()) > 1
    q = randn(b, h_kv * rep, 128, seed=b, dtype=torch.float16)
    with cpu_reference():
        cache = make_cache(b, h_kv, 16384, 128, 128, bits, 128, torch.float16, lengths_q=[16384, 8192][:b],
                           lengths_res=[128, 71][:b], seed=17)
        cpu = decode(q, cache, bits, 128)
    gpu = decode(to_gpu(q), to_cuda(cache), bits, 128).cpu()
    assert_attention_close(gpu, reference(q, cache, bits, 128), torch.float16)
    assert_attention_close(gpu, cpu.double().numpy(), torch.float16)


@pytest.mark.gpu
def test_cuda_attention_large_scores_are_stable():
    with cpu_reference():
        cache = make_cache(2, 2, 4096, 33, 64, 4, 32, torch.bfloat16, lengths_q=[4096, 0], lengths_res=[33, 33],
                           seed=9)
    q = randn(2, 4, 64, seed=9, scale=100.0, dtype=torch.bfloat16)
    gpu = decode(to_gpu(q), to_cuda(cache), 4, 32).cpu()
    assert_attention_close(gpu, reference(q, cache, 4, 32), torch.bfloat16)


@pytest.mark.gpu
def test_cuda_attention_zero_capacity_gives_zeros():
    with cpu_reference():
        cache = make_cache(2, 1, 0, 0, 128, 4, 64, torch.float16)
    out = decode(to_gpu(randn(2, 4, 128, dtype=torch.float16)), to_cuda(cache), 4, 64)
    assert on_gpu(out) and torch.equal(out.cpu(), torch.zeros(2, 4, 128, dtype=torch.float16))


@pytest.mark.gpu
def test_cuda_attention_clamps_out_of_range_lengths():
    """Device lengths are not read back: out-of-range ones are clamped to the capacity (documented)."""
    with cpu_reference():
        cache = make_cache(3, 2, 128, 16, 64, 2, 32, lengths_q=[128, 0, 64], lengths_res=[16, 0, 5], seed=4)
    kc, ks, kz, vc, vs, vz, k_res, v_res, _, _ = to_cuda(cache)["args"]
    q = randn(3, 4, 64, seed=4)
    bad_q, bad_res = to_gpu(torch.tensor([1000, -5, 64])), to_gpu(torch.tensor([99, -1, 5]))
    gpu = quantized_attention_decode(to_gpu(q), kc, ks, kz, vc, vs, vz, k_res, v_res, bad_q, bad_res, 2, 32).cpu()
    assert torch.equal(gpu[1], torch.zeros(4, 64))
    assert_attention_close(gpu, reference(q, cache, 2, 32))
