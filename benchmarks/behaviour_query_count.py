"""Would 150 unlabelled queries, a smaller ridge and the rank chosen on the queries too take the
least-squares thought patch past 90%? The table of the section "More queries, a smaller ridge, the
rank chosen on the queries" in ``docs/benchmark.md`` comes from this script:

    .venv/bin/python benchmarks/behaviour_query_count.py

Per task and seed (0, 1, 2), on the protocol's own split (``evaluation.split``: the 20 fit
examples; the test examples filtered with ``evaluation.example_verdicts``, as the suite does), the
least-squares thought patch is fitted with ``EvalConfig``'s options on the 20 fit examples plus the
first 60 (the earlier defaults) or 150 (the defaults of 2 December, before 480) of the task's
unlabelled queries that the model answers with the chunk (``evaluation.query_answers``), at the
ridge ``ridge * rows / 20`` with ``ridge`` 1 (earlier) or 0.5 (since). Each patch's matrices are
truncated to the candidate ranks of ``EvalConfig.ranks`` until 2 December (1, 4, 16 and as fitted,
``behaviour_generalisation.EARLIER_RANKS``), and each candidate is scored without the chunk on the
20 fit examples, on the answered queries (against the model's own answers with the chunk) and on
the filtered test examples. The rank is then chosen as ``evaluation.choose_rank`` does (accuracy,
then mean log-probability, then the smaller rank), on the fit examples alone (the suite's choice)
or on the fit examples plus the queries (``EvalConfig.rank_on_queries``); both are checked against
``choose_rank`` itself. The row "60 queries, ridge 1", rank on the fit examples, is the
``thought_patch`` of the suite at its earlier defaults (``tl-thoughts eval --suite --queries 60
--ridge 1 --ranks 1 4 16 0``); the row "150 queries, ridge 0.5", rank on the fit examples, is the
suite's ``thought_patch`` at its defaults until 2 December (``--queries 150 --ranks 1 4 16 0``),
and on fit + queries that of the same with ``--rank-on-queries``.

The options are those of ``behaviour_generalisation.seeds_main``: the tasks and seeds measured, and
saving the raw verdicts or printing the table of saved runs (``--help``).
"""

import time

import numpy as np
import torch
from behaviour_generalisation import (  # this folder is on sys.path
    SUITE_150,
    print_header,
    protocol_split,
    rank_label,
    record,
    seeds_main,
    task_and_seed_means,
    tasks_and_seeds,
)

from tl_thoughts import _tl
from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks
from tl_thoughts.thoughts import fit_thought

VARIANTS = {  # name: (answered queries, EvalConfig.ridge)
    "60 queries, ridge 1 (the earlier defaults)": (60, 1.0),
    "150 queries, ridge 1": (150, 1.0),
    "150 queries, ridge 0.5 (the defaults)": (150, 0.5),
}
CHECKED = {(60, 1.0): "fit examples", (150, 0.5): "fit + queries"}  # choices checked against choose_rank
CHOICES = ("fit examples", "fit + queries")


def _key(scores: dict, rank: str, on: tuple[str, ...]) -> tuple:
    """``choose_rank``'s ordering of a candidate, on the concatenated sets ``on``."""
    right = sum((scores[rank][s] for s in on), [])
    logprob = sum((scores[rank][s + "_logprob"] for s in on), [])
    size = float("inf") if rank == "None" else int(rank)
    return float(np.mean(right)), float(np.mean(logprob)), -size


def chosen(scores: dict, choice: str) -> str:
    on = ("fit",) if choice == "fit examples" else ("fit", "queries")
    return max(scores, key=lambda rank: _key(scores, rank, on))


def measure(args) -> dict:
    torch.manual_seed(0)
    model = load_default_model()
    stops = E.stop_tokens(model)
    config = E.EvalConfig(**SUITE_150)  # the suite's defaults until 2 December, as when this table was measured
    assert (config.n_queries, config.ridge, config.rank_on_queries) == (150, 0.5, False)  # the last variant
    bs = config.batch_size
    tasks = [load_task(p) for p in shipped_tasks() if args.tasks is None or p.stem in args.tasks]
    t0 = time.perf_counter()
    raw = {}
    for task in tasks:
        verdicts = E.example_verdicts(model, task, batch_size=bs)
        answered = E.query_answers(model, task, max(n for n, _ in VARIANTS.values()), batch_size=bs)
        answered_set = [E._encode(model, task, q, a) for q, a in answered]  # the protocol's rows, once a task
        for seed in args.seeds:
            fit_idx, fit_set, test = protocol_split(model, task, verdicts, config.n_fit, seed)
            entry = {}
            for name, (n, ridge) in VARIANTS.items():
                pairs = task.fit_examples(fit_idx) + [(q, task.continuation(a)) for q, a in answered[:n]]
                query_set = answered_set[:n]
                options = E.EvalConfig(ridge=ridge).fit_options_for(len(pairs))
                with _tl.linear_layout(model):
                    patch = fit_thought(model, task.chunk, pairs, template=task.template, fit="both",
                                        compare_steering=False, progress=False, batch_size=bs, **options)
                    ints = [r for r in config.ranks if r is not None]
                    candidates = dict(zip(ints, patch.truncations(ints)))
                    if None in config.ranks:
                        candidates[None] = patch
                    scores = {}
                    for rank, p in candidates.items():
                        row = {}
                        with p.apply(model):
                            for label, rows in (("fit", fit_set), ("queries", query_set), ("test", test)):
                                right, logprob = E.greedy_match(model, rows, with_chunk=False, stops=stops,
                                                                batch_size=bs)
                                row[label], row[label + "_logprob"] = right.tolist(), logprob.tolist()
                        scores[str(rank)] = row
                    if (n, ridge) in CHECKED:  # the same choice as the protocol's own code
                        choice = CHECKED[n, ridge]
                        rows = fit_set + query_set if choice == "fit + queries" else fit_set
                        _, rank = E.choose_rank(model, patch, config.ranks, rows, stops=stops, batch_size=bs)
                        assert str(rank) == chosen(scores, choice), (task.name, seed, rank)
                entry[name] = scores
            record(raw, task.name, seed, entry, args.save, t0)
    raw["_seconds"] = time.perf_counter() - t0
    return raw


def table(raw: dict) -> None:
    names, seeds = tasks_and_seeds(raw)
    print_header(["fit rows, ridge", "rank chosen on"], names)
    ranks = {}
    for variant in VARIANTS:
        for choice in CHOICES:
            acc = {}
            for t in names:
                for s in seeds:
                    if f"{t}|{s}" not in raw:
                        continue
                    scores = raw[f"{t}|{s}"][variant]
                    rank = chosen(scores, choice)
                    ranks.setdefault((variant, choice), []).append(f"{t} {rank_label(None if rank == 'None' else rank)}")
                    acc[t, s] = 100 * float(np.mean(scores[rank]["test"]))
            per_task, per_seed = task_and_seed_means(acc, names, seeds)
            print(f"| {variant} | {choice} | " + " | ".join(f"{v:.0f}" for v in per_task)
                  + f" | {np.mean(per_task):.1f} | " + " / ".join(f"{v:.1f}" for v in per_seed) + " |")
    print("\nranks chosen (per task, seeds in order " + ", ".join(seeds) + "):")
    for (variant, choice), labels in ranks.items():
        print(f"  {variant}, on the {choice}: " + "; ".join(labels))
    print(f"\nseeds {seeds}; cells: accuracy % on the filtered test examples without the chunk, mean over seeds")


def main() -> None:
    seeds_main(__doc__.split("\n\n")[0], measure, table)


if __name__ == "__main__":
    main()
