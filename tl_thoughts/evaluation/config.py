"""The protocol's options ([`EvalConfig`][], validated when made; [`check_tasks`][] for the
tasks, [`check_model`][] for the model's name), its method names, and which least-squares fits a set of methods needs ([`fit_kinds`][]).

This module imports neither torch nor TransformerLens (the command line's parser reads it;
[`check_model`][] imports them when called)."""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from tl_thoughts.errors import InputError

if TYPE_CHECKING:  # imported where used: this module needs neither torch nor TransformerLens
    from tl_thoughts.tasks import Task
    from tl_thoughts.thoughts import FitConfig


class EvalOptionError(InputError):
    """An option of the behavioural benchmark cannot be used: an [`EvalConfig`][] field, the
    tasks for a configuration ([`check_tasks`][]), the worker processes, or the output folder of
    ``tl-thoughts eval``; the message names it. Raised before any model runs."""


DEFAULT_METHODS = (  # the suite's methods
    "with_chunk",
    "without_chunk",
    "thought_vector",
    "thought_matrix",
    "thought_patch",
    "thought_patch_paper",
    "steering_best_layer",
    "steering_all_layers",
    "task_vector",
)
FITTED_ALONE = ("thought_vector_fitted_alone", "thought_matrix_fitted_alone")  # on request (methods=...)
ON_REQUEST = ("thought_patch_refined",) + FITTED_ALONE  # not in the suite's defaults: methods=... adds them
METHODS = DEFAULT_METHODS + ON_REQUEST
# least-squares fits: kind of fit_thought; the thought_patch's fit also gives its parts (read-only mappings)
FIT_METHODS: Mapping[str, str] = MappingProxyType(
    {"thought_patch": "both", "thought_vector_fitted_alone": "vector", "thought_matrix_fitted_alone": "matrix"})
PART_METHODS: Mapping[str, str] = MappingProxyType(
    {"thought_vector": "vectors", "thought_matrix": "matrices"})  # ThoughtPatch.only of the thought_patch
BASELINES = ("steering_best_layer", "steering_all_layers", "task_vector")  # fitted from the mean differences


def fit_kinds(methods: Sequence[str]) -> dict[str, str]:
    """The least-squares fits a set of methods needs.

    Each method of [`FIT_METHODS`][] in ``methods`` needs its own fit; the thought patch's fit is
    also needed wherever its parts ([`PART_METHODS`][]) or its refinement are run. One rule for
    [`tl_thoughts.evaluation.evaluate_seed`][] and
    [`tl_thoughts.evaluation.query_answers_with_rows`][].

    Args:
        methods: Method names (of [`METHODS`][]).

    Returns:
        ``{method: fit_thought's fit}``, in the order of [`FIT_METHODS`][].

    Example:
        >>> fit_kinds(("with_chunk", "without_chunk", "thought_vector"))
        {'thought_patch': 'both'}
        >>> fit_kinds(("with_chunk", "without_chunk", "task_vector"))
        {}
    """
    patch_needed = "thought_patch_refined" in methods or any(name in methods for name in PART_METHODS)
    return {name: kind for name, kind in FIT_METHODS.items()
            if name in methods or (name == "thought_patch" and patch_needed)}


