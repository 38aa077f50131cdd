"""Patches never leave a model modified by surprise, and are only ever applied to their own model.

- applications (``apply``, ``attach``) in either form, removed in any order and mixed with
  ``merge_into``, leave exactly the model's own parameters plus the deltas of the patches still
  applied in the weight form (a property test over random sequences), and the model's own tensors,
  bit-identical, once none is left;
- the same patch is never applied twice (nested, attached twice, a loaded copy, after merging);
- the fingerprint reads every parameter, the file's checksum covers the metadata, saving into a
  bad place is a ``PatchFileError``; updates refuse a model other than their own.
"""

import contextlib
import functools
import hashlib
import json
import os
import types

import pytest
import torch
from helpers import (
    assert_close,
    assert_model_untouched,
    fit,
    hooks_attached,
    make_model,
    make_word_tokenizer,
    param_snapshot,
    parameters_copy,
    parameters_differ,
    run_patch_sequence,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import tl_thoughts as tt
from tl_thoughts import _tl
from tl_thoughts.analysis import direct_effect, top_k_recovery
from tl_thoughts.fingerprint import fingerprint, model_fingerprint
from tl_thoughts.patch import IncompatibleModelError, PatchFileError

TEMPLATE = tt.PromptTemplate("{chunk}{query}", separator="")
EXAMPLES = [(" the dog", " ran"), (" a big red hat", " sat"), (" the red cat", " ran ."), (" a dog", " sat on")]
CHUNKS = ("the cat sat on the mat and", "a big red hat and")


def _model():
    """The same tiny model every call (same seed): patches fitted on one apply to the others."""
    return make_model("ln_gelu_learned", tokenizer=make_word_tokenizer())


@functools.lru_cache(maxsize=1)
def _patches() -> tuple:
    """Three different patches of the same model: two chunks, and the first one's vectors only."""
    model = _model()
    first, second = (fit(model, chunk, EXAMPLES, template=TEMPLATE) for chunk in CHUNKS)
    return first, second, first.only("vectors")


def _params(model) -> dict[str, torch.Tensor]:
    return parameters_copy(model)


def _assert_params(model, expected: dict[str, torch.Tensor], what: str) -> None:
    assert not parameters_differ(model, expected), what


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("attach"), st.integers(0, 2), st.sampled_from(["weight", "activation"])),
        st.tuples(st.just("remove"), st.integers(0, 5), st.just("")),
        st.tuples(st.just("merge"), st.integers(0, 2), st.just("")),
    ),
    min_size=1, max_size=10,
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=OPS, finish=st.permutations(range(8)))
def test_any_sequence_of_applications_removals_and_merges_restores_the_model(ops, finish):
    """After every step, exactly the model's own (merged) parameters plus the weight-form deltas
    still applied, in order; a second application refused; at the end the model's own tensors
    (``helpers.run_patch_sequence``)."""
    assert run_patch_sequence(_model(), list(_patches()), ops, finish) == []


class _SaveAndRestore:
    """A patch applied as before issue 33: each application saves the tensors it finds and puts
    them back on removal (wrong when removed out of order)."""

    def __init__(self, patch):
        self.patch, self.deltas = patch, patch.deltas

    def attach(self, model, form):
        stack = contextlib.ExitStack()
        stack.enter_context(_tl.swapped_tensors(model, self.patch.parameters(model)))
        return types.SimpleNamespace(remove=stack.close)

    def hooks(self, model):
        return self.patch.hooks(model)


def test_the_sequence_check_can_fail():
    """``run_patch_sequence`` reports the bug of issue 33 (two weight-form handles, the first removed
    first, leave the first patch in the weights) in the old way of applying patches."""
    first, second, _ = _patches()
    old = [_SaveAndRestore(first), _SaveAndRestore(second)]
    ops = [("attach", 0, "weight"), ("attach", 1, "weight"), ("remove", 0, "")]
    problems = run_patch_sequence(_model(), old, ops, [0])
    assert any("after removing every handle" in p for p in problems), problems
    assert run_patch_sequence(_model(), [first, second], ops, [0]) == []


def test_handles_removed_out_of_order_restore_the_model_bit_identically():
    """The issue's case: two weight-form handles, the first removed first."""
    first, second, _ = _patches()
    model = _model()
    snapshot = param_snapshot(model)
    h1, h2 = first.attach(model), second.attach(model)
    h1.remove()
    _assert_params(model, {**_params(_model()), **second.parameters(_model())}, "second alone")
    h2.remove()
    assert_model_untouched(model, snapshot)
    # contexts exited out of order (entered by hand), mixing the forms
    a, b = first.apply(model, "activation"), second.apply(model, "weight")
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert not hooks_attached(model)
    b.__exit__(None, None, None)
    assert_model_untouched(model, snapshot)


