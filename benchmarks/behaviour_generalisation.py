"""Does the thought patch miss because it cannot fit, or because it does not generalise? And why
did more fit examples not help? The numbers under "Findings" in ``docs/benchmark.md`` (fit and
test accuracy, ridge strength, the number of fit examples, the model's own answers as labels, and
scaled patches) come from this script:

    .venv/bin/python benchmarks/behaviour_generalisation.py

Per task (one seed), the examples are shuffled as in ``tl-thoughts eval`` (``evaluation.split``):
the first 20 of the shuffled order are the protocol's fit examples, the next 20 the extra fit
examples of the ``n_fit=40`` variants, and the rest the test examples, the same for every variant
(so that the variants with 40 fit examples are compared on the same test examples as those with
20). Both the fit and the test examples are filtered as in the protocol (right with the chunk,
wrong without). For each variant (options of ``fit_thought`` changed from ``EvalConfig``'s; the
thought matrices as fitted, without a rank chosen among candidates) it
prints the thought patch's accuracy, without the chunk, on the filtered FIT examples it was fitted
on ("fit") and on the filtered test examples ("test"). The last variant fits on the model's own
greedy answers with the chunk instead of the task's answers (the "fit" column still scores the
task's answers).

A second table scales the default patch after fitting, as steering vectors are often scaled: every
delta by ``all``, and the thought vectors (``b_O``) by ``vector`` on top; accuracy on the filtered
test examples.

Options: ``--tasks`` (default: all shipped), ``--seed`` (default 0), ``--old-patch`` (the
options of the patch of 82.5%, ``OLD_PATCH``).
"""

import argparse
import json
import time

import numpy as np
import torch

from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.patch import ThoughtPatch
from tl_thoughts.tasks import load_task, shipped_tasks
from tl_thoughts.thoughts import fit_thought

# The benchmark's thought patch before the W_out thought matrix and the unpatched prefix became
# EvalConfig's defaults (the patch of 82.5%; benchmarks/behaviour_prefix.py measures the two options).
# The findings scripts use EvalConfig's options, or these with --old-patch (their tables as first
# measured, in git history); behaviour_refine.py always uses these (see there).
OLD_PATCH = dict(output_matrix=False, patch_prefix=True)
OLD_PATCH_HELP = (f"fit the thought patch of 82.5%% ({OLD_PATCH}: no W_out thought matrix, the prefix patched) "
                  "instead of EvalConfig's, as these findings were first measured")  # %% for argparse
EARLIER_RANKS = (1, 4, 16, None)  # EvalConfig.ranks until 2 December (since then as fitted, no choice)
# EvalConfig's defaults when the findings up to the section "150 queries at ridge 0.5" of
# docs/benchmark.md were measured: 60 answered queries, ridge 1, the rank chosen among
# EARLIER_RANKS (since then 150 queries and ridge 0.5, then 480 queries as fitted). The findings
# scripts pin them, so that they print their tables again.
FINDINGS = dict(n_queries=60, ridge=1.0, ranks=EARLIER_RANKS)
SUITE_150 = dict(n_queries=150, ridge=0.5, ranks=EARLIER_RANKS)  # the suite's defaults until 2 December
N_FIT = E.EvalConfig().n_fit  # the protocol's fit examples (20)
N_EXTRA = 40  # fit examples of the n_fit=40 variants
OWN_ANSWERS = "fitted on the model's own answers with the chunk (no labels)"
VARIANTS = {  # name: (number of fit examples, changes to EvalConfig().fit_options)
    "defaults (20 fit examples, ridge 1)": (N_FIT, {}),
    "ridge 0.1": (N_FIT, {"ridge": 0.1}),
    "ridge 0.5": (N_FIT, {"ridge": 0.5}),
    "ridge 2": (N_FIT, {"ridge": 2.0}),
    "40 fit examples, ridge 1": (N_EXTRA, {}),
    "40 fit examples, ridge 2": (N_EXTRA, {"ridge": 2.0}),
    OWN_ANSWERS: (N_FIT, {}),
}
SCALES = [(1.0, 1.0), (0.8, 1.0), (1.2, 1.0), (1.0, 0.5), (1.0, 1.5), (1.0, 2.0)]  # (all, vector)


def scaled(patch: ThoughtPatch, all_: float, vector: float) -> ThoughtPatch:
    """The patch with every delta times ``all_`` and the thought vectors times ``vector`` more."""
    deltas = {k: d * all_ * (vector if k.endswith((".b_O", ".b_out")) else 1.0) for k, d in patch.deltas.items()}
    return ThoughtPatch(deltas=deltas, steering=patch.steering, meta=patch.meta)


