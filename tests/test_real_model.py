"""Exact equivalence on the real pretrained model, SmolLM2-135M-Instruct (rotary, RMSNorm, gated
SiLU MLP, GQA 9/3 heads, 30 layers), on the fixed prompt suite of `tl_thoughts.prompts.SUITE`."""

import pytest
import torch

import tl_thoughts as tt
from tl_thoughts import cli
from tl_thoughts.prompts import SUITE, chat_prompt

pytestmark = pytest.mark.real_model


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for name, value in snapshot.items():
        assert torch.equal(state[name], value), f"{name} changed"
    assert not [n for n, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]


def test_suite_is_large_enough_and_varied():
    assert len(SUITE) >= 20
    assert sum(c.name.startswith("fewshot") for c in SUITE) >= 5
    assert len({c.name for c in SUITE}) == len(SUITE)


@pytest.mark.parametrize("case", SUITE, ids=[c.name for c in SUITE])
def test_fp32_suite_activation_and_weight_forms(smollm2, case):
    snapshot = _snapshot(smollm2)
    prompt = chat_prompt(smollm2, case)
    updates = tt.implicit_updates(smollm2, prompt, case.chunk)
    # the chunk is where the substring says, after the chat-template prefix
    chunk_text = "".join(smollm2.to_str_tokens(updates.tokens[0, updates.chunk]))
    assert chunk_text.strip() == case.chunk
    assert updates.chunk.start > 0
    report = tt.verify(smollm2, updates)
    # the chunk matters (otherwise the check would be empty) ...
    assert report["unpatched"].max_abs_logit_error > 1.0
    # ... and both patched forms reproduce the full run at every kept position
    for form in ("activation", "weight"):
        assert report[form].max_abs_logit_error <= 1e-2, form
        assert bool(report[form].argmax_match.all()), form
    assert report.argmax_agreement == 1.0
    _assert_untouched(smollm2, snapshot)


@pytest.mark.parametrize("case", SUITE, ids=[c.name for c in SUITE])
def test_fp64_suite_activation_form(smollm2_f64, case):
    prompt = chat_prompt(smollm2_f64, case)
    updates = tt.implicit_updates(smollm2_f64, prompt, case.chunk)
    report = tt.verify(smollm2_f64, updates, forms=("activation",))
    assert report.max_abs_logit_error <= 1e-8
    assert report.argmax_agreement == 1.0


@pytest.mark.parametrize("case", SUITE[:3], ids=[c.name for c in SUITE[:3]])
def test_fp64_weight_form(smollm2_f64, case):
    updates = tt.implicit_updates(smollm2_f64, chat_prompt(smollm2_f64, case), case.chunk)
    report = tt.verify(smollm2_f64, updates, forms=("weight",))
    assert report.max_abs_logit_error <= 1e-8


RAW_PROMPTS = [
    # chunk at the very start (no prefix): rotary is relative, positions still kept exactly
    ("Translate into French: dog -> chien, house -> maison.", " cat ->"),
    # chunk in the middle of few-shot demonstrations
    ("big -> small", "hot -> cold\n{chunk}\nfast -> slow\ntall ->"),
]


def test_chunk_at_start_of_raw_text(smollm2_f64):
    chunk, rest = RAW_PROMPTS[0]
    updates = tt.implicit_updates(smollm2_f64, chunk + rest, chunk)
    assert updates.chunk.start == 0
    report = tt.verify(smollm2_f64, updates)
    assert report["unpatched"].max_abs_logit_error > 1.0
    assert report.max_abs_logit_error <= 1e-8


def test_chunk_in_the_middle_of_demonstrations(smollm2_f64):
    chunk, template = RAW_PROMPTS[1]
    prompt = template.format(chunk=chunk)
    updates = tt.implicit_updates(smollm2_f64, prompt, chunk)
    assert 0 < updates.chunk.start and updates.chunk.stop < updates.tokens.shape[1] - 1
    report = tt.verify(smollm2_f64, updates)
    assert report.max_abs_logit_error <= 1e-8


def test_single_kept_token_uses_rank1_and_b_out(smollm2_f64):
    """Dherin et al.'s setting: everything before the last token is the chunk."""
    tokens = smollm2_f64.to_tokens("hot -> cold\nbig -> small\ntall ->")
    updates = tt.implicit_updates(smollm2_f64, tokens, slice(0, tokens.shape[1] - 1))
    patch = tt.exact_weight_patch(smollm2_f64, updates)
    assert patch.n_kept == 1
    assert set(patch.biases) == {f"blocks.{l}.mlp.b_out" for l in range(30)}
    assert all(fm.rdim == 1536 and fm.mdim == 1 for fm in patch.matrices.values())
    report = tt.verify(smollm2_f64, updates)
    assert report.max_abs_logit_error <= 1e-8


def test_gqa_heads_sum_to_block_vector(smollm2_f64):
    case = SUITE[0]
    updates = tt.implicit_updates(smollm2_f64, chat_prompt(smollm2_f64, case), case.chunk)
    assert updates.head_vectors.shape[2] == 9
    torch.testing.assert_close(
        updates.head_vectors.sum(2), updates.vectors, rtol=0, atol=1e-12
    )
    assert bool((updates.chunk_attention >= 0).all() and (updates.chunk_attention <= 1).all())


def test_cli_verify_prints_report_and_top5(capsys):
    assert cli.main(["verify"]) == 0
    out = capsys.readouterr().out
    assert "max |resid_post error| per layer" in out
    assert "top-5 next tokens" in out
    for label in ("with the chunk", "without it", "without, patched (activation)",
                  "without, patched (weight)"):
        assert label in out
