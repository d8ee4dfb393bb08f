"""Block-wise fine-tuning (lowbit.quant.finetune): the differentiable stand-in of each format equals the
QuantLinear it replaces, training lowers a real block's output error with codes untouched, a run that cannot help
is undone, and quantize_model(..., finetune_epochs=...) brings a tiny Llama closer to its fp32 self."""
import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from lowbit.io import load_quantized, save_quantized  # noqa: E402
from lowbit.models import find_decoder_layers, quantize_linear, quantize_model  # noqa: E402
from lowbit.nn import QuantLinear  # noqa: E402
from lowbit.quant import HessianAccumulator, finetune_block  # noqa: E402
from lowbit.quant.finetune import TunableLinear  # noqa: E402
from test_models import calibration, tiny_llama  # noqa: E402


def _layer(method: str, bits, k: int = 96, n: int = 40, bias: bool = True, **options) -> QuantLinear:
    torch.manual_seed(1)
    linear = nn.Linear(k, n, bias=bias)
    acc = HessianAccumulator(k, torch.device("cpu"))
    acc.add(torch.randn(256, k))
    return quantize_linear(linear, method, bits, 32, acc.hessian, **options)


LAYERS = {
    "uniform": lambda: _layer("rtn", 4),
    "uniform-ragged": lambda: _layer("gptq", 3, k=80),
    "lut": lambda: _layer("nf", 2, bias=False),
    "mixed": lambda: _layer("mixed", 2.5),
    "vq": lambda: _layer("vq", 2, entries=256),
    "quip": lambda: _layer("quip", 2, k=64, n=48),
}


@pytest.mark.parametrize("kind", sorted(LAYERS) + ["permuted"])
def test_tunable_linear_equals_the_quant_linear(kind):
    layer = LAYERS.get(kind, LAYERS["uniform"])()
    if kind == "permuted":
        layer = QuantLinear(layer.weight, layer.bias, input_perm=torch.randperm(layer.in_features))
    layer.set_float_activations(True)
    x = torch.randn(5, 3, layer.in_features)
    tunable = TunableLinear(layer)
    torch.testing.assert_close(tunable(x), layer(x), rtol=1e-4, atol=1e-4)
    rebuilt = tunable.to_quant_linear()
    for name, value in layer.weight.tensors.items():
        assert torch.equal(rebuilt.weight.tensors[name], value), name
    for name in ("signs_in", "signs_out", "input_perm"):
        a, b = getattr(layer, name), getattr(rebuilt, name)
        assert (a is None and b is None) or torch.equal(a.to(b.dtype), b), name
    torch.testing.assert_close(rebuilt(x), layer(x))


def test_tunable_linear_is_differentiable_in_its_parameters():
    tunable = TunableLinear(LAYERS["vq"]())
    tunable(torch.randn(4, 96)).square().sum().backward()
    assert tunable.codebooks.grad is not None and tunable.codebooks.grad.abs().sum() > 0
    assert tunable.scales.grad is not None and tunable.scales.grad.abs().sum() > 0


def _quantized_block(method="rtn", bits=2, **options):
    model = tiny_llama()
    ids = calibration(8, 32)
    captured = []
    block = find_decoder_layers(model)[0]
    handle = block.register_forward_pre_hook(lambda m, a, kw: captured.append((a[0].detach(), {
        k: v for k, v in kw.items() if k != "hidden_states"})), with_kwargs=True)
    with torch.no_grad():
        for batch in ids.split(2):
            model(input_ids=batch, use_cache=False)
    handle.remove()
    with torch.no_grad():
        outputs = [block(h, **kw) for h, kw in captured]
    targets = [out[0] if isinstance(out, tuple) else out for out in outputs]
    for name, linear in list(block.named_modules()):
        if isinstance(linear, nn.Linear):
            parent = block.get_submodule(name.rpartition(".")[0])
            setattr(parent, name.rpartition(".")[2], quantize_linear(linear, method, bits, 32, **options))
    return block, captured, targets


