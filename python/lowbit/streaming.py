"""Quantization of a Hugging Face checkpoint directory that never holds its full-precision weights: the model is
built with uninitialized (untouched) weights, the tensors outside the decoder blocks are read from the safetensors
shards, and each block's tensors are read only when quantize_model reaches that block, so memory peaks near one
full-precision block plus the quantized model."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Union

import torch
from torch import nn

from lowbit.io import CheckpointError, build_uninitialized
from lowbit.models import find_decoder_layers, quantize_model

INDEX_NAME = "model.safetensors.index.json"


class ShardedTensors:
    """Lazy access to the tensors of a directory of safetensors files (one file, or shards with an index). Each
    read opens the shards it needs and closes them again, so no file stays mapped (and counted in the process's
    resident memory) once its tensors are copied out."""

    def __init__(self, path: Union[str, pathlib.Path]):
        path = pathlib.Path(path)
        index = path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (path / name).is_file():
                    raise CheckpointError(f"{index}: shard {name} is missing")
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            weight_map = {key: name for name in files for key in self._open(path / name).keys()}
        if not files:
            raise CheckpointError(f"{path} holds no .safetensors file")
        self.path, self.files = path, weight_map

    @staticmethod
    def _open(file: pathlib.Path):
        from safetensors import safe_open
        try:
            return safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return sorted(self.files)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors named `keys`, copied out of their shards."""
        out = {}
        for name in sorted({self.files[k] for k in keys}):
            with self._open(self.path / name) as handle:
                out.update({k: handle.get_tensor(k).clone() for k in keys if self.files[k] == name})
        return out


def _load_exactly(module: nn.Module, tensors: dict[str, torch.Tensor], what: str, may_miss=lambda key: False):
    """Loads `tensors` into `module`; raises unless they are exactly its state (keys `may_miss` accepts aside)."""
    try:
        missing, unexpected = module.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # tensors of the wrong shape
        raise CheckpointError(f"checkpoint does not fit {what}: {str(e).strip().splitlines()[-1]}") from None
    missing = [k for k in missing if not may_miss(k)]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit {what}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def quantize_pretrained(path: Union[str, pathlib.Path], method: str = "gptq", bits: Union[int, float] = 4,
                        group_size: int = 128, **kwargs: Any) -> tuple[nn.Module, dict[str, float]]:
    """Loads and quantizes a Hugging Face causal LM directory (config.json + safetensors, sharded or not) block by
    block, reading each decoder block's weights only when its turn comes.

    Args:
        path: the model directory (local files only).
        method, bits, group_size, kwargs: as for :func:`lowbit.quantize_model` (calibration, tokenizer, skip,
            n_samples, seq_len, batch_size, progress, finetune_epochs, quantizer options...).

    Returns:
        (the quantized model, float32 outside the quantized layers, in eval mode, with ``model.lowbit_quantization``
        set: save it with :func:`lowbit.save_quantized`; the proxy losses quantize_model returns).

    Raises:
        CheckpointError (a ValueError): no safetensors, a missing shard, or tensors that do not fit the config.
    """
    import transformers
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
    tensors = ShardedTensors(path)
    model = build_uninitialized(transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)).eval()
    layers = find_decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers) + "."
    outside = [k for k in tensors.keys() if not k.startswith(prefix)]
    tied = getattr(model.config, "tie_word_embeddings", False)
    _load_exactly(model, tensors.read(outside), type(model).__name__,
                  lambda key: key.startswith(prefix) or (tied and key == "lm_head.weight"))
    if tied:
        model.tie_weights()

    def load_block(index: int, block: nn.Module) -> None:
        own = f"{prefix}{index}."
        keys = [k for k in tensors.keys() if k.startswith(own)]
        _load_exactly(block, {k[len(own):]: v for k, v in tensors.read(keys).items()}, f"block {index}")

    losses = quantize_model(model, method, bits, group_size, before_block=load_block, **kwargs)
    return model, losses


__all__ = ["quantize_pretrained", "ShardedTensors"]
