"""The pack family (lowbit.ops.pack): pack_uniform / unpack, dequantize_uniform / dequantize_lut, the mixed 2/4-bit
layout, nf_table and the words-per-row helpers, each against an independent numpy reference (a row is one
little-endian bit stream, built with np.packbits); shapes, dtypes, numpy in/out, int32/uint32 words, hypothesis
properties, errors, non-contiguous input, torch.compile, and CUDA against CPU."""
import math
import zlib

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.dlpack import to_dlpack

from lowbit import _C
from lowbit.ops import (dequantize_lut, dequantize_mixed, dequantize_uniform, mixed_words_per_row, nf_table,
                        pack_mixed, pack_uniform, unpack, unpack_mixed, words_per_row)

from gpu_device import EMULATED, GPU, cpu_reference, current_stream_handle, gpu_stream, on_gpu, to_gpu

KS = [1, 31, 32, 33, 100, 129, 576]
NS = [1, 3, 17]
BITS = [2, 3, 4]
GROUP_SIZES = [32, 64, 128]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Unit roundoff of storing an fp32 result in the output dtype, and half its smallest subnormal.
STORE_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
HALF_SUBNORMAL = {torch.float32: 0.0, torch.float16: 2.0**-25, torch.bfloat16: 0.0}
# QLoRA's published NF4 table (bitsandbytes).
NF4_QLORA = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
             1.0]


# ---------------------------------------------------------------- references

def ref_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint32 [N, ceil(K/32)*bits]: row n's codes as one little-endian bit stream, code i at bits [i*b, i*b+b),
    zero-padded to whole 32-code blocks (so block j is `bits` consecutive words)."""
    n, k = q.shape
    padded = np.zeros((n, -(-k // 32) * 32), dtype=np.uint8)
    padded[:, :k] = q
    stream = (padded[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # [N, Kp, bits]: stream bit i*bits + t
    return np.packbits(stream.reshape(n, -1), axis=1, bitorder="little").view("<u4")


def ref_unpack(words: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The first k codes of each row of canonical words (any integer dtype of 32 bits)."""
    stream = np.unpackbits(np.ascontiguousarray(words).astype("<u4").view(np.uint8), axis=1, bitorder="little")
    stream = stream.reshape(words.shape[0], -1, bits).astype(np.uint8)
    return (stream << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)[:, :k]


def group_slices(k: int, group_size: int) -> list:
    return [slice(g, min(k, g + group_size)) for g in range(0, k, group_size)]


def ref_pack_mixed(q: np.ndarray, group_bits, group_size: int) -> np.ndarray:
    """The mixed layout: each K-group packed with its own width, groups concatenated along the row."""
    return np.concatenate([ref_pack(q[:, s], b) for s, b in zip(group_slices(q.shape[1], group_size), group_bits)],
                          axis=1)


