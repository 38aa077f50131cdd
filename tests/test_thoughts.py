"""Thought patches (THEORY 4): the least-squares fits, exactness in the one-token case, composition
across blocks, applying without surprises, saving and loading."""

import dataclasses
import json

import pytest
import torch

import tl_thoughts as tt
from tl_thoughts import _tl
from helpers import (
    assert_same_logits_applied,
    fit,
    fit_all,
    ARCHS,
    POST_NORM_ARCHITECTURES,
    POST_NORM_MLP_ARCHITECTURES,
    PRE_NORM_MLP_ARCHITECTURES,
    assert_close,
    assert_model_untouched,
    make_model,
    make_word_tokenizer,
    param_snapshot,
)
from tl_thoughts.templates import encode_example
from tl_thoughts.thoughts import ridge_solve

EXACT = 1e-10
TEMPLATE = tt.PromptTemplate("{chunk}{query}", separator="")
CHUNK = "the cat sat on the mat and"
EXAMPLES = [(" the dog", " ran"), (" a big red hat", " sat"), (" the red cat", " ran ."), (" a dog", " sat on")]


def _mlp_in(model, layer, tokens, positions, patch=None):
    """Independent reference: run the model (optionally under a patch) and read the normalised MLP
    input and the residual the MLP reads at ``positions``."""
    name = f"blocks.{layer}.hook_resid_pre" if model.cfg.parallel_attn_mlp else f"blocks.{layer}.hook_resid_mid"
    with torch.no_grad():
        if patch is None:
            _, cache = model.run_with_cache(tokens, names_filter=[name])
        else:
            with patch.apply(model):
                _, cache = model.run_with_cache(tokens, names_filter=[name])
    resid = cache[name][0, positions]
    return model.blocks[layer].ln2(resid[None])[0], resid


# --- 1. the least-squares solutions ----------------------------------------------------------------


@pytest.mark.parametrize("n_rows", [1, 5, 40])
def test_ridge_solve_matches_lstsq_and_closed_form(n_rows):
    gen = torch.Generator().manual_seed(n_rows)
    A = torch.randn(n_rows, 16, generator=gen, dtype=torch.float64)
    U = torch.randn(n_rows, 24, generator=gen, dtype=torch.float64)
    M0 = ridge_solve(A.T @ A, A.T @ U, 0.0, n_rows)
    ref = torch.linalg.lstsq(A, U, driver="gelsd").solution  # minimum-norm least squares
    assert_close(M0, ref, EXACT, "ridge=0 vs lstsq")
    assert_close(M0, torch.linalg.pinv(A) @ U, EXACT, "ridge=0 vs pinv")
    assert torch.linalg.matrix_rank(M0) <= min(n_rows, 16)
    ridge = 0.3
    lam = ridge * (A**2).sum() / n_rows
    closed = torch.linalg.solve(A.T @ A + lam * torch.eye(16, dtype=A.dtype), A.T @ U)
    assert_close(ridge_solve(A.T @ A, A.T @ U, ridge, n_rows), closed, EXACT, "ridge closed form")


@pytest.mark.parametrize("n_rows", [5, 15, 40])
@pytest.mark.parametrize("ridge", [0.0, 0.3])
@pytest.mark.parametrize("gram_block", [384, 5])
def test_streamed_regression_solves_the_weighted_ridge_problem(n_rows, ridge, gram_block, monkeypatch):
    """``RidgeRegression`` (the fit's matrices): rows streamed in parts with weights and a shift of the
    targets, solved from the sufficient statistics (rows >= inputs' dimension, 16) or in the row
    space (fewer rows): the closed-form weighted ridge solution either way, and the minimum-norm
    weighted least squares at ridge 0. The statistics' ``A^T W A`` is accumulated on and above its
    block diagonal only (``add_upper_gram``): one block at 16 inputs, or three (of 5, 6 and 5
    columns) with ``gram_block`` 5."""
    from tl_thoughts import _math
    from tl_thoughts._math import RidgeRegression

    monkeypatch.setattr(_math, "GRAM_BLOCK", gram_block)

    gen = torch.Generator().manual_seed(n_rows)
    A = torch.randn(n_rows, 16, generator=gen, dtype=torch.float64)
    U = torch.randn(n_rows, 24, generator=gen, dtype=torch.float64)
    w = torch.rand(n_rows, generator=gen, dtype=torch.float64) + 0.05
    shift = torch.randn(24, generator=gen, dtype=torch.float64)
    n = float(w.sum())
    reg = RidgeRegression(16, n_rows)
    assert reg.dual == (n_rows < 16)
    for part in torch.arange(n_rows).split(4):
        reg.add(A[part], U[part], w[part])
    got = reg.solve(ridge, n, shift=shift)
    G, F = A * w.sqrt()[:, None], (U - shift) * w.sqrt()[:, None]  # weighted rows
    if ridge == 0:
        expected = torch.linalg.lstsq(G, F, driver="gelsd").solution  # minimum norm
    else:
        lam = ridge * (w[:, None] * A**2).sum() / n
        expected = torch.linalg.solve(G.T @ G + lam * torch.eye(16, dtype=A.dtype), G.T @ F)
    assert_close(got, expected, EXACT, f"rows {n_rows}, ridge {ridge}")
    with pytest.raises(ValueError, match="ridge"):
        reg.solve(-1.0, n)


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_gated_silu_rotary_gqa", "lnpre_relu_learned_parallel"])
def test_fitted_matrix_and_vector_equal_independent_least_squares(text_models, arch):
    """Layer 0 and layer 1 (under the layer-0 patch: the papers' Algorithm 1), against lstsq on
    activations read from plain model runs."""
    model = text_models(arch)
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, ridge=0.0, progress=False, layers=[0, 1])
    assert patch.layers == [0, 1]
    encoded = [encode_example(model, TEMPLATE, CHUNK, ex) for ex in EXAMPLES]
    below = tt.ThoughtPatch(
        deltas={k: v for k, v in patch.deltas.items() if k.startswith("blocks.0.")}, meta=patch.meta
    )
    for layer, under in ((0, None), (1, below)):
        rows_a, rows_u, deltas = [], {n: [] for n in ("W_gate", "W_in")}, []
        for ex in encoded:
            pos = ex.pooled("kept")
            a_c, r_full = _mlp_in(model, layer, ex.full[None], pos)
            a, r_red = _mlp_in(model, layer, ex.reduced[None], ex.to_reduced(pos), under)
            deltas.append(r_full - r_red)
            rows_a.append(a)
            for name in model.blocks[layer].mlp.state_dict():
                if name in rows_u:
                    rows_u[name].append((a_c - a) @ getattr(model.blocks[layer].mlp, name))
        if not model.cfg.parallel_attn_mlp:
            # the vector restores the residual entering the MLP: mean of the differences
            assert_close(patch.vector(layer), torch.cat(deltas).mean(0), EXACT, f"vector L{layer}")
        A = torch.cat(rows_a)
        for name, rows in rows_u.items():
            if rows:
                ref = torch.linalg.lstsq(A, torch.cat(rows), driver="gelsd").solution
                assert_close(patch.matrix(layer, name), ref, EXACT, f"{name} L{layer}")
                assert torch.linalg.matrix_rank(patch.matrix(layer, name)) <= A.shape[0]
    assert patch.meta["n_examples"] == len(EXAMPLES)
    assert patch.meta["n_tokens"] == sum(len(e.pooled("kept")) for e in encoded)


