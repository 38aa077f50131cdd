"""Exact equivalence on the real pretrained model, SmolLM2-135M-Instruct (rotary, RMSNorm, gated
SiLU MLP, GQA 9/3 heads, 30 layers), on the fixed prompt suite of `tl_thoughts.prompts.SUITE`."""

import pytest
import torch

import tl_thoughts as tt
from tl_thoughts import cli
from tl_thoughts.prompts import SUITE, chat_prompt

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


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
    for form in ("activation", "weight"):  # the verdict, at the float32 tolerance
        assert f"\nverdict: PASS ({form}: max |dlogit| " in out and " <= 1e-02, argmax 100%)" in out


# --- hardening on the real model: batches, several chunks, unicode, half precision, long prompts ---


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_each_prompt_alone(smollm2_f64, padding_side):
    """Three suite prompts of different lengths in one padded run (float64): each result equals the
    prompt's own to 1e-10, and verifies to 1e-8."""
    cases = [SUITE[0], SUITE[5], SUITE[19]]  # 46, 40 and 67 tokens
    prompts = [chat_prompt(smollm2_f64, c) for c in cases]
    batch = tt.implicit_updates_batch(smollm2_f64, prompts, [c.chunk for c in cases], padding_side=padding_side)
    assert len({u.tokens.shape[1] for u in batch}) == 3  # really different lengths
    for prompt, case, updates in zip(prompts, cases, batch):
        alone = tt.implicit_updates(smollm2_f64, prompt, case.chunk)
        assert torch.equal(updates.tokens, alone.tokens) and updates.span == alone.span
        torch.testing.assert_close(updates.vectors, alone.vectors, rtol=0, atol=1e-10)
        torch.testing.assert_close(updates.mlp_in, alone.mlp_in, rtol=0, atol=1e-10)
    assert tt.verify(smollm2_f64, batch[1], forms=("activation",)).max_abs_logit_error <= 1e-8


def test_several_chunks_instruction_and_a_demonstration(smollm2, smollm2_f64):
    """Remove an instruction AND one demonstration from a chat prompt at once."""
    user = "Give the opposite of the word.\nhot -> cold\nbig -> small\nfast -> slow\ntall ->"
    chunks = ["Give the opposite of the word.", "big -> small"]
    for model, bound in ((smollm2, 1e-2), (smollm2_f64, 1e-8)):
        snapshot = _snapshot(model)
        prompt = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        updates = tt.implicit_updates(model, prompt, chunks)
        assert updates.span.n_chunks == 2
        report = tt.verify(model, updates, forms=("activation",))
        assert report["unpatched"].max_abs_logit_error > 1.0
        assert report.max_abs_logit_error <= bound and report.argmax_agreement == 1.0
        _assert_untouched(model, snapshot)


def test_unicode_prompt_and_chunk(smollm2_f64):
    prompt = "<|im_start|>Traduis en français : « chat » → « chien » 🐱🐶\nmaison ->"
    updates = tt.implicit_updates(smollm2_f64, prompt, "« chat » → « chien » 🐱🐶")
    # the emoji are split over byte tokens (each shown as U+FFFD by to_str_tokens): the chunk is
    # located on whole characters, and decodes back to itself
    assert "\ufffd" in "".join(smollm2_f64.to_str_tokens(updates.tokens[0, updates.chunk]))
    assert smollm2_f64.tokenizer.decode(updates.tokens[0, updates.chunk]).strip() == "« chat » → « chien » 🐱🐶"
    assert tt.verify(smollm2_f64, updates).max_abs_logit_error <= 1e-8


def test_bfloat16_model_is_computed_in_float32_with_a_warning(smollm2):
    """The default model run in bfloat16 (through ``computing_in``, so nothing is reloaded): its
    updates are computed in float32 with a warning, exact to float32 rounding."""
    snapshot = _snapshot(smollm2)
    case = SUITE[0]
    with tt.computing_in(smollm2, torch.bfloat16):
        assert smollm2.W_in.dtype == torch.bfloat16
        with pytest.warns(tt.PrecisionWarning):
            updates = tt.implicit_updates(smollm2, chat_prompt(smollm2, case), case.chunk)
        report = tt.verify(smollm2, updates, forms=("activation",))
        assert report.max_abs_logit_error <= 1e-2 and report.argmax_agreement == 1.0
        assert smollm2.W_in.dtype == torch.bfloat16  # restored after each computation
    assert updates.dtype == torch.float32 and report.dtype == torch.float32
    _assert_untouched(smollm2, snapshot)


def test_long_prompt_subset_of_layers_and_positions(smollm2):
    """A 1,000-token prompt: a subset of layers and positions equals the same rows of the whole."""
    words = " ".join(f"item{i}" for i in range(330))
    prompt = "<|im_start|>Remember this list.\n" + words
    tokens = smollm2.to_tokens(prompt)
    assert tokens.shape[1] >= 1000
    whole = tt.implicit_updates(smollm2, tokens, "Remember this list.")
    last = [int(p) for p in whole.positions[-3:]]
    part = tt.implicit_updates(smollm2, tokens, "Remember this list.", layers=[3, 20], positions=last)
    torch.testing.assert_close(part.vectors, whole.vectors[[3, 20]][:, -3:], rtol=0, atol=1e-5)
    torch.testing.assert_close(part.head_vectors, whole.head_vectors[[3, 20]][:, -3:], rtol=0, atol=1e-5)
