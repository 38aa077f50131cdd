"""Benchmark: what 150 answered queries at ridge 0.5 (the defaults of ``9ca5b9d``, before 480 queries with the
matrices as fitted) cost the suite against its earlier defaults (60 queries, ridge 1, ``--queries 60 --ridge 1``),
both with the rank chosen among 1, 4, 16 and as fitted, with the same code,
measured in one run, so that the machine's speed (these shared machines drift by a factor of two
between runs) cancels out of the ratio. (``bench_versions.py`` compares this version with an
earlier commit instead.)

For one task and seed, in this one process, both configurations are timed twice, in the order
A B B A (A: 60 queries at ridge 1, B: 150 queries at ridge 0.5), each time as the suite runs them:
``evaluation.query_answers_with_rows`` and ``evaluation.query_difference_sums`` (once a task in the suite,
so their time counts a third per seed) and ``evaluation.evaluate_seed`` with every method of the
suite of the time (the refined patch included). Prints
each configuration's median time per seed, ``thought_patch``'s accuracy (a check that the runs are
the suite's: the same in both repeats), and the ratio B / A.

Run: .venv/bin/python benchmarks/bench_suite_queries.py --task plural [--seed 0]
(the suite runs two worker processes of one thread: run two tasks at once, as it does).
``--a QUERIES RIDGE --b QUERIES RIDGE`` compares two other configurations the same way (e.g.
``--a 150 0.5 --b 480 0.5``: 150 against 480 queries, section "480 queries" of docs/benchmark.md),
and ``--a-ranks``/``--b-ranks`` set their candidate ranks (0: as fitted; default: 1 4 16 0, the
candidates of ``EvalConfig.ranks`` until 2 December), e.g. ``--b 480 0.5 --b-ranks 0``: 480 queries,
matrices as fitted (the defaults since). ``--fitted-alone`` adds the vector-only and matrix-only
patches fitted on their own (``thought_vector_fitted_alone``, ``thought_matrix_fitted_alone``), as
the suite's ``thought_vector`` and ``thought_matrix`` were until 2 December: the ratios of
docs/benchmark.md measured before then (sections "480 queries" and "Cheaper fits") need it.
"""

import argparse
import statistics
import time

import torch

from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks

A_DEFAULT, B_DEFAULT = (60, 1.0), (150, 0.5)
RANKS = [1, 4, 16, 0]  # EvalConfig.ranks until 2 December (0: as fitted)


def _name(letter: str, queries: int, ridge: float, ranks: list[int]) -> str:
    name = f"{letter}: {queries} queries, ridge {ridge:g}"
    if ranks != RANKS:
        name += ", ranks " + " ".join(str(r) if r else "as fitted" for r in ranks)
    if (queries, ridge) == A_DEFAULT and ranks == RANKS:
        return name + " (the defaults until 2 December)"
    if (queries, ridge) == B_DEFAULT and ranks == RANKS:
        return name + " (the defaults of 9ca5b9d)"
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="a shipped task's name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--a", nargs=2, type=float, default=A_DEFAULT, metavar=("QUERIES", "RIDGE"),
                        help="configuration A (default: 60 1)")
    parser.add_argument("--b", nargs=2, type=float, default=B_DEFAULT, metavar=("QUERIES", "RIDGE"),
                        help="configuration B (default: 150 0.5)")
    parser.add_argument("--a-ranks", type=int, nargs="+", default=RANKS, metavar="RANK",
                        help="configuration A's candidate ranks (0: as fitted; default: 1 4 16 0)")
    parser.add_argument("--b-ranks", type=int, nargs="+", default=RANKS, metavar="RANK",
                        help="configuration B's candidate ranks (0: as fitted; default: 1 4 16 0)")
    parser.add_argument("--fitted-alone", action="store_true",
                        help="also fit the vector-only and matrix-only patches on their own (the suite's "
                             "ablations until 2 December)")
    args = parser.parse_args()
    # the suite's methods when these ratios were measured: the refined patch included (until 3 December)
    methods = E.DEFAULT_METHODS + ("thought_patch_refined",) + (E.FITTED_ALONE if args.fitted_alone else ())
    if (list(args.a), args.a_ranks) == (list(args.b), args.b_ranks):
        parser.error("--a and --b are the same configuration")
    configs = {}
    for letter, (queries, ridge), ranks in (("A", args.a, args.a_ranks), ("B", args.b, args.b_ranks)):
        if queries != int(queries):
            parser.error(f"--{letter.lower()}: the number of queries must be an integer, got {queries}")
        try:  # EvalConfig checks the options (distinct ranks, each >= 1 or as fitted)
            config = E.EvalConfig(n_queries=int(queries), ridge=ridge, ranks=tuple(r or None for r in ranks),
                                  methods=methods)
        except ValueError as e:
            parser.error(f"--{letter.lower()}, --{letter.lower()}-ranks: {e}")
        configs[_name(letter, int(queries), ridge, ranks)] = config
    torch.set_num_threads(1)  # as a suite worker
    model = load_default_model()
    task = load_task(next(p for p in shipped_tasks() if p.stem == args.task))
    first = E.EvalConfig()
    verdicts = E.example_verdicts(model, task, batch_size=first.batch_size)  # the same for both
    names = list(configs)
    times: dict[str, list[float]] = {name: [] for name in names}
    accuracy: dict[str, list[float]] = {name: [] for name in names}
    for name in [names[0], names[1], names[1], names[0]]:
        config = configs[name]
        t0 = time.perf_counter()
        queries, query_rows = E.query_answers_with_rows(model, task, config)
        query_sums = E.query_difference_sums(model, task, queries, config, query_rows)
        t1 = time.perf_counter()
        result = E.evaluate_seed(model, task, config, args.seed, verdicts, queries, query_sums, query_rows)
        t2 = time.perf_counter()
        n_seeds = len(config.seeds)
        times[name].append((t1 - t0) / n_seeds + (t2 - t1))  # the queries' part is computed once for all seeds
        accuracy[name].append(result.accuracy["thought_patch"])
        print(f"{name}: queries {t1 - t0:.0f} s, seed {t2 - t1:.0f} s, thought_patch {result.accuracy['thought_patch']:.3f}",
              flush=True)
    medians = {name: statistics.median(times[name]) for name in names}
    print(f"\ntask {task.name}, seed {args.seed}, {torch.get_num_threads()} thread")
    print("| configuration | seconds per seed (two runs) | thought_patch |")
    print("|---|---|---|")
    for name in names:
        print(f"| {name} | {' / '.join(f'{t:.0f}' for t in times[name])} | "
              f"{' / '.join(f'{a:.3f}' for a in accuracy[name])} |")
    print(f"ratio B / A (medians): {medians[names[1]] / medians[names[0]]:.2f}")


if __name__ == "__main__":
    main()
