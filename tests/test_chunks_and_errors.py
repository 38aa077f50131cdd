"""Chunk resolution (slices, ranges, substrings) and every error path: each bad input raises its
specific error, and the model is left bit-identical with no hook attached."""

import warnings

import pytest
import torch
from jaxtyping import TypeCheckError
from transformer_lens import HookedTransformer

import tl_thoughts as tt
from helpers import (
    D_VOCAB,
    assert_close,
    assert_model_untouched,
    make_config,
    make_word_tokenizer,
    param_snapshot,
    random_tokens,
    runtime_checks_off,
)

N = 10  # prompt length of the chunk tests
ARCH = "ln_gelu_learned"


@pytest.fixture
def model(tiny_model):
    return tiny_model(ARCH)


@pytest.fixture
def tokens():
    return random_tokens(N)


# --- error classes ------------------------------------------------------------------------------


def test_error_hierarchy():
    assert issubclass(tt.ChunkError, ValueError) and issubclass(tt.ChunkError, tt.TLThoughtsError)
    assert issubclass(tt.InputError, ValueError) and issubclass(tt.InputError, tt.TLThoughtsError)
    assert issubclass(tt.UnsupportedArchitectureError, NotImplementedError)
    assert issubclass(tt.UnsupportedArchitectureError, tt.TLThoughtsError)
    assert issubclass(tt.ZeroDenominatorError, ZeroDivisionError)
    assert issubclass(tt.ZeroDenominatorError, tt.TLThoughtsError)


# --- chunks given as positions --------------------------------------------------------------------

BAD_CHUNKS = {
    "empty": slice(3, 3),
    "reversed": slice(6, 3),
    "stop_out_of_range": slice(5, 99),
    "start_out_of_range": slice(-99, 3),
    "covers_end": slice(5, N),
    "open_end": slice(5, None),
    "whole_prompt": slice(None),
    "negative_to_end": slice(-3, None),
    "step_2": slice(1, 5, 2),
    "negative_step": slice(5, 1, -1),
    "range_step_2": range(1, 5, 2),
    "empty_range": range(3, 3),
    "range_to_end": range(4, N),
}


