"""Thought patches on TransformerBridges (TransformerLens 4), tiny random models in float64: a
patch applied in its weight form and in its activation form, compared with each other and with
the deltas written by hand into the HuggingFace parameters; the model restored bit-identically,
also on exceptions; identity, save and load, refusal of another model."""

import pytest
import torch
from bridge_models import make_bridge

import tl_thoughts as tt
from tl_thoughts import _tl
from tl_thoughts.errors import InputError, UnsupportedArchitectureError
from tl_thoughts.patch import IncompatibleModelError, model_identity

# Gemma 3: norms after the sublayers (the activation form changes the post-norms' input)
ARCHS = ("llama_gqa", "gpt2", "gemma3", "native_ln", "native_rms_gqa")


def _tokens(seed: int = 1, n: int = 11, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(50, generator=g)[:n] for _ in range(batch)])


def _state(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _assert_restored(model, before: dict[str, torch.Tensor]) -> None:
    after = _state(model)
    assert before.keys() == after.keys()  # no bias left behind
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not _tl.has_hooks(model)


def _patch(model, seed: int = 2, scale: float = 0.05, names=("b_O", "b_out", "W_O", "W_in", "W_gate", "W_out")):
    """A patch of random deltas on every block's thought-patch parameters."""
    spec = _tl.model_spec(model)
    weights = _tl.weights(model)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for layer in range(spec.n_layers):
        for n in names:
            name = _tl.param_name(layer, n)
            if name in weights:
                deltas[name] = scale * torch.randn(weights[name].shape, generator=g, dtype=torch.float64)
    return tt.ThoughtPatch.create(model, deltas, {}, {"chunk": "a random patch"})


def _logits(model, tokens):
    return _tl.run(model, tokens, None, [])


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_and_activation_forms_agree_and_restore(arch):
    model = make_bridge(arch)
    before, identity = _state(model), model_identity(model)
    patch, tokens = _patch(model), _tokens()
    plain = _logits(model, tokens)
    with patch.apply(model, "weight"):
        weight_form = _logits(model, tokens)
        assert model_identity(model) == identity  # the model's own weights, under the patch
    _assert_restored(model, before)
    with patch.apply(model, "activation"):
        activation_form = _logits(model, tokens)
    _assert_restored(model, before)
    assert float((weight_form - plain).abs().max()) > 0.1  # the patch does something
    assert float((weight_form - activation_form).abs().max()) <= 1e-10


def test_the_weight_form_is_the_deltas_written_into_the_huggingface_parameters():
    """Llama: W_in, W_gate, W_out, W_O are up_proj, gate_proj, down_proj, o_proj transposed (W_O
    with its heads stacked); b_out and b_O are biases the checkpoint lacks (added by hand here)."""
    model = make_bridge("llama_gqa")
    patch, tokens = _patch(model), _tokens()
    with patch.apply(model, "weight"):
        patched = _logits(model, tokens)
    hf = model.original_model.model
    saved = []
    with torch.no_grad():
        for layer, block in enumerate(hf.layers):
            d = {n: patch.deltas[_tl.param_name(layer, n)] for n in ("W_in", "W_gate", "W_out", "W_O", "b_out", "b_O")}
            for module, delta in ((block.mlp.up_proj, d["W_in"].T), (block.mlp.gate_proj, d["W_gate"].T),
                                  (block.mlp.down_proj, d["W_out"].T), (block.self_attn.o_proj, d["W_O"].flatten(0, 1).T)):
                saved.append((module, module.weight.data))
                module.weight.data = module.weight.data + delta
            block.mlp.down_proj.bias = torch.nn.Parameter(d["b_out"].clone())
            block.self_attn.o_proj.bias = torch.nn.Parameter(d["b_O"].clone())
        try:
            by_hand = _logits(model, tokens)
        finally:
            for module, data in saved:
                module.weight.data = data
            for block in hf.layers:
                block.mlp.down_proj.bias = None
                block.self_attn.o_proj.bias = None
    assert float((patched - by_hand).abs().max()) <= 1e-12


def test_the_weight_form_on_gemma3_is_the_patched_values():
    model = make_bridge("gemma3")
    before = _state(model)
    patch, tokens = _patch(model), _tokens()
    with patch.apply(model, "weight"):
        patched = _logits(model, tokens)
    _assert_restored(model, before)
    with _tl.swapped_tensors(model, patch.parameters(model)):
        swapped = _logits(model, tokens)
    assert torch.equal(patched, swapped)
    assert float((patched - _logits(model, tokens)).abs().max()) > 0.1


@pytest.mark.parametrize("form", ["weight", "activation"])
def test_an_exception_inside_apply_restores_the_model(form):
    model = make_bridge("llama_gqa")
    before = _state(model)
    patch = _patch(model)
    with pytest.raises(RuntimeError, match="boom"):
        with patch.apply(model, form):
            _logits(model, _tokens())
            raise RuntimeError("boom")
    _assert_restored(model, before)
    assert all(block.mlp.out.original_component.bias is None for block in model.blocks)
    with patch.apply(model, form):  # and it applies again
        pass


def test_patches_stack_and_come_off_in_any_order():
    model = make_bridge("llama_gqa")
    before, tokens = _state(model), _tokens()
    one, two = _patch(model, seed=2), _patch(model, seed=3)
    with one.apply(model, "weight"), two.apply(model, "weight"):
        both = _logits(model, tokens)
    summed = tt.ThoughtPatch.create(model, {n: one.deltas[n] + two.deltas[n] for n in one.deltas}, {}, {})
    with summed.apply(model, "weight"):
        assert float((_logits(model, tokens) - both).abs().max()) <= 1e-12
    first, second = one.attach(model, "weight"), two.attach(model, "activation")
    first.remove()  # the first one off first: the second stays
    only_two = _logits(model, tokens)
    second.remove()
    _assert_restored(model, before)
    with two.apply(model, "weight"):
        assert float((_logits(model, tokens) - only_two).abs().max()) <= 1e-10
    with pytest.raises(InputError, match="applied to this model already"):
        with one.apply(model, "weight"), one.apply(model, "activation"):
            pass
    _assert_restored(model, before)


def test_a_swap_entered_after_the_patch_is_detected():
    model = make_bridge("llama_gqa")
    before = _state(model)
    handle = _patch(model).attach(model, "weight")
    with tt.computing_in(model, torch.float32):  # replaces every parameter
        with pytest.raises(InputError, match="was replaced since the patch was applied"):
            handle.remove()
    handle.remove()
    _assert_restored(model, before)


def test_identity_is_the_weights_and_not_the_dtype_nor_the_instance():
    model = make_bridge("llama_gqa", torch.float32)
    identity = model_identity(model)
    assert model_identity(make_bridge("llama_gqa", torch.float32)) == identity  # another instance
    assert model_identity(make_bridge("llama_gqa", torch.float32, seed=1))["fingerprint"] != identity["fingerprint"]
    with tt.computing_in(model, torch.float64):  # a float64 copy of the float32 weights
        assert model_identity(model) == identity
    name = "blocks.2.mlp.W_in"  # one element, one float32 ulp
    changed = _tl.weight(model, name).detach().clone()
    changed[3, 5] = torch.nextafter(changed[3, 5], torch.tensor(1.0))
    with _tl.swapped_tensors(model, {name: changed}):
        assert model_identity(model)["fingerprint"] != identity["fingerprint"]
    assert model_identity(model) == identity


def test_save_and_load_on_a_bridge_and_refuse_another_model(tmp_path):
    model = make_bridge("gpt2")
    patch, tokens = _patch(model), _tokens()
    path = patch.save(tmp_path / "p.safetensors")
    loaded = tt.ThoughtPatch.load(path, model=model)
    with patch.apply(model), torch.no_grad():
        expected = _logits(model, tokens)
    with loaded.apply(model):
        assert torch.equal(_logits(model, tokens), expected)
    with pytest.raises(IncompatibleModelError, match="fitted on another model"):
        tt.ThoughtPatch.load(path, model=make_bridge("gpt2", seed=1))
    with pytest.raises(IncompatibleModelError, match="other shapes"):
        tt.ThoughtPatch.load(path, model=make_bridge("llama_gqa"))
    with pytest.raises(IncompatibleModelError):
        with loaded.apply(make_bridge("gpt2", seed=1)):
            pass


def test_merge_into_writes_the_stored_weights_and_refuses_a_missing_bias():
    model = make_bridge("llama_gqa")
    tokens = _tokens()
    with pytest.raises(UnsupportedArchitectureError, match="no blocks.0.attn.b_O"):
        _patch(model).merge_into(model)
    matrices = _patch(model, names=("W_in", "W_gate", "W_out", "W_O"))
    with matrices.apply(model, "weight"):
        expected = _logits(model, tokens)
    identity = model_identity(model)
    matrices.merge_into(model)
    assert torch.equal(_logits(model, tokens), expected)
    assert model_identity(model)["fingerprint"] != identity["fingerprint"]
