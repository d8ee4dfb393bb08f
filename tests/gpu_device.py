"""The one place the `gpu` tests get their GPU from: a real CUDA device, or lowbit's CUDA emulator.

With a CUDA device and a CUDA build of lowbit, the helpers here are the usual torch.cuda calls. Without one, when
the test-only module lowbit._cuda_emu was built (lowbit.ops.cuda_emulation.available()), conftest.py runs every
`gpu` test inside cuda_emulation(): the same csrc/cuda kernels compiled for the host, with CPU tensors playing the
role of CUDA device memory. Then GPU is the CPU device, to_gpu copies a tensor (as .cuda() copies into device
memory), on_gpu says whether a tensor is "device" memory (on the CPU, while emulating), streams are the null
stream, and CPU references computed inside a test must run under cpu_reference(), which suspends emulation so
that the real CPU kernels compute them (otherwise they would run the emulated CUDA kernels too).

REAL_GPU and EMULATED say which backend the `gpu` tests run on (neither: they are skipped)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

import lowbit
from lowbit.ops import cuda_emulation as _emulation
from lowbit.ops._native import cuda_sm_count

#: The gpu tests run on a real CUDA device.
REAL_GPU: bool = lowbit.cuda_available()
#: The gpu tests run under the CUDA emulator (no CUDA device, lowbit._cuda_emu built).
EMULATED: bool = not REAL_GPU and _emulation.available()
#: The device of the gpu tests' "device" tensors: cuda on a real GPU, cpu under emulation.
GPU: torch.device = torch.device("cuda" if REAL_GPU else "cpu")

def emulating() -> bool:
    """Whether the emulated CUDA kernels are running now (inside a gpu test under emulation)."""
    return EMULATED and _emulation.active()


def to_gpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t copied to the GPU (None stays None): t.cuda() on a real GPU; under emulation a copy of t with t's
    layout, so that, as with .cuda(), the "device" tensor does not share memory with the host one."""
    if t is None:
        return None
    if REAL_GPU:
        return t.cuda()
    return t.clone()


def on_gpu(t: torch.Tensor) -> bool:
    """Whether t is in GPU memory: t.is_cuda on a real GPU; under emulation, on the CPU while emulating."""
    if REAL_GPU:
        return t.is_cuda
    return t.device.type == "cpu" and emulating()


@contextlib.contextmanager
def gpu_stream() -> Iterator[Optional["torch.cuda.Stream"]]:
    """Runs the block on a new CUDA stream made current, which first waits for the current stream and is
    synchronized on exit (real GPU); under emulation the block runs as it is (yields None)."""
    if not REAL_GPU:
        yield None
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield stream
    stream.synchronize()


def synchronize() -> None:
    """torch.cuda.synchronize() on a real GPU; nothing to wait for under emulation."""
    if REAL_GPU:
        torch.cuda.synchronize()


def current_stream_handle() -> int:
    """The current CUDA stream as the integer the native functions take: 0 (the null stream) under emulation."""
    if REAL_GPU:
        return torch.cuda.current_stream().cuda_stream
    return 0


def sm_count() -> int:
    """Streaming multiprocessors of device 0 (of the emulated device under emulation)."""
    return cuda_sm_count(torch.device("cuda", 0))


def assert_matches_cpu(gpu: torch.Tensor, cpu: torch.Tensor, rtol: float = 1e-3) -> None:
    """A CUDA kernel's result against the CPU kernel's: within rtol of each value plus rtol * max|cpu|, and for a
    16-bit result also within one step of its format at the value (the two kernels sum in different orders, so
    their fp32 sums may fall on either side of a rounding midpoint)."""
    g, c = gpu.cpu().double(), cpu.double()
    bound = rtol * c.abs() + rtol * c.abs().max()
    if gpu.dtype in (torch.float16, torch.bfloat16):
        mantissa_bits, min_exponent = (10, -14) if gpu.dtype == torch.float16 else (7, -126)
        exponent = torch.frexp(c)[1].clamp(min=min_exponent + 1) - 1  # |c| in [2^exponent, 2^(exponent + 1))
        bound = bound + torch.pow(2.0, (exponent - mantissa_bits).double())
    excess = (g - c).abs() - bound
    worst = int(excess.argmax())
    assert float(excess.max()) <= 0, (f"{int((excess > 0).sum())} of {c.numel()} values differ: at flat index "
                                      f"{worst} gpu {float(g.flatten()[worst])} vs cpu {float(c.flatten()[worst])}")


def cpu_reference() -> contextlib.AbstractContextManager:
    """A block computing on the host with lowbit's CPU kernels: suspends emulation while emulating (CPU tensors
    would otherwise run the emulated CUDA kernels); nothing on a real GPU, or outside an emulated test."""
    if emulating():
        return _emulation.host_kernels()
    return contextlib.nullcontext()


__all__ = ["REAL_GPU", "EMULATED", "GPU", "emulating", "to_gpu", "on_gpu", "gpu_stream", "synchronize",
           "current_stream_handle", "sm_count", "assert_matches_cpu", "cpu_reference"]