@pytest.mark.parametrize("chunk", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
def test_bad_chunk_raises_chunk_error(model, tokens, chunk):
    snapshot = param_snapshot(model)
    with pytest.raises(tt.ChunkError):
        tt.implicit_updates(model, tokens, chunk)
    assert_model_untouched(model, snapshot)


WRONG_CHUNK_TYPES = {"int": 3, "tuple": (2, 5), "float_list": [2.0, 3.0], "dict": {2: 5}}


@pytest.mark.parametrize("chunk", WRONG_CHUNK_TYPES.values(), ids=WRONG_CHUNK_TYPES.keys())
def test_chunk_of_wrong_type_raises_chunk_error(model, tokens, chunk):
    """Documented in chunks.resolve_chunk: ``ChunkError`` for anything but a slice/range/str.
    The suite's runtime shape checker rejects it first (TypeCheckError); without the checker, as
    users run it, the library's own check raises ChunkError."""
    snapshot = param_snapshot(model)
    with pytest.raises(TypeCheckError):
        tt.implicit_updates(model, tokens, chunk)
    with runtime_checks_off(), pytest.raises(tt.ChunkError):
        tt.implicit_updates(model, tokens, chunk)
    assert_model_untouched(model, snapshot)


GOOD_CHUNKS = {
    "negative_slice": (slice(-5, -2), (5, 8)),
    "range": (range(5, 8), (5, 8)),
    "open_start": (slice(None, 3), (0, 3)),
    "negative_stop": (slice(2, -1), (2, N - 1)),
    "explicit_step_1": (slice(5, 8, 1), (5, 8)),
    "one_token": (slice(4, 5), (4, 5)),
    "last_possible": (slice(0, N - 1), (0, N - 1)),
}


@pytest.mark.parametrize("chunk, bounds", GOOD_CHUNKS.values(), ids=GOOD_CHUNKS.keys())
def test_valid_chunk_forms_resolve(model, tokens, chunk, bounds):
    start, stop = bounds
    updates = tt.implicit_updates(model, tokens, chunk)
    assert updates.span == tt.Span(start=start, stop=stop, n_pos=N)
    assert updates.chunk == slice(start, stop)
    assert torch.equal(updates.positions, torch.arange(stop, N))
    reference = tt.implicit_updates(model, tokens, slice(start, stop))
    assert torch.equal(updates.vectors, reference.vectors)
    assert torch.equal(updates.chunk_attention, reference.chunk_attention)


def test_one_dimensional_and_int32_tokens_accepted(model, tokens):
    reference = tt.implicit_updates(model, tokens, slice(2, 5))
    for variant in (tokens[0], tokens.to(torch.int32)):
        updates = tt.implicit_updates(model, variant, slice(2, 5))
        assert updates.tokens.shape == (1, N) and updates.tokens.dtype == torch.long
        assert torch.equal(updates.vectors, reference.vectors)


# --- bad tokens -------------------------------------------------------------------------------------


def _bad_tokens(kind: str) -> torch.Tensor:
    t = random_tokens(N)
    if kind == "batch_2":
        return t.repeat(2, 1)
    if kind == "float":
        return t.double()
    if kind == "3d":
        return t[None]
    if kind == "id_too_large":
        t[0, 3] = D_VOCAB
        return t
    if kind == "negative_id":
        t[0, 3] = -1
        return t
    if kind == "empty_prompt":
        return t[:, :0]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["batch_2", "float", "3d", "id_too_large", "negative_id", "empty_prompt"]
)
def test_bad_tokens_raise_input_error(model, kind):
    """Documented (implicit_updates, chunks.resolve_tokens): ``InputError`` for a batch > 1,
    non-integer tokens, a wrong shape and ids outside the vocabulary."""
    snapshot = param_snapshot(model)
    if kind in ("batch_2", "float", "3d"):  # wrong shape/dtype: the runtime checker sees it first
        with pytest.raises(TypeCheckError):
            tt.implicit_updates(model, _bad_tokens(kind), slice(2, 5))
    with runtime_checks_off(), pytest.raises(tt.InputError):
        tt.implicit_updates(model, _bad_tokens(kind), slice(2, 5))
    assert_model_untouched(model, snapshot)


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_gated_silu_rotary_gqa"])
def test_prompt_longer_than_context_raises_input_error(fresh_model, arch):
    """A prompt longer than ``n_ctx`` is not usable (no position beyond the table); expected: the
    library's InputError, not an IndexError from inside TransformerLens."""
    model = fresh_model(arch)  # own model: TransformerLens may rebuild its rotary tables on the way
    snapshot = param_snapshot(model)
    with pytest.raises(tt.InputError):
        tt.implicit_updates(model, random_tokens(model.cfg.n_ctx + 6), slice(2, 5))
    assert_model_untouched(model, snapshot)


def test_text_without_tokenizer_raises_input_error(model, tokens):
    snapshot = param_snapshot(model)
    assert model.tokenizer is None
    with pytest.raises(tt.InputError):
        tt.implicit_updates(model, "the cat sat on the mat", slice(1, 3))
    with pytest.raises(tt.InputError):
        tt.implicit_updates(model, tokens, "cat")  # a substring chunk needs a tokenizer too
    assert_model_untouched(model, snapshot)


# --- hooks on the model ----------------------------------------------------------------------------


