"""The core claim (THEORY 1-3): the reduced prompt, patched with the implicit updates, reproduces the
full prompt exactly, for every supported architecture, chunk placement and number of kept tokens;
and the updates equal an independent naive layer-by-layer reference."""

import contextlib

import pytest
import torch

import tl_thoughts as tt
from helpers import (
    ARCHITECTURES,
    ARCHS,
    D_VOCAB,
    MLP_ARCHITECTURES,
    POST_NORM_ARCHITECTURES,
    PRE_NORM_ARCHITECTURES,
    assert_close,
    assert_model_untouched,
    max_abs_diff,
    param_snapshot,
)

EXACT = 1e-10  # float64 tolerance of every exactness check

# prefix length before a 4-token chunk: none, a single (BOS-like) token, or a 4-token prefix
PLACEMENTS = {"start": 0, "bos": 1, "middle": 4}
CHUNK_LEN = 4
N_AFTER = {"one_after": 1, "five_after": 5}


def case_tokens(placement: str, n_after: int, seed: int = 0) -> tuple[torch.Tensor, slice]:
    """A prompt of DISTINCT random tokens and its chunk (distinct, so that no two kept rows of a
    weight patch are identical by construction; repeated tokens are tested separately)."""
    start = PLACEMENTS[placement]
    stop = start + CHUNK_LEN
    gen = torch.Generator().manual_seed(seed + 17 * start + n_after)
    tokens = torch.randperm(D_VOCAB, generator=gen)[: stop + n_after][None]
    return tokens, slice(start, stop)


def kept_positions(chunk: slice, n: int) -> torch.Tensor:
    return torch.cat([torch.arange(chunk.start), torch.arange(chunk.stop, n)])


# --- 1. exact equivalence, both forms -------------------------------------------------------------


@pytest.mark.parametrize("n_after", N_AFTER.values(), ids=N_AFTER.keys())
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reduced_prompt_with_updates_reproduces_full_run(tiny_model, arch, placement, n_after):
    model = tiny_model(arch)
    tokens, chunk = case_tokens(placement, n_after)
    n = tokens.shape[1]
    snapshot = param_snapshot(model)

    updates = tt.implicit_updates(model, tokens, chunk)
    cfg = model.cfg
    assert updates.chunk == chunk
    assert torch.equal(updates.positions, torch.arange(chunk.stop, n))
    assert updates.vectors.shape == (cfg.n_layers, n_after, cfg.d_model)
    assert updates.head_vectors.shape == (cfg.n_layers, n_after, cfg.n_heads, cfg.d_model)
    assert updates.chunk_attention.shape == (cfg.n_layers, n_after, cfg.n_heads)
    if ARCHS[arch].attn_only:
        assert updates.mlp_in is None and updates.mlp_in_with_chunk is None
        assert updates.mlp_input_matrices == ()
    else:
        assert updates.mlp_in.shape == (cfg.n_layers, n_after, cfg.d_model)
        expected = ("W_gate", "W_in") if ARCHS[arch].gated else ("W_in",)
        assert updates.mlp_input_matrices == expected

    report = tt.verify(model, updates)
    assert set(report.forms) == {"unpatched", "activation", "weight"}
    kept = kept_positions(chunk, n)
    assert torch.equal(report.kept_positions, kept)

    # the reference is the plain full run
    with torch.no_grad():
        full_logits = model(tokens)[0]
    assert_close(report.full_logits, full_logits[kept], 1e-12, "full-run reference logits")

    # the chunk matters: without the patch the reduced run is far from the full one
    unpatched = report["unpatched"]
    assert unpatched.max_abs_logit_error > 1e-2, "equivalence would be trivial"
    assert unpatched.max_resid_error > 1e-2

    for form in ("activation", "weight"):
        r = report[form]
        assert r.logit_errors.shape == (len(kept),)
        assert r.resid_errors.shape == (cfg.n_layers,)
        assert r.max_abs_logit_error <= EXACT, f"{form}: {r.max_abs_logit_error:.3e}"
        assert float(r.resid_errors.max()) <= EXACT, f"{form}: resid {r.resid_errors}"
        assert r.max_resid_error <= EXACT
        assert bool(r.argmax_match.all()) and r.argmax_agreement == 1.0
        assert r.max_kl <= 1e-12
        assert_close(r.logits, full_logits[kept], EXACT, f"{form} logits")
    assert report.max_abs_logit_error <= EXACT
    assert report.max_resid_error <= EXACT
    assert report.argmax_agreement == 1.0

    assert_model_untouched(model, snapshot)


