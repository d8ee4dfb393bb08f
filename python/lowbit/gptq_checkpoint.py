"""Checkpoints in the GPTQ format that AutoGPTQ, GPTQModel, transformers, vLLM and SGLang read and write:
loading them into lowbit layers (`load_gptq`) and exporting lowbit ``uniform`` models to it (`save_gptq`).

The format, per quantized linear ``name`` of W [N out, K in] at b = 2, 3 or 4 bits with G groups:

- ``name.qweight`` int32 [K*b/32, N]: column n is the little-endian bit stream of the codes q[n, 0..K), b bits
  each (for b = 3, 32 codes fill 3 words and codes 10 and 21 straddle words);
- ``name.qzeros`` int32 [G, N*b/32]: row g is the same bit stream of the zeros z[0..N, g] along N;
  ``checkpoint_format`` "gptq" (v1, what transformers and vLLM read) stores z - 1 and readers add 1 back,
  "gptq_v2" (GPTQModel) stores z;
- ``name.scales`` fp16 [G, N]; ``name.g_idx`` int32 [K], the group of each input channel (k // group_size, or a
  permuted assignment with ``desc_act``); optional ``name.bias`` fp16 [N];
- w[n, k] = scales[g_idx[k], n] * (q[n, k] - z[n, g_idx[k]]); settings in ``quantize_config.json`` and in
  config.json's ``quantization_config``.

Since lowbit's canonical packing is the same bit stream along K, qweight is lowbit's ``packed`` transposed and cut
to K*b/32 words. Group sizes that lowbit lacks but that are multiples of 128 (or -1, one group per row) are loaded
exactly as 128-groups with repeated scales and zeros; act-order (``desc_act``) checkpoints load with the input
permutation that makes their groups contiguous (QuantLinear ``input_perm``).
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Union

import torch
from torch import nn

from lowbit.formats import GROUP_SIZES, QuantizedWeight
from lowbit.io import CheckpointError, build_uninitialized, load_remaining_state, set_submodule
from lowbit.nn import QuantLinear
from lowbit.ops.pack import pack_uniform, unpack

QUANTIZE_CONFIG_NAME = "quantize_config.json"
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


# -- bit streams ------------------------------------------------------------------------------------------------
def stream_to_codes(words: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """uint8 codes [R, count] from int32 words [R, W] holding each row's little-endian `bits`-bit stream."""
    rows, have = words.shape
    blocks = math.ceil(count / 32)
    padded = torch.zeros(rows, blocks * bits, dtype=torch.int32)
    take = min(have, blocks * bits)
    padded[:, :take] = words[:, :take]
    return unpack(padded, bits, count)


