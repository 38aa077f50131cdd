"""``tl-thoughts demo``: the first thing a newcomer runs (about 16 s on a quiet 2-core CPU, 2.0 to 2.1
times ``tl-thoughts verify``, as ``benchmarks/bench_demo.py`` measures).

On the default model: (1) remove an instruction chunk from a chat prompt and print the exact
equivalence report; (2) fit a small thought patch for a few-shot task and show greedy generations
with the chunk, without it, and without it but patched, on test queries the model answers right
with the chunk (checked, and said so); (3) look at where the chunk's effect lives (heads, tokens,
layers, spectra) on one of those queries; (4) write the plots and a markdown report into a folder.
Each stage prints a line with its time (the fit, the longest, a progress bar).
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import tl_thoughts as tt
from tl_thoughts import _tl, analysis, evaluation, plots
from tl_thoughts.models import load_default_model
from tl_thoughts.prompts import DEFAULT_CASE, chat_prompt
from tl_thoughts.tasks import load_task, shipped_tasks

DEMO_TASK = "past_tense"
N_SHOWN = 5
MAX_TRIED = 10  # test queries tried, in the split's order, to find N_SHOWN the model answers right with the chunk


def _say(lines: list[str], text: str = "") -> None:
    print(text, flush=True)
    lines.append(text)


@contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    """Print a line when the stage starts and one with its wall time when it ends; record the time."""
    print(f"[demo] {name} ...", flush=True)
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0
    print(f"[demo] {name}: {timings[name]:.1f} s", flush=True)


def run_demo(out: Path, dtype: torch.dtype = torch.float32, *, timings: dict[str, float] | None = None) -> Path:
    """Run the demo and write ``report.md`` and the PNG plots into ``out``; returns ``out``.

    Args:
        out: The folder written.
        dtype: The model's dtype.
        timings: A dict filled with each stage's wall time in seconds (``benchmarks/bench_demo.py``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {} if timings is None else timings
    report: list[str] = ["# tl_thoughts demo", ""]
    t0 = time.perf_counter()
    with _stage(timings, "load the model"):
        model = load_default_model(dtype=dtype)
    _say(report, f"Model: `{model.cfg.model_name}` ({dtype}), loaded in {timings['load the model']:.1f} s.")

    # 1. exact equivalence
    with _stage(timings, "verify"):
        prompt = chat_prompt(model, DEFAULT_CASE)
        updates = tt.implicit_updates(model, prompt, DEFAULT_CASE.chunk)
        verification = tt.verify(model, updates)
        plots.verification_report(verification, save=out / "verification.png")
    _say(report, "\n## 1. Exact equivalence\n")
    _say(report, f"Chunk removed from the chat prompt: `{DEFAULT_CASE.chunk!r}`\n")
    _say(report, "```\n" + str(verification) + "\n```")
    report.append("\n![per-layer residual error](verification.png)\n")

    # 2.-3.: many short runs: the weights laid out for TransformerLens' products once (same values)
    with _tl.linear_layout(model):
        _patch_and_attribution(model, out, report, timings)
    _say(report, "\nStage times (s): " + ", ".join(f"{name} {t:.1f}" for name, t in timings.items()) + ".")
    _say(report, f"\nDone in {time.perf_counter() - t0:.0f} s. Report: {out / 'report.md'}")
    (out / "report.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    return out


def _patch_and_attribution(model, out: Path, report: list[str], timings: dict[str, float]) -> None:
    """Stages 2 (a thought patch for a few-shot task) and 3 (where its effect lives)."""
    task = load_task(next(p for p in shipped_tasks() if p.stem == DEMO_TASK))
    fit_idx, test_idx = evaluation.split(len(task.examples), 20, seed=0)
    with _stage(timings, "fit the thought patch"):
        # the benchmark's options (EvalConfig's), with the steering record the comparison below reads
        patch = tt.fit_thought(model, task.chunk, task.fit_examples(fit_idx), tt.FitConfig.preset("benchmark"),
                               template=task.template)
        patch.save(out / f"{task.name}.safetensors")
    _say(report, f"\n## 2. A thought patch for `{task.name}`\n")
    _say(report, f"Chunk (few-shot demonstrations), removed from every prompt below:\n\n```\n{task.chunk}```\n")
    with _stage(timings, "generate"):
        shown, skipped = _generations(model, task, patch, test_idx[:MAX_TRIED])
    tried = len(shown) + len(skipped)
    _say(report, "| query | answer | with the chunk | without | without, patched |")
    _say(report, "|---|---|---|---|---|")
    for query, answer, with_chunk, without, patched in shown:
        _say(report, f"| {query} | {answer} | {with_chunk!r} | {without!r} | {patched!r} |")
    checked = "every query shown is answered right with the chunk (checked)"
    if skipped:
        checked += "; skipped, answered wrong with the chunk: " + ", ".join(
            f"{q} -> {g!r} (not {a!r})" for q, a, g in skipped)
    _say(report, f"\n{len(shown)} of the first {tried} test queries are answered right with the chunk: {checked}.")
    if len(shown) < N_SHOWN:
        _say(report, f"WARNING: only {len(shown)} of the first {MAX_TRIED} test queries are answered right "
                     "with the chunk.")
    with _stage(timings, "summary table"):
        table = patch.summary_table()
    _say(report, f"\nPatch saved to `{task.name}.safetensors`; per layer (norms, ranks, cosine with the "
                 "mean-difference steering vector):\n")
    _say(report, "```\n" + table + "\n```")
    with _stage(timings, "spectra and steering"):
        layers = patch.layers
        plots.spectra(
            {f"L{layer} W_in": analysis.thought_matrix_spectrum(patch, layer)
             for layer in layers[:: max(1, len(layers) // 4)]},
            title="spectra of the thought matrices W_in (blocks.{l}.mlp)", save=out / "spectra.png",
        )
        comparison = analysis.steering_comparison(patch)
        plots.steering_comparison(comparison, save=out / "steering.png")
    report.append("\n![thought matrix spectra](spectra.png)\n")
    _say(report, "\nThought vector vs mean-difference steering vector vs accumulated residual difference:\n")
    _say(report, "```\n" + comparison.table() + "\n```")
    report.append("\n![steering comparison](steering.png)\n")

    # 3. where the effect lives, on one few-shot prompt the model answers right with the chunk
    with _stage(timings, "attribution"):
        found = _attribution_query(model, task, shown)
        if found is None:
            _say(report, "\n## 3. No attribution: no query shown is answered differently without the chunk.\n")
        else:
            _attribution(model, task, report, out, *found)


def _generations(model, task, patch, indices):
    """The first [`N_SHOWN`][] test examples the model answers right with the chunk, with their
    generations ``(query, answer, with the chunk, without, without but patched)``, and the ones
    skipped ``(query, answer, generation with the chunk)``."""
    examples = [task.examples[i] for i in indices]
    with_chunk: list[str] = []
    for part in (examples[: N_SHOWN + 1], examples[N_SHOWN + 1 :]):  # the rest only if needed
        n_right = sum(g == task.answer_prefix + a for g, (_, a) in zip(with_chunk, examples))
        if part and n_right < N_SHOWN:
            with_chunk += evaluation.greedy_generate_all(model, [task.prompt(q, True, model) for q, _ in part])
    examples = examples[: len(with_chunk)]
    right = [k for k, (_, a) in enumerate(examples) if with_chunk[k] == task.answer_prefix + a][:N_SHOWN]
    last = right[-1] if len(right) == N_SHOWN else len(examples) - 1
    skipped = [(q, a, with_chunk[k]) for k, (q, a) in enumerate(examples[: last + 1]) if k not in right]
    reduced = [task.prompt(examples[k][0], False, model) for k in right]
    without = evaluation.greedy_generate_all(model, reduced)
    with patch.apply(model):
        patched = evaluation.greedy_generate_all(model, reduced)
    shown = [(*examples[k], with_chunk[k], w, p) for k, w, p in zip(right, without, patched)]
    for n, (q, _, w_c, w, p) in enumerate(shown, 1):
        print(f"  {n}/{N_SHOWN} {q!r}: with the chunk {w_c!r}, without {w!r}, patched {p!r}", flush=True)
    return shown, skipped


def _attribution_query(model, task, shown):
    """The first shown query (right with the chunk) whose top next token without the chunk is not the
    answer's first token: ``(query, answer, its updates, right token, wrong token)``, or None."""
    for query, answer, _, without, _ in shown:
        if without.startswith(task.answer_prefix + answer):
            continue  # right without the chunk too: no effect to attribute at the first answer token
        few_shot = tt.implicit_updates(model, task.prompt(query, True, model), task.chunk)
        with torch.no_grad():  # the reduced prompt at its original positions, unpatched: one run
            wrong = int(tt.run_reduced(model, few_shot, patched=False)[0, -1].argmax())
        right = int(_tl.to_tokens(model, task.answer_prefix + answer, what="the answer", prepend_bos=False)[0, 0])
        if wrong != right:
            return query, answer, few_shot, right, wrong
    return None


def _attribution(model, task, report, out, query, answer, few_shot, right, wrong) -> None:
    pair = (right, wrong)
    tokens = model.to_str_tokens(few_shot.tokens[0])
    _say(report, f"\n## 3. Which heads carry the demonstrations' effect on `{query} ->`\n")
    _say(report, f"The model answers {answer!r} with the chunk, and starts with "
                 f"{model.to_single_str_token(wrong)!r} without it. Metric: logit difference "
                 f"{model.to_single_str_token(right)!r} - {model.to_single_str_token(wrong)!r} at the last position.\n")
    scores = analysis.head_attribution(model, few_shot, metric="direct_effect", answer_tokens=pair, pos_slice=-1)
    plots.head_heatmap(scores[:, 0], n_heads=model.cfg.n_heads,
                       title=f"direct effect per head on {query} -> (blocks.{{l}}.attn.hook_result)",
                       label=f"logit difference {model.to_single_str_token(right)!r} - "
                             f"{model.to_single_str_token(wrong)!r}",
                       save=out / "direct_effect.png")
    norms = torch.full((len(tokens),), float("nan"))
    norms[few_shot.positions] = few_shot.vectors.norm(dim=-1).sum(0).float().cpu()
    plots.token_bars(norms, tokens, chunk=few_shot.chunk, label="Σ over layers of |vector|",
                     title="size of the implicit update per kept token (the chunk's own tokens have none)",
                     save=out / "tokens.png")
    curve = analysis.layer_recovery(model, few_shot, pair)
    plots.recovery_curve(curve, save=out / "layers.png")
    ks = sorted({0, model.cfg.n_layers // 3, 2 * model.cfg.n_layers // 3, model.cfg.n_layers})
    _say(report, "Blocks whose vectors, added back from the bottom, restore the effect "
                 f"(fraction recovered at k = {', '.join(map(str, ks))}): "
                 f"{', '.join(f'{float(curve.recovered[k]):.2f}' for k in ks)}.\n")
    for name, caption in (("direct_effect.png", "direct effect per head"),
                          ("tokens.png", "implicit update per token"),
                          ("layers.png", "recovery by depth")):
        report.append(f"![{caption}]({name})\n")
