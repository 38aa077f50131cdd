"""The protocol (see [`tl_thoughts.evaluation`][]): a seed's split, fits and verdicts
([`evaluate_seed`][]), the inputs computed once a task ([`TaskInputs`][],
[`prepare_task`][]), every seed of a task ([`evaluate_task`][]), and tasks in worker processes
([`evaluate_in_processes`][])."""

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_thoughts import _tl
from tl_thoughts._tl import Model
from tl_thoughts.errors import InputError
from tl_thoughts.evaluation.baselines import (
    DifferenceSums,
    all_layer_steering_hooks,
    best_layers,
    difference_sums,
    query_difference_sums,
    region_start,
    steering_edit,
    steering_hooks,
    task_vector_edit,
    task_vector_hooks,
)
from tl_thoughts.evaluation.config import (
    BASELINES,
    PART_METHODS,
    EvalConfig,
    EvalOptionError,
    check_model,
    check_post_norm_methods,
    check_tasks,
    fit_kinds,
)
from tl_thoughts.evaluation.decoding import query_answers_with_rows
from tl_thoughts.evaluation.examples import TaskExample, encode_task_example, encode_task_examples, stop_tokens
from tl_thoughts.evaluation.verdicts import HookFactory, example_verdicts, greedy_match, match_under
from tl_thoughts.models import DEFAULT_MODEL_NAME, POST_NORM_MODEL_NAMES
from tl_thoughts.patch import ThoughtPatch
from tl_thoughts.refine import refine_thought
from tl_thoughts.tasks import Task
from tl_thoughts.stream import PromptRows
from tl_thoughts.thoughts import fit_thought, fit_thoughts


@dataclass
class SeedResult:
    """One seed of one task: the split, the filter, and every method's right/wrong per filtered
    test example.

    Attributes:
        seed: The seed of the split.
        fit_indices, test_indices: The split: the task's examples fitted on and tested on.
        filtered_indices: The test examples right with the chunk and wrong without it.
        with_chunk_all, without_chunk_all: Accuracy with / without the chunk on all test examples
            (before filtering).
        accuracy: ``{method: accuracy on the filtered examples}`` (NaN without filtered examples).
        right: ``{method: right/wrong per filtered example}``.
        layers: ``{method: the layer chosen on fit data}`` (``steering_best_layer``, ``task_vector``).
        ranks: ``{method: the thought matrices' rank chosen on fit data}`` (None: as fitted).
        seconds: Wall time of the seed.
    """

    seed: int
    fit_indices: list[int]
    test_indices: list[int]
    filtered_indices: list[int]
    with_chunk_all: float  # accuracy on all test examples (before filtering)
    without_chunk_all: float
    accuracy: dict[str, float] = field(default_factory=dict)  # on the filtered examples
    right: dict[str, list[bool]] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)  # layer chosen on fit data
    ranks: dict[str, int | None] = field(default_factory=dict)  # thought matrices' rank chosen on fit data
    seconds: float = 0.0

    def to_json(self) -> dict:
        """The seed's result as a JSON object ([`from_json`][] gives it back, every value the same;
        ``json.dumps`` writes NaN accuracies as ``NaN``, which ``json.loads`` reads back)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SeedResult":
        """The seed's result from [`to_json`][]'s object.

        Raises:
            InputError: Missing or unknown keys.
        """
        return cls(**_fields_of(cls, data))


@torch.no_grad()
def choose_rank(
    model: Model,
    patch: ThoughtPatch,
    ranks: Sequence[int | None],
    fit_set: list[TaskExample],
    *,
    stops: Bool[Tensor, " d_vocab"] | None = None,
    batch_size: int = 32,
    unembed_weight: Float[Tensor, "d_vocab d_model"] | None = None,
) -> tuple[ThoughtPatch, int | None]:
    """The patch at the candidate rank that does best on the fit examples.

    The patch with its thought matrices at the candidate rank (``None``: as fitted) that does
    best on ``fit_set`` without the chunk: accuracy, then mean log-probability of the
    continuations, then the smaller rank. With one candidate, that one (nothing is run).

    Example:
        >>> patch, rank = choose_rank(model, patch, (1, 4, 16, None), fit_set)  # doctest: +SKIP
    """
    ranks = list(ranks)
    ints = [r for r in ranks if r is not None]
    made = dict(zip(ints, patch.truncations(ints))) if ints else {}
    candidates = {r: (patch if r is None else made[r]) for r in ranks}
    if len(candidates) == 1:
        return candidates[ranks[0]], ranks[0]
    scores = {}
    stops = stop_tokens(model) if stops is None else stops
    unembed_weight = model.W_U.T.contiguous() if unembed_weight is None else unembed_weight
    for r, p in candidates.items():
        right, logprob = match_under(model, p, fit_set, stops=stops, batch_size=batch_size,
                                     unembed_weight=unembed_weight)
        size = float("inf") if r is None else r
        scores[r] = (float(right.double().mean()), float(logprob.mean()), -size)
    best = max(ranks, key=lambda r: scores[r])
    return candidates[best], best


def split(n_examples: int, n_fit: int, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint fit and test indices, from a seeded permutation (deterministic across machines).

    Raises:
        InputError: ``n_fit`` leaves no test example.

    Example:
        >>> fit, test = split(80, 20, seed=0)
        >>> len(fit), len(test), set(fit) & set(test)
        (20, 60, set())
    """
    if n_fit >= n_examples:
        raise InputError(f"n_fit={n_fit} leaves no test example out of {n_examples}")
    order = np.random.default_rng(seed).permutation(n_examples).tolist()
    return sorted(order[:n_fit]), sorted(order[n_fit:])