def _read(model, tokens, names, patch=None):
    with torch.no_grad():
        if patch is None:
            return model.run_with_cache(tokens, names_filter=names)[1]
        with patch.apply(model):
            return model.run_with_cache(tokens, names_filter=names)[1]


def _weighted_ridge(X, Y, w, ridge):
    """``argmin_M sum_i w_i ||x_i M - y_i||^2 + lam ||M||^2`` with ``lam = ridge * (mean weighted
    squared norm of the x_i)``, via lstsq on the rows scaled by sqrt(w) and stacked with
    ``sqrt(lam) I`` (an independent route to the closed form)."""
    X, Y = X.detach(), Y.detach()
    lam = ridge * float((w[:, None] * X**2).sum()) / float(w.sum())
    s = w.sqrt()[:, None]
    eye = lam**0.5 * torch.eye(X.shape[1], dtype=X.dtype)
    stacked_x = torch.cat([X * s, eye])
    stacked_y = torch.cat([Y * s, torch.zeros(X.shape[1], Y.shape[1], dtype=Y.dtype)])
    return torch.linalg.lstsq(stacked_x, stacked_y, driver="gelsd").solution


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_gated_silu_rotary_gqa", "lnpre_relu_learned_parallel"])
def test_attention_matrix_and_query_weights_equal_independent_least_squares(text_models, arch):
    """``attention_matrix=True``: per block (under the patches below), the thought vector is the mean
    attention-output change over the answer rows, ``W_O``'s thought matrix the weighted least-squares
    map from the reduced head outputs ``z`` to what the vector leaves, and the MLP matrices the
    weighted least squares on the MLP inputs under the block's attention-side patches; query rows
    weigh ``query_weight``. References from plain model runs; weight and activation forms agree."""
    model = text_models(arch)
    qw, ridge = 0.3, 0.05
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, ridge=ridge, pool="answer",
                           vector_site="attn_out", vector_target="attention", attention_matrix=True,
                           query_weight=qw, layers=[0, 1], progress=False)
    assert {n.split(".", 2)[2] for n in patch.deltas} >= {"attn.b_O", "attn.W_O", "mlp.W_in"}
    encoded = [encode_example(model, TEMPLATE, CHUNK, ex) for ex in EXAMPLES]
    mid = "hook_resid_pre" if model.cfg.parallel_attn_mlp else "hook_resid_mid"
    for layer in (0, 1):
        below = tt.ThoughtPatch(deltas={k: v for k, v in patch.deltas.items() if int(k.split(".")[1]) < layer},
                                meta=patch.meta)
        attention_side = tt.ThoughtPatch(
            deltas={k: v for k, v in patch.deltas.items()
                    if int(k.split(".")[1]) < layer or k in (f"blocks.{layer}.attn.b_O", f"blocks.{layer}.attn.W_O")},
            meta=patch.meta)
        Z, D, W, A, U = [], [], [], [], {n: [] for n in ("W_gate", "W_in")}
        for ex in encoded:
            pos = ex.pooled("answer")
            query = ex.pooled("query")
            extra = query[~torch.isin(query, pos)]
            rows = torch.cat([pos, extra])
            w = torch.cat([torch.ones(len(pos), dtype=torch.float64), torch.full((len(extra),), qw, dtype=torch.float64)])
            assert len(extra) > 0  # the query rows are really there
            names = [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.{mid}"]
            full = _read(model, ex.full[None], names)
            red = _read(model, ex.reduced[None], names, below if layer else None)
            red_patched = _read(model, ex.reduced[None], names, attention_side)
            D.append(full[names[0]][0, rows] - red[names[0]][0, ex.to_reduced(rows)])
            Z.append(red[names[1]][0, ex.to_reduced(rows)].flatten(1))
            W.append(w)
            a_c = model.blocks[layer].ln2(full[names[2]][:, rows])[0]
            a = model.blocks[layer].ln2(red_patched[names[2]][:, ex.to_reduced(rows)])[0]
            A.append(a)
            for name in U:
                if hasattr(model.blocks[layer].mlp, name):
                    U[name].append((a_c - a) @ getattr(model.blocks[layer].mlp, name))
        D, Z, W, A = torch.cat(D), torch.cat(Z), torch.cat(W), torch.cat(A)
        in_pool = W == 1
        vector = D[in_pool].mean(0)
        assert_close(patch.vector(layer), vector, EXACT, f"vector L{layer}")
        assert_close(patch.matrix(layer, "W_O"), _weighted_ridge(Z, D - vector, W, ridge), EXACT, f"W_O L{layer}")
        for name, rows_u in U.items():
            if rows_u and not model.cfg.parallel_attn_mlp:
                ref = _weighted_ridge(A, torch.cat(rows_u), W, ridge)
                assert_close(patch.matrix(layer, name), ref, EXACT, f"{name} L{layer}")
    tokens = model.to_tokens(" a big dog")
    with torch.no_grad():
        with patch.apply(model, "weight"):
            by_weight = model(tokens)
        with patch.apply(model, "activation"):
            by_hooks = model(tokens)
    assert_close(by_weight, by_hooks, EXACT, "weight vs activation form")
    summary = patch.summary()
    assert all(0 < row["W_O_rank"] <= len(W) for row in summary)  # rank <= number of fitted rows


def _rows(ex, qw):
    """The fitted rows of one example (answer rows, then the other query rows) and their weights."""
    pos = ex.pooled("answer")
    query = ex.pooled("query")
    extra = query[~torch.isin(query, pos)]
    w = torch.cat([torch.ones(len(pos), dtype=torch.float64), torch.full((len(extra),), qw, dtype=torch.float64)])
    return torch.cat([pos, extra]), w


def _only(patch, keep):
    """A copy of ``patch`` with the deltas whose names ``keep`` accepts (same meta)."""
    return tt.ThoughtPatch(deltas={k: v for k, v in patch.deltas.items() if keep(k, int(k.split(".")[1]))},
                           meta=patch.meta)


def _check_vector_and_output_matrix(model, patch, template, qw, ridge, layers):
    """Per block of ``layers``, independently of the fit's own stream: the thought vector is the mean
    attention-output change over the answer rows, the reduced run under the patches below applied
    with ``patch.apply`` (so with the patch's own application: every position, or not the prefix);
    ``W_out``'s thought matrix is the weighted ridge regression, on the reduced run's MLP hidden
    activations under the block's other patches, of the residual difference after the block."""
    encoded = [encode_example(model, template, CHUNK, ex) for ex in EXAMPLES]
    for layer in layers:
        below = _only(patch, lambda k, l, top=layer: l < top)
        inner = _only(patch, lambda k, l, top=layer: l < top or (l == top and not k.endswith(".W_out")))
        names = [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.mlp.hook_post"]
        D, H, E, W = [], [], [], []
        for ex in encoded:
            rows, w = _rows(ex, qw)
            red_rows = ex.to_reduced(rows)
            full = _read(model, ex.full[None], names)
            red = _read(model, ex.reduced[None], names, below if layer else None)
            red_inner = _read(model, ex.reduced[None], names, inner)
            D.append(full[names[0]][0, rows] - red[names[0]][0, red_rows])
            E.append(full[names[1]][0, rows] - red_inner[names[1]][0, red_rows])
            H.append(red_inner[names[2]][0, red_rows])
            W.append(w)
        D, H, E, W = torch.cat(D), torch.cat(H), torch.cat(E), torch.cat(W)
        assert_close(patch.vector(layer), D[W == 1].mean(0), EXACT, f"vector L{layer}")
        assert_close(patch.matrix(layer, "W_out"), _weighted_ridge(H, E, W, ridge), EXACT, f"W_out L{layer}")


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_gated_silu_rotary_gqa", "lnpre_relu_learned_parallel"])
def test_output_matrix_equals_independent_least_squares(text_models, arch):
    """``output_matrix=True``: ``W_out``'s thought matrix is the weighted ridge regression of what is
    left of each fitted row's residual difference after the block on the MLP's hidden activations
    (references from plain model runs); the weight and activation forms agree."""
    model = text_models(arch)
    qw, ridge = 0.3, 0.05
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, ridge=ridge, pool="answer",
                           vector_site="attn_out", vector_target="attention", attention_matrix=True,
                           output_matrix=True, query_weight=qw, layers=[0, 1], progress=False)
    assert {k for k in patch.deltas if k.endswith(".W_out")} == {"blocks.0.mlp.W_out", "blocks.1.mlp.W_out"}
    assert patch.matrix(0, "W_out").shape == (model.cfg.d_mlp, model.cfg.d_model)
    _check_vector_and_output_matrix(model, patch, TEMPLATE, qw, ridge, (0, 1))
    tokens = model.to_tokens(" a big dog")
    base, by_weight, by_hooks = _runs_by_form(model, patch, tokens)
    with torch.no_grad(), _only(patch, lambda k, l: not k.endswith(".W_out")).apply(model):
        by_others = model(tokens)
    assert (by_weight - by_others).abs().max() > 1e-6, "the W_out matrices change the output"
    assert (by_weight - base).abs().max() > 1e-3
    assert_close(by_weight, by_hooks, EXACT, "weight vs activation form")
    assert "W_out_rank" in patch.summary()[0]


PREFIXED = tt.PromptTemplate("<eos>{chunk}{query}", separator="")  # a fixed first token, as a BOS


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_gated_silu_rotary_gqa", "lnpre_relu_learned_parallel"])
def test_unpatched_prefix_in_the_fit_and_when_applied(text_models, arch):
    """``patch_prefix=False``: the positions before the chunk's place are left unpatched in the fit
    (the vectors and matrices equal the regressions on runs under ``apply``, which leaves them
    unpatched) and when applied (bit for bit as without the patch, while the later positions
    change); the patch refuses the weight form and merging, and its hooks count positions through
    a key-value cache."""
    model = text_models(arch)
    snapshot = param_snapshot(model)
    qw, ridge = 0.1, 0.05
    options = dict(template=PREFIXED, ridge=ridge, pool="answer", vector_site="attn_out",
                   vector_target="attention", attention_matrix=True, output_matrix=True, query_weight=qw,
                   progress=False)
    patch = fit(model, CHUNK, EXAMPLES, patch_prefix=False, **options)
    everywhere = fit(model, CHUNK, EXAMPLES, **options)
    assert patch.unpatched_positions == 1 and everywhere.unpatched_positions == 0
    assert torch.equal(patch.vector(0), everywhere.vector(0))  # block 0's input: the same embeddings
    assert (patch.vector(1) - everywhere.vector(1)).abs().max() > 1e-6  # the prefix differs from block 1 on
    _check_vector_and_output_matrix(model, patch, PREFIXED, qw, ridge, (0, 1, model.cfg.n_layers - 1))

    tokens = model.to_tokens("<eos> the dog ran on the mat")
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, base = model.run_with_cache(tokens, names_filter=names)
        with patch.apply(model):  # default: the activation form
            _, patched = model.run_with_cache(tokens, names_filter=names)
            logits = model(tokens)
            # the same logits one position at a time through TransformerLens' key-value cache
            from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

            cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
            stepped = torch.cat([model(tokens[:, i : i + 1], past_kv_cache=cache) for i in range(tokens.shape[1])], 1)
    for name in names:
        assert torch.equal(patched[name][:, 0], base[name][:, 0]), f"{name}: the prefix was patched"
        assert (patched[name][:, 1:] - base[name][:, 1:]).abs().max() > 1e-6, name
    assert_close(stepped, logits, 1e-9, "key-value cache vs one pass")
    # a batch padded on the right runs (each row as alone); one padded on the left is refused
    two = torch.cat([tokens, torch.cat([tokens[:, :1], tokens[:, :-1]], 1)])
    right = torch.ones_like(two)
    right[1, -1] = 0
    left = right.flip(1)
    with torch.no_grad(), patch.apply(model):
        padded = model(two, attention_mask=right)
        with pytest.raises(tt.InputError, match="padded on the left"):
            model(two, attention_mask=left)
        alone = model(two[1:, :-1])
    assert_close(padded[0], logits[0], 1e-9, "right-padded batch, full row")
    assert_close(padded[1, :-1], alone[0], 1e-9, "right-padded batch, padded row")
    with pytest.raises(tt.InputError, match="form='activation'"):
        with patch.apply(model, "weight"):
            pass
    with pytest.raises(tt.InputError, match="merged into the weights"):
        patch.merge_into(model)
    with pytest.raises(tt.InputError, match="pool='all'"):
        fit(model, CHUNK, EXAMPLES, **{**options, "pool": "all"}, patch_prefix=False)
    assert patch.truncated(1).unpatched_positions == 1
    assert_model_untouched(model, snapshot)


# --- 2. one example, one kept token: the thought patch IS the exact token patch -------------------


@pytest.mark.parametrize("site", ["b_out", "attn_out"])
@pytest.mark.parametrize("arch", PRE_NORM_MLP_ARCHITECTURES)
def test_one_example_one_token_reproduces_full_run(text_models, arch, site):
    model = text_models(arch)
    snapshot = param_snapshot(model)
    patch = fit(model, CHUNK, [" dog"], template=TEMPLATE, ridge=0.0, vector_site=site, progress=False)
    full = model.to_tokens(CHUNK + " dog")
    reduced = model.to_tokens(" dog")
    assert reduced.shape == (1, 1)
    with torch.no_grad():
        reference = model(full)[0, -1]
        unpatched = model(reduced)[0, -1]
        assert (unpatched - reference).abs().max() > 1e-2  # the chunk matters
        for form in ("weight", "activation"):
            with patch.apply(model, form=form):
                patched = model(reduced)[0, -1]
            assert_close(patched, reference, EXACT, f"{form} form")
    assert_model_untouched(model, snapshot)


# --- 2b. blocks with norms after their sublayers (Gemma 2/3, OLMo 2) --------------------------------


def _before_norm(cache, layer: int, norm: str, rows) -> torch.Tensor:
    """A block norm's input at ``rows`` of a run's cache: its normalised input times its scale
    (TransformerLens hooks no norm's input)."""
    return (cache[f"blocks.{layer}.{norm}.hook_normalized"] * cache[f"blocks.{layer}.{norm}.hook_scale"])[0, rows]


@pytest.mark.parametrize("arch", [a for a in POST_NORM_ARCHITECTURES if ARCHS[a].rotary])
def test_post_norm_one_example_one_token_reproduces_full_run(text_models, arch):
    """One kept token and the default options for the model (the vector on ``b_O``, before the
    post-attention norm): the thought patch is the exact token patch, in both forms. (Rotary
    models: with learned absolute positions the lone token's position embedding differs, which no
    attention-side vector carries through a norm.)"""
    model = text_models(arch)
    snapshot = param_snapshot(model)
    config = tt.FitConfig.default_for(model).replace(ridge=0.0)
    assert (config.vector_site, config.vector_target) == ("attn_out", "attention")
    if not _tl.model_spec(model).has_mlp:
        config = config.replace(fit="vector")
    patch = tt.fit_thought(model, CHUNK, [" dog"], config, template=TEMPLATE, progress=False)
    assert set(patch.deltas) >= {f"blocks.{layer}.attn.b_O" for layer in range(model.cfg.n_layers)}
    full, reduced = model.to_tokens(CHUNK + " dog"), model.to_tokens(" dog")
    with torch.no_grad():
        reference, unpatched = model(full)[0, -1], model(reduced)[0, -1]
        assert (unpatched - reference).abs().max() > 1e-2  # the chunk matters
        for form in ("weight", "activation"):
            with patch.apply(model, form=form):
                assert_close(model(reduced)[0, -1], reference, EXACT, f"{form} form")
    assert_model_untouched(model, snapshot)


@pytest.mark.parametrize("arch", POST_NORM_MLP_ARCHITECTURES)
def test_post_norm_fit_equals_independent_least_squares(text_models, arch):
    """Per block, under the patches below (read from plain runs, the norms' inputs rebuilt from
    their hooks): the thought vector is the mean change of the attention output BEFORE the
    post-attention norm, ``W_O``'s matrix the weighted ridge regression of what it leaves on the
    head outputs, the MLP input matrices the regressions on the normalised MLP inputs, and
    ``W_out``'s matrix the regression of the MLP output's change before the post-MLP norm on the
    hidden activations; the weight and activation forms (hooks before the norms) agree."""
    model = text_models(arch)
    spec = _tl.model_spec(model)
    qw, ridge = 0.3, 0.05
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, ridge=ridge, pool="answer", vector_site="attn_out",
                vector_target="attention", attention_matrix=True, output_matrix=True, query_weight=qw,
                layers=[0, 1], progress=False)
    encoded = [encode_example(model, TEMPLATE, CHUNK, ex) for ex in EXAMPLES]
    an, mn = spec.attn_post_norm, spec.mlp_post_norm
    for layer in (0, 1):
        names = [f"blocks.{layer}.{n}.hook_{k}" for n in (an, mn) for k in ("normalized", "scale")]
        names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.mlp.hook_post"]
        below = _only(patch, lambda k, l, top=layer: l < top)
        attention_side = _only(patch, lambda k, l, top=layer: l < top or (l == top and ".attn." in k))
        inner = _only(patch, lambda k, l, top=layer: l < top or (l == top and not k.endswith(".W_out")))
        D, Z, A, U, M, H, W = [], [], [], {n: [] for n in spec.mlp_input_matrices}, [], [], []
        for ex in encoded:
            rows, w = _rows(ex, qw)
            red_rows = ex.to_reduced(rows)
            full = _read(model, ex.full[None], names)
            red = _read(model, ex.reduced[None], names, below if layer else None)
            red_attn = _read(model, ex.reduced[None], names, attention_side)
            red_inner = _read(model, ex.reduced[None], names, inner)
            D.append(_before_norm(full, layer, an, rows) - _before_norm(red, layer, an, red_rows))
            Z.append(red[f"blocks.{layer}.attn.hook_z"][0, red_rows].flatten(1))
            a_c = _tl.mlp_norm(model, layer, full[f"blocks.{layer}.hook_resid_mid"][0, rows])
            a = _tl.mlp_norm(model, layer, red_attn[f"blocks.{layer}.hook_resid_mid"][0, red_rows])
            A.append(a)
            for name in U:
                U[name].append((a_c - a) @ getattr(model.blocks[layer].mlp, name))
            M.append(_before_norm(full, layer, mn, rows) - _before_norm(red_inner, layer, mn, red_rows))
            H.append(red_inner[f"blocks.{layer}.mlp.hook_post"][0, red_rows])
            W.append(w)
        D, Z, A, M, H, W = (torch.cat(t) for t in (D, Z, A, M, H, W))
        vector = D[W == 1].mean(0)
        assert_close(patch.vector(layer), vector, EXACT, f"vector L{layer}")
        assert_close(patch.matrix(layer, "W_O"), _weighted_ridge(Z, D - vector, W, ridge), EXACT, f"W_O L{layer}")
        for name, rows_u in U.items():
            assert_close(patch.matrix(layer, name), _weighted_ridge(A, torch.cat(rows_u), W, ridge), EXACT,
                         f"{name} L{layer}")
        assert_close(patch.matrix(layer, "W_out"), _weighted_ridge(H, M, W, ridge), EXACT, f"W_out L{layer}")
    base, by_weight, by_hooks = _runs_by_form(model, patch, model.to_tokens(" a big dog"))
    assert (by_weight - base).abs().max() > 1e-3
    assert_close(by_weight, by_hooks, EXACT, "weight vs activation form")