@pytest.mark.parametrize("permanent", [False, True], ids=["temporary_hook", "permanent_hook"])
def test_model_with_hooks_is_refused_and_hook_kept(fresh_model, tokens, permanent):
    model = fresh_model(ARCH)
    clean_updates = tt.implicit_updates(model, tokens, slice(2, 5))
    calls = []

    def user_hook(act, hook):
        calls.append(hook.name)

    model.add_hook("blocks.0.hook_attn_out", user_hook, is_permanent=permanent)
    hp = model.hook_dict["blocks.0.hook_attn_out"]
    handles = list(hp.fwd_hooks)
    assert len(handles) == 1
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    with pytest.raises(tt.InputError):
        tt.implicit_updates(model, tokens, slice(2, 5))
    with pytest.raises(tt.InputError):
        tt.verify(model, clean_updates, forms=("activation",))
    with pytest.raises(tt.InputError):
        tt.exact_weight_patch(model, clean_updates)

    # the user's hook is still there, unchanged, and still runs; nothing else was added
    assert list(hp.fwd_hooks) == handles
    assert [n for n, h in model.hook_dict.items() if h.fwd_hooks or h.bwd_hooks] == [hp.name]
    with torch.no_grad():
        model(tokens)
    assert calls == ["blocks.0.hook_attn_out"]
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name

    model.reset_hooks(including_permanent=True)
    tt.implicit_updates(model, tokens, slice(2, 5))  # works again once the hooks are gone


# --- unsupported architectures -------------------------------------------------------------------

UNSUPPORTED = {
    "shortformer": ("ln_gelu_learned", dict(positional_embedding_type="shortformer")),
    "alibi": ("ln_gelu_learned", dict(positional_embedding_type="alibi")),
    "bidirectional": ("ln_gelu_learned", dict(attention_dir="bidirectional")),
    "moe": ("rms_gated_silu_rotary_gqa", dict(num_experts=2, experts_per_token=1)),
    "post_norm_parallel": ("rms_gated_silu_rotary_gqa", dict(original_architecture="Olmo2ForCausalLM", parallel_attn_mlp=True)),
    "attention_sinks": ("rms_gated_silu_rotary_gqa", dict(use_attention_sinks=True)),
    "logn_attn": ("rms_gated_silu_rotary_gqa", dict(use_logn_attn=True)),
}


@pytest.mark.parametrize("arch, overrides", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_architecture(fresh_model, tokens, arch, overrides):
    model = fresh_model(arch, **overrides)
    snapshot = param_snapshot(model)
    with pytest.raises(tt.UnsupportedArchitectureError) as info:
        tt.implicit_updates(model, tokens, slice(2, 5))
    # the message names the config feature (or its value)
    field, value = next(iter(overrides.items()))
    assert field in str(info.value) or (isinstance(value, str) and value in str(info.value))
    assert_model_untouched(model, snapshot)


def test_matrices_on_attention_only_model(tiny_model, tokens):
    model = tiny_model("rmspre_attn_only_rotary")
    updates = tt.implicit_updates(model, tokens, slice(2, 5))
    assert updates.mlp_in is None
    with pytest.raises(tt.UnsupportedArchitectureError):
        updates.matrices()
    with pytest.raises(tt.UnsupportedArchitectureError):
        updates.matrix_factors("W_in")


# --- verify's forms ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "forms",
    [("bogus",), ("activation", "bogus"), (), "activation", ("unpatched",)],
    ids=["bogus", "one_bogus", "empty", "bare_string", "unpatched_only"],
)
def test_verify_rejects_bad_forms(model, tokens, forms):
    """``forms`` must be a non-empty subset of ("activation", "weight") (verify's own message);
    "unpatched" is the baseline that is always reported, not a patched form to verify."""
    updates = tt.implicit_updates(model, tokens, slice(2, 5))
    snapshot = param_snapshot(model)
    with pytest.raises(ValueError):
        tt.verify(model, updates, forms=forms)
    assert_model_untouched(model, snapshot)