def findings_config(old_patch: bool, **changes) -> E.EvalConfig:
    """``EvalConfig(n_queries=0, ridge=1, ranks=EARLIER_RANKS, **changes)``, with the options of
    the patch of 82.5% if ``old_patch``: the findings take apart the patch fitted on the 20 fit
    examples alone, without the unlabelled queries the protocol adds since (``behaviour_queries.py``
    measures those), at the ridge and the candidate ranks of the time (:data:`FINDINGS`)."""
    return E.EvalConfig(**{**FINDINGS, "n_queries": 0, **(OLD_PATCH if old_patch else {}), **changes})


def own_answer(model, task, query: str) -> str | None:
    """The model's greedy answer to ``query`` WITH the chunk, cut at the first line break (None where
    the generation does not start with the answer prefix, is empty, or has spaces around it)."""
    text = E.greedy_generate(model, task.prompt(query, with_chunk=True), max_new_tokens=12)
    own = text[len(task.answer_prefix):] if text.startswith(task.answer_prefix) else ""
    return own if own and own == own.strip() else None


def own_answers(model, task, indices) -> list[tuple[str, str]]:
    """``(query, continuation)`` fit pairs whose answers are the model's greedy answers WITH the
    chunk (``own_answer``; the task's answer where there is none)."""
    pairs = []
    for i in indices:
        query, answer = task.examples[i]
        own = own_answer(model, task, query)
        pairs.append((query, task.continuation(answer if own is None else own)))
    return pairs


def filtered(model, task, indices, stops, batch_size):
    """Encoded examples right with the chunk and wrong without it."""
    examples = E.encode_task_examples(model, task, indices)
    keep, _, _ = E.chunk_filter(model, examples, stops=stops, batch_size=batch_size)
    return [e for e, k in zip(examples, keep.tolist()) if k]


def protocol_split(model, task, verdicts, n_fit: int, seed: int) -> tuple[list[int], list, list]:
    """The suite's split of ``seed`` (``evaluation.split``): the fit indices, the fit examples
    encoded, and the test examples filtered as the protocol does with the task's
    ``evaluation.example_verdicts`` (right with the chunk, wrong without it)."""
    fit_idx, test_idx = E.split(len(task.examples), n_fit, seed)
    keep = (verdicts[0][torch.tensor(test_idx)] & ~verdicts[1][torch.tensor(test_idx)]).tolist()
    test = [e for e, k in zip(E.encode_task_examples(model, task, test_idx), keep) if k]
    return fit_idx, E.encode_task_examples(model, task, fit_idx), test


def rank_label(rank: int | None) -> str:
    """A candidate rank as the docs' tables write it (None: ``"as fitted"``)."""
    return "as fitted" if rank is None else str(rank)


def generalisation_split(model, task, seed, stops, batch_size) -> tuple[list[int], list]:
    """The protocol's fit indices for ``seed`` (the first ``N_FIT`` of its shuffled order) and the
    filtered test examples after the first ``N_EXTRA``."""
    order = np.random.default_rng(seed).permutation(len(task.examples)).tolist()
    fit_idx = sorted(order[:N_FIT])
    assert fit_idx == E.split(len(task.examples), N_FIT, seed)[0]  # the protocol's fit examples
    return fit_idx, filtered(model, task, sorted(order[N_EXTRA:]), stops, batch_size)


def save(raw: dict, path: str) -> None:
    """Write a run's raw measurements as JSON."""
    with open(path, "w") as f:
        json.dump(raw, f)


def record(raw: dict, task: str, seed: int, entry: dict, path: str | None, t0: float) -> None:
    """Store one task and seed's measurements in ``raw`` (key ``"task|seed"``), write ``raw`` to
    ``path`` if given (after every task, so that a stopped run keeps what it measured), and print
    the progress."""
    raw[f"{task}|{seed}"] = entry
    if path:
        save(raw, path)
    print(f"{task} seed {seed}: done ({time.perf_counter() - t0:.0f} s)", flush=True)


def tasks_and_seeds(raw: dict) -> tuple[list[str], list[str]]:
    """The tasks and the seeds of a saved run (keys ``"task|seed"``), sorted."""
    pairs = [k for k in raw if not k.startswith("_")]
    return sorted({k.split("|")[0] for k in pairs}), sorted({k.split("|")[1] for k in pairs})


def print_header(columns: list[str], names: list[str]) -> None:
    """The header of a markdown table: ``columns``, one column per task, the mean and per seed."""
    print("| " + " | ".join([*columns, *names, "mean", "per seed"]) + " |")
    print("|" + "---|" * (len(columns) + len(names) + 2))


