"""Two options of the thought patch, measured on three splits: the thought matrix on ``W_out`` and the
prefix left unpatched. The table "The MLP output matrix and the unpatched prefix" in
``docs/benchmark.md`` comes from this script:

    .venv/bin/python benchmarks/behaviour_prefix.py

Per task and seed (0, 1, 2), the examples are shuffled as in ``tl-thoughts eval``: the first 20 of
the shuffled order are the protocol's fit examples and the test examples are those after the first
40 (the split of ``benchmarks/behaviour_generalisation.py``), both filtered as in the protocol. The
thought patch is fitted with ``EvalConfig``'s options but for the two compared here,
``output_matrix`` (a thought matrix on ``W_out``) and ``patch_prefix`` (False: the positions before
the chunk's place, the fixed first token ``<|im_start|>``, left unpatched in the fit and when
applied), its rank chosen on the fit examples among 1, 4, 16 and as fitted, as the benchmark did
until 2 December (``evaluation.choose_rank``; pinned by ``findings_config``), and scored without
the chunk on the filtered fit and test examples. The first variant is the benchmark's thought patch
before these two options (``OLD_PATCH``, the patch of 82.5%), the last its current one.

Options: ``--tasks`` (default: all shipped), ``--seeds`` (default 0 1 2).
"""

import argparse
import time

import numpy as np
import torch

from behaviour_generalisation import fit_and_test_accuracy, filtered, findings_config, generalisation_split  # noqa: E501  this folder is on sys.path
from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks
from tl_thoughts.thoughts import fit_thought

VARIANTS = {  # name: (output_matrix, patch_prefix)
    "no W_out matrix, prefix patched (before)": (False, True),
    "W_out matrix, prefix patched": (True, True),
    "no W_out matrix, prefix unpatched": (False, False),
    "W_out matrix, prefix unpatched (EvalConfig)": (True, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_default_model()
    stops = E.stop_tokens(model)
    config = findings_config(False)  # EvalConfig's options at ridge 1, the 20 fit examples alone, ranks 1, 4, 16
    assert (config.output_matrix, config.patch_prefix) == VARIANTS["W_out matrix, prefix unpatched (EvalConfig)"]
    bs = config.batch_size
    tasks = [load_task(p) for p in shipped_tasks() if args.tasks is None or p.stem in args.tasks]
    t0 = time.perf_counter()
    scores = {(name, seed): [] for name in VARIANTS for seed in args.seeds}  # per task: (fit, test)
    for seed in args.seeds:
        for task in tasks:
            fit_idx, test = generalisation_split(model, task, seed, stops, bs)
            fit_right = filtered(model, task, fit_idx, stops, bs)
            fit_set = E.encode_task_examples(model, task, fit_idx)
            for name, (output_matrix, patch_prefix) in VARIANTS.items():
                options = {**config.fit_options, "output_matrix": output_matrix, "patch_prefix": patch_prefix}
                patch = fit_thought(model, task.chunk, task.fit_examples(fit_idx), template=task.template,
                                    fit="both", compare_steering=False, progress=False, batch_size=bs, **options)
                patch, _ = E.choose_rank(model, patch, config.ranks, fit_set, stops=stops, batch_size=bs)
                scores[name, seed].append(fit_and_test_accuracy(model, patch, fit_right, test, stops, bs))
            print(f"seed {seed} {task.name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    names = [t.name for t in tasks]
    print("\n| variant | seed | " + " | ".join(names) + " | mean |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for name in VARIANTS:
        for seed in args.seeds:
            cells = scores[name, seed]
            m_fit, m_test = np.mean([c[0] for c in cells]), np.mean([c[1] for c in cells])
            print(f"| {name} | {seed} | " + " | ".join(f"{100 * c[0]:.0f} / {100 * c[1]:.0f}" for c in cells)
                  + f" | {100 * m_fit:.1f} / {100 * m_test:.1f} |")
    print("\n| variant | " + " | ".join(names) + " | mean |")
    print("|---|" + "---|" * (len(names) + 1))
    for name in VARIANTS:
        per_task = np.array([[c[1] for c in scores[name, seed]] for seed in args.seeds]).mean(0)
        print(f"| {name} | " + " | ".join(f"{100 * v:.0f}" for v in per_task) + f" | {100 * per_task.mean():.1f} |")
    print(f"\nseeds {args.seeds}; cells: thought patch accuracy % on the filtered fit examples / on the filtered "
          f"test examples (second table: on the test examples, mean over seeds); {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
