"""The exact implicit updates and their verification on TransformerBridges (TransformerLens 4):
tiny random HuggingFace models (Llama with GQA, GPT-2, Gemma 3 with post-norms) and
TransformerLens-native ones (``boot_native``), in float64."""

import pytest
import torch
from bridge_models import ARCHITECTURES, make_bridge

import tl_thoughts as tt
from tl_thoughts import _tl
from tl_thoughts.errors import InputError, UnsupportedArchitectureError
from tl_thoughts.fingerprint import fingerprint

CHUNKS = {"middle": slice(3, 7), "start": slice(0, 4)}


def _tokens(seed: int = 1, n: int = 14) -> torch.Tensor:
    """Distinct token ids: HuggingFace's random initialisation is small (std 0.02), so a repeated
    token has nearly the same MLP input at both places and the weight form's rows would be
    numerically dependent (a property of the model, not of the bridge)."""
    return torch.randperm(50, generator=torch.Generator().manual_seed(seed))[:n][None]


def _state(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _instance_attributes(model) -> set[str]:
    """Instance attributes the library might leave behind (wrapped forward / softmax)."""
    found = {"forward"} & set(vars(model))
    for block in model.blocks:
        found |= {"_masked_softmax"} & set(vars(block.attn))
    for module in model.modules():
        found |= {"_hf_autograd_forward_with_hooks"} & set(vars(module))
    return found


@pytest.mark.parametrize("chunk", CHUNKS, ids=str)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_both_forms_reproduce_the_full_run_in_float64(bridge, arch, chunk):
    model = bridge(arch)
    updates = tt.implicit_updates(model, _tokens(), CHUNKS[chunk])
    report = tt.verify(model, updates)
    assert float(report.forms["unpatched"].logit_errors.max()) > 1e-4  # the chunk matters
    for form in ("activation", "weight"):
        assert float(report.forms[form].logit_errors.max()) <= 1e-10, (form, report)
        assert float(report.forms[form].resid_errors.max()) <= 1e-10, (form, report)
        assert bool(report.forms[form].argmax_match.all())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_kept_token_uses_the_rank_one_form(bridge, arch):
    """Dherin et al.'s setting: everything before the last token is the chunk."""
    model = bridge(arch)
    updates = tt.implicit_updates(model, _tokens(n=7), slice(0, 6))
    report = tt.verify(model, updates)
    assert float(report.forms["unpatched"].logit_errors.max()) > 1e-4
    assert float(report.forms["activation"].logit_errors.max()) <= 1e-10
    # Gemma 3: Goldwaser et al.'s patch of the post-MLP norm's scale (exact only because the
    # norms run in float64 inside the library: HuggingFace's Gemma3RMSNorm rounds to float32)
    assert float(report.forms["weight"].logit_errors.max()) <= 1e-10, report.weight_form


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2", "native_rms_gqa"])
def test_vectors_match_a_reference_from_the_bridges_own_cache(bridge, arch):
    """THEORY 2 recomputed here from ``run_with_cache`` (pattern, values, W_O), head by head."""
    model = bridge(arch)
    tokens, chunk = _tokens(), slice(3, 7)
    updates = tt.implicit_updates(model, tokens, chunk)
    with _tl.computing_in(model, torch.float64):  # float64 softmax, as the library computes
        _, cache = model.run_with_cache(tokens)
    kept = updates.positions
    keys = torch.ones(tokens.shape[1], dtype=torch.bool)
    keys[chunk] = False
    group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        p = cache[f"blocks.{layer}.attn.hook_pattern"][0][:, kept]  # [head, kept, key]
        v = torch.repeat_interleave(
            cache[f"blocks.{layer}.attn.hook_v"][0], group, dim=1
        )  # [key, head, d]
        p_red = p * keys
        p_red = p_red / p_red.sum(-1, keepdim=True)
        z_full = torch.einsum("hqk,khd->qhd", p, v)
        z_red = torch.einsum("hqk,khd->qhd", p_red, v)
        W_O = model.blocks[layer].attn.W_O
        expected = torch.einsum("qhd,hdm->qm", z_full - z_red, W_O)
        assert torch.allclose(updates.vectors[layer], expected, atol=1e-12, rtol=0), layer


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2"])
def test_batch_gives_each_prompt_its_own_updates(bridge, arch):
    model = bridge(arch)
    prompts = [_tokens(2, 12)[0], _tokens(3, 9)[0]]
    chunks = [slice(2, 5), slice(0, 3)]
    for side in ("left", "right"):
        batch = tt.implicit_updates_batch(model, prompts, chunks, padding_side=side)
        for prompt, chunk, got in zip(prompts, chunks, batch):
            alone = tt.implicit_updates(model, prompt[None], chunk)
            assert torch.allclose(got.vectors, alone.vectors, atol=1e-12, rtol=0), side


@pytest.mark.parametrize("arch", ["llama_gqa", "gemma3"])
def test_the_model_is_left_exactly_as_it_was(arch):
    model = make_bridge(arch)
    before = _state(model)
    updates = tt.implicit_updates(model, _tokens(), slice(3, 7))
    tt.verify(model, updates)
    tt.run_reduced(model, updates)
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not _instance_attributes(model)
    assert not _tl.has_hooks(model)
    # a missing bias added for a weight-form swap (Llama's b_out) is removed again
    assert (
        all(block.mlp.out.original_component.bias is None for block in model.blocks)
        or arch != "llama_gqa"
    )


def test_an_exception_inside_a_reduced_run_restores_everything():
    model = make_bridge("llama_gqa")
    before = _state(model)
    updates = tt.implicit_updates(model, _tokens(), slice(3, 7))
    patch = tt.exact_weight_patch(model, updates)
    with pytest.raises(RuntimeError, match="boom"):
        with patch.applied(model):
            assert "forward" in vars(model)  # the positions are in place
            raise RuntimeError("boom")
    assert not _instance_attributes(model)
    assert all(torch.equal(t, _state(model)[n]) for n, t in before.items())


def test_a_missing_bias_is_added_for_a_swap_only():
    model = make_bridge("llama_gqa")
    name = "blocks.1.mlp.b_out"
    assert torch.equal(_tl.weight(model, name), torch.zeros(32, dtype=torch.float64))
    new = torch.arange(32, dtype=torch.float64)
    with _tl.swapped_tensors(model, {name: new}):
        assert torch.equal(model.blocks[1].mlp.out.original_component.bias, new)
    assert model.blocks[1].mlp.out.original_component.bias is None


def test_weights_are_swapped_through_the_parameters_they_view():
    model = make_bridge("gpt2")
    name = "blocks.0.attn.W_O"
    old = _tl.weight(model, name).detach().clone()
    new = torch.randn_like(old)
    fp = fingerprint(dict(model.named_parameters()))
    with _tl.swapped_tensors(model, {name: new}):
        assert torch.equal(_tl.weight(model, name), new)
        assert torch.equal(model.blocks[0].attn.W_Q, _tl.weight(model, "blocks.0.attn.W_Q"))
    assert torch.equal(_tl.weight(model, name), old)
    assert fingerprint(dict(model.named_parameters())) == fp


def test_float64_patterns_sum_to_one_inside_the_library_only():
    """TransformerLens 4.3 computes rotary bridges' softmax in float32; inside computing_in it is
    float64 (and the model is the same afterwards)."""
    model = make_bridge("llama_gqa")
    tokens = _tokens()
    _, outside = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    with _tl.computing_in(model, torch.float64):
        _, inside = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    err = lambda c: float((c["blocks.0.attn.hook_pattern"].sum(-1) - 1).abs().max())  # noqa: E731
    assert err(outside) > 1e-9  # float32 rounding
    assert err(inside) <= 1e-14


@pytest.mark.parametrize("arch", ["llama_gqa", "gemma3"])
def test_float64_norms_inside_the_library_only(arch):
    """HuggingFace's RMSNorms compute in float32 even for a float64 model; inside computing_in a
    float64 bridge's norms are float64 (the formula recomputed here, Gemma's weight offset
    included)."""
    model = make_bridge(arch)
    ln = model.blocks[1].ln2
    x = torch.randn(1, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    eps = model.cfg.eps
    w = ln.weight.detach() + (1.0 if arch == "gemma3" else 0.0)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    with torch.no_grad():
        assert float((ln(x) - expected).abs().max()) > 1e-9  # float32 rounding outside
        with _tl.computing_in(model, torch.float64):
            assert float((ln(x) - expected).abs().max()) <= 1e-14
    assert not _instance_attributes(model)


def test_a_bridge_outside_compatibility_mode_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4)).double()
    raw = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config)
    with pytest.raises(UnsupportedArchitectureError, match="compatibility mode"):
        tt.implicit_updates(raw, _tokens(), slice(3, 7))


