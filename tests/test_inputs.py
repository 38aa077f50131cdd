"""Nothing silently wrong (issue 33): inputs that used to give wrong results, or a crash inside torch,
without a word are refused by the library, saying what was found and how to fix it.

- a text prompt longer than ``n_ctx`` (TransformerLens cuts it to ``n_ctx`` tokens by default);
- raw torch forward hooks or pre-hooks on any submodule, or global ones (they changed the runs the
  equivalence compares, with no error);
- parameters whose dtype disagrees with ``model.cfg.dtype`` (``model.half()``), or mixed dtypes.

After every refusal the model is as the user left it (their hooks too)."""

import ast
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_model_untouched,
    make_model,
    make_word_tokenizer,
    param_snapshot,
    random_tokens,
)

import tl_thoughts as tt
from tl_thoughts import _tl, analysis
from tl_thoughts.stream import prompt_rows

EXACT = 1e-10
LONG = " ".join(["the cat sat on the mat ."] * 12)  # 84 tokens of the word tokenizer; n_ctx is 64
TEMPLATE = tt.PromptTemplate("{chunk}{query}", separator="")


@pytest.fixture(scope="module")
def text_model():
    return make_model("ln_gelu_learned", tokenizer=make_word_tokenizer())


# --- text longer than the context -----------------------------------------------------------------


def _numbers(message: str) -> set[int]:
    return {int(n) for n in re.findall(r"\d+", message)}


def test_long_text_prompt_is_refused_with_both_lengths(text_model):
    """TransformerLens would cut the 84-token prompt to 64 tokens, silently (a chunk in the lost
    tail was then "not found"); the library refuses it, naming both lengths."""
    n = text_model.to_tokens(LONG, truncate=False).shape[1]
    assert n == 84 and text_model.cfg.n_ctx == 64 and text_model.to_tokens(LONG).shape[1] == 64
    snapshot = param_snapshot(text_model)
    for chunk in (slice(2, 5), "cat sat on the mat . the cat sat on the mat . the cat sat on the mat . the cat sat"):
        with pytest.raises(tt.InputError, match="n_ctx") as info:
            tt.implicit_updates(text_model, LONG, chunk)
        assert {84, 64} <= _numbers(str(info.value)), str(info.value)
    with pytest.raises(tt.InputError, match="prompt 1") as info:
        tt.implicit_updates_batch(text_model, ["the cat sat on the mat", LONG], slice(1, 3))
    assert {84, 64} <= _numbers(str(info.value))
    assert_model_untouched(text_model, snapshot)


def test_long_fit_example_is_refused_with_both_lengths(text_model):
    """A fit example (chunk + query + answer) longer than the context: refused, not cut."""
    snapshot = param_snapshot(text_model)
    with pytest.raises(tt.InputError, match="n_ctx") as info:
        tt.fit_thought(text_model, "the cat", [(" sat", " " + LONG)], template=TEMPLATE, progress=False)
    message = str(info.value)
    assert "example" in message and {64} <= _numbers(message) and any(n > 64 for n in _numbers(message))
    assert_model_untouched(text_model, snapshot)


def test_text_of_exactly_n_ctx_tokens_is_accepted(text_model):
    text = " ".join(LONG.split()[:64])
    tokens = _tl.to_tokens(text_model, text)
    assert tokens.shape == (1, 64)
    updates = tt.implicit_updates(text_model, text, slice(2, 5))
    assert updates.tokens.shape == (1, 64) and torch.equal(updates.tokens, tokens)
    with pytest.raises(tt.InputError, match="65 tokens"):
        tt.implicit_updates(text_model, text + " cat", slice(2, 5))


