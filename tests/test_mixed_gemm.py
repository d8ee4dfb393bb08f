"""The mixed 2/4-bit GEMM: prepare_mixed_gemm's layout against the aligned layout of each width's columns, the GEMM
against float64 references (tight: the int8-rounded activations times the dequantized weight; the same integers
as async_dequant_gemm when every group has one width), many shapes, dtypes, group sizes and width maps, on every
CPU path this machine runs; bad input; torch.compile; CUDA against CPU (gpu)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowbit
from isa_paths import SUPPORTED_ISAS, forced_isa
from lowbit.ops import (MixedGemmWeight, aligned_from_codes, async_dequant_gemm, dequantize_mixed, mixed_gemm,
                        pack_mixed, prepare_mixed_gemm)
from gpu_device import assert_matches_cpu, cpu_reference, to_gpu
from test_async_dequant import DTYPES, reference_activations  # noqa: E402


def random_mixed(n, k, group_size, gen, widths=None):
    groups = math.ceil(k / group_size)
    if widths is None:
        widths = [int(b) for b in torch.randint(0, 2, (groups,), generator=gen) * 2 + 2]
    cols = torch.tensor([widths[c // group_size] for c in range(k)])
    codes = (torch.rand(n, k, generator=gen) * (2.0**cols)).floor().clamp(max=(2**cols - 1).float()).to(torch.uint8)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.001).half()
    zeros = (torch.rand(n, groups, generator=gen) * torch.tensor([2.0**b - 1 for b in widths])).half()
    return pack_mixed(codes, widths, group_size), codes, scales, zeros, widths


def reference(x, packed, scales, zeros, widths, group_size):
    """(x rounded to int8 per group, as the kernel does) @ dequantize_mixed(W).T in float64."""
    k = x.shape[1]
    xq, d = reference_activations(x, group_size)
    xd = xq * np.repeat(d, group_size, axis=1)[:, :k].astype(np.float64)
    w = dequantize_mixed(packed, scales, zeros, widths, group_size, k, torch.float32).double().numpy()
    return xd @ w.T


def check(m, k, n, group_size, dtype=torch.float32, seed=0, widths=None):
    gen = torch.Generator().manual_seed(seed)
    packed, codes, scales, zeros, widths = random_mixed(n, k, group_size, gen, widths)
    x = torch.randn(m, k, generator=gen).to(dtype)
    weight = prepare_mixed_gemm(packed, widths, group_size, k)
    y = mixed_gemm(x, weight, scales, zeros, group_size)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = reference(x, packed, scales, zeros, widths, group_size)
    unit = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    scale = np.abs(ref).max() + 1e-30
    err = np.abs(y.double().numpy() - ref).max()
    assert err <= (4 * unit + 1e-5) * scale, f"max error {err:.3g} vs output scale {scale:.3g}"
    return x, weight, scales, zeros, y


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("k", [1, 31, 64, 100, 576, 1000])
def test_layout_is_the_aligned_layout_of_each_width(k, group_size):
    gen = torch.Generator().manual_seed(k + group_size)
    packed, codes, _, _, widths = random_mixed(6, k, group_size, gen)
    weight = prepare_mixed_gemm(packed, widths, group_size, k)
    kruns = math.ceil(k / 32)
    runs = {b: [r for r in range(kruns) if widths[r * 32 // group_size] == b] for b in (4, 2)}
    assert weight.runs4.tolist() == runs[4] and weight.runs2.tolist() == runs[2]
    assert weight.runs4.dtype == torch.int32 and weight.runs2.dtype == torch.int32
    padded = torch.zeros(6, kruns * 32, dtype=torch.uint8)
    padded[:, :k] = codes
    expected = [aligned_from_codes(padded.view(6, kruns, 32)[:, runs[b]].reshape(6, -1), b) for b in (4, 2)]
    torch.testing.assert_close(weight.packed, torch.cat(expected, dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 16, 33, 64, 65])
def test_rows_of_x(m, isa):
    check(m, 576, 37, 64, seed=m)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("k,n", [(32, 1), (100, 5), (576, 64), (1000, 17), (1536, 20), (4096, 3)])
def test_shapes_and_groups(k, n, group_size, isa):
    check(3, k, n, group_size, seed=k + n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 6, 70])
def test_dtypes(m, dtype, isa):
    check(m, 640, 33, 128, dtype, seed=m)


@pytest.mark.parametrize("bits", [2, 4])
def test_one_width_equals_the_async_kernel(bits):
    """Every group `bits` wide: one segment empty, the same integers as async_dequant_gemm on that weight."""
    k, gs = 1000, 64
    x, weight, scales, zeros, y = check(5, k, 40, gs, seed=bits, widths=[bits] * math.ceil(k / gs))
    assert (weight.runs2 if bits == 4 else weight.runs4).numel() == 0
    ref = async_dequant_gemm(x, weight.packed, scales, zeros, gs, bits=bits)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


@given(m=st.integers(1, 9), k=st.integers(1, 700), n=st.integers(1, 40), group_size=st.sampled_from([32, 64, 128]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), isa=st.sampled_from(SUPPORTED_ISAS))
def test_random_configurations(m, k, n, group_size, dtype, seed, isa):
    with forced_isa(isa):
        check(m, k, n, group_size, dtype, seed)


def test_batch_dims_and_numpy():
    gen = torch.Generator().manual_seed(1)
    packed, _, scales, zeros, widths = random_mixed(9, 300, 64, gen)
    weight = prepare_mixed_gemm(packed, widths, 64, 300)
    x = torch.randn(2, 3, 300, generator=gen)
    y = mixed_gemm(x, weight, scales, zeros, 64)
    assert y.shape == (2, 3, 9)
    torch.testing.assert_close(y.reshape(6, 9), mixed_gemm(x.reshape(6, 300), weight, scales, zeros, 64))
    y_np = mixed_gemm(x.numpy(), weight, scales, zeros, 64)
    assert isinstance(y_np, np.ndarray)
    np.testing.assert_array_equal(y_np, y.numpy())


def test_empty_rows_and_outputs():
    gen = torch.Generator().manual_seed(2)
    packed, _, scales, zeros, widths = random_mixed(4, 64, 32, gen)
    weight = prepare_mixed_gemm(packed, widths, 32, 64)
    assert mixed_gemm(torch.zeros(0, 64), weight, scales, zeros, 32).shape == (0, 4)
    empty = prepare_mixed_gemm(packed[:0], widths, 32, 64)
    assert mixed_gemm(torch.randn(3, 64), empty, scales[:0], zeros[:0], 32).shape == (3, 0)


@pytest.mark.parametrize("m", [1, 5])
def test_cpu_paths_agree(m):
    """Every CPU path (portable, AVX2, AVX-512 VNNI) computes the same integers."""
    g = torch.Generator().manual_seed(5)
    widths = [4, 2, 2, 4, 4, 2, 4, 2, 2, 4, 2]
    cols = torch.tensor([widths[c // 64] for c in range(700)])
    codes = (torch.rand(21, 700, generator=g) * 2.0**cols).floor().to(torch.uint8)
    s = (torch.rand(21, 11, generator=g) * 0.02).half()
    z = (torch.rand(21, 11, generator=g) * 3).half()
    w = prepare_mixed_gemm(pack_mixed(codes, widths, 64), widths, 64, 700)
    x = torch.randn(m, 700, generator=g)
    outs = []
    for isa in SUPPORTED_ISAS:
        with forced_isa(isa):
            outs.append(mixed_gemm(x, w, s, z, 64))
    for isa, out in zip(SUPPORTED_ISAS[1:], outs[1:]):
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6, msg=lambda e: f"{isa}: {e}")


def _args():
    gen = torch.Generator().manual_seed(3)
    packed, _, scales, zeros, widths = random_mixed(3, 128, 32, gen, widths=[4, 2, 4, 2])
    return dict(x=torch.randn(2, 128), weight=prepare_mixed_gemm(packed, widths, 32, 128), scales=scales,
                zeros=zeros, group_size=32)


@pytest.mark.parametrize("change,match,exc", [
    (lambda a: a.update(group_size=48), "group_size must be one of", ValueError),
    (lambda a: a.update(weight=tuple(a["weight"])), "weight must be a MixedGemmWeight", TypeError),
    (lambda a: a.update(x=torch.zeros(2, 128, dtype=torch.int32)), "x must have dtype", TypeError),
    (lambda a: a.update(x=torch.zeros(2, 96)), "runs4 and runs2 must hold each of the ceil", ValueError),
    (lambda a: a.update(weight=a["weight"]._replace(runs4=a["weight"].runs4.long())), "runs4 must be an int32",
     TypeError),
    (lambda a: a.update(weight=a["weight"]._replace(runs2=a["weight"].runs4.clone())), "each of the ceil", ValueError),
    (lambda a: a.update(weight=a["weight"]._replace(runs4=a["weight"].runs4.flip(0))), "must each be increasing",
     ValueError),
    (lambda a: a.update(weight=a["weight"]._replace(packed=a["weight"].packed[:, :-1])), r"packed must be int32 \[N",
     ValueError),
    (lambda a: a.update(scales=a["scales"].float()), "scales must have dtype float16", TypeError),
    (lambda a: a.update(zeros=a["zeros"][:, :3]), r"zeros must have shape \[3, 4\]", ValueError),
])
def test_bad_input(change, match, exc):
    args = _args()
    change(args)
    with pytest.raises(exc, match=match):
        mixed_gemm(**args)


def test_native_checks_the_run_maps():
    a = _args()
    dl = torch.utils.dlpack.to_dlpack
    w = a["weight"]
    base = [torch.zeros(2, 128, dtype=torch.int8), torch.zeros(2, 4)]
    tail = [a["scales"], a["zeros"], torch.zeros(2, 3)]
    with pytest.raises(ValueError, match=r"runs2 must be increasing runs of K \(0..3\), got runs2\[1\] = 1"):
        lowbit._C.mixed_gemm(*map(dl, base + [w.packed, w.runs4, torch.tensor([3, 1], dtype=torch.int32)] + tail),
                             128, 32, 0)
    gs64 = [torch.zeros(2, 2), a["scales"][:, :2].contiguous(), a["zeros"][:, :2].contiguous()]
    with pytest.raises(ValueError, match="the runs of K-group 0 must all be in runs4 or all in runs2"):
        lowbit._C.mixed_gemm(*map(dl, [base[0], gs64[0], w.packed, torch.tensor([0, 2], dtype=torch.int32),
                                       torch.tensor([1, 3], dtype=torch.int32), gs64[1], gs64[2], tail[2]]),
                             128, 64, 0)
    with pytest.raises(ValueError, match=r"must hold the ceil\(K / 32\) = 4 runs"):
        lowbit._C.mixed_gemm(*map(dl, base + [w.packed, w.runs4, w.runs2[:1]] + tail), 128, 32, 0)


def test_torch_compile_fullgraph():
    a = _args()

    def f(x):
        return mixed_gemm(x, a["weight"], a["scales"], a["zeros"], 32) * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(a["x"]), f(a["x"]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 4, 5, 16])
@pytest.mark.parametrize("k,n,group_size", [(576, 64, 64), (4096, 1000, 128), (1000, 33, 32)])
def test_cuda_matches_cpu(m, k, n, group_size, dtype):
    with cpu_reference():
        x, weight, scales, zeros, y = check(m, k, n, group_size, dtype, seed=m + k)
    y_gpu = mixed_gemm(to_gpu(x), MixedGemmWeight(*(to_gpu(t) for t in weight)), to_gpu(scales), to_gpu(zeros),
                       group_size)
    assert_matches_cpu(y_gpu, y)


@pytest.mark.gpu
def test_cuda_prepare_matches_cpu():
    with cpu_reference():
        packed, _, _, _, widths = random_mixed(7, 1000, 64, torch.Generator().manual_seed(0))
        cpu = prepare_mixed_gemm(packed, widths, 64, 1000)
    for a, b in zip(prepare_mixed_gemm(to_gpu(packed), widths, 64, 1000), cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0)
