"""The protocol's results as files: ``results.json`` ([`results_json`][]), a markdown table
([`markdown_table`][]), a bar plot ([`plot_results`][]), all three written by
[`write_results`][]; [`compare_results`][] lists the differences between two of them. Each
task's result stored as it finishes and read back by a later run with the same options
([`run_options`][], [`save_task_result`][], [`stored_task_results`][])."""

import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from urllib.parse import quote

import numpy as np

from tl_thoughts.evaluation.config import EvalConfig, EvalOptionError
from tl_thoughts.evaluation.protocol import TaskResult
from tl_thoughts.tasks import Task


def checkout_commit() -> str | None:
    """The git commit of the checkout the package runs from, if any.

    ``git rev-parse HEAD`` run in the package's directory, with ``"+dirty"`` appended when
    ``git status --porcelain`` lists changes to tracked files. None when the package is not in a
    git checkout or git is missing (never raises).

    Example:
        >>> commit = checkout_commit()
        >>> commit is None or len(commit.removesuffix("+dirty")) == 40
        True
    """
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=60)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if status.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def results_json(
    results: list[TaskResult], config: EvalConfig, model_name: str, *, command: str | None = None
) -> dict:
    """The content of ``results.json``.

    One top-level key per method (accuracy averaged over tasks, each task's mean over seeds,
    spread, per-seed values and filtered counts), plus ``meta``: the model, the package's version
    and git commit ([`checkout_commit`][]), the ``command`` that produced the results (as given;
    the ``tl-thoughts eval`` command line), the configuration, and per task its examples, answered
    queries, unfiltered accuracies, chosen layers and ranks, splits and seconds.

    Example:
        >>> data = results_json([], EvalConfig(), "SmolLM2", command="tl-thoughts eval --suite")
        >>> data["meta"].get("command")
        'tl-thoughts eval --suite'
        >>> data = results_json([evaluate_task(model, task)], EvalConfig(), "SmolLM2")  # doctest: +SKIP
    """
    from tl_thoughts.version import __version__

    out: dict = {}
    for method in config.methods:
        per_task = {r.task: r.summary(method) for r in results}
        means = [t["accuracy"] for t in per_task.values() if t["accuracy"] is not None]
        out[method] = {
            "accuracy": float(np.mean(means)) if means else None,
            "std_over_tasks": float(np.std(means)) if means else None,
            "n_filtered": {task: t["n_filtered"] for task, t in per_task.items()},
            "per_seed": {task: t["per_seed"] for task, t in per_task.items()},
            "per_task": per_task,
        }
    out["meta"] = {
        "model": model_name,
        "version": __version__,
        "commit": checkout_commit(),
        "command": command,
        "config": _config_json(config),
        "tasks": {
            r.task: {
                "n_examples": r.n_examples,
                "queries": [list(pair) for pair in r.queries],
                "with_chunk_all": [s.with_chunk_all for s in r.seeds],
                "without_chunk_all": [s.without_chunk_all for s in r.seeds],
                "layers": [s.layers for s in r.seeds],
                "ranks": [s.ranks for s in r.seeds],
                "fit_indices": [s.fit_indices for s in r.seeds],
                "filtered_indices": [s.filtered_indices for s in r.seeds],
                "seconds": sum(s.seconds for s in r.seeds),
            }
            for r in results
        },
    }
    return out


