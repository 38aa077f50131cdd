"""Is the rank choice what holds the least-squares thought patch under 90%? The table of the
section "How far a better rank choice could go" in ``docs/benchmark.md`` comes from this script:

    .venv/bin/python benchmarks/behaviour_rank_choice.py --seeds 0 1 2 3 4 5

Per task and seed, on the protocol's own split (``evaluation.split``: the 20 fit examples; the test
examples filtered with ``evaluation.example_verdicts``, as the suite does), two least-squares
thought patches are fitted with ``EvalConfig``'s options (``fit_options_for`` the rows) at the
suite's defaults until 2 December (``SUITE``: 150 answered queries, ridge 0.5, the candidate ranks
1, 4, 16 and as fitted; ``behaviour_generalisation.SUITE_150``):

- the suite's: on the 20 fit examples plus the first 150 answered queries
  (``evaluation.query_answers``);
- a held-out one: on the 20 fit examples plus the first 120 of those queries, the last 30 held out.

Each patch's thought matrices are truncated to the ranks 1, 2, 4, 8, 16, 32 and 64
(``ThoughtPatch.truncations``) or kept as fitted, and every candidate is scored without the chunk,
in its weight form as the protocol runs it (``evaluation._match_under``): the suite's on the 20
fit examples and on the filtered test examples, the held-out one on the 20 fit examples and on the
30 held-out queries (against the model's own answers with the chunk). A rule then picks a rank
per task and seed, always ranking the candidates as ``evaluation.choose_rank`` does (accuracy,
then mean log-probability of the continuations, then the smaller rank) on its rows, and the
suite's patch at that rank is tested:

- on the fit examples, among ``SUITE.ranks`` (1, 4, 16, as fitted): the suite's choice until 2
  December (checked against ``choose_rank`` itself, and its test values against the suite's stored
  ``thought_patch`` per seed at those defaults where ``docs/benchmark`` holds them);
- on the fit examples, among all eight candidates;
- the matrices as fitted, always;
- on the 30 held-out queries, or on the fit examples and those queries, with the held-out patch
  (the queries are rows of the suite's fit, so the choice is made on the patch that did not see
  them), among ``SUITE.ranks``;
- the oracle: the candidate best on the filtered test examples themselves, among
  ``SUITE.ranks`` or all eight. A ceiling, not a method.

The options are those of ``behaviour_generalisation.seeds_main``: the tasks and seeds measured, and
saving the raw verdicts or printing the table of saved runs (``--help``).
"""

import json
import time
from pathlib import Path

import numpy as np
import torch
from behaviour_generalisation import (  # this folder is on sys.path
    SUITE_150,
    protocol_split,
    rank_label,
    record,
    seeds_main,
    tasks_and_seeds,
)
from behaviour_query_count import _key  # choose_rank's ordering of a candidate's scores

from tl_thoughts import _tl
from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks
from tl_thoughts.thoughts import fit_thoughts

RANKS = (1, 2, 4, 8, 16, 32, 64, None)
HELD_OUT = 30  # answered queries held out of the second fit
SUITE = E.EvalConfig(**SUITE_150)  # the suite's defaults until 2 December, as when this table was measured
SUITE_RANKS = tuple(str(r) for r in SUITE.ranks)
ALL_RANKS = tuple(str(r) for r in RANKS)
STORED = {  # the suite's runs at these defaults: their per-seed thought_patch values
    "queries150/results.json": (0, 1, 2),  # the values of results.json until 2 December
    "queries150_seeds345/results.json": (3, 4, 5),
    "seeds678/results.json": (6, 7, 8),
}
RULES = {  # row: (fit whose candidates are ranked, candidates, rows ranked on)
    "fit examples (the suite's)": ("suite", SUITE_RANKS, ("fit",)),
    "fit examples, 8 ranks": ("suite", ALL_RANKS, ("fit",)),
    "as fitted, always": ("suite", ("None",), ("fit",)),
    "30 held-out queries": ("held", SUITE_RANKS, ("queries",)),
    "fit examples + 30 held-out queries": ("held", SUITE_RANKS, ("fit", "queries")),
    "oracle (test examples)": ("suite", SUITE_RANKS, ("test",)),
    "oracle (test examples), 8 ranks": ("suite", ALL_RANKS, ("test",)),
}


def chosen(entry: dict, rule: str) -> str:
    """The rank ``rule`` picks for one task and seed (``"None"``: as fitted)."""
    fit, candidates, on = RULES[rule]
    return max(candidates, key=lambda rank: _key(entry[fit], rank, on))


def _scores(model, patch, rows: dict, stops, unembed_weight) -> dict:
    """Every candidate rank of ``patch`` scored on each set of ``rows`` (right, log-probability)."""
    ints = [r for r in RANKS if r is not None]
    candidates = {**dict(zip(ints, patch.truncations(ints))), None: patch}
    scores = {}
    for rank, p in candidates.items():
        row = {}
        for label, examples in rows.items():
            right, logprob = E._match_under(model, p, examples, stops=stops, batch_size=SUITE.batch_size,
                                            unembed_weight=unembed_weight)
            row[label], row[label + "_logprob"] = right.tolist(), logprob.tolist()
        scores[str(rank)] = row
    return scores


