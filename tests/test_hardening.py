"""Hardening (issue 6): several chunks at once, batches of prompts (left and right padding),
precision modes (float64 on any model, half-precision models computed in float32 with a warning),
subsets of layers and positions, and adversarial inputs. Exactness is checked in float64 to 1e-10
against the full run, and the model is bit-identical with no hook left after every call."""

import warnings

import pytest
import torch
from helpers import (
    ARCHITECTURES,
    ARCHS,
    D_VOCAB,
    assert_close,
    assert_model_untouched,
    make_model,
    make_word_tokenizer,
    param_snapshot,
    random_tokens,
    runtime_checks_off,
)

import tl_thoughts as tt
from tl_thoughts import analysis

EXACT = 1e-10
FIELDS = ("vectors", "head_vectors", "chunk_attention", "mlp_in", "mlp_in_with_chunk", "pre_norm_vectors")


def _distinct_tokens(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(D_VOCAB, generator=gen)[:n][None]


def _assert_same_updates(actual: tt.ImplicitUpdates, expected: tt.ImplicitUpdates, atol: float) -> None:
    assert torch.equal(actual.tokens, expected.tokens)
    assert actual.span == expected.span
    assert torch.equal(actual.positions, expected.positions) and actual.layers == expected.layers
    for name in FIELDS:
        a, b = getattr(actual, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(a, b, atol, name)


# --- several chunks at once ---------------------------------------------------------------------

MULTI = {
    "two_chunks": [slice(1, 3), slice(5, 8)],
    "three_chunks_one_token_each": [slice(2, 3), range(4, 5), slice(9, 10)],
    "from_the_start": [slice(0, 2), slice(6, 9)],
}


@pytest.mark.parametrize("chunks", MULTI.values(), ids=MULTI.keys())
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_several_chunks_are_exact(tiny_model, arch, chunks):
    """Removing several chunks at once: the kept tokens between the chunks carry updates too, and
    both forms reproduce the full run at every kept position."""
    model = tiny_model(arch)
    tokens = _distinct_tokens(13)
    snapshot = param_snapshot(model)
    updates = tt.implicit_updates(model, tokens, chunks)
    removed = sorted({p for c in chunks for p in range(c.start, c.stop)})
    assert updates.span.chunk_mask.nonzero()[:, 0].tolist() == removed
    kept = [p for p in range(13) if p not in removed]
    assert updates.span.kept_positions.tolist() == kept
    assert updates.positions.tolist() == [p for p in kept if p > removed[0]]
    assert [(s.start, s.stop) for s in updates.chunks] == [(c.start, c.stop) for c in chunks]
    report = tt.verify(model, updates)
    assert report.max_abs_logit_error <= EXACT and report.argmax_agreement == 1.0
    assert report["unpatched"].max_abs_logit_error > 1e-2
    assert report.max_resid_error <= EXACT
    assert f"{len(chunks)} chunks" in report.table()
    with pytest.raises(tt.ChunkError, match="no single slice"):
        _ = updates.chunk
    assert_model_untouched(model, snapshot)


def test_several_chunks_equal_their_forms(tiny_model):
    """The same set of positions given as slices, ranges, a list of positions or a boolean mask
    gives the same updates; adjacent chunks merge."""
    model = tiny_model("rms_gated_silu_rotary_gqa")
    tokens = _distinct_tokens(12)
    reference = tt.implicit_updates(model, tokens, [slice(1, 3), slice(6, 8)])
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[1, 2, 6, 7]] = True
    for form in ([range(6, 8), range(1, 3)], [1, 2, 6, 7], [7, 6, 2, 1], mask, [slice(1, 2), slice(2, 3), slice(6, 8)]):
        _assert_same_updates(tt.implicit_updates(model, tokens, form), reference, 0.0)
    one = tt.implicit_updates(model, tokens, [slice(2, 4), slice(4, 6)])
    assert one.span.intervals == ((2, 6),) and one.chunk == slice(2, 6)
    _assert_same_updates(one, tt.implicit_updates(model, tokens, slice(2, 6)), 0.0)


BAD_MULTI = {
    "overlapping": ([slice(1, 4), slice(3, 6)], "overlap"),
    "repeated_position": ([2, 3, 3], "repeated"),
    "position_out_of_range": ([2, 40], "out of range"),
    "last_chunk_reaches_the_end": ([slice(1, 3), slice(8, 10)], "reaches the end"),
    "empty_list": ([], "empty"),
    "empty_member": ([slice(1, 3), slice(5, 5)], "empty"),
    "mixed_ints_and_slices": ([2, slice(4, 6)], "not both"),
    "mask_of_wrong_length": (torch.ones(7, dtype=torch.bool), "shape"),
    "mask_selecting_nothing": (torch.zeros(10, dtype=torch.bool), "no position"),
    "int_mask": (torch.ones(10, dtype=torch.long), "boolean mask"),
}


@pytest.mark.parametrize("chunk, message", BAD_MULTI.values(), ids=BAD_MULTI.keys())
def test_bad_several_chunks_raise_chunk_error(tiny_model, chunk, message):
    model = tiny_model("ln_gelu_learned")
    snapshot = param_snapshot(model)
    with runtime_checks_off(), pytest.raises(tt.ChunkError, match=message):
        tt.implicit_updates(model, random_tokens(10), chunk)
    assert_model_untouched(model, snapshot)


def test_tuple_of_ints_is_refused_as_ambiguous(tiny_model):
    model = tiny_model("ln_gelu_learned")
    with runtime_checks_off(), pytest.raises(tt.ChunkError, match="ambiguous"):
        tt.implicit_updates(model, random_tokens(10), (2, 5))


TEXT = "the cat sat on the mat . a big red hat ran"


@pytest.fixture(scope="module")
def text_model():
    return make_model("rms_gated_silu_rotary_gqa", tokenizer=make_word_tokenizer())


def test_chunks_as_a_list_of_substrings(text_model):
    snapshot = param_snapshot(text_model)
    updates = tt.implicit_updates(text_model, TEXT, ["cat sat", "a big"])
    assert updates.span.intervals == ((1, 3), (7, 9))
    by_slices = tt.implicit_updates(text_model, TEXT, [slice(1, 3), slice(7, 9)])
    _assert_same_updates(updates, by_slices, 0.0)
    assert tt.verify(text_model, updates).max_abs_logit_error <= EXACT
    for bad, message in ((["cat sat", "sat on"], "overlap"), (["cat", "dog"], "not found"), (["cat", "the"], "more than once")):
        with pytest.raises(tt.ChunkError, match=message):
            tt.implicit_updates(text_model, TEXT, bad)
    assert_model_untouched(text_model, snapshot)


# --- batches --------------------------------------------------------------------------------------

BATCH_ARCHS = ["ln_gelu_learned", "rms_gated_silu_rotary_gqa", "lnpre_relu_learned_parallel",
               "rms_gated_gelu_rotary_gqa_prepost", "rmspre_attn_only_rotary"]


def _batch_case():
    prompts = [_distinct_tokens(9, seed=1)[0], _distinct_tokens(14, seed=2)[0], _distinct_tokens(6, seed=3)[0]]
    chunks = [slice(2, 5), [slice(0, 2), slice(6, 9)], slice(1, 3)]
    return prompts, chunks


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch", BATCH_ARCHS)
def test_batch_equals_each_prompt_alone(tiny_model, arch, padding_side):
    """Prompts of different lengths, padded on either side, in one run: every result equals the
    prompt's own (float64, 1e-12) and verifies exactly; the attention mask keeps padding out of
    every renormalisation."""
    model = tiny_model(arch)
    snapshot = param_snapshot(model)
    prompts, chunks = _batch_case()
    batch = tt.implicit_updates_batch(model, prompts, chunks, padding_side=padding_side)
    assert len(batch) == len(prompts)
    for tokens, chunk, updates in zip(prompts, chunks, batch):
        alone = tt.implicit_updates(model, tokens[None], chunk)
        _assert_same_updates(updates, alone, 1e-12)
        assert tt.verify(model, updates).max_abs_logit_error <= EXACT
    assert_model_untouched(model, snapshot)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_tensor_with_attention_mask(tiny_model, padding_side):
    """An already padded [batch, pos] tensor with its mask (pad ids arbitrary: they are never
    read) gives the same results as the list of prompts."""
    model = tiny_model("rms_gated_silu_rotary_gqa")
    prompts, chunks = _batch_case()
    n = max(len(p) for p in prompts)
    padded = torch.full((len(prompts), n), 7)  # a real token id as padding: the mask decides
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        lo = n - len(p) if padding_side == "left" else 0
        padded[i, lo : lo + len(p)] = p
        mask[i, lo : lo + len(p)] = 1
    from_tensor = tt.implicit_updates_batch(model, padded, chunks, attention_mask=mask)
    from_list = tt.implicit_updates_batch(model, prompts, chunks, padding_side=padding_side)
    for a, b in zip(from_tensor, from_list):
        _assert_same_updates(a, b, 0.0)


def test_batch_of_strings_and_one_chunk_for_all(text_model):
    texts = ["the cat sat on the mat", "a big red hat sat on the cat . the dog ran"]
    batch = tt.implicit_updates_batch(text_model, texts, "sat on", padding_side="left")
    for text, updates in zip(texts, batch):
        _assert_same_updates(updates, tt.implicit_updates(text_model, text, "sat on"), 1e-12)


BAD_BATCHES = {
    "mask_not_padding": (lambda t: (t, torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))),
    "mask_all_zero_row": (lambda t: (t, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))),
    "mask_wrong_shape": (lambda t: (t, torch.ones(2, 3, dtype=torch.long))),
    "mask_not_binary": (lambda t: (t, torch.full((2, 4), 2))),
}


