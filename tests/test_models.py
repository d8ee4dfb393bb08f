"""Whole-model pipeline on a tiny random Llama built from a config (no download): quantize_model with each
method, QuantLinear forward vs the dequantized dense model, save/load round trip, refused checkpoints, CLI."""
import json
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from lowbit.io import CheckpointError, load_quantized, save_quantized  # noqa: E402
from lowbit.models import find_decoder_layers, perplexity, quantize_model  # noqa: E402
from lowbit.nn import QuantLinear  # noqa: E402


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def calibration(n=8, length=32, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def dense_copy_with_dequantized_weights(model: nn.Module) -> nn.Module:
    """The same model with each QuantLinear replaced by an nn.Linear holding QuantLinear.dequantize()."""
    import copy
    dense = copy.deepcopy(model)

    for name, module in list(dense.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, QuantLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                lin.weight.data = child.dequantize()
                if child.bias is not None:
                    lin.bias.data = child.bias.data.clone()
                setattr(module, child_name, lin)
    return dense


def test_find_decoder_layers():
    model = tiny_llama()
    assert find_decoder_layers(model) is model.model.layers
    with pytest.raises(ValueError, match="no stack of decoder blocks"):
        find_decoder_layers(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("method,bits", [("rtn", 4), ("nf", 4), ("gptq", 3), ("quip", 2), ("mixed", 2.5)])
def test_quantize_model_runs_and_matches_dequantized(method, bits):
    model = tiny_llama()
    ids = calibration()
    before = model(ids).logits
    losses = quantize_model(model, method, bits, group_size=32, calibration=ids, progress=False)
    n_linear = 2 * 7
    assert len(losses) == n_linear and all(math.isfinite(v) and v >= 0 for v in losses.values())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_linear
    assert isinstance(model.lm_head, nn.Linear)
    after = model(ids).logits
    reference = dense_copy_with_dequantized_weights(model)(ids).logits
    int8 = any(m.int8_activations for m in model.modules() if isinstance(m, QuantLinear))
    assert int8 == (bits != 3)  # the 2/4-bit async kernel rounds x (and an NF table) to int8
    tol = 3e-2 * float(reference.abs().max()) if int8 else 2e-3
    torch.testing.assert_close(after, reference, rtol=2e-3, atol=tol)
    assert not torch.allclose(after, before)


def test_gptq_beats_rtn_on_the_model():
    ids = calibration(16, 32)
    rtn = sum(quantize_model(tiny_llama(), "rtn", 2, 32, calibration=ids, progress=False).values())
    gptq = sum(quantize_model(tiny_llama(), "gptq", 2, 32, calibration=ids, progress=False).values())
    assert gptq < rtn


def test_save_load_roundtrip_bit_exact(tmp_path):
    model = tiny_llama()
    ids = calibration()
    quantize_model(model, "quip", 2, 32, calibration=ids, progress=False)
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    config = json.loads((tmp_path / "ckpt" / "lowbit.json").read_text())
    assert config["quantization"]["method"] == "quip" and config["lowbit_version"]


@pytest.mark.parametrize("with_calibration", [True, False])
def test_quantized_lm_head(tmp_path, with_calibration):
    """lm_head_bits quantizes the tied head too (GPTQ with calibration, RTN without), unties it from the
    embeddings, and survives save/load; the proxy loss needs calibration."""
    model = tiny_llama()
    ids = calibration()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embed = model.model.embed_tokens.weight.detach().clone()
    losses = quantize_model(model, "gptq" if with_calibration else "rtn", 4, 32,
                            calibration=ids if with_calibration else None, progress=False, lm_head_bits=4)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.weight.config["bits"] == 4
    assert math.isfinite(losses["lm_head"]) == with_calibration
    assert not model.config.tie_word_embeddings and model.lowbit_quantization["lm_head_bits"] == 4
    assert torch.equal(model.model.embed_tokens.weight, embed)  # the embeddings stay as they were
    err = (model.lm_head.dequantize() - embed).abs().max()
    assert 0 < err < 0.1 * embed.abs().max()
    reference = dense_copy_with_dequantized_weights(model)(ids).logits
    torch.testing.assert_close(model(ids).logits, reference, rtol=2e-3, atol=3e-2 * float(reference.abs().max()))
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    assert isinstance(loaded.lm_head, QuantLinear) and not loaded.config.tie_word_embeddings
    assert torch.equal(loaded.model.embed_tokens.weight, embed)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_gptq_head_beats_rtn_head():
    ids = calibration(16, 32)
    losses = [quantize_model(tiny_llama(), "rtn", 2, 32, calibration=ids, progress=False, lm_head_bits=2,
                             skip=("layers",))["lm_head"],
              quantize_model(tiny_llama(), "gptq", 2, 32, calibration=ids, progress=False, lm_head_bits=2,
                             skip=("layers",))["lm_head"]]
    assert losses[1] < losses[0]


def test_corrupt_checkpoints_are_refused(tmp_path):
    model = tiny_llama()
    quantize_model(model, "rtn", 4, 32, progress=False)
    ckpt = save_quantized(model, tmp_path / "ok")
    with pytest.raises(CheckpointError, match="lowbit.json is missing"):
        load_quantized(tmp_path)
    # truncated tensors
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_quantized(ckpt)
    (ckpt / "model.safetensors").write_bytes(data)
    # bad json
    good = (ckpt / "lowbit.json").read_text()
    (ckpt / "lowbit.json").write_text(good[:100])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(ckpt)
    # config that disagrees with the tensors
    cfg = json.loads(good)
    name = next(iter(cfg["layers"]))
    cfg["layers"][name]["config"]["bits"] = 2
    (ckpt / "lowbit.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"layer {name}: tensor 'packed' must have shape"):
        load_quantized(ckpt)
    (ckpt / "lowbit.json").write_text(good)
    assert isinstance(load_quantized(ckpt), nn.Module)


def test_perplexity_matches_manual_computation():
    model = tiny_llama()
    tokens = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(1))
    ppl = perplexity(model, tokens, context=32, batch_size=2)
    windows = tokens[:96].reshape(3, 32)
    logits = model(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), windows[:, 1:].reshape(-1))
    assert ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_quantize_model_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_model(model, "awq", 4)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_model(model, "gptq", 4)
    for bad in (8, 2.5, True):
        with pytest.raises(ValueError, match="lm_head_bits must be None, 2, 3 or 4"):
            quantize_model(model, "rtn", 4, lm_head_bits=bad)
    with pytest.raises(ValueError, match="tokenizer"):
        quantize_model(model, "gptq", 4, calibration=["some text"])
    with pytest.raises(ValueError, match="LongTensor"):
        quantize_model(model, "gptq", 4, calibration=torch.zeros(4, 8))