@dataclass(frozen=True)
class EvalConfig:
    """Options of the protocol (recorded in ``results.json``).

    Attributes:
        n_fit: Fit examples per seed (the rest are test examples).
        n_queries: Unlabelled queries of the task (its ``queries``) answered by the model itself
            WITH the chunk ([`query_answers`][]: the first ``n_queries`` it answers) and added to
            every seed's fit examples for every method's fit (the thought patches, the steering
            vectors, the task vectors). They are none of the task's examples, so the test
            examples stay unseen. Choices on fit data (ranks, layers) and the refined patch's
            gradient steps use the ``n_fit`` labelled fit examples only (the rank choice uses the
            queries too with ``rank_on_queries``). 0: no queries (the task needs none).
        seeds: One split (and one fit) per seed.
        layers: Blocks the thought patches are fitted on (None: all).
        ridge: Ridge strength of the thought matrices, relative to the mean squared MLP input of
            ``n_fit`` rows: the fit's ridge is ``ridge * (n_fit + n_queries) / n_fit``
            ([`tl_thoughts.fit_thought`][] divides by the mean over rows, so the queries would
            otherwise weaken the ridge relative to the sum of squares).
        pool: Positions pooled by the thought patches and the steering vectors (see
            [`tl_thoughts.fit_thought`][]).
        vector_site, vector_target: Where the thought vector goes and what it restores.
        attention_matrix: Also fit a thought matrix on ``W_O`` (see [`tl_thoughts.fit_thought`][]).
        query_weight: Weight of the query positions in the matrices' fits.
        output_matrix: Also fit a thought matrix on ``W_out`` (see [`tl_thoughts.fit_thought`][]).
        patch_prefix: False leaves the positions before the chunk's place (the template's prefix)
            unpatched, in the fit and when applied (see [`tl_thoughts.fit_thought`][]).
        ranks: Candidate ranks of the ``thought_patch`` method's thought matrices: an integer
            ``k`` replaces every thought matrix by its best rank-``k`` approximation
            ([`tl_thoughts.ThoughtPatch.truncations`][]), None keeps the matrices as fitted. With
            several candidates, the one doing best on the fit examples is used (per seed; recorded
            in ``SeedResult.ranks``). Default: as fitted, no choice (``docs/benchmark.md``, "480
            queries"). The ``thought_vector`` and ``thought_matrix`` ablations are the patch's
            vectors alone and matrices alone as fitted ([`tl_thoughts.ThoughtPatch.only`][]).
        rank_on_queries: Choose the rank on the labelled fit examples plus the answered queries
            (each scored against the model's own answer with the chunk) instead of on the
            labelled fit examples alone (``docs/benchmark.md``, "More queries, a smaller ridge,
            the rank chosen on the queries").
        refine_steps, refine_lr: The ``thought_patch_refined`` method: the ``thought_patch`` (at its
            chosen rank) refined by that many full-batch Adam steps at that learning rate on the
            fit examples' answers ([`tl_thoughts.refine_thought`][]).
        batch_size: Sequences per forward pass.
        methods: The methods run (default: [`DEFAULT_METHODS`][], among them
            ``thought_patch_paper``, the papers' method fitted on the ``n_fit`` labelled examples
            with [`paper_fit_config`][]; the protocol's: all of
            [`METHODS`][] but those of [`ON_REQUEST`][], ``thought_patch_refined`` and
            ``thought_vector_fitted_alone`` / ``thought_matrix_fitted_alone``, the vector-only and
            matrix-only patches fitted on their own, ``fit_thought(fit="vector" | "matrix")``).
    """

    n_fit: int = 20
    n_queries: int = 480
    seeds: tuple[int, ...] = (0, 1, 2)
    layers: tuple[int, ...] | None = None
    ridge: float = 0.5
    pool: str = "answer"
    vector_site: str = "attn_out"
    vector_target: str = "attention"
    attention_matrix: bool = True
    query_weight: float = 0.1
    output_matrix: bool = True
    patch_prefix: bool = False
    ranks: tuple[int | None, ...] = (None,)
    rank_on_queries: bool = False
    refine_steps: int = 10
    refine_lr: float = 1e-5
    batch_size: int = 64
    methods: tuple[str, ...] = DEFAULT_METHODS

    def fit_config(self, n_rows: int | None = None) -> "FitConfig":
        """The [`tl_thoughts.FitConfig`][] of the ``thought_patch`` (and of the patches fitted
        alone, with their ``fit``) for a fit on ``n_rows`` rows: the ridge scaled by
        ``n_rows / n_fit`` (see ``ridge``; None: ``n_fit`` rows), as the protocol fits on the fit
        examples plus the answered queries; no steering record.

        Example:
            >>> EvalConfig().fit_config().vector_target
            'attention'
            >>> EvalConfig(n_fit=20, ridge=1.0).fit_config(80).ridge
            4.0
        """
        from tl_thoughts.thoughts import FitConfig

        n_rows = self.n_fit if n_rows is None else n_rows
        return FitConfig(layers=self.layers, ridge=self.ridge * n_rows / self.n_fit, pool=self.pool,
                         vector_site=self.vector_site, vector_target=self.vector_target,
                         attention_matrix=self.attention_matrix, query_weight=self.query_weight,
                         output_matrix=self.output_matrix, patch_prefix=self.patch_prefix,
                         batch_size=self.batch_size, compare_steering=False)

    def paper_fit_config(self) -> "FitConfig":
        """The [`tl_thoughts.FitConfig`][] of ``thought_patch_paper``: the ``"paper"`` preset
        (``FitConfig.preset("paper")``) with this configuration's ridge (on the ``n_fit`` labelled
        examples, no query), layers and batch size; no steering record.

        Example:
            >>> EvalConfig().paper_fit_config().vector_site
            'b_out'
        """
        from tl_thoughts.thoughts import FitConfig

        return FitConfig.preset("paper", ridge=self.ridge, layers=self.layers, batch_size=self.batch_size,
                                compare_steering=False)

    def __post_init__(self) -> None:
        methods = self.methods
        if not isinstance(methods, tuple) or not all(isinstance(m, str) for m in methods):
            raise EvalOptionError(f"methods must be a tuple of method names, got {methods!r}")
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise EvalOptionError(f"unknown methods {unknown}; choose from {METHODS}")
        if len(set(methods)) != len(methods):
            raise EvalOptionError(f"methods must be distinct, got {methods}")
        if "with_chunk" not in methods or "without_chunk" not in methods:
            raise EvalOptionError("the protocol filters on 'with_chunk' and 'without_chunk': keep both")
        if len(methods) == 2:
            raise EvalOptionError("methods: 'with_chunk' and 'without_chunk' are the filter; name at least one "
                                  f"method to evaluate (of {METHODS[2:]})")
        if not _is_int(self.n_fit) or self.n_fit < 1:
            raise EvalOptionError(f"n_fit must be an integer >= 1, got {self.n_fit!r}")
        if not _is_int(self.n_queries) or self.n_queries < 0:
            raise EvalOptionError(f"n_queries must be an integer >= 0, got {self.n_queries!r}")
        if not isinstance(self.seeds, tuple) or not self.seeds:
            raise EvalOptionError(f"seeds must be a non-empty tuple of integers, got {self.seeds!r}")
        if any(not _is_int(s) or s < 0 for s in self.seeds):
            raise EvalOptionError(f"seeds must be integers >= 0, got {self.seeds}")
        if len(set(self.seeds)) != len(self.seeds):
            raise EvalOptionError(f"seeds must be distinct (each is one split), got {self.seeds}")
        if not isinstance(self.ranks, tuple) or not self.ranks:
            raise EvalOptionError("at least one candidate rank is needed (None: the matrices as fitted)")
        for rank in self.ranks:
            if rank is not None and (not _is_int(rank) or rank < 1):
                raise EvalOptionError(f"ranks must be None or integers >= 1, got {rank!r}")
        if len(set(self.ranks)) != len(self.ranks):
            raise EvalOptionError(f"ranks must be distinct, got {self.ranks}")
        if not isinstance(self.rank_on_queries, bool):
            raise EvalOptionError(f"rank_on_queries must be True or False, got {self.rank_on_queries!r}")
        for name in ("ridge", "query_weight"):  # FitConfig's rule, named as EvalConfig names them
            if not _is_finite(getattr(self, name)) or getattr(self, name) < 0:
                raise EvalOptionError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not _is_int(self.refine_steps) or self.refine_steps < 0:
            raise EvalOptionError(f"refine_steps must be an integer >= 0, got {self.refine_steps!r}")
        if not _is_finite(self.refine_lr) or self.refine_lr <= 0:
            raise EvalOptionError(f"refine_lr must be a finite number > 0, got {self.refine_lr!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise EvalOptionError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        # the fit options (layers, pool, sites, matrices), validated now by FitConfig, not after the model's runs
        self.fit_config()
        self.paper_fit_config()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_model(name: str | None) -> None:
    """Check, before anything is loaded, that the model named ``name`` can be loaded for the
    benchmark: ``tl-thoughts eval --model NAME`` and
    [`tl_thoughts.evaluation.evaluate_in_processes`][] (``model=``) call it first.

    The names are those of ``tl-thoughts verify --model``
    ([`tl_thoughts.models.load_named_model`][]): None or ``"SmolLM2-135M-Instruct"``, the
    embedded default model; ``"gemma-3-270m"`` (its package installed); a TransformerLens
    pretrained name whose weights are in the local Hugging Face cache or reachable
    ([`tl_thoughts.models.check_model_name`][]).

    Raises:
        EvalOptionError: The model cannot be loaded; the message names it and says why (for a
            missing package, the install command).

    Example:
        >>> check_model(None)
        >>> check_model("")
        Traceback (most recent call last):
        ...
        tl_thoughts.evaluation.config.EvalOptionError: cannot load model '': a model name is a non-empty string
    """
    from tl_thoughts.models import ModelLoadError, check_model_name  # torch: imported when called

    try:
        check_model_name(name)
    except ModelLoadError as e:
        raise EvalOptionError(str(e)) from None


def check_post_norm_methods(config: EvalConfig, post_norm: bool) -> None:
    """Refuse, before the work, the methods a model with norms after its sublayers (Gemma 2/3,
    OLMo 2; ``post_norm``) cannot run: ``thought_patch_paper``, whose ``"paper"`` preset puts the
    vector on ``b_out``, before the MLP's post-norm ([`tl_thoughts.thoughts.check_post_norm`][]).
    ``tl-thoughts eval`` calls it before loading a model of ``models.POST_NORM_MODEL_NAMES``;
    [`tl_thoughts.evaluation.evaluate_task`][] on the model it is given.

    Raises:
        EvalOptionError: such a method on such a model, naming the methods to run instead.

    Example:
        >>> check_post_norm_methods(EvalConfig(), post_norm=False)
    """
    if post_norm and "thought_patch_paper" in config.methods:
        others = " ".join(m for m in config.methods if m != "thought_patch_paper")
        raise EvalOptionError(
            "thought_patch_paper fits the papers' form, its vector on the MLP output bias b_out, which a model with "
            "norms after its sublayers (Gemma 2/3, OLMo 2) rescales: leave it out (--methods " + others + ")"
        )


def check_tasks(tasks: Sequence["Task"], config: EvalConfig) -> None:
    """Check, before any model runs, that ``config`` can run on ``tasks``.

    [`tl_thoughts.evaluation.evaluate_task`][] and
    [`tl_thoughts.evaluation.evaluate_in_processes`][] call it first, and so does
    ``tl-thoughts eval`` before loading the model.

    Raises:
        EvalOptionError: No task, two tasks of one name (the results are keyed by name), a task
            with no more than ``config.n_fit`` examples (no test example would remain), or a task
            with fewer unlabelled queries than ``config.n_queries``.

    Example:
        >>> from tl_thoughts.tasks import task_from_dict
        >>> task = task_from_dict({"name": "t", "chunk": "a -> b\\n",
        ...     "examples": [{"query": f"q{i}", "answer": f"a{i}"} for i in range(60)]})
        >>> check_tasks([task], EvalConfig(n_queries=0))
        >>> check_tasks([task], EvalConfig(n_fit=60, n_queries=0))
        Traceback (most recent call last):
        ...
        tl_thoughts.evaluation.config.EvalOptionError: n_fit=60 leaves no test example: these tasks have no more examples: t (60)
    """
    if not tasks:
        raise EvalOptionError("no task given")
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise EvalOptionError(f"tasks are named twice: {', '.join(twice)} (results are kept by task name)")
    few = [f"{t.name} ({len(t.examples)})" for t in tasks if len(t.examples) <= config.n_fit]
    if few:
        raise EvalOptionError(f"n_fit={config.n_fit} leaves no test example: these tasks have no more examples: "
                              f"{', '.join(few)}")
    short = [f"{t.name} ({len(t.queries)})" for t in tasks if len(t.queries) < config.n_queries]
    if short:
        raise EvalOptionError(
            f"n_queries={config.n_queries} needs at least that many unlabelled queries a task; these tasks have "
            f"fewer: {', '.join(short)} (add a 'queries' list to the task file, see docs/benchmark.md, or ask "
            "for fewer queries)")
