import os

import pytest
import torch

import effkernels


# PyTorch runs float32 convolutions on CUDA in TF32 by default (cuDNN's allow_tf32), so the
# reference backend and PyTorch's own float32 results would carry ~1e-3 errors on a GPU; the
# tests hold float32 to float32 arithmetic, as PyTorch's own test suite does.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    # pytest-xdist runs 2 workers on our 2 cores: one intra-op thread each avoids
    # oversubscription. tests/test_threads.py checks the multi-threaded paths explicitly.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    """A CUDA fault (illegal address, launch failure) poisons the process's CUDA context, and
    every later test in it would fail for the first one's fault. Under pytest-xdist, end the
    worker after the failing test's report is sent: xdist reports "crashed while running"
    that test and starts a fresh worker."""
    yield
    if getattr(item, "_effk_cuda_fault", False) and os.environ.get("PYTEST_XDIST_WORKER"):
        os._exit(3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and torch.cuda.is_available():
        text = str(call.excinfo.value)
        if "CUDA error" in text or "cudaError" in text or "device-side assert" in text:
            item._effk_cuda_fault = True


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