@pytest.mark.parametrize("make", BAD_BATCHES.values(), ids=BAD_BATCHES.keys())
def test_bad_masks_are_refused(tiny_model, make):
    model = tiny_model("ln_gelu_learned")
    snapshot = param_snapshot(model)
    tokens, mask = make(random_tokens(8).reshape(2, 4))
    with runtime_checks_off(), pytest.raises(tt.InputError):
        tt.implicit_updates_batch(model, tokens, slice(0, 1), attention_mask=mask)
    assert_model_untouched(model, snapshot)


def test_bad_batch_arguments_are_refused(tiny_model):
    model = tiny_model("ln_gelu_learned")
    snapshot = param_snapshot(model)
    prompts = [random_tokens(6)[0], random_tokens(8, seed=1)[0]]
    with runtime_checks_off():
        with pytest.raises(tt.InputError, match="one chunk specification per prompt"):
            tt.implicit_updates_batch(model, prompts, [slice(1, 2)])
        with pytest.raises(tt.InputError, match="padding_side"):
            tt.implicit_updates_batch(model, prompts, slice(1, 2), padding_side="middle")
        with pytest.raises(tt.InputError, match="non-empty list"):
            tt.implicit_updates_batch(model, [], slice(1, 2))
        with pytest.raises(tt.InputError, match="prompt 1"):
            tt.implicit_updates_batch(model, [prompts[0], torch.tensor([1, D_VOCAB + 3, 2])], slice(0, 1))
        with pytest.raises(tt.ChunkError, match="prompt 0"):
            tt.implicit_updates_batch(model, prompts, [slice(2, 6), slice(1, 2)])
        with pytest.raises(tt.InputError, match="attention_mask goes with"):
            tt.implicit_updates_batch(model, prompts, slice(1, 2), attention_mask=torch.ones(2, 8))
    assert_model_untouched(model, snapshot)


