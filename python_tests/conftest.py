"""Shared test infrastructure.

- `device`: every test taking it runs on CPU, and on CUDA when one is available.
- `@pytest.mark.triton`: Triton-kernel tests. `make test` runs them in their own pytest
  process with TRITON_INTERPRET=1 (set before triton is imported); elsewhere they are
  skipped unless a GPU is present.
- `@pytest.mark.cmake`: the LibTorch (CMake) build check, in its own make step.
- `tolerances(dtype)`: rtol/atol derived from the dtype's machine epsilon, for comparing
  a kernel against its float64 reference.
"""
import os

import pytest
import torch

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: Triton kernel test (TRITON_INTERPRET=1 on CPU)")
    config.addinivalue_line("markers", "cmake: builds csrc/ with CMake as a LibTorch library")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="Triton tests need a GPU or TRITON_INTERPRET=1 (make test-triton)")
    for item in items:
        if "triton" in item.keywords and not (TRITON_INTERPRET or HAS_CUDA):
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def tolerances(dtype: torch.dtype, k: float = 8.0) -> dict:
    """rtol = k * eps(dtype), atol = the same scaled to unit magnitude; for results of
    O(1) size accumulated over short reductions. Pass a larger k for long reductions."""
    eps = torch.finfo(dtype).eps
    return {"rtol": k * eps, "atol": k * eps}