@pytest.mark.parametrize("arch", POST_NORM_ARCHITECTURES)
def test_post_norm_options_that_cannot_fit_are_refused_with_the_reason(text_models, arch):
    """A residual-difference target, or a vector on ``b_out`` (before the MLP's post-norm), is
    refused on a model with norms after its sublayers, naming the options to use."""
    model = text_models(arch)
    snapshot = param_snapshot(model)
    fit_kind = "both" if _tl.model_spec(model).has_mlp else "vector"
    with pytest.raises(tt.InputError, match="norms after its sublayers.*vector_target='residual'"):
        fit(model, CHUNK, [" dog"], template=TEMPLATE, fit=fit_kind, vector_site="attn_out", progress=False)
    if _tl.model_spec(model).has_mlp:
        with pytest.raises(tt.InputError, match="vector_site='b_out'"):
            tt.fit_thought(model, CHUNK, [" dog"], tt.FitConfig.preset("paper"), template=TEMPLATE, progress=False)
    assert tt.FitConfig.default_for(model) != tt.FitConfig()
    assert_model_untouched(model, snapshot)


# --- 3. applying, handles, merging, restoring on errors --------------------------------------------


@pytest.fixture(scope="module")
def fitted(text_models):
    model = text_models("rms_gated_silu_rotary_gqa")
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, progress=False)
    return model, patch


