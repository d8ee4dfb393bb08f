"""QuantLinear: forward against x @ dequantize(W).T in float64 for each format and incoherence; from_linear,
state_dict round trip, device moves, replace_linear, quantize_linear, errors, torch.compile."""
import pytest
import torch
from torch import nn

from lowbit.models import quantize_linear
from lowbit.nn import QuantLinear, replace_linear
from lowbit.quant import HessianAccumulator

from gpu_device import GPU, cpu_reference, on_gpu, to_gpu


def hessian(k, seed=0):
    acc = HessianAccumulator(k)
    acc.add(torch.randn(256, k, generator=torch.Generator().manual_seed(seed)))
    return acc.hessian


@pytest.mark.parametrize("method,bits", [("rtn", 2), ("rtn", 3), ("rtn", 4), ("nf", 2), ("nf", 3), ("nf", 4),
                                         ("gptq", 4), ("quip", 2), ("mixed", 2.5), ("vq", 2)])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_dequantized(method, bits, m, dtype):
    lin = nn.Linear(192, 96, bias=True)
    q = quantize_linear(lin, method, bits, 64, hessian=hessian(192), **(dict(iters=3) if method == "vq" else {}))
    x = torch.randn(m, 192)
    ref = x.double() @ q.dequantize().double().T + lin.bias.double()
    y = q(x.to(dtype))
    assert y.dtype == dtype and y.shape == (m, 96)
    assert q.int8_activations == (method != "vq" and bits != 3)
    # int8 activations (the async kernel) round x per group (and an NF table to int8): ~0.5% relative error
    tol = 3e-2 if q.int8_activations or dtype != torch.float32 else 1e-4
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < tol, float(err)


@pytest.mark.gpu
@pytest.mark.parametrize("method,bits", [("rtn", 2), ("rtn", 3), ("rtn", 4), ("nf", 4), ("quip", 2), ("mixed", 2.5),
                                         ("vq", 2)])
@pytest.mark.parametrize("m", [1, 7, 128])  # 128: the dense path of lowbit.ops.dense_path
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_forward_matches_dequantized(method, bits, m, dtype):
    n = 224 if method == "quip" else 200  # quip needs Hadamard-supported sizes: 200 = 8 * 25 is not
    lin = nn.Linear(576, n, bias=True)
    with cpu_reference():
        q = quantize_linear(lin, method, bits, 64, hessian=hessian(576), **(dict(iters=3) if method == "vq" else {}))
        ref_w = q.dequantize().double()
    q = q.to(GPU)  # .cuda(); under emulation .to rebuilds the layer's GEMM operands for the emulated kernels
    x = torch.randn(2, m, 576)
    y = q(to_gpu(x.to(dtype)))
    assert on_gpu(y) and y.dtype == dtype and y.shape == (2, m, n)
    ref = x.to(dtype).double() @ ref_w.T + lin.bias.double()
    err = (y.cpu().double() - ref).abs().max() / ref.abs().max()
    assert err < 3e-2, float(err)


def test_state_dict_roundtrip_and_repr():
    lin = nn.Linear(128, 64)
    q = quantize_linear(lin, "mixed", 3, 32, hessian=hessian(128))
    q2 = quantize_linear(lin, "mixed", 3, 32, hessian=hessian(128, seed=1))
    q2.load_state_dict(q.state_dict())
    x = torch.randn(4, 128)
    torch.testing.assert_close(q2(x), q(x))
    assert "format=mixed" in repr(q) and "group_size=32" in repr(q)


def test_vq_state_dict_roundtrip_and_repr():
    lin = nn.Linear(128, 64)
    q = quantize_linear(lin, "vq", 2, hessian=hessian(128), iters=3)
    q2 = quantize_linear(lin, "vq", 2, iters=3, seed=1)
    q2.load_state_dict(q.state_dict())
    x = torch.randn(4, 128)
    torch.testing.assert_close(q2(x), q(x), rtol=0, atol=0)
    assert sorted(q.state_dict()) == ["bias", "codebooks", "codes", "scales"]
    assert "format=vq, bits=2, codebooks=2, entries=256" in repr(q)


def test_replace_linear_skips_and_swaps():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    replace_linear(model, lambda name, lin: quantize_linear(lin, "rtn", 4, 32), skip=("2",))
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], nn.Linear)


@pytest.mark.parametrize("method", ["quip", "vq"])
def test_torch_compile_module(method):
    lin = nn.Linear(128, 64)
    options = dict(bits=2, iters=3) if method == "vq" else dict(bits=4)
    q = quantize_linear(lin, method, group_size=32, hessian=hessian(128), **options)
    x = torch.randn(5, 128)
    compiled = torch.compile(q, fullgraph=True)
    torch.testing.assert_close(compiled(x), q(x), rtol=1e-4, atol=1e-4)


def test_errors():
    lin = nn.Linear(64, 32)
    with pytest.raises(ValueError, match="needs the layer's input Hessian"):
        quantize_linear(lin, "gptq", 4, 32)
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_linear(lin, "awq", 4, 32)
    q = quantize_linear(lin, "rtn", 4, 32)
    with pytest.raises(ValueError, match="last dimension 64"):
        q(torch.randn(2, 32))
    with pytest.raises(TypeError, match="QuantizedWeight"):
        QuantLinear(lin.weight)
    with pytest.raises(ValueError, match="weight has shape"):
        QuantLinear.from_linear(nn.Linear(32, 32), q.weight)


