"""Profile: where one seed of the suite spends its time, at the defaults or other options.

Loads the default model (one torch thread, as a suite worker), computes the task's verdicts,
answered queries with their rows with the chunk (``query_answers_with_rows``) and their steering
sums (once a task in the suite; timed, not profiled), then profiles ``evaluation.evaluate_seed`` with the suite's default methods
(``--refined``: and the refined patch) under cProfile, and prints the seed's time, its accuracies
and the functions with the largest cumulative time.

Run: .venv/bin/python benchmarks/profile_seed.py --task uppercase [--seed 0] [--queries 150]
[--ranks 1 4 16 0] [--top 45]   (``--ranks``: candidate ranks, 0: as fitted; default: ``EvalConfig``'s,
480 queries, as fitted). The profiles of docs/benchmark.md were made with ``ca0c3d8`` (whose suite
also fitted the vector-only and matrix-only ablations on their own), ``3214ac7``, ``f946737`` and
the code of its section "Decoding, layer search and the queries' rows" (the script then timed
the answers and the rows apart, which earlier code did not compute) and of its section "The
queries' rows from their decoding" (the answers and rows together).
"""

import argparse
import cProfile
import pstats
import time

import torch

from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks

DEFAULTS = E.EvalConfig()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="a shipped task's name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=DEFAULTS.n_queries)
    parser.add_argument("--ranks", type=int, nargs="+", default=[r or 0 for r in DEFAULTS.ranks])
    parser.add_argument("--top", type=int, default=45, help="functions printed")
    parser.add_argument("--refined", action="store_true",
                        help="also the thought_patch_refined method (in the suite's defaults until 3 December)")
    args = parser.parse_args()
    try:  # EvalConfig checks the options (distinct ranks, each >= 1 or as fitted)
        config = E.EvalConfig(n_queries=args.queries, ranks=tuple(r or None for r in args.ranks),
                              methods=E.DEFAULT_METHODS + (("thought_patch_refined",) if args.refined else ()))
    except ValueError as e:
        parser.error(str(e))
    torch.set_num_threads(1)
    model = load_default_model()
    task = load_task(next(p for p in shipped_tasks() if p.stem == args.task))
    t0 = time.perf_counter()
    verdicts = E.example_verdicts(model, task, batch_size=config.batch_size)
    t1 = time.perf_counter()
    queries, query_rows = E.query_answers_with_rows(model, task, config)
    t2 = time.perf_counter()
    query_sums = E.query_difference_sums(model, task, queries, config, query_rows)
    t3 = time.perf_counter()
    print(f"verdicts {t1 - t0:.1f} s, query answers and their rows {t2 - t1:.1f} s, "
          f"query sums {t3 - t2:.1f} s (once a task)")
    profile = cProfile.Profile()
    profile.enable()
    t4 = time.perf_counter()
    result = E.evaluate_seed(model, task, config, args.seed, verdicts, queries, query_sums, query_rows)
    seconds = time.perf_counter() - t4
    profile.disable()
    print(f"seed {args.seed}: {seconds:.1f} s (profiled)")
    print({name: round(value, 3) for name, value in result.accuracy.items()})
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
