"""Would more queries, without their answers, carry more of the chunk to new queries? The table
"More queries, no answers" in ``docs/benchmark.md`` comes from this script:

    .venv/bin/python benchmarks/behaviour_queries.py

The theory condenses the chunk's token-dependent updates over many queries, and a thought patch
needs no labelled answers (``behaviour_generalisation.py``: fitted on the model's own answers, it
scores the same). Queries are cheap where answers are not. Per task and seed (0, 1, 2), on the
split of ``behaviour_generalisation.py`` (the protocol's 20 fit examples; the filtered test
examples after the first 40 of the shuffled order), the thought patch is fitted with
``EvalConfig``'s options on the 20 fit examples alone, and on the same 20 plus the first 20 or 60
of the task's unlabelled ``queries`` that the model answers with the chunk, with those answers
(``evaluation.query_answers``, as the benchmark does since its ``n_queries`` option: the 60 were
the suite's then). Those queries are none of the task's examples or the chunk's. The ridge grows
with the number of fit rows (``ridge * n / 20``, as in the benchmark), so that its strength relative
to the sum of squares stays that of the 20 examples (the findings on 40 fit examples). The matrices' rank
is chosen on the 20 labelled fit examples among 1, 4, 16 and as fitted, as the benchmark did until
2 December (``evaluation.choose_rank``; ``FINDINGS`` pins those candidates). Each patch is scored
without the chunk on the filtered test examples, as fitted and at the rank chosen.

Options: ``--tasks`` (default: all shipped), ``--seeds`` (default 0 1 2), ``--save FILE`` (the raw
per-example verdicts as JSON, written after every task), ``--load FILE [FILE ...]`` (print the
tables from saved runs, e.g. of processes that measured different seeds).
"""

import time

import numpy as np
import torch
from behaviour_generalisation import (  # this folder is on sys.path
    FINDINGS,
    generalisation_split,
    print_header,
    rank_label,
    record,
    seeds_main,
    task_and_seed_means,
    tasks_and_seeds,
)

from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks
from tl_thoughts.thoughts import fit_thought

N_FIT = E.EvalConfig().n_fit
EXTRA = (0, 20, 60)  # unlabelled queries added to the 20 fit examples


def variant_label(n_extra: int) -> str:
    return f"{N_FIT} fit examples (the protocol's)" if n_extra == 0 else f"+ {n_extra} unlabelled queries"


def measure(args) -> dict:
    torch.manual_seed(0)
    model = load_default_model()
    stops = E.stop_tokens(model)
    config = E.EvalConfig(**FINDINGS)  # ridge 1 and the ranks 1, 4, 16, as fitted, as when this table was measured
    bs = config.batch_size
    tasks = [load_task(p) for p in shipped_tasks() if args.tasks is None or p.stem in args.tasks]
    extra = {task.name: [(q, task.continuation(a)) for q, a in E.query_answers(model, task, max(EXTRA), batch_size=bs)]
             for task in tasks}  # for all seeds
    t0 = time.perf_counter()
    raw = {}
    for seed in args.seeds:
        for task in tasks:
            fit_idx, test = generalisation_split(model, task, seed, stops, bs)
            fit_set = E.encode_task_examples(model, task, fit_idx)
            entry = {}
            for n_extra in EXTRA:
                patch = fit_thought(
                    model, task.chunk, task.fit_examples(fit_idx) + extra[task.name][:n_extra],
                    template=task.template, fit="both", compare_steering=False, progress=False, batch_size=bs,
                    **config.fit_options_for(N_FIT + n_extra),
                )
                chosen, rank = E.choose_rank(model, patch, config.ranks, fit_set, stops=stops, batch_size=bs)
                scores = {}
                for name, p in (("as fitted", patch), ("rank chosen", chosen)):
                    if rank is None and name == "rank chosen":  # the patch as fitted, scored already
                        scores[name] = scores["as fitted"]
                        continue
                    with p.apply(model):
                        scores[name] = E.greedy_match(model, test, with_chunk=False, stops=stops,
                                                      batch_size=bs)[0].tolist()
                entry[str(n_extra)] = {**scores, "rank": rank_label(rank)}
            record(raw, task.name, seed, entry, args.save, t0)
    raw["_seconds"] = time.perf_counter() - t0
    return raw


def table(raw: dict) -> None:
    names, seeds = tasks_and_seeds(raw)
    print_header(["fit rows", "matrices"], names)
    for n_extra in EXTRA:
        for how in ("as fitted", "rank chosen"):
            acc = {(t, s): 100 * float(np.mean(raw[f"{t}|{s}"][str(n_extra)][how]))
                   for t in names for s in seeds if f"{t}|{s}" in raw}
            per_task, per_seed = task_and_seed_means(acc, names, seeds)
            print(f"| {variant_label(n_extra)} | {how} | " + " | ".join(f"{v:.0f}" for v in per_task)
                  + f" | {np.mean(per_task):.1f} | " + " / ".join(f"{v:.1f}" for v in per_seed) + " |")
    print("\nranks chosen (seeds " + ", ".join(seeds) + "):")
    for n_extra in EXTRA:
        print(f"  {variant_label(n_extra)}: " + "; ".join(
            f"{t} " + "/".join(raw[f"{t}|{s}"][str(n_extra)]["rank"] for s in seeds if f"{t}|{s}" in raw)
            for t in names))
    print(f"\nseeds {seeds}; cells: accuracy % on the filtered test examples without the chunk, mean over seeds")


def main() -> None:
    seeds_main(__doc__.split("\n\n")[0], measure, table)


if __name__ == "__main__":
    main()
