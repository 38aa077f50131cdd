# %% [markdown]
# # Tutorial 2: thought patches, fitted, saved, loaded, compared with steering
#
# Show SmolLM2 six past-tense pairs ("smile -> smiled", "hear -> heard", ...) and then "swim ->",
# and it answers " swam". Without the pairs, "<|im_start|>swim ->" means nothing to it: its top
# next token is a blank. In this tutorial we fit ONE weight update per block from twenty examples,
# and the model without the pairs answers " swam", " bought", " brought" again.
#
# **The chunk's effect, condensed.** Tutorial 1 showed that a chunk's effect is exactly a weight
# update, but one that depends on the token: each query token gets its own vectors and rank-1
# patches. A *thought patch* is one token-independent update per block (THEORY section 4): a
# thought vector (a new attention output bias `b_O`) and thought matrices (patches of `W_O`,
# `W_gate`, `W_in`, `W_out`), fitted by least squares so that, over many queries, the model
# WITHOUT the chunk computes what it computes WITH it.
#
# **What it is for.** Once fitted, the patch is a small file: it carries the task without the
# demonstrations in the prompt. We fit one, apply it, reduce its rank, refine it by gradient
# descent, save and reload it, run the benchmark protocol on one seed, and compare it with the
# mean-difference steering vector it explains. A few minutes on a CPU.

# %%
# %matplotlib inline
import os
import tempfile
from pathlib import Path

import torch

import tl_thoughts as tt
from tl_thoughts import analysis, evaluation, plots
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks

OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorial_outputs"))
model = load_default_model()
task = load_task(next(p for p in shipped_tasks() if p.stem == "past_tense"))
print(task.description)
print(task.chunk)
print(repr(task.prompt("go", with_chunk=True, model=model)), "->", repr(task.continuation("went")))

# %% [markdown]
# ## The example: with the demonstrations, without them, without them but patched
# The patch is fitted on 20 examples (the next section explains the options); the queries below
# are not among them.

# %%
fit_idx, test_idx = evaluation.split(len(task.examples), 20, seed=0)
fit_config = tt.FitConfig.preset("benchmark")  # EvalConfig's options; tt.FitConfig.preset("paper"): the papers'
patch = tt.fit_thought(model, task.chunk, task.fit_examples(fit_idx), fit_config, template=task.template)


def top_tokens(prompt, k=3):
    with torch.no_grad():
        return model.to_str_tokens(model(prompt)[0, -1].topk(k).indices)


for query in ("swim", "buy", "bring"):
    assert [q for q, _ in task.examples].index(query) not in fit_idx  # a test query
    with_chunk = top_tokens(task.prompt(query, True, model))
    without = top_tokens(task.prompt(query, False, model))
    with patch.apply(model):  # the prompt below has no demonstrations
        patched = top_tokens(task.prompt(query, False, model))
    print(f"{query + ' ->':>9} with the demonstrations: {with_chunk}")
    print(f"{'':>9} without them:            {without}")
    print(f"{'':>9} without them, patched:   {patched}")
    assert patched[0] == with_chunk[0] != without[0]

# %% [markdown]
# ## Fit
# Disjoint fit and test examples. The options are the benchmark's defaults (`EvalConfig`): the
# thought vector on `b_O`, fitted to the attention-output difference (Algorithm 1 of the papers),
# pooled over the positions that predict the answer (and the line break after it), ridge 0.5; a
# thought matrix on `W_O` that maps each token's head outputs to what the vector leaves of its
# change, the MLP-input matrices, and a thought matrix on `W_out` that maps the MLP's hidden
# activations to what is left of the residual difference, all also fitted on the query tokens at
# weight 0.1. The prompts start with the model's BOS token (`{bos}` in the template, `<|im_start|>`
# on SmolLM2): without a fixed first token,
# removing the chunk removes the attention sink, and no token-independent patch recovers (see
# `docs/benchmark.md`). The chunk cannot change that first token, and the patch leaves it
# unpatched too (`patch_prefix=False`).

# %%
config = evaluation.EvalConfig()
print(fit_config)  # the patch above: tt.fit_thought(model, task.chunk, fit examples, fit_config, ...)
print(patch.summary_table())
print("positions left unpatched:", patch.unpatched_positions)

# %% [markdown]
# ## Apply: the model without the chunk, patched
# `apply` is a context manager, restored on exit, also on an exception. A patch that acts on every
# position is applied as new weights (`form="weight"`); this one leaves the first position
# unpatched, which weights cannot do, so `apply` adds it through hooks from the second position
# on (`form="activation"`, `patch.unpatched_positions`).