def test_a_removal_under_swapped_parameters_is_refused_and_leaves_the_model_as_it_is():
    first, _, _ = _patches()
    model = _model()
    snapshot = param_snapshot(model)
    handle = first.attach(model)
    patched = _params(model)
    with tt.computing_in(model, torch.float32):  # the tiny models are float64
        with pytest.raises(tt.InputError, match="replaced since the patch was applied"):
            handle.remove()
        assert handle.active
    _assert_params(model, patched, "still patched")
    handle.remove()
    assert_model_untouched(model, snapshot)


def test_the_same_patch_is_never_applied_twice(tmp_path):
    first, second, _ = _patches()
    model = _model()
    snapshot = param_snapshot(model)
    for outer in ("weight", "activation"):
        for inner in ("weight", "activation"):
            with first.apply(model, outer):
                inside = _params(model)
                with pytest.raises(tt.InputError, match="applied to this model already"):
                    with first.apply(model, inner):
                        pass
                _assert_params(model, inside, "refused nested application")
            assert_model_untouched(model, snapshot)
    copy = tt.ThoughtPatch.load(first.save(tmp_path / "p.safetensors"), model=model)
    with first.apply(model), pytest.raises(tt.InputError, match="applied to this model already"):
        copy.attach(model)
    with second.apply(model):  # another patch stacks
        pass
    assert_model_untouched(model, snapshot)
    first.merge_into(model)
    for again in (lambda: first.apply(model).__enter__(), lambda: copy.attach(model), lambda: first.merge_into(model)):
        with pytest.raises(tt.InputError, match="merged into this model"):
            again()
    with second.apply(model):  # fitted before the merge: applies on top of it
        pass


def test_the_fingerprint_reads_every_parameter():
    """Changing one element of ANY parameter changes the fingerprint; a float64 copy keeps it."""
    model = _model()
    base = model_fingerprint(model)
    assert fingerprint({n: p.double() for n, p in model.named_parameters()}) == base
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.data.view(-1)
            for index in (0, flat.numel() // 2, flat.numel() - 1):
                old = flat[index].clone()
                flat[index] = old + 1e-3
                assert model_fingerprint(model) != base, (name, index)
                flat[index] = old
    assert model_fingerprint(model) == base


def test_a_model_changed_in_its_last_block_is_refused(tmp_path):
    first, _, _ = _patches()
    model = _model()
    path = first.save(tmp_path / "p.safetensors")
    with torch.no_grad():
        model.blocks[-1].mlp.W_out.data[3, 5] += 1e-4  # one element, in the last block
    with pytest.raises(IncompatibleModelError, match="another model"):
        first.apply(model).__enter__()
    with pytest.raises(IncompatibleModelError, match="another model"):
        tt.ThoughtPatch.load(path, model=model)
    assert not hooks_attached(model)


def _rewrite(path, edit_meta=None, edit_tensors=None, out=None):
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["tl_thoughts"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(out or path), metadata={"tl_thoughts": json.dumps(meta)})
    return out or path


def test_the_checksum_covers_the_metadata(tmp_path):
    first, _, _ = _patches()
    path = first.save(tmp_path / "p.safetensors")
    tt.ThoughtPatch.load(path)  # intact: read
    for key, value in (("chunk", "something else"), ("unpatched_positions", 3), ("version", "9.9")):
        edited = _rewrite(path, edit_meta=lambda m, k=key, v=value: m.__setitem__(k, v), out=tmp_path / f"{key}.safetensors")
        with pytest.raises(PatchFileError, match="checksum"):
            tt.ThoughtPatch.load(edited)
    edited = _rewrite(path, edit_tensors=lambda t: t[next(iter(t))].add_(1e-3), out=tmp_path / "t.safetensors")
    with pytest.raises(PatchFileError, match="checksum"):
        tt.ThoughtPatch.load(edited)


def _format_1_file(patch, model, path):
    """A patch file as version 1 wrote it: the checksum of the tensors alone, and the fingerprint of
    the first 4096 values of W_E, W_U and the first query matrix (written out here independently)."""
    tensors = {f"delta:{k}": v.detach().contiguous() for k, v in patch.deltas.items()}
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    shapes = patch.meta["model"]["shapes"]
    fp = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode())
    for t in (model.W_E, model.W_U, model.blocks[0].attn.W_Q):
        fp.update(t.detach().flatten()[:4096].to(torch.float32).numpy().tobytes())
    meta = {**patch.meta, "format": "tl_thoughts.ThoughtPatch/1", "sha256": digest.hexdigest(),
            "model": {**patch.meta["model"], "fingerprint": fp.hexdigest()}}
    save_file(tensors, str(path), metadata={"tl_thoughts": json.dumps(meta)})
    return path


