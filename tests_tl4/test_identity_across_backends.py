"""The same weights have the same model identity on a HookedTransformer (TransformerLens 3.9,
converted by its own weight conversion, in the main environment: ``main_env.py``) and on a
TransformerBridge (TransformerLens 4): tiny random GPT-2 and Llama (grouped-query attention)
models, float64, from one state dict. Gemma is not among them: TransformerLens 3.9's conversion
changes its weights (docs/transformerlens4.md)."""

import json

import pytest
from bridge_models import hf_model, make_bridge
from main_env import run_hooked_side

from tl_thoughts.bridges import bridge_from_hf
from tl_thoughts.patch import model_identity

pytestmark = pytest.mark.slow  # a subprocess in the other environment (about 20 s)


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_the_same_weights_have_the_same_identity(arch, tmp_path):
    from safetensors.torch import save_file

    hf = hf_model(arch)
    # every tensor once (tied embeddings: one tensor under two names), before the bridge wraps it
    state = {n: t.detach().clone() for n, t in hf.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    bridge = bridge_from_hf(hf)
    theirs = json.loads(run_hooked_side("--tiny", arch, str(tmp_path / "w.safetensors"), timeout=600))
    mine = model_identity(bridge)
    assert mine["shapes"] == theirs["shapes"]
    assert mine["fingerprint"] == theirs["fingerprint"]
    other = make_bridge(arch, seed=1)  # and another model's is another
    assert model_identity(other)["fingerprint"] != theirs["fingerprint"]