# --- zero denominators ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunk, n", [(slice(0, 4), 5), (slice(3, 6), N)], ids=["one_kept_token", "prefix_and_several"]
)
def test_zero_norm_mlp_input_raises_on_weight_form_only(fresh_model, chunk, n):
    model = fresh_model("rms_silu_learned")
    with torch.no_grad():
        model.blocks[0].ln2.w.zero_()  # the MLP input of layer 0 is exactly zero everywhere
    tokens = random_tokens(n)
    snapshot = param_snapshot(model)
    updates = tt.implicit_updates(model, tokens, chunk)
    assert not bool(updates.mlp_in[0].any())
    with pytest.raises(tt.ZeroDenominatorError):
        updates.matrix_factors("W_in")
    with pytest.raises(tt.ZeroDenominatorError):
        updates.matrices("W_in")
    with pytest.raises(tt.ZeroDenominatorError):
        tt.exact_weight_patch(model, updates)
    with pytest.raises(tt.ZeroDenominatorError):
        tt.verify(model, updates, forms=("weight",))
    with pytest.raises(tt.ZeroDenominatorError):
        tt.verify(model, updates)  # activation form first, then the weight form raises
    assert_model_untouched(model, snapshot)
    report = tt.verify(model, updates, forms=("activation",))
    assert report["unpatched"].max_abs_logit_error > 1e-2
    assert report.max_abs_logit_error <= 1e-10
    assert_model_untouched(model, snapshot)


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "ln_attn_only_learned_gqa"])
def test_more_kept_tokens_than_input_dimension(tiny_model, arch):
    """T = 36 kept tokens > d_model = 32 (W_in) or n_heads * d_head = 32 (W_O): no exact
    minimum-norm weight patch; the activation form still works."""
    model = tiny_model(arch)
    tokens = random_tokens(40)
    snapshot = param_snapshot(model)
    updates = tt.implicit_updates(model, tokens, slice(0, 4))
    with pytest.raises(tt.ZeroDenominatorError):
        tt.exact_weight_patch(model, updates)
    assert tt.verify(model, updates, forms=("activation",)).max_abs_logit_error <= 1e-10
    assert_model_untouched(model, snapshot)


def test_linearly_dependent_kept_rows_raise(tiny_model):
    """Rotary + parallel blocks: at layer 0 the MLP input of a token depends on the token only, so a
    token kept twice gives two identical hidden rows with different targets (one of them in the
    prefix, target zero). No exact W_out patch exists: exact_weight_patch must raise, not return a
    patch that is off by O(1)."""
    model = tiny_model("rmspre_gated_relu_rotary_parallel_mqa")
    tokens = torch.tensor([[7, 29, 47, 48, 1, 24, 16, 7, 47, 4]])  # 7 at kept positions 0 and 7
    updates = tt.implicit_updates(model, tokens, slice(1, 5))
    _, cache = model.run_with_cache(tokens)
    hidden = cache["post", 0][0, updates.span.kept_positions]
    assert torch.equal(hidden[0], hidden[3])  # positions 0 and 7: identical rows
    with pytest.raises(tt.ZeroDenominatorError):
        tt.exact_weight_patch(model, updates)