def test_float32_forms_exact_to_looser_tolerance(tiny_model):
    model = tiny_model("rms_gated_silu_rotary_gqa", torch.float32)
    snapshot = param_snapshot(model)
    tokens, chunk = case_tokens("middle", 5)
    updates = tt.implicit_updates(model, tokens, chunk)
    assert updates.vectors.dtype == torch.float32
    report = tt.verify(model, updates)
    assert report.dtype == torch.float32
    assert report["unpatched"].max_abs_logit_error > 1e-2
    for form in ("activation", "weight"):
        assert report[form].max_abs_logit_error <= 1e-4, form
        assert report[form].argmax_agreement == 1.0, form
    assert_model_untouched(model, snapshot)


def test_report_table_lists_every_layer_and_form(tiny_model):
    model = tiny_model("ln_gelu_learned")
    tokens, chunk = case_tokens("middle", 5)
    report = tt.verify(model, tt.implicit_updates(model, tokens, chunk))
    text = report.table()
    assert str(report) == text
    assert "Chunk positions 4..7 removed; 9 kept positions (4 before the chunk)" in text
    assert "float64" in text and report.weight_form in text
    for name in ("unpatched", "activation", "weight", "max|dlogit|", "max KL", "argmax"):
        assert name in text
    for layer in range(model.cfg.n_layers):
        assert any(line.split()[:1] == [str(layer)] for line in text.splitlines())


@pytest.mark.parametrize("form", ["activation", "weight"])
def test_verify_single_form(tiny_model, form):
    model = tiny_model("rms_silu_learned")
    tokens, chunk = case_tokens("bos", 5)
    report = tt.verify(model, tt.implicit_updates(model, tokens, chunk), forms=(form,))
    assert set(report.forms) == {"unpatched", form}
    assert report.max_abs_logit_error <= EXACT
    assert (report.weight_form is None) == (form == "activation")


# --- 2. the updates themselves ------------------------------------------------------------------


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_head_vectors_and_chunk_attention(tiny_model, arch, placement):
    model = tiny_model(arch)
    tokens, chunk = case_tokens(placement, 5)
    updates = tt.implicit_updates(model, tokens, chunk)
    # the per-head decomposition sums to the block vector (before the post-attention norm, in
    # blocks that have one: the norm makes the block's vector a difference of normalised outputs)
    if ARCHS[arch].post_norm:
        assert updates.pre_norm_vectors is not None
        assert_close(updates.head_vectors.sum(2), updates.pre_norm_vectors, 1e-12, "sum over heads")
        assert max_abs_diff(updates.pre_norm_vectors, updates.vectors) > 1e-3  # the norm matters
    else:
        assert updates.pre_norm_vectors is None
        assert_close(updates.head_vectors.sum(2), updates.vectors, 1e-12, "sum over heads")
    # the attention mass on the chunk, against an independent cached run
    beta = updates.chunk_attention
    assert bool((beta >= 0).all()) and bool((beta <= 1).all())
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        pattern = cache["pattern", layer][0]  # [head, query, key]
        expected = pattern[:, chunk.stop :, chunk.start : chunk.stop].sum(-1).T
        assert_close(beta[layer], expected, 1e-12, f"chunk attention, layer {layer}")
    # the chunk is really attended to (otherwise the updates would be vacuous)
    assert float(beta.max()) > 0.05
    assert float(updates.vectors.abs().max()) > 1e-2


