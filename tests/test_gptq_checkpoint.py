"""GPTQ-format checkpoints (AutoGPTQ / GPTQModel / transformers / vLLM): one layer's tensors against an independent
packer that follows the published packing loops word by word, exact import (act-order g_idx, group sizes lowbit
lacks), export and round trips, whole tiny models saved and loaded, and the refusals."""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowbit.formats import QuantizedWeight  # noqa: E402
from lowbit.gptq_checkpoint import (gptq_to_quantized, is_gptq_checkpoint, load_gptq, quantized_to_gptq,  # noqa: E402
                                    save_gptq)
from lowbit.io import CheckpointError, load_quantized, save_quantized  # noqa: E402
from lowbit.models import quantize_model  # noqa: E402
from lowbit.nn import QuantLinear  # noqa: E402
from test_models import calibration, tiny_llama  # noqa: E402


# -- the reference: the packing loops as AutoGPTQ's QuantLinear.pack writes them, over rows of intweight ----------
def reference_pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """values [R, C] (the axis packed is R, as qweight packs along K) -> uint32 words [R*bits/32, C]."""
    v = values.astype(np.uint64)
    rows_out = v.shape[0] * bits // 32
    out = np.zeros((rows_out, v.shape[1]), dtype=np.uint64)
    i = row = 0
    while row < rows_out:
        if bits in (2, 4):
            for j in range(i, i + 32 // bits):
                out[row] |= v[j] << np.uint64(bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 values in 3 words, values 10 and 21 split across words
            for j in range(i, i + 10):
                out[row] |= v[j] << np.uint64(3 * (j - i))
            i += 10
            out[row] |= v[i] << np.uint64(30)
            row += 1
            out[row] |= (v[i] >> np.uint64(2)) & np.uint64(1)
            i += 1
            for j in range(i, i + 10):
                out[row] |= v[j] << np.uint64(3 * (j - i) + 1)
            i += 10
            out[row] |= v[i] << np.uint64(31)
            row += 1
            out[row] |= (v[i] >> np.uint64(1)) & np.uint64(3)
            i += 1
            for j in range(i, i + 10):
                out[row] |= v[j] << np.uint64(3 * (j - i) + 2)
            i += 10
            row += 1
    return torch.from_numpy((out & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32))


def reference_layer(n, k, bits, group_size, desc_act=False, seed=0, v1=True):
    """Random codes/zeros/scales and g_idx, packed by the reference; returns (tensors, dense weight [N, K])."""
    g = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    groups = -(-k // gs)
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    lo = 1 if v1 else 0
    z = torch.randint(lo, 2**bits, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.001).to(torch.float16)
    if desc_act:
        perm = torch.randperm(k, generator=g)
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[perm] = torch.arange(k) // gs
    else:
        g_idx = torch.arange(k) // gs
    qweight = reference_pack_rows(q.t().numpy(), bits)
    stored_z = (z - 1) if v1 else z
    qzeros = reference_pack_rows(stored_z.t().numpy(), bits).t().contiguous()
    dense = scales.float()[g_idx].t() * (q.float() - z.float()[g_idx].t())
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx.to(torch.int32)}, dense


# -- one layer --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,group_size", [(32, 128, 32), (64, 256, 128), (96, 384, 64), (32, 320, 128),
                                            (64, 512, 256), (32, 192, -1)])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_import_dequantizes_to_the_formula(bits, n, k, group_size, fmt):
    tensors, dense = reference_layer(n, k, bits, group_size, v1=fmt == "gptq")
    weight, perm = gptq_to_quantized(**tensors, bits=bits, checkpoint_format=fmt)
    assert perm is None and weight.format == "uniform" and weight.config["bits"] == bits
    assert torch.equal(weight.dequantize(torch.float32), dense)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 128, 256])
