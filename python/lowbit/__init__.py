"""lowbit: 2- to 4-bit LLM kernels and quantizers with CPU and CUDA backends."""
from __future__ import annotations

from lowbit import _C
from lowbit import ops
from lowbit.gptq_checkpoint import load_gptq, save_gptq
from lowbit.io import load_quantized, save_quantized
from lowbit.models import quantize_linear, quantize_model
from lowbit.nn import QuantLinear, replace_linear
from lowbit.streaming import quantize_pretrained
from lowbit.ops import hadamard_transform, randomized_hadamard_transform

__version__: str = _C.build_info()["version"]


def cuda_available() -> bool:
    """True when lowbit was built with CUDA kernels and a CUDA device is usable now."""
    return bool(_C.cuda_built()) and _C.cuda_device_count() > 0


def build_info() -> dict:
    """What was built: version, C++ and CUDA compilers, CUDA archs, CPU features, OpenMP threads."""
    info = dict(_C.build_info())
    info["cuda_devices"] = _C.cuda_device_count()
    return info


__all__ = ["ops", "cuda_available", "build_info", "hadamard_transform", "randomized_hadamard_transform",
           "quantize_model", "quantize_pretrained", "quantize_linear", "save_quantized", "load_quantized", "save_gptq", "load_gptq",
           "QuantLinear", "replace_linear",
           "__version__"]