def ref_unpack_mixed(words: np.ndarray, group_bits, group_size: int, k: int) -> np.ndarray:
    parts, start = [], 0
    for s, b in zip(group_slices(k, group_size), group_bits):
        width = -(-(s.stop - s.start) // 32) * b
        parts.append(ref_unpack(words[:, start:start + width], b, s.stop - s.start))
        start += width
    assert start == words.shape[1]
    return np.concatenate(parts, axis=1)


def per_column(params: np.ndarray, group_size: int, k: int) -> np.ndarray:
    """Per-group parameters [N, G] spread to [N, k] in float64."""
    return np.repeat(params.astype(np.float64), group_size, axis=1)[:, :k]


def ref_affine(q, scales, zeros, group_size):
    """(w, magnitude): w = scale * (q - zero) in float64 and |scale| * (q + |zero|), which bounds fp32 error."""
    k = q.shape[1]
    s, z = per_column(scales, group_size, k), per_column(zeros, group_size, k)
    return s * (q - z), np.abs(s) * (q + np.abs(z))


def ref_lut(q, scales, table, group_size):
    w = per_column(scales, group_size, q.shape[1]) * table.astype(np.float64)[q]
    return w, np.abs(w)


def assert_dequantized(out, ref: np.ndarray, magnitude: np.ndarray, dtype: torch.dtype):
    """out (tensor or array) is the fp32 arithmetic result (at most 4 fp32 roundoffs of `magnitude` off the float64
    reference) stored once in `dtype` with round to nearest."""
    out = torch.as_tensor(out)
    assert out.dtype == dtype and tuple(out.shape) == ref.shape
    fp32_err = 4 * 2.0**-24 * magnitude
    bound = STORE_ROUNDOFF[dtype] * (np.abs(ref) + fp32_err) + fp32_err + HALF_SUBNORMAL[dtype]
    err = np.abs(out.double().numpy() - ref)
    bad = err > bound
    assert not bad.any(), f"{bad.sum()} values off, first at {np.argwhere(bad)[0]}: err {err[bad][0]:.3g}"


# ---------------------------------------------------------------- inputs

def rng_for(*key) -> np.random.Generator:
    """A generator seeded by the test's parameters (crc32: stable across processes, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def random_codes(rng, n: int, k: int, bits: int) -> np.ndarray:
    return rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)


def random_mixed_codes(rng, n: int, k: int, group_bits, group_size: int) -> np.ndarray:
    widths = np.repeat(np.asarray(group_bits), group_size)[:k]
    return (rng.integers(0, 256, size=(n, k)) % (1 << widths)).astype(np.uint8)


def random_words(rng, n: int, width: int) -> np.ndarray:
    return rng.integers(0, 2**32, size=(n, width), dtype=np.uint32)


def random_params(rng, n: int, groups: int, bits: int):
    """fp16 scales (either sign) and fractional zeros, [n, groups] each."""
    scales = rng.uniform(0.01, 1.0, (n, groups)) * rng.choice([-1.0, 1.0], (n, groups))
    zeros = rng.uniform(-1.0, 1 << bits, (n, groups))
    return scales.astype(np.float16), zeros.astype(np.float16)


def random_table(rng, bits: int) -> np.ndarray:
    return np.sort(rng.uniform(-3.0, 3.0, 1 << bits)).astype(np.float32)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def re_escape(s: str) -> str:
    return s.replace("[", r"\[").replace("]", r"\]")


def words_u32(packed) -> np.ndarray:
    return torch.as_tensor(packed).view(torch.uint32).numpy()


# ---------------------------------------------------------------- words per row

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", KS + [1000, 4096])
def test_words_per_row(k, bits):
    assert words_per_row(k, bits) == math.ceil(k / 32) * bits == _C.words_per_row(k, bits)


@pytest.mark.parametrize("k,group_bits,group_size,words", [
    (100, [2, 4], 64, 2 * 2 + 2 * 4),
    (129, [4, 2, 2, 4, 2], 32, 4 + 2 + 2 + 4 + 2),
    (1, [4], 128, 4),
    (576, [2, 4, 2, 4, 4], 128, 8 + 16 + 8 + 16 + 8),  # last group 64 codes: 2 blocks
    (33, [2], 64, 4),
])
def test_mixed_words_per_row(k, group_bits, group_size, words):
    assert mixed_words_per_row(k, group_bits, group_size) == words
    assert mixed_words_per_row(k, np.array(group_bits), group_size) == words
    assert mixed_words_per_row(k, torch.tensor(group_bits, dtype=torch.uint8), group_size) == words


# ---------------------------------------------------------------- uniform packing

def test_reference_packer_by_hand():
    """The reference packer against words written out by hand, including the 3-bit codes that straddle words."""
    q = np.zeros((1, 32), np.uint8)
    q[0, 10] = 7  # 3 bits at 30..32: word 0 bits 30, 31 and word 1 bit 0
    np.testing.assert_array_equal(ref_pack(q, 3), [[0xC0000000, 0x1, 0x0]])
    q[0, 10], q[0, 21] = 0, 5  # 3 bits at 63..65: word 1 bit 31 (1), word 2 bits 0..1 (0b10)
    np.testing.assert_array_equal(ref_pack(q, 3), [[0x0, 0x80000000, 0x2]])
    np.testing.assert_array_equal(ref_pack(np.array([[1, 2, 3]], np.uint8), 2), [[0b111001, 0]])
    q4 = np.zeros((1, 40), np.uint8)
    q4[0, 7], q4[0, 8], q4[0, 39] = 8, 1, 15
    np.testing.assert_array_equal(ref_pack(q4, 4), [[0x80000000, 0x1, 0, 0, 0xF0000000, 0, 0, 0]])


@pytest.mark.parametrize("bits", BITS)
def test_straddling_codes_by_hand(bits):
    """pack_uniform puts the all-ones code at every position i at bits [i*b, i*b+b) of the block."""
    q = torch.diag(torch.full((32,), (1 << bits) - 1, dtype=torch.uint8))  # row i: code i set
    words = words_u32(pack_uniform(q, bits)).astype("<u4")
    for i in range(32):
        assert int.from_bytes(words[i].tobytes(), "little") == ((1 << bits) - 1) << (i * bits), f"code {i}"


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_reference(bits, k, n):
    q = random_codes(rng_for("pack", bits, k, n), n, k, bits)
    packed = pack_uniform(t(q), bits)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (n, words_per_row(k, bits))
    np.testing.assert_array_equal(words_u32(packed), ref_pack(q, bits))
    np.testing.assert_array_equal(unpack(packed, bits, k).numpy(), q)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("bits", BITS)
def test_unpack_arbitrary_words(bits, k):
    """unpack reads any words (padding bits set too) exactly as the reference does."""
    words = random_words(rng_for("words", bits, k), 3, words_per_row(k, bits))
    codes = unpack(t(words), bits, k)
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (3, k)
    np.testing.assert_array_equal(codes.numpy(), ref_unpack(words, bits, k))
    np.testing.assert_array_equal(unpack(t(words).view(torch.int32), bits, k).numpy(), codes.numpy())


@pytest.mark.parametrize("bits", BITS)
def test_extreme_codes(bits):
    """All-zero and all-max rows, and padding past K left zero."""
    q = np.stack([np.zeros(45, np.uint8), np.full(45, (1 << bits) - 1, np.uint8)])
    packed = words_u32(pack_uniform(t(q), bits))
    np.testing.assert_array_equal(packed, ref_pack(q, bits))
    assert not packed[0].any()
    np.testing.assert_array_equal(ref_unpack(packed, bits, 64)[:, 45:], 0)


# ---------------------------------------------------------------- dequantization

@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_uniform(bits, group_size, k):
    """Of arbitrary uint32 words (padding bits set too), decoded by the reference unpacker."""
    rng = rng_for("uniform", bits, group_size, k)
    words = random_words(rng, 3, words_per_row(k, bits))
    q = ref_unpack(words, bits, k)
    scales, zeros = random_params(rng, 3, math.ceil(k / group_size), bits)
    ref = ref_affine(q, scales, zeros, group_size)
    for dtype in DTYPES:
        out = dequantize_uniform(t(words), t(scales), t(zeros), bits, group_size, k, dtype)
        assert_dequantized(out, *ref, dtype)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_lut(bits, group_size, k):
    """With the NF table and random learned ones (one table per output dtype), of arbitrary int32 words."""
    rng = rng_for("lut", bits, group_size, k)
    words = random_words(rng, 3, words_per_row(k, bits))
    q = ref_unpack(words, bits, k)
    scales, _ = random_params(rng, 3, math.ceil(k / group_size), bits)
    for table, dtype in zip((nf_table(bits).numpy(), random_table(rng, bits), random_table(rng, bits)), DTYPES):
        out = dequantize_lut(t(words).view(torch.int32), t(scales), t(table), bits, group_size, k, dtype)
        assert_dequantized(out, *ref_lut(q, scales, table, group_size), dtype)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_rows(bits, n):
    """Every row uses its own scales and zeros (rows differ only in their parameters)."""
    rng = rng_for("rows", bits, n)
    q = np.repeat(random_codes(rng, 1, 129, bits), n, axis=0)
    scales, zeros = random_params(rng, n, 3, bits)
    packed = pack_uniform(t(q), bits)
    out = dequantize_uniform(packed, t(scales), t(zeros), bits, 64, 129, torch.float32)
    assert_dequantized(out, *ref_affine(q, scales, zeros, 64), torch.float32)
    out = dequantize_lut(packed, t(scales), nf_table(bits), bits, 64, 129, torch.float32)
    assert_dequantized(out, *ref_lut(q, scales, nf_table(bits).numpy(), 64), torch.float32)


def test_dequantize_default_dtype_is_float16():
    q = random_codes(rng_for("default"), 2, 64, 4)
    scales, zeros = random_params(rng_for("default"), 2, 1, 4)
    packed = pack_uniform(t(q), 4)
    assert dequantize_uniform(packed, t(scales), t(zeros), 4, 64, 64).dtype == torch.float16
    assert dequantize_lut(packed, t(scales), nf_table(4), 4, 64, 64).dtype == torch.float16


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_special_parameters(bits):
    """Zero scale gives zeros; an integer zero point gives exact integers times the scale."""
    q = random_codes(rng_for("special", bits), 2, 70, bits)
    packed = pack_uniform(t(q), bits)
    scales = np.array([[0.0, 0.0, 0.0], [1.0, 0.5, 2.0]], np.float16)
    zeros = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 2.0]], np.float16)
    out = dequantize_uniform(packed, t(scales), t(zeros), bits, 32, 70, torch.float32).numpy()
    assert not out[0].any()
    np.testing.assert_array_equal(out[1], ref_affine(q, scales, zeros, 32)[0][1])


# ---------------------------------------------------------------- int32 / uint32 words, numpy in and out

def test_uint32_and_int32_words_agree():
    rng = rng_for("u32")
    q = random_codes(rng, 3, 100, 3)
    scales, zeros = random_params(rng, 3, 2, 3)
    p32 = pack_uniform(t(q), 3)
    u32 = p32.view(torch.uint32)
    assert u32.dtype == torch.uint32
    assert torch.equal(unpack(u32, 3, 100), unpack(p32, 3, 100))
    args = (t(scales), t(zeros), 3, 64, 100, torch.float32)
    assert torch.equal(dequantize_uniform(u32, *args), dequantize_uniform(p32, *args))
    table = nf_table(3)
    assert torch.equal(dequantize_lut(u32, t(scales), table, 3, 64, 100, torch.float32),
                       dequantize_lut(p32, t(scales), table, 3, 64, 100, torch.float32))
    gb = [4, 2]
    qm = random_mixed_codes(rng, 3, 100, gb, 64)
    m32 = pack_mixed(t(qm), gb, 64)
    mu32 = m32.view(torch.uint32)
    assert torch.equal(unpack_mixed(mu32, gb, 64, 100), unpack_mixed(m32, gb, 64, 100))
    assert torch.equal(dequantize_mixed(mu32, t(scales), t(zeros), gb, 64, 100, torch.float32),
                       dequantize_mixed(m32, t(scales), t(zeros), gb, 64, 100, torch.float32))


@pytest.mark.parametrize("word_dtype", [np.int32, np.uint32])
def test_numpy_in_numpy_out(word_dtype):
    rng = rng_for("numpy", str(word_dtype))
    q = random_codes(rng, 3, 100, 2)
    scales, zeros = random_params(rng, 3, 4, 2)
    packed = pack_uniform(q, 2)
    assert isinstance(packed, np.ndarray) and packed.dtype == np.int32
    np.testing.assert_array_equal(packed.view(np.uint32), ref_pack(q, 2))
    words = packed.view(word_dtype)
    codes = unpack(words, 2, 100)
    assert isinstance(codes, np.ndarray) and codes.dtype == np.uint8
    np.testing.assert_array_equal(codes, q)
    for dtype, np_dtype in [(torch.float32, np.float32), (torch.float16, np.float16)]:
        out = dequantize_uniform(words, scales, zeros, 2, 32, 100, dtype)
        assert isinstance(out, np.ndarray) and out.dtype == np_dtype
        assert_dequantized(out, *ref_affine(q, scales, zeros, 32), dtype)
        table = nf_table(2).numpy()
        out = dequantize_lut(words, scales, table, 2, 32, 100, dtype)
        assert isinstance(out, np.ndarray) and out.dtype == np_dtype
        assert_dequantized(out, *ref_lut(q, scales, table, 32), dtype)
    gb = np.array([2, 4, 4, 2])
    qm = random_mixed_codes(rng, 3, 100, gb, 32)
    mixed = pack_mixed(qm, gb, 32)
    assert isinstance(mixed, np.ndarray) and mixed.dtype == np.int32
    np.testing.assert_array_equal(mixed.view(np.uint32), ref_pack_mixed(qm, gb, 32))
    codes = unpack_mixed(mixed.view(word_dtype), gb, 32, 100)
    assert isinstance(codes, np.ndarray)
    np.testing.assert_array_equal(codes, qm)
    out = dequantize_mixed(mixed.view(word_dtype), scales, zeros, gb, 32, 100, torch.float32)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert_dequantized(out, *ref_affine(qm, scales, zeros, 32), torch.float32)


# ---------------------------------------------------------------- mixed layout

@pytest.mark.parametrize("pattern", ["alternating", "random"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_mixed_matches_reference(group_size, k, pattern):
    """Widths 2, 4, 2, ... or random (one width throughout: test_mixed_with_one_width_is_the_uniform_layout)."""
    rng = rng_for("mixed", group_size, k, pattern)
    groups = math.ceil(k / group_size)
    gb = [2 + 2 * (g % 2) for g in range(groups)] if pattern == "alternating" else list(rng.choice([2, 4], groups))
    q = random_mixed_codes(rng, 3, k, gb, group_size)
    packed = pack_mixed(t(q), gb, group_size)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (3, mixed_words_per_row(k, gb, group_size))
    np.testing.assert_array_equal(words_u32(packed), ref_pack_mixed(q, gb, group_size))
    np.testing.assert_array_equal(unpack_mixed(packed, gb, group_size, k).numpy(), q)
    scales, zeros = random_params(rng, 3, len(gb), 4)
    ref = ref_affine(q, scales, zeros, group_size)
    for dtype in DTYPES:
        assert_dequantized(dequantize_mixed(packed, t(scales), t(zeros), gb, group_size, k, dtype), *ref, dtype)


@pytest.mark.parametrize("k", [1, 33, 129, 576])
@pytest.mark.parametrize("bits", [2, 4])
def test_mixed_with_one_width_is_the_uniform_layout(bits, k):
    q = random_codes(rng_for("one width", bits, k), 2, k, bits)
    uniform = pack_uniform(t(q), bits)
    np.testing.assert_array_equal(words_u32(uniform), ref_pack(q, bits))
    for group_size in GROUP_SIZES:
        gb = [bits] * math.ceil(k / group_size)
        packed = pack_mixed(t(q), gb, group_size)
        assert torch.equal(packed, uniform)
        assert torch.equal(unpack_mixed(packed, gb, group_size, k), t(q))


@pytest.mark.parametrize("make", [list, tuple, np.array, lambda b: np.array(b, np.uint8),
                                  lambda b: torch.tensor(b, dtype=torch.uint8), torch.tensor,
                                  lambda b: torch.tensor(b, dtype=torch.int32)])
def test_group_bits_forms(make):
    gb = [4, 2, 2, 4]
    q = random_mixed_codes(rng_for("forms"), 2, 100, gb, 32)
    scales, zeros = random_params(rng_for("forms"), 2, 4, 4)
    packed = pack_mixed(t(q), make(gb), 32)
    np.testing.assert_array_equal(words_u32(packed), ref_pack_mixed(q, gb, 32))
    assert mixed_words_per_row(100, make(gb), 32) == packed.shape[1]
    np.testing.assert_array_equal(unpack_mixed(packed, make(gb), 32, 100).numpy(), q)
    out = dequantize_mixed(packed, t(scales), t(zeros), make(gb), 32, 100, torch.float32)
    assert_dequantized(out, *ref_affine(q, scales, zeros, 32), torch.float32)


def test_unpack_mixed_arbitrary_words():
    gb, k = [4, 2, 4], 70
    words = random_words(rng_for("mixed words"), 2, mixed_words_per_row(k, gb, 32))
    np.testing.assert_array_equal(unpack_mixed(t(words), gb, 32, k).numpy(), ref_unpack_mixed(words, gb, 32, k))


# ---------------------------------------------------------------- hypothesis properties

@given(bits=st.sampled_from(BITS), n=st.integers(1, 5), k=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
def test_property_pack_unpack(bits, n, k, seed):
    q = random_codes(np.random.default_rng(seed), n, k, bits)
    packed = pack_uniform(t(q), bits)
    np.testing.assert_array_equal(words_u32(packed), ref_pack(q, bits))
    np.testing.assert_array_equal(unpack(packed, bits, k).numpy(), q)


@given(bits=st.sampled_from(BITS), group_size=st.sampled_from(GROUP_SIZES), n=st.integers(1, 4),
       k=st.integers(1, 400), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_property_dequantize(bits, group_size, n, k, dtype, seed):
    rng = np.random.default_rng(seed)
    q = random_codes(rng, n, k, bits)
    scales, zeros = random_params(rng, n, math.ceil(k / group_size), bits)
    table = random_table(rng, bits)
    packed = pack_uniform(t(q), bits)
    assert_dequantized(dequantize_uniform(packed, t(scales), t(zeros), bits, group_size, k, dtype),
                       *ref_affine(q, scales, zeros, group_size), dtype)
    assert_dequantized(dequantize_lut(packed, t(scales), t(table), bits, group_size, k, dtype),
                       *ref_lut(q, scales, table, group_size), dtype)


@given(group_size=st.sampled_from(GROUP_SIZES), n=st.integers(1, 4), k=st.integers(1, 700),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_property_mixed(group_size, n, k, dtype, seed, data):
    groups = math.ceil(k / group_size)
    gb = data.draw(st.lists(st.sampled_from([2, 4]), min_size=groups, max_size=groups), label="group_bits")
    rng = np.random.default_rng(seed)
    q = random_mixed_codes(rng, n, k, gb, group_size)
    packed = pack_mixed(t(q), gb, group_size)
    np.testing.assert_array_equal(words_u32(packed), ref_pack_mixed(q, gb, group_size))
    np.testing.assert_array_equal(unpack_mixed(packed, gb, group_size, k).numpy(), q)
    scales, zeros = random_params(rng, n, groups, 4)
    assert_dequantized(dequantize_mixed(packed, t(scales), t(zeros), gb, group_size, k, dtype),
                       *ref_affine(q, scales, zeros, group_size), dtype)


# ---------------------------------------------------------------- nf_table

def nf_reference(bits: int) -> np.ndarray:
    """The construction the docstring describes, with scipy's normal quantiles."""
    n = 1 << bits
    offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    positive = scipy.stats.norm.ppf(np.linspace(offset, 0.5, n // 2 + 1)[:-1])
    negative = -scipy.stats.norm.ppf(np.linspace(offset, 0.5, n // 2)[:-1])
    return np.sort(np.concatenate([negative, [0.0], positive])) / scipy.stats.norm.ppf(offset)


@pytest.mark.parametrize("bits", BITS)
def test_nf_table(bits):
    table = nf_table(bits)
    n = 1 << bits
    assert table.dtype == torch.float32 and tuple(table.shape) == (n,)
    v = table.numpy()
    assert (np.diff(v) > 0).all()
    assert v[0] == -1.0 and v[-1] == 1.0 and 0.0 in v
    assert (v > 0).sum() == n // 2 and (v < 0).sum() == n // 2 - 1  # asymmetric: one more positive value
    np.testing.assert_allclose(v, nf_reference(bits), rtol=0, atol=1e-6)


def test_nf4_is_the_qlora_table():
    np.testing.assert_allclose(nf_table(4).numpy(), NF4_QLORA, rtol=0, atol=2e-7)


@pytest.mark.parametrize("bits", [1, 5, 8, True, 3.0, "4"])
def test_nf_table_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        nf_table(bits)


# ---------------------------------------------------------------- errors

def uniform_inputs(bits=3, k=100, group_size=64, n=3):
    """(packed, scales, zeros) of matching shapes, for the error tests."""
    rng = rng_for("errors", bits, k, group_size, n)
    scales, zeros = random_params(rng, n, math.ceil(k / group_size), bits)
    return pack_uniform(t(random_codes(rng, n, k, bits)), bits), t(scales), t(zeros)


@pytest.mark.parametrize("bits", [0, 1, 5, 8, True, 3.0, None])
def test_bad_bits(bits):
    packed, scales, zeros = uniform_inputs()
    calls = [lambda: pack_uniform(torch.zeros(2, 8, dtype=torch.uint8), bits),
             lambda: unpack(packed, bits, 100),
             lambda: dequantize_uniform(packed, scales, zeros, bits, 64, 100),
             lambda: dequantize_lut(packed, scales, nf_table(3), bits, 64, 100),
             lambda: words_per_row(100, bits)]
    for call in calls:
        with pytest.raises(ValueError, match=rf"bits must be 2, 3 or 4, got {bits!r}"):
            call()


@pytest.mark.parametrize("group_size", [0, 16, 48, 100, 256, True, 64.0])
def test_bad_group_size(group_size):
    packed, scales, zeros = uniform_inputs()
    q = torch.zeros(2, 100, dtype=torch.uint8)
    calls = [lambda: dequantize_uniform(packed, scales, zeros, 3, group_size, 100),
             lambda: dequantize_lut(packed, scales, nf_table(3), 3, group_size, 100),
             lambda: pack_mixed(q, [2, 2], group_size),
             lambda: unpack_mixed(packed, [2, 2], group_size, 100),
             lambda: dequantize_mixed(packed, scales, zeros, [2, 2], group_size, 100),
             lambda: mixed_words_per_row(100, [2, 2], group_size)]
    for call in calls:
        with pytest.raises(ValueError, match=rf"group_size must be 32, 64 or 128, got {group_size!r}"):
            call()


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k(k):
    packed, scales, zeros = uniform_inputs()
    calls = [lambda: unpack(packed, 3, k), lambda: dequantize_uniform(packed, scales, zeros, 3, 64, k),
             lambda: dequantize_lut(packed, scales, nf_table(3), 3, 64, k), lambda: words_per_row(k, 3),
             lambda: unpack_mixed(packed, [2], 64, k), lambda: dequantize_mixed(packed, scales, zeros, [2], 64, k),
             lambda: mixed_words_per_row(k, [2], 64)]
    for call in calls:
        with pytest.raises(ValueError, match=rf"k must be an integer >= 1, got {k!r}"):
            call()


@pytest.mark.parametrize("pack", [lambda c: pack_uniform(c, 2), lambda c: pack_mixed(c, [2], 32)])
def test_codes_wrong_dtype_or_type(pack):
    for codes, name in [(torch.zeros(2, 8, dtype=torch.int32), "torch.int32"),
                        (torch.zeros(2, 8), "torch.float32"), (np.zeros((2, 8), np.int8), "torch.int8"),
                        (torch.zeros(2, 8, dtype=torch.bool), "torch.bool")]:
        with pytest.raises(TypeError, match=rf"codes must have dtype torch.uint8, got {name}"):
            pack(codes)
    with pytest.raises(TypeError, match="codes must be a torch.Tensor or numpy.ndarray, got list"):
        pack([[0, 1]])


@pytest.mark.parametrize("shape", [(8,), (2, 4, 8), (), (3, 0)])
def test_codes_wrong_shape(shape):
    codes = torch.zeros(shape, dtype=torch.uint8)
    expected = rf"codes must have shape \[N, K\] with K >= 1, got \[{', '.join(map(str, shape))}\]"
    with pytest.raises(ValueError, match=expected):
        pack_uniform(codes, 2)
    with pytest.raises(ValueError, match=expected):
        pack_mixed(codes, [2], 32)


@pytest.mark.parametrize("bits", BITS)
def test_code_out_of_range_names_first(bits):
    q = torch.zeros(4, 70, dtype=torch.uint8)
    q[2, 3] = 255
    q[1, 65] = 1 << bits  # the first bad code in row-major order
    q[3, 0] = 1 << bits
    with pytest.raises(ValueError, match=rf"pack_uniform: codes\[1, 65\] = {1 << bits} does not fit in {bits} bits; "
                                         rf"codes must be < {1 << bits}"):
        pack_uniform(q, bits)
    q[:2] = 0
    with pytest.raises(ValueError, match=rf"codes\[2, 3\] = 255 does not fit in {bits} bits"):
        pack_uniform(q.numpy(), bits)
    q[2:] = (1 << bits) - 1
    pack_uniform(q, bits)  # the largest code fits


def test_mixed_code_too_wide_for_its_group():
    gb = [4, 2, 4]
    q = torch.zeros(3, 70, dtype=torch.uint8)
    q[:, :32] = 15
    q[:, 64:] = 15
    pack_mixed(q, gb, 32)  # 15 fits the 4-bit groups
    q[2, 40] = 7
    q[1, 33] = 4
    with pytest.raises(ValueError, match=r"pack_mixed: codes\[1, 33\] = 4 does not fit in 2 bits \(group 1\); "
                                         r"codes must be < 4"):
        pack_mixed(q, gb, 32)
    q[1, 33] = 0
    q[2, 40] = 0
    q[0, 69] = 16
    with pytest.raises(ValueError, match=r"codes\[0, 69\] = 16 does not fit in 4 bits \(group 2\)"):
        pack_mixed(q, gb, 32)


@pytest.mark.parametrize("bad", [[2, 3], [4, 0], [8, 2], [1, 4], [2, 255]])
def test_group_bits_values(bad):
    g = 1 if bad[0] in (2, 4) else 0
    packed = torch.zeros(3, 8, dtype=torch.int32)
    scales = zeros = torch.ones(3, 2, dtype=torch.float16)
    q = torch.zeros(3, 64, dtype=torch.uint8)
    calls = [lambda gb: pack_mixed(q, gb, 32), lambda gb: unpack_mixed(packed, gb, 32, 64),
             lambda gb: dequantize_mixed(packed, scales, zeros, gb, 32, 64), lambda gb: mixed_words_per_row(64, gb, 32)]
    for call in calls:
        for gb in (bad, np.array(bad), torch.tensor(bad, dtype=torch.uint8)):
            with pytest.raises(ValueError, match=rf"group_bits must contain only 2 and 4, got group_bits\[{g}\] = "
                                                 rf"{bad[g]}"):
                call(gb)


def test_group_bits_shape_and_dtype():
    q = torch.zeros(3, 100, dtype=torch.uint8)
    for gb, shape in [([2], "[1]"), ([2, 4, 2], "[3]"), (torch.tensor([[2, 4]]), "[1, 2]"), ([], "[0]"),
                      (torch.tensor(2), "[]")]:
        with pytest.raises(ValueError, match=rf"group_bits must have shape \[2\] \(ceil\(k / group_size\)\), "
                                             rf"got {re_escape(shape)}"):
            pack_mixed(q, gb, 64)
        with pytest.raises(ValueError, match=r"group_bits must have shape \[2\]"):
            mixed_words_per_row(100, gb, 64)
    for gb in (torch.tensor([2.0, 4.0]), np.array([2.0, 4.0]), torch.tensor([True, True])):
        with pytest.raises(TypeError, match="group_bits must have an integer dtype"):
            pack_mixed(q, gb, 64)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.uint8, torch.float32])
def test_packed_wrong_dtype(dtype):
    _, scales, zeros = uniform_inputs()
    packed = torch.zeros(3, 12, dtype=dtype)
    expected = rf"packed must have dtype torch.int32 or torch.uint32, got {dtype}"
    calls = [lambda: unpack(packed, 3, 100), lambda: dequantize_uniform(packed, scales, zeros, 3, 64, 100),
             lambda: dequantize_lut(packed, scales, nf_table(3), 3, 64, 100),
             lambda: unpack_mixed(packed[:, :8], [2, 4], 64, 100),
             lambda: dequantize_mixed(packed, scales, zeros, [2, 4], 64, 100)]
    for call in calls:
        with pytest.raises(TypeError, match=expected):
            call()
    with pytest.raises(TypeError, match="packed must be a torch.Tensor or numpy.ndarray, got list"):
        unpack([[1, 2, 3]], 3, 32)


@pytest.mark.parametrize("shape", [(3, 11), (3, 13), (12,), (1, 3, 12), (3, 4)])
def test_packed_wrong_shape(shape):
    _, scales, zeros = uniform_inputs()
    packed = torch.zeros(shape, dtype=torch.int32)
    got = re_escape(str(list(shape)))
    for call in [lambda: unpack(packed, 3, 100), lambda: dequantize_uniform(packed, scales, zeros, 3, 64, 100),
                 lambda: dequantize_lut(packed, scales, nf_table(3), 3, 64, 100)]:
        with pytest.raises(ValueError, match=rf"packed must have shape \[N, 12\], got {got}"):
            call()
    for call in [lambda: unpack_mixed(packed, [4, 4], 64, 100),
                 lambda: dequantize_mixed(packed, scales, zeros, [4, 4], 64, 100)]:
        with pytest.raises(ValueError, match=rf"packed must have shape \[N, 16\], got {got}"):
            call()


@pytest.mark.parametrize("arg", ["scales", "zeros"])
def test_params_wrong_dtype_shape_device(arg):
    packed, scales, zeros = uniform_inputs()  # [3, 12] words, 2 groups

    def calls(bad):
        s, z = (bad, zeros) if arg == "scales" else (scales, bad)
        yield lambda: dequantize_uniform(packed, s, z, 3, 64, 100)
        yield lambda: dequantize_mixed(packed, s, z, [4, 2], 64, 100)
        if arg == "scales":
            yield lambda: dequantize_lut(packed, s, nf_table(3), 3, 64, 100)

    for dtype in (torch.float32, torch.bfloat16, torch.int32):
        for call in calls(torch.ones(3, 2, dtype=dtype)):
            with pytest.raises(TypeError, match=rf"{arg} must have dtype torch.float16, got {dtype}"):
                call()
    for shape in [(3, 1), (3, 3), (2, 2), (4, 2), (6,), (3, 2, 1)]:
        for call in calls(torch.ones(shape, dtype=torch.float16)):
            with pytest.raises(ValueError, match=rf"{arg} must have shape \[3, 2\] \(\[N, ceil\(k / group_size\)\]\), "
                                                 rf"got {re_escape(str(list(shape)))}"):
                call()
    for call in calls(torch.ones(3, 2, dtype=torch.float16, device="meta")):
        with pytest.raises(ValueError, match=rf"{arg} must be on the device of packed \(cpu\), got meta"):
            call()
    for call in calls([[1.0, 1.0]] * 3):
        with pytest.raises(TypeError, match=rf"{arg} must be a torch.Tensor or numpy.ndarray, got list"):
            call()


def test_table_wrong_dtype_shape_device():
    packed, scales, _ = uniform_inputs(bits=2)
    for dtype in (torch.float16, torch.float64, torch.bfloat16):
        with pytest.raises(TypeError, match=rf"table must have dtype torch.float32, got {dtype}"):
            dequantize_lut(packed, scales, nf_table(2).to(dtype), 2, 64, 100)
    for table in (nf_table(3), torch.zeros(3), torch.zeros(2, 2), torch.zeros(())):
        with pytest.raises(ValueError, match=rf"table must have shape \[4\] \(2\^bits\), "
                                             rf"got {re_escape(str(list(table.shape)))}"):
            dequantize_lut(packed, scales, table, 2, 64, 100)
    with pytest.raises(ValueError, match=r"table must be on the device of packed \(cpu\), got meta"):
        dequantize_lut(packed, scales, torch.zeros(4, device="meta"), 2, 64, 100)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.complex64, None])
def test_bad_out_dtype(dtype):
    packed, scales, zeros = uniform_inputs()
    for call in [lambda: dequantize_uniform(packed, scales, zeros, 3, 64, 100, dtype),
                 lambda: dequantize_lut(packed, scales, nf_table(3), 3, 64, 100, dtype),
                 lambda: dequantize_mixed(packed[:, :8], scales, zeros, [2, 2], 64, 100, dtype)]:
        with pytest.raises(TypeError, match=rf"dtype must be torch.float32, torch.float16 or torch.bfloat16, "
                                            rf"got {dtype}"):
            call()


def test_empty_rows_are_handled():
    """N = 0 is a valid (empty) weight for every op; K = 0 is refused (K >= 1 is documented)."""
    empty = torch.zeros(0, 100, dtype=torch.uint8)
    packed = pack_uniform(empty, 3)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (0, 12)
    assert tuple(unpack(packed, 3, 100).shape) == (0, 100)
    s = torch.zeros(0, 2, dtype=torch.float16)
    for dtype in DTYPES:
        out = dequantize_uniform(packed, s, s, 3, 64, 100, dtype)
        assert out.dtype == dtype and tuple(out.shape) == (0, 100)
        assert tuple(dequantize_lut(packed, s, nf_table(3), 3, 64, 100, dtype).shape) == (0, 100)
    mixed = pack_mixed(empty, [2, 4], 64)
    assert tuple(mixed.shape) == (0, 12)
    assert tuple(unpack_mixed(mixed, [2, 4], 64, 100).shape) == (0, 100)
    assert tuple(dequantize_mixed(mixed, s, s, [2, 4], 64, 100, torch.float32).shape) == (0, 100)
    assert pack_uniform(np.zeros((0, 5), np.uint8), 2).shape == (0, 2)
    with pytest.raises(ValueError, match=r"codes must have shape \[N, K\] with K >= 1, got \[0, 0\]"):
        pack_uniform(torch.zeros(0, 0, dtype=torch.uint8), 2)


# ---------------------------------------------------------------- non-contiguous input (handled)

def test_non_contiguous_inputs_are_handled():
    rng = rng_for("strided")
    q = random_codes(rng, 5, 100, 4)
    q_t = t(q.T.copy()).t()  # [5, 100] with strides (1, 5)
    assert not q_t.is_contiguous()
    np.testing.assert_array_equal(words_u32(pack_uniform(q_t, 4)), ref_pack(q, 4))
    np.testing.assert_array_equal(pack_uniform(np.asfortranarray(q), 4).view(np.uint32), ref_pack(q, 4))
    wide = torch.zeros(5, 30, dtype=torch.int32)
    wide[:, 3:19] = pack_uniform(t(q), 4)
    packed = wide[:, 3:19]
    assert not packed.is_contiguous()
    np.testing.assert_array_equal(unpack(packed, 4, 100).numpy(), q)
    scales, zeros = random_params(rng, 5, 4, 4)
    s_t, z_t = t(scales.T.copy()).t(), t(np.repeat(zeros, 2, axis=1))[:, ::2]
    assert not s_t.is_contiguous() and not z_t.is_contiguous()
    out = dequantize_uniform(packed, s_t, z_t, 4, 32, 100, torch.float32)
    assert_dequantized(out, *ref_affine(q, scales, zeros, 32), torch.float32)
    table = random_table(rng, 4)
    table_strided = t(np.repeat(table, 2))[::2]
    assert not table_strided.is_contiguous()
    out = dequantize_lut(packed, s_t, table_strided, 4, 32, 100, torch.float32)
    assert_dequantized(out, *ref_lut(q, scales, table, 32), torch.float32)
    gb = [4, 2, 2, 4]
    qm = random_mixed_codes(rng, 5, 100, gb, 32)
    gb_strided = torch.tensor(gb, dtype=torch.uint8).repeat_interleave(2)[::2]
    qm_t = t(qm.T.copy()).t()
    mixed = pack_mixed(qm_t, gb_strided, 32)
    np.testing.assert_array_equal(words_u32(mixed), ref_pack_mixed(qm, gb, 32))
    mixed_wide = torch.zeros(5, 2 * mixed.shape[1], dtype=torch.int32)
    mixed_wide[:, ::2] = mixed
    np.testing.assert_array_equal(unpack_mixed(mixed_wide[:, ::2], gb_strided, 32, 100).numpy(), qm)
    out = dequantize_mixed(mixed_wide[:, ::2], s_t, z_t, gb_strided, 32, 100, torch.float32)
    assert_dequantized(out, *ref_affine(qm, scales, zeros, 32), torch.float32)


# ---------------------------------------------------------------- the native layer's own checks

def test_native_boundary_checks():
    """lowbit._C refuses what the Python layer would never pass: strided views, bad widths, wrong out."""
    q = torch.zeros(4, 64, dtype=torch.uint8)
    packed = torch.zeros(4, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"pack_uniform: codes must be contiguous"):
        _C.pack_uniform(to_dlpack(torch.zeros(64, 4, dtype=torch.uint8).t()), to_dlpack(packed), 3, 0)
    with pytest.raises(ValueError, match=r"pack_uniform: packed must have shape \[4, 6\], got \[4, 5\]"):
        _C.pack_uniform(to_dlpack(q), to_dlpack(torch.zeros(4, 5, dtype=torch.int32)), 3, 0)
    with pytest.raises(TypeError, match=r"pack_uniform: codes must have dtype uint8, got int32"):
        _C.pack_uniform(to_dlpack(q.int()), to_dlpack(packed), 3, 0)
    with pytest.raises(ValueError, match=r"unpack: bits must be 2, 3 or 4, got 5"):
        _C.unpack(to_dlpack(packed), to_dlpack(q), 5, 0)
    s = torch.ones(4, 1, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"dequantize_uniform: out must have dtype float32 or float16 or bfloat16, "
                                        r"got float64"):
        _C.dequantize_uniform(to_dlpack(packed), to_dlpack(s), to_dlpack(s),
                              to_dlpack(torch.empty(4, 64, dtype=torch.float64)), 3, 64, 0)
    with pytest.raises(ValueError, match=r"dequantize_lut: group_size must be 32, 64 or 128, got 16"):
        _C.dequantize_lut(to_dlpack(packed), to_dlpack(s), to_dlpack(nf_table(3)), to_dlpack(torch.empty(4, 64)),
                          3, 16, 0)
    bad_bits = to_dlpack(torch.tensor([2, 3], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"pack_mixed: group_bits must contain only 2 and 4, got group_bits\[1\] = 3"):
        _C.pack_mixed(to_dlpack(q), bad_bits, to_dlpack(packed), 32, 0)
    with pytest.raises(ValueError, match=r"unpack_mixed: group_bits must contain only 2 and 4"):
        _C.unpack_mixed(to_dlpack(packed), to_dlpack(torch.tensor([4, 3], dtype=torch.uint8)), to_dlpack(q), 32, 0)


@pytest.mark.parametrize("mixed", [False, True])
def test_failed_pack_writes_nothing(mixed):
    """The range check runs before packing: the output keeps its old contents."""
    q = torch.full((3, 64), 3, dtype=torch.uint8)
    q[2, 63] = 4
    packed = torch.full((3, 4), -1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"codes\[2, 63\] = 4 does not fit in 2 bits"):
        if mixed:
            _C.pack_mixed(to_dlpack(q), to_dlpack(torch.tensor([2, 2], dtype=torch.uint8)), to_dlpack(packed), 32, 0)
        else:
            _C.pack_uniform(to_dlpack(q), to_dlpack(packed), 2, 0)
    assert bool((packed == -1).all())


# ---------------------------------------------------------------- torch.compile

def test_torch_compile_fullgraph():
    rng = rng_for("compile")
    q = random_codes(rng, 4, 100, 3)
    scales, zeros = random_params(rng, 4, 2, 3)

    def f(codes, scales, zeros):
        packed = pack_uniform(codes, 3)
        w = dequantize_uniform(packed, scales, zeros, 3, 64, 100, torch.float32)
        return w * 2.0 + unpack(packed, 3, 100).float()

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(t(q), t(scales), t(zeros))
    torch.testing.assert_close(out, f(t(q), t(scales), t(zeros)), rtol=0, atol=0)
    w, _ = ref_affine(q, scales, zeros, 64)
    np.testing.assert_allclose(out.numpy(), 2 * w + q, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------- CUDA against CPU

CUDA_KS = [1, 31, 33, 100, 129, 576, 256 * 32 + 33, 40000]  # the last two span several CUDA blocks per row


@pytest.mark.gpu
@pytest.mark.parametrize("k", CUDA_KS)
@pytest.mark.parametrize("bits", BITS)
def test_cuda_pack_unpack(bits, k):
    q = random_codes(rng_for("cuda pack", bits, k), 5, k, bits)
    packed = pack_uniform(to_gpu(t(q)), bits)
    assert on_gpu(packed) and packed.dtype == torch.int32
    with cpu_reference():
        packed_cpu = pack_uniform(t(q), bits)
    assert torch.equal(packed.cpu(), packed_cpu)
    np.testing.assert_array_equal(words_u32(packed.cpu()), ref_pack(q, bits))
    words = random_words(rng_for("cuda words", bits, k), 5, words_per_row(k, bits))
    words_i32 = to_gpu(t(words.view(np.int32)))  # copied as int32 (CUDA copies of uint32 need not be supported)
    for w in (words_i32, words_i32.view(torch.uint32)):
        codes = unpack(w, bits, k)
        assert on_gpu(codes)
        np.testing.assert_array_equal(codes.cpu().numpy(), ref_unpack(words, bits, k))


@pytest.mark.gpu
@pytest.mark.parametrize("k", CUDA_KS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_cuda_dequantize(bits, group_size, k):
    rng = rng_for("cuda dequant", bits, group_size, k)
    q = random_codes(rng, 3, k, bits)
    scales, zeros = random_params(rng, 3, math.ceil(k / group_size), bits)
    table = random_table(rng, bits)
    packed = t(ref_pack(q, bits).view(np.int32))
    affine, lut = ref_affine(q, scales, zeros, group_size), ref_lut(q, scales, table, group_size)
    for dtype in DTYPES:
        args = (bits, group_size, k, dtype)
        with cpu_reference():
            uniform_cpu = dequantize_uniform(packed, t(scales), t(zeros), *args)
            lut_cpu = dequantize_lut(packed, t(scales), t(table), *args)
        gpu = dequantize_uniform(to_gpu(packed), to_gpu(t(scales)), to_gpu(t(zeros)), *args)
        assert on_gpu(gpu)
        assert_dequantized(gpu.cpu(), *affine, dtype)
        torch.testing.assert_close(gpu.cpu(), uniform_cpu)
        gpu = dequantize_lut(to_gpu(packed), to_gpu(t(scales)), to_gpu(t(table)), *args)
        assert_dequantized(gpu.cpu(), *lut, dtype)
        torch.testing.assert_close(gpu.cpu(), lut_cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("k", CUDA_KS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_cuda_mixed(group_size, k):
    rng = rng_for("cuda mixed", group_size, k)
    gb = list(rng.choice([2, 4], math.ceil(k / group_size)))
    q = random_mixed_codes(rng, 3, k, gb, group_size)
    scales, zeros = random_params(rng, 3, len(gb), 4)
    gb_cuda = to_gpu(torch.tensor(gb, dtype=torch.uint8))
    for bits_arg in (gb, gb_cuda):
        packed = pack_mixed(to_gpu(t(q)), bits_arg, group_size)
        assert on_gpu(packed)
        np.testing.assert_array_equal(words_u32(packed.cpu()), ref_pack_mixed(q, gb, group_size))
        np.testing.assert_array_equal(unpack_mixed(packed, bits_arg, group_size, k).cpu().numpy(), q)
    for dtype in DTYPES:
        gpu = dequantize_mixed(packed, to_gpu(t(scales)), to_gpu(t(zeros)), gb_cuda, group_size, k, dtype)
        assert_dequantized(gpu.cpu(), *ref_affine(q, scales, zeros, group_size), dtype)
        with cpu_reference():
            cpu = dequantize_mixed(packed.cpu(), t(scales), t(zeros), gb, group_size, k, dtype)
        torch.testing.assert_close(gpu.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
def test_cuda_bad_code_names_first(bits):
    q = torch.zeros(40, 3000, dtype=torch.uint8)
    q[30, 5] = 255
    q[7, 2999] = 1 << bits
    q[7, 3000 - 32] = 255
    with pytest.raises(ValueError, match=rf"pack_uniform: codes\[7, 2968\] = 255 does not fit in {bits} bits"):
        pack_uniform(to_gpu(q), bits)
    gb = [4, 2] * 47  # ceil(3000 / 32) = 94 groups
    q.zero_()
    q[9, 33] = 4  # group 1 is 2 bits wide
    q[9, 64] = 15
    with pytest.raises(ValueError, match=r"pack_mixed: codes\[9, 33\] = 4 does not fit in 2 bits \(group 1\)"):
        pack_mixed(to_gpu(q), to_gpu(torch.tensor(gb, dtype=torch.uint8)), 32)


@pytest.mark.gpu
def test_cuda_native_checks():
    """On CUDA the binding cannot read group_bits: pack_mixed copies and checks them, the decoders write the
    documented markers (code 255, NaN) for a group whose width is not 2 or 4, and packed's width is range-checked."""
    from lowbit.ops._native import _C  # the module the ops call (the emulated kernels' under emulation)
    q = torch.zeros(2, 64, dtype=torch.uint8, device=GPU)
    bad = torch.tensor([2, 3], dtype=torch.uint8, device=GPU)
    packed = torch.zeros(2, 6, dtype=torch.int32, device=GPU)
    with pytest.raises(ValueError, match=r"pack_mixed: group_bits must contain only 2 and 4, got group_bits\[1\] = 3"):
        _C.pack_mixed(to_dlpack(q), to_dlpack(bad), to_dlpack(packed), 32, current_stream_handle())
    codes = torch.zeros(2, 64, dtype=torch.uint8, device=GPU)
    _C.unpack_mixed(to_dlpack(packed), to_dlpack(bad), to_dlpack(codes), 32, current_stream_handle())
    assert bool((codes[:, :32] == 0).all()) and bool((codes[:, 32:] == 255).all())
    s = torch.ones(2, 2, dtype=torch.float16, device=GPU)
    out = torch.zeros(2, 64, device=GPU)
    _C.dequantize_mixed(to_dlpack(packed), to_dlpack(s), to_dlpack(s * 0), to_dlpack(bad), to_dlpack(out), 32,
                        current_stream_handle())
    assert bool((out[:, :32] == 0).all()) and bool(out[:, 32:].isnan().all())
    with pytest.raises(ValueError, match=r"unpack_mixed: packed must have shape \[2, W\] with W the mixed words per "
                                         r"row \(between 4 and 8\), got \[2, 9\]"):
        _C.unpack_mixed(to_dlpack(torch.zeros(2, 9, dtype=torch.int32, device=GPU)),
                        to_dlpack(torch.tensor([2, 2], dtype=torch.uint8, device=GPU)), to_dlpack(codes), 32, 0)


@pytest.mark.gpu
@pytest.mark.skipif(EMULATED, reason="a CPU tensor among CUDA ones: under emulation both are CPU tensors")
def test_cuda_native_device_check():
    """The binding rejects buffers on different devices (split from test_cuda_native_checks)."""
    from lowbit.ops._native import _C
    codes = torch.zeros(2, 64, dtype=torch.uint8, device=GPU)
    with pytest.raises(ValueError, match=r"unpack: packed and codes must be on the same device, got cpu and cuda:0"):
        _C.unpack(to_dlpack(torch.zeros(2, 4, dtype=torch.int32)), to_dlpack(codes), 2, 0)


@pytest.mark.gpu
def test_cuda_empty_rows():
    packed = pack_uniform(torch.zeros(0, 100, dtype=torch.uint8, device=GPU), 3)
    assert on_gpu(packed) and tuple(packed.shape) == (0, 12)
    assert tuple(unpack(packed, 3, 100).shape) == (0, 100)
    s = torch.zeros(0, 2, dtype=torch.float16, device=GPU)
    assert tuple(dequantize_uniform(packed, s, s, 3, 64, 100).shape) == (0, 100)
    with cpu_reference():
        table = nf_table(3)
    assert tuple(dequantize_lut(packed, s, to_gpu(table), 3, 64, 100).shape) == (0, 100)
    mixed = pack_mixed(torch.zeros(0, 100, dtype=torch.uint8, device=GPU), [2, 4], 64)
    assert tuple(mixed.shape) == (0, 12)
    assert tuple(unpack_mixed(mixed, [2, 4], 64, 100).shape) == (0, 100)
    assert tuple(dequantize_mixed(mixed, s, s, [2, 4], 64, 100).shape) == (0, 100)


def _side_stream_case():
    rng = rng_for("cuda stream")
    q = random_codes(rng, 64, 4096, 3)
    scales, zeros = random_params(rng, 64, 32, 3)
    with gpu_stream():
        packed = pack_uniform(to_gpu(t(q)), 3)
        out = dequantize_uniform(packed, to_gpu(t(scales)), to_gpu(t(zeros)), 3, 128, 4096, torch.float32)
        codes = unpack(packed, 3, 4096)
    return q, scales, zeros, packed, out, codes


@pytest.mark.gpu
def test_cuda_side_stream():
    q, scales, zeros, _, out, codes = _side_stream_case()
    np.testing.assert_array_equal(codes.cpu().numpy(), q)
    assert_dequantized(out.cpu(), *ref_affine(q, scales, zeros, 128), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(EMULATED, reason="a CPU tensor among CUDA ones: under emulation both are CPU tensors")
def test_cuda_device_checks():
    """Split from the side-stream test: parameters on the CPU next to CUDA codes."""
    _, scales, zeros, packed, _, _ = _side_stream_case()
    with pytest.raises(ValueError, match=r"scales must be on the device of packed \(cuda:0\), got cpu"):
        dequantize_uniform(packed, t(scales), to_gpu(t(zeros)), 3, 128, 4096)
    with pytest.raises(ValueError, match=r"table must be on the device of packed \(cuda:0\), got cpu"):
        dequantize_lut(packed, to_gpu(t(scales)), nf_table(3), 3, 128, 4096)