def test_act_order_import_runs_with_an_input_permutation(bits, group_size):
    n, k = 64, 512
    tensors, dense = reference_layer(n, k, bits, group_size, desc_act=True, seed=bits)
    weight, perm = gptq_to_quantized(**tensors, bits=bits)
    assert perm is not None
    layer = QuantLinear(weight, input_perm=perm)
    assert torch.equal(layer.dequantize(), dense)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    y, expected = layer(x), x @ dense.t()
    if layer.int8_activations:  # 2 bits run the async kernel: activations rounded to int8 (documented ~1%)
        assert float((y - expected).norm() / expected.norm()) < 0.02
    else:
        torch.testing.assert_close(y, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_export_matches_the_reference_packer(bits, group_size):
    n, k = 64, 320
    g = torch.Generator().manual_seed(bits)
    groups = -(-k // group_size)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    zeros = torch.randint(1, 2**bits, (n, groups), generator=g).to(torch.float16)
    scales = torch.rand(n, groups, generator=g).to(torch.float16)
    weight = QuantizedWeight.uniform(codes, scales, zeros, bits, group_size)
    out = quantized_to_gptq(weight)
    assert torch.equal(out["qweight"], reference_pack_rows(codes.t().numpy(), bits))
    assert torch.equal(out["qzeros"], reference_pack_rows((zeros.t() - 1).to(torch.int64).t().numpy(), bits).t())
    assert torch.equal(out["scales"], scales.t())
    assert torch.equal(out["g_idx"], (torch.arange(k) // group_size).to(torch.int32))
    back, perm = gptq_to_quantized(**out, bits=bits)
    assert perm is None
    for name in ("packed", "scales", "zeros"):
        assert torch.equal(back.tensors[name], weight.tensors[name]), name


def test_export_refuses_what_the_format_cannot_hold():
    codes = torch.zeros(32, 64, dtype=torch.uint8)
    scales = torch.ones(32, 2, dtype=torch.float16)
    real_zero = QuantizedWeight.uniform(codes, scales, torch.full((32, 2), 1.5), 4, 32)
    with pytest.raises(ValueError, match="integer_zero=True"):
        quantized_to_gptq(real_zero)
    zero_zero = QuantizedWeight.uniform(codes, scales, torch.zeros(32, 2), 4, 32)
    with pytest.raises(ValueError, match="gptq_v2"):
        quantized_to_gptq(zero_zero)
    assert quantized_to_gptq(zero_zero, "gptq_v2")["qzeros"].abs().sum() == 0
    odd = QuantizedWeight.uniform(torch.zeros(3, 64, dtype=torch.uint8), torch.ones(3, 2), torch.ones(3, 2), 4, 32)
    with pytest.raises(ValueError, match="multiples of 32"):
        quantized_to_gptq(odd)
    lut = QuantizedWeight.lut(codes, scales, torch.linspace(-1, 1, 16), 4, 32)
    with pytest.raises(ValueError, match="only 'uniform'"):
        quantized_to_gptq(lut)
    with pytest.raises(ValueError, match="checkpoint_format"):
        quantized_to_gptq(zero_zero, "awq")


def test_import_refuses_bad_layers():
    tensors, _ = reference_layer(32, 128, 4, 32)
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        gptq_to_quantized(**tensors, bits=8)
    with pytest.raises(ValueError, match="qweight must have shape"):
        gptq_to_quantized(**dict(tensors, qweight=tensors["qweight"][:-1]), bits=4)
    with pytest.raises(TypeError, match="scales must have dtype"):
        gptq_to_quantized(**dict(tensors, scales=tensors["scales"].float()), bits=4)
    with pytest.raises(ValueError, match="g_idx must hold groups"):
        gptq_to_quantized(**dict(tensors, g_idx=tensors["g_idx"] + 10), bits=4)
    uneven = tensors["g_idx"].clone()
    uneven[0] = 1
    with pytest.raises(ValueError, match="same number of inputs"):
        gptq_to_quantized(**dict(tensors, g_idx=uneven), bits=4)
    t16, _ = reference_layer(32, 128, 4, 16)
    with pytest.raises(ValueError, match="group size 16"):
        gptq_to_quantized(**t16, bits=4)


# -- whole checkpoints ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_model_export_and_import_round_trip(tmp_path, bits):
    model = tiny_llama()
    quantize_model(model, "gptq", bits, group_size=32, calibration=calibration(), progress=False,
                   integer_zero=True)
    ids = calibration(2, 16, seed=3)
    before = model(ids).logits
    out = save_gptq(model, tmp_path / "gptq", dtype=torch.float32)
    assert is_gptq_checkpoint(out)
    cfg = json.loads((out / "quantize_config.json").read_text())
    assert cfg["bits"] == bits and cfg["group_size"] == 32 and cfg["checkpoint_format"] == "gptq"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    loaded = load_gptq(out)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    torch.testing.assert_close(loaded(ids).logits, before, rtol=0, atol=0)
    half = load_gptq(save_gptq(model, tmp_path / "fp16"))  # default: non-quantized tensors in fp16
    torch.testing.assert_close(half(ids).logits, before, rtol=2e-2, atol=2e-2)


def test_imported_model_matches_a_dense_model_with_the_formula_weights(tmp_path):
    """A checkpoint written the way other tools write it (act-order g_idx, v1 zeros, fp16) loads exactly."""
    from safetensors.torch import save_file
    model = tiny_llama(seed=1)
    state, dense = {}, {}
    for i, (name, lin) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                                    and n != "lm_head"):
        tensors, w = reference_layer(lin.out_features, lin.in_features, 4, 32, desc_act=True, seed=i)
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
        dense[name] = w
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] not in dense and key != "lm_head.weight":
            state[key] = t.to(torch.float16)
    save_file(state, str(tmp_path / "gptq_model-4bit-32g.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {"bits": 4, "group_size": 32, "desc_act": True, "sym": False,
                                     "quant_method": "gptq"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_gptq(tmp_path)
    reference = tiny_llama(seed=1)
    reference.load_state_dict({k: v.float() for k, v in state.items() if not k.endswith(
        ("qweight", "qzeros", "scales", "g_idx"))}, strict=False)
    for name, w in dense.items():
        reference.get_submodule(name).weight.data = w
    reference.tie_weights()
    ids = calibration(2, 16, seed=4)
    expected = reference(ids).logits  # 4-bit layers round x to int8 per group (QuantLinear's async kernel)
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=2e-3, atol=3e-2 * float(expected.abs().max()))
    for name in dense:
        assert torch.equal(loaded.get_submodule(name).dequantize(), dense[name])
    again = load_quantized(save_quantized(loaded, tmp_path / "lowbit"))  # the permutation survives lowbit's format
    assert all(m.input_perm is not None for m in again.modules() if isinstance(m, QuantLinear))
    torch.testing.assert_close(again(ids).logits, loaded(ids).logits, rtol=0, atol=0)


def test_checkpoints_without_g_idx_load_in_group_order(tmp_path):
    from safetensors.torch import load_file, save_file
    model = tiny_llama()
    quantize_model(model, "rtn", 4, group_size=32, calibration=calibration(), progress=False, integer_zero=True)
    out = save_gptq(model, tmp_path / "old", dtype=torch.float32)
    tensors = {k: v for k, v in load_file(str(out / "model.safetensors")).items() if not k.endswith(".g_idx")}
    save_file(tensors, str(out / "model.safetensors"))
    ids = calibration(2, 16, seed=5)
    torch.testing.assert_close(load_gptq(out)(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a GPTQ checkpoint"):
        load_gptq(tmp_path)
    model = tiny_llama()
    quantize_model(model, "rtn", 4, group_size=32, calibration=calibration(), progress=False, integer_zero=True)
    out = save_gptq(model, tmp_path / "ok")
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_gptq(out)
    out = save_gptq(model, tmp_path / "trunc")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_gptq(out)
    from safetensors.torch import load_file, save_file
    out = save_gptq(model, tmp_path / "missing")
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.qzeros"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layer model.layers.0.mlp.up_proj"):
        load_gptq(out)


def test_save_refuses_models_without_an_exact_gptq_form(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_gptq(model, tmp_path / "a")
    quantize_model(model, "rtn", 4, group_size=32, calibration=calibration(), progress=False)  # real-valued zeros
    with pytest.raises(ValueError, match="integer_zero=True"):
        save_gptq(model, tmp_path / "b")
    quip = tiny_llama()
    quantize_model(quip, "quip", 4, group_size=32, calibration=calibration(), progress=False)
    with pytest.raises(ValueError, match="incoherence"):
        save_gptq(quip, tmp_path / "c")


def test_cli_converts_both_ways(tmp_path, capsys):
    from lowbit import cli
    from test_generate import byte_tokenizer
    model = tiny_llama()
    quantize_model(model, "gptq", 4, group_size=32, calibration=calibration(), progress=False, integer_zero=True)
    src = save_quantized(model, tmp_path / "lowbit")
    byte_tokenizer().save_pretrained(str(src))
    cli.main(["convert", "--model", str(src), "--to", "gptq", "--out", str(tmp_path / "gptq")])
    assert "wrote gptq checkpoint" in capsys.readouterr().out
    assert is_gptq_checkpoint(tmp_path / "gptq") and (tmp_path / "gptq" / "tokenizer.json").is_file()
    cli.main(["convert", "--model", str(tmp_path / "gptq"), "--to", "lowbit", "--out", str(tmp_path / "back")])
    ids = calibration(2, 16, seed=6)
    torch.testing.assert_close(load_quantized(tmp_path / "back")(ids).logits, model(ids).logits,
                               rtol=2e-2, atol=2e-2)  # the GPTQ file holds the non-quantized tensors in fp16
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    ppl = {}
    for flag in ([], ["--float-activations"]):
        cli.main(["eval", "ppl", "--model", str(tmp_path / "gptq"), "--text", str(text), "--context", "32", *flag])
        ppl[bool(flag)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert ppl[True] != ppl[False] and abs(ppl[True] / ppl[False] - 1) < 0.05  # int8 x vs unrounded x
    real_zeros = tiny_llama()
    quantize_model(real_zeros, "rtn", 4, group_size=32, calibration=calibration(), progress=False)
    bad = save_quantized(real_zeros, tmp_path / "real")
    byte_tokenizer().save_pretrained(str(bad))
    with pytest.raises(SystemExit, match="integer_zero=True"):
        cli.main(["convert", "--model", str(bad), "--to", "gptq", "--out", str(tmp_path / "no")])
    with pytest.raises(SystemExit, match="--mse applies to rtn, gptq and quip"):
        cli.main(["quantize", "--model", str(src), "--method", "vq", "--mse", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--integer-zero applies to rtn and gptq"):
        cli.main(["quantize", "--model", str(src), "--method", "quip", "--integer-zero", "--out", str(tmp_path / "x")])
