"""Fixtures: the tiny random models of ``helpers.ARCHITECTURES``, and the real pretrained model
(SmolLM2-135M-Instruct, loaded once per session in float32 and in float64)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # `import helpers` from every test module

from helpers import make_model, make_word_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(arch, dtype=torch.float64)``: a cached tiny randomised model, shared by the
    tests of the session. Tests must not modify it (they check that the library does not either);
    a test that needs to modify a model uses ``fresh_model``."""
    cache = {}

    def get(arch: str, dtype: torch.dtype = torch.float64):
        key = (arch, dtype)
        if key not in cache:
            cache[key] = make_model(arch, dtype=dtype)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def text_models():
    """``text_models(arch)``: a tiny randomised model with the offline word tokenizer (so that
    prompts are text), cached per test module; tests must not modify it."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = make_model(arch, tokenizer=make_word_tokenizer())
        return cache[arch]

    return get


@pytest.fixture
def fresh_model():
    """``fresh_model(arch, dtype=torch.float64, seed=0, **config_overrides)``: a new tiny model
    that the test owns and may modify."""
    return make_model


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny tensors: torch's intra-op thread pool costs milliseconds per op on a small, busy
    machine (softmax of a 4x13x13 tensor: ~7 ms with 2 threads, ~10 us with 1). Real-model tests
    (marker ``real_model``) keep the default."""
    if request.node.get_closest_marker("real_model") is not None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def smollm2():
    """The default model, float32 (loaded once per test session)."""
    from tl_thoughts.models import load_default_model

    return load_default_model(dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_f64():
    """The default model, float64 (loaded once per test session)."""
    from tl_thoughts.models import load_default_model

    return load_default_model(dtype=torch.float64)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gemma`` (Gemma 3 270M, real weights: about an hour on 2 cores) run only when
    the ``-m`` expression names them (``-m gemma``); otherwise they are deselected, so that
    ``pytest -q`` (CI) and ``-m slow`` leave them out. Selected without the package installed,
    they fail with the install command."""
    if "gemma" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("gemma") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("gemma")])
        items[:] = kept
