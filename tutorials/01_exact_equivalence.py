# %% [markdown]
# # Tutorial 1: a prompt chunk is exactly a weight update
#
# Put the instruction "Answer with yes or no." before "Can cats fly?" and SmolLM2's answer starts
# with "No"; remove the instruction and it starts with "The". This tutorial removes the
# instruction and makes the model answer "No" anyway, by changing its weights, exactly.
#
# **The chunk's effect.** Every token after the instruction attends to it: in each block, what a
# token reads from the instruction's tokens is added to its attention output. Remove the
# instruction and that contribution is missing at every later token and in every block, and
# everything computed from it (the MLPs, the later blocks, the logits) changes: the answer starts
# with "The" instead of "No". That difference is the chunk's effect.
#
# **The update.** The missing contribution is, in block `l` at token `t`, one vector: the full
# run's attention output minus the attention output over the kept tokens alone (a *virtual weight
# vector*). Add it back at every block and every token after the chunk, and the run WITHOUT the
# instruction reproduces the run WITH it, to rounding. The same change can be written into the
# weights instead: the MLP then reads a shifted input, and a low-rank patch of its input matrix
# (a *virtual weight matrix*) turns the reduced input into the full one. Nothing is fitted or
# approximated (the mathematics is in `docs/theory.md`). In float64 the logits agree to better
# than 1e-12.
#
# Run it in Jupyter (`jupyter lab tutorials/`, after `pip install -e ".[notebooks]"`) or as a
# script: `python tutorials/01_exact_equivalence.py`. About a minute on a CPU.

# %%
# %matplotlib inline
import os
from pathlib import Path

import torch

import tl_thoughts as tt
from tl_thoughts import plots
from tl_thoughts.models import load_default_model

OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorial_outputs"))
model = load_default_model(dtype=torch.float64)  # float64: the equivalence is exact to ~1e-12

# %% [markdown]
# ## The example: with the instruction, without it, without it but patched
# `verify` runs the prompt with the instruction, without it (each kept token at its original
# position: THEORY section 1), and without it but patched (here the weight form). Typed afresh,
# with the tokens shifted left, the prompt without the instruction starts its answer with "Cats":
# the last section runs it that way.

# %%
instruction = "Answer with yes or no."
prompt = model.tokenizer.apply_chat_template(
    [{"role": "user", "content": instruction + "\nCan cats fly?"}],
    tokenize=False, add_generation_prompt=True,
)
updates = tt.implicit_updates(model, prompt, instruction)  # the update, in every block
report = tt.verify(model, updates)  # runs the prompt with, without, and without but patched
for label, logits in (("with the instruction", report.full_logits[-1]),
                      ("without it", report.forms["unpatched"].logits[-1]),
                      ("without it, patched", report.forms["weight"].logits[-1])):
    print(f"{label:>20}: top next tokens", model.to_str_tokens(logits.topk(3).indices))
assert report.forms["unpatched"].logits[-1].argmax() != report.full_logits[-1].argmax()
assert report.forms["weight"].logits[-1].argmax() == report.full_logits[-1].argmax()

# %% [markdown]
# ## The prompt and the chunk
# The chunk is a substring of the prompt (or a `slice` of token positions). Every token after it
# is "kept"; the tokens before it (here the chat template's prefix) are never affected.

# %%
print("chunk positions:", updates.chunk, "| kept positions after it:", updates.positions.tolist())
print("virtual weight vectors:", tuple(updates.vectors.shape), "[layer, kept, d_model]")
print("per head:", tuple(updates.head_vectors.shape), "[layer, kept, head, d_model]")
W_in = updates.matrices("W_in")  # rank-1 patch per block and kept token, never dense
print("virtual weight matrices (W_in):", tuple(W_in.shape), "as factors", tuple(W_in.A.shape), tuple(W_in.B.shape))

# %% [markdown]
# The per-head vectors add up to the block's vector (GQA heads read their shared key/value head):

# %%
err = (updates.head_vectors.sum(2) - updates.vectors).abs().max()
print(f"max |sum over heads - block vector| = {err:.1e}")
assert err < 1e-12

# %% [markdown]
# ## Verification, layer by layer
# The report compares, with the full run, (a) the reduced prompt unpatched: the chunk's own
# effect, (b) the activation form, (c) the weight form (real parameters: rank <= T patches of
# `W_gate`/`W_in` and of `W_out`, THEORY section 3).

# %%
print(report)
assert report.max_abs_logit_error < 1e-8 and report.argmax_agreement == 1.0
fig = plots.verification_report(report, save=OUT / "01_verification.png")
fig

# %% [markdown]
# ## Patch the weights and watch the outputs match
# `exact_weight_patch` gives the parameter deltas of the weight form; applying them is a context
# manager, so the model is restored on exit (also on an exception).

# %%
patch = tt.exact_weight_patch(model, updates)
print(patch.description)
reduced = updates.tokens[:, updates.span.kept_positions]  # the prompt without the instruction
with patch.applied(model):  # patched parameters, no hooks; restored on exit
    patched_logits = model(reduced)[0, -1]
full_logits = model(updates.tokens)[0, -1]
plain_logits = model(reduced)[0, -1]
for label, logits in (("with the chunk", full_logits), ("without it", plain_logits),
                      ("without, patched", patched_logits)):
    print(f"{label:>17}:", model.to_str_tokens(logits.topk(5).indices))
err = (patched_logits - full_logits).abs().max()
print(f"max |logit error| of the patched run: {err:.1e}")
assert err < 1e-8
