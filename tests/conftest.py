"""Shared test setup: the `gpu` marker skips without a usable CUDA device; hypothesis profile for CI."""
import pytest
from hypothesis import settings

import lowbit

settings.register_profile("lowbit", max_examples=60, deadline=None)
settings.load_profile("lowbit")


def pytest_collection_modifyitems(config, items):
    if lowbit.cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of lowbit")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
