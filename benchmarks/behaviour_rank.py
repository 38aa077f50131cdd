"""How many directions does a thought matrix need? The rank table under "Findings" in
``docs/benchmark.md`` comes from this script:

    .venv/bin/python benchmarks/behaviour_rank.py

Per task (one seed), the thought patch is fitted with ``EvalConfig``'s options on the same
20 fit examples, and tested on the same filtered test examples, as the default row of
``benchmarks/behaviour_generalisation.py`` (the examples after the first 40 of the shuffled order).
Every thought matrix (``W_O``, ``W_gate``, ``W_in`` and, with ``EvalConfig``'s options, ``W_out``, in
every block) is then replaced by its best
rank-k approximation (``ThoughtPatch.truncations``; rank 1 is the form of a ROME edit), the thought
vectors kept as they are, and the truncated patch is scored again, without the chunk, on the same
test examples. A last row gives the accuracy of the rank ``evaluation.choose_rank`` picks among
1, 4, 16 and as fitted (the candidates of ``EvalConfig.ranks`` until 2 December, pinned by
``findings_config``) on the 20 fit examples, as the benchmark did then. The last column of the
header row gives how many numbers the truncated matrices of one block take as factors
(``k * (d_in + d_out)`` per matrix), against the dense matrices.

Options: ``--tasks`` (default: all shipped), ``--seed`` (default 0), ``--ranks``, ``--old-patch``
(the options of the patch of 82.5%).
"""

import argparse
import time

import numpy as np
import torch

from behaviour_generalisation import OLD_PATCH_HELP, N_EXTRA, N_FIT, filtered, findings_config, rank_label
from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.patch import MATRICES
from tl_thoughts.tasks import load_task, shipped_tasks
from tl_thoughts.thoughts import fit_thought

RANKS = [1, 2, 4, 8, 16, 64]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", nargs="+", type=int, default=RANKS)
    parser.add_argument("--old-patch", action="store_true", help=OLD_PATCH_HELP)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_default_model()
    stops = E.stop_tokens(model)
    config = findings_config(args.old_patch)
    bs = config.batch_size
    tasks = [load_task(p) for p in shipped_tasks() if args.tasks is None or p.stem in args.tasks]
    t0 = time.perf_counter()
    rows: dict[str, list[float]] = {"full (as fitted)": [], **{f"rank {k}": [] for k in args.ranks}}
    chosen_row = f"rank chosen on the fit examples among ({', '.join(map(rank_label, config.ranks))})"
    rows[chosen_row] = []
    chosen_ranks = []
    counts, shapes = [], []
    for task in tasks:
        order = np.random.default_rng(args.seed).permutation(len(task.examples)).tolist()
        test = filtered(model, task, sorted(order[N_EXTRA:]), stops, bs)
        counts.append(len(test))
        patch = fit_thought(
            model, task.chunk, task.fit_examples(sorted(order[:N_FIT])), template=task.template, fit="both",
            compare_steering=False, progress=False, batch_size=bs, **config.fit_options,
        )
        shapes = [patch.matrix(patch.layers[0], name).shape for name in MATRICES
                  if patch.matrix(patch.layers[0], name) is not None]
        for name, p in [("full (as fitted)", patch)] + [(f"rank {k}", q) for k, q in
                                                        zip(args.ranks, patch.truncations(args.ranks))]:
            with p.apply(model):
                right, _ = E.greedy_match(model, test, with_chunk=False, stops=stops, batch_size=bs)
            rows[name].append(float(right.double().mean()))
        fit_set = E.encode_task_examples(model, task, sorted(order[:N_FIT]))
        best, rank = E.choose_rank(model, patch, config.ranks, fit_set, stops=stops, batch_size=bs)
        with best.apply(model):
            right, _ = E.greedy_match(model, test, with_chunk=False, stops=stops, batch_size=bs)
        rows[chosen_row].append(float(right.double().mean()))
        chosen_ranks.append(rank_label(rank))
        print(f"{task.name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    dense = sum(a * b for a, b in shapes)
    names = [t.name for t in tasks]
    print("\n| thought matrices | " + " | ".join(names) + " | mean | numbers per block |")
    print("|---|" + "---|" * (len(names) + 2))
    print("| filtered test examples | " + " | ".join(map(str, counts)) + " | | |")
    for name, values in rows.items():
        if name == chosen_row:
            print(f"| {name} | " + " | ".join(f"{100 * v:.0f} ({r})" for v, r in zip(values, chosen_ranks))
                  + f" | {100 * np.mean(values):.0f} | |")
            continue
        k = None if name.startswith("full") else int(name.split()[1])
        size = dense if k is None else sum(min(k, min(a, b)) * (a + b) for a, b in shapes)
        print(f"| {name} | " + " | ".join(f"{100 * v:.0f}" for v in values)
              + f" | {100 * np.mean(values):.0f} | {size:,} |")
    print(f"\nseed {args.seed}; cells: thought patch accuracy % on the filtered test examples, without the "
          f"chunk; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
