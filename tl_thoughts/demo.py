"""``tl-thoughts demo``: the first thing a newcomer runs (a few minutes on a laptop CPU).

On the default model: (1) remove an instruction chunk from a chat prompt and print the exact
equivalence report; (2) fit a small thought patch for a few-shot task and show greedy generations
with the chunk, without it, and without it but patched; (3) look at where the chunk's effect lives
(heads, tokens, layers, spectra); (4) write the plots and a markdown report into a folder.
"""

import time
from pathlib import Path

import torch

import tl_thoughts as tt
from tl_thoughts import _tl, analysis, evaluation, plots
from tl_thoughts.models import load_default_model
from tl_thoughts.prompts import DEFAULT_CASE, chat_prompt
from tl_thoughts.tasks import load_task, shipped_tasks

DEMO_TASK = "past_tense"
N_SHOWN = 6


def _say(lines: list[str], text: str = "") -> None:
    print(text, flush=True)
    lines.append(text)


def run_demo(out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Run the demo and write ``report.md`` and the PNG plots into ``out``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: list[str] = ["# tl_thoughts demo", ""]
    t0 = time.perf_counter()
    model = load_default_model(dtype=dtype)
    _say(report, f"Model: `{model.cfg.model_name}` ({dtype}), loaded in {time.perf_counter() - t0:.1f} s.")

    # 1. exact equivalence
    prompt = chat_prompt(model, DEFAULT_CASE)
    updates = tt.implicit_updates(model, prompt, DEFAULT_CASE.chunk)
    verification = tt.verify(model, updates)
    _say(report, "\n## 1. Exact equivalence\n")
    _say(report, f"Chunk removed from the chat prompt: `{DEFAULT_CASE.chunk!r}`\n")
    _say(report, "```\n" + str(verification) + "\n```")
    plots.verification_report(verification, save=out / "verification.png")
    report.append("\n![per-layer residual error](verification.png)\n")

    # 2. a thought patch for a few-shot task
    task = load_task(next(p for p in shipped_tasks() if p.stem == DEMO_TASK))
    fit_idx, test_idx = evaluation.split(len(task.examples), 20, seed=0)
    # the benchmark's options (EvalConfig's), with the steering record the comparison below reads
    patch = tt.fit_thought(model, task.chunk, task.fit_examples(fit_idx), tt.FitConfig.preset("benchmark"),
                           template=task.template)
    patch.save(out / f"{task.name}.safetensors")
    _say(report, f"\n## 2. A thought patch for `{task.name}`\n")
    _say(report, f"Chunk (few-shot demonstrations), removed from every prompt below:\n\n```\n{task.chunk}```\n")
    _say(report, "| query | answer | with the chunk | without | without, patched |")
    _say(report, "|---|---|---|---|---|")
    for i in test_idx[:N_SHOWN]:
        query, answer = task.examples[i]
        with_chunk = evaluation.greedy_generate(model, task.prompt(query, True))
        without = evaluation.greedy_generate(model, task.prompt(query, False))
        with patch.apply(model):
            patched = evaluation.greedy_generate(model, task.prompt(query, False))
        _say(report, f"| {query} | {answer} | {with_chunk!r} | {without!r} | {patched!r} |")
    _say(report, f"\nPatch saved to `{task.name}.safetensors`; per layer (norms, ranks, cosine with the "
                 "mean-difference steering vector):\n")
    _say(report, "```\n" + patch.summary_table() + "\n```")
    layers = [row["layer"] for row in patch.summary()]
    plots.spectra(
        {f"L{layer} W_in": analysis.thought_matrix_spectrum(patch, layer) for layer in layers[:: max(1, len(layers) // 4)]},
        title="thought matrix spectra", save=out / "spectra.png",
    )
    report.append("\n![thought matrix spectra](spectra.png)\n")
    comparison = analysis.steering_comparison(patch)
    plots.steering_comparison(comparison, save=out / "steering.png")
    _say(report, "\nThought vector vs mean-difference steering vector vs accumulated residual difference:\n")
    _say(report, "```\n" + comparison.table() + "\n```")
    report.append("\n![steering comparison](steering.png)\n")

    # 3. where the effect lives, on one few-shot prompt
    query, answer = task.examples[test_idx[0]]
    prompt = task.prompt(query, True)
    few_shot = tt.implicit_updates(model, prompt, task.chunk)
    tokens = model.to_str_tokens(few_shot.tokens[0])
    wrong = int(tt.verify(model, few_shot, forms=("activation",)).forms["unpatched"].logits[-1].argmax())
    right = int(_tl.to_tokens(model, task.answer_prefix + answer, what="the answer", prepend_bos=False)[0, 0])
    pair = (right, wrong)
    _say(report, f"\n## 3. Which heads carry the demonstrations' effect on `{query} ->`\n")
    _say(report, f"Metric: logit difference {model.to_single_str_token(right)!r} - "
                 f"{model.to_single_str_token(wrong)!r} (the top token without the chunk) at the last position.\n")
    scores = analysis.head_attribution(model, few_shot, metric="direct_effect", answer_tokens=pair, pos_slice=-1)
    plots.head_heatmap(scores[:, 0], n_heads=model.cfg.n_heads, title="direct effect per head",
                       label="logit difference", save=out / "direct_effect.png")
    norms = torch.full((len(tokens),), float("nan"))
    norms[few_shot.positions] = few_shot.vectors.norm(dim=-1).sum(0).float().cpu()
    plots.token_bars(norms, tokens, chunk=few_shot.chunk, label="sum over layers of |vector|",
                     title="size of the implicit update per kept token", save=out / "tokens.png")
    curve = analysis.layer_recovery(model, few_shot, pair)
    plots.recovery_curve(curve, title="blocks 0..k-1 added back", save=out / "layers.png")
    _say(report, "Blocks whose vectors, added back from the bottom, restore the effect "
                 f"(fraction recovered at k = 0, 10, 20, 30): "
                 f"{', '.join(f'{float(curve.recovered[k]):.2f}' for k in (0, 10, 20, model.cfg.n_layers))}.\n")
    for name, caption in (("direct_effect.png", "direct effect per head"),
                          ("tokens.png", "implicit update per token"),
                          ("layers.png", "recovery by depth")):
        report.append(f"![{caption}]({name})\n")
    _say(report, f"\nDone in {time.perf_counter() - t0:.0f} s. Report: {out / 'report.md'}")
    (out / "report.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    return out
