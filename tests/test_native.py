"""TransformerLens-native use of the updates (issue 34): ``updates.hooks()`` as ``fwd_hooks``, the
reduced prompt run at its original positions (``reduced_positions``, ``run_reduced``),
``updates_from_cache`` on an ordinary ``run_with_cache`` cache, and short reprs."""

import pytest
import torch
from helpers import assert_model_untouched, param_snapshot, random_tokens

import tl_thoughts as tt
from tl_thoughts.chunks import Span

ARCHS = ["ln_gelu_learned", "rms_gated_silu_rotary_gqa", "lnpre_relu_learned_parallel"]
CHUNKS = {"one": slice(4, 8), "two": [slice(3, 5), slice(8, 10)]}


def _setup(tiny_model, arch, chunk="one"):
    model = tiny_model(arch)  # float64
    tokens = random_tokens(16, seed=3)
    updates = tt.implicit_updates(model, tokens, CHUNKS[chunk])
    with torch.no_grad():
        full = model(tokens)[0, updates.span.kept_positions]
    return model, tokens, updates, full


@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("arch", ARCHS)
def test_own_run_with_hooks_reproduces_the_full_run_at_original_positions(tiny_model, arch, chunk):
    model, _, updates, full = _setup(tiny_model, arch, chunk)
    snapshot = param_snapshot(model)
    with torch.no_grad(), tt.reduced_positions(model, updates) as reduced:
        assert torch.equal(reduced, updates.reduced_tokens)
        logits = model.run_with_hooks(reduced, fwd_hooks=updates.hooks())
    assert (logits[0] - full).abs().max() < 1e-10
    assert_model_untouched(model, snapshot)
    # without the positions, the same hooks miss: the tokens after the chunk sit earlier
    with torch.no_grad():
        shifted = model.run_with_hooks(updates.reduced_tokens, fwd_hooks=updates.hooks())
    assert (shifted[0] - full).abs().max() > 1e-2
    assert (shifted[0, : updates.span.start] - full[: updates.span.start]).abs().max() < 1e-10  # the prefix agrees


@pytest.mark.parametrize("arch", ARCHS)
def test_run_reduced_matches_and_runs_the_users_hooks_after_the_updates(tiny_model, arch):
    model, _, updates, full = _setup(tiny_model, arch)
    seen = {}

    def read(act, hook):
        seen[hook.name] = act.clone()

    last = f"blocks.{model.cfg.n_layers - 1}.hook_attn_out"
    logits = tt.run_reduced(model, updates, [(last, read)])
    assert (logits[0] - full).abs().max() < 1e-10
    # the user's hook saw the patched attention output: the full run's at the kept positions
    _, cache = model.run_with_cache(updates.tokens)
    assert (seen[last][0] - cache[last][0, updates.span.kept_positions]).abs().max() < 1e-10
    unpatched = tt.run_reduced(model, updates, patched=False)
    assert (unpatched[0] - full).abs().max() > 1e-2
    assert not model.hook_dict[last].fwd_hooks


def test_hooks_of_a_subset_and_of_a_batch(tiny_model):
    model, tokens, updates, full = _setup(tiny_model, "ln_gelu_learned")
    assert [n for n, _ in updates.hooks()] == [f"blocks.{l}.hook_attn_out" for l in range(model.cfg.n_layers)]
    assert updates.reduced_rows.tolist() == list(range(4, 12))
    part = tt.implicit_updates(model, tokens, slice(4, 8), layers=[1], positions=[9, 15])
    assert [n for n, _ in part.hooks()] == ["blocks.1.hook_attn_out"]
    assert part.reduced_rows.tolist() == [5, 11]
    # a batch of copies of the reduced prompt: every row gets the vectors
    with torch.no_grad(), tt.reduced_positions(model, updates) as reduced:
        logits = model.run_with_hooks(reduced.repeat(3, 1), fwd_hooks=updates.hooks())
    assert (logits - full).abs().max() < 1e-10


def test_run_reduced_in_the_updates_dtype_on_a_float32_model(tiny_model):
    model = tiny_model("rms_gated_silu_rotary_gqa", torch.float32)
    tokens = random_tokens(16, seed=3)
    updates = tt.implicit_updates(model, tokens, slice(4, 8), dtype=torch.float64)
    logits = tt.run_reduced(model, updates)
    assert logits.dtype == torch.float64 and model.cfg.dtype == torch.float32
    with tt.computing_in(model, torch.float64), torch.no_grad():
        full = model(tokens)[0, updates.span.kept_positions]
    assert (logits[0] - full).abs().max() < 1e-10