def compare_results(old: dict, new: dict) -> list[str]:
    """The differences between two ``results.json`` contents, every value the protocol produces.

    For every method of ``old``: its accuracy, per-seed values and filtered counts in ``new``
    (a method of ``new`` that ``old`` lacks is not a difference: a new method's row); for every task
    of ``old``: its examples, answered queries, unfiltered accuracies, chosen layers and ranks and
    splits (``meta.tasks``; the seconds aside). What a change that must not move a value is checked
    with, against the stored ``docs/benchmark/results.json``.

    Returns:
        One line per difference (empty: the same values).

    Example:
        >>> old = {"thought_patch": {"accuracy": 0.9, "per_seed": {}, "n_filtered": {}}, "meta": {"tasks": {}}}
        >>> compare_results(old, old)
        []
        >>> compare_results(old, {**old, "thought_patch": {**old["thought_patch"], "accuracy": 0.8}})
        ['thought_patch.accuracy: 0.9 != 0.8']
    """
    diffs = []
    for method, values in old.items():
        if method == "meta":
            continue
        if method not in new:
            diffs.append(f"{method}: missing")
            continue
        for key in ("accuracy", "per_seed", "n_filtered"):
            if values.get(key) != new[method].get(key):
                diffs.append(f"{method}.{key}: {values.get(key)} != {new[method].get(key)}")
    tasks_new = new.get("meta", {}).get("tasks", {})
    for task, fields in old.get("meta", {}).get("tasks", {}).items():
        if task not in tasks_new:
            diffs.append(f"meta.tasks.{task}: missing")
            continue
        for key, value in fields.items():
            if key != "seconds" and value != tasks_new[task].get(key):
                diffs.append(f"meta.tasks.{task}.{key}: differs")
    return diffs