@pytest.mark.parametrize("method,bits", [("rtn", 4), ("rtn", 2), ("mixed", 2.5)])
def test_input_permutation(method, bits):
    """With input_perm p the layer applies W with W[:, p[j]] = stored column j: y = x[..., p] @ stored^T."""
    lin = nn.Linear(192, 64, bias=True)
    q = quantize_linear(lin, method, bits, 64, hessian=hessian(192))
    perm = torch.randperm(192, generator=torch.Generator().manual_seed(0))
    permuted = QuantLinear(q.weight, lin.bias.detach(), input_perm=perm)
    stored = q.dequantize()
    expected_weight = torch.empty_like(stored)
    expected_weight[:, perm] = stored
    assert torch.equal(permuted.dequantize(), expected_weight)
    x = torch.randn(5, 192)
    torch.testing.assert_close(permuted(x), q(x[:, perm]), rtol=0, atol=0)
    assert "input_perm=True" in repr(permuted)


def test_input_permutation_is_checked():
    q = quantize_linear(nn.Linear(64, 32), "rtn", 4, 32)
    with pytest.raises(TypeError, match="input_perm must be an integer tensor"):
        QuantLinear(q.weight, input_perm=torch.arange(64.0))
    with pytest.raises(ValueError, match=r"input_perm must have shape \[64\]"):
        QuantLinear(q.weight, input_perm=torch.arange(63))
    with pytest.raises(ValueError, match="permutation of 0..63"):
        QuantLinear(q.weight, input_perm=torch.zeros(64, dtype=torch.int64))
    signs = torch.ones(64), torch.ones(32)
    with pytest.raises(ValueError, match="cannot be combined"):
        QuantLinear(q.weight, signs_in=signs[0], signs_out=signs[1], input_perm=torch.arange(64))


def test_eager_calls_skip_the_dispatcher_but_tracing_does_not():
    """QuantLinear's kernels run their implementation directly on plain tensors and the registered custom op on
    meta / fake tensors (what torch.compile and export trace with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowbit.ops._native import eager_fast_path
    calls = []
    fast = eager_fast_path(lambda x: calls.append("op") or x, lambda x: calls.append("impl") or x)
    fast(torch.ones(2))
    fast(torch.ones(2, device="meta"))
    with FakeTensorMode() as mode:
        fast(mode.from_tensor(torch.ones(2)))
    assert calls == ["impl", "op", "op"]


@pytest.mark.parametrize("method,bits", [("rtn", 4), ("quip", 2), ("vq", 2)])
def test_forward_checks_x(method, bits):
    q = quantize_linear(nn.Linear(64, 32), method, bits, 32, hessian=hessian(64),
                        **(dict(iters=2, entries=256) if method == "vq" else {}))
    with pytest.raises(TypeError, match="x must have dtype float32, float16 or bfloat16, got torch.int64"):
        q(torch.ones(2, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must have last dimension 64"):
        q(torch.ones(2, 63))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        q([[1.0] * 64])
    assert q(torch.ones(3, 5, 64)).shape == (3, 5, 32) and q(torch.ones(0, 64)).shape == (0, 32)


def test_incoherence_signs_are_checked_once():
    q = quantize_linear(nn.Linear(64, 32), "rtn", 4, 32)
    with pytest.raises(ValueError, match="signs_in must contain only"):
        QuantLinear(q.weight, signs_in=torch.full((64,), 0.5), signs_out=torch.ones(32))
    with pytest.raises(ValueError, match=r"signs_out must have shape \[32\]"):
        QuantLinear(q.weight, signs_in=torch.ones(64), signs_out=torch.ones(31))


@pytest.mark.parametrize("rows", [2, 7])  # 2-bit, 2 rows: the pair GEMV over interleaved codes on AVX-512
@pytest.mark.parametrize("method,bits", [("rtn", 4), ("rtn", 2), ("nf", 4), ("nf", 2), ("mixed", 3)])
def test_float_activations_run_the_lut_kernel_on_unrounded_x(method, bits, rows):
    lin = nn.Linear(192, 64, bias=True)
    q = quantize_linear(lin, method, bits, 64, hessian=hessian(192))
    exact = QuantLinear(q.weight, lin.bias.detach(), float_activations=True)
    assert q.int8_activations and not exact.int8_activations
    x = torch.randn(rows, 192)
    with torch.no_grad():
        ref = x.double() @ q.dequantize().double().T + lin.bias.double()
        err_exact = float((exact(x).double() - ref).abs().max() / ref.abs().max())
        err_int8 = float((q(x).double() - ref).abs().max() / ref.abs().max())
    assert err_exact < 1e-5 and 1e-5 < err_int8 < 3e-2
    with pytest.raises(TypeError, match="float_activations must be a bool"):
        QuantLinear(q.weight, float_activations=1)


def test_set_float_activations_switches_every_layer():
    from lowbit.nn import set_float_activations
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    replace_linear(model, lambda name, lin: quantize_linear(lin, "rtn", 4, 32), skip=())
    x = torch.randn(3, 128)
    with torch.no_grad():
        fast = model(x)
        assert set_float_activations(model, True) == 2
        assert not any(m.int8_activations for m in model.modules() if isinstance(m, QuantLinear))
        exact = model(x)
        h = torch.relu(x @ model[0].dequantize().T + model[0].bias)
        torch.testing.assert_close(exact, h @ model[2].dequantize().T + model[2].bias, rtol=1e-5, atol=1e-5)
        set_float_activations(model, False)
        torch.testing.assert_close(model(x), fast, rtol=0, atol=0)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        model[0].set_float_activations("yes")