def test_format_1_files_are_read_with_a_warning_and_upgraded_against_their_model(tmp_path):
    first, _, _ = _patches()
    model = _model()
    old = _format_1_file(first, model, tmp_path / "old.safetensors")
    with pytest.warns(UserWarning, match="ThoughtPatch/1"):
        loose = tt.ThoughtPatch.load(old)
    with pytest.raises(PatchFileError, match="load it with ThoughtPatch.load"):
        loose.save(tmp_path / "again.safetensors")
    with loose.apply(model):  # the old fingerprint is checked the old way
        pass
    with pytest.warns(UserWarning, match="ThoughtPatch/1"):
        upgraded = tt.ThoughtPatch.load(old, model=model)
    new = tt.ThoughtPatch.load(upgraded.save(tmp_path / "new.safetensors"), model=model)
    assert new.meta["model"] == first.meta["model"]
    assert all(torch.equal(new.deltas[k], first.deltas[k]) for k in first.deltas)


def test_saving_into_a_bad_place_is_a_patch_file_error(tmp_path):
    first, _, _ = _patches()
    (tmp_path / "a_file").write_text("x")
    for bad, word in ((tmp_path, "folder"), (tmp_path / "a_file" / "p.safetensors", "cannot write"),
                      ("/proc/tl_thoughts_test/p.safetensors", "cannot write")):
        with pytest.raises(PatchFileError, match=word) as caught:
            first.save(bad)
        assert str(bad) in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # nothing left behind
    old = os.umask(0o022)
    try:
        path = first.save(tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_updates_refuse_a_model_other_than_their_own():
    model = _model()
    other = make_model("ln_gelu_learned", tokenizer=make_word_tokenizer(), seed=1)
    tokens = torch.arange(10)[None]
    updates = tt.implicit_updates(other, tokens, slice(2, 5))
    updates.check_model(other)
    for call in (lambda: tt.verify(model, updates), lambda: tt.exact_weight_patch(model, updates),
                 lambda: direct_effect(model, updates, (7, 3)), lambda: top_k_recovery(model, updates, (7, 3))):
        with pytest.raises(tt.InputError, match="another model"):
            call()
    # the same model with other weights since: a patch applied after the updates were computed
    first, _, _ = _patches()
    mine = tt.implicit_updates(model, tokens, slice(2, 5))
    with first.apply(model), pytest.raises(tt.InputError, match="other weights"):
        tt.verify(model, mine)
    report = tt.verify(model, mine)  # removed again: the same weights
    assert report.max_abs_logit_error < 1e-4


def test_the_report_gives_relative_residual_errors_per_block():
    """``resid_rel_errors``: per block, the max over kept positions of max |difference| / max
    |full residual| at that position, bounded by the absolute error over the largest and the
    smallest residual row (read from an independent full run)."""
    model = _model()
    tokens = torch.arange(12)[None]
    updates = tt.implicit_updates(model, tokens, slice(2, 5))
    report = tt.verify(model, updates)
    _, cache = model.run_with_cache(tokens)
    kept = report.kept_positions
    for form in report.forms.values():
        assert form.resid_rel_errors.shape == form.resid_errors.shape
        for layer in range(model.cfg.n_layers):
            scale = cache[f"blocks.{layer}.hook_resid_post"][0, kept].abs().amax(-1).double()
            absolute, relative = float(form.resid_errors[layer]), float(form.resid_rel_errors[layer])
            assert absolute / float(scale.max()) * (1 - 1e-6) <= relative <= absolute / float(scale.min()) * (1 + 1e-6)
    assert report["unpatched"].max_resid_rel_error > 1e-3 > report.max_resid_rel_error
    assert "(relative)" in report.table()
    assert_close(torch.tensor(report.max_resid_rel_error), torch.tensor(0.0), 1e-5, "patched forms")
