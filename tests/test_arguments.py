"""Errors a caller can cause are the library's own (issue 33): every bad argument of a public
function raises a ``TLThoughtsError`` subclass at the boundary, whose message names the argument
(not "cannot unpack non-iterable int object" from deep inside), and the model is left untouched.

One row per case: the call, the error class expected, a word the message must contain. The rows
run with the runtime type checks off (as users run the library: its own checks must fire), and
again with them on (then beartype's ``TypeCheckError`` is accepted where an annotation refuses the
argument first; nothing else)."""

import ast
import math
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_model_untouched,
    make_model,
    make_word_tokenizer,
    param_snapshot,
    random_tokens,
    runtime_checks_off,
)
from jaxtyping import TypeCheckError

import tl_thoughts as tt
from tl_thoughts import analysis
from tl_thoughts.stream import prompt_rows
from tl_thoughts.tasks import DATA, TaskFormatError, load_task, task_from_dict
from tl_thoughts.thoughts import ridge_solve
from tl_thoughts.prompts import DEFAULT_CASE, chat_prompt

NAN, INF = math.nan, math.inf
TEMPLATE = tt.PromptTemplate("{chunk}{query}", separator="")
PAIRS = [(" sat on", " the mat"), (" ran on", " a mat")]
LONG = " ".join(["the cat sat on the mat ."] * 12)  # 84 tokens; n_ctx is 64


class Ctx:
    """What the calls need, built once."""

    def __init__(self) -> None:
        self.model = make_model("ln_gelu_learned")
        self.text = make_model("ln_gelu_learned", tokenizer=make_word_tokenizer())
        self.tokens = random_tokens(10)
        self.updates = tt.implicit_updates(self.model, self.tokens, slice(2, 5))
        self.patch = tt.fit_thought(self.text, "the cat", PAIRS, template=TEMPLATE, progress=False)


@pytest.fixture(scope="module")
def ctx():
    return Ctx()


def fit(c, chunk="the cat", examples=PAIRS, config=None, **kw):
    return tt.fit_thought(c.text, chunk, examples, config, progress=False, **kw)


def refine(c, examples=PAIRS, **kw):
    return tt.refine_thought(c.text, kw.pop("patch", c.patch), examples, progress=False, **kw)


IE, ATE = tt.InputError, tt.ArgumentTypeError