@contextlib.contextmanager
def rotary_rows(model, positions: torch.Tensor):
    """Test-side position handling for rotary models: rows 0..T-1 of every block's rotary tables
    become the rows of ``positions``; the original tables are put back on exit."""
    saved = []
    try:
        for block in model.blocks:
            sin, cos = block.attn.rotary_sin, block.attn.rotary_cos
            saved.append((block.attn, sin, cos))
            new_sin, new_cos = sin.clone(), cos.clone()
            new_sin[: len(positions)] = sin[positions]
            new_cos[: len(positions)] = cos[positions]
            block.attn.rotary_sin, block.attn.rotary_cos = new_sin, new_cos
        yield
    finally:
        for attn, sin, cos in saved:
            attn.rotary_sin, attn.rotary_cos = sin, cos


def naive_reference(model, tokens: torch.Tensor, chunk: slice, method: str) -> dict:
    """A frozen, deliberately naive reference for THEORY 2: for each layer ``l``, re-run the reduced
    prompt with this reference's OWN vectors of layers ``< l`` added at ``hook_attn_out``, and take
    ``delta_l = full attn_out - reduced attn_out`` at the kept positions after the chunk.

    The reduced run keeps every token at its original position, in one of two independent ways:
    ``"masked"``: run the FULL-length prompt, but set the attention scores of every query after the
    chunk to -inf on the chunk's keys (so those queries never see it, at their natural positions);
    ``"reduced"``: run the short reduced prompt, with ``hook_pos_embed`` replaced by the ``W_pos`` rows
    of the original positions (learned) or the rotary tables' rows moved (rotary).

    Returns per layer the vectors, per-head vectors, the MLP's first pre-activation in the reduced
    run (``hook_pre``), and the logits of every run (index ``j``: vectors of layers ``< j`` added)
    at the kept positions.
    """
    cfg = model.cfg
    L, n = cfg.n_layers, tokens.shape[1]
    start, stop = chunk.start, chunk.stop
    kept = kept_positions(chunk, n)
    after = torch.arange(stop, n)
    if method == "masked":
        run_tokens, rows, all_rows = tokens, after, kept
    else:
        run_tokens, rows, all_rows = tokens[:, kept], torch.arange(start, len(kept)), torch.arange(len(kept))
    rotary = cfg.positional_embedding_type == "rotary"
    has_mlp = not cfg.attn_only

    _, full = model.run_with_cache(tokens)
    out = {"vectors": [], "head_vectors": [], "mlp_pre": [], "full_mlp_pre": [], "logits": []}

    def mask_chunk(scores, hook):
        scores = scores.clone()
        scores[:, :, stop:, start:stop] = float("-inf")
        return scores

    def original_positions(pos_embed, hook):
        return model.W_pos[kept][None].to(pos_embed.dtype)

    for j in range(L + 1):
        store = {}
        hooks = []
        if method == "masked":
            hooks += [(f"blocks.{l}.attn.hook_attn_scores", mask_chunk) for l in range(L)]
        elif not rotary:
            hooks.append(("hook_pos_embed", original_positions))
        for l in range(j):

            def add(act, hook, d=out["vectors"][l]):
                act = act.clone()
                act[0, rows] += d
                return act

            hooks.append((f"blocks.{l}.hook_attn_out", add))
        if j < L:
            names = [f"blocks.{j}.hook_attn_out", f"blocks.{j}.attn.hook_z"]
            if has_mlp:
                names.append(f"blocks.{j}.mlp.hook_pre")

            def save(act, hook):
                store[hook.name] = act[0].detach().clone()  # noqa: B023 (used in this iteration)

            hooks += [(name, save) for name in names]
        positions = rotary_rows(model, kept) if method == "reduced" and rotary else contextlib.nullcontext()
        with positions, torch.no_grad():
            logits = model.run_with_hooks(run_tokens, fwd_hooks=hooks)
        out["logits"].append(logits[0, all_rows])
        if j == L:
            break
        attn_out = store[f"blocks.{j}.hook_attn_out"]
        out["vectors"].append(full["attn_out", j][0, after] - attn_out[rows])
        z_diff = full["z", j][0, after] - store[f"blocks.{j}.attn.hook_z"][rows]  # [q, head, d_head]
        W_O = model.blocks[j].attn.W_O  # [head, d_head, d_model]
        per_head = torch.stack(
            [torch.stack([z_diff[q, h] @ W_O[h] for h in range(cfg.n_heads)]) for q in range(len(after))]
        )
        out["head_vectors"].append(per_head)
        if has_mlp:
            out["mlp_pre"].append(store[f"blocks.{j}.mlp.hook_pre"][rows])
            out["full_mlp_pre"].append(full["pre", j][0, after])
    return out