# --- precision ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_gated_silu_rotary_gqa", "rms_gated_gelu_rotary_gqa_prepost"])
def test_float64_mode_on_a_float32_model(tiny_model, arch):
    """``dtype=torch.float64`` runs the whole computation in float64 on a float32 model (which is
    left float32 and bit-identical): exact to 1e-10, and the report says float64."""
    model = tiny_model(arch, torch.float32)
    snapshot = param_snapshot(model)
    tokens = _distinct_tokens(12)
    updates = tt.implicit_updates(model, tokens, slice(3, 7), dtype=torch.float64)
    assert updates.dtype == torch.float64
    report = tt.verify(model, updates)
    assert report.dtype == torch.float64 and "dtype float64" in report.table()
    assert report.max_abs_logit_error <= EXACT
    single = tt.verify(model, tt.implicit_updates(model, tokens, slice(3, 7)))
    assert single.dtype == torch.float32 and single.max_abs_logit_error > report.max_abs_logit_error
    assert model.cfg.dtype == torch.float32
    assert_model_untouched(model, snapshot)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_models_are_computed_in_float32_with_a_warning(half):
    model = make_model("rms_gated_silu_rotary_gqa", dtype=half)
    snapshot = param_snapshot(model)
    tokens = _distinct_tokens(12)
    with pytest.warns(tt.PrecisionWarning, match="float32"):
        updates = tt.implicit_updates(model, tokens, slice(3, 7))
    assert updates.dtype == torch.float32
    report = tt.verify(model, updates)
    assert report.dtype == torch.float32 and report.max_abs_logit_error <= 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit dtype: no warning
        exact = tt.verify(model, tt.implicit_updates(model, tokens, slice(3, 7), dtype=torch.float64))
    assert exact.max_abs_logit_error <= EXACT
    assert model.cfg.dtype == half
    assert_model_untouched(model, snapshot)


def test_computing_in_is_restored_on_exceptions(tiny_model):
    model = tiny_model("ln_gelu_learned", torch.float32)
    snapshot = param_snapshot(model)
    with pytest.raises(RuntimeError, match="inside"):
        with tt.computing_in(model, torch.float64):
            assert model.W_in.dtype == torch.float64 and model.cfg.dtype == torch.float64
            raise RuntimeError("inside")
    assert model.cfg.dtype == torch.float32
    assert_model_untouched(model, snapshot)
    with runtime_checks_off(), pytest.raises(tt.InputError, match="float32 or float64"):
        tt.implicit_updates(model, random_tokens(8), slice(1, 3), dtype=torch.float16)


