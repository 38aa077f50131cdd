"""How far would a better choice among least-squares thought patches go? The table "Choosing among
least-squares variants" in ``docs/benchmark.md`` comes from this script:

    .venv/bin/python benchmarks/behaviour_selection.py

Per task and seed (0, 1, 2), the split of ``benchmarks/behaviour_prefix.py``: the protocol's 20 fit
examples, tested on the filtered examples after the first 40 of the shuffled order. Sixteen
candidates are fitted on the 20 fit examples with ``EvalConfig``'s options: four families (the
thought patch at ridge 1, the benchmark's; the same without the thought vector, ``fit="matrix"``;
the thought patch at ridge 0.5 and at ridge 2), each with its thought matrices at rank 1, 4, 16 and
as fitted (``ThoughtPatch.truncations``). Every candidate is scored without the chunk on the fit
examples and on the filtered test examples.

A choice rule picks one candidate per task and seed from a candidate set, and its test accuracy is
reported:

- ``fit examples``: the candidate doing best on the 20 fit examples (accuracy, then mean
  log-probability of the continuations, then the smaller rank), as the benchmark's
  ``evaluation.choose_rank`` does;
- ``2-fold``: the fit examples split in two halves (alternate examples); every candidate is fitted
  on one half (ridge halved: the same strength relative to the sum of squares as on 20) and scored
  on the other, both ways; the candidate with the most held-out examples right (then the mean
  held-out log-probability, then the smaller rank) is used as fitted on all 20;
- ``oracle``: the candidate best on the test examples themselves (a ceiling, not a method).

Options: ``--tasks`` (default: all shipped), ``--seeds`` (default 0 1 2), ``--save FILE`` (the raw
per-example scores as JSON), ``--load FILE [FILE ...]`` (print the tables from saved runs, e.g.
two processes run on disjoint ``--tasks``, without fitting).
"""

import time

import numpy as np
import torch

from behaviour_generalisation import N_FIT, generalisation_split, rank_label, save, seeds_main  # this folder is on sys.path
from tl_thoughts import _tl
from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks
from tl_thoughts.thoughts import fit_thoughts

RANKS = (1, 4, 16, None)
FAMILIES = {  # name: (fit, ridge)
    "thought patch, ridge 1 (EvalConfig)": ("both", 1.0),
    "no thought vector, ridge 1": ("matrix", 1.0),
    "thought patch, ridge 0.5": ("both", 0.5),
    "thought patch, ridge 2": ("both", 2.0),
}
FAMILY_SETS = {  # choice rules' candidate sets: families (each at every rank of RANKS)
    "the benchmark's: ridge 1, rank chosen": ["thought patch, ridge 1 (EvalConfig)"],
    "+ without the thought vector": ["thought patch, ridge 1 (EvalConfig)", "no thought vector, ridge 1"],
    "+ ridge 0.5 and 2": ["thought patch, ridge 1 (EvalConfig)", "thought patch, ridge 0.5", "thought patch, ridge 2"],
    "all four families": list(FAMILIES),
}


def fit_candidates(model, task, indices, ridge_scale: float, bs: int) -> dict[str, object]:
    """Every candidate (``"family|rank"``) fitted on the examples ``indices``."""
    pairs = task.fit_examples(indices)
    options = {**E.EvalConfig().fit_options}
    out = {}
    for ridge in sorted({r for _, r in FAMILIES.values()}):
        fits = sorted({f for f, r in FAMILIES.values() if r == ridge})
        patches = fit_thoughts(model, task.chunk, pairs, fits=fits, template=task.template, compare_steering=False,
                               progress=False, batch_size=bs, **{**options, "ridge": ridge * ridge_scale})
        for family, (fit, r) in FAMILIES.items():
            if r == ridge:
                patch = patches[fit]
                ints = [k for k in RANKS if k is not None]
                for k, p in zip(ints, patch.truncations(ints)):
                    out[f"{family}|{k}"] = p
                out[f"{family}|None"] = patch
    return out