# id: (call, error class, a word the message contains)
CASES = {
    # implicit_updates
    "model is not a HookedTransformer": (lambda c: tt.implicit_updates(5, c.tokens, slice(2, 5)), ATE, "model"),
    "tokens an int": (lambda c: tt.implicit_updates(c.model, 5, slice(2, 5)), ATE, "tokens"),
    "tokens None": (lambda c: tt.implicit_updates(c.model, None, slice(2, 5)), ATE, "tokens"),
    "layers an int": (lambda c: tt.implicit_updates(c.model, c.tokens, slice(2, 5), layers=3), IE, "layers"),
    "positions floats": (lambda c: tt.implicit_updates(c.model, c.tokens, slice(2, 5), positions=[7.0]), IE, "positions"),
    "dtype int64": (lambda c: tt.implicit_updates(c.model, c.tokens, slice(2, 5), dtype=torch.int64), IE, "dtype"),
    "dtype a string": (lambda c: tt.implicit_updates(c.model, c.tokens, slice(2, 5), dtype="float64"), IE, "dtype"),
    "text prompt longer than n_ctx": (lambda c: tt.implicit_updates(c.text, LONG, slice(2, 5)), IE, "n_ctx"),
    "chunk None": (lambda c: tt.implicit_updates(c.model, c.tokens, None), tt.ChunkError, "chunk"),
    # implicit_updates_batch
    "prompts an int": (lambda c: tt.implicit_updates_batch(c.model, 5, slice(2, 5)), ATE, "prompts"),
    "prompts a list of ints": (lambda c: tt.implicit_updates_batch(c.model, [5, 6], slice(2, 5)), ATE, "prompt 0"),
    "prompts empty": (lambda c: tt.implicit_updates_batch(c.model, [], slice(2, 5)), IE, "prompts"),
    "padding_side unknown": (lambda c: tt.implicit_updates_batch(c.model, [c.tokens[0]], slice(2, 5), padding_side="middle"), IE, "padding_side"),
    "chunks an int": (lambda c: tt.implicit_updates_batch(c.model, [c.tokens[0]], 5), IE, "chunks"),
    # ImplicitUpdates
    "matrices of an unknown name": (lambda c: c.updates.matrices("W_out"), IE, "name"),
    # fit_thought
    "examples an int": (lambda c: fit(c, examples=5), ATE, "examples"),
    "examples None": (lambda c: fit(c, examples=None), ATE, "examples"),
    "examples one string": (lambda c: fit(c, examples="cat"), ATE, "examples"),
    "examples empty": (lambda c: fit(c, examples=[]), IE, "examples"),
    "examples ints": (lambda c: fit(c, examples=[1, 2]), ATE, "examples[0]"),
    "example a 1-tuple": (lambda c: fit(c, examples=[(" sat",)]), ATE, "examples[0]"),
    "example answer an int": (lambda c: fit(c, examples=[PAIRS[0], (" sat", 5)]), ATE, "examples[1]"),
    "chunk an int": (lambda c: fit(c, chunk=5), ATE, "chunk"),
    "chunk empty": (lambda c: fit(c, chunk=""), IE, "chunk"),
    "config a string": (lambda c: fit(c, config="paper"), ATE, "config"),
    "template a string": (lambda c: fit(c, template="{chunk}{query}"), ATE, "template"),
    "rows an int": (lambda c: fit(c, rows=5), ATE, "rows"),
    "fit example longer than n_ctx": (lambda c: fit(c, examples=[(" sat", " " + LONG)], template=TEMPLATE), IE, "n_ctx"),
    # FitConfig
    "ridge nan": (lambda c: tt.FitConfig(ridge=NAN), IE, "ridge"),
    "ridge inf": (lambda c: tt.FitConfig(ridge=INF), IE, "ridge"),
    "ridge negative": (lambda c: tt.FitConfig(ridge=-1.0), IE, "ridge"),
    "ridge a string": (lambda c: tt.FitConfig(ridge="0.1"), ATE, "ridge"),
    "query_weight nan": (lambda c: tt.FitConfig(query_weight=NAN), IE, "query_weight"),
    "batch_size 0": (lambda c: tt.FitConfig(batch_size=0), IE, "batch_size"),
    "batch_size a float": (lambda c: tt.FitConfig(batch_size=2.0), ATE, "batch_size"),
    "layers an int (FitConfig)": (lambda c: tt.FitConfig(layers=5), ATE, "layers"),
    "layers negative": (lambda c: tt.FitConfig(layers=(-1,)), IE, "layers"),
    "fit unknown": (lambda c: tt.FitConfig(fit="vectors"), IE, "fit"),
    "attention_matrix an int": (lambda c: tt.FitConfig(attention_matrix=1), IE, "attention_matrix"),
    "preset unknown": (lambda c: tt.FitConfig.preset("nope"), IE, "preset"),
    "preset with an unknown option": (lambda c: tt.FitConfig.preset("paper", rigde=1.0), ATE, "rigde"),
    "replace with an unknown option": (lambda c: tt.FitConfig().replace(pol="answer"), ATE, "pol"),
    # fit_thoughts
    "fits a string": (lambda c: tt.fit_thoughts(c.text, "the cat", PAIRS, fits="vector", progress=False), ATE, "fits"),
    "fits an int": (lambda c: tt.fit_thoughts(c.text, "the cat", PAIRS, fits=5, progress=False), ATE, "fits"),
    "fits repeated": (lambda c: tt.fit_thoughts(c.text, "the cat", PAIRS, fits=["vector", "vector"], progress=False), IE, "fits"),
    "fits unknown": (lambda c: tt.fit_thoughts(c.text, "the cat", PAIRS, fits=["vectors"], progress=False), IE, "fits"),
    # ridge_solve
    "ridge_solve ridge inf": (lambda c: ridge_solve(torch.eye(2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64), INF, 2), IE, "ridge"),
    "ridge_solve ridge nan": (lambda c: ridge_solve(torch.eye(2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64), NAN, 2), IE, "ridge"),
    # refine_thought
    "steps negative": (lambda c: refine(c, steps=-1), IE, "steps"),
    "steps a float": (lambda c: refine(c, steps=1.5), ATE, "steps"),
    "lr inf": (lambda c: refine(c, lr=INF), IE, "lr"),
    "lr nan": (lambda c: refine(c, lr=NAN), IE, "lr"),
    "lr 0": (lambda c: refine(c, lr=0.0), IE, "lr"),
    "refine batch_size 0": (lambda c: refine(c, batch_size=0), IE, "batch_size"),
    "refine a query alone": (lambda c: refine(c, examples=[" sat on"]), IE, "pairs"),
    "refine examples an int": (lambda c: refine(c, examples=5), ATE, "examples"),
    "refine examples empty": (lambda c: refine(c, examples=[]), IE, "examples"),
    "refine patch an int": (lambda c: refine(c, patch=5), ATE, "patch"),
    # analysis
    "metric unknown": (lambda c: analysis.head_attribution(c.model, c.updates, metric="x"), IE, "metric"),
    "updates an int": (lambda c: analysis.head_attribution(c.model, 5), ATE, "updates"),
    "chunk_attention per block": (lambda c: analysis.head_attribution(c.model, c.updates, metric="chunk_attention", per_head=False), IE, "per_head"),
    "pos_slice a string": (lambda c: analysis.head_attribution(c.model, c.updates, pos_slice="a"), ATE, "pos_slice"),
    "pos_slice out of range": (lambda c: analysis.head_attribution(c.model, c.updates, pos_slice=[9]), IE, "pos_slice"),
    "answer_tokens a string": (lambda c: analysis.direct_effect(c.model, c.updates, answer_tokens="a"), ATE, "answer_tokens"),
    "direct_effect without answer_tokens": (lambda c: analysis.head_attribution(c.model, c.updates, metric="direct_effect"), IE, "answer_tokens"),
    "ranking unknown": (lambda c: analysis.top_k_recovery(c.model, c.updates, (3, 4), ranking="x"), IE, "ranking"),
    "ks an int": (lambda c: analysis.top_k_recovery(c.model, c.updates, (3, 4), ks=5), ATE, "ks"),
    "ks out of range": (lambda c: analysis.top_k_recovery(c.model, c.updates, (3, 4), ks=[99]), IE, "ks"),
    "position a string": (lambda c: analysis.top_k_recovery(c.model, c.updates, (3, 4), position="a"), ATE, "position"),
    "top_k_recovery updates None": (lambda c: analysis.top_k_recovery(c.model, None, (3, 4)), ATE, "updates"),
    "layer_recovery updates None": (lambda c: analysis.layer_recovery(c.model, None, (3, 4)), ATE, "updates"),
    "ablation answer_tokens a tensor": (lambda c: analysis.ablation_scores(c.model, c.updates, torch.tensor([3, 4])), ATE, "answer_tokens"),
    "steering_comparison of an int": (lambda c: analysis.steering_comparison(5), ATE, "patch"),
    "token_patch_spectrum layer a string": (lambda c: analysis.token_patch_spectrum(c.updates, "a"), ATE, "layer"),
    "token_patch_spectrum layer out of range": (lambda c: analysis.token_patch_spectrum(c.updates, 7), IE, "layer"),
    "token_patch_spectrum unknown name": (lambda c: analysis.token_patch_spectrum(c.updates, 1, name="W_out"), IE, "name"),
    "thought_matrix_spectrum of an int": (lambda c: analysis.thought_matrix_spectrum(5, 0), ATE, "patch"),
    # templates
    "template without placeholders": (lambda c: tt.PromptTemplate("no placeholders"), IE, "{chunk}"),
    "template text an int": (lambda c: tt.PromptTemplate(5), ATE, "text"),
    "template query before chunk": (lambda c: tt.PromptTemplate("{query}{chunk}"), IE, "before"),
    "template separator None": (lambda c: tt.PromptTemplate(separator=None), ATE, "separator"),
    # tasks
    "task path is a directory": (lambda c: load_task(DATA), TaskFormatError, "directory"),
    "task path an int": (lambda c: load_task(5), ATE, "path"),
    "task path missing": (lambda c: load_task(DATA / "missing.json"), TaskFormatError, "missing.json"),
    "task min_examples a string": (lambda c: load_task(DATA / "plural.json", min_examples="60"), ATE, "min_examples"),
    "task not an object": (lambda c: task_from_dict(5), TaskFormatError, "object"),
    # prompt_rows
    "prompt_rows query_weight nan": (lambda c: prompt_rows(c.text, "the cat", PAIRS, query_weight=NAN), IE, "query_weight"),
    "prompt_rows examples an int": (lambda c: prompt_rows(c.text, "the cat", 5), ATE, "examples"),
    "prompt_rows pool unknown": (lambda c: prompt_rows(c.text, "the cat", PAIRS, pool="x"), IE, "pool"),
    "prompt_rows batch_size 0": (lambda c: prompt_rows(c.text, "the cat", PAIRS, batch_size=0), IE, "batch_size"),
    # precision, prompts
    "computing_in a string dtype": (lambda c: tt.computing_in(c.model, "float64").__enter__(), IE, "dtype"),
    "computing_in an integer dtype": (lambda c: tt.computing_in(c.model, torch.int64).__enter__(), IE, "dtype"),
    "chat_prompt without a chat template": (lambda c: chat_prompt(c.text, DEFAULT_CASE), IE, "chat template"),
}


