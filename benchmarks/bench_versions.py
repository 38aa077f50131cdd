"""Benchmark: the suite's cost per seed, this version against an earlier commit at ITS defaults,
measured in one run, so that the machine's speed (these shared machines drift by a factor of two
between runs) cancels out of the ratio. This version runs twice over: B, with the earlier
commit's default methods (the same work: what a refactoring must not slow down), and C, at its own
defaults (its suite's cost, new methods included).

The earlier commit (default ``f026f3e``: 60 queries, ridge 1, before the shared positions of the
prompts with the chunk ran once; ``9ca5b9d``: 150 queries, ridge 0.5, the rank chosen among 1, 4, 16
and as fitted, the ablations fitted on their own) is checked out in a temporary git worktree. For one task and seed,
each version runs in its own process of one torch thread (as a suite worker), in the order
A B C C B A (A: the earlier commit; B, C: this version), as the suite runs them: ``example_verdicts`` and
``query_answers`` (once a task in the suite, so a third of their time counts per seed) and
``evaluate_seed`` with every method, at each version's ``EvalConfig()`` (and, in versions that
have them, ``query_difference_sums`` and ``query_full_rows``, also once a task; in versions with
``query_answers_with_rows``, the answers and their rows together, as their suite computes them). Prints each run's times,
``thought_patch``'s accuracy (each version's own suite value for that task and seed, the same in
both repeats), and the ratios of the medians B / A and C / A, which times the earlier suite's
time estimate this version's suite at the same pace.

Run: .venv/bin/python benchmarks/bench_versions.py --task plural [--seed 0] [--ref 4a950f1]
(the suite runs two worker processes: run two tasks at once, as it does).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ONE = r"""
import sys, time, torch
from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks
torch.set_num_threads(1)
name, seed = sys.argv[1], int(sys.argv[2])
model = load_default_model()
task = load_task(next(p for p in shipped_tasks() if p.stem == name))
config = E.EvalConfig()
if sys.argv[3] != "defaults":  # the given methods of this version's (the earlier commit's defaults)
    config = E.EvalConfig(methods=tuple(m for m in sys.argv[3].split(",") if m in E.METHODS))
t0 = time.perf_counter()
verdicts = E.example_verdicts(model, task, batch_size=config.batch_size)
t1 = time.perf_counter()
# versions that compute the queries' part of the steering baselines once a task, as their suite does
once = {}
if hasattr(E, "query_answers_with_rows"):  # the queries' rows read from their decoding
    queries, once["query_rows"] = E.query_answers_with_rows(model, task, config)
else:
    queries = E.query_answers(model, task, config.n_queries, batch_size=config.batch_size)
    if hasattr(E, "query_full_rows"):  # and the queries' prompts with the chunk, streamed once a task
        once["query_rows"] = E.query_full_rows(model, task, queries, config)
if hasattr(E, "query_difference_sums"):
    once["query_sums"] = E.query_difference_sums(model, task, queries, config, *once.values())
t2 = time.perf_counter()
if hasattr(E, "TaskInputs"):  # the once-a-task inputs in one object
    result = E.evaluate_seed(model, task, config, seed, E.TaskInputs(verdicts, queries, **once))
else:
    result = E.evaluate_seed(model, task, config, seed, verdicts, queries, **once)
t3 = time.perf_counter()
n = len(config.seeds)
print("RESULT", config.n_queries, config.ridge, t1 - t0, t2 - t1, t3 - t2, (t2 - t0) / n + (t3 - t2),
      result.accuracy["thought_patch"])
"""


def run(tree: Path, task: str, seed: int, methods: str = "defaults") -> dict:
    out = subprocess.run([sys.executable, "-c", ONE, task, str(seed), methods], cwd=tempfile.gettempdir(),
                         env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"the run in {tree} failed:\n{out.stderr[-2000:]}")
    n_queries, ridge, verdicts, answers, seed_s, per_seed, accuracy = lines[-1].split()[1:]
    return dict(config=f"{n_queries} queries, ridge {float(ridge):g}", verdicts=float(verdicts),
                queries=float(answers), seed=float(seed_s), per_seed=float(per_seed), accuracy=float(accuracy))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="a shipped task's name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ref", default="4a950f1", help="the earlier commit (A)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), args.ref], check=True)
        try:
            ref_methods = subprocess.run(
                [sys.executable, "-c", "from tl_thoughts import evaluation as E; print(','.join(E.EvalConfig().methods))"],
                cwd=tempfile.gettempdir(), env={**os.environ, "PYTHONPATH": str(old)}, capture_output=True, text=True,
                check=True).stdout.strip()
            trees = {"A": old, "B": ROOT, "C": ROOT}
            methods = {"A": "defaults", "B": ref_methods, "C": "defaults"}
            runs: dict[str, list[dict]] = {"A": [], "B": [], "C": []}
            for which in "ABCCBA":
                r = run(trees[which], args.task, args.seed, methods[which])
                runs[which].append(r)
                print(f"{which} ({r['config']}): verdicts {r['verdicts']:.0f} s, queries {r['queries']:.0f} s, "
                      f"seed {r['seed']:.0f} s, per seed {r['per_seed']:.0f} s, thought_patch {r['accuracy']:.3f}",
                      flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    medians = {k: statistics.median(r["per_seed"] for r in v) for k, v in runs.items()}
    print(f"\ntask {args.task}, seed {args.seed}; A: {args.ref} ({runs['A'][0]['config']}), "
          f"B: this version at A's default methods, C: this version at its defaults")
    seconds = {k: " / ".join(f"{r['per_seed']:.0f}" for r in v) for k, v in runs.items()}
    print(f"seconds per seed, A: {seconds['A']}, B: {seconds['B']}, C: {seconds['C']}")
    print(f"ratio B / A (medians): {medians['B'] / medians['A']:.2f}")
    print(f"ratio C / A (medians): {medians['C'] / medians['A']:.2f}")


if __name__ == "__main__":
    main()