def score(model, patch, examples, stops, bs) -> tuple[list[bool], list[float]]:
    with patch.apply(model):
        right, logprob = E.greedy_match(model, examples, with_chunk=False, stops=stops, batch_size=bs)
    return right.tolist(), logprob.tolist()


def measure(args) -> dict:
    torch.manual_seed(0)
    model = load_default_model()
    stops = E.stop_tokens(model)
    bs = E.EvalConfig().batch_size
    tasks = [load_task(p) for p in shipped_tasks() if args.tasks is None or p.stem in args.tasks]
    t0 = time.perf_counter()
    raw = {}
    with torch.no_grad(), _tl.linear_layout(model):
        for seed in args.seeds:
            for task in tasks:
                fit_idx, test = generalisation_split(model, task, seed, stops, bs)
                fit_set = E.encode_task_examples(model, task, fit_idx)
                entry = {}
                for name, patch in fit_candidates(model, task, fit_idx, 1.0, bs).items():
                    entry[name] = {"fit": score(model, patch, fit_set, stops, bs),
                                   "test": score(model, patch, test, stops, bs), "heldout": ([], [])}
                halves = (fit_idx[0::2], fit_idx[1::2])
                for on, off in (halves, halves[::-1]):
                    held = E.encode_task_examples(model, task, off)
                    for name, patch in fit_candidates(model, task, on, len(on) / N_FIT, bs).items():
                        right, logprob = score(model, patch, held, stops, bs)
                        entry[name]["heldout"][0].extend(right)
                        entry[name]["heldout"][1].extend(logprob)
                raw[f"{task.name}|{seed}"] = entry
                if args.save:  # after every task, so that an interrupted run keeps what it measured
                    save(raw, args.save)
                print(f"seed {seed} {task.name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    raw["_seconds"] = time.perf_counter() - t0
    return raw


def choose(entry: dict, candidates: list[str], on: str) -> str:
    def key(name):
        right, logprob = entry[name][on]
        rank = name.rsplit("|", 1)[1]
        return (float(np.mean(right)), float(np.mean(logprob)), -(float("inf") if rank == "None" else int(rank)))

    return max(candidates, key=key)


def table(raw: dict) -> None:
    pairs = sorted(k for k in raw if not k.startswith("_"))
    names = sorted({k.split("|")[0] for k in pairs})
    seeds = sorted({k.split("|")[1] for k in pairs})

    def test(entry, name):
        return float(np.mean(entry[name]["test"][0]))

    def row(label, pick):
        per_task = [np.mean([100 * test(raw[f"{t}|{s}"], pick(raw[f"{t}|{s}"])) for s in seeds if f"{t}|{s}" in raw])
                    for t in names]  # over the seeds measured (all, but for a partial run)
        print(f"| {label} | " + " | ".join(f"{v:.0f}" for v in per_task) + f" | {np.mean(per_task):.1f} |")

    head = "| {} | " + " | ".join(names) + " | mean |"
    rule = "|---|" + "---|" * (len(names) + 1)
    print(head.format("candidate (rank)"), rule, sep="\n")
    for family in FAMILIES:
        for k in RANKS:
            row(f"{family} ({rank_label(k)})", lambda e, n=f"{family}|{k}": n)
    print("\n" + head.format("choice rule"), rule, sep="\n")
    for label, families in FAMILY_SETS.items():
        candidates = [f"{f}|{k}" for f in families for k in RANKS]
        row(f"{label}: on the fit examples", lambda e, c=candidates: choose(e, c, "fit"))
        row(f"{label}: 2-fold", lambda e, c=candidates: choose(e, c, "heldout"))
        row(f"{label}: oracle", lambda e, c=candidates: max(c, key=lambda n: test(e, n)))
    print(f"\nseeds {seeds}; cells: accuracy % on the filtered test examples without the chunk, mean over seeds")


def main() -> None:
    seeds_main(__doc__.split("\n\n")[0], measure, table)


if __name__ == "__main__":
    main()
