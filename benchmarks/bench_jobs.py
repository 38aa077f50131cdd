"""Worker processes for the behavioural benchmark (``tl-thoughts eval --jobs``): the ratio quoted
in ``docs/benchmark.md`` comes from this script:

    .venv/bin/python benchmarks/bench_jobs.py

The same work, two tasks x one seed of the protocol (``EvalConfig`` defaults), run (a) in this
process, one task after the other, with every torch thread of the machine, and (b) by
``evaluation.evaluate_in_processes`` in 2 worker processes of one torch thread each, both timed
from the start of the evaluation (the model already loaded in (a); (b) includes its workers'
start and model load). It prints both wall-clock times and their ratio, and checks that the two
give the same splits and filtered examples.

Options: ``--tasks`` (default: past_tense plural).
"""

import argparse
import dataclasses
import time

import torch

from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["past_tense", "plural"])
    args = parser.parse_args()
    tasks = [load_task(p) for p in shipped_tasks() if p.stem in args.tasks]
    config = dataclasses.replace(E.EvalConfig(), seeds=(0,))
    model = load_default_model()
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    one = [E.evaluate_task(model, task, config, progress=False) for task in tasks]
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    two = E.evaluate_in_processes(tasks, config, jobs=2, threads=1)
    t_two = time.perf_counter() - t0
    for a, b in zip(one, two):
        assert a.seeds[0].filtered_indices == b.seeds[0].filtered_indices, a.task
    print(f"{len(tasks)} tasks x 1 seed: one process with {threads} threads {t_one:.0f} s; "
          f"2 processes of 1 thread (start and model load included) {t_two:.0f} s; "
          f"speed-up {t_one / t_two:.2f}x")


if __name__ == "__main__":
    main()