@pytest.mark.parametrize("arch", PRE_NORM_MLP_ARCHITECTURES + POST_NORM_MLP_ARCHITECTURES)
def test_fit_thoughts_equals_separate_fits(text_models, arch):
    """Fitting the three kinds at once (the prompts with the chunk streamed once) gives bit for bit
    the patches of separate ``fit_thought`` calls, whatever the order of the kinds."""
    model = text_models(arch)
    options = dict(template=TEMPLATE, pool="answer", vector_site="attn_out", vector_target="attention",
                   attention_matrix=True, query_weight=0.1, ridge=1.0, batch_size=3, progress=False)
    together = fit_all(model, CHUNK, EXAMPLES, fits=("both", "vector", "matrix"), **options)
    assert list(together) == ["both", "vector", "matrix"]
    for kind, patch in together.items():
        alone = fit(model, CHUNK, EXAMPLES, fit=kind, **options)
        assert set(patch.deltas) == set(alone.deltas) and patch.deltas, kind
        assert all(torch.equal(patch.deltas[k], alone.deltas[k]) for k in alone.deltas), kind
        assert all(torch.equal(patch.steering[k], alone.steering[k]) for k in alone.steering), kind
    with pytest.raises(tt.InputError, match="distinct"):
        fit_all(model, CHUNK, EXAMPLES, fits=("both", "both"), **options)
    with pytest.raises(tt.InputError, match="distinct"):
        fit_all(model, CHUNK, EXAMPLES, fits="both", **options)