@pytest.mark.parametrize("method", ["masked", "reduced"])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_updates_match_naive_layer_by_layer_reference(tiny_model, arch, placement, method):
    model = tiny_model(arch)
    tokens, chunk = case_tokens(placement, 5, seed=1)
    snapshot = param_snapshot(model)
    updates = tt.implicit_updates(model, tokens, chunk)
    ref = naive_reference(model, tokens, chunk, method)
    L = model.cfg.n_layers
    for layer in range(L):
        assert_close(updates.vectors[layer], ref["vectors"][layer], EXACT, f"vectors[{layer}]")
        assert_close(
            updates.head_vectors[layer], ref["head_vectors"][layer], EXACT, f"head_vectors[{layer}]"
        )
        if model.cfg.attn_only:
            continue
        # the MLP inputs a (reduced run) and a_C (full run), through the MLP's first matrix
        mlp = model.blocks[layer].mlp
        first = mlp.W_gate if ARCHS[arch].gated else mlp.W_in
        bias = 0.0 if ARCHS[arch].gated else mlp.b_in
        assert_close(updates.mlp_in[layer] @ first + bias, ref["mlp_pre"][layer], EXACT, f"a[{layer}]")
        assert_close(
            updates.mlp_in_with_chunk[layer] @ first + bias,
            ref["full_mlp_pre"][layer],
            EXACT,
            f"a_C[{layer}]",
        )
    # the reference's own runs: unpatched = the library's reduced run (original positions), and
    # all vectors added = the full run
    report = tt.verify(model, updates, forms=("activation",))
    assert_close(report["unpatched"].logits, ref["logits"][0], EXACT, "unpatched logits")
    assert_close(ref["logits"][L], report.full_logits, EXACT, "reference fully patched logits")
    assert_model_untouched(model, snapshot)


def test_rotary_without_prefix_is_shift_invariant(tiny_model):
    """THEORY 1: with no prefix, a rotary model's reduced run may start at position 0."""
    model = tiny_model("rms_gated_silu_rotary_gqa")
    tokens, chunk = case_tokens("start", 5)
    report = tt.verify(model, tt.implicit_updates(model, tokens, chunk), forms=("activation",))
    with torch.no_grad():
        shifted = model(tokens[:, chunk.stop :])[0]
    assert_close(report["unpatched"].logits, shifted, 1e-10, "rotary shift invariance")


# --- 3. the virtual weight matrices (rank-1, token-wise) ----------------------------------------