def _chunk_absorbing_model() -> HookedTransformer:
    """One attention-only layer, no normalisation, whose every head puts ALL of its attention on
    token 7 (scores differ by ~3500, so exp underflows to exactly 0 on every other key)."""
    cfg = make_config(
        "ln_attn_only_learned_gqa", n_layers=1, normalization_type=None, n_key_value_heads=None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "HookedTransformer is deprecated"
        model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        gen = torch.Generator().manual_seed(0)
        model.W_E[:, 1:] = torch.randn(D_VOCAB, cfg.d_model - 1, generator=gen, dtype=cfg.dtype)
        model.W_E[:, 0] = 0.0
        model.W_E[7, 0] = 1.0
        attn = model.blocks[0].attn
        attn.b_Q[:, 0] = 1e4  # every query: a large constant along d_head coordinate 0
        attn.W_K[:, 0, 0] = 1.0  # key coordinate 0 = "is token 7"
        attn.W_V.normal_(generator=torch.Generator().manual_seed(1))
        attn.W_O.normal_(generator=torch.Generator().manual_seed(2))
        model.W_U.normal_(generator=torch.Generator().manual_seed(3))
    return model


def test_head_attending_only_to_chunk_raises():
    model = _chunk_absorbing_model()
    tokens = torch.tensor([[1, 2, 7, 3, 4, 5]])
    snapshot = param_snapshot(model)
    _, cache = model.run_with_cache(tokens)
    pattern = cache["pattern", 0][0]
    assert bool((pattern[:, 3:, 2] == 1).all())  # all the attention on the chunk's token
    with pytest.raises(tt.ZeroDenominatorError):
        tt.implicit_updates(model, tokens, slice(2, 3))
    # a chunk without token 7 is fine
    updates = tt.implicit_updates(model, tokens, slice(3, 4))
    assert tt.verify(model, updates, forms=("activation",)).max_abs_logit_error <= 1e-10
    assert_model_untouched(model, snapshot)


# --- chunks given as substrings (offline tokenizer) ----------------------------------------------

TEXT = "the cat sat on the mat."  # tokens: the | " cat" | " sat" | " on" | " the" | " mat" | "."


@pytest.fixture(scope="module")
def text_model():
    from helpers import make_model

    return make_model("rms_gated_silu_rotary_gqa", tokenizer=make_word_tokenizer())


def test_tokenizer_model_sanity(text_model):
    assert text_model.to_str_tokens(text_model.to_tokens(TEXT)[0]) == [
        "the", " cat", " sat", " on", " the", " mat", ".",
    ]


SUBSTRINGS = {
    "two_words": ("cat sat", (1, 3)),
    "with_leading_space": (" cat sat", (1, 3)),
    "three_words": ("sat on the", (2, 5)),
    "first_token": ("the cat", (0, 2)),
    "one_word": ("on", (3, 4)),
}


@pytest.mark.parametrize("text, bounds", SUBSTRINGS.values(), ids=SUBSTRINGS.keys())
def test_substring_chunk_found_once(text_model, text, bounds):
    snapshot = param_snapshot(text_model)
    updates = tt.implicit_updates(text_model, TEXT, text)
    assert (updates.span.start, updates.span.stop) == bounds
    assert "".join(text_model.to_str_tokens(updates.tokens[0, updates.chunk])).strip() == text.strip()
    by_slice = tt.implicit_updates(text_model, updates.tokens, slice(*bounds))
    assert torch.equal(updates.vectors, by_slice.vectors)
    assert tt.verify(text_model, updates).max_abs_logit_error <= 1e-10
    assert_model_untouched(text_model, snapshot)


BAD_SUBSTRINGS = {
    "not_found": "dog",
    "found_twice": "the",
    "cuts_token_end": "ca",
    "cuts_token_start": "at sat",
    "cuts_both": "at s",
    "empty": "",
    "nothing_follows": "mat.",
    "whole_prompt": TEXT,
}


@pytest.mark.parametrize("text", BAD_SUBSTRINGS.values(), ids=BAD_SUBSTRINGS.keys())
def test_bad_substring_chunk(text_model, text):
    snapshot = param_snapshot(text_model)
    with pytest.raises(tt.ChunkError):
        tt.implicit_updates(text_model, TEXT, text)
    assert_model_untouched(text_model, snapshot)


def test_string_prompt_equals_token_prompt(text_model):
    tokens = text_model.to_tokens(TEXT)
    from_text = tt.implicit_updates(text_model, TEXT, slice(1, 3))
    from_tokens = tt.implicit_updates(text_model, tokens, slice(1, 3))
    assert torch.equal(from_text.tokens, tokens)
    assert torch.equal(from_text.vectors, from_tokens.vectors)
    assert_close(from_text.head_vectors, from_tokens.head_vectors, 0.0, "head vectors")


def test_empty_string_prompt(text_model):
    with pytest.raises(tt.InputError):
        tt.implicit_updates(text_model, "", slice(0, 1))