@dataclass(frozen=True)
class TaskInputs:
    """What the protocol computes once a task, the same for every seed ([`prepare_task`][]).

    Attributes:
        verdicts: ``(right with the chunk [n_examples], right without it [n_examples])``: every
            example's verdicts, by example index ([`tl_thoughts.evaluation.example_verdicts`][]);
            each seed filters its test examples with them.
        queries: The answered unlabelled queries, ``(query, answer)`` pairs (a tuple), the answers
            the model's own with the chunk ([`tl_thoughts.evaluation.query_answers`][]).
        query_rows: The queries' prompts with the chunk at the rows the fits read, which the fits
            read instead of streaming them again
            ([`tl_thoughts.evaluation.query_answers_with_rows`][]); None where no patch is
            fitted or there is no query (then a fit streams whatever queries it has).
        query_sums: The queries' part of the steering baselines' sums
            ([`tl_thoughts.evaluation.query_difference_sums`][]); None where no baseline runs.

    Raises:
        InputError: The two verdicts differ in length, or ``query_sums`` are sums over another
            number of queries.

    Example:
        >>> inputs = prepare_task(model, task, config)  # doctest: +SKIP
        >>> seeds = [evaluate_seed(model, task, config, seed, inputs) for seed in config.seeds]  # doctest: +SKIP
    """

    verdicts: tuple[Bool[Tensor, " n_examples"], Bool[Tensor, " n_examples"]]
    queries: Sequence[tuple[str, str]]
    query_rows: PromptRows | None = None
    query_sums: DifferenceSums | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "queries", tuple(tuple(pair) for pair in self.queries))
        with_right, without_right = self.verdicts
        if with_right.dim() != 1 or with_right.shape != without_right.shape:
            raise InputError(f"verdicts must be two vectors of one length, got shapes {tuple(with_right.shape)} "
                             f"and {tuple(without_right.shape)}")
        if self.query_sums is not None and self.query_sums.n_examples != len(self.queries):
            raise InputError(f"query_sums are sums over {self.query_sums.n_examples} queries, "
                             f"{len(self.queries)} queries given")

    def check(self, task: Task, config: EvalConfig) -> None:
        """Check that these inputs fit ``task`` and ``config``.

        Raises:
            InputError: Another number of queries than ``config.n_queries``, verdicts that do not
                hold one value per example of ``task``, or no ``query_sums`` where ``config`` runs a
                steering baseline.

        Example:
            >>> prepare_task(model, task, config).check(task, config)  # doctest: +SKIP
        """
        if len(self.queries) != config.n_queries:
            raise InputError(f"{len(self.queries)} answered queries given, config.n_queries is {config.n_queries}")
        if any(tuple(v.shape) != (len(task.examples),) for v in self.verdicts):
            raise InputError(f"verdicts must hold one value per example of {task.name!r} ({len(task.examples)})")
        if self.query_sums is None and set(BASELINES) & set(config.methods):
            raise InputError("config runs a steering baseline: query_sums are needed (see prepare_task)")


