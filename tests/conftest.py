import os

import pytest
import torch

import effkernels


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    # pytest-xdist runs 2 workers on our 2 cores: one intra-op thread each avoids
    # oversubscription. tests/test_threads.py checks the multi-threaded paths explicitly.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Seeded RNG, and uninitialised memory poisoned: with deterministic algorithms on, PyTorch
    fills every fresh tensor (torch.empty / at::empty, also inside our kernels) with NaN, so an
    output element a kernel forgets to write fails the comparison."""
    torch.manual_seed(0)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)
    effkernels.set_backend("auto")
