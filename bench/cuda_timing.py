"""Helpers for the CUDA benchmarks: the GPU's measured read bandwidth, and timing of a batch of kernel calls
replayed from a CUDA graph, so that a round measures GPU time, not the Python and launch cost of each call (a
4096 x 11008 2-bit GEMV reads 11 MB, a few microseconds of an H200's bandwidth)."""
from __future__ import annotations

import functools
from typing import Callable

import pytest
import torch

#: Calls captured per graph (one benchmark round replays them all); operands cycle between calls.
CALLS_PER_ROUND = 64
#: Bytes the operands of one CUDA benchmark cycle through: 4x the 60 MB L2 of an H100/H200 and more, so that a
#: weight is read from HBM, as in a decoding step.
CUDA_CYCLE_BYTES = 512 * 2**20

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@functools.lru_cache(maxsize=None)
def cuda_read_bandwidth() -> float:
    """Measured HBM read bandwidth in bytes/s: best of 5 `sum` passes over a 2 GiB fp32 tensor, CUDA events."""
    x = torch.ones(2**29, dtype=torch.float32, device="cuda")
    x.sum()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e-3)
    return x.numel() * x.element_size() / best


def cycling_cuda(make: Callable[[], tuple]) -> list[tuple]:
    """Copies (on the GPU) of the operands `make()` returns, enough to exceed CUDA_CYCLE_BYTES."""
    first = tuple(make())
    size = sum(t.numel() * t.element_size() for t in first if t is not None)
    count = max(2, -(-CUDA_CYCLE_BYTES // max(size, 1)))
    return [first] + [tuple(None if t is None else t.clone() for t in first) for _ in range(count - 1)]


def run_graph(benchmark, fn: Callable, x: torch.Tensor, copies: list[tuple], weight_bytes: int,
              baseline: str | None = None) -> None:
    """Benchmarks CALLS_PER_ROUND calls fn(x, *copy) (cycling through `copies`) replayed from one CUDA graph
    (launched eagerly if capture fails; extra_info["timing"] says which); extra_info gets us_per_call, the
    weight's GB/s and of_bw (that over cuda_read_bandwidth())."""
    if baseline:
        benchmark.extra_info["baseline"] = baseline
    calls = [copies[i % len(copies)] for i in range(CALLS_PER_ROUND)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph (allocator, lazy init)
        for c in calls[:3]:
            fn(x, *c)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for c in calls:
                fn(x, *c)
        launch = graph.replay
        benchmark.extra_info["timing"] = "cuda graph"
    except RuntimeError as error:  # an op that cannot be captured: time the same calls launched eagerly
        torch.cuda.synchronize()
        benchmark.extra_info["timing"] = f"eager launches (graph capture failed: {str(error)[:120]})"

        def launch():
            for c in calls:
                fn(x, *c)

    def replay():
        launch()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=20, warmup_rounds=3)
    per_call = benchmark.stats.stats.median / CALLS_PER_ROUND
    benchmark.extra_info["us_per_call"] = per_call * 1e6
    benchmark.extra_info["GB/s"] = weight_bytes / per_call / 1e9
    benchmark.extra_info["of_bw"] = weight_bytes / per_call / cuda_read_bandwidth()