@pytest.mark.parametrize("placement", ["start", "middle"])
@pytest.mark.parametrize("arch", MLP_ARCHITECTURES)
def test_rank1_matrices_map_reduced_input_to_full_input(tiny_model, arch, placement):
    model = tiny_model(arch)
    tokens, chunk = case_tokens(placement, 5)
    updates = tt.implicit_updates(model, tokens, chunk)
    cfg = model.cfg
    a, a_c = updates.mlp_in, updates.mlp_in_with_chunk
    for name in updates.mlp_input_matrices:
        keys, values = updates.matrix_factors(name)
        assert keys.shape == (cfg.n_layers, 5, cfg.d_model)
        assert values.shape == (cfg.n_layers, 5, cfg.d_mlp)
        for layer in range(cfg.n_layers):
            W = getattr(model.blocks[layer].mlp, name)
            # a @ (W + outer(k, v)) == a @ W + (a . k) v  ==  a_C @ W, at every kept token
            patched = a[layer] @ W + (a[layer] * keys[layer]).sum(-1, keepdim=True) * values[layer]
            assert_close(patched, a_c[layer] @ W, EXACT, f"{name} layer {layer}")
        factored = updates.matrices(name)
        AB = factored.AB
        assert AB.shape == (cfg.n_layers, 5, cfg.d_model, cfg.d_mlp)
        for layer, t in [(0, 0), (cfg.n_layers - 1, 4), (cfg.n_layers - 1, 2)]:
            W = getattr(model.blocks[layer].mlp, name)
            assert_close(a[layer, t] @ (W + AB[layer, t]), a_c[layer, t] @ W, EXACT, f"dense {name}")
            rank = int(torch.linalg.matrix_rank(AB[layer, t]))
            if ARCHS[arch].parallel:
                # parallel blocks: the chunk does not change the MLP input of its own layer
                assert torch.equal(a[layer], a_c[layer])
                assert rank == 0 and not bool(AB[layer, t].any())
            else:
                assert rank == 1
    with pytest.raises(ValueError):
        updates.matrix_factors("W_out")
    if not ARCHS[arch].gated:
        with pytest.raises(ValueError):
            updates.matrices("W_gate")


# --- 4. the exact weight patch ------------------------------------------------------------------


@pytest.mark.parametrize("n_after", N_AFTER.values(), ids=N_AFTER.keys())
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", PRE_NORM_ARCHITECTURES)
def test_exact_weight_patch_structure(tiny_model, arch, placement, n_after):
    model = tiny_model(arch)
    tokens, chunk = case_tokens(placement, n_after)
    snapshot = param_snapshot(model)
    updates = tt.implicit_updates(model, tokens, chunk)
    patch = tt.exact_weight_patch(model, updates)
    n = tokens.shape[1]
    kept = kept_positions(chunk, n)
    T = len(kept)
    L = model.cfg.n_layers
    assert patch.n_kept == T
    assert torch.equal(patch.kept_positions, kept)
    a = ARCHS[arch]
    input_names = () if a.attn_only else (("W_gate", "W_in") if a.gated else ("W_in",))
    if T == 1:  # one kept token and no prefix: rank-1 input patches plus the vector on a bias
        bias = "attn.b_O" if a.attn_only else "mlp.b_out"
        assert set(patch.biases) == {f"blocks.{l}.{bias}" for l in range(L)}
        for l in range(L):
            assert_close(patch.biases[f"blocks.{l}.{bias}"], updates.vectors[l, 0], 0.0, "bias")
        expected = set() if a.parallel else {f"blocks.{l}.mlp.{w}" for l in range(L) for w in input_names}
        assert set(patch.matrices) == expected
        assert patch.description.startswith("rank-1") or patch.description == "b_O"
        assert ("b_out" in patch.description) != a.attn_only
    else:  # a prefix or several kept tokens: min-norm patches, vectors folded into W_out / W_O
        assert patch.biases == {}
        out_name = "attn.W_O" if a.attn_only else "mlp.W_out"
        expected = {f"blocks.{l}.{out_name}" for l in range(L)}
        if not a.parallel:
            expected |= {f"blocks.{l}.mlp.{w}" for l in range(L) for w in input_names}
        assert set(patch.matrices) == expected
        assert f"min-norm rank<={T}" in patch.description
        for name, delta in patch.matrices.items():
            rank = int(torch.linalg.matrix_rank(delta.AB))
            assert 1 <= rank <= T, f"{name}: rank {rank}"
        if not a.attn_only:
            # the W_out patch maps each kept token's full-run hidden row to its vector (zero in the
            # prefix)
            _, cache = model.run_with_cache(tokens)
            for l in range(L):
                hidden = cache["post", l][0, kept]
                target = torch.cat([updates.vectors.new_zeros(chunk.start, model.cfg.d_model), updates.vectors[l]])
                assert_close(hidden @ patch.matrices[f"blocks.{l}.mlp.W_out"].AB, target, EXACT, "W_out")
    _check_dense_parameters(model, patch)
    assert_model_untouched(model, snapshot)