def test_the_library_tokenizes_text_in_one_place():
    """Every tokenization of text in the library goes through ``_tl.to_tokens`` (never truncated):
    no other module calls ``.to_tokens(`` or a tokenizer directly."""
    package = Path(tt.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        rel = str(path.relative_to(package))
        if rel == "_tl.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                direct = node.func.attr == "to_tokens" and not (isinstance(owner, ast.Name) and owner.id == "_tl")
                tokenizer_call = node.func.attr in ("encode", "__call__") and isinstance(owner, ast.Attribute) \
                    and owner.attr == "tokenizer"
                if direct or tokenizer_call:
                    offenders.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "tokenizer":
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []


# --- raw torch hooks ------------------------------------------------------------------------------


def _scale(module, args, output):
    return output * 2


def _shift_query(module, args, kwargs):
    return args, {**kwargs, "query_input": kwargs["query_input"] + 1.0}


def _entry_points(tokens):
    """Every entry point that must refuse a hooked model: name -> call."""
    clean = {}  # computed before the hooks go on
    return {
        "implicit_updates": lambda m: tt.implicit_updates(m, tokens, slice(2, 5)),
        "implicit_updates_batch": lambda m: tt.implicit_updates_batch(m, [tokens[0], tokens[0, :8]], slice(2, 5)),
        "verify": lambda m: tt.verify(m, clean["updates"]),
        "exact_weight_patch": lambda m: tt.exact_weight_patch(m, clean["updates"]),
        "direct_effect": lambda m: analysis.direct_effect(m, clean["updates"], answer_tokens=(3, 4)),
        "layer_recovery": lambda m: analysis.layer_recovery(m, clean["updates"], answer_tokens=(3, 4)),
    }, clean


def test_raw_torch_hooks_are_refused_by_every_entry_point():
    """A forward hook on ``blocks.1.mlp`` and a pre-hook on ``blocks.0.attn``: refused with the
    modules and the hook kinds named, the hooks left in place; the model runs clean once they are
    removed."""
    model = make_model("ln_gelu_learned")
    tokens = random_tokens(10)
    calls, clean = _entry_points(tokens)
    clean["updates"] = tt.implicit_updates(model, tokens, slice(2, 5))
    snapshot = param_snapshot(model)
    handles = [model.blocks[1].mlp.register_forward_hook(_scale),
               model.blocks[0].attn.register_forward_pre_hook(_shift_query, with_kwargs=True)]
    for name, call in calls.items():
        with pytest.raises(tt.InputError) as info:
            call(model)
        message = str(info.value)
        assert "blocks.1.mlp (forward hook)" in message and "blocks.0.attn (forward pre-hook)" in message, name
        assert ".remove()" in message, name
    assert len(model.blocks[1].mlp._forward_hooks) == 1 and len(model.blocks[0].attn._forward_pre_hooks) == 1
    with torch.no_grad():  # the hooks were live: they change the logits
        hooked_logits = model(tokens)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        assert float((model(tokens) - hooked_logits).abs().max()) > 1e-2
    assert tt.verify(model, tt.implicit_updates(model, tokens, slice(2, 5))).max_abs_logit_error <= EXACT
    assert_model_untouched(model, snapshot)


def test_raw_hooks_are_refused_by_the_fitting_entry_points(text_model):
    pairs = [(" sat on", " the mat"), (" ran on", " a mat")]
    patch = tt.fit_thought(text_model, "the cat", pairs, template=TEMPLATE, progress=False)
    handle = text_model.blocks[1].mlp.register_forward_hook(_scale)
    try:
        for call in (lambda: tt.fit_thought(text_model, "the cat", pairs, template=TEMPLATE, progress=False),
                     lambda: tt.fit_thoughts(text_model, "the cat", pairs, template=TEMPLATE, progress=False),
                     lambda: tt.refine_thought(text_model, patch, pairs, steps=1, progress=False),
                     lambda: prompt_rows(text_model, "the cat", pairs, template=TEMPLATE)):
            with pytest.raises(tt.InputError, match=re.escape("blocks.1.mlp (forward hook)")):
                call()
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["forward_with_kwargs", "pre_with_kwargs", "on_a_hook_point", "global_forward",
                                  "global_pre", "on_the_model"])
