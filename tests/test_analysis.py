"""Circuit-level analysis (tl_thoughts.analysis) and its plots (tl_thoughts.plots) on tiny float64
models of every architecture: attributions add up, the top-k causal check ends at the full run,
the direct path matches TransformerLens' own ``apply_ln_to_stack``, bad input is refused, and the
model is left untouched."""

import pytest
import torch
from helpers import (
    fit,
    MLP_ARCHITECTURES,
    POST_NORM_ARCHITECTURES,
    PRE_NORM_ARCHITECTURES,
    assert_close,
    assert_model_untouched,
    make_model,
    make_word_tokenizer,
    param_snapshot,
    runtime_checks_off,
)

import tl_thoughts as tt
from tl_thoughts import analysis, plots

EXACT = 1e-10
PROMPT = torch.tensor([[3, 17, 5, 41, 8, 22, 9, 30, 11, 2, 47, 13]])
CHUNK = slice(2, 6)
PAIR = (7, 19)


@pytest.fixture(scope="module")
def setup():
    cache = {}

    def get(arch):
        if arch not in cache:
            model = make_model(arch)
            cache[arch] = (model, tt.implicit_updates(model, PROMPT, CHUNK))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", PRE_NORM_ARCHITECTURES)
def test_direct_effects_add_up_over_heads_and_blocks(setup, arch):
    model, updates = setup(arch)
    snap = param_snapshot(model)
    per_head = analysis.head_attribution(model, updates, metric="direct_effect", answer_tokens=PAIR)
    per_block = analysis.direct_effect(model, updates, PAIR)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    assert per_head.shape == (n_layers * n_heads, updates.vectors.shape[1])
    assert_close(per_head.reshape(n_layers, n_heads, -1).sum(1), per_block, 1e-12, "heads -> block")
    # the whole update (all blocks' vectors summed) through the same frozen linear map
    total = analysis.head_attribution(
        model, _summed(updates), metric="direct_effect", answer_tokens=PAIR, per_head=False
    )[0]
    assert_close(per_block.sum(0), total, 1e-12, "blocks -> total")
    assert_model_untouched(model, snap)


@pytest.mark.parametrize("arch", POST_NORM_ARCHITECTURES)
def test_post_norm_blocks_attribute_whole_blocks_only(setup, arch):
    """With a post-attention norm the heads' vectors (before the norm) do not add up to the block's:
    per-head direct effects and head subsets are refused with a message saying why; the blocks'
    direct effects and the layer-by-layer recovery (whole blocks) work, and end at the full run."""
    model, updates = setup(arch)
    snap = param_snapshot(model)
    with pytest.raises(tt.UnsupportedArchitectureError, match="post-attention norm"):
        analysis.head_attribution(model, updates, metric="direct_effect", answer_tokens=PAIR)
    with pytest.raises(tt.UnsupportedArchitectureError, match="do not add up"):
        analysis.top_k_recovery(model, updates, PAIR)
    norms = analysis.head_attribution(model, updates, metric="norm")  # per-head norms (pre-norm)
    assert norms.shape == (model.cfg.n_layers * model.cfg.n_heads, updates.vectors.shape[1])
    blocks = analysis.direct_effect(model, updates, PAIR)
    assert blocks.shape == (model.cfg.n_layers, updates.vectors.shape[1])
    curve = analysis.layer_recovery(model, updates, PAIR)
    assert abs(float(curve.recovered[-1]) - 1.0) <= 1e-9 and float(curve.recovered[0]) == 0.0
    assert_model_untouched(model, snap)


def _summed(updates):
    """The same updates with one pseudo-block holding the sum of all blocks' vectors."""
    import dataclasses

    v = updates.vectors.sum(0, keepdim=True)
    return dataclasses.replace(
        updates,
        vectors=v,
        head_vectors=v[:, :, None],
        chunk_attention=updates.chunk_attention[:1, :, :1],
        mlp_in=None,
        mlp_in_with_chunk=None,
    )


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "lnpre_silu_learned_gqa", "rms_silu_learned",
                                  "rmspre_attn_only_rotary"])
