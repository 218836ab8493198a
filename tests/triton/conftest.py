"""The Triton tests run in their own pytest process (`make test` starts it) with the
interpreter on: TRITON_INTERPRET=1 must be set before triton is imported, and then kernels run
on CPU tensors. On a GPU machine, without TRITON_INTERPRET, the same tests run compiled."""
import os

import pytest
import torch

if "triton" in __import__("sys").modules and os.environ.get("TRITON_INTERPRET") != "1" \
        and not torch.cuda.is_available():
    raise RuntimeError("tests/triton needs TRITON_INTERPRET=1 set before triton is imported "
                       "(run them in their own process: make test-triton)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


@pytest.fixture
def device():
    """CPU tensors under the interpreter, CUDA tensors on a GPU."""
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