def markdown_table(results: list[TaskResult], config: EvalConfig) -> str:
    """A markdown table of the results, a row per task and a column per method.

    Per task: every method's accuracy on the filtered examples (mean ± spread over seeds) and the
    number of filtered examples per seed; a last row averages over tasks.

    Example:
        >>> print(markdown_table([evaluate_task(model, task)], EvalConfig()))  # doctest: +SKIP
    """
    methods = list(config.methods)
    lines = [
        "| task | filtered (per seed) | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    means: dict[str, list[float]] = {m: [] for m in methods}
    for r in results:
        cells = []
        for m in methods:
            s = r.summary(m)
            if s["accuracy"] is None:
                cells.append("n/a")
            else:
                means[m].append(s["accuracy"])
                cells.append(f"{100 * s['accuracy']:.0f} ± {100 * s['std']:.0f}")
        n = "/".join(str(k) for k in r.summary(methods[0])["n_filtered"])
        lines.append(f"| {r.task} | {n} | " + " | ".join(cells) + " |")
    avg = [f"**{100 * float(np.mean(v)):.0f}**" if v else "n/a" for v in means.values()]
    lines.append("| **mean over tasks** | | " + " | ".join(avg) + " |")
    return "\n".join(lines)


def plot_results(results: list[TaskResult], config: EvalConfig, save: str | Path | None = None):
    """A bar plot of the results (a matplotlib ``Figure``, saved to ``save`` if given).

    Grouped bars: accuracy on the filtered examples per task and method (mean over seeds, with the
    spread as error bars).

    Example:
        >>> fig = plot_results([evaluate_task(model, task)], EvalConfig(), save="results.png")  # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    methods = [m for m in config.methods if m not in ("with_chunk", "without_chunk")]
    fig = Figure(figsize=(max(6.0, 1.1 * len(results) + 3), 3.8), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        acc = [r.summary(m)["accuracy"] or 0.0 for r in results]
        err = [r.summary(m)["std"] or 0.0 for r in results]
        xs = np.arange(len(results)) + (j - (len(methods) - 1) / 2) * width
        ax.bar(xs, acc, width, yerr=err, label=m, capsize=2)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels([r.task for r in results], rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy without the chunk\n(filtered examples)")
    ax.legend(fontsize=7, ncols=2)
    if save is not None:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=120)
    return fig


def write_results(
    results: list[TaskResult], config: EvalConfig, model_name: str, out: str | Path, *, command: str | None = None
) -> Path:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out`` (created).

    ``command``: recorded in ``results.json``'s ``meta`` ([`results_json`][]).

    Example:
        >>> write_results([evaluate_task(model, task)], EvalConfig(), "SmolLM2", "out")  # doctest: +SKIP
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results_json(results, config, model_name, command=command),
                                                 indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(results, config) + "\n")
    plot_results(results, config, save=out / "results.png")
    return out



def _config_json(config: EvalConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def run_options(config: EvalConfig, model_name: str, dtype: str) -> dict:
    """What a task's stored result depends on besides the task: the model and its dtype, the
    package's version and git commit ([`checkout_commit`][]; a checkout with uncommitted changes
    is ``+dirty``, whatever the changes), and the configuration (as in ``results.json``).

    Example:
        >>> sorted(run_options(EvalConfig(), "SmolLM2", "float32"))
        ['commit', 'config', 'dtype', 'model', 'version']
    """
    from tl_thoughts.version import __version__

    return {"model": model_name, "dtype": dtype, "version": __version__, "commit": checkout_commit(),
            "config": _config_json(config)}


def task_result_path(out: str | Path, task_name: str) -> Path:
    """Where [`save_task_result`][] stores a task's result: ``out/tasks/<task name>.json`` (the
    name percent-encoded where it is not a plain file name).

    Example:
        >>> task_result_path("out", "past_tense").as_posix(), task_result_path("out", "a/b").name
        ('out/tasks/past_tense.json', 'a%2Fb.json')
    """
    return Path(out) / "tasks" / (quote(task_name, safe="") + ".json")


def save_task_result(result: TaskResult, task: Task, options: dict, out: str | Path) -> Path:
    """Store a finished task's result in ``out/tasks`` ([`task_result_path`][]), with the task
    (its file's content) and the ``options`` it was computed with ([`run_options`][]).

    Written to a temporary file then renamed over the path, so that the file is whole or absent
    even if the run is killed while writing.

    Example:
        >>> save_task_result(evaluate_task(model, task, config), task, run_options(config, "SmolLM2", "float32"), "out")  # doctest: +SKIP
    """
    path = task_result_path(out, result.task)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"options": options, "task": task.to_json(), "result": result.to_json()}
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False,
                                     encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1) + "\n")
    os.replace(f.name, path)
    return path


def _differences(stored, given, where: str) -> list[str]:
    if isinstance(stored, dict) and isinstance(given, dict):
        return [d for key in sorted(set(stored) | set(given), key=str)
                for d in _differences(stored.get(key), given.get(key), f"{where}.{key}" if where else key)]
    return [] if stored == given else [f"{where} (stored {stored!r}, now {given!r})"]


def stored_task_results(tasks: Sequence[Task], options: dict, out: str | Path) -> dict[str, TaskResult]:
    """The results stored in ``out/tasks`` by an earlier run ([`save_task_result`][]) for
    ``tasks``, by task name, after checking that every stored result in the folder was computed
    with the same ``options`` ([`run_options`][]), and each of ``tasks`` stored from the same task.

    Raises:
        EvalOptionError: A stored result computed with other options (the message names each
            differing option), for another content of a task of that name, or unreadable; the
            message says how to proceed (another output folder, or delete ``out/tasks``).

    Example:
        >>> stored_task_results([task], run_options(EvalConfig(), "SmolLM2", "float32"), "out")  # doctest: +SKIP
        {}
    """
    folder = Path(out) / "tasks"
    how = f"use another --out, or delete {folder} (the stored results) to start again"
    found = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            result = TaskResult.from_json(data["result"])
            stored_options, stored_task = data["options"], data["task"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EvalOptionError(f"{path} is not a stored task result ({e}): {how}") from None
        diffs = _differences(stored_options, options, "")
        if diffs:
            raise EvalOptionError(f"{folder} holds results computed with other options than this run's: "
                                  f"{'; '.join(diffs)}; {how}")
        found[result.task] = (result, stored_task)
    results = {}
    for task in tasks:
        if task.name in found:
            result, stored_task = found[task.name]
            if stored_task != task.to_json():
                raise EvalOptionError(f"the stored result of task {task.name!r} in {folder} is of another version "
                                      f"of the task (its file changed): {how}")
            results[task.name] = result
    return results