def test_finetune_block_lowers_the_error_and_keeps_the_codes():
    block, inputs, targets = _quantized_block("rtn", 2)
    codes = {n: m.weight.codes().clone() for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    scales = {n: m.scales.clone() for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    norm = block.input_layernorm.weight.detach().clone()
    block.input_layernorm.weight.requires_grad_(False)
    before, after = finetune_block(block, inputs, targets, epochs=6, lr=1e-3)
    assert after < 0.9 * before
    tuned = {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    assert tuned.keys() == codes.keys()
    for name, layer in tuned.items():
        assert torch.equal(layer.weight.codes(), codes[name])
        assert not torch.equal(layer.scales, scales[name])
    assert not torch.equal(block.input_layernorm.weight, norm)
    assert not block.input_layernorm.weight.requires_grad  # the flag is given back as it was


def test_finetune_block_keeps_integer_zeros():
    block, inputs, targets = _quantized_block("rtn", 3)
    layers = [m for m in block.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.zeros.copy_(layer.zeros.round())
    zeros = [layer.zeros.clone() for layer in layers]
    finetune_block(block, inputs, targets, epochs=2)
    for layer, z in zip([m for m in block.modules() if isinstance(m, QuantLinear)], zeros):
        assert torch.equal(layer.zeros, z)


def test_finetune_block_that_cannot_help_is_undone():
    block, inputs, targets = _quantized_block("rtn", 4)
    layers = {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    norm = block.post_attention_layernorm.weight.detach().clone()
    before, after = finetune_block(block, inputs, targets, epochs=3, lr=30.0)
    assert after == before
    assert {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)} == layers
    assert torch.equal(block.post_attention_layernorm.weight, norm)


def test_finetune_block_bad_arguments():
    block, inputs, targets = _quantized_block("rtn", 4)
    with pytest.raises(ValueError, match="epochs"):
        finetune_block(block, inputs, targets, epochs=-1)
    with pytest.raises(ValueError, match="lr"):
        finetune_block(block, inputs, targets, lr=0.0)
    with pytest.raises(ValueError, match="one length"):
        finetune_block(block, inputs, targets[:-1])
    assert finetune_block(block, inputs, targets, epochs=0)[0] == finetune_block(block, inputs, targets, 0)[1]


@pytest.mark.parametrize("method,bits,target", [("rtn", 2, "block"), ("vq", 2, "block"), ("rtn", 2, "model")])
def test_quantize_model_finetune_gets_closer_to_fp32(method, bits, target, tmp_path):
    ids = calibration(8, 32)
    fp = tiny_llama()
    with torch.no_grad():
        reference = fp(ids).logits
    plain, tuned = tiny_llama(), tiny_llama()
    options = {"entries": 256} if method == "vq" else {}
    quantize_model(plain, method, bits, 32, calibration=ids, batch_size=2, progress=False, **options)
    quantize_model(tuned, method, bits, 32, calibration=ids, batch_size=2, progress=False, finetune_epochs=4,
                   finetune_target=target, **options)
    with torch.no_grad():
        error_plain = float((plain(ids).logits - reference).square().mean())
        error_tuned = float((tuned(ids).logits - reference).square().mean())
    assert error_tuned < error_plain
    record = tuned.lowbit_quantization["finetune"]
    assert record["epochs"] == 4 and record["target"] == target and len(record["relative_error_before_after"]) == 2
    assert all(after <= before for before, after in record["relative_error_before_after"])
    save_quantized(tuned, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, tuned(ids).logits, rtol=0, atol=0)


def test_quantize_model_finetune_needs_calibration():
    with pytest.raises(ValueError, match="finetune_epochs needs calibration"):
        quantize_model(tiny_llama(), "rtn", 4, 32, progress=False, finetune_epochs=2)
    with pytest.raises(ValueError, match="finetune_epochs must be"):
        quantize_model(copy.deepcopy(tiny_llama()), "rtn", 4, 32, calibration=calibration(), progress=False,
                       finetune_epochs=-2)
    with pytest.raises(ValueError, match="finetune_target must be"):
        quantize_model(tiny_llama(), "rtn", 4, 32, calibration=calibration(), progress=False, finetune_epochs=1,
                       finetune_target="logits")


def test_cli_quantize_with_finetune(tmp_path, capsys):
    from lowbit import cli
    from test_generate import byte_tokenizer
    src = tmp_path / "fp"
    tiny_llama().save_pretrained(str(src))
    byte_tokenizer().save_pretrained(str(src))
    cli.main(["quantize", "--model", str(src), "--method", "rtn", "--bits", "2", "--group-size", "32",
              "--n-samples", "4", "--seq-len", "32", "--batch-size", "2", "--finetune-epochs", "2",
              "--out", str(tmp_path / "q")])
    assert "quantized 14 linear layers" in capsys.readouterr().out
    assert load_quantized(tmp_path / "q").lowbit_quantization["finetune"]["epochs"] == 2
    with pytest.raises(SystemExit, match="--finetune-epochs must be >= 0"):
        cli.main(["quantize", "--model", str(src), "--finetune-epochs", "-1", "--out", str(tmp_path / "x")])
