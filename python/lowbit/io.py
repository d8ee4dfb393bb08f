"""Checkpoints of quantized models: one safetensors file (QuantLinear tensors in the canonical layout plus every
other parameter) and lowbit.json (formats, quantization settings, lowbit version, the source model's config).
Loading checks the whole checkpoint before building anything, then rebuilds the model with QuantLinear layers."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Union

import torch
from torch import nn

from lowbit.formats import FORMAT_VERSION, TENSOR_NAMES, QuantizedWeight
from lowbit.nn import QuantLinear

CONFIG_NAME = "lowbit.json"
TENSORS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated or does not match its config."""


def save_quantized(model: nn.Module, path: Union[str, pathlib.Path]) -> pathlib.Path:
    """Writes `model` (with QuantLinear layers) to directory `path`; returns the directory."""
    from safetensors.torch import save_file

    import lowbit
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            layers[name] = {"format": module.format, "config": module.config, "bias": module.bias is not None,
                            "incoherence": module.signs_in is not None,
                            "input_perm": module.input_perm is not None}
    state, seen = {}, {}
    for key, tensor in model.state_dict().items():
        ptr = (tensor.data_ptr(), tensor.numel(), tensor.dtype) if tensor.numel() else None
        if ptr is not None and ptr in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen[ptr] = key
        state[key] = tensor.detach().contiguous().cpu()
    config = {
        "lowbit_version": lowbit.__version__,
        "format_version": FORMAT_VERSION,
        "quantization": getattr(model, "lowbit_quantization", {}),
        "layers": layers,
        "tensors": sorted(state),
        "source_model": model.config.to_dict() if hasattr(model, "config") else None,
        "model_class": type(model).__name__,
    }
    save_file(state, str(path / TENSORS_NAME), metadata={"format": "pt", "lowbit": lowbit.__version__})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=1, default=str))
    return path


def _read_config(path: pathlib.Path) -> dict:
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a lowbit checkpoint: {CONFIG_NAME} is missing")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    for key in ("format_version", "layers", "tensors", "source_model", "model_class"):
        if key not in config:
            raise CheckpointError(f"{cfg_file} lacks the key {key!r}")
    if config["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file} has format_version {config['format_version']}, this lowbit reads "
                              f"{FORMAT_VERSION}")
    return config


def _read_tensors(path: pathlib.Path, expected: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    file = path / TENSORS_NAME
    if not file.is_file():
        raise CheckpointError(f"{path} lacks {TENSORS_NAME}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None
    if sorted(tensors) != sorted(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise CheckpointError(f"{file} does not match {CONFIG_NAME}: missing {missing[:5]}, unexpected {extra[:5]}")
    return tensors


def load_quantized(path: Union[str, pathlib.Path], device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuilds a model saved by :func:`save_quantized`, QuantLinear layers included, ready to run.

    Raises:
        CheckpointError (a ValueError): the directory, config or tensors are missing, corrupt, truncated or
        inconsistent; raised before any model is built.
    """
    import transformers
    path = pathlib.Path(path)
    config = _read_config(path)
    tensors = _read_tensors(path, config["tensors"])
    weights = {}
    for name, layer in config["layers"].items():  # validate every quantized weight before building the model
        parts = {t: tensors[f"{name}.{t}"] for t in TENSOR_NAMES.get(layer.get("format"), ())
                 if f"{name}.{t}" in tensors}
        try:
            weights[name] = QuantizedWeight(layer["format"], parts, layer["config"])
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"layer {name}: {e}") from None
    model = build_uninitialized(transformers.AutoConfig.for_model(**config["source_model"]))
    for name, weight in weights.items():
        layer = config["layers"][name]
        bias = tensors.get(f"{name}.bias")
        extra = ({"signs_in": tensors[f"{name}.signs_in"], "signs_out": tensors[f"{name}.signs_out"]}
                 if layer["incoherence"] else {})
        if layer.get("input_perm"):
            extra["input_perm"] = tensors[f"{name}.input_perm"]
        set_submodule(model, name, QuantLinear(weight, bias, **extra))
    load_remaining_state(model, tensors)
    model.lowbit_quantization = config.get("quantization", {})
    return model.to(device).eval()


def build_uninitialized(model_config: Any) -> nn.Module:
    """The causal LM of a transformers config with its weights allocated but not initialized: the pages of weights
    that the checkpoint replaces (every quantized linear's dense weight) are never touched, so loading a
    quantized model peaks near its own size, not at the dense model's. Every weight must then be loaded."""
    import transformers
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return transformers.AutoModelForCausalLM.from_config(model_config)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replaces the submodule at dotted path `name` of `model` by `module`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def load_remaining_state(model: nn.Module, tensors: dict[str, torch.Tensor], loaded: tuple[str, ...] = ()) -> None:
    """Loads `tensors` into `model` and ties its embeddings as its config says. Every parameter and buffer must
    come from `tensors`, except the tied lm_head and those of the modules named in `loaded` (already set up).

    Raises:
        CheckpointError naming the first missing and unexpected keys.
    """
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in loaded and not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()


__all__ = ["save_quantized", "load_quantized", "CheckpointError", "build_uninitialized", "load_remaining_state",
           "set_submodule"]
