"""Shared test setup: the `gpu` marker skips without a usable CUDA device; hypothesis profile for CI; a fixture
running a module's tests on one torch thread; the `isa` fixture running a test on every CPU SIMD path."""
import pytest
import torch
from hypothesis import settings

import lowbit
from isa_paths import SUPPORTED_ISAS, forced_isa
from lowbit.ops import cpu_isa

settings.register_profile("lowbit", max_examples=60, deadline=None)
settings.load_profile("lowbit")


def pytest_collection_modifyitems(config, items):
    if lowbit.cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of lowbit")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny ops, which would otherwise spin on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    """Runs the test with the SIMD kernels forced onto each CPU path this machine supports."""
    default = cpu_isa()
    with forced_isa(request.param):
        yield request.param
    assert cpu_isa() == default
