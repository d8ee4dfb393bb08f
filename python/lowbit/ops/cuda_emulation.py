"""Run lowbit's CUDA kernels without a GPU, on the CUDA emulator (tests only).

A build with ``LOWBIT_CUDA_EMULATION=ON`` (``make install``) adds the module ``lowbit._cuda_emu``: the CUDA
sources of ``csrc/cuda`` compiled by the host compiler against an emulation of CUDA's execution model
(``csrc/cuda_emu``: every thread of a block a fiber, barriers, warp shuffles and cp.async with CUDA's semantics,
shared memory poisoned per block, device memory ending at guard pages). Inside :func:`cuda_emulation` every op
given CPU tensors runs those kernels, as it would run them on CUDA tensors: the Python side takes its CUDA branches
too. Errors of the execution model (a divergent barrier, a shuffle mask naming a lane that is not there, a read
past the end of a tensor) raise RuntimeError naming the kernel, block and thread. The wheel never contains the
emulator; on a real GPU the same tests run on the device instead.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

from lowbit.ops import _native

try:
    from lowbit import _cuda_emu
except ImportError:  # a build without the emulator (the wheel)
    _cuda_emu = None

#: Thread orders between synchronization points (also the order of a grid's blocks).
ORDERS: tuple[str, ...] = ("forward", "reverse", "random")
_native_functions = dict(vars(_native._C))


def available() -> bool:
    """Whether this build has the CUDA emulator (lowbit._cuda_emu)."""
    return _cuda_emu is not None


def active() -> bool:
    """Whether ops on CPU tensors run the emulated CUDA kernels now."""
    return _native._emulating


def _scoped(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn with its tensor arguments copied to guarded device memory for the call and written ones copied back."""
    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        _cuda_emu.begin_call()
        try:
            result = fn(*args)
        except BaseException:
            _cuda_emu.end_call(False)
            raise
        _cuda_emu.end_call(True)
        return result
    return call


def _emulated_functions() -> dict[str, Any]:
    table = {name: getattr(_cuda_emu, name) for name in dir(_cuda_emu) if not name.startswith("__")}
    return {name: _scoped(f) if callable(f) else f for name, f in table.items()}


def _switch(emulating: bool) -> None:
    table = _emulated_functions() if emulating else _native_functions
    vars(_native._C).clear()
    vars(_native._C).update(table)
    _native._emulating = emulating


@contextlib.contextmanager
def cuda_emulation(order: str = "forward", seed: int = 0) -> Iterator[None]:
    """Inside: lowbit ops on CPU tensors run the emulated CUDA kernels, their blocks' threads run in `order`
    ('forward', 'reverse' or 'random' with `seed`) between synchronization points.

    Raises:
        RuntimeError: this build has no CUDA emulator. ValueError: an unknown order.
    """
    if not available():
        raise RuntimeError("this lowbit build has no CUDA emulator: rebuild with LOWBIT_CUDA_EMULATION=ON "
                           "(make install does)")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    previous = active(), _cuda_emu.schedule()
    try:
        _cuda_emu.set_schedule(order, int(seed) & (2**64 - 1))
        _switch(True)
        yield
    finally:
        _cuda_emu.set_schedule(*previous[1])
        _switch(previous[0])


@contextlib.contextmanager
def host_kernels() -> Iterator[None]:
    """Inside: the real CPU kernels run again (for a CPU reference inside an emulated test)."""
    was = active()
    _switch(False)
    try:
        yield
    finally:
        _switch(was)


__all__ = ["available", "active", "cuda_emulation", "host_kernels", "ORDERS"]