@pytest.mark.parametrize("arch", PRE_NORM_MLP_ARCHITECTURES + POST_NORM_MLP_ARCHITECTURES)
@pytest.mark.parametrize("prefixed", [False, True])
def test_the_shared_positions_run_once_and_give_the_same_fit(text_models, arch, prefixed):
    """The positions every prompt with the chunk shares (the template's prefix and the chunk) run
    once, as one sequence whose keys and values every batch reads: the same patch, to float64
    rounding, as a fit reading every prompt's rows streamed whole (``prompt_rows(share_prefix=False)``),
    with every matrix, the steering record, and the unpatched prefix copied from the shared run; and
    the same patch at any batch size (the examples are batched by length)."""
    from tl_thoughts.stream import fitted_rows, shared_stream_length

    model = text_models(arch)
    template = PREFIXED if prefixed else TEMPLATE
    options = dict(template=template, pool="answer", vector_site="attn_out", vector_target="attention",
                   attention_matrix=True, output_matrix=True, query_weight=0.1, ridge=1.0, batch_size=3,
                   patch_prefix=not prefixed, progress=False)
    encoded = [encode_example(model, template, CHUNK, ex) for ex in EXAMPLES]
    rows = [fitted_rows(e, "answer", 0.1) for e in encoded]
    shared = shared_stream_length(encoded, rows, encoded[0].start if prefixed else 0)
    assert shared == encoded[0].stop  # the prefix and the chunk, up to the first query token
    once = fit(model, CHUNK, EXAMPLES, **options)
    unshared = tt.prompt_rows(model, CHUNK, EXAMPLES, template=template, pool="answer", query_weight=0.1,
                              batch_size=3, share_prefix=False)
    shared_rows = tt.prompt_rows(model, CHUNK, EXAMPLES, template=template, pool="answer", query_weight=0.1,
                                 batch_size=2)
    assert unshared.index == shared_rows.index and torch.equal(unshared.positions, shared_rows.positions)
    assert_close(unshared.pre, shared_rows.pre, 1e-10, "rows' resid_pre, shared or not")
    assert_close(unshared.attn, shared_rows.attn, 1e-10, "rows' attn_out, shared or not")
    whole = fit(model, CHUNK, EXAMPLES, rows=unshared, **options)
    assert set(once.deltas) == set(whole.deltas) and any(k.endswith("W_out") for k in once.deltas)
    assert sum(bool(d.abs().max() > 1e-3) for d in whole.deltas.values()) > len(whole.deltas) / 2
    for name in whole.deltas:
        assert_close(once.deltas[name], whole.deltas[name], 1e-10, name)
    for name in whole.steering:
        assert_close(once.steering[name], whole.steering[name], 1e-10, name)
    # batched by length (3 + 1 here, the order changed): the same fit one example a batch or all in one
    for size in (1, len(EXAMPLES)):
        other = fit(model, CHUNK, EXAMPLES, **{**options, "batch_size": size})
        for name in whole.deltas:
            assert_close(other.deltas[name], once.deltas[name], 1e-10, f"{name}, batch_size={size}")
    # a prompt that shares nothing past its first token with the others: only that token is shared
    odd = [(" a", " ran")] + EXAMPLES
    encoded = [encode_example(model, template, "dog " + CHUNK if i == 0 else CHUNK, ex) for i, ex in enumerate(odd)]
    assert shared_stream_length(encoded, [fitted_rows(e, "answer", 0.1) for e in encoded]) == (1 if prefixed else 0)


@pytest.mark.parametrize("arch", PRE_NORM_MLP_ARCHITECTURES + POST_NORM_MLP_ARCHITECTURES)
@pytest.mark.parametrize("prefixed", [False, True])
def test_given_full_rows_give_the_same_fit(text_models, arch, prefixed):
    """Some examples' prompts with the chunk streamed once (``prompt_rows``, as the protocol
    does for the answered queries, the same in every seed) and read by fits of those examples
    plus others (``rows=``): the patches (every matrix, the steering record) of fits that
    stream every prompt, to float64 rounding, for each kind of fit and in ``fit_thoughts``; rows
    kept for other options or another model are refused, and examples they do not hold streamed."""
    model = text_models(arch)
    template = PREFIXED if prefixed else TEMPLATE
    options = dict(template=template, pool="answer", vector_site="attn_out", vector_target="attention",
                   attention_matrix=True, output_matrix=True, query_weight=0.1, ridge=1.0, batch_size=2,
                   patch_prefix=not prefixed, progress=False)
    more = EXAMPLES + [(" the big dog", " sat ."), (" a cat", " ran on")]
    rows = tt.prompt_rows(model, CHUNK, more[1:4] + [(" a hat", " ran")], template=template, pool="answer",
                          query_weight=0.1, batch_size=2)
    assert rows.pre.shape[0] == model.cfg.n_layers + 1 == rows.attn.shape[0] + 1
    assert rows.pre.shape[1] == rows.positions.shape[0] == sum(n for _, n in rows.index.values())
    for kind in ("both", "vector", "matrix"):
        streamed = fit(model, CHUNK, more, fit=kind, **options)
        read = fit(model, CHUNK, more, fit=kind, rows=rows, **options)
        assert set(read.deltas) == set(streamed.deltas) and streamed.deltas
        for name in streamed.deltas:
            assert_close(read.deltas[name], streamed.deltas[name], 1e-10, f"{kind}: {name}")
        for name in streamed.steering:
            assert_close(read.steering[name], streamed.steering[name], 1e-10, f"{kind}: {name}")
    assert sum(bool(d.abs().max() > 1e-3) for d in streamed.deltas.values()) > len(streamed.deltas) / 2
    together = fit_all(model, CHUNK, more, fits=("both", "vector"), rows=rows, **options)
    for name, delta in together["vector"].deltas.items():
        assert_close(delta, fit(model, CHUNK, more, fit="vector", **options).deltas[name], 1e-10, name)
    with pytest.raises(tt.InputError, match="kept for pool='answer'"):
        fit(model, CHUNK, more, rows=rows, **{**options, "pool": "kept"})
    wrong = dataclasses.replace(rows, pre=rows.pre[:-1], attn=rows.attn[:-1])  # a model with a block less
    with pytest.raises(tt.InputError, match="not this model's"):
        fit(model, CHUNK, more, rows=wrong, **options)
    moved = dataclasses.replace(rows, positions=rows.positions + 1)
    with pytest.raises(tt.InputError, match="not at the positions"):
        fit(model, CHUNK, more, rows=moved, **options)