def codes_to_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [R, ceil(count*bits/32)] holding each row of uint8 codes [R, count] as a little-endian stream."""
    count = codes.shape[1]
    return pack_uniform(codes.contiguous(), bits)[:, : math.ceil(count * bits / 32)].contiguous()


# -- one layer --------------------------------------------------------------------------------------------------
def gptq_to_quantized(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int, checkpoint_format: str = "gptq") -> tuple[QuantizedWeight, Union[torch.Tensor, None]]:
    """(QuantizedWeight in the ``uniform`` format, input permutation or None) of one GPTQ layer; exact.

    Raises:
        ValueError naming the tensor whose shape, dtype or content breaks the format.
    """
    _check_bits_and_format(bits, checkpoint_format)
    for name, t, dtype in (("qweight", qweight, torch.int32), ("qzeros", qzeros, torch.int32),
                           ("scales", scales, torch.float16), ("g_idx", g_idx, torch.int32)):
        if t.dtype != dtype and not (name == "g_idx" and t.dtype == torch.int64):
            raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if qweight.dim() != 2 or scales.dim() != 2 or g_idx.dim() != 1:
        raise ValueError(f"qweight and scales must be 2-D and g_idx 1-D, got shapes {list(qweight.shape)}, "
                         f"{list(scales.shape)}, {list(g_idx.shape)}")
    k, n, groups = g_idx.numel(), qweight.shape[1], scales.shape[0]
    if qweight.shape[0] * 32 < k * bits or qweight.shape[0] != math.ceil(k * bits / 32):
        raise ValueError(f"qweight must have shape [{math.ceil(k * bits / 32)}, {n}] for {k} inputs at {bits} bits, "
                         f"got {list(qweight.shape)}")
    if list(scales.shape) != [groups, n] or list(qzeros.shape) != [groups, math.ceil(n * bits / 32)]:
        raise ValueError(f"scales must be [G, {n}] and qzeros [G, {math.ceil(n * bits / 32)}], got "
                         f"{list(scales.shape)} and {list(qzeros.shape)}")
    g_idx = g_idx.to(torch.int64)
    if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"g_idx must hold groups in [0, {groups}), got [{int(g_idx.min())}, {int(g_idx.max())}]")
    codes = stream_to_codes(qweight.t().contiguous(), k, bits)  # [N, K]
    zeros = stream_to_codes(qzeros.contiguous(), n, bits).to(torch.float32)  # [G, N]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    perm, group_size = _contiguous_groups(g_idx, groups)
    if perm is not None:
        codes, g_idx = codes[:, perm], g_idx[perm]
    stored_group = group_size if group_size in GROUP_SIZES else 128
    first_column = torch.arange(0, k, stored_group)  # each lowbit group takes the GPTQ group of its first column
    src = g_idx[first_column]
    weight = QuantizedWeight.uniform(codes, scales.t()[:, src].contiguous(), zeros.t()[:, src].contiguous(), bits,
                                     stored_group)
    return weight, perm


def _contiguous_groups(g_idx: torch.Tensor, groups: int) -> tuple[Union[torch.Tensor, None], int]:
    """(permutation making the groups contiguous runs or None if they already are, the group length).

    Raises ValueError when groups have unequal lengths (other than the last) or a length lowbit cannot hold
    exactly (not 32/64/128 and not a multiple of 128)."""
    k = g_idx.numel()
    counts = torch.bincount(g_idx, minlength=groups)
    group_size = int(counts[0]) if groups else k
    if groups > 1 and bool((counts[:-1] != group_size).any()) or int(counts[-1]) > group_size:
        raise ValueError(f"g_idx must give every group but the last the same number of inputs, got counts "
                         f"{counts.tolist()[:8]}...")
    if group_size not in GROUP_SIZES and group_size % 128 and groups > 1:
        raise ValueError(f"group size {group_size} cannot be held exactly: lowbit groups are {GROUP_SIZES} "
                         f"(or multiples of 128, stored as 128-groups with repeated scales)")
    if groups == 1:  # group_size -1: one group per row, stored as 128-groups sharing one scale
        group_size = max(k, 1)
    if bool((g_idx[1:] >= g_idx[:-1]).all()):
        return None, group_size
    return torch.argsort(g_idx, stable=True), group_size


def quantized_to_gptq(weight: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales and g_idx of a ``uniform`` QuantizedWeight with integer zeros; exact.

    Raises:
        ValueError if the weight is not ``uniform``, its zeros are not integers in the range the format stores,
        or its shape does not fit the packing (K*bits and N*bits multiples of 32).
    """
    if weight.format != "uniform":
        raise ValueError(f"only 'uniform' weights have a GPTQ form, got {weight.format!r}")
    bits = int(weight.config["bits"])
    _check_bits_and_format(bits, checkpoint_format)
    n, k, gs = weight.out_features, weight.in_features, weight.group_size
    if (k * bits) % 32 or (n * bits) % 32:
        raise ValueError(f"the GPTQ packing needs in_features*bits and out_features*bits to be multiples of 32, "
                         f"got [{n}, {k}] at {bits} bits")
    t = weight.tensors
    zeros = t["zeros"].cpu().to(torch.float32)
    low = 1 if checkpoint_format == "gptq" else 0
    if not torch.equal(zeros, zeros.round()) or int(zeros.min()) < low or int(zeros.max()) > 2**bits - 1:
        raise ValueError(f"zeros must be integers in [{low}, {2**bits - 1}] for checkpoint_format "
                         f"{checkpoint_format!r} (quantize with integer_zero=True or symmetric=True"
                         + (", or export as 'gptq_v2' for zeros of 0" if low else "") + ")")
    stored = (zeros - 1 if checkpoint_format == "gptq" else zeros).to(torch.uint8)
    qweight = codes_to_stream(weight.codes().cpu(), bits).t().contiguous()
    return {"qweight": qweight, "qzeros": codes_to_stream(stored.t(), bits),
            "scales": t["scales"].cpu().t().contiguous(),
            "g_idx": (torch.arange(k) // gs).to(torch.int32)}


def _check_bits_and_format(bits: int, checkpoint_format: str) -> None:
    if bits not in (2, 3, 4):
        raise ValueError(f"bits must be 2, 3 or 4 (lowbit's widths), got {bits}")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")


# -- whole checkpoints ------------------------------------------------------------------------------------------
def read_gptq_config(path: Union[str, pathlib.Path]) -> dict[str, Any]:
    """The quantization settings of a GPTQ checkpoint dir: quantize_config.json, else config.json's
    quantization_config. Raises CheckpointError when neither says quant_method gptq."""
    path = pathlib.Path(path)
    candidates = [path / QUANTIZE_CONFIG_NAME, path / "config.json"]
    for file in candidates:
        if not file.is_file():
            continue
        data = _read_json(file)
        cfg = data.get("quantization_config", data) if file.name == "config.json" else data
        if isinstance(cfg, dict) and "bits" in cfg and cfg.get("quant_method", "gptq") == "gptq":
            return cfg
    raise CheckpointError(f"{path} is not a GPTQ checkpoint: no {QUANTIZE_CONFIG_NAME} and no gptq "
                          f"quantization_config in config.json")


def _read_json(file: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None


def is_gptq_checkpoint(path: Union[str, pathlib.Path]) -> bool:
    """True when `path` is a directory holding a GPTQ checkpoint's settings."""
    try:
        read_gptq_config(path)
        return True
    except CheckpointError:
        return False


def _default_g_idx(qweight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """k // group_size for the inputs of qweight (group_size -1: one group)."""
    k = qweight.shape[0] * 32 // bits
    return (torch.arange(k) // (k if group_size in (-1, 0, None) else int(group_size))).to(torch.int32)


def _read_all_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None
    return tensors


def load_gptq(path: Union[str, pathlib.Path], dtype: torch.dtype = torch.float32,
              device: Union[str, torch.device] = "cpu") -> nn.Module:
    """A Hugging Face causal LM from a GPTQ-format checkpoint directory, its quantized linears as QuantLinear
    layers running lowbit's kernels and its other parameters (embeddings, norms, lm_head) in `dtype`.

    Raises:
        CheckpointError (a ValueError): settings, config or tensors missing, corrupt or inconsistent (checked for
        every layer before the model is built).
    """
    import transformers
    path = pathlib.Path(path)
    cfg = read_gptq_config(path)
    bits, checkpoint_format = int(cfg["bits"]), cfg.get("checkpoint_format", "gptq")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} lacks config.json (the model's architecture)")
    model_config = _read_json(path / "config.json")
    for key in ("quantization_config", "dtype", "torch_dtype"):  # lowbit runs the layers; `dtype` sets the rest
        model_config.pop(key, None)
    tensors = _read_all_tensors(path)
    names = sorted(key[: -len(".qweight")] for key in tensors if key.endswith(".qweight"))
    if not names:
        raise CheckpointError(f"{path} has no quantized layer (no *.qweight tensor)")
    layers = {}
    for name in names:
        try:
            if f"{name}.g_idx" not in tensors:  # older checkpoints: groups in order, from the settings
                tensors[f"{name}.g_idx"] = _default_g_idx(tensors[f"{name}.qweight"], bits,
                                                         cfg.get("group_size", -1))
            parts = [tensors.pop(f"{name}.{s}") for s in _TENSOR_SUFFIXES]
            layers[name] = gptq_to_quantized(*parts, bits=bits, checkpoint_format=checkpoint_format)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"layer {name}: {e}") from None
    model = build_uninitialized(transformers.AutoConfig.for_model(**model_config)).to(dtype)
    model.config.dtype = dtype
    for name, (weight, perm) in layers.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != (
                weight.out_features, weight.in_features):
            raise CheckpointError(f"layer {name}: the model has {linear} there, the checkpoint "
                                  f"[{weight.out_features}, {weight.in_features}]")
        bias = tensors.pop(f"{name}.bias", None)
        set_submodule(model, name, QuantLinear(weight, None if bias is None else bias.to(dtype), input_perm=perm))
    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    load_remaining_state(model, rest, loaded=tuple(layers))
    model.lowbit_quantization = {"method": "gptq", "bits": bits, "source": "gptq checkpoint",
                                 "group_size": cfg.get("group_size"), "desc_act": cfg.get("desc_act", False)}
    return model.to(device).eval()


def save_gptq(model: nn.Module, path: Union[str, pathlib.Path], checkpoint_format: str = "gptq",
              dtype: torch.dtype = torch.float16) -> pathlib.Path:
    """Writes `model` (a Hugging Face causal LM whose quantized linears are ``uniform`` QuantLinear layers of one
    bit width and group size, with integer zeros and no incoherence) as a GPTQ checkpoint directory: one
    model.safetensors, config.json with quantization_config, and quantize_config.json. Returns the directory.

    Raises:
        ValueError naming the first layer that has no exact GPTQ form.
    """
    from safetensors.torch import save_file

    import lowbit
    path = pathlib.Path(path)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise ValueError("model has no QuantLinear layer to export")
    settings = set()
    state: dict[str, torch.Tensor] = {}
    for name, layer in quantized.items():
        if layer.signs_in is not None or layer.input_perm is not None:
            raise ValueError(f"layer {name}: incoherence-processed or permuted layers have no GPTQ form")
        weight = layer.weight
        try:
            state.update({f"{name}.{k}": v for k, v in quantized_to_gptq(weight, checkpoint_format).items()})
        except ValueError as e:
            raise ValueError(f"layer {name}: {e}") from None
        settings.add((int(weight.config["bits"]), weight.group_size))
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.detach().cpu().to(dtype)
    if len(settings) > 1:
        raise ValueError(f"a GPTQ checkpoint has one bit width and group size, the model has {sorted(settings)}")
    (bits, group_size), = settings
    seen = set()
    for key, tensor in model.state_dict().items():
        module_name = key.rpartition(".")[0]
        if module_name in quantized or (tensor.numel() and tensor.data_ptr() in seen):
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor.detach().cpu().contiguous().to(dtype if tensor.is_floating_point() else tensor.dtype)
    symmetric = all(bool((m.zeros == 2 ** (bits - 1)).all()) for m in quantized.values())
    quant_config = {"bits": bits, "group_size": group_size, "desc_act": False, "static_groups": False,
                    "sym": symmetric, "true_sequential": True, "damp_percent": 0.01, "quant_method": "gptq",
                    "checkpoint_format": checkpoint_format,
                    "meta": {"quantizer": [f"lowbit:{lowbit.__version__}"]}}
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quant_config
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")  # new and old transformers
    (path / "config.json").write_text(json.dumps(config, indent=1, default=str))
    (path / QUANTIZE_CONFIG_NAME).write_text(json.dumps(quant_config, indent=1))
    return path


__all__ = ["load_gptq", "save_gptq", "gptq_to_quantized", "quantized_to_gptq", "read_gptq_config",
           "is_gptq_checkpoint", "CHECKPOINT_FORMATS"]