def test_reduced_positions_restores_on_error_and_checks_arguments(tiny_model, fresh_model):
    model, _, updates, _ = _setup(tiny_model, "rms_gated_silu_rotary_gqa")
    snapshot = param_snapshot(model)
    with pytest.raises(RuntimeError, match="inside"), tt.reduced_positions(model, updates):
        raise RuntimeError("inside")
    assert_model_untouched(model, snapshot)
    with tt.reduced_positions(model, updates.span) as reduced:  # a Span: no tokens known
        assert reduced is None
    with pytest.raises(TypeError):  # ArgumentTypeError (the test run's runtime type checks may come first)
        with tt.reduced_positions(model, "4:8"):
            pass
    other = fresh_model("rms_gated_silu_rotary_gqa", seed=1)
    with pytest.raises(tt.InputError, match="another model"):
        tt.run_reduced(other, updates)


# --- updates_from_cache -----------------------------------------------------------------------------


def _close(a: tt.ImplicitUpdates, b: tt.ImplicitUpdates, atol: float = 1e-12) -> None:
    assert a.span == b.span and a.layers == b.layers and torch.equal(a.positions, b.positions)
    for name in ("vectors", "head_vectors", "chunk_attention", "mlp_in", "mlp_in_with_chunk", "pre_norm_vectors"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert (x - y).abs().max() < atol, name


@pytest.mark.parametrize("arch", ARCHS + ["rms_gated_gelu_rotary_gqa_prepost"])  # + a post-attention norm
@pytest.mark.parametrize("chunk", list(CHUNKS))
def test_updates_from_an_ordinary_run_with_cache(tiny_model, arch, chunk):
    model, tokens, updates, _ = _setup(tiny_model, arch, chunk)
    _, cache = model.run_with_cache(tokens)  # batched ActivationCache, as TransformerLens returns it
    _close(tt.updates_from_cache(model, tokens, CHUNKS[chunk], cache), updates)
    _close(tt.updates_from_cache(model, tokens[0], updates.span, cache.remove_batch_dim()), updates)
    _close(tt.updates_from_cache(model, tokens, CHUNKS[chunk], dict(cache.items())), updates)


def test_updates_from_cache_with_a_substring_and_a_names_filter(text_models):
    model = text_models("ln_gelu_learned")
    prompt = "the cat sat on the mat and the dog ran"
    updates = tt.implicit_updates(model, prompt, " on the mat")
    tokens = model.to_tokens(prompt)
    keep = ("hook_pattern", "hook_v", "hook_z", "hook_resid_mid")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(keep))
    _close(tt.updates_from_cache(model, prompt, " on the mat", cache), updates)


def test_updates_from_cache_refuses_what_it_cannot_read(tiny_model):
    model, tokens, _, _ = _setup(tiny_model, "ln_gelu_learned")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    with pytest.raises(tt.InputError, match="lacks blocks.0.attn.hook_pattern"):
        tt.updates_from_cache(model, tokens, slice(4, 8), cache)
    _, batch = model.run_with_cache(torch.cat([tokens, tokens]))
    with pytest.raises(tt.InputError, match="batch of 2"):
        tt.updates_from_cache(model, tokens, slice(4, 8), batch)
    with pytest.raises(tt.InputError, match="16-token run"):
        tt.updates_from_cache(model, tokens[:, :12], slice(4, 8), model.run_with_cache(tokens)[1])
    with pytest.raises(tt.InputError, match="Span of a 12-token"):
        tt.updates_from_cache(model, tokens, Span(4, 8, 12), model.run_with_cache(tokens)[1])
    with pytest.raises(TypeError):
        tt.updates_from_cache(model, tokens, slice(4, 8), [1, 2])


# --- reprs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", list(CHUNKS))
def test_reprs_are_short_and_say_the_key_facts(tiny_model, chunk):
    model, _, updates, _ = _setup(tiny_model, "rms_gated_silu_rotary_gqa", chunk)
    text = repr(updates)
    assert len(text) < 400 and "tensor(" not in text, text
    n_kept = len(updates.span.positions)
    assert text.startswith("ImplicitUpdates(") and updates.span.describe() in text
    assert f"{n_kept} of {n_kept} kept positions" in text and "16 tokens" in text
    assert f"{model.cfg.n_layers} layers" in text and "W_gate, W_in" in text and "float64" in text
    report = tt.verify(model, updates)
    text = repr(report)
    assert len(text) < 400 and "tensor(" not in text, text
    assert text.startswith("VerificationReport(") and "activation" in text and "weight" in text
    assert f"{len(updates.span.kept_positions)} kept positions" in text
    form = repr(report["activation"])
    assert len(form) < 400 and "tensor(" not in form and form.startswith("FormReport('activation'")
    assert f"{report['activation'].max_abs_logit_error:.2e}" in form
    part = tt.implicit_updates(model, updates.tokens, CHUNKS[chunk], layers=[1], positions=updates.positions[-2:])
    assert f"layers [1] of {model.cfg.n_layers}" in repr(part) and f"2 of {n_kept} kept" in repr(part)