def prepare_task(model: Model, task: Task, config: EvalConfig) -> TaskInputs:
    """What the protocol computes once a task for every seed.

    The task's [`tl_thoughts.evaluation.example_verdicts`][], its answered queries and their rows
    ([`tl_thoughts.evaluation.query_answers_with_rows`][]), and the queries' part of the steering
    baselines' sums ([`tl_thoughts.evaluation.query_difference_sums`][]), in that order, as
    [`evaluate_task`][] computes them.

    Example:
        >>> inputs = prepare_task(load_default_model(), task, EvalConfig())  # doctest: +SKIP
        >>> len(inputs.queries)  # doctest: +SKIP
        480
    """
    verdicts = example_verdicts(model, task, batch_size=config.batch_size)
    queries, query_rows = query_answers_with_rows(model, task, config)
    query_sums = query_difference_sums(model, task, queries, config, query_rows)
    return TaskInputs(verdicts=verdicts, queries=queries, query_rows=query_rows, query_sums=query_sums)


@torch.no_grad()
def evaluate_seed(
    model: Model,
    task: Task,
    config: EvalConfig,
    seed: int,
    inputs: TaskInputs | None = None,
) -> SeedResult:
    """The protocol on one seed (see [`tl_thoughts.evaluation`][]).

    ``inputs``: the task's [`TaskInputs`][] if the caller has them ([`prepare_task`][], the
    same for every seed), computed here otherwise (the same either way). The model is left as it
    was (its gated MLP weights are stored transposed in memory during the runs,
    `tl_thoughts._tl.linear_layout`).

    Raises:
        InputError: ``inputs`` that do not fit ``task`` and ``config`` ([`TaskInputs.check`][]).

    Example:
        >>> seed = evaluate_seed(load_default_model(), task, EvalConfig(), seed=0)  # doctest: +SKIP
        >>> seed.accuracy["thought_patch"], len(seed.filtered_indices)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if inputs is None:
        inputs = prepare_task(model, task, config)
    inputs.check(task, config)
    with _tl.linear_layout(model):
        result = _evaluate_seed(model, task, config, seed, inputs.verdicts, list(inputs.queries), inputs.query_sums,
                                inputs.query_rows)
    result.seconds = time.perf_counter() - t0
    return result


def _evaluate_seed(
    model: Model, task: Task, config: EvalConfig, seed: int, verdicts: tuple[Tensor, Tensor],
    queries: list[tuple[str, str]], query_sums: DifferenceSums | None, query_rows: PromptRows | None,
) -> SeedResult:
    stops = stop_tokens(model)
    fit_idx, test_idx = split(len(task.examples), config.n_fit, seed)
    fit_set = encode_task_examples(model, task, fit_idx)  # labelled: the choices on fit data
    test_set = encode_task_examples(model, task, test_idx)
    bs = config.batch_size
    with_right, without_right = (v[torch.tensor(test_idx)] for v in verdicts)
    keep = with_right & ~without_right
    filtered = [e for e, k in zip(test_set, keep.tolist()) if k]
    result = SeedResult(
        seed=seed,
        fit_indices=fit_idx,
        test_indices=test_idx,
        filtered_indices=[i for i, k in zip(test_idx, keep.tolist()) if k],
        with_chunk_all=float(with_right.double().mean()),
        without_chunk_all=float(without_right.double().mean()),
    )
    result.right["with_chunk"] = [True] * len(filtered)
    result.right["without_chunk"] = [False] * len(filtered)

    unembed_weight = model.W_U.T.contiguous()

    def run(name: str, hooks: HookFactory | None = None, patch: ThoughtPatch | None = None) -> None:
        if patch is not None:  # in its weight form
            right, _ = match_under(model, patch, filtered, stops=stops, batch_size=bs, unembed_weight=unembed_weight)
        else:
            right, _ = greedy_match(model, filtered, with_chunk=False, hooks=hooks, stops=stops, batch_size=bs,
                                    unembed_weight=unembed_weight)
        result.right[name] = right.tolist()

    if filtered:
        # every method is fitted on the fit examples plus the answered queries
        labelled = task.fit_examples(fit_idx)
        fit_pairs = labelled + [(q, task.continuation(a)) for q, a in queries]
        wanted = set(BASELINES) & set(config.methods)
        # the answered queries as protocol rows, where the rank choice or the baselines use them
        query_set = [encode_task_example(model, task, q, a) for q, a in queries] if config.rank_on_queries or wanted else []
        refine = "thought_patch_refined" in config.methods
        parts = [name for name in PART_METHODS if name in config.methods]
        kinds = fit_kinds(config.methods)
        patches = fit_thoughts(  # the prompts with the chunk streamed once for all the fits, the queries' read
            model, task.chunk, fit_pairs, config.fit_config(len(fit_pairs)), fits=list(kinds.values()),
            template=task.template, rows=query_rows, progress=False,
        ) if kinds else {}
        for name, kind in kinds.items():
            patch = patches[kind]
            if name == "thought_patch":
                for part in parts:  # the least-squares patch's vectors alone, its matrices alone (as fitted)
                    run(part, patch=patch.only(PART_METHODS[part]))
                choice_set = fit_set + query_set if config.rank_on_queries else fit_set
                patch, rank = choose_rank(model, patch, config.ranks, choice_set, stops=stops,
                                          batch_size=bs, unembed_weight=unembed_weight)
                if refine:  # from the least-squares patch at its chosen rank
                    # trained on the labelled answers only (the queries' answers are the chunk's own)
                    refined = refine_thought(model, patch, labelled, steps=config.refine_steps,
                                             lr=config.refine_lr, batch_size=bs, progress=False)
                    result.ranks["thought_patch_refined"] = rank
                    run("thought_patch_refined", patch=refined)
                if name not in config.methods:
                    continue
                result.ranks[name] = rank
            run(name, patch=patch)
        if "thought_patch_paper" in config.methods:  # the papers' method: the labelled examples only
            paper = fit_thought(model, task.chunk, labelled, config.paper_fit_config(), template=task.template,
                                progress=False)
            run("thought_patch_paper", patch=paper)
        if wanted:
            # the fit examples' sums, plus the queries' (the same in every seed: computed once a task)
            deltas, task_vectors = (difference_sums(model, fit_set, config.pool, bs) + query_sums).means()
            start = region_start(fit_set + query_set + filtered)
            edits = {"steering_best_layer": steering_edit(deltas, start), "task_vector": task_vector_edit(task_vectors)}
            edits = {name: edit for name, edit in edits.items() if name in wanted}
            best = best_layers(model, fit_set, edits, stops, bs) if edits else {}
            if "steering_best_layer" in wanted:
                layer = best["steering_best_layer"][0]
                result.layers["steering_best_layer"] = layer
                run("steering_best_layer", steering_hooks(deltas, [layer], start))
            if "steering_all_layers" in wanted:
                run("steering_all_layers", all_layer_steering_hooks(deltas, start))
            if "task_vector" in wanted:
                layer = best["task_vector"][0]
                result.layers["task_vector"] = layer
                run("task_vector", task_vector_hooks(task_vectors, layer))
    for name in config.methods:
        values = result.right.get(name, [])
        result.accuracy[name] = float(np.mean(values)) if values else float("nan")
    return result


@dataclass
class TaskResult:
    """All seeds of one task.

    Attributes:
        task: The task's name.
        n_examples: The task's examples.
        seeds: One [`SeedResult`][] per seed, in the order of ``EvalConfig.seeds``.
        queries: The answered unlabelled queries ``(query, answer)``, the same in every seed.
    """

    task: str
    n_examples: int
    seeds: list[SeedResult]
    queries: list[tuple[str, str]] = field(default_factory=list)  # answered unlabelled queries, every seed

    def summary(self, method: str) -> dict:
        """A method's accuracy over the seeds.

        Returns:
            ``accuracy`` (mean over seeds with filtered examples), ``std``, ``per_seed``,
            ``n_filtered`` (per seed).
        """
        per_seed = [s.accuracy.get(method, float("nan")) for s in self.seeds]
        valid = [a for a in per_seed if not np.isnan(a)]
        return {
            "accuracy": float(np.mean(valid)) if valid else None,
            "std": float(np.std(valid)) if valid else None,
            "per_seed": [None if np.isnan(a) else a for a in per_seed],
            "n_filtered": [len(s.filtered_indices) for s in self.seeds],
        }

    def to_json(self) -> dict:
        """The task's result as a JSON object: what ``tl-thoughts eval`` stores as each task finishes
        ([`from_json`][] gives it back, every value the same).

        Example:
            >>> import json
            >>> seed = SeedResult(0, [0], [1, 2], [2], 1.0, 0.5, {"thought_patch": float("nan")})
            >>> result = TaskResult("t", 3, [seed], [("q", "a")])
            >>> back = TaskResult.from_json(json.loads(json.dumps(result.to_json())))
            >>> back.queries, back.seeds[0].accuracy
            ([('q', 'a')], {'thought_patch': nan})
        """
        return {"task": self.task, "n_examples": self.n_examples, "seeds": [s.to_json() for s in self.seeds],
                "queries": [list(pair) for pair in self.queries]}

    @classmethod
    def from_json(cls, data: dict) -> "TaskResult":
        """The task's result from [`to_json`][]'s object (the queries as tuples).

        Raises:
            InputError: Missing or unknown keys.
        """
        data = _fields_of(cls, data)
        return cls(task=data["task"], n_examples=data["n_examples"],
                   seeds=[SeedResult.from_json(s) for s in data["seeds"]],
                   queries=[tuple(pair) for pair in data["queries"]])


def _fields_of(cls: type, data: dict) -> dict:
    """``data`` if it holds exactly the fields of the dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    if not isinstance(data, dict) or set(data) != names:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"a stored {cls.__name__} has the keys {sorted(names)}, got {got}")
    return data


