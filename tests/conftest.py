"""Shared fixtures."""

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: OpenMP threads only add contention on a shared 2-core box (50x slower).
    A module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
