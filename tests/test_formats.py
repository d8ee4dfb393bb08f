"""QuantizedWeight: construction from codes, validation errors, dequantize against a float64 reference,
device moves and the stable (tensors, config) state."""
import math

import pytest
import torch

from lowbit.formats import QuantizedWeight
from lowbit.ops import nf_table


def _random(n, k, bits, gs, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = math.ceil(k / gs)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) + 0.5).half()
    zeros = (torch.rand(n, groups, generator=g) * (2**bits - 1)).half()
    return codes, scales, zeros


def _expand(t, k, gs):
    return t.double().repeat_interleave(gs, dim=1)[:, :k]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,gs", [(5, 576, 128), (3, 100, 32), (1, 64, 64), (0, 96, 32)])
def test_uniform_roundtrip_and_dequantize(bits, n, k, gs):
    codes, scales, zeros = _random(n, k, bits, gs)
    w = QuantizedWeight.uniform(codes, scales, zeros, bits, gs)
    assert torch.equal(w.codes(), codes)
    ref = _expand(scales, k, gs) * (codes.double() - _expand(zeros, k, gs))
    torch.testing.assert_close(w.dequantize(torch.float32).double(), ref,
                               rtol=1e-6, atol=1e-5)
    assert w.bits == bits and w.in_features == k and w.out_features == n
    if n:
        assert w.bits_per_weight > bits  # scales and zeros cost something


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lut_dequantize(bits):
    codes, scales, _ = _random(4, 200, bits, 64, seed=bits)
    table = nf_table(bits)
    w = QuantizedWeight.lut(codes, scales, table, bits, 64)
    ref = _expand(scales, 200, 64) * table.double()[codes.long()]
    torch.testing.assert_close(w.dequantize().double(), ref, rtol=1e-6, atol=1e-6)


def test_mixed_dequantize_and_average_bits():
    k, gs = 576, 128
    codes, scales, zeros = _random(6, k, 4, gs, seed=3)
    group_bits = torch.tensor([4, 2, 2, 4, 2], dtype=torch.uint8)
    for g, b in enumerate(group_bits.tolist()):
        codes[:, g * gs:(g + 1) * gs] %= 2**b
    w = QuantizedWeight.mixed(codes, scales, zeros, group_bits, gs)
    assert torch.equal(w.codes(), codes)
    ref = _expand(scales, k, gs) * (codes.double() - _expand(zeros, k, gs))
    torch.testing.assert_close(w.dequantize().double(), ref, rtol=1e-6, atol=1e-5)
    assert w.bits == pytest.approx((4 * 128 + 2 * 128 + 2 * 128 + 4 * 128 + 2 * 64) / 576)


def test_state_roundtrip_and_to():
    codes, scales, zeros = _random(3, 64, 4, 32)
    w = QuantizedWeight.uniform(codes, scales, zeros, 4, 32)
    tensors, config = w.state()
    fmt = config.pop("format")
    again = QuantizedWeight(fmt, tensors, config)
    assert torch.equal(again.dequantize(), w.dequantize())
    assert w.to("cpu") is w
    assert "format=uniform" in repr(w) and "bits=4" in repr(w)


def test_validation_errors():
    codes, scales, zeros = _random(3, 64, 4, 32)
    w = QuantizedWeight.uniform(codes, scales, zeros, 4, 32)
    t, c = w.state()
    c.pop("format")
    with pytest.raises(ValueError, match="format must be one of"):
        QuantizedWeight("int4", t, c)
    with pytest.raises(ValueError, match=r"tensor 'scales' must have shape \[3, 2\], got \[3, 1\]"):
        QuantizedWeight("uniform", dict(t, scales=t["scales"][:, :1].contiguous()), c)
    with pytest.raises(TypeError, match="tensor 'zeros' must have dtype torch.float16, got torch.float32"):
        QuantizedWeight("uniform", dict(t, zeros=t["zeros"].float()), c)
    with pytest.raises(ValueError, match=r"tensors must be \['packed', 'scales', 'zeros'\]"):
        QuantizedWeight("uniform", {"packed": t["packed"], "scales": t["scales"]}, c)
    with pytest.raises(ValueError, match="group_size must be one of"):
        QuantizedWeight("uniform", t, dict(c, group_size=48))
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        QuantizedWeight("uniform", t, dict(c, bits=5))
    with pytest.raises(TypeError, match=r"config\['in_features'\] must be an int"):
        QuantizedWeight("uniform", t, dict(c, in_features="64"))
    with pytest.raises(ValueError, match=r"tensor 'packed' must have shape \[3, 4\], got \[3, 8\]"):
        QuantizedWeight("uniform", t, dict(c, in_features=60, bits=2))
    with pytest.raises(ValueError, match="format_version"):
        QuantizedWeight("uniform", t, dict(c, format_version=99))