def _check_dense_parameters(model, patch) -> None:
    """Dense parameters: original + delta, same shapes and dtypes, every one really changed."""
    params = dict(model.named_parameters())
    dense = patch.parameters(model)
    assert set(dense) == set(patch.matrices) | set(patch.biases) | set(patch.scales)
    for name, value in dense.items():
        assert value.shape == params[name].shape and value.dtype == params[name].dtype
        assert not torch.equal(value, params[name]), name


@pytest.mark.parametrize("n_after", N_AFTER.values(), ids=N_AFTER.keys())
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", POST_NORM_ARCHITECTURES)
def test_post_norm_weight_patch_structure(tiny_model, arch, placement, n_after):
    """Blocks with norms after their sublayers (THEORY 3, after Goldwaser et al.): with one kept
    token, rank-1 MLP input patches, a rank-1 ``W_out`` patch adding ``c * vector / w`` to the MLP
    output and one common factor of the post-MLP norm's scale; with several, the minimum-norm
    ``W_O`` patch mapping each kept token's reduced head outputs to the change of the attention
    output before its norm."""
    model = tiny_model(arch)
    a = ARCHS[arch]
    tokens, chunk = case_tokens(placement, n_after)
    snapshot = param_snapshot(model)
    updates = tt.implicit_updates(model, tokens, chunk)
    patch = tt.exact_weight_patch(model, updates)
    kept = kept_positions(chunk, tokens.shape[1])
    T, L = len(kept), model.cfg.n_layers
    post_mlp = "ln2" if "olmo2" in arch else "ln2_post"
    _, cache = model.run_with_cache(tokens)
    if T == 1 and not a.attn_only:
        inputs = ("W_gate", "W_in", "W_out") if a.gated else ("W_in", "W_out")
        assert set(patch.matrices) == {f"blocks.{l}.mlp.{w}" for l in range(L) for w in inputs}
        assert set(patch.scales) == {f"blocks.{l}.{post_mlp}.w" for l in range(L)} and not patch.biases
        assert "post-norm" in patch.description
        for l in range(L):
            w = model.get_parameter(f"blocks.{l}.{post_mlp}.w").detach()
            dw = patch.scales[f"blocks.{l}.{post_mlp}.w"]
            assert_close(dw / w, (dw / w)[0].expand_as(w), EXACT, "one common factor of the scale")
            scale = cache[f"blocks.{l}.{post_mlp}.hook_scale"][0, kept[0]]  # [1]
            dW_out = patch.matrices[f"blocks.{l}.mlp.W_out"].AB
            assert int(torch.linalg.matrix_rank(dW_out)) == 1
            hidden = cache["post", l][0, kept[0]]
            assert_close(hidden @ dW_out, scale * updates.vectors[l, 0] / w, EXACT, "W_out carries c * vector / w")
    elif T == 1:
        assert set(patch.biases) == {f"blocks.{l}.attn.b_O" for l in range(L)} and not patch.matrices
        for l in range(L):
            assert_close(patch.biases[f"blocks.{l}.attn.b_O"], updates.pre_norm_vectors[l, 0], 0.0, "b_O")
    else:
        assert set(patch.matrices) == {f"blocks.{l}.attn.W_O" for l in range(L)}
        assert not patch.biases and not patch.scales
        assert f"min-norm rank<={T} W_O" in patch.description
        for l in range(L):
            dW = patch.matrices[f"blocks.{l}.attn.W_O"].AB  # [head*d_head, d_model]
            assert 1 <= int(torch.linalg.matrix_rank(dW)) <= T
            # prefix rows: the full run's head outputs, mapped to zero
            z_prefix = cache["z", l][0, : chunk.start].flatten(1)
            assert_close(z_prefix @ dW, torch.zeros(chunk.start, model.cfg.d_model, dtype=dW.dtype), EXACT, "prefix")
    _check_dense_parameters(model, patch)
    report = tt.verify(model, updates, forms=("weight",))
    assert report.max_abs_logit_error <= EXACT and report["unpatched"].max_abs_logit_error > 1e-2
    assert_model_untouched(model, snapshot)