def _runs_by_form(model, patch, tokens):
    """Logits without the patch, under its weight form and under its activation form."""
    with torch.no_grad():
        base = model(tokens)
        with patch.apply(model, "weight"):
            by_weight = model(tokens)
        with patch.apply(model, "activation"):
            by_hooks = model(tokens)
    return base, by_weight, by_hooks


def test_weight_and_activation_forms_agree(fitted):
    model, patch = fitted
    base, w, a = _runs_by_form(model, patch, model.to_tokens(" the dog ran on the mat"))
    assert (w - base).abs().max() > 1e-3
    assert_close(w, a, 1e-10, "weight vs activation form")


def test_apply_restores_on_exception_and_attach_handle(fitted):
    model, patch = fitted
    snapshot = param_snapshot(model)
    for form in ("weight", "activation"):
        with pytest.raises(RuntimeError, match="boom"):
            with patch.apply(model, form):
                raise RuntimeError("boom")
        assert_model_untouched(model, snapshot)
        handle = patch.attach(model, form)
        tokens = model.to_tokens(" the dog")
        with torch.no_grad():
            attached = model(tokens)
        handle.remove()
        handle.remove()  # idempotent
        assert_model_untouched(model, snapshot)
        with torch.no_grad(), patch.apply(model, form):
            assert_close(attached, model(tokens), 1e-12, "attach == apply")


def test_merge_into_is_explicit_and_permanent(text_models):
    model = make_model("ln_gelu_learned", tokenizer=make_word_tokenizer())
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, progress=False)
    tokens = model.to_tokens(" the dog")
    with torch.no_grad(), patch.apply(model):
        expected = model(tokens)
    patch.merge_into(model)
    with torch.no_grad():
        assert_close(model(tokens), expected, 1e-12, "merged")


def test_bad_options_are_refused_and_model_untouched(fitted):
    model, _ = fitted
    snapshot = param_snapshot(model)
    bad = [
        dict(fit="nope"), dict(vector_site="resid"), dict(vector_target="x"), dict(pool="x"),
        dict(layers=[99]), dict(layers=[]), dict(ridge=-1.0), dict(batch_size=0),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            fit(model, CHUNK, EXAMPLES, template=TEMPLATE, progress=False, **kwargs)
    with pytest.raises(tt.InputError):
        fit(model, CHUNK, [], template=TEMPLATE, progress=False)
    with pytest.raises(tt.InputError):
        fit(model, "", EXAMPLES, template=TEMPLATE, progress=False)
    with pytest.raises(tt.InputError):
        fit(model, CHUNK, [" dog"], template=TEMPLATE, pool="answer", progress=False)
    with pytest.raises(tt.ChunkError):
        fit(model, CHUNK + " zebra", EXAMPLES, template=TEMPLATE, progress=False)
    assert_model_untouched(model, snapshot)


def test_subset_of_layers_and_vector_only(fitted):
    model, _ = fitted
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, layers=[1], fit="vector", progress=False)
    assert list(patch.deltas) == ["blocks.1.mlp.b_out"]
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, fit="matrix", progress=False)
    assert all(".W_" in k for k in patch.deltas)


def test_summary_has_ranks_and_steering_cosines(fitted):
    model, patch = fitted
    rows = patch.summary()
    assert [r["layer"] for r in rows] == patch.layers
    n_tokens = patch.meta["n_tokens"]
    for r in rows:
        assert 0 < r["W_in_rank"] <= min(n_tokens, model.cfg.d_model)
        assert 1 <= r["W_in_effective_rank"] <= r["W_in_rank"] + 1e-9
        assert -1 <= r["cos_steering"] <= 1
    # steering vectors: the plain mean differences, stored for every layer streamed
    assert set(patch.steering) == {f"{k}.{l}" for k in ("steering", "residual") for l in range(model.cfg.n_layers)}
    assert "layer" in patch.summary_table()


def test_only_splits_the_patch_into_its_vectors_and_its_matrices(fitted):
    model, _ = fitted
    patch = fit(model, CHUNK, EXAMPLES, template=PREFIXED, vector_site="attn_out", attention_matrix=True,
                           output_matrix=True, patch_prefix=False, progress=False)
    vectors, matrices = patch.only("vectors"), patch.only("matrices")
    assert {k.rsplit(".", 1)[-1] for k in vectors.deltas} == {"b_O"}
    assert {k.rsplit(".", 1)[-1] for k in matrices.deltas} == {"W_O", "W_gate", "W_in", "W_out"}
    assert set(vectors.deltas) | set(matrices.deltas) == set(patch.deltas)
    assert not set(vectors.deltas) & set(matrices.deltas)
    assert matrices.factors, "the fit should hold some thought matrices as factors"
    for part in (vectors, matrices):  # the same tensors (dense, or factors), not fitted again; the metadata kept
        assert all(part.deltas.stored(k) is patch.deltas.stored(k) for k in part.deltas)
        assert part.unpatched_positions == patch.unpatched_positions == 1 and "part" not in patch.meta
    assert (vectors.meta["part"], matrices.meta["part"]) == ("vectors", "matrices")
    # applied, each part changes the run, and the two together are the whole patch
    tokens = model.to_tokens("<eos> the dog ran")
    with patch.apply(model):
        whole = model(tokens)
    held = {k: part.deltas.stored(k) for part in (vectors, matrices) for k in part.deltas}  # dense or factors
    merged = tt.ThoughtPatch(deltas={k: v for k, v in held.items() if not isinstance(v, tuple)},
                             factors={k: v for k, v in held.items() if isinstance(v, tuple)}, meta=patch.meta)
    with merged.apply(model):
        assert torch.equal(model(tokens), whole)
    base = model(tokens)
    for part in (vectors, matrices):
        with part.apply(model):
            assert (model(tokens) - base)[0, 1:].abs().max() > 1e-6
    with pytest.raises(ValueError, match="part must be"):
        patch.only("vector")
    with pytest.raises(tt.InputError, match="no thought matrix"):
        vectors.only("matrices")


@pytest.mark.parametrize("rank", [1, 3])
def test_truncated_keeps_the_top_singular_directions_only(fitted, rank):
    model, _ = fitted
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, attention_matrix=True, output_matrix=True,
                           progress=False)
    before = {k: v.clone() for k, v in patch.deltas.items()}
    small = patch.truncated(rank)
    assert small.meta["truncated_rank"] == rank and "truncated_rank" not in patch.meta
    assert set(small.deltas) == set(patch.deltas)
    assert {k for k in patch.deltas if k.endswith(".W_O")}, "the fit should have W_O matrices"
    assert {k for k in patch.deltas if k.endswith(".W_out")}, "the fit should have W_out matrices"
    cut = 0
    for name, d in patch.deltas.items():
        assert torch.equal(d, before[name]), f"{name}: the original patch changed"
        t = small.deltas[name]
        assert t.shape == d.shape and t.dtype == d.dtype
        if name.endswith((".b_out", ".b_O")):
            assert torch.equal(t, d), f"{name}: vectors are kept as they are"
            continue
        m, mt = (d.flatten(0, 1), t.flatten(0, 1)) if name.endswith(".W_O") else (d, t)
        s, st = torch.linalg.svdvals(m), torch.linalg.svdvals(mt)
        scale = float(s[0])
        assert_close(st[:rank], s[:rank], 1e-10 * scale, f"{name}: top singular values")
        assert bool((st[rank:] < 1e-10 * scale).all()), f"{name}: rank > {rank}"
        # Eckart-Young: the error is exactly the discarded spectrum
        err = float(torch.linalg.matrix_norm(m - mt))
        assert abs(err - float(s[rank:].norm())) < 1e-10 * scale, name
        cut += int(float(s[rank:].norm()) > 1e-6 * scale)
    assert cut > 0, "some matrix should have lost directions"
    # at or above every matrix's smaller dimension, nothing changes
    full = patch.truncated(min(model.cfg.d_model, model.cfg.d_mlp, model.cfg.n_heads * model.cfg.d_head))
    assert all(torch.equal(full.deltas[k], d) for k, d in patch.deltas.items())


