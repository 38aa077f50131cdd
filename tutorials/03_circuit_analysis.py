# %% [markdown]
# # Tutorial 3: which heads carry a few-shot prompt's effect?
#
# After five antonym pairs ("hot -> cold", "big -> small", ...), SmolLM2 completes "fast ->" with
# " slow"; without the pairs its top next token is a blank. Added back in every block, the exact
# update of tutorial 1 restores " slow". But which attention heads carry it?
#
# **The chunk's effect, head by head.** A block's attention output is a sum over heads, and so is
# the chunk's contribution to it: each head's virtual weight vector is what that head read from
# the demonstrations (its output over all the tokens minus its output renormalised over the kept
# tokens alone). The per-head vectors add up exactly to the block's vector, so the effect can be
# attributed to heads the way TransformerLens attributes logits: the norm of each head's vector,
# the attention it puts on the chunk, its direct effect on the answer's logit difference.
#
# **The causal check.** A direct effect is only the path straight to the logits. To know which
# heads the effect needs, we add back only the top-k heads' vectors to the prompt without the
# demonstrations and measure how much of the logit difference returns; at k = all heads it is
# all of it, exactly. Per-head attributions in TransformerLens' style (`"L{l}H{h}"` labels,
# `pos_slice`), heatmaps, per-token bars, recovery curves. A few minutes on a CPU.

# %%
# %matplotlib inline
import os
from pathlib import Path

import torch

import tl_thoughts as tt
from tl_thoughts import analysis, plots
from tl_thoughts.models import load_default_model

OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorial_outputs"))
model = load_default_model()
demos = "hot -> cold\nbig -> small\nup -> down\nhappy -> sad\ntall -> short\n"
prompt = "<|im_start|>" + demos + "fast ->"
updates = tt.implicit_updates(model, prompt, demos)
str_tokens = model.to_str_tokens(updates.tokens[0])
print(str_tokens)

# %% [markdown]
# The metric: the logit difference between the right answer and the model's top token without
# the demonstrations, at the last position.

# %%
report = tt.verify(model, updates, forms=("activation",))
without_top = int(report.forms["unpatched"].logits[-1].argmax())
right = model.to_single_token(" slow")
pair = (right, without_top)
print("with the demonstrations:      ", model.to_str_tokens(report.full_logits[-1].topk(3).indices))
print("without them:                ", model.to_str_tokens(report.forms["unpatched"].logits[-1].topk(3).indices))
print("without them, every head back:", model.to_str_tokens(report.forms["activation"].logits[-1].topk(3).indices))
assert int(report.full_logits[-1].argmax()) == right == int(report.forms["activation"].logits[-1].argmax()) != without_top
print("metric:", repr(model.to_single_str_token(right)), "-", repr(model.to_single_str_token(without_top)))

# %% [markdown]
# ## Attributions
# Three per-head views, stacked layer-major like TransformerLens heads: the norm of each head's
# vector, the attention mass it puts on the chunk, and its direct effect on the metric (straight
# to the unembedding through the final norm with its scale frozen, as `apply_ln_to_stack` does).
# Direct effects add up: per head to per block, per block to the whole update.

# %%
direct, labels = analysis.head_attribution(model, updates, metric="direct_effect", answer_tokens=pair,
                                           pos_slice=-1, return_labels=True)
attention = analysis.head_attribution(model, updates, metric="chunk_attention", pos_slice=-1)
top = direct[:, 0].abs().argsort(descending=True)[:8]
print("largest |direct effect|:", [(labels[i], round(float(direct[i, 0]), 2)) for i in top])
blocks = analysis.direct_effect(model, updates, pair)[:, -1]
assert torch.allclose(direct[:, 0].reshape(model.cfg.n_layers, -1).sum(1), blocks, atol=1e-4)
fig = plots.head_heatmap(direct[:, 0], n_heads=model.cfg.n_heads, title="direct effect per head",
                         label="logit difference", save=OUT / "03_direct_effect.png")
fig

# %%
fig = plots.head_heatmap(attention[:, 0], n_heads=model.cfg.n_heads, title="attention on the chunk",
                         save=OUT / "03_chunk_attention.png")
fig

# %%
values = torch.full((len(str_tokens),), float("nan"))
values[updates.positions] = updates.vectors.norm(dim=-1).sum(0).cpu()
fig = plots.token_bars(values, str_tokens, chunk=updates.chunk, label="sum over layers of |vector|",
                       save=OUT / "03_tokens.png")
fig

# %% [markdown]
# ## The causal check: top-k heads added back
# At k = all heads the curve reaches the full run exactly (the activation form of tutorial 1).
# Ranked by |direct effect|, it says how much the direct path explains; ranked by the
# leave-one-out score (`ranking="ablation"`: the metric with all heads minus the metric with all
# but one, every path counted), it finds the heads the effect really needs.

# %%
ks = [0, 1, 2, 3, 5, 10, 20, 40, 80, 160, model.cfg.n_layers * model.cfg.n_heads]
by_direct = analysis.top_k_recovery(model, updates, pair, ranking="direct_effect", ks=ks)
by_ablation = analysis.top_k_recovery(model, updates, pair, ranking="ablation", ks=ks, progress=True)
for name, curve in (("direct effect", by_direct), ("ablation", by_ablation)):
    print(f"{name:>14}: " + " ".join(f"k={k}:{float(r):.2f}" for k, r in zip(curve.ks, curve.recovered)))
print("top heads by ablation:", by_ablation.order[:10])
assert abs(float(by_direct.recovered[-1]) - 1) < 1e-3
fig = plots.recovery_curve(by_ablation, save=OUT / "03_recovery_ablation.png")
fig

# %% [markdown]
# ## Where in depth
# Adding back whole blocks from the bottom shows at which depth the effect is built.

# %%
by_layer = analysis.layer_recovery(model, updates, pair)
print(" ".join(f"{k}:{float(r):.2f}" for k, r in zip(by_layer.ks.tolist(), by_layer.recovered)))
fig = plots.recovery_curve(by_layer, title="blocks 0..k-1 added back", save=OUT / "03_layers.png")
fig
