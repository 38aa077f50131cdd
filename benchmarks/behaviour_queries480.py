"""480 answered queries against the defaults' 150: the table of the section "480 queries" in
``docs/benchmark.md`` comes from this script, which reads the suite runs' stored ``results.json``
(no model is run):

    .venv/bin/python benchmarks/behaviour_queries480.py

The runs it reads (``docs/benchmark/...``, each made by the command in its ``meta.config``):

- ``queries150``: the suite at its defaults until 2 December (150 queries, the rank chosen on the
  fit examples among 1, 4, 16 and as fitted; the values of ``results.json`` then);
- ``queries480``: ``tl-thoughts eval --suite --queries 480 --out docs/benchmark/queries480``
  (every method, with the code and the candidate ranks of that time: its ``thought_matrix`` is the
  matrix-only patch fitted on its own, ``thought_matrix_fitted_alone`` since 2 December);
- ``queries480_as_fitted``: ``tl-thoughts eval --suite --queries 480 --ranks 0 --methods with_chunk
  without_chunk thought_patch --out docs/benchmark/queries480_as_fitted`` (the thought matrices
  as fitted, no rank choice), and the same on seeds 3, 4, 5 (``queries480_as_fitted_seeds345``,
  read where it exists).

For every row: accuracy % on the filtered test examples per task (mean over the run's seeds), the
mean over tasks, and per seed the mean over tasks. The script checks that the runs it compares
filtered the same test examples, seed by seed, and that the 480 runs' first 150 answered queries
are the defaults' 150.
"""

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent / "docs" / "benchmark"
DEFAULTS = "queries150"  # the suite's run at its defaults until 2 December
ROWS = [  # label, run folder, method
    ("150 queries (the defaults), rank chosen", DEFAULTS, "thought_patch"),
    ("480 queries, rank chosen", "queries480", "thought_patch"),
    ("480 queries, as fitted", "queries480_as_fitted", "thought_patch"),
    ("480 queries, thought matrices alone, as fitted", "queries480", "thought_matrix"),
    ("150 queries (the defaults), refined", DEFAULTS, "thought_patch_refined"),
    ("480 queries, refined", "queries480", "thought_patch_refined"),
    ("150 queries (the defaults), rank chosen, seeds 3-5", "queries150_seeds345", "thought_patch"),
    ("480 queries, as fitted, seeds 3-5", "queries480_as_fitted_seeds345", "thought_patch"),
]


def load(folder: str) -> dict | None:
    path = ROOT / folder / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def check(runs: dict[str, dict]) -> None:
    """The runs on the same seeds filtered the same examples; the 480 runs extend the 150 queries."""
    by_seeds: dict[tuple, dict] = {}
    for folder, data in runs.items():
        seeds = tuple(data["meta"]["config"]["seeds"])
        reference = by_seeds.setdefault(seeds, data)
        for task, entry in data["meta"]["tasks"].items():
            assert entry["filtered_indices"] == reference["meta"]["tasks"][task]["filtered_indices"], (folder, task)
    defaults = runs[DEFAULTS]["meta"]["tasks"]
    for folder, data in runs.items():
        for task, entry in data["meta"]["tasks"].items():
            n = len(defaults[task]["queries"])
            assert entry["queries"][:n] == defaults[task]["queries"], (folder, task)


def main() -> None:
    runs = {folder: data for folder in dict.fromkeys(f for _, f, _ in ROWS) if (data := load(folder)) is not None}
    check(runs)
    tasks = sorted(runs[DEFAULTS]["meta"]["tasks"])
    print("| fit rows, matrices | " + " | ".join(tasks) + " | mean | per seed |")
    print("|---" * (len(tasks) + 3) + "|")
    for label, folder, method in ROWS:
        if folder not in runs:
            print(f"| {label} | (no run in docs/benchmark/{folder}) |")
            continue
        per_task = runs[folder][method]["per_task"]
        values = np.array([per_task[t]["per_seed"] for t in tasks]) * 100  # task x seed
        cells = " | ".join(f"{v:.0f}" for v in values.mean(1))
        seeds = " / ".join(f"{v:.1f}" for v in values.mean(0))
        print(f"| {label} | {cells} | {values.mean():.1f} | {seeds} |")
    print("\nchecked: the same filtered examples on the same seeds; the 480 runs' first 150 queries are the defaults'")


if __name__ == "__main__":
    main()