# %%
for i in test_idx[:8]:
    query, answer = task.examples[i]
    without = evaluation.greedy_generate(model, task.prompt(query, False, model))
    with patch.apply(model):
        patched = evaluation.greedy_generate(model, task.prompt(query, False, model))
    print(f"{query:>8} (expected {answer!r}): without {without!r:<24} patched {patched!r}")

# %% [markdown]
# ## Fewer directions
# Each thought matrix can be replaced by its best rank-k approximation (`truncated`, or
# `truncations` for several ranks from one decomposition); rank 1 is the form of a ROME edit. How
# many directions the behaviour needs depends on the task. The benchmark uses the matrices as
# fitted (`config.ranks` is `(None,)`); given candidate ranks, it chooses among them on the fit
# examples (`choose_rank`: accuracy without the chunk, then mean log-probability).

# %%
fit_set = evaluation.encode_task_examples(model, task, fit_idx)
candidates = (1, 4, 16, None)  # None: as fitted
chosen, rank = evaluation.choose_rank(model, patch, candidates, fit_set)
print("candidates", candidates, "-> chosen on the fit examples:", rank)

# %% [markdown]
# ## Refining by gradient descent
# `refine_thought` trains the same numbers (the vectors and matrices; the model's weights are not
# touched) by full-batch Adam on the cross-entropy of the fit examples' answers without the chunk,
# from the least-squares patch. The benchmark's `thought_patch_refined` is this, 10 steps at
# 1e-5 from its least-squares patch (here from the one at the rank just chosen). It is trained with labels: no longer the theory's
# least-squares patch (`docs/benchmark.md`).

# %%
refined = tt.refine_thought(model, chosen, task.fit_examples(fit_idx), steps=config.refine_steps, lr=config.refine_lr)
(entry,) = refined.meta["refined"]
print(f"mean answer cross-entropy on the fit examples: {entry['loss_before']:.3f} -> {entry['loss_after']:.3f}")
assert entry["loss_after"] < entry["loss_before"]

# %% [markdown]
# ## Save and load
# One file: safetensors tensors and JSON metadata (the model's identity and shapes, the options,
# the chunk, the number of examples and tokens), written atomically. Loading onto another model
# is refused.

# %%
path = Path(tempfile.mkdtemp()) / "past_tense.safetensors"
patch.save(path)
loaded = tt.ThoughtPatch.load(path, model=model)
print(loaded.meta["chunk"] == task.chunk, loaded.meta["n_examples"], loaded.meta["n_tokens"])
query = task.examples[test_idx[0]][0]
with loaded.apply(model):
    print(query, "->", evaluation.greedy_generate(model, task.prompt(query, False, model)))

# %% [markdown]
# ## The protocol on the test examples, against the steering baselines
# `evaluate_seed` filters the test examples to those right WITH the chunk and wrong WITHOUT it,
# then runs every method on them (see `tl_thoughts.evaluation`). Every method is fitted on the fit
# examples plus 480 of the task's unlabelled queries, answered by the model itself with the chunk
# (`evaluation.query_answers`; `config.n_queries`), at the ridge scaled by the rows
# (`config.fit_config(n_rows)`), so its thought patch is not the one above. The papers' method,
# `thought_patch_paper`, is fitted on the 20 labelled fit examples alone (`config.paper_fit_config()`).

# %%
result = evaluation.evaluate_seed(model, task, config, seed=0)
print(f"{len(result.filtered_indices)} filtered test examples")
for method, accuracy in result.accuracy.items():
    print(f"{method:>20}: {accuracy:.0%}")

# %% [markdown]
# ## What the theory says about steering vectors
# The thought vector of a block is the mean of the exact per-token vectors; the plain
# mean-difference steering vector (full minus unpatched reduced attention output) and the
# accumulated residual difference are what steering methods add. Their cosines, per layer:

# %%
comparison = analysis.steering_comparison(patch)
print(comparison.table())
fig = plots.steering_comparison(comparison, save=OUT / "02_steering.png")
fig

# %% [markdown]
# The thought matrices are low-rank: their singular values fall quickly.

# %%
fig = plots.spectra({f"L{l} W_in": analysis.thought_matrix_spectrum(patch, l) for l in (2, 10, 20, 28)},
                    save=OUT / "02_spectra.png")
fig