def test_the_table_is_large():
    assert len(CASES) >= 30


@pytest.mark.parametrize("call, error, word", CASES.values(), ids=CASES.keys())
def test_bad_argument_raises_the_librarys_error_naming_it(ctx, call, error, word):
    snapshots = {name: param_snapshot(m) for name, m in (("model", ctx.model), ("text", ctx.text))}
    with runtime_checks_off(), pytest.raises(error) as info:
        call(ctx)
    assert isinstance(info.value, tt.TLThoughtsError) and isinstance(info.value, (ValueError, TypeError))
    assert word in str(info.value), str(info.value)
    if isinstance(info.value, TypeError):
        assert isinstance(info.value, tt.ArgumentTypeError)
    assert_model_untouched(ctx.model, snapshots["model"])
    assert_model_untouched(ctx.text, snapshots["text"])


@pytest.mark.parametrize("call, error, word", CASES.values(), ids=CASES.keys())
def test_with_runtime_checks_only_the_librarys_error_or_a_type_check(ctx, call, error, word):
    with pytest.raises((error, TypeCheckError)):
        call(ctx)


# --- no plain ValueError / TypeError left for callers ----------------------------------------------

PACKAGE = Path(tt.__file__).parent
NOT_MINE: tuple[str, ...] = ()  # every file of the package is checked
# internal invariants, not caller errors: (file, a word of the message)
INTERNAL = {("models.py", "cached state dict lacks")}


def _plain_raises(path: Path) -> list[tuple[str, int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name) \
                and node.exc.func.id in ("ValueError", "TypeError"):
            out.append((node.exc.func.id, node.lineno, ast.unparse(node.exc.args[0]) if node.exc.args else ""))
    return out


def test_no_plain_value_or_type_error_is_raised_for_callers():
    left = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel.startswith(NOT_MINE):
            continue
        for kind, line, message in _plain_raises(path):
            if not any(rel == f and word in message for f, word in INTERNAL):
                left.append(f"{rel}:{line} raise {kind}({message})")
    assert left == []


def test_the_leftover_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x):\n    if x < 0:\n        raise ValueError(f'x must be >= 0, got {x}')\n")
    assert [kind for kind, _, _ in _plain_raises(bad)] == ["ValueError"]