def test_truncations_share_one_decomposition_and_equal_truncated(fitted):
    model, _ = fitted
    patch = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, attention_matrix=True, progress=False)
    many = patch.truncations([3, 1, 2])
    assert [p.meta["truncated_rank"] for p in many] == [3, 1, 2]
    for p, rank in zip(many, [3, 1, 2]):
        one = patch.truncated(rank)
        assert set(p.deltas) == set(one.deltas)
        assert all(torch.equal(p.deltas[k], one.deltas[k]) for k in one.deltas), rank
    with pytest.raises(ValueError, match="at least one rank"):
        patch.truncations([])
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        patch.truncations([2, 0])


def test_truncated_refuses_bad_ranks_and_vector_only_patches(fitted):
    model, patch = fitted
    for bad in (0, -1):
        with pytest.raises(ValueError, match="rank must be an integer >= 1"):
            patch.truncated(bad)
    for bad in (1.5, True, "2"):
        with pytest.raises(TypeError):  # TypeCheckError under the suite's runtime checks, ours without
            patch.truncated(bad)
    vector_only = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, fit="vector", progress=False)
    with pytest.raises(tt.InputError, match="no thought matrix"):
        vector_only.truncated(1)


# --- 4. saving and loading --------------------------------------------------------------------------


def test_save_load_apply_bit_identical(fitted, tmp_path):
    model, patch = fitted
    path = patch.save(tmp_path / "p.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name != "p.safetensors"]  # no temp file left
    loaded = tt.ThoughtPatch.load(path, model=model)
    assert loaded.meta["chunk"] == CHUNK and loaded.meta["n_examples"] == len(EXAMPLES)
    assert loaded.meta["version"] == tt.__version__
    assert_same_logits_applied(model, patch, loaded)


def test_load_refuses_other_model_shapes_and_identity(fitted, tmp_path):
    model, patch = fitted
    path = patch.save(tmp_path / "p.safetensors")
    other_seed = make_model("rms_gated_silu_rotary_gqa", seed=1, tokenizer=make_word_tokenizer())
    with pytest.raises(tt.IncompatibleModelError, match="another model"):
        tt.ThoughtPatch.load(path, model=other_seed)
    other_shape = make_model("ln_gelu_learned", tokenizer=make_word_tokenizer())
    snapshot = param_snapshot(other_shape)
    with pytest.raises(tt.IncompatibleModelError, match="other shapes"):
        with patch.apply(other_shape):
            pass
    assert_model_untouched(other_shape, snapshot)


@pytest.mark.parametrize("damage", ["truncate", "flip_tensor_byte", "edit_metadata", "empty", "not_a_patch"])
def test_load_refuses_damaged_files(fitted, tmp_path, damage):
    model, patch = fitted
    path = patch.save(tmp_path / "p.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip_tensor_byte":
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "edit_metadata":
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["tl_thoughts"])
        meta["sha256"] = "0" * 64
        header["__metadata__"]["tl_thoughts"] = json.dumps(meta)
        new_header = json.dumps(header).encode()
        path.write_bytes(len(new_header).to_bytes(8, "little") + new_header + bytes(data[8 + header_len :]))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(tt.PatchFileError):
        tt.ThoughtPatch.load(path)


def test_patches_stack_and_survive_merging(text_models):
    """A patch's identity check reads the model's own weights (under the patches applied in the
    weight form): two patches can be applied together, and a patch still applies to a model
    another patch was merged into since it was fitted (the same values as stacking them)."""
    model = make_model("ln_gelu_learned", tokenizer=make_word_tokenizer())
    first = fit(model, CHUNK, EXAMPLES, template=TEMPLATE, progress=False)
    second = fit(model, "a big red hat and", EXAMPLES, template=TEMPLATE, progress=False)
    tokens = model.to_tokens(" the dog")
    with torch.no_grad():
        with first.apply(model), second.apply(model):
            both = model(tokens)
        first.merge_into(model)
        with second.apply(model):
            merged_then_second = model(tokens)
    assert_close(both, merged_then_second, 1e-10, "stacked vs merged")


# --- FitConfig and the per-site solves ------------------------------------------------------------


def test_fit_config_validates_and_presets_are_the_documented_methods():
    """``FitConfig`` refuses every bad option when made (the library's ``InputError``, a
    ``ValueError``); the presets are the papers' method and the benchmark's; ``fit_thought`` takes
    few parameters and no private one."""
    import inspect

    for bad in [dict(fit="nope"), dict(pool="x"), dict(vector_site="resid"), dict(vector_target="x"),
                dict(ridge=-1.0), dict(ridge=float("nan")), dict(ridge=float("inf")), dict(query_weight=-0.1),
                dict(query_weight=float("nan")), dict(batch_size=0), dict(layers=()), dict(layers=(-1,)),
                dict(patch_prefix=False, pool="all")]:
        with pytest.raises(tt.InputError):
            tt.FitConfig(**bad)
    # wrong types: our InputError, or the TypeCheckError (a TypeError) of the suite's runtime checks first
    for bad in [dict(batch_size=2.0), dict(batch_size=True), dict(attention_matrix=1), dict(patch_prefix="no"),
                dict(layers=(True,)), dict(ridge="1")]:
        with pytest.raises((tt.InputError, TypeError)):
            tt.FitConfig(**bad)
    assert tt.FitConfig(layers=(3, 1, 3)).layers == (1, 3)
    paper = tt.FitConfig.preset("paper")
    assert (paper.vector_site, paper.vector_target, paper.pool, paper.fit) == ("b_out", "attention", "kept", "both")
    assert not (paper.attention_matrix or paper.output_matrix) and paper.patch_prefix and paper.query_weight == 0
    bench = tt.FitConfig.preset("benchmark")
    from tl_thoughts.evaluation import EvalConfig

    evaluation = EvalConfig()
    for name in ("ridge", "pool", "vector_site", "vector_target", "attention_matrix", "output_matrix",
                 "query_weight", "patch_prefix"):
        assert getattr(bench, name) == getattr(evaluation, name), name
    assert tt.FitConfig.preset("default") == tt.FitConfig()
    assert tt.FitConfig.preset("paper", ridge=2.0).ridge == 2.0
    with pytest.raises(tt.InputError, match="unknown FitConfig preset"):
        tt.FitConfig.preset("nope")
    with pytest.raises(tt.InputError):
        tt.FitConfig.preset("paper", ridge=-1.0)
    params = inspect.signature(tt.fit_thought).parameters
    assert len(params) <= 8 and not any(p.startswith("_") for p in params)


def test_a_config_that_is_not_a_fit_config_is_refused(fitted):
    model, _ = fitted
    with pytest.raises((tt.InputError, TypeError), match="FitConfig"):  # ours, or the runtime checker's
        tt.fit_thought(model, CHUNK, EXAMPLES, {"ridge": 0.5}, template=TEMPLATE, progress=False)
    with pytest.raises((tt.InputError, TypeError), match="FitConfig"):
        tt.fit_thoughts(model, CHUNK, EXAMPLES, "paper", template=TEMPLATE, progress=False)


def test_the_paper_preset_patches_the_mlp_only(text_models):
    """The papers' method: a vector on every block's ``b_out`` and matrices on the MLP input only,
    every position patched."""
    model = text_models("rms_gated_silu_rotary_gqa")
    patch = tt.fit_thought(model, CHUNK, EXAMPLES, tt.FitConfig.preset("paper"), template=TEMPLATE, progress=False)
    kinds = {name.split(".", 2)[2] for name in patch.deltas}
    assert kinds == {"mlp.b_out", "mlp.W_in", "mlp.W_gate"}
    assert len(patch.deltas) == 3 * model.cfg.n_layers and patch.unpatched_positions == 0
    assert patch.meta["options"]["vector_target"] == "attention"


def _random_rows(n, d_in, d_out, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    u = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    return a, u, w


def _weighted_ridge(a, u, w, ridge):
    lam = ridge * (w[:, None] * a**2).sum() / w.sum()
    G, F = a * w.sqrt()[:, None], u * w.sqrt()[:, None]
    return torch.linalg.solve(G.T @ G + lam * torch.eye(a.shape[1], dtype=a.dtype), G.T @ F)


def test_solve_vector_is_the_mean_and_refuses_no_token():
    from tl_thoughts.thoughts import solve_vector

    deltas = torch.randn(7, 5, dtype=torch.float64)
    assert_close(solve_vector(deltas.sum(0), 7), deltas.mean(0), 1e-14, "mean")
    with pytest.raises(tt.InputError, match="no pooled position"):
        solve_vector(deltas.sum(0), 0)


@pytest.mark.parametrize("n", [6, 30])  # fewer rows than inputs (row space) and more
def test_solve_W_O_fits_what_the_vector_leaves(n):
    """``solve_W_O``: the weighted ridge regression of ``delta - vector`` on ``z``."""
    from tl_thoughts._math import RidgeRegression
    from tl_thoughts.thoughts import solve_W_O

    z, delta, w = _random_rows(n, 8, 5)
    vector = torch.randn(5, dtype=torch.float64)
    reg = RidgeRegression(8, n)
    reg.add(z, delta, w)
    got = solve_W_O(reg, vector, 0.3, float(w.sum()), n_heads=2, d_head=4)
    assert_close(got, _weighted_ridge(z, delta - vector, w, 0.3), 1e-10, "W_O")
    with pytest.raises(tt.InputError, match="n_heads"):
        solve_W_O(reg, vector, 0.3, float(w.sum()), n_heads=3, d_head=4)


@pytest.mark.parametrize("n", [6, 60])
def test_solve_W_out_is_the_weighted_ridge_regression(n):
    from tl_thoughts._math import RidgeRegression
    from tl_thoughts.thoughts import solve_W_out

    h, r, w = _random_rows(n, 12, 5, seed=1)
    reg = RidgeRegression(12, n)
    for part in torch.arange(n).split(5):
        reg.add(h[part], r[part], w[part])
    assert_close(solve_W_out(reg, 0.2, float(w.sum())), _weighted_ridge(h, r, w, 0.2), 1e-10, "W_out")


@pytest.mark.parametrize("arch", PRE_NORM_MLP_ARCHITECTURES)
def test_solve_mlp_inputs_maps_one_solve_through_every_input_matrix(text_models, arch):
    """``solve_mlp_inputs``: ``M @ W`` for ``W_in`` (and ``W_gate``) with ``M`` the ridge regression
    of ``a_C - a`` on ``a``: the regression of the targets ``(a_C - a) @ W`` themselves."""
    from tl_thoughts import _tl
    from tl_thoughts._math import RidgeRegression
    from tl_thoughts.thoughts import solve_mlp_inputs

    model = text_models(arch)
    d = model.cfg.d_model
    a, diff, w = _random_rows(3 * d, d, d, seed=2)
    reg = RidgeRegression(d, 3 * d)
    reg.add(a, diff, w)
    got = solve_mlp_inputs(model, 1, reg, 0.1, float(w.sum()))
    spec = _tl.model_spec(model)
    assert set(got) == {f"blocks.1.mlp.{name}" for name in spec.mlp_input_matrices}
    for name in spec.mlp_input_matrices:
        W = _tl.mlp_matrix(model, 1, name).double()
        assert_close(got[f"blocks.1.mlp.{name}"], _weighted_ridge(a, diff @ W, w, 0.1), 1e-9, name)


@pytest.mark.parametrize("patch_prefix", [True, False])
def test_a_patch_applied_as_hooks_decodes_through_the_cache_as_on_whole_sequences(fitted, patch_prefix):
    """A thought patch's activation hooks read how many positions a key-value cache holds, so
    ``greedy_generate_all`` keeps its cached path under them (one new position a step), with the
    continuations the whole-sequence path gives (forced here by a no-op hook of the user's)."""
    from tl_thoughts.evaluation import greedy_generate_all

    model, _ = fitted
    patch = fit(model, CHUNK, EXAMPLES, template=PREFIXED, patch_prefix=patch_prefix, attention_matrix=True,
                output_matrix=True, progress=False)
    assert patch.factors, "some thought matrices held as factors: their hooks multiply by the factors"
    prompts = ["<eos> the dog", "<eos> a big red hat", "<eos> the red cat sat"]
    lengths: list[int] = []
    with patch.apply(model, form="activation"):
        assert _tl.has_hooks(model) and not _tl.has_whole_sequence_hooks(model)
        spy = [("blocks.0.hook_resid_pre", lambda act, hook: lengths.append(act.shape[1]))]
        remove_spy = _tl.attach_hooks(model, spy, cache_safe=True)  # records, and keeps the cached path
        try:
            cached = greedy_generate_all(model, prompts, max_new_tokens=4, stop_at_newline=False)
        finally:
            remove_spy()
        assert 1 in lengths  # one new position a step: the cached path was taken
        remove_user = _tl.attach_hooks(model, [("blocks.0.hook_resid_pre", lambda act, hook: None)])
        try:
            assert _tl.has_whole_sequence_hooks(model)  # a user's hook: whole sequences every step
            whole = greedy_generate_all(model, prompts, max_new_tokens=4, stop_at_newline=False)
        finally:
            remove_user()
    assert not _tl.has_hooks(model)
    unpatched = greedy_generate_all(model, prompts, max_new_tokens=4, stop_at_newline=False)
    assert cached == whole
    assert cached != unpatched  # the patch changes the continuations: the check can fail
