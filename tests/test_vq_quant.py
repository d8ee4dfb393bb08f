"""VQ quantizer (lowbit.quant.vq_quantize): codes and dequantization against a float64 gather of the codebooks,
proxy loss of Hessian weighting, error feedback and the residual codebook, bits per weight, QuantLinear forward
and state, quantize_linear / quantize_model with method "vq", checkpoint round trip, bad arguments."""
import math

import pytest
import torch
from torch import nn

from lowbit.formats import QuantizedWeight
from lowbit.models import quantize_linear
from lowbit.nn import QuantLinear
from lowbit.quant import HessianAccumulator, proxy_loss, vq_quantize
from lowbit.quant import vq as vq_module
from lowbit.quant.vq import entries_for_bits, nearest


def correlated_layer(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [n, k] with varying row norms and the Hessian of correlated inputs with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g))
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = (torch.randn(4 * k, k, generator=g) @ mix) * torch.exp(0.7 * torch.randn(k, generator=g))
    acc = HessianAccumulator(k)
    acc.add(x)
    return w, acc.hessian


def reference_dequantize(q: QuantizedWeight) -> torch.Tensor:
    """W_hat [N, K] in float64 from the format's definition: scale[n] * sum_r codebooks[r, codes[n, j, r]]."""
    codes = q.codes().long()
    books = q.tensors["codebooks"].double()
    w = sum(books[r][codes[:, :, r]] for r in range(codes.shape[2]))
    return (w * q.tensors["scales"].double()[:, None, None]).reshape(q.out_features, q.in_features)


@pytest.fixture(scope="module")
def layer():
    return correlated_layer(128, 256)


@pytest.fixture(scope="module")
def quantized(layer):
    w, h = layer
    return vq_quantize(w, h, iters=3, seed=5)


@pytest.mark.parametrize("entries,codebooks", [(256, 2), (512, 1)])
def test_codes_in_range_and_dequantize_matches_gather(layer, quantized, entries, codebooks):
    w, h = layer
    q = quantized if codebooks == 2 else vq_quantize(w, h, entries=entries, codebooks=codebooks, iters=3)
    assert q.format == "vq" and q.config["entries"] == entries and q.config["codebooks"] == codebooks
    codes = q.codes()
    assert codes.shape == (128, 32, codebooks) and int(codes.min()) >= 0 and int(codes.max()) < entries
    torch.testing.assert_close(q.dequantize().double(), reference_dequantize(q), rtol=1e-6, atol=1e-6)
    assert math.isfinite(proxy_loss(w, q.dequantize(), h))


@pytest.mark.parametrize("weighted", [False, True])
def test_nearest_matches_brute_force_across_chunks(monkeypatch, weighted):
    monkeypatch.setattr(vq_module, "_DISTANCE_BUDGET", 1024)  # 64-row chunks
    g = torch.Generator().manual_seed(3)
    x, centroids = torch.randn(1000, 8, generator=g), torch.randn(256, 8, generator=g)
    weight = torch.rand(1000, 8, generator=g) + 0.1 if weighted else None
    w64 = torch.ones(1000, 8, dtype=torch.float64) if weight is None else weight.double()
    brute = ((x.double()[:, None] - centroids.double()[None]) ** 2 * w64[:, None]).sum(-1).argmin(1)
    assert torch.equal(nearest(x, centroids, weight), brute)


def test_fewer_vectors_than_entries_is_nearly_lossless():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))  # 128 vectors, 256 entries
    q = vq_quantize(w, iters=2)
    assert float((q.dequantize() - w).abs().max()) < 1e-2


def test_same_seed_same_result(layer, quantized):
    w, h = layer
    again = vq_quantize(w, h, iters=3, seed=5)
    assert all(torch.equal(again.tensors[name], quantized.tensors[name]) for name in again.tensors)


def test_hessian_weighting_and_error_feedback_lower_the_proxy_loss(layer):
    w, h = layer
    plain = proxy_loss(w, vq_quantize(w, None, iters=4).dequantize(), h)
    weighted = proxy_loss(w, vq_quantize(w, h, iters=4, error_feedback=False).dequantize(), h)
    feedback = proxy_loss(w, vq_quantize(w, h, iters=4).dequantize(), h)
    assert feedback <= weighted <= plain, (feedback, weighted, plain)
    assert feedback < 0.9 * weighted