def test_post_norm_patch_refuses_a_dead_coordinate(fresh_model):
    """The output-side patch divides by the post-MLP norm's weight ``w``, and by the MLP output
    where ``w`` is zero: a coordinate where both are zero raises (no epsilon), and the model is
    left untouched."""
    model = fresh_model("rms_gated_gelu_rotary_gqa_prepost")
    with torch.no_grad():  # coordinate 3 after the MLP's norm is dead: zero weight, zero MLP output
        model.blocks[1].mlp.W_out[:, 3] = 0.0
        model.blocks[1].mlp.b_out[3] = 0.0
        model.blocks[1].ln2_post.w[3] = 0.0
    snapshot = param_snapshot(model)
    tokens, chunk = case_tokens("start", 1)
    updates = tt.implicit_updates(model, tokens, chunk)
    with pytest.raises(tt.ZeroDenominatorError, match="blocks.1.ln2_post.w: coordinate 3"):
        tt.exact_weight_patch(model, updates)
    assert tt.verify(model, updates, forms=("activation",)).max_abs_logit_error <= EXACT
    assert_model_untouched(model, snapshot)


@pytest.mark.parametrize("dead", ["weight", "output"])
def test_post_norm_patch_exact_with_a_zero_weight_or_output(fresh_model, dead):
    """A zero coordinate of the post-MLP norm's weight (real Gemma 3 270M has some) is carried by
    the scale there (Goldwaser et al.'s element-wise patch); a zero coordinate of the MLP output
    alone needs no division by it. Both exact."""
    model = fresh_model("rms_gated_gelu_rotary_gqa_prepost")
    with torch.no_grad():
        if dead == "weight":
            model.blocks[1].ln2_post.w[3] = 0.0
        else:
            model.blocks[1].mlp.W_out[:, 3] = 0.0
            model.blocks[1].mlp.b_out[3] = 0.0
    tokens, chunk = case_tokens("start", 1)
    updates = tt.implicit_updates(model, tokens, chunk)
    assert float(updates.vectors[1, 0, 3].abs()) > 1e-3  # the vector is not zero there
    report = tt.verify(model, updates, forms=("weight",))
    assert report.max_abs_logit_error <= EXACT and "post-norm" in report.weight_form


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_gated_silu_rotary_gqa", "rmspre_attn_only_rotary"])
def test_patch_applied_reproduces_and_restores(tiny_model, arch):
    model = tiny_model(arch)
    tokens, chunk = case_tokens("middle", 5)
    kept = kept_positions(chunk, tokens.shape[1])
    snapshot = param_snapshot(model)
    updates = tt.implicit_updates(model, tokens, chunk)
    patch = tt.exact_weight_patch(model, updates)
    with torch.no_grad():
        full = model(tokens)[0, kept]
    with patch.applied(model) as patched:
        assert patched is model
        some = next(iter(patch.matrices))
        assert not torch.equal(dict(model.named_parameters())[some], snapshot[f"param:{some}"])
        with torch.no_grad():
            reduced = model(tokens[:, kept])[0]
    assert_close(reduced, full, EXACT, "patched weights, plain call")
    assert_model_untouched(model, snapshot)

    # restored also when the body raises
    with pytest.raises(RuntimeError, match="boom"):
        with patch.applied(model):
            assert not torch.equal(dict(model.named_parameters())[some], snapshot[f"param:{some}"])
            raise RuntimeError("boom")
    assert_model_untouched(model, snapshot)