def measure(args) -> dict:
    torch.manual_seed(0)
    model = load_default_model()
    stops = E.stop_tokens(model)
    bs = SUITE.batch_size
    tasks = [load_task(p) for p in shipped_tasks() if args.tasks is None or p.stem in args.tasks]
    t0 = time.perf_counter()
    raw = {}
    for task in tasks:
        verdicts = E.example_verdicts(model, task, batch_size=bs)
        answered = E.query_answers(model, task, SUITE.n_queries, batch_size=bs)
        n_kept = SUITE.n_queries - HELD_OUT
        held_out = [E._encode(model, task, q, a) for q, a in answered[n_kept:]]
        for seed in args.seeds:
            fit_idx, fit_set, test = protocol_split(model, task, verdicts, SUITE.n_fit, seed)
            entry = {}
            with _tl.linear_layout(model), torch.no_grad():
                unembed_weight = model.W_U.T.contiguous()
                for name, n, rows in (("suite", SUITE.n_queries, {"fit": fit_set, "test": test}),
                                      ("held", n_kept, {"fit": fit_set, "queries": held_out})):
                    pairs = task.fit_examples(fit_idx) + [(q, task.continuation(a)) for q, a in answered[:n]]
                    patch = fit_thoughts(model, task.chunk, pairs, fits=["both"], template=task.template,
                                         compare_steering=False, progress=False, batch_size=bs,
                                         **SUITE.fit_options_for(len(pairs)))["both"]
                    entry[name] = _scores(model, patch, rows, stops, unembed_weight)
                    if name == "suite":  # the same choice as the protocol's own code
                        _, rank = E.choose_rank(model, patch, SUITE.ranks, fit_set, stops=stops, batch_size=bs,
                                                unembed_weight=unembed_weight)
                        assert str(rank) == chosen(entry, "fit examples (the suite's)"), (task.name, seed, rank)
            record(raw, task.name, seed, entry, args.save, t0)
    raw["_seconds"] = time.perf_counter() - t0
    return raw


def _stored() -> dict:
    """The suite's stored ``thought_patch`` value per (task, seed), where ``docs/benchmark`` holds it."""
    root = Path(__file__).resolve().parent.parent / "docs" / "benchmark"
    values = {}
    for path, seeds in STORED.items():
        if (root / path).exists():
            per_task = json.loads((root / path).read_text())["thought_patch"]["per_task"]
            for task, result in per_task.items():
                values.update({(task, str(s)): v for s, v in zip(seeds, result["per_seed"])})
    return values


def table(raw: dict) -> None:
    names, seeds = tasks_and_seeds(raw)
    groups = [seeds[i : i + 3] for i in range(0, len(seeds), 3)]
    print("| " + " | ".join(["rank chosen on", "candidates", *names,
                             "mean, seeds " + " / ".join(", ".join(g) for g in groups), "per seed"]) + " |")
    print("|" + "---|" * (len(names) + 4))
    ranks = {}
    for rule, (_, candidates, _) in RULES.items():
        acc = {}
        for t in names:
            for s in seeds:
                if f"{t}|{s}" not in raw:
                    continue
                entry = raw[f"{t}|{s}"]
                rank = chosen(entry, rule)
                ranks.setdefault(rule, {}).setdefault(t, []).append(rank_label(None if rank == "None" else rank))
                acc[t, s] = 100 * float(np.mean(entry["suite"][rank]["test"]))
        per_task = [np.mean([v for (t, _), v in acc.items() if t == name]) for name in names]
        per_seed = {s: np.mean([v for (_, ss), v in acc.items() if ss == s]) for s in seeds}
        per_group = [np.mean([per_seed[s] for s in g]) for g in groups]
        label = "1, 4, 16, as fitted" if candidates == SUITE_RANKS else (
            "as fitted" if candidates == ("None",) else "1, 2, 4, ..., 64, as fitted")
        print(f"| {rule} | {label} | " + " | ".join(f"{v:.0f}" for v in per_task) + " | "
              + " / ".join(f"{v:.2f}" for v in per_group) + " | " + " / ".join(f"{per_seed[s]:.1f}" for s in seeds)
              + " |")
        if rule == "fit examples (the suite's)":
            stored = _stored()
            same = [abs(100 * stored[k] - v) < 1e-9 for k, v in acc.items() if k in stored]
    print(f"\nthe first row against the suite's stored thought_patch: {sum(same)} of {len(same)} task-seeds equal")
    print("\nranks chosen (per task, seeds in order " + ", ".join(seeds) + "):")
    for rule, labels in ranks.items():
        print(f"  {rule}: " + "; ".join(f"{t} " + ", ".join(v) for t, v in labels.items()))
    print(f"\nseeds {seeds}; cells: accuracy % of the suite's least-squares thought patch at the chosen rank on the "
          "filtered test examples without the chunk, mean over seeds")


def main() -> None:
    seeds_main(__doc__.split("\n\n")[0], measure, table)


if __name__ == "__main__":
    main()
