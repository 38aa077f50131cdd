"""Refining a thought patch by gradient descent (``refine_thought``): each step is Adam on the exact
gradient of the answers' cross-entropy without the chunk, the model is never changed, and the
patch keeps its form (an unpatched prefix stays unpatched)."""

import functools

import pytest
import torch
from torch.func import functional_call

import tl_thoughts as tt
from helpers import assert_close, assert_model_untouched, hooks_attached, param_snapshot, fit
from tl_thoughts.templates import encode_example

TEMPLATE = tt.PromptTemplate("{chunk}{query}", separator="")
PREFIXED = tt.PromptTemplate("<eos>{chunk}{query}", separator="")  # a fixed first token, as a BOS
CHUNK = "the cat sat on the mat and"
EXAMPLES = [(" the dog", " ran"), (" a big red hat", " sat"), (" the red cat", " ran ."), (" a dog", " sat on")]
ARCHS = ["ln_gelu_learned", "rms_gated_silu_rotary_gqa", "lnpre_relu_learned_parallel"]
OPTIONS = dict(ridge=0.05, pool="answer", vector_site="attn_out", vector_target="attention", attention_matrix=True,
               output_matrix=True, query_weight=0.1, progress=False)


def _cross_entropy(model, deltas, template):
    """Mean ``-log p(answer token)`` over every answer position of EXAMPLES, without the chunk, the
    deltas added to the parameters themselves (``functional_call``: the weight form, not hooks)."""
    params = dict(model.named_parameters())
    params.update({name: params[name].detach() + d for name, d in deltas.items()})
    terms = []
    for ex in EXAMPLES:
        enc = encode_example(model, template, CHUNK, ex)
        n_answer = enc.full.shape[0] - enc.answer_start  # answer tokens, at the end of both prompts
        tokens = enc.reduced
        logp = torch.log_softmax(functional_call(model, params, (tokens[None],))[0], -1)
        for k in range(tokens.shape[0] - n_answer, tokens.shape[0]):
            terms.append(-logp[k - 1, tokens[k]])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("arch", ARCHS)
def test_one_step_is_adam_on_the_cross_entropy_gradient(text_models, arch):
    """One step from the least-squares patch moves every delta by Adam's first step,
    ``-lr * g / (|g| + eps)``, where ``g`` is the gradient of the cross-entropy computed
    independently (the deltas added to the weights by ``functional_call``); the meta records the
    loss before and after, which agree with that independent loss."""
    model = text_models(arch)
    snap = param_snapshot(model)
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, **OPTIONS)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in patch.deltas.items()}
    loss = _cross_entropy(model, leaves, TEMPLATE)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    lr = 1e-3
    before = {k: v.clone() for k, v in patch.deltas.items()}
    refined = tt.refine_thought(model, patch, EXAMPLES, steps=1, lr=lr, progress=False)
    assert set(refined.deltas) == set(patch.deltas)
    assert all(torch.equal(patch.deltas[k], v) for k, v in before.items()) and "refined" not in patch.meta
    moved = 0
    for name, g in grads.items():
        expected = patch.deltas[name] - lr * g / (g.abs() + 1e-8)
        assert_close(refined.deltas[name], expected, 1e-10, name)
        moved += int((refined.deltas[name] != patch.deltas[name]).sum())
    assert moved > 0.9 * sum(d.numel() for d in patch.deltas.values())
    (entry,) = refined.meta["refined"]
    assert entry["steps"] == 1 and entry["n_examples"] == len(EXAMPLES) and entry["n_tokens"] == 6
    assert entry["loss_before"] == pytest.approx(float(loss.detach()), abs=1e-10)
    with torch.no_grad():
        after = _cross_entropy(model, refined.deltas, TEMPLATE)
    assert entry["loss_after"] == pytest.approx(float(after), abs=1e-10)
    assert entry["loss_after"] < entry["loss_before"]
    assert refined.meta["chunk"] == patch.meta["chunk"] and refined.steering.keys() == patch.steering.keys()
    assert_model_untouched(model, snap)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_step_with_an_unpatched_prefix_follows_the_activation_form(text_models, arch):
    """A patch that leaves its first position unpatched (``patch_prefix=False``): refine runs it in
    the weight form after an unpatched key-value cache of that position. One step equals Adam's
    first step on the gradient of the cross-entropy computed through the patch's own hooks (the
    activation form, position by position), and the loss it records is that loss (float64)."""
    model = text_models(arch)
    patch = fit(model, CHUNK, EXAMPLES, template=PREFIXED, patch_prefix=False, **OPTIONS)
    assert patch.unpatched_positions == 1
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in patch.deltas.items()}
    live = tt.ThoughtPatch(deltas=leaves, steering={}, meta=patch.meta)
    terms = []
    with live.apply(model, "activation"):
        for ex in EXAMPLES:
            enc = encode_example(model, PREFIXED, CHUNK, ex)
            n_answer = enc.full.shape[0] - enc.answer_start
            tokens = enc.reduced
            logp = torch.log_softmax(model(tokens[None])[0], -1)
            terms += [-logp[k - 1, tokens[k]] for k in range(tokens.shape[0] - n_answer, tokens.shape[0])]
    loss = torch.stack(terms).mean()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    lr = 1e-3
    refined = tt.refine_thought(model, patch, EXAMPLES, steps=1, lr=lr, progress=False)
    for name, g in grads.items():
        assert_close(refined.deltas[name], patch.deltas[name] - lr * g / (g.abs() + 1e-8), 1e-10, name)
    assert refined.meta["refined"][0]["loss_before"] == pytest.approx(float(loss.detach()), abs=1e-10)
    assert not hooks_attached(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_refining_an_unpatched_prefix_patch(text_models, arch):
    """A patch fitted with ``patch_prefix=False``: the refined patch still leaves the prefix
    unpatched (bit for bit), lowers the loss, does not depend on the batch size (the gradient is
    accumulated over batches), refines further from a refined patch (one meta entry per call),
    saves and loads; 0 steps returns the same deltas; the model is untouched."""
    model = text_models(arch)
    snap = param_snapshot(model)
    patch = fit(model, CHUNK, EXAMPLES, template=PREFIXED, patch_prefix=False, **OPTIONS)
    refined = tt.refine_thought(model, patch, EXAMPLES, steps=3, lr=1e-3, progress=False)
    one_by_one = tt.refine_thought(model, patch, EXAMPLES, steps=3, lr=1e-3, batch_size=1, progress=False)
    for name in patch.deltas:
        assert_close(one_by_one.deltas[name], refined.deltas[name], 1e-10, name)
    (entry,) = refined.meta["refined"]
    assert entry["loss_after"] < entry["loss_before"]
    assert refined.unpatched_positions == patch.unpatched_positions == 1
    tokens = model.to_tokens("<eos> the dog ran on the mat")
    with torch.no_grad():
        _, base = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
        with refined.apply(model):
            _, after = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    for name in base.keys():
        assert torch.equal(after[name][:, 0], base[name][:, 0]), name
        assert (after[name][:, 1:] - base[name][:, 1:]).abs().max() > 1e-6, name
    again = tt.refine_thought(model, refined, EXAMPLES, steps=2, lr=1e-3, progress=False)
    assert [e["steps"] for e in again.meta["refined"]] == [3, 2]
    assert again.meta["refined"][1]["loss_before"] == pytest.approx(entry["loss_after"], abs=1e-10)
    same = tt.refine_thought(model, patch, EXAMPLES, steps=0, progress=False)
    assert all(torch.equal(same.deltas[k], patch.deltas[k]) for k in patch.deltas)
    assert same.meta["refined"][0]["loss_before"] == same.meta["refined"][0]["loss_after"]
    assert_model_untouched(model, snap)


def test_refine_saves_and_loads(text_models, tmp_path):
    model = text_models("ln_gelu_learned")
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, **OPTIONS)
    refined = tt.refine_thought(model, patch, EXAMPLES, steps=2, lr=1e-3, progress=False)
    loaded = tt.ThoughtPatch.load(refined.save(tmp_path / "refined.safetensors"), model)
    assert loaded.meta["refined"] == refined.meta["refined"]
    assert all(torch.equal(loaded.deltas[k], refined.deltas[k]) for k in refined.deltas)