def test_direct_path_matches_transformer_lens_apply_ln_to_stack(setup, arch):
    """Independent reference: TransformerLens' ActivationCache.apply_ln_to_stack (scale frozen at
    the full run's value, centring for LN), times ln_final.w (TransformerLens assumes it folded),
    onto W_U[:, c] - W_U[:, i]."""
    model, updates = setup(arch)
    _, cache = model.run_with_cache(PROMPT)
    stack = updates.head_vectors.permute(0, 2, 1, 3).reshape(-1, updates.vectors.shape[1], model.cfg.d_model)
    scaled = torch.stack([
        cache.apply_ln_to_stack(stack[:, i : i + 1], layer=None, pos_slice=int(p))[:, 0]
        for i, p in enumerate(updates.positions)
    ], dim=1)  # [component, kept, d_model]
    if model.cfg.normalization_type in ("LN", "RMS"):
        scaled = scaled * model.ln_final.w
    direction = model.W_U[:, PAIR[0]] - model.W_U[:, PAIR[1]]
    expected = scaled @ direction
    actual = analysis.head_attribution(model, updates, metric="direct_effect", answer_tokens=PAIR)
    assert_close(actual, expected, 1e-12, "direct effect vs apply_ln_to_stack")


@pytest.mark.parametrize("arch", PRE_NORM_ARCHITECTURES)
def test_top_k_recovery_ends_at_the_full_run_and_starts_at_the_reduced_run(setup, arch):
    model, updates = setup(arch)
    snap = param_snapshot(model)
    curve = analysis.top_k_recovery(model, updates, PAIR)
    n = model.cfg.n_layers * model.cfg.n_heads
    assert curve.ks.tolist() == list(range(n + 1))
    assert abs(curve.values[-1] - curve.full) <= EXACT
    assert abs(float(curve.recovered[-1]) - 1.0) <= 1e-9
    assert float(curve.recovered[0]) == 0.0
    # k = 0 is the unpatched reduced run of verify (original positions kept)
    report = tt.verify(model, updates, forms=("activation",))
    row = CHUNK.start + (updates.vectors.shape[1] - 1)
    unpatched = report.forms["unpatched"].logits[row]
    assert abs(curve.reduced - float(unpatched[PAIR[0]] - unpatched[PAIR[1]])) <= EXACT
    # the order is by |score|, best first, and scores are the ranking metric at the position
    scores = analysis.head_attribution(model, updates, metric="direct_effect", answer_tokens=PAIR)[:, -1]
    assert_close(curve.scores, scores, 0.0, "scores")
    labels = analysis.head_labels(model.cfg.n_layers, model.cfg.n_heads)
    ranked = [abs(float(scores[labels.index(name)])) for name in curve.order]
    assert ranked == sorted(ranked, reverse=True)
    assert_model_untouched(model, snap)


def _by_hand(model, updates, mask, position, answer):
    """Independent reference for the causal checks: the reduced prompt with the vectors of the
    heads in ``mask`` [layer, head] added by hand-written hooks, positions kept through
    TransformerLens' own ``W_pos`` indexing (learned-position architectures only)."""
    kept = updates.span.kept_positions
    added = torch.einsum("lthd,lh->ltd", updates.head_vectors, mask.double())

    def add(layer):
        def hook(act, hook):
            act = act.clone()
            act[0, CHUNK.start:] += added[layer]
            return act
        return hook

    hooks = [(f"blocks.{layer}.hook_attn_out", add(layer)) for layer in range(model.cfg.n_layers)]
    hooks.append(("hook_pos_embed", lambda act, hook: model.W_pos[kept][None]))
    with torch.no_grad():
        logits = model.run_with_hooks(PROMPT[:, kept], fwd_hooks=hooks)
    row = logits[0, CHUNK.start + position]
    return float(row[answer[0]] - row[answer[1]])