def task_and_seed_means(acc: dict, names: list[str], seeds: list[str]) -> tuple[list[float], list[float]]:
    """From ``{(task, seed): value}``, the mean per task (in ``names``' order) and per seed."""
    per_task = [float(np.mean([v for (t, _), v in acc.items() if t == name])) for name in names]
    per_seed = [float(np.mean([v for (_, s), v in acc.items() if s == seed])) for seed in seeds]
    return per_task, per_seed


def seeds_main(description: str, measure, table) -> None:
    """The ``main`` of a script measured per task and seed, whose runs can be split over processes:
    ``--tasks`` (default: all shipped), ``--seeds`` (default 0 1 2), ``--save FILE`` (the raw
    measurements as JSON), ``--load FILE [FILE ...]`` (``table`` of saved runs, merged, instead of
    ``measure(args)``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--save", default=None, help="write the raw measurements as JSON (after every task)")
    parser.add_argument("--load", nargs="+", default=None, help="print the tables from saved runs instead")
    args = parser.parse_args()
    if args.load:
        raw = {}
        for path in args.load:
            with open(path) as f:
                raw.update(json.load(f))
    else:
        raw = measure(args)
        if args.save:
            save(raw, args.save)
        print(f"{raw['_seconds']:.0f} s")
    table(raw)


def fit_and_test_accuracy(model, patch, fit_right, test, stops, batch_size) -> tuple[float, float]:
    """The patch's accuracy without the chunk on the filtered fit and test examples."""
    with patch.apply(model):
        on_fit, _ = E.greedy_match(model, fit_right, with_chunk=False, stops=stops, batch_size=batch_size)
        on_test, _ = E.greedy_match(model, test, with_chunk=False, stops=stops, batch_size=batch_size)
    return float(on_fit.double().mean()), float(on_test.double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--old-patch", action="store_true", help=OLD_PATCH_HELP)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_default_model()
    stops = E.stop_tokens(model)
    config = findings_config(args.old_patch)
    bs = config.batch_size
    paths = shipped_tasks()
    tasks = [load_task(p) for p in paths if args.tasks is None or p.stem in args.tasks]
    t0 = time.perf_counter()
    cells: dict[str, list[str]] = {name: [] for name in VARIANTS}
    scores: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    counts = []
    by_scale: dict[tuple[float, float], list[float]] = {sc: [] for sc in SCALES}
    for task in tasks:
        order = np.random.default_rng(args.seed).permutation(len(task.examples)).tolist()
        # the protocol's own fit examples for this seed
        assert sorted(order[:N_FIT]) == E.split(len(task.examples), N_FIT, args.seed)[0]
        test = filtered(model, task, sorted(order[N_EXTRA:]), stops, bs)
        counts.append(len(test))
        fit_right = {n: filtered(model, task, sorted(order[:n]), stops, bs) for n in (N_FIT, N_EXTRA)}
        for name, (n_fit, change) in VARIANTS.items():
            fit_idx = sorted(order[:n_fit])
            patch = fit_thought(
                model, task.chunk,
                own_answers(model, task, fit_idx) if name == OWN_ANSWERS else task.fit_examples(fit_idx),
                template=task.template, fit="both",
                compare_steering=False, progress=False, batch_size=bs, **{**config.fit_options, **change},
            )
            a_fit, a_test = fit_and_test_accuracy(model, patch, fit_right[n_fit], test, stops, bs)
            cells[name].append(f"{100 * a_fit:.0f} / {100 * a_test:.0f}")
            scores[name].append((a_fit, a_test))
            if name == next(iter(VARIANTS)):  # the defaults: scaled copies
                for sc in SCALES:
                    with scaled(patch, *sc).apply(model):
                        right, _ = E.greedy_match(model, test, with_chunk=False, stops=stops, batch_size=bs)
                    by_scale[sc].append(float(right.double().mean()))
        print(f"{task.name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    names = [t.name for t in tasks]
    print("\n| variant | " + " | ".join(names) + " | mean |")
    print("|---|" + "---|" * (len(names) + 1))
    print("| filtered test examples | " + " | ".join(map(str, counts)) + " | |")
    for name in VARIANTS:
        m_fit, m_test = np.mean([s[0] for s in scores[name]]), np.mean([s[1] for s in scores[name]])
        print(f"| {name} | " + " | ".join(cells[name]) + f" | {100 * m_fit:.0f} / {100 * m_test:.0f} |")
    print("\n| scale (all, vector) | " + " | ".join(names) + " | mean |")
    print("|---|" + "---|" * (len(names) + 1))
    for sc, values in by_scale.items():
        print(f"| {sc[0]:g}, {sc[1]:g} | " + " | ".join(f"{100 * v:.0f}" for v in values)
              + f" | {100 * np.mean(values):.0f} |")
    print(f"\nseed {args.seed}; cells: thought patch accuracy % on the filtered fit examples / on the "
          f"filtered test examples (second table: on the test examples); {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