# --- subsets of layers and positions --------------------------------------------------------------


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_gated_silu_rotary_gqa", "rmspre_attn_only_rotary"])
def test_subsets_of_layers_and_positions_are_slices_of_the_whole(arch):
    model = make_model(arch, n_layers=3)
    tokens = _distinct_tokens(14)
    whole = tt.implicit_updates(model, tokens, slice(2, 6))
    assert whole.is_complete
    part = tt.implicit_updates(model, tokens, slice(2, 6), layers=[2, 0], positions=[13, 7, 9])
    assert part.layers == (0, 2) and part.positions.tolist() == [7, 9, 13] and not part.is_complete
    rows = torch.tensor([7, 9, 13]) - 6
    for name in FIELDS:
        full = getattr(whole, name)
        if full is not None:
            assert_close(getattr(part, name), full[[0, 2]][:, rows], 1e-14, name)
    if not ARCHS[arch].attn_only:
        assert_close(part.matrices("W_in").AB, whole.matrices("W_in").AB[[0, 2]][:, rows], 1e-12, "matrices")
    labels = analysis.head_attribution(model, part, return_labels=True)[1]
    assert labels[0] == "L0H0" and labels[-1] == f"L2H{model.cfg.n_heads - 1}"
    with pytest.raises(tt.InputError, match="every block"):
        tt.verify(model, part)
    with pytest.raises(tt.InputError, match="every block"):
        tt.exact_weight_patch(model, part)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[5]), "subset"), (dict(layers=[]), "subset"), (dict(layers=3), "sequence"),
        (dict(positions=[1]), "not kept positions"), (dict(positions=[3]), "not kept positions"),
        (dict(positions=[99]), "not kept positions"), (dict(positions=[]), "non-empty"),
        (dict(positions=[7.0]), "non-empty list"),
    ],
)
def test_bad_subsets_are_refused(tiny_model, kwargs, message):
    model = tiny_model("ln_gelu_learned")
    snapshot = param_snapshot(model)
    with runtime_checks_off(), pytest.raises(tt.InputError, match=message):
        tt.implicit_updates(model, random_tokens(10), slice(2, 5), **kwargs)
    assert_model_untouched(model, snapshot)


def test_streamed_extraction_equals_the_cached_arithmetic(tiny_model):
    """``implicit_updates`` (hooks reduce each block's attention as it is computed) and
    ``updates_from_cache`` (the same arithmetic on a stored full cache) agree bit for bit."""
    from tl_thoughts.updates import updates_from_cache

    for arch in ("rms_gated_silu_rotary_gqa", "rms_gated_gelu_rotary_gqa_prepost", "lnpre_relu_learned_parallel"):
        model = tiny_model(arch)
        tokens = _distinct_tokens(12)
        streamed = tt.implicit_updates(model, tokens, [slice(2, 4), slice(6, 8)])
        _, cache = model.run_with_cache(tokens)
        cached = updates_from_cache(model, tokens, streamed.span, {k: v[0] for k, v in cache.items()})
        _assert_same_updates(streamed, cached, 1e-13)



@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_linear_layout_stores_the_gated_weights_transposed_and_restores_them(tiny_model, arch):
    """``_tl.linear_layout`` (the speed-up of many short runs): inside, every gated MLP weight and
    the unembedding hold the same values with ``W.T`` contiguous (TransformerLens'
    ``W.T.contiguous()`` copies nothing) and the model computes the same logits, bit for bit; a
    nested call copies nothing more; on exit, also on an exception, the original tensors are back;
    models without gated MLPs have only their unembedding laid out."""
    from tl_thoughts import _tl

    model = tiny_model(arch)
    spec = _tl.model_spec(model)
    snapshot = param_snapshot(model)
    tokens = random_tokens(9)
    before = model(tokens)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    storage = {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="inside"), _tl.linear_layout(model):
        changed = [n for n, p in model.named_parameters() if (p.data_ptr(), p.stride()) != storage[n]]
        gated = [_tl.param_name(layer, w) for layer in range(spec.n_layers) for w in ("W_gate", "W_in", "W_out")]
        assert sorted(changed) == sorted((gated if spec.gated_mlp else []) + ["unembed.W_U"])
        for name in changed:
            param = model.get_parameter(name)
            assert param.T.is_contiguous() and torch.equal(param, originals[name])
        assert torch.equal(model(tokens), before)
        laid_out = {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()}
        with _tl.linear_layout(model):  # nested: already laid out, nothing copied
            assert {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()} == laid_out
        assert {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()} == laid_out
        raise RuntimeError("inside")
    assert {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()} == storage
    assert_model_untouched(model, snapshot)