def test_ablation_scores_and_layer_recovery_against_hand_written_hooks(setup):
    model, updates = setup("lnpre_silu_learned_gqa")
    snap = param_snapshot(model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    ones = torch.ones(n_layers, n_heads)
    everything = _by_hand(model, updates, ones, 3, PAIR)
    scores = analysis.ablation_scores(model, updates, PAIR, position=3)
    for i in (0, 5, n_layers * n_heads - 1):
        mask = ones.flatten().clone()
        mask[i] = 0
        assert abs(float(scores[i]) - (everything - _by_hand(model, updates, mask.reshape(ones.shape), 3, PAIR))) <= EXACT
    curve = analysis.top_k_recovery(model, updates, PAIR, ranking="ablation", position=3, ks=[0, 2, 12])
    assert_close(curve.scores, scores, 0.0, "ablation ranking scores")
    labels = analysis.head_labels(n_layers, n_heads)
    signed = [float(scores[labels.index(name)]) for name in curve.order]
    assert signed == sorted(signed, reverse=True)  # signed: heads that help come first
    layers = analysis.layer_recovery(model, updates, PAIR, position=3)
    assert layers.ks.tolist() == list(range(n_layers + 1)) and layers.order == ["L0", "L1", "L2"]
    assert abs(layers.values[-1] - layers.full) <= EXACT
    first = torch.zeros(n_layers, n_heads)
    first[0] = 1
    assert abs(float(layers.values[1]) - _by_hand(model, updates, first, 3, PAIR)) <= EXACT
    assert_close(layers.scores, analysis.direct_effect(model, updates, PAIR)[:, 3], 0.0, "block scores")
    assert_model_untouched(model, snap)


def test_top_k_recovery_at_one_head_equals_adding_that_head_by_hand(setup):
    model, updates = setup("ln_gelu_learned")
    curve = analysis.top_k_recovery(model, updates, PAIR, ranking="norm", position=2, ks=[1])
    labels = analysis.head_labels(model.cfg.n_layers, model.cfg.n_heads)
    mask = torch.zeros(len(labels))
    mask[labels.index(curve.order[0])] = 1
    assert abs(curve.values[0] - _by_hand(model, updates, mask.reshape(2, -1), 2, PAIR)) <= EXACT
    assert curve.position == 2


def test_pos_slice_and_labels(setup):
    model, updates = setup("rms_gated_silu_rotary_gqa")
    full, labels = analysis.head_attribution(model, updates, return_labels=True)
    assert labels == analysis.head_labels(model.cfg.n_layers, model.cfg.n_heads)
    assert labels[model.cfg.n_heads] == "L1H0"
    assert_close(analysis.head_attribution(model, updates, pos_slice=-1), full[:, -1:], 0.0, "int")
    assert_close(analysis.head_attribution(model, updates, pos_slice=slice(1, 4)), full[:, 1:4], 0.0, "slice")
    assert_close(analysis.head_attribution(model, updates, pos_slice=[0, 3]), full[:, [0, 3]], 0.0, "list")
    attn = analysis.head_attribution(model, updates, metric="chunk_attention")
    assert_close(attn, updates.chunk_attention.permute(0, 2, 1).reshape(-1, attn.shape[1]), 0.0, "attention")
    norms = analysis.head_attribution(model, updates, per_head=False, return_labels=True)
    assert norms[1] == [f"L{layer}" for layer in range(model.cfg.n_layers)]
    assert_close(norms[0], updates.vectors.norm(dim=-1), 0.0, "block norms")
    per_position = torch.tensor([PAIR[0]] * updates.vectors.shape[1])
    assert_close(
        analysis.head_attribution(model, updates, metric="direct_effect", answer_tokens=per_position),
        analysis.head_attribution(model, updates, metric="direct_effect", answer_tokens=PAIR[0]),
        0.0,
        "per-position answers",
    )


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda m, u: analysis.head_attribution(m, u, metric="nope"), ValueError),
        (lambda m, u: analysis.head_attribution(m, u, metric="direct_effect"), tt.InputError),
        (lambda m, u: analysis.head_attribution(m, u, metric="direct_effect", answer_tokens=10**6), tt.InputError),
        (lambda m, u: analysis.head_attribution(m, u, metric="direct_effect", answer_tokens=(1, 2, 3)), tt.InputError),
        (lambda m, u: analysis.head_attribution(m, u, metric="direct_effect",
                                                answer_tokens=torch.zeros(3, dtype=torch.long)), tt.InputError),
        (lambda m, u: analysis.head_attribution(m, u, metric="chunk_attention", per_head=False), ValueError),
        (lambda m, u: analysis.head_attribution(m, u, pos_slice=99), tt.InputError),
        (lambda m, u: analysis.top_k_recovery(m, u, PAIR, position=99), tt.InputError),
        (lambda m, u: analysis.top_k_recovery(m, u, PAIR, ks=[0, 999]), tt.InputError),
        (lambda m, u: analysis.top_k_recovery(m, u, (4, 4)), tt.ZeroDenominatorError),
        (lambda m, u: analysis.top_k_recovery(m, u, torch.tensor(4)), tt.InputError),
        (lambda m, u: analysis.top_k_recovery(m, u, PAIR, ranking="random"), ValueError),
        (lambda m, u: analysis.ablation_scores(m, u, PAIR, position=-99), tt.InputError),
        (lambda m, u: analysis.layer_recovery(m, u, (4, 4)), tt.ZeroDenominatorError),
        (lambda m, u: analysis.token_patch_spectrum(u, layer=9), tt.InputError),
    ],
)
def test_bad_input_is_refused_and_the_model_is_untouched(setup, call, error):
    """Under the library's own validation (as users meet it: jaxtyping's checks off)."""
    model, updates = setup("ln_gelu_learned")
    snap = param_snapshot(model)
    with runtime_checks_off(), pytest.raises(error):
        call(model, updates)
    assert_model_untouched(model, snap)


