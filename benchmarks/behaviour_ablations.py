"""Why thought patches fall short on some tasks: the protocol of ``tl-thoughts eval`` (thought
patch only) under one change at a time, on a few shipped tasks and seeds.

Prints a markdown table: accuracy of the thought patch on the filtered test examples (mean over
seeds) and the number of filtered examples, per variant and task. The numbers in
``docs/benchmark.md`` ("Findings") come from this script:

    .venv/bin/python benchmarks/behaviour_ablations.py

The thought matrices are used as fitted (``ranks=(None,)``): these findings were measured before
the benchmark chose their rank on the fit examples (``EvalConfig.ranks``), and the rank is a
variable of its own (``benchmarks/behaviour_rank.py``).

With ``EvalConfig``'s options, two more variants undo its two last options one at a time (the
``W_out`` thought matrix and the unpatched prefix; ``benchmarks/behaviour_prefix.py`` measures them
on three seeds).

Options: ``--tasks`` (default: antonyms past_tense country_capital uppercase), ``--seeds``
(default: 0), ``--old-patch`` (the options of the patch of 82.5%, without those two variants).
"""

import argparse
import dataclasses
import time

import numpy as np
import torch

from behaviour_generalisation import OLD_PATCH_HELP, findings_config  # this script's folder is on sys.path
from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks
from tl_thoughts.templates import PromptTemplate

N_LAYERS = 30  # SmolLM2-135M
VARIANTS = {
    "defaults (EvalConfig, ranks=(None,))": {},
    "no W_O thought matrix (attention_matrix=False)": {"attention_matrix": False},
    "no query rows (query_weight=0)": {"query_weight": 0.0},
    "the papers' form (vector + MLP-input matrices at every position)": {
        "attention_matrix": False, "query_weight": 0.0, "output_matrix": False, "patch_prefix": True},
    "query_weight=0.3": {"query_weight": 0.3},
    "no fixed first token": {"template": "{chunk}{query} ->"},
    "vector_target=residual": {"vector_target": "residual"},
    "pool=kept": {"pool": "kept"},
    "ridge=0.1": {"ridge": 0.1},
    "ridge=10": {"ridge": 10.0},
    "n_fit=40": {"n_fit": 40},
    "layers 0-14 only": {"layers": tuple(range(0, 15))},
    "layers 15-29 only": {"layers": tuple(range(15, N_LAYERS))},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["antonyms", "past_tense", "country_capital", "uppercase"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--old-patch", action="store_true", help=OLD_PATCH_HELP)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_default_model()
    base = findings_config(args.old_patch, seeds=tuple(args.seeds), ranks=(None,))
    variants = {}
    for name, change in VARIANTS.items():
        variants[name] = change
        if name.startswith("no W_O"):  # undo EvalConfig's two last options, next to the W_O row
            if base.output_matrix:
                variants["no W_out thought matrix (output_matrix=False)"] = {"output_matrix": False}
            if not base.patch_prefix:
                variants["prefix patched (patch_prefix=True)"] = {"patch_prefix": True}
    tasks = {p.stem: load_task(p) for p in shipped_tasks() if p.stem in args.tasks}
    rows = []
    t0 = time.perf_counter()
    for name, change in variants.items():
        change = dict(change)
        template = change.pop("template", None)
        config = dataclasses.replace(
            base,
            methods=("with_chunk", "without_chunk", "thought_patch"),
            **change,
        )
        cells = []
        for task in tasks.values():
            if template is not None:
                task = dataclasses.replace(task, template=PromptTemplate(template, task.template.separator))
            result = E.evaluate_task(model, task, config, progress=False)
            summary = result.summary("thought_patch")
            cells.append(f"{100 * summary['accuracy']:.0f} ({'/'.join(map(str, summary['n_filtered']))})")
            rows.append((name, task.name, summary["accuracy"]))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\ntasks: {list(tasks)}; seeds {args.seeds}; cells: thought_patch accuracy % (filtered "
          f"examples per seed); {time.perf_counter() - t0:.0f} s")
    means = {n: np.mean([a for v, _, a in rows if v == n]) for n in variants}
    print("mean over tasks:", {n: round(100 * m) for n, m in means.items()})


if __name__ == "__main__":
    main()