# --- 5. repeated tokens: the weight form must be exact, or refuse -----------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_repeated_tokens_weight_form_exact_or_raises(tiny_model, arch):
    """Real prompts repeat tokens. The activation form is always exact; the weight form must be
    exact or raise ZeroDenominatorError ("never silently inexact"). In a rotary model with parallel
    blocks, a token repeated among the kept positions gives identical MLP inputs at layer 0, so the
    W_out rows are linearly dependent and no exact patch exists: it must raise there."""
    model = tiny_model(arch)
    snapshot = param_snapshot(model)
    tokens = torch.tensor([[7, 29, 47, 48, 1, 24, 16, 7, 47, 4]])  # 7 and 47 repeat
    updates = tt.implicit_updates(model, tokens, slice(1, 5))
    assert tt.verify(model, updates, forms=("activation",)).max_abs_logit_error <= EXACT
    try:
        report = tt.verify(model, updates, forms=("weight",))
    except tt.ZeroDenominatorError:
        pass
    else:
        assert report.max_abs_logit_error <= 1e-8, (
            f"weight form silently inexact: {report.max_abs_logit_error:.3e} ({report.weight_form})"
        )
    assert_model_untouched(model, snapshot)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_weight_patch_description_names_what_is_patched(tiny_model, arch):
    """``ExactWeightPatch.description`` ("a short human-readable summary of the form used") names
    exactly the parameter families in ``matrices`` and ``biases``."""
    model = tiny_model(arch)
    for placement, n_after in (("start", 1), ("middle", 5)):
        tokens, chunk = case_tokens(placement, n_after)
        patch = tt.exact_weight_patch(model, tt.implicit_updates(model, tokens, chunk))
        patched = {name.rsplit(".", 1)[1] for name in [*patch.matrices, *patch.biases]}
        patched |= {name.split(".")[2] + ".w" for name in patch.scales}  # e.g. "ln2_post.w"
        for family in ("W_in", "W_gate", "W_out", "b_out", "W_O", "b_O", "ln2_post.w", "ln2.w"):
            assert (family in patch.description) == (family in patched), (
                f"{placement}: description {patch.description!r}, patched {sorted(patched)}"
            )


OTHER_FLAGS = {
    "split_qkv_attn_result_hook_mlp_in": (
        "rms_gated_silu_rotary_gqa",
        dict(use_split_qkv_input=True, use_attn_result=True, use_hook_mlp_in=True, use_hook_tokens=True),
    ),
    "attn_in": ("ln_gelu_learned", dict(use_attn_in=True)),
    "soft_caps": ("rms_gated_silu_rotary_gqa", dict(attn_scores_soft_cap=5.0, output_logits_soft_cap=10.0)),
    "qk_norm": ("rms_gated_silu_rotary_gqa", dict(use_qk_norm=True)),
    "rotary_adjacent_pairs": ("ln_gated_gelu_rotary_mqa", dict(rotary_adjacent_pairs=True)),
    "post_embedding_ln": ("ln_gelu_learned", dict(post_embedding_ln=True)),
    "ungrouped_gqa": ("rms_gated_silu_rotary_gqa", dict(ungroup_grouped_query_attention=True)),
    "no_normalization": ("rms_silu_learned", dict(normalization_type=None)),
}


@pytest.mark.parametrize("arch, overrides", OTHER_FLAGS.values(), ids=OTHER_FLAGS.keys())
def test_equivalence_with_other_config_flags(fresh_model, arch, overrides):
    """Config flags that change hook layout or add per-token operations keep the construction
    exact."""
    model = fresh_model(arch, **overrides)
    snapshot = param_snapshot(model)
    tokens, chunk = case_tokens("middle", 5)
    report = tt.verify(model, tt.implicit_updates(model, tokens, chunk))
    assert report["unpatched"].max_abs_logit_error > 1e-2
    assert report.max_abs_logit_error <= EXACT
    assert report.argmax_agreement == 1.0
    assert_model_untouched(model, snapshot)
