# %% [markdown]
# # Tutorial 1: a prompt chunk is exactly a weight update
#
# We remove an instruction from a chat prompt, compute the implicit update it induced in every
# block at every later token, and check that the model run WITHOUT the instruction but with the
# update reproduces the run WITH it: first with hooks (activation form), then with really
# patched parameters and no hooks (weight form). Runs in about a minute on a CPU.
#
# Open it as a notebook with `jupytext --to notebook 01_exact_equivalence.py`, or run it as a
# script: `python tutorials/01_exact_equivalence.py`.

# %%
import os
from pathlib import Path

import torch

import tl_thoughts as tt
from tl_thoughts import plots
from tl_thoughts.models import load_default_model

OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorial_outputs"))
model = load_default_model(dtype=torch.float64)  # float64: the equivalence is exact to ~1e-12

# %% [markdown]
# ## The prompt and the chunk
# The chunk is a substring of the prompt (or a `slice` of token positions). Every token after it
# is "kept"; the tokens before it (here the chat template's prefix) are never affected.

# %%
instruction = "Answer with exactly one word, in French."
prompt = model.tokenizer.apply_chat_template(
    [{"role": "user", "content": instruction + "\nWhat animal says meow?"}],
    tokenize=False, add_generation_prompt=True,
)
updates = tt.implicit_updates(model, prompt, instruction)
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
report = tt.verify(model, updates)
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