def evaluate_task(
    model: Model, task: Task, config: EvalConfig = EvalConfig(), progress: bool = True  # noqa: B008 (frozen)
) -> TaskResult:
    """Run the protocol on a task for every seed of ``config``.

    The task's [`TaskInputs`][] are computed once ([`prepare_task`][]), then each seed
    ([`evaluate_seed`][]). The model is left untouched (every patch and hook is removed on exit,
    also on an exception).

    Raises:
        EvalOptionError: ``config`` cannot run on ``task`` ([`check_tasks`][]), before any run.

    Example:
        >>> from tl_thoughts.tasks import load_task, shipped_tasks
        >>> result = evaluate_task(load_default_model(), load_task(shipped_tasks()[0]))  # doctest: +SKIP
        >>> result.summary("thought_patch")["accuracy"]  # doctest: +SKIP
    """
    check_tasks([task], config)
    check_post_norm_methods(config, _tl.model_spec(model).post_norm)
    _tl.check_no_hooks(model)
    inputs = prepare_task(model, task, config)  # once for every seed
    seeds = [
        evaluate_seed(model, task, config, seed, inputs)
        for seed in tqdm(config.seeds, desc=f"{task.name}: seeds", disable=not progress)
    ]
    return TaskResult(task=task.name, n_examples=len(task.examples), seeds=seeds, queries=list(inputs.queries))