def test_refine_refuses_bad_input_and_cleans_up_on_errors(text_models):
    model = text_models("ln_gelu_learned")
    snap = param_snapshot(model)
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, **OPTIONS)
    for bad in (-1, True):
        with pytest.raises(ValueError, match="steps"):
            tt.refine_thought(model, patch, EXAMPLES, steps=bad, progress=False)
    with pytest.raises(ValueError, match="lr"):
        tt.refine_thought(model, patch, EXAMPLES, lr=0.0, progress=False)
    with pytest.raises(tt.InputError, match="at least one example"):
        tt.refine_thought(model, patch, [], progress=False)
    with pytest.raises(tt.InputError, match="pairs"):
        tt.refine_thought(model, patch, [" the dog"], progress=False)
    bare = tt.ThoughtPatch(deltas=patch.deltas, meta={k: v for k, v in patch.meta.items() if k != "chunk"})
    with pytest.raises(tt.InputError, match="chunk"):
        tt.refine_thought(model, bare, EXAMPLES, progress=False)
    with patch.apply(model):  # hooks attached: refused
        pass
    handle = patch.attach(model, "activation")
    try:
        with pytest.raises(tt.InputError):
            tt.refine_thought(model, patch, EXAMPLES, progress=False)
    finally:
        handle.remove()
    assert_model_untouched(model, snap)


class _Boom(RuntimeError):
    pass


def test_refine_cleans_up_after_an_error_inside_a_step(text_models, monkeypatch):
    """An exception raised inside the patched forward pass (here in block 1, in the second step):
    the patched weights were in the model then (``functional_call``), and the model's own
    parameters are back afterwards, bit for bit."""
    model = text_models("rms_gated_silu_rotary_gqa")
    snap = param_snapshot(model)
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, **OPTIONS)
    name = next(n for n in patch.deltas if n.endswith("mlp.W_in"))
    original = model.get_parameter(name).detach().clone()
    calls, forward = [], model.blocks[1].forward

    def failing(*args, **kwargs):
        current = functools.reduce(getattr, name.split("."), model)  # what the block reads now
        calls.append(torch.equal(current, original + patch.deltas[name]) and not torch.equal(current, original))
        if len(calls) == 2:  # the first step, then fail in the second
            raise _Boom("inside a step")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.blocks[1], "forward", failing)
    with pytest.raises(_Boom):
        tt.refine_thought(model, patch, EXAMPLES, steps=3, lr=1e-3, progress=False)
    monkeypatch.undo()
    assert len(calls) == 2 and calls[0]  # the first step ran under the least-squares patch's weights
    assert not hooks_attached(model)
    assert_model_untouched(model, snap)
