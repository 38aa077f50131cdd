"""The protocol's options (:class:`EvalConfig`), its method names, and which least-squares fits a
set of methods needs (:func:`fit_kinds`)."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from tl_thoughts.refine import check_options as check_refine_options
from tl_thoughts.thoughts import FitConfig

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

    Each method of :data:`FIT_METHODS` in ``methods`` needs its own fit; the thought patch's fit is
    also needed wherever its parts (:data:`PART_METHODS`) or its refinement are run. One rule for
    :func:`tl_thoughts.evaluation.evaluate_seed` and
    :func:`tl_thoughts.evaluation.query_answers_with_rows`.

    Args:
        methods: Method names (of :data:`METHODS`).

    Returns:
        ``{method: fit_thought's fit}``, in the order of :data:`FIT_METHODS`.

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
            WITH the chunk (:func:`query_answers`: the first ``n_queries`` it answers) and added to
            every seed's fit examples for every method's fit (the thought patches, the steering
            vectors, the task vectors). They are none of the task's examples, so the test
            examples stay unseen. Choices on fit data (ranks, layers) and the refined patch's
            gradient steps use the ``n_fit`` labelled fit examples only (the rank choice uses the
            queries too with ``rank_on_queries``). 0: no queries (the task needs none).
        seeds: One split (and one fit) per seed.
        layers: Blocks the thought patches are fitted on (None: all).
        ridge: Ridge strength of the thought matrices, relative to the mean squared MLP input of
            ``n_fit`` rows: the fit's ridge is ``ridge * (n_fit + n_queries) / n_fit``
            (:func:`tl_thoughts.fit_thought` divides by the mean over rows, so the queries would
            otherwise weaken the ridge relative to the sum of squares).
        pool: Positions pooled by the thought patches and the steering vectors (see
            :func:`tl_thoughts.fit_thought`).
        vector_site, vector_target: Where the thought vector goes and what it restores.
        attention_matrix: Also fit a thought matrix on ``W_O`` (see :func:`tl_thoughts.fit_thought`).
        query_weight: Weight of the query positions in the matrices' fits.
        output_matrix: Also fit a thought matrix on ``W_out`` (see :func:`tl_thoughts.fit_thought`).
        patch_prefix: False leaves the positions before the chunk's place (the template's prefix)
            unpatched, in the fit and when applied (see :func:`tl_thoughts.fit_thought`).
        ranks: Candidate ranks of the ``thought_patch`` method's thought matrices: an integer
            ``k`` replaces every thought matrix by its best rank-``k`` approximation
            (:meth:`tl_thoughts.ThoughtPatch.truncations`), None keeps the matrices as fitted. With
            several candidates, the one doing best on the fit examples is used (per seed; recorded
            in ``SeedResult.ranks``). Default: as fitted, no choice (``docs/benchmark.md``, "480
            queries"). The ``thought_vector`` and ``thought_matrix`` ablations are the patch's
            vectors alone and matrices alone as fitted (:meth:`tl_thoughts.ThoughtPatch.only`).
        rank_on_queries: Choose the rank on the labelled fit examples plus the answered queries
            (each scored against the model's own answer with the chunk) instead of on the
            labelled fit examples alone (``docs/benchmark.md``, "More queries, a smaller ridge,
            the rank chosen on the queries").
        refine_steps, refine_lr: The ``thought_patch_refined`` method: the ``thought_patch`` (at its
            chosen rank) refined by that many full-batch Adam steps at that learning rate on the
            fit examples' answers (:func:`tl_thoughts.refine_thought`).
        batch_size: Sequences per forward pass.
        methods: The methods run (default: :data:`DEFAULT_METHODS`, among them
            ``thought_patch_paper``, the papers' method fitted on the ``n_fit`` labelled examples
            with :meth:`paper_fit_config`; the protocol's: all of
            :data:`METHODS` but those of :data:`ON_REQUEST`, ``thought_patch_refined`` and
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

    def fit_config(self, n_rows: int | None = None) -> FitConfig:
        """The :class:`tl_thoughts.FitConfig` of the ``thought_patch`` (and of the patches fitted
        alone, with their ``fit``) for a fit on ``n_rows`` rows: the ridge scaled by
        ``n_rows / n_fit`` (see ``ridge``; None: ``n_fit`` rows), as the protocol fits on the fit
        examples plus the answered queries; no steering record.

        Example:
            >>> EvalConfig().fit_config().vector_target
            'attention'
            >>> EvalConfig(n_fit=20, ridge=1.0).fit_config(80).ridge
            4.0
        """
        n_rows = self.n_fit if n_rows is None else n_rows
        return FitConfig(layers=self.layers, ridge=self.ridge * n_rows / self.n_fit, pool=self.pool,
                         vector_site=self.vector_site, vector_target=self.vector_target,
                         attention_matrix=self.attention_matrix, query_weight=self.query_weight,
                         output_matrix=self.output_matrix, patch_prefix=self.patch_prefix,
                         batch_size=self.batch_size, compare_steering=False)

    def paper_fit_config(self) -> FitConfig:
        """The :class:`tl_thoughts.FitConfig` of ``thought_patch_paper``: the ``"paper"`` preset
        (``FitConfig.preset("paper")``) with this configuration's ridge (on the ``n_fit`` labelled
        examples, no query), layers and batch size; no steering record.

        Example:
            >>> EvalConfig().paper_fit_config().vector_site
            'b_out'
        """
        return FitConfig.preset("paper", ridge=self.ridge, layers=self.layers, batch_size=self.batch_size,
                                compare_steering=False)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
        if "with_chunk" not in self.methods or "without_chunk" not in self.methods:
            raise ValueError("the protocol filters on 'with_chunk' and 'without_chunk': keep both")
        if self.n_fit < 1:
            raise ValueError("n_fit must be >= 1")
        if isinstance(self.n_queries, bool) or not isinstance(self.n_queries, int) or self.n_queries < 0:
            raise ValueError(f"n_queries must be an integer >= 0, got {self.n_queries!r}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if not self.ranks:
            raise ValueError("at least one candidate rank is needed (None: the matrices as fitted)")
        for rank in self.ranks:
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
                raise ValueError(f"ranks must be None or integers >= 1, got {rank!r}")
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"ranks must be distinct, got {self.ranks}")
        check_refine_options(self.refine_steps, self.refine_lr, prefix="refine_")
        self.fit_config()  # the fit options, validated now (FitConfig), not after the model's runs