def test_every_kind_of_raw_forward_hook_is_refused(kind):
    model = make_model("ln_gelu_learned")
    tokens = random_tokens(10)
    module_api = torch.nn.modules.module
    register = {
        "forward_with_kwargs": lambda: model.blocks[0].mlp.register_forward_hook(
            lambda m, args, kwargs, out: out, with_kwargs=True),
        "pre_with_kwargs": lambda: model.blocks[1].ln1.register_forward_pre_hook(
            lambda m, args, kwargs: None, with_kwargs=True),
        "on_a_hook_point": lambda: model.hook_dict["blocks.0.hook_attn_out"].register_forward_hook(lambda m, i, o: o),
        "global_forward": lambda: module_api.register_module_forward_hook(lambda m, i, o: None),
        "global_pre": lambda: module_api.register_module_forward_pre_hook(lambda m, i: None),
        "on_the_model": lambda: model.register_forward_pre_hook(lambda m, i: None),
    }[kind]
    expected = {
        "forward_with_kwargs": "blocks.0.mlp (forward hook)",
        "pre_with_kwargs": "blocks.1.ln1 (forward pre-hook)",
        "on_a_hook_point": "blocks.0.hook_attn_out (forward hook)",
        "global_forward": "global forward hook",
        "global_pre": "global forward pre-hook",
        "on_the_model": "the model itself (forward pre-hook)",
    }[kind]
    handle = register()
    try:
        with pytest.raises(tt.InputError, match=re.escape(expected)):
            tt.implicit_updates(model, tokens, slice(2, 5))
    finally:
        handle.remove()
    assert _tl.raw_torch_hooks(model) == []
    tt.implicit_updates(model, tokens, slice(2, 5))


def test_transformer_lens_hooks_are_not_reported_as_raw():
    """A TransformerLens hook registers a torch hook on its hook point: it is reported as the
    TransformerLens hook it is (removed by ``reset_hooks``), not as a raw one."""
    model = make_model("ln_gelu_learned")
    model.add_hook("blocks.0.hook_attn_out", lambda act, hook: None)
    assert _tl.raw_torch_hooks(model) == []
    with pytest.raises(tt.InputError) as info:
        tt.implicit_updates(model, random_tokens(10), slice(2, 5))
    assert "TransformerLens hooks attached at blocks.0.hook_attn_out" in str(info.value)
    assert "raw torch hooks" not in str(info.value)
    raw = model.hook_dict["blocks.0.hook_attn_out"].register_forward_hook(lambda m, i, o: o)
    with pytest.raises(tt.InputError) as info:
        tt.implicit_updates(model, random_tokens(10), slice(2, 5))
    assert "TransformerLens hooks" in str(info.value) and "raw torch hooks on blocks.0.hook_attn_out" in str(info.value)
    raw.remove()
    model.reset_hooks()
    tt.implicit_updates(model, random_tokens(10), slice(2, 5))


# --- stale and mixed dtypes -------------------------------------------------------------------------


def test_half_with_a_stale_config_is_refused_and_the_consistent_models_run():
    """``model.half()`` converts the parameters and leaves ``cfg.dtype`` at float32: the library
    used to crash inside torch ("mat1 and mat2 must have the same dtype"); now it says what it
    found and how to fix it. Fixed as it says (the config set), the half model runs, computed in
    float32 with a PrecisionWarning."""
    model = make_model("ln_gelu_learned", dtype=torch.float32)
    tokens = random_tokens(10)
    model.half()
    assert model.cfg.dtype == torch.float32 and model.W_in.dtype == torch.float16
    snapshot = param_snapshot(model)
    for call in (lambda: tt.implicit_updates(model, tokens, slice(2, 5)),
                 lambda: tt.implicit_updates_batch(model, [tokens[0]], slice(2, 5))):
        with pytest.raises(tt.InputError) as info:
            call()
        message = str(info.value)
        assert "parameters are float16" in message and "model.cfg.dtype is float32" in message
        assert "model.cfg.dtype = torch.float16" in message and "computing_in" in message
    assert_model_untouched(model, snapshot)
    assert model.cfg.dtype == torch.float32
    # computing_in converts a stale model too: inside, parameters and config agree
    with tt.computing_in(model, torch.float32):
        inside = tt.implicit_updates(model, tokens, slice(2, 5))
        assert tt.verify(model, inside).max_abs_logit_error <= 1e-4
    assert model.cfg.dtype == torch.float32
    assert_model_untouched(model, snapshot)
    model.cfg.dtype = torch.float16  # the fix the message gives
    with pytest.warns(tt.PrecisionWarning):
        updates = tt.implicit_updates(model, tokens, slice(2, 5))
    assert updates.dtype == torch.float32 and tt.verify(model, updates).max_abs_logit_error <= 1e-2


