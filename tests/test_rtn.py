"""RTN and NF quantizers: codes and scales against direct float64 formulas, error bounds, ragged K."""
import math

import pytest
import torch

from lowbit.ops import nf_table
from lowbit.quant import nf_quantize, rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k,gs", [(576, 128), (100, 32), (64, 64), (33, 32)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_within_half_step(bits, k, gs, symmetric):
    w = torch.randn(7, k)
    q = rtn_quantize(w, bits, gs, symmetric=symmetric)
    err = (q.dequantize() - w).abs()
    step = q.tensors["scales"].float().repeat_interleave(gs, dim=1)[:, :k]
    # within half a step, plus fp16 rounding of the scale times the largest code
    assert bool((err <= step * (0.5 + 2**bits * 2e-3) + 1e-6).all())


def test_rtn_reproduces_a_grid_exactly():
    """Weights that already lie on a 4-bit grid with integer zero come back exactly (the Q4_1 sanity case)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 96), generator=g)
    codes[:, ::32] = 0
    codes[:, 1::32] = 15  # every group spans the full range
    scale = (torch.rand(8, 3, generator=g) + 0.5).half()
    zero = torch.randint(1, 15, (8, 3), generator=g).half()
    w = scale.float().repeat_interleave(32, 1) * (codes.float() - zero.float().repeat_interleave(32, 1))
    q = rtn_quantize(w, 4, 32)
    torch.testing.assert_close(q.dequantize(), w, rtol=2e-3, atol=2e-3)
    assert torch.equal(q.codes(), codes.to(torch.uint8))


def test_rtn_reproduces_a_q4_1_grid_exactly():
    """Q4_1 blocks (w = d * q + m, any real m: llama.cpp's 4-bit format the bundled model comes from) come back
    exactly at 4 bits, group 32: the asymmetric zero is real-valued, so the grid's ends are the group's extremes."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (8, 96), generator=g)
    codes[:, ::32], codes[:, 1::32] = 0, 15
    d = (torch.rand(8, 3, generator=g) * 0.01 + 0.001).half().float()
    m = -(torch.rand(8, 3, generator=g) * 0.1).half().float()
    w = d.repeat_interleave(32, 1) * codes.float() + m.repeat_interleave(32, 1)
    q = rtn_quantize(w, 4, 32)
    assert torch.equal(q.codes(), codes.to(torch.uint8))
    assert (q.dequantize() - w).abs().max() <= 2e-3 * w.abs().max()
    integer = rtn_quantize(w, 4, 32, integer_zero=True)
    assert bool((integer.tensors["zeros"] == integer.tensors["zeros"].round()).all())
    assert (integer.dequantize() - w).norm() > 10 * (q.dequantize() - w).norm()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_picks_nearest_entry(bits):
    w = torch.randn(5, 200)
    q = nf_quantize(w, bits, 64)
    table = nf_table(bits).double()
    scale = q.tensors["scales"].double().repeat_interleave(64, 1)[:, :200]
    normalized = w.double() / scale
    best = (normalized[..., None] - table).abs().argmin(-1)
    assert torch.equal(q.codes().long(), best)
    assert q.format == "lut"


def test_rtn_bad_input():
    with pytest.raises(ValueError, match="bits must be one of"):
        rtn_quantize(torch.randn(4, 64), bits=5)
    with pytest.raises(ValueError, match="group_size must be one of"):
        rtn_quantize(torch.randn(4, 64), group_size=48)
    with pytest.raises(ValueError, match="2-D"):
        rtn_quantize(torch.randn(64))
    with pytest.raises(TypeError, match="float tensor"):
        rtn_quantize(torch.ones(4, 64, dtype=torch.int32))