def test_a_sliding_window_shorter_than_the_context_is_refused():
    import transformers as tf

    from tl_thoughts.bridges import bridge_from_hf

    hf = tf.Gemma3ForCausalLM(
        tf.Gemma3TextConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            sliding_window=8,
            query_pre_attn_scalar=8,
        )
    ).double()
    with pytest.raises(UnsupportedArchitectureError, match="sliding-window"):
        tt.implicit_updates(bridge_from_hf(hf), _tokens(), slice(3, 7))


def test_what_is_not_ported_says_so(bridge):
    model = bridge("llama_gqa")
    with pytest.raises(
        UnsupportedArchitectureError, match="fit_thought is not available on a TransformerBridge"
    ):
        tt.fit_thought(model, "1 2", ["3 4"])
    with pytest.raises(UnsupportedArchitectureError, match="block by block"):
        _tl.embed(model, _tokens())


def test_hooks_of_the_user_are_refused_and_the_bridges_own_wiring_is_not(bridge):
    model = bridge("gpt2")
    tt.implicit_updates(model, _tokens(), slice(3, 7))  # the bridge wires its own torch hooks
    model.run_with_cache(_tokens())  # and transformers its output capture
    assert _tl.raw_torch_hooks(model) == []
    handle = model.blocks[0].register_forward_hook(lambda *a: None)
    try:
        with pytest.raises(InputError, match="raw torch hooks"):
            tt.implicit_updates(model, _tokens(), slice(3, 7))
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2"])
def test_the_analysis_functions_run_on_a_bridge(bridge, arch):
    from tl_thoughts import analysis

    model = bridge(arch)
    updates = tt.implicit_updates(model, _tokens(), slice(3, 7))
    answer = (3, 4)
    curve = analysis.layer_recovery(model, updates, answer)
    assert abs(float(curve.values[-1]) - curve.full) <= 1e-10  # every block's vectors: the full run
    assert abs(float(curve.values[0]) - curve.reduced) <= 1e-10
    top = analysis.top_k_recovery(model, updates, answer)
    assert abs(float(top.values[-1]) - top.full) <= 1e-10
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    norms = analysis.head_attribution(model, updates)
    expected = updates.head_vectors.norm(dim=-1).permute(0, 2, 1).reshape(n_heads, -1)
    assert torch.allclose(norms, expected, atol=1e-12, rtol=0)
    assert analysis.ablation_scores(model, updates, answer).shape == (n_heads,)
    assert analysis.direct_effect(model, updates, answer).shape == (model.cfg.n_layers, 7)
