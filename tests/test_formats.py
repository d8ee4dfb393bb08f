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