@functools.lru_cache(maxsize=1)
def _worker_model(name: str, dtype: torch.dtype, threads: int) -> Model:
    """A worker process's own copy of the model named ``name`` ([`evaluate_in_processes`][]),
    loaded once per process, after setting its torch threads."""
    from tl_thoughts.models import load_named_model

    torch.set_num_threads(threads)
    return load_named_model(name, dtype=dtype)


def _worker_prepare(task: Task, config: EvalConfig, name: str, dtype: torch.dtype, threads: int) -> TaskInputs:
    """A task's [`prepare_task`][], in a worker process."""
    model = _worker_model(name, dtype, threads)
    _tl.check_no_hooks(model)
    return prepare_task(model, task, config)


def _worker_seed(task: Task, config: EvalConfig, seed: int, inputs: TaskInputs, name: str, dtype: torch.dtype,
                 threads: int) -> SeedResult:
    """A seed's [`evaluate_seed`][], in a worker process."""
    model = _worker_model(name, dtype, threads)
    _tl.check_no_hooks(model)
    return evaluate_seed(model, task, config, seed, inputs)


def evaluate_in_processes(
    tasks: Sequence[Task],
    config: EvalConfig = EvalConfig(),  # noqa: B008 (a frozen dataclass)
    *,
    model: str = DEFAULT_MODEL_NAME,
    jobs: int = 2,
    dtype: torch.dtype = torch.float32,
    threads: int = 1,
    on_result: Callable[[TaskResult], None] | None = None,
) -> list[TaskResult]:
    """[`evaluate_task`][] for every task on the model named ``model``, in worker processes.

    ``model``: the name of a model that [`tl_thoughts.models.load_named_model`][] loads (default:
    the embedded default model; ``"gemma-3-270m"``; a TransformerLens pretrained name), checked
    first ([`check_model`][]). ``jobs`` worker processes of ``threads`` torch threads each (each loads its own copy of the
    model, once; the workers take one unit at a time: a task's [`prepare_task`][], then each of
    its seeds; the biggest tasks first). On this
    project's 2-core machine this is as fast as one process with both threads
    (measured at commit ``465c6f6``, ``benchmarks/bench_jobs.py`` there).
    ``on_result(result)`` is called as each task finishes. Results come back in the order of
    ``tasks``, the same as [`evaluate_task`][] gives at the same thread count
    (``tests/test_evaluation.py::test_worker_processes_give_the_same_results``); another thread
    count may change the order of floating-point sums inside torch's kernels.

    Raises:
        EvalOptionError: ``jobs`` or ``threads`` below 1, ``config`` cannot run on ``tasks``
            ([`check_tasks`][]), or ``model`` cannot be loaded ([`check_model`][]), before any
            process starts.

    Example:
        >>> from tl_thoughts.tasks import load_task, shipped_tasks
        >>> results = evaluate_in_processes([load_task(p) for p in shipped_tasks()], jobs=2)  # doctest: +SKIP
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    if isinstance(jobs, bool) or not isinstance(jobs, int) or isinstance(threads, bool) or not isinstance(threads, int) \
            or jobs < 1 or threads < 1:
        raise EvalOptionError(f"jobs and threads must be integers >= 1, got {jobs!r} and {threads!r}")
    check_tasks(tasks, config)
    check_model(model)
    check_post_norm_methods(config, model in POST_NORM_MODEL_NAMES)
    order = sorted(range(len(tasks)), key=lambda i: -len(tasks[i].examples))  # the biggest tasks first
    seeds: dict[int, dict[int, SeedResult]] = {i: {} for i in range(len(tasks))}
    queries: dict[int, list[tuple[str, str]]] = {}
    results: dict[int, TaskResult] = {}
    workers = min(jobs, len(tasks) * len(config.seeds))
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_model, initargs=(model, dtype, threads)) as pool:
        # every task's inputs (its verdicts with and without the chunk, ...) first, then its seeds as they arrive
        pending = {pool.submit(_worker_prepare, tasks[i], config, model, dtype, threads): (i, None) for i in order}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i, seed = pending.pop(future)
                if seed is None:
                    inputs = future.result()
                    queries[i] = list(inputs.queries)
                    for s in config.seeds:
                        pending[pool.submit(_worker_seed, tasks[i], config, s, inputs, model, dtype, threads)] = (i, s)
                    continue
                seeds[i][seed] = future.result()
                if len(seeds[i]) == len(config.seeds):
                    results[i] = TaskResult(task=tasks[i].name, n_examples=len(tasks[i].examples),
                                            seeds=[seeds[i][s] for s in config.seeds], queries=queries[i])
                    if on_result is not None:
                        on_result(results[i])
    return [results[i] for i in range(len(tasks))]

