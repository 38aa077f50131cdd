"""A thought patch fitted and saved on the HookedTransformer (TransformerLens 3.9) loads into the
TransformerBridge (TransformerLens 4) of the same checkpoint and gives the same logits.

The two TransformerLens versions live in two environments: the HookedTransformer side
(``tests_tl4/hooked_side.py``) runs in the main one, as a subprocess (``main_env.py``:
``$TL_THOUGHTS_MAIN_PYTHON`` or the repository's ``.venv``; without it the test FAILS, saying
so: it is never skipped). Both load SmolLM2-135M-Instruct from the same GGUF file
(``load_default_model`` / ``load_default_bridge``), float32.

Run as a script (``.venv-tl4/bin/python tests_tl4/test_patch_across_backends.py``) it prints the
measured differences (docs/transformerlens4.md).
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from main_env import run_hooked_side

import tl_thoughts as tt
from tl_thoughts import _tl
from tl_thoughts.patch import IncompatibleModelError, model_identity

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

# (patch file, forms): the default FitConfig's patch acts everywhere (weight form by default);
# the README's leaves the BOS unpatched (activation form only)
PATCHES = {"default": ("weight", "activation"), "readme": ("activation",)}


def hooked_side(out: Path) -> dict:
    """Fit, save and run on the HookedTransformer (``hooked_side.py``, in the main environment)."""
    run_hooked_side(str(out))
    from safetensors.torch import load_file

    meta = json.loads((out / "hooked.json").read_text())
    return {**meta, "logits": load_file(str(out / "hooked.safetensors"))}


def compare(bridge, out: Path, hooked: dict) -> dict[str, dict[str, float]]:
    """Per patch and form (and ``unpatched``): the worst max |logit difference| between the
    HookedTransformer and the bridge over the prompts, and the argmax agreement over all
    positions."""
    logits = hooked["logits"]
    n = len(hooked["texts"])
    rows: dict[str, dict[str, float]] = {}

    def record(key: str, run) -> None:
        worst, agree, total = 0.0, 0, 0
        for i in range(n):
            mine = run(logits[f"tokens.{i}"][None])
            theirs = logits[f"{key}.{i}"]
            worst = max(worst, float((mine - theirs).abs().max()))
            agree += int((mine.argmax(-1) == theirs.argmax(-1)).sum())
            total += mine.shape[0]
        rows[key] = {"max_abs_dlogit": worst, "argmax_agreement": agree / total}

    record("unpatched", lambda tokens: _tl.forward(bridge, tokens)[0][0])
    for name, forms in PATCHES.items():
        patch = tt.ThoughtPatch.load(out / f"{name}.safetensors", model=bridge)
        for form in forms:
            def run(tokens, patch=patch, form=form):
                with patch.apply(bridge, form):
                    return _tl.forward(bridge, tokens)[0][0]

            record(f"{name}.{form}", run)
    return rows


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    from tl_thoughts.bridges import load_default_bridge

    out = tmp_path_factory.mktemp("across")
    hooked = hooked_side(out)
    return load_default_bridge(dtype=torch.float32), out, hooked


def test_the_same_weights_have_the_same_identity_on_both_backends(sides):
    bridge, _, hooked = sides
    assert model_identity(bridge)["shapes"] == hooked["identity"]["shapes"]
    assert model_identity(bridge)["fingerprint"] == hooked["identity"]["fingerprint"]


def test_a_hooked_transformer_patch_gives_the_same_logits_on_the_bridge(sides):
    bridge, out, hooked = sides
    for i, text in enumerate(hooked["texts"]):  # the same tokens on both sides
        assert torch.equal(_tl.to_tokens(bridge, text)[0], hooked["logits"][f"tokens.{i}"])
    before = {n: p.detach().clone() for n, p in bridge.named_parameters()}
    rows = compare(bridge, out, hooked)
    unpatched = rows["unpatched"]["max_abs_dlogit"]
    for key, row in rows.items():
        effect = float((hooked["logits"][f"{key}.0"] - hooked["logits"]["unpatched.0"]).abs().max())
        if key != "unpatched":
            assert effect > 1.0, (key, effect)  # the patch changes the logits
        # float32 rounding: the two backends differ by their rotary tables' rounding, patched or not
        assert row["max_abs_dlogit"] <= max(1e-3, 3 * unpatched), rows
        assert row["argmax_agreement"] == 1.0, rows
    after = dict(bridge.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert not _tl.has_hooks(bridge)


def test_the_patch_is_refused_on_other_weights(sides):
    bridge, out, _ = sides
    name = "blocks.7.mlp.W_in"  # one element, one float32 ulp
    changed = _tl.weight(bridge, name).detach().clone()
    changed[3, 5] = torch.nextafter(changed[3, 5], torch.tensor(10.0))
    with _tl.swapped_tensors(bridge, {name: changed}):
        with pytest.raises(IncompatibleModelError, match="fitted on another model"):
            tt.ThoughtPatch.load(out / "default.safetensors", model=bridge)
    tt.ThoughtPatch.load(out / "default.safetensors", model=bridge)  # the same bridge again


if __name__ == "__main__":
    import tempfile
    import time

    from tl_thoughts.bridges import load_default_bridge

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        hooked = hooked_side(Path(folder))
        print(f"HookedTransformer side (fit, save, logits): {time.perf_counter() - t0:.0f} s; "
              f"{len(hooked['texts'])} prompts")
        bridge = load_default_bridge(dtype=torch.float32)
        same = model_identity(bridge)["fingerprint"] == hooked["identity"]["fingerprint"]
        print(f"identity equal on both backends: {same}")
        for key, row in compare(bridge, Path(folder), hooked).items():
            print(f"{key:<20} max |dlogit| HT vs bridge {row['max_abs_dlogit']:.2e}   "
                  f"argmax agreement {row['argmax_agreement']:.0%}")
    sys.exit(0)
