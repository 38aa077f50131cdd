"""The backend seam on TransformerLens 3.9: HookedTransformer is the backend; the earlier
TransformerBridge 3.9 ships is refused by name (the bridge backend is for TransformerLens 4 and
is tested in ``tests_tl4`` with ``.venv-tl4``)."""

import importlib.metadata

import pytest
import torch

import tl_thoughts as tt
from tl_thoughts import _bridge, _tl
from tl_thoughts.errors import UnsupportedArchitectureError


def test_a_transformerlens_3_bridge_is_refused_by_name(tiny_model):
    if _bridge.TransformerBridge is None or _bridge.TL_MAJOR >= 4:
        pytest.fail(
            f"expected TransformerLens 3.9 here, found {importlib.metadata.version('transformer-lens')}"
        )
    bridge = object.__new__(_bridge.TransformerBridge)  # refused before anything of it is read
    assert _tl.is_bridge(bridge) and not _tl.is_bridge(tiny_model("ln_gelu_learned"))
    with pytest.raises(UnsupportedArchitectureError, match="written for TransformerLens 4"):
        tt.implicit_updates(bridge, torch.tensor([[1, 2, 3, 4]]), slice(1, 2))