def _random_vq(n, k, r, e, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, e, (n, k // 8, r), generator=g)
    codes.view(-1)[0] = e - 1  # the last entry (65535 is stored as int16 -1)
    books = torch.randn(r, e, 8, generator=g).half()
    scales = (torch.rand(n, generator=g) + 0.5).half()
    return codes, books, scales


@pytest.mark.parametrize("n,k,r,e", [(5, 64, 1, 256), (3, 40, 2, 256), (2, 16, 1, 65536), (4, 32, 2, 1024)])
def test_vq_roundtrip_and_dequantize(n, k, r, e):
    codes, books, scales = _random_vq(n, k, r, e)
    w = QuantizedWeight.vq(codes, books, scales)
    assert w.tensors["codes"].dtype == (torch.uint8 if e == 256 else torch.int16)  # one byte per index for E = 256
    assert torch.equal(w.codes().long(), codes)
    ref = sum(books.double()[i][codes[:, :, i]] for i in range(r)) * scales.double()[:, None, None]
    torch.testing.assert_close(w.dequantize(torch.float32).double(), ref.reshape(n, k), rtol=1e-6, atol=1e-6)
    assert w.bits == pytest.approx(r * math.log2(e) / 8) and w.group_size is None
    assert (w.in_features, w.out_features) == (k, n)
    assert w.bits_per_weight == pytest.approx(w.bits + (r * e * 8 * 16 + n * 16) / (n * k))
    tensors, config = w.state()
    again = QuantizedWeight(config.pop("format"), tensors, config)
    assert torch.equal(again.dequantize(), w.dequantize()) and w.to("cpu") is w
    assert f"format=vq, bits={w.bits:g}, codebooks={r}, entries={e}" in repr(w)


def test_vq_validation_errors():
    codes, books, scales = _random_vq(3, 64, 2, 256)
    t, c = QuantizedWeight.vq(codes, books, scales).state()
    c.pop("format")
    with pytest.raises(TypeError, match="tensor 'codes' must have dtype torch.int16 or torch.uint8, got torch.int32"):
        QuantizedWeight("vq", dict(t, codes=t["codes"].int()), c)
    assert torch.equal(QuantizedWeight("vq", dict(t, codes=t["codes"].to(torch.int16)), c).dequantize(),
                       QuantizedWeight("vq", t, c).dequantize())  # int16 codes stay valid for E = 256
    t4k, c4k = QuantizedWeight.vq(*_random_vq(3, 64, 1, 4096)).state()
    c4k.pop("format")
    with pytest.raises(TypeError, match="tensor 'codes' must have dtype torch.int16, got torch.uint8"):
        QuantizedWeight("vq", dict(t4k, codes=t4k["codes"].to(torch.uint8)), c4k)  # bytes cannot index 4096
    with pytest.raises(ValueError, match=r"tensor 'codes' must have shape \[3, 8, 2\], got \[3, 8, 1\]"):
        QuantizedWeight("vq", dict(t, codes=t["codes"][:, :, :1].contiguous()), c)
    with pytest.raises(ValueError, match=r"tensor 'codebooks' must have shape \[2, 256, 8\]"):
        QuantizedWeight("vq", dict(t, codebooks=t["codebooks"][:, :128].contiguous()), c)
    with pytest.raises(ValueError, match=r"tensor 'scales' must have shape \[3\]"):
        QuantizedWeight("vq", dict(t, scales=t["scales"][:2].contiguous()), c)
    with pytest.raises(ValueError, match="entries must be a power of two in \\[256, 65536\\], got 300"):
        QuantizedWeight("vq", t, dict(c, entries=300))
    with pytest.raises(ValueError, match="codebooks must be one of"):
        QuantizedWeight("vq", t, dict(c, codebooks=3))
    with pytest.raises(ValueError, match="vector_length must be 8"):
        QuantizedWeight("vq", t, dict(c, vector_length=4))
    with pytest.raises(ValueError, match="in_features must be a multiple of vector_length 8, got 60"):
        QuantizedWeight("vq", t, dict(c, in_features=60))
    with pytest.raises(TypeError, match=r"config\['entries'\] must be an int"):
        QuantizedWeight("vq", t, dict(c, entries=256.0))
    with pytest.raises(ValueError, match=r"vq tensors must be \['codebooks', 'codes', 'scales'\]"):
        QuantizedWeight("vq", {"codes": t["codes"], "scales": t["scales"]}, c)
    bad = t["codes"].to(torch.int16)
    bad[1, 2, 1] = 256
    with pytest.raises(ValueError, match="tensor 'codes' must hold indices < entries \\(256\\), got 256"):
        QuantizedWeight("vq", dict(t, codes=bad), c)
