"""The bridge to the native module lowbit._C: DLPack capsules, CUDA streams, numpy in/out.

The ops call the native functions through :data:`_C`, a namespace holding lowbit._C's functions; while the CUDA
emulation of the tests is on (:mod:`lowbit.ops.cuda_emulation`) it holds the emulator's instead, and
:func:`is_cuda` counts CPU tensors as CUDA ones, so that the ops take their CUDA branches.
"""
from __future__ import annotations

import types
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack

from lowbit import _C as _native_module

#: The native functions the ops call (lowbit._C's, or the CUDA emulator's while it is on).
_C = types.SimpleNamespace(**{name: getattr(_native_module, name) for name in dir(_native_module)
                              if not name.startswith("__")})
_emulating = False


def is_cuda(t: torch.Tensor) -> bool:
    """Whether the ops treat t as a CUDA tensor: a CUDA tensor, or any CPU tensor while CUDA is emulated."""
    return t.device.type == "cuda" or (_emulating and t.device.type == "cpu")


def cuda_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA device (of the emulated device while CUDA is emulated)."""
    if _emulating:
        return int(_C.device_attributes()["multi_processor_count"])
    return torch.cuda.get_device_properties(device).multi_processor_count


def capsule(t: Optional[torch.Tensor]):
    """A DLPack capsule viewing `t` (None stays None); `t` must outlive the native call."""
    if t is None:
        return None
    return to_dlpack(t.detach() if t.requires_grad else t)


def stream_of(t: torch.Tensor) -> int:
    """The caller's current CUDA stream on t's device as an integer (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def eager_fast_path(op: Callable[..., Any], impl: Callable[..., Any]) -> Callable[..., Any]:
    """A callable running the custom op `op` while torch traces (torch.compile, export, fake or meta tensors) and
    its implementation `impl` directly otherwise. The dispatcher costs several microseconds a call and a decode
    step of a small model calls lowbit's kernels hundreds of times, so eager calls skip it; both run `impl`."""
    def call(*args):
        x = args[0]
        if not torch.compiler.is_compiling() and type(x) is torch.Tensor and x.device.type != "meta":
            return impl(*args)
        return op(*args)
    return call


def check_activations(x) -> torch.Tensor:
    """x as a float32/float16/bfloat16 tensor [..., K] (numpy accepted): the common check of every GEMM's input."""
    t = as_tensor(x, "x")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must have dtype float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K], got a scalar")
    return t


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """t as a numpy array; bfloat16, which numpy lacks, is a TypeError that says what to do instead."""
    if t.dtype == torch.bfloat16:
        raise TypeError("dtype torch.bfloat16 has no numpy equivalent: pass torch tensors to get a bfloat16 result, "
                        "or ask for torch.float32 / torch.float16")
    return t.numpy()


def with_numpy(fn: Callable[..., torch.Tensor], x, *args, **kwargs):
    """Calls fn on torch tensors; numpy arrays in the first argument come back as numpy arrays."""
    if isinstance(x, np.ndarray):
        return to_numpy(fn(torch.from_numpy(np.ascontiguousarray(x)), *args, **kwargs))
    return fn(x, *args, **kwargs)


def as_tensor(value, name: str) -> torch.Tensor:
    """Accepts a torch tensor or a numpy array for argument `name`; anything else is a TypeError."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


__all__ = ["_C", "is_cuda", "cuda_sm_count", "capsule", "stream_of", "with_numpy", "to_numpy", "as_tensor", "check_activations",
           "eager_fast_path"]
