"""Shared test setup: the `gpu` tests run on a CUDA device, or else under lowbit's CUDA emulator (each in several
thread orders, marked `emulated`), or are skipped; hypothesis profile for CI; a fixture running a module's tests
on one torch thread; the `isa` fixture running a test on every CPU SIMD path."""
import os
import zlib

import pytest
import torch
from hypothesis import settings

import gpu_device
from isa_paths import SUPPORTED_ISAS, forced_isa
from lowbit.ops import cpu_isa
from lowbit.ops.cuda_emulation import ORDERS as EMULATION_ORDERS

settings.register_profile("lowbit", max_examples=60, deadline=None)
settings.load_profile("lowbit")

DEFAULT_EMULATION_ORDERS = ("forward", "random")


def emulation_orders() -> list:
    """The thread orders each gpu test runs in under emulation: LOWBIT_EMU_ORDERS (a comma list) or the default."""
    value = os.environ.get("LOWBIT_EMU_ORDERS", "").strip()
    if not value:
        return list(DEFAULT_EMULATION_ORDERS)
    orders = [o.strip() for o in value.split(",") if o.strip()]
    bad = [o for o in orders if o not in EMULATION_ORDERS]
    if bad or not orders:
        raise pytest.UsageError(f"LOWBIT_EMU_ORDERS must be a comma list of {', '.join(EMULATION_ORDERS)}, "
                                f"got {value!r}")
    return list(dict.fromkeys(orders))


def pytest_configure(config):
    config.addinivalue_line("markers", "emulated: a gpu test running under lowbit's CUDA emulator (no CUDA device)")
    if gpu_device.EMULATED:
        emulation_orders()  # a bad LOWBIT_EMU_ORDERS is a usage error before collection


@pytest.hookimpl(trylast=True)  # after the test's own parametrization: ids end in -forward, -random
def pytest_generate_tests(metafunc):
    if (gpu_device.EMULATED and "_cuda_backend" in metafunc.fixturenames
            and metafunc.definition.get_closest_marker("gpu") is not None):
        metafunc.parametrize("_cuda_backend", emulation_orders(), indirect=True)


def pytest_collection_modifyitems(config, items):
    if gpu_device.REAL_GPU:
        return
    if gpu_device.EMULATED:
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.emulated)
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of lowbit, or lowbit's CUDA emulator "
                                   "(lowbit._cuda_emu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cuda_backend(request):
    """Under emulation, runs a gpu test inside cuda_emulation in the thread order it is parametrized with (and a
    seed stable for the test); does nothing for other tests or on a real GPU."""
    order = getattr(request, "param", None)
    if order is None:
        yield None
        return
    from lowbit.ops.cuda_emulation import cuda_emulation
    with cuda_emulation(order=order, seed=zlib.crc32(request.node.nodeid.encode())):
        yield order


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