def test_double_with_a_stale_config_is_refused_and_to_float64_runs():
    """``model.double()`` leaves the config too; ``model.to(torch.float64)`` updates it
    (TransformerLens), and that model is exact in float64."""
    stale = make_model("ln_gelu_learned", dtype=torch.float32).double()
    with pytest.raises(tt.InputError, match="parameters are float64 but model.cfg.dtype is float32"):
        tt.implicit_updates(stale, random_tokens(10), slice(2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moved = make_model("ln_gelu_learned", dtype=torch.float32).to(torch.float64)
    assert moved.cfg.dtype == torch.float64
    updates = tt.implicit_updates(moved, random_tokens(10), slice(2, 5))
    assert updates.dtype == torch.float64 and tt.verify(moved, updates).max_abs_logit_error <= EXACT


def test_mixed_parameter_dtypes_are_refused(text_model):
    model = make_model("ln_gelu_learned", dtype=torch.float32)
    model.blocks[1].half()
    with pytest.raises(tt.InputError, match="mixed dtypes") as info:
        tt.implicit_updates(model, random_tokens(10), slice(2, 5))
    assert "float16 (e.g. blocks.1." in str(info.value) and "float32 (e.g. " in str(info.value)
    stale_text = make_model("ln_gelu_learned", dtype=torch.float32, tokenizer=make_word_tokenizer()).half()
    with pytest.raises(tt.InputError, match="model.cfg.dtype is float32"):
        tt.fit_thought(stale_text, "the cat", [(" sat", " on")], template=TEMPLATE, progress=False)


def test_generation_under_raw_torch_hooks_runs_whole_sequences():
    """``greedy_generate`` decodes through a key-value cache (one new position a step) unless hooks
    are attached; a raw torch hook counts as one, so it sees the whole sequence at every step, as
    it would in a plain forward pass."""
    from tl_thoughts.evaluation import greedy_generate

    model = make_model("ln_gelu_learned", tokenizer=make_word_tokenizer())
    seen: list[int] = []
    handle = model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    try:
        greedy_generate(model, "the cat sat on", max_new_tokens=3, stop_at_newline=False)
    finally:
        handle.remove()
    n = len(_tl.to_tokens(model, "the cat sat on")[0])
    assert seen == [n, n + 1, n + 2]
    seen.clear()
    greedy_generate(model, "the cat sat on", max_new_tokens=3, stop_at_newline=False)
    assert seen == []  # removed: no hook, the cached path (and nothing recorded)


def test_generating_several_prompts_gives_each_prompt_its_own_continuation():
    """``greedy_generate_all`` (batched by length, the shared first tokens cached) gives every
    prompt what ``greedy_generate`` gives it alone, with and without hooks attached."""
    from tl_thoughts.evaluation import greedy_generate, greedy_generate_all

    model = make_model("ln_gelu_learned", tokenizer=make_word_tokenizer())
    prompts = ["the cat sat on", "the cat sat on the mat and", "a big red hat", "the dog"]
    together = greedy_generate_all(model, prompts, max_new_tokens=4, stop_at_newline=False)
    assert together == [greedy_generate(model, p, max_new_tokens=4, stop_at_newline=False) for p in prompts]
    assert len(set(together)) > 1  # the continuations differ: a mix-up of rows would show
    model.add_hook("blocks.0.hook_attn_out", lambda act, hook: act * 1.5)
    try:
        hooked = greedy_generate_all(model, prompts, max_new_tokens=4, stop_at_newline=False)
        assert hooked == [greedy_generate(model, p, max_new_tokens=4, stop_at_newline=False) for p in prompts]
    finally:
        model.reset_hooks()
