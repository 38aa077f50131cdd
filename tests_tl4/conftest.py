"""Tests of tl_thoughts on TransformerLens 4 (TransformerBridge). They need the second environment,
``.venv-tl4`` (``bash scripts/setup_tl4.sh``), and run with
``.venv-tl4/bin/python -m pytest tests_tl4``. In the main environment (TransformerLens 3.9) they
refuse to run, loudly: they are not part of ``pytest`` there (``testpaths = ["tests"]``)."""

import importlib.metadata
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

_VERSION = importlib.metadata.version("transformer-lens")
if int(_VERSION.split(".")[0]) < 4:  # 3.9 ships an earlier TransformerBridge: not this backend's
    raise pytest.UsageError(
        f"tests_tl4 needs TransformerLens 4 (found transformer-lens {_VERSION}): run it with "
        ".venv-tl4/bin/python -m pytest tests_tl4 (bash scripts/setup_tl4.sh creates .venv-tl4)"
    )

from bridge_models import ARCHITECTURES, make_bridge  # noqa: E402


@pytest.fixture(scope="session")
def bridge():
    """``bridge(arch, dtype=torch.float64)``: a cached tiny random bridge; tests must not modify it."""
    cache = {}

    def get(arch: str, dtype: torch.dtype = torch.float64):
        if (arch, dtype) not in cache:
            cache[arch, dtype] = make_bridge(arch, dtype)
        return cache[arch, dtype]

    return get


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    if request.node.get_closest_marker("real_model") is not None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pytest_collection_modifyitems(items):
    assert ARCHITECTURES  # the matrix is not empty
