"""Helpers for memory-bound benchmarks: the machine's measured read bandwidth, and operand sets that cycle
through more memory than the last-level cache so that a benchmark sees DRAM, as a model's decoding step does."""
from __future__ import annotations

import functools
import glob
import itertools
import time
from typing import Callable, Sequence

import torch


def _last_level_cache_bytes() -> int:
    """Size of cpu0's highest-level cache from sysfs (0 where sysfs does not say)."""
    best = 0
    for size in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(size).read().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        best = max(best, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return best


#: Bytes the operands of one benchmark cycle through: at least 768 MB and twice the last-level cache
#: (260 MB on the first development VM, 480 MB on an Intel one), so that a cyclic sweep misses it.
CYCLE_BYTES = max(768 * 2**20, 2 * _last_level_cache_bytes())


@functools.lru_cache(maxsize=None)
def read_bandwidth() -> float:
    """Measured DRAM read bandwidth in bytes/s (best of 5 `sum` passes over a 1 GiB fp32 tensor, all threads)."""
    x = torch.ones(2**28, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best


def nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def cycling(make: Callable[[], Sequence[torch.Tensor]], per_copy: int | None = None) -> Callable[[], tuple]:
    """Enough independent copies of the operands `make()` returns to exceed CYCLE_BYTES; the result, called,
    gives the next copy (round robin). Copies are clones of the first, so building them is only a memcpy."""
    first = tuple(make())
    size = per_copy if per_copy is not None else nbytes(first)
    count = max(2, -(-CYCLE_BYTES // max(size, 1)))
    copies = [first] + [tuple(None if t is None else t.clone() for t in first) for _ in range(count - 1)]
    it = itertools.cycle(copies)
    return lambda: next(it)