@pytest.mark.parametrize("arch", MLP_ARCHITECTURES)
def test_token_patch_spectrum_is_that_of_the_dense_sum(setup, arch):
    model, updates = setup(arch)
    for name in updates.mlp_input_matrices:
        keys, values = updates.matrix_factors(name)
        dense = keys[1].T @ values[1]  # sum over kept tokens of the rank-1 patches of block 1
        sv = analysis.token_patch_spectrum(updates, 1, name)
        assert sv.shape[0] == keys.shape[1]  # rank <= number of kept tokens
        assert_close(sv, torch.linalg.svdvals(dense)[: sv.shape[0]], 1e-10, name)
        assert_close(analysis.token_patch_spectrum(updates, 1, name, pos_slice=[0]),
                     keys[1, 0].norm()[None] * values[1, 0].norm(), 1e-10, "one token")


def test_spectrum_of_attention_only_model_is_refused(setup):
    _, updates = setup("rmspre_attn_only_rotary")
    with pytest.raises(tt.UnsupportedArchitectureError):
        analysis.token_patch_spectrum(updates, 0)


@pytest.fixture(scope="module")
def fitted():
    model = make_model("ln_gelu_learned", tokenizer=make_word_tokenizer())
    template = tt.PromptTemplate("{chunk}{query}", separator="")
    examples = [(" the dog", " ran"), (" a big red hat", " sat"), (" the red cat", " ran ."), (" a dog", " sat on")]
    patch = fit(model, "the cat sat on the mat and", examples, template=template, progress=False)
    return model, patch, template, examples


def test_steering_comparison_matches_the_stored_vectors(fitted):
    _, patch, _, _ = fitted
    cmp = analysis.steering_comparison(patch)
    assert cmp.layers == patch.layers
    for i, layer in enumerate(cmp.layers):
        v, s, r = patch.vector(layer), patch.steering[f"steering.{layer}"], patch.steering[f"residual.{layer}"]
        assert abs(float(cmp.cos_vector_steering[i]) - float(torch.cosine_similarity(v, s, dim=0))) <= 1e-12
        assert abs(float(cmp.cos_vector_residual[i]) - float(torch.cosine_similarity(v, r, dim=0))) <= 1e-12
        assert abs(float(cmp.norm_steering[i]) - float(s.norm())) <= 1e-12
    # the summary of the patch reports the same cosine
    for row, cos in zip(patch.summary(), cmp.cos_vector_steering):
        assert abs(row["cos_steering"] - float(cos)) <= 1e-12
    assert "cos(v,s)" in cmp.table()


