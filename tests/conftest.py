"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is faster than several, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``scale`` or ``browser`` take minutes: they are ``slow`` too, run by `make test-slow`."""
    for item in items:
        if item.get_closest_marker("scale") or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)