@pytest.mark.parametrize("error_feedback", [False, True])
def test_refit_keeps_the_codes_and_lowers_the_proxy_loss(layer, error_feedback):
    """The least-squares refit of codebooks and scales (codes fixed) never raises tr((W - W_hat) H (W - W_hat)^T)
    and lowers it here; without a Hessian there is nothing to refit to."""
    w, h = layer
    kept = vq_quantize(w, h, iters=3, seed=5, error_feedback=error_feedback, refit=False)
    refit = vq_quantize(w, h, iters=3, seed=5, error_feedback=error_feedback)
    torch.testing.assert_close(refit.tensors["codes"], kept.tensors["codes"], rtol=0, atol=0)
    before, after = proxy_loss(w, kept.dequantize(), h), proxy_loss(w, refit.dequantize(), h)
    assert after < 0.99 * before, (after, before)
    books, scales = vq_module._refit(w, h, kept.codes().long(), refit.tensors["codebooks"].float(),
                                     refit.tensors["scales"], 0.01)
    again = QuantizedWeight.vq(kept.codes(), books, scales)
    assert proxy_loss(w, again.dequantize(), h) <= after * 1.001  # a refit of a refit changes (almost) nothing
    torch.testing.assert_close(vq_quantize(w, None, iters=3, seed=5, refit=True).tensors["codebooks"],
                               vq_quantize(w, None, iters=3, seed=5, refit=False).tensors["codebooks"])


def test_residual_codebook_beats_one_codebook(layer):
    w, _ = layer
    errors = {r: float((vq_quantize(w, entries=256, codebooks=r, iters=4).dequantize() - w).pow(2).mean())
              for r in (1, 2)}
    assert errors[2] < 0.8 * errors[1], errors


def test_default_bits_per_weight():
    w, _ = correlated_layer(576, 576, seed=1)
    q = vq_quantize(w, iters=1)
    assert (q.config["entries"], q.config["codebooks"]) == (256, 2) and q.bits == 2 and q.group_size is None
    overhead = (2 * 256 * 8 * 16 + 576 * 16) / (576 * 576)  # codebooks and scales
    assert q.bits_per_weight == pytest.approx(2 + overhead) and q.bits_per_weight < 2.25
    n = k = 4096  # the same configuration on a realistic layer: overhead under 0.01 bit
    big = QuantizedWeight.vq(torch.zeros(n, k // 8, 2, dtype=torch.int64), q.tensors["codebooks"],
                             torch.ones(n))
    assert 2 < big.bits_per_weight < 2.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_quant_linear_forward_matches_dequantized(quantized, dtype, m):
    q = QuantLinear(quantized, bias=torch.randn(128))
    x = torch.randn(2, m, 256)
    y = q(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, m, 128)
    ref = x.double() @ q.dequantize().double().T + q.bias.double()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < tol


def test_quantize_linear_state_dict_and_repr(layer):
    w, h = layer
    lin = nn.Linear(256, 128)
    lin.weight.data = w.clone()
    q = quantize_linear(lin, "vq", 2, hessian=h, iters=3)
    assert q.format == "vq" and q.config["entries"] == 256 and q.bias is not None
    assert proxy_loss(w, q.dequantize(), h) < 0.1 * proxy_loss(w, torch.zeros_like(w), h)
    assert "format=vq" in repr(q) and "entries=256" in repr(q) and "codebooks=2" in repr(q)
    data_free = quantize_linear(lin, "vq", 2, iters=3, seed=1)
    data_free.load_state_dict(q.state_dict())
    x = torch.randn(3, 256)
    assert torch.equal(data_free(x), q(x))
    assert quantize_linear(lin, "vq", 2, codebooks=1, entries=512, iters=2).config["entries"] == 512


def test_entries_for_bits():
    assert entries_for_bits(2) == 256 and entries_for_bits(3) == 4096 and entries_for_bits(2, codebooks=1) == 65536
    with pytest.raises(ValueError, match="bits"):
        entries_for_bits(2.1)
    with pytest.raises(ValueError, match="bits"):
        entries_for_bits(1)  # 16 entries: below the format's 256


def test_quantize_model_and_checkpoint_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lowbit.io import load_quantized, save_quantized
    from lowbit.models import quantize_model
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = quantize_model(model, "vq", 2, calibration=ids, progress=False, iters=3)
    assert len(losses) == 7 and all(math.isfinite(v) and v >= 0 for v in losses.values())
    assert all(m.format == "vq" for m in model.modules() if isinstance(m, QuantLinear))
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_bad_arguments(layer):
    w, h = layer
    with pytest.raises(ValueError, match="weight must have in_features a positive multiple of 8, got 100"):
        vq_quantize(torch.randn(16, 100))
    with pytest.raises(ValueError, match="weight must be a 2-D tensor"):
        vq_quantize(torch.randn(256))
    with pytest.raises(TypeError, match="weight must be a float tensor"):
        vq_quantize(torch.ones(16, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="entries must be a power of two in \\[256, 65536\\], got 300"):
        vq_quantize(w, entries=300)
    with pytest.raises(ValueError, match="entries must be a power of two"):
        vq_quantize(w, entries=128)
    with pytest.raises(ValueError, match="codebooks must be one of"):
        vq_quantize(w, codebooks=3)
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        vq_quantize(w, iters=0)
    with pytest.raises(ValueError, match="hessian must have shape \\[256, 256\\]"):
        vq_quantize(w, h[:128, :128])
