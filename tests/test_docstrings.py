"""Docstring examples run (doctest) on a tiny float64 model, and every public function of the
documented modules has an example.

The examples share a namespace: ``model`` (2 layers, d_model 16, 4 heads, d_mlp 32, a word-level
tokenizer), ``updates`` (chunk 2:5 of ``torch.arange(10)``), ``curve``, ``patch`` (a thought patch
fitted on that model), ``torch``, ``tl_thoughts``; examples that need the real model are marked
``+SKIP`` and run in the tutorials and real-model tests instead."""

import doctest
import importlib
import inspect

import pytest
import torch
from helpers import make_model, make_word_tokenizer

import tl_thoughts

MODULES = [
    "tl_thoughts.chunks",
    "tl_thoughts.fingerprint",
    "tl_thoughts.updates",
    "tl_thoughts.verification",
    "tl_thoughts.exact_weights",
    "tl_thoughts.analysis",
    "tl_thoughts.plots",
    "tl_thoughts.tasks",
    "tl_thoughts.templates",
    "tl_thoughts.evaluation.config",
    "tl_thoughts.evaluation.examples",
    "tl_thoughts.evaluation.decoding",
    "tl_thoughts.evaluation.verdicts",
    "tl_thoughts.evaluation.baselines",
    "tl_thoughts.evaluation.protocol",
    "tl_thoughts.evaluation.report",
    "tl_thoughts.patch",
    "tl_thoughts.models",
    "tl_thoughts.thoughts",
    "tl_thoughts.stream",
]


@pytest.fixture(scope="module")
def namespace():
    model = make_model("ln_gelu_learned", tokenizer=make_word_tokenizer(), d_model=16, d_head=4, n_heads=4,
                       d_mlp=32, n_ctx=32)
    updates = tl_thoughts.implicit_updates(model, torch.arange(10)[None], slice(2, 5))
    from tl_thoughts.analysis import top_k_recovery

    patch = tl_thoughts.fit_thought(
        model, "the cat sat on the mat and", [(" the dog", " ran"), (" a big red hat", " sat")],
        template=tl_thoughts.PromptTemplate("{chunk}{query}", separator=""), progress=False,
    )
    return {"model": model, "updates": updates, "curve": top_k_recovery(model, updates, (7, 3)),
            "patch": patch, "torch": torch, "tl_thoughts": tl_thoughts}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save figures write here
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, globs={**vars(module), **namespace}) if t.examples]
    assert tests, f"{name} has no examples"
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


@pytest.mark.parametrize("name", MODULES)
def test_every_public_function_has_an_example(name):
    module = importlib.import_module(name)
    missing = [
        n for n, obj in vars(module).items()
        if not n.startswith("_") and inspect.isfunction(obj) and obj.__module__ == name
        and "Example" not in (inspect.getdoc(obj) or "")
    ]
    assert not missing, f"{name}: public functions without an example: {missing}"
