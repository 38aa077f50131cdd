"""The stream engine (``tl_thoughts.stream``) against plain TransformerLens runs, float64, on the
tiny architectures: every piece gives the values of whole runs (``run_with_cache``) to 1e-10."""

import pytest
import torch
from helpers import (
    ARCHITECTURES,
    POST_NORM_MLP_ARCHITECTURES,
    PRE_NORM_MLP_ARCHITECTURES,
    assert_close,
    random_tokens,
)

import tl_thoughts as tt
from tl_thoughts import _tl
from tl_thoughts import stream as S
from tl_thoughts.templates import encode_example
from transformer_lens import TransformerLensKeyValueCache

TEMPLATE = tt.PromptTemplate("{chunk}{query}", separator="")
PREFIXED = tt.PromptTemplate("the {chunk}{query}", separator="")
CHUNK = "the cat sat on the mat and"
EXAMPLES = [(" the dog", " ran"), (" a big red hat", " sat"), (" the red cat", " ran ."), (" a dog", " sat on")]


def test_pad_right_and_length_batches():
    padded = S.pad_right([torch.tensor([1, 2, 3]), torch.tensor([4])])
    assert padded.tolist() == [[1, 2, 3], [4, 0, 0]] and padded.dtype == torch.long
    resid = S.pad_right([torch.ones(2, 3), torch.ones(1, 3)])
    assert resid.shape == (2, 2, 3) and resid[1, 1].abs().sum() == 0
    lengths = [5, 2, 9, 2, 5]
    batches = S.length_batches(lambda i: lengths[i], range(5), 2)
    assert batches == [[1, 3], [0, 4], [2]]  # sorted by length, the order kept among equal ones
    with pytest.raises(tt.InputError):
        S.pad_right([])
    with pytest.raises(tt.InputError):
        S.length_batches(lambda i: i, range(3), 0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_shared_prefix_and_a_run_after_it_equal_whole_runs(tiny_model, arch):
    """``SharedPrefix.of`` finds the tokens every prompt shares; ``run_to_end`` after its cache
    gives the residual stream of whole runs at the positions after it."""
    model = tiny_model(arch)
    common = random_tokens(4, seed=3)[0]
    prompts = [torch.cat([common, random_tokens(n, seed=n)[0]]) for n in (3, 5, 5)]
    prefix = S.SharedPrefix.of(model, prompts)
    assert prefix is not None and prefix.length >= 4
    rest = S.pad_right([p[prefix.length:] for p in prompts])
    with torch.no_grad():
        after = S.run_to_end(model, rest, prefix=prefix.cache)
        for i, p in enumerate(prompts):
            _, cache = model.run_with_cache(p[None])
            whole = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0]
            n = p.shape[0] - prefix.length
            assert_close(after[i, :n], whole[prefix.length:], 1e-10, f"prompt {i}")
    assert S.SharedPrefix.of(model, [torch.tensor([1, 2]), torch.tensor([3, 2])]) is None
    with pytest.raises(tt.InputError):
        S.SharedPrefix.first(model, common, 0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_run_block_after_equals_the_block_on_whole_sequences(tiny_model, arch):
    """One block run on positions from ``p`` on, the earlier positions' keys and values read from
    a cache of the whole sequences' run, for several copies of the batch: the block's output on the
    whole sequences."""
    model = tiny_model(arch)
    tokens = torch.stack([random_tokens(7, seed=s)[0] for s in (1, 2)])
    n_layers = model.cfg.n_layers
    kv = TransformerLensKeyValueCache.init_cache(model.cfg, _tl.model_device(model), 2)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        model(tokens, stop_at_layer=n_layers, attention_mask=torch.ones_like(tokens), past_kv_cache=kv)
        layer, p = 1, 3
        before = cache[f"blocks.{layer}.hook_resid_pre"]
        stack = torch.cat([before[:, p:], before[:, p:]])  # two copies of the batch
        out = S.run_block_after(model, stack, layer, kv, p, 2)
        want = cache[f"blocks.{layer}.hook_resid_post"][:, p:]
        assert_close(out, torch.cat([want, want]), 1e-10, "block after the cached positions")
        assert torch.equal(S.run_block_after(model, stack, n_layers, kv, p, 2), stack)  # past the last block


@pytest.mark.parametrize("arch", PRE_NORM_MLP_ARCHITECTURES + POST_NORM_MLP_ARCHITECTURES)
@pytest.mark.parametrize("share_prefix", [True, False])
def test_prompt_rows_are_the_whole_runs_at_the_fitted_rows(text_models, arch, share_prefix):
    """``prompt_rows``: each prompt with the chunk's ``resid_pre`` of every block, the residual after
    the last one and every block's attention output (``hook_attn_out``; before the post-attention
    norm where there is one: the norm's input, rebuilt from its hooks), at its fitted rows
    (``fitted_rows``), as ``run_with_cache`` on the prompt alone gives them; ``finish_block``
    streams the blocks (post-norms included)."""
    model = text_models(arch)
    rows = tt.prompt_rows(model, CHUNK, EXAMPLES, template=PREFIXED, pool="answer", query_weight=0.1, batch_size=3,
                          share_prefix=share_prefix)
    n_layers = model.cfg.n_layers
    for ex in EXAMPLES:
        encoded = encode_example(model, PREFIXED, CHUNK, ex)
        fitted = S.fitted_rows(encoded, "answer", 0.1)
        idx = rows.rows_of(encoded.full)
        assert torch.equal(rows.positions[idx], fitted.positions)
        with torch.no_grad():
            _, cache = model.run_with_cache(encoded.full[None])
        pre = torch.stack([cache[f"blocks.{layer}.hook_resid_pre"][0] for layer in range(n_layers)]
                          + [cache[f"blocks.{n_layers - 1}.hook_resid_post"][0]])
        post = _tl.model_spec(model).attn_post_norm
        attn = torch.stack([cache[f"blocks.{layer}.hook_attn_out"][0] if post is None else
                            (cache[f"blocks.{layer}.{post}.hook_normalized"] * cache[f"blocks.{layer}.{post}.hook_scale"])[0]
                            for layer in range(n_layers)])
        assert_close(rows.pre[:, idx], pre[:, fitted.positions], 1e-10, f"resid_pre rows of {ex}")
        assert_close(rows.attn[:, idx], attn[:, fitted.positions], 1e-10, f"attn_out rows of {ex}")
        # the pooled rows first (weight 1), then the query rows the pool leaves out (weight 0.1)
        assert fitted.in_pool.tolist() == sorted(fitted.in_pool.tolist(), reverse=True)
        assert set(fitted.weights[~fitted.in_pool].tolist()) <= {0.1}
    assert repr(rows).startswith(f"PromptRows(prompts={len(EXAMPLES)}, rows={rows.positions.shape[0]}")
    with pytest.raises(tt.InputError, match="given twice"):
        tt.prompt_rows(model, CHUNK, EXAMPLES + EXAMPLES[:1], template=PREFIXED, pool="answer")
    with pytest.raises(tt.InputError, match="pool"):
        tt.prompt_rows(model, CHUNK, EXAMPLES, template=PREFIXED, pool="nope")


def test_unpatched_prefix_refuses_prompts_that_differ_within_it(tiny_model):
    """``unpatched_prefix``: the first ``k`` tokens' cache when every prompt starts with them, None
    for ``k = 0``, and a refusal (the library's ``InputError``) where the prompts differ within them."""
    model = tiny_model("ln_gelu_learned")
    prompts = [torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 5])]
    prefix = S.unpatched_prefix(model, prompts, 2)
    assert prefix.length == 2 and S.unpatched_prefix(model, prompts, 0) is None
    with pytest.raises(tt.InputError, match="first 3 tokens differ"):
        S.unpatched_prefix(model, prompts, 3)