def test_steering_comparison_needs_vectors_and_statistics(fitted):
    model, patch, template, examples = fitted
    only_matrix = fit(model, "the cat sat on the mat and", examples, template=template,
                                 fit="matrix", progress=False)
    with pytest.raises(tt.InputError, match="no thought vector"):
        analysis.steering_comparison(only_matrix)
    no_stats = fit(model, "the cat sat on the mat and", examples, template=template,
                              fit="vector", compare_steering=False, progress=False)
    with pytest.raises(tt.InputError, match="compare_steering"):
        analysis.steering_comparison(no_stats)


def test_thought_matrix_spectrum(fitted):
    _, patch, _, _ = fitted
    sv = analysis.thought_matrix_spectrum(patch, 1)
    dense = torch.linalg.svdvals(patch.matrix(1).double())  # the matrix multiplied out
    stored = patch.deltas.stored("blocks.1.mlp.W_in")
    r = stored[1].shape[0] if isinstance(stored, tuple) else len(dense)  # factors: their r values
    assert_close(sv, dense[:r], 1e-10, "spectrum")
    assert isinstance(stored, tuple) and r < len(dense)  # a fitted patch holds W_in as factors
    assert float(dense[r:].abs().max()) < 1e-10  # the others are zero
    with pytest.raises(tt.InputError):
        analysis.thought_matrix_spectrum(patch, 1, "W_gate")


# --- plots -------------------------------------------------------------------------------------


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_render_and_save(setup, fitted, tmp_path):
    model, updates = setup("ln_gelu_learned")
    scores, labels = analysis.head_attribution(model, updates, metric="direct_effect", answer_tokens=PAIR,
                                               pos_slice=-1, return_labels=True)
    fig = plots.head_heatmap(scores[:, 0], n_heads=model.cfg.n_heads, save=tmp_path / "heads.png")
    assert fig.axes[0].get_xlabel().startswith("head") and fig.axes[0].get_ylabel().startswith("layer")
    assert fig.axes[0].images[0].get_array().shape == (model.cfg.n_layers, model.cfg.n_heads)
    values = torch.full((PROMPT.shape[1],), float("nan"), dtype=torch.float64)
    values[updates.positions] = updates.vectors.norm(dim=-1).sum(0)
    tokens = [str(int(t)) for t in PROMPT[0]]
    fig = plots.token_bars(values, tokens, chunk=CHUNK, save=tmp_path / "tokens.png")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == tokens
    assert len(fig.axes[0].patches) == len(tokens) + 1  # the bars and one shaded chunk
    fig = plots.token_bars(values, tokens, chunk=[slice(2, 3), slice(5, 7)])
    assert len(fig.axes[0].patches) == len(tokens) + 2  # several chunks: one shading each
    curve = analysis.top_k_recovery(model, updates, PAIR)
    fig = plots.recovery_curve(curve, save=tmp_path / "curve.png")
    assert list(fig.axes[0].lines[0].get_ydata()) == curve.recovered.tolist()
    fig = plots.spectra({"L1 W_in": analysis.token_patch_spectrum(updates, 1)}, save=tmp_path / "sv.png")
    assert fig.axes[0].get_yscale() == "log"
    _, patch, _, _ = fitted
    plots.steering_comparison(analysis.steering_comparison(patch), save=tmp_path / "steer.png")
    plots.verification_report(tt.verify(model, updates), save=tmp_path / "report.png")
    for name in ("heads", "tokens", "curve", "sv", "steer", "report"):
        assert _is_png(tmp_path / f"{name}.png"), name


def test_plots_refuse_bad_shapes():
    with pytest.raises(tt.InputError):
        plots.head_heatmap(torch.zeros(7), n_heads=4)
    with pytest.raises(tt.InputError):
        plots.token_bars(torch.zeros(3), ["a", "b"])
    with pytest.raises(tt.InputError):
        plots.spectra({})
