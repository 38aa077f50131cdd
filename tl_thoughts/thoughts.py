"""Thought vectors and thought matrices: token-independent patches fitted from a chunk (THEORY 4).

[`fit_thought`][] streams the examples through the model block by block (the stream engine,
[`tl_thoughts.stream`][]), side by side: the prompts WITH the chunk and the reduced prompts
(without it, natural positions, as at inference) under the patches already fitted for the blocks
below (the papers' Algorithm 1). Each block costs one attention and one MLP call per stream, so the
whole fit costs about one full and one reduced forward pass, plus a third reduced pass without
patches when ``FitConfig.compare_steering`` (the mean-difference steering record). The positions
every prompt with the chunk shares run once ([`tl_thoughts.stream.SharedStream`][]).

Each block's solves are small functions of their own: [`solve_vector`][] (the mean virtual
vector), [`solve_W_O`][], [`solve_mlp_inputs`][] (``W_in``/``W_gate``) and [`solve_W_out`][],
each a ridge regression whose rows arrive in batches ([`tl_thoughts._math.RidgeRegression`][]:
sufficient statistics ``A^T W A`` and ``A^T W U``, or the rows themselves when there are fewer rows
than inputs). Options travel as one validated [`FitConfig`][], with named presets
([`FitConfig.preset`][]: ``"default"``, ``"paper"``, ``"benchmark"``).
"""

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_thoughts import _tl
from tl_thoughts._math import RidgeRegression, ridge_solve
from tl_thoughts._tl import Model
from tl_thoughts.errors import ArgumentTypeError, InputError, check_int, check_number
from tl_thoughts.patch import PatchDeltas, ThoughtPatch, factor_product
from tl_thoughts.stream import (
    PromptRows,
    finish_block,
    finish_block_hidden,
    finish_block_parts,
    fitted_rows,
    make_batches,
    shared_stream_length,
)
from tl_thoughts.templates import (
    POOLS,
    EncodedExample,
    Example,
    PromptTemplate,
    check_examples,
    default_template,
    encode_example,
)

__all__ = [
    "FITS",
    "SITES",
    "TARGETS",
    "FitConfig",
    "check_post_norm",
    "fit_thought",
    "fit_thoughts",
    "ridge_solve",
    "solve_W_O",
    "solve_W_out",
    "solve_mlp_inputs",
    "solve_vector",
]

FITS = ("vector", "matrix", "both")
SITES = ("b_out", "attn_out")
TARGETS = ("residual", "attention")


@dataclass(frozen=True)
class FitConfig:
    """Options of [`fit_thought`][], validated when made. Presets: [`preset`][].

    Attributes:
        fit: ``"vector"``, ``"matrix"`` or ``"both"``.
        layers: Blocks to patch (None: all); the others are left as they are.
        ridge: Ridge strength relative to the mean squared input norm of each regression (0:
            minimum-norm least squares).
        pool: Positions pooled in the fit: ``"query"``, ``"answer"``, ``"kept"`` (all after the
            chunk) or ``"all"`` (the prefix too). See ``EncodedExample.pooled``.
        vector_site: ``"b_out"`` (the papers: the vector on the MLP output bias, the matrix carries
            the effect on the MLP input) or ``"attn_out"`` (the vector on the attention output bias
            ``b_O``, where the MLP reads it: the usual steering site; this library's extension).
        vector_target: ``"attention"`` (the attention-output difference, as in the papers'
            Algorithm 1) or ``"residual"`` (the mean residual difference entering the MLP:
            attention difference plus what lower patches left uncorrected).
        attention_matrix: Also fit a thought matrix on ``W_O`` (this library's extension): the
            ridge regression of what the thought vector leaves of each token's attention-output
            change on the reduced run's head outputs ``z`` (``hook_z``, heads concatenated).
        output_matrix: Also fit a thought matrix on ``W_out`` (this library's extension; the site
            of ROME and MEMIT edits): the ridge regression, on the reduced run's MLP hidden
            activations (``mlp.hook_post``), of what is left of each row's residual difference
            after the block.
        query_weight: Weight, in the matrices' regressions, of the query positions that ``pool``
            leaves out (0: left out). The thought vector is always the mean over the pooled positions.
        patch_prefix: True: the patch acts at every position, as new weights do. False: the
            positions before the chunk's place (e.g. a BOS token), which the chunk cannot change
            under causal attention, are left unpatched in the fit and when applied
            (``ThoughtPatch.unpatched_positions``). Needs a prefix of the same length in every example.
        batch_size: Examples per padded batch (batched by length).
        compare_steering: Also stream the unpatched reduced prompts, to store the plain
            mean-difference steering vectors (``ThoughtPatch.steering``) for comparison.

    Example:
        >>> FitConfig.preset("paper").vector_site
        'b_out'
        >>> FitConfig(ridge=0.5).replace(fit="vector").fit
        'vector'
    """

    fit: str = "both"
    layers: tuple[int, ...] | None = None
    ridge: float = 1e-2
    pool: str = "kept"
    vector_site: str = "b_out"
    vector_target: str = "residual"
    attention_matrix: bool = False
    output_matrix: bool = False
    query_weight: float = 0.0
    patch_prefix: bool = True
    batch_size: int = 16
    compare_steering: bool = True

    def __post_init__(self) -> None:
        choices = {"fit": FITS, "pool": POOLS, "vector_site": SITES, "vector_target": TARGETS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"FitConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("attention_matrix", "output_matrix", "patch_prefix", "compare_steering"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"FitConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("ridge", "query_weight"):
            check_number(getattr(self, name), f"FitConfig.{name}")  # finite, >= 0
        check_int(self.batch_size, "FitConfig.batch_size", minimum=1)
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Iterable):
                raise ArgumentTypeError(f"FitConfig.layers must be None or a set of block indices, got {self.layers!r}")
            layers = tuple(self.layers)
            if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
                raise InputError(f"FitConfig.layers must be None or a non-empty set of block indices, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        if not self.patch_prefix and self.pool == "all":
            raise InputError("patch_prefix=False leaves the prefix unpatched: it cannot also be pooled (pool='all')")

    @classmethod
    def preset(cls, name: str, **changes) -> "FitConfig":
        """A named configuration, with ``changes`` on top:

        - ``"default"``: [`FitConfig`][]'s defaults.
        - ``"paper"``: the papers' method (THEORY section 4; Mazzawi et al.'s Algorithm 1): the mean
          virtual vector (the attention-output difference) on the MLP output bias ``b_out``, ridge
          thought matrices on the MLP input ``W_in``/``W_gate``, fitted block by block under the
          patches below, every position after the chunk pooled (query and answer) and every
          position patched; no ``W_O`` or ``W_out`` matrix. (The papers fit on labelled examples
          only: give no unlabelled queries.)
        - ``"benchmark"``: the behavioural benchmark's thought patch (``docs/benchmark.md``): the
          vector on ``b_O``, matrices on ``W_O``, ``W_in``/``W_gate`` and ``W_out``, pooled over the
          answer positions, query rows weighted 0.1, ridge 0.5, the first position unpatched.

        Example:
            >>> FitConfig.preset("benchmark", ridge=1.0).ridge
            1.0
        """
        if not isinstance(name, str) or name not in PRESETS:
            raise InputError(f"unknown FitConfig preset {name!r}; choose from {sorted(PRESETS)}")
        return PRESETS[name].replace(**changes)

    @classmethod
    def default_for(cls, model: Model) -> "FitConfig":
        """The default options for ``model`` (what [`fit_thought`][] uses without a config):
        ``FitConfig()``, or, for a model with norms after its sublayers (Gemma 2/3, OLMo 2),
        ``FitConfig(vector_site="attn_out", vector_target="attention")`` ([`check_post_norm`][]).

        Example:
            >>> FitConfig.default_for(model) == FitConfig()  # a pre-norm model
            True
        """
        if _tl.model_spec(model).post_norm:
            return cls(vector_site="attn_out", vector_target="attention")
        return cls()

    def replace(self, **changes) -> "FitConfig":
        """A copy with ``changes`` (validated; an unknown option is refused, naming it)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ArgumentTypeError(f"unknown FitConfig options {unknown}; the options are "
                                    f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def options(self) -> dict:
        """The options a patch records in its meta (``meta["options"]``)."""
        return dict(fit=self.fit, ridge=self.ridge, pool=self.pool, vector_site=self.vector_site,
                    vector_target=self.vector_target, attention_matrix=self.attention_matrix,
                    query_weight=self.query_weight, output_matrix=self.output_matrix, patch_prefix=self.patch_prefix)


PRESETS = {
    "default": FitConfig(),
    "paper": FitConfig(fit="both", pool="kept", vector_site="b_out", vector_target="attention",
                       attention_matrix=False, output_matrix=False, query_weight=0.0, patch_prefix=True),
    "benchmark": FitConfig(fit="both", ridge=0.5, pool="answer", vector_site="attn_out", vector_target="attention",
                           attention_matrix=True, output_matrix=True, query_weight=0.1, patch_prefix=False),
}


# --- the per-site solves ------------------------------------------------------------------------


def solve_vector(delta_sum: Float[Tensor, " d_model"], n_tokens: int) -> Float[Tensor, " d_model"]:
    """The thought vector: the mean of the pooled rows' virtual vectors, from their sum
    (``argmin_d sum_i ||d - delta_i||^2``).

    Example:
        >>> solve_vector(torch.tensor([2.0, 4.0]), 2).tolist()
        [1.0, 2.0]
    """
    if n_tokens <= 0:
        raise InputError("no pooled position to average the thought vector over")
    return delta_sum / n_tokens


def solve_W_O(
    regression: RidgeRegression, vector: Float[Tensor, " d_model"] | None, ridge: float, n: float,
    n_heads: int, d_head: int,
) -> Float[Tensor, "head_d_head d_model"]:
    """The ``W_O`` thought matrix, ``[n_heads * d_head, d_model]``: the ridge regression of each row's
    attention-output change minus the thought vector (``vector``; None: nothing subtracted) on the
    reduced run's head outputs ``z`` (heads concatenated), the rows ``regression`` holds (total
    weight ``n``). Reshape to ``[n_heads, d_head, d_model]`` for ``blocks.{l}.attn.W_O``.

    Example:
        >>> fit = RidgeRegression(4, 10); fit.add(z, delta, torch.ones(10))  # doctest: +SKIP
        >>> dW_O = solve_W_O(fit, delta.mean(0), ridge=0.1, n=10, n_heads=2, d_head=2)  # doctest: +SKIP
    """
    return _dense(_W_O_solution(regression, vector, ridge, n, n_heads, d_head))


def _W_O_solution(regression, vector, ridge, n, n_heads, d_head):
    solution = _solution(regression, ridge, n, shift=vector)
    rows = solution[0].shape[0] if isinstance(solution, tuple) else solution.shape[0]
    if rows != n_heads * d_head:
        raise InputError(f"the regression's inputs ({rows}) are not n_heads * d_head ({n_heads * d_head})")
    return solution


def solve_mlp_inputs(
    model: Model, layer: int, regression: RidgeRegression, ridge: float, n: float
) -> dict[str, Float[Tensor, "d_model d_mlp"]]:
    """The MLP input thought matrices of block ``layer`` (``W_in``, and ``W_gate`` for gated MLPs),
    float64, by parameter name: the ridge regression ``M`` of the with-chunk minus without-chunk
    normalised MLP inputs ``a_C - a`` on ``a`` (the rows ``regression`` holds, total weight ``n``),
    times each matrix: every target is ``u_i = (a_C,i - a_i) @ W``, so one solve serves them all.

    Example:
        >>> deltas = solve_mlp_inputs(model, 0, fit, ridge=0.1, n=10)  # doctest: +SKIP
        >>> sorted(deltas)  # doctest: +SKIP
        ['blocks.0.mlp.W_in']
    """
    return {name: _dense(solution) for name, solution in _mlp_input_solutions(model, layer, regression, ridge, n).items()}


def _mlp_input_solutions(model, layer, regression, ridge, n):
    spec = _tl.model_spec(model)
    solved = _solution(regression, ridge, n)  # [d_model, d_model], or its factors
    return {_tl.param_name(layer, name): _times(solved, _tl.mlp_matrix(model, layer, name).double())
            for name in spec.mlp_input_matrices}


def solve_W_out(regression: RidgeRegression, ridge: float, n: float) -> Float[Tensor, "d_mlp d_model"]:
    """The ``W_out`` thought matrix, ``[d_mlp, d_model]``: the ridge regression of each row's
    residual difference after the block (with the chunk minus without, what is left) on the
    reduced run's MLP hidden activations (``mlp.hook_post``), the rows ``regression`` holds.

    Example:
        >>> dW_out = solve_W_out(fit, ridge=0.1, n=10)  # doctest: +SKIP
    """
    return _dense(_solution(regression, ridge, n))


def _solution(regression: RidgeRegression, ridge: float, n: float, shift: Tensor | None = None):
    """The ridge solution: exact factors ``(Q, R @ Y)`` (``Q`` ``[d_in, rows]`` with orthonormal
    columns, ``G^T = Q R``, the rows of weight 0 left out) of its row-space form ``G^T @ Y`` when
    the regression holds fewer rows than inputs, else the dense matrix (float64)."""
    parts = regression.solve_factors(ridge, n, shift)
    if parts is None:
        return regression.solve(ridge, n, shift=shift)
    left, right = parts
    used = left.abs().sum(0) > 0  # rows of weight 0 add nothing: left out of the factors
    q, r = torch.linalg.qr(left[:, used])
    return q, r @ right[used]


def _times(solution, W: Tensor):
    """``solution @ W``, factored as ``solution`` is."""
    return (solution[0], solution[1] @ W) if isinstance(solution, tuple) else solution @ W


def _dense(solution) -> Tensor:
    return solution[0] @ solution[1] if isinstance(solution, tuple) else solution


# --- the fit ------------------------------------------------------------------------------------


class _Fitter:
    """The state of one fit across blocks: the streams, the running sums, the deltas so far."""

    def __init__(self, model, spec, config, batches, common, n_tokens, prefix, memo) -> None:
        self.model, self.spec, self.config = model, spec, config
        self.batches, self.common, self.n_tokens, self.prefix, self.memo = batches, common, n_tokens, prefix, memo
        self.deltas = PatchDeltas()
        self.steering: dict[str, Tensor] = {}
        self.scratch = [dict() for _ in batches]
        self.n_weight = float(sum(float(b.weights.sum()) for b in batches))  # rows of the matrices' fits
        self.n_rows = sum(int(b.weights.shape[0]) for b in batches)
        self.want_vector, self.want_matrix = config.fit in ("vector", "both"), config.fit in ("matrix", "both")
        self.bias = "b_O" if config.vector_site == "attn_out" or not spec.has_mlp else "b_out"

    def attention(self, layer: int, fitting: bool) -> tuple[Tensor, RidgeRegression]:
        """Every stream's attention at block ``layer``; the targets' sums; the ``W_O`` regression."""
        spec, model, cfg = self.spec, self.model, self.config
        device = _tl.model_device(model)
        sum_delta = torch.zeros(spec.d_model, dtype=torch.float64, device=device)
        sum_steer, sum_resid = torch.zeros_like(sum_delta), torch.zeros_like(sum_delta)
        z_fit = RidgeRegression(spec.n_heads * spec.d_head, self.n_rows)
        if self.memo is not None and ("shared", layer) in self.memo:
            self.common.resid, kv = self.memo["shared", layer], None
        else:
            kv = self.common.step(model, spec, layer)
            if self.memo is not None:
                self.memo["shared", layer] = self.common.resid  # after the block
        for j, (b, c) in enumerate(zip(self.batches, self.scratch)):
            # the attention outputs before the block's post-attention norm, if any ("m": where b_O and
            # W_O act), and after it ("attn": what the residual stream gains)
            if b.given is not None:  # the full prompts' rows, given (PromptRows)
                c["pre_full"], m_rows = b.given[0][layer], b.given[1][layer]
            else:
                if self.memo is not None and (j, layer) in self.memo:
                    c["attn_full"], c["next_full"] = self.memo[j, layer]
                else:
                    c["attn_full"], _, _ = _tl.block_attention_kv(model, layer, b.full, prefix=kv, normed=False)
                c["pre_full"], m_rows = b.full[b.rows_full], c["attn_full"][b.rows_full]
            c["attn_rows"] = _tl.attn_post_norm(model, layer, m_rows)
            pre_full, attn_rows = c["pre_full"], c["attn_rows"]  # [n, d_model] at the fitted rows
            c["m_red"], c["z_red"] = _tl.block_attention(model, layer, b.reduced, normed=False)
            if cfg.vector_target == "residual":  # pre-norm blocks only (_check_fit): m is the attention output
                delta = (pre_full + attn_rows) - (b.reduced + c["m_red"])[b.rows_reduced]
            else:
                delta = m_rows - c["m_red"][b.rows_reduced]
            delta = delta.double()
            sum_delta += delta[b.in_pool].sum(0)
            if fitting and self.want_matrix and cfg.attention_matrix:
                z_fit.add(c["z_red"][b.rows_reduced].flatten(1).double(), delta, b.weights)  # z: [n, head * d_head]
            if b.base is not None:
                c["attn_base"], _ = _tl.block_attention(model, layer, b.base)
                rows_b = (b.rows_reduced[0][b.in_pool], b.rows_reduced[1][b.in_pool])
                sum_steer += (attn_rows[b.in_pool] - c["attn_base"][rows_b]).double().sum(0)
                sum_resid += ((pre_full + attn_rows)[b.in_pool] - (b.base + c["attn_base"])[rows_b]).double().sum(0)
        if cfg.compare_steering:
            self.steering[f"steering.{layer}"] = (sum_steer / self.n_tokens).to(spec.dtype)
            self.steering[f"residual.{layer}"] = (sum_resid / self.n_tokens).to(spec.dtype)
        return sum_delta, z_fit

    def store(self, name: str, solution, shape: tuple[int, ...]) -> Tensor:
        """Hold a thought matrix's solution in the patch, in the model's dtype: as its factors when
        they are smaller than the matrix, else dense; return the delta the patch holds (the
        factors' product, [`tl_thoughts.patch.factor_product`][]), under which the fit goes on."""
        dtype = self.spec.dtype
        if isinstance(solution, tuple):
            left, right = solution
            (p, r), q = left.shape, right.shape[1]
            if r * (p + q) < p * q:
                left, right = left.reshape(*shape[:-1], r).to(dtype), right.to(dtype)
                self.deltas.put_factors(name, left, right)
                return factor_product(left, right)
        delta = _dense(solution).reshape(shape).to(dtype)
        self.deltas.put(name, delta)
        return delta

    def patch_attention(self, layer: int, vector: Tensor | None, dW_O: Tensor | None) -> None:
        """The reduced stream's attention output under this block's attention-side patches (added
        before the post-attention norm, if any, as ``b_O`` and ``W_O`` act), after that norm."""
        for c in self.scratch:
            attn = c.pop("m_red")
            if vector is not None and self.bias == "b_O":
                attn = attn + vector.to(attn.dtype)
            if dW_O is not None:
                attn = attn + c["z_red"].flatten(2) @ dW_O.to(attn.dtype)
            c["attn_red"] = _tl.attn_post_norm(self.model, layer, attn)

    def mlp_regression(self, layer: int) -> RidgeRegression:
        """The rows of the MLP input matrices' regression: ``a`` (reduced) against ``a_C - a``."""
        a_fit = RidgeRegression(self.spec.d_model, self.n_rows)
        for b, c in zip(self.batches, self.scratch):
            if self.spec.parallel_attn_mlp:  # what the MLP normalises: resid_pre, or resid_mid
                r_full, r_red = c["pre_full"], b.reduced
            else:
                r_full, r_red = c["pre_full"] + c["attn_rows"], b.reduced + c["attn_red"]
            a = _tl.mlp_norm(self.model, layer, r_red[b.rows_reduced]).double()
            a_c = _tl.mlp_norm(self.model, layer, r_full).double()
            a_fit.add(a, a_c - a, b.weights)
        return a_fit

    def finish(self, layer: int, fit_out: bool) -> RidgeRegression | None:
        """Every stream through the block's MLP half (the reduced one under this block's MLP
        patches); with ``fit_out``, the ``W_out`` regression's rows."""
        model, spec = self.model, self.spec
        new = _tl.patched_values(model, {n: self.deltas[n] for n in self.deltas if n.startswith(f"blocks.{layer}.mlp.")})
        h_fit = RidgeRegression(spec.d_mlp, self.n_rows) if fit_out else None
        for j, (b, c) in enumerate(zip(self.batches, self.scratch)):
            if b.given is not None:
                post_full = b.given[0][layer + 1]
            else:
                attn_full = c.pop("attn_full")
                if "next_full" in c:
                    b.full = c.pop("next_full")
                else:
                    b.full = finish_block(model, spec, layer, b.full, _tl.attn_post_norm(model, layer, attn_full))
                    if self.memo is not None:
                        self.memo[j, layer] = (attn_full, b.full)
                post_full = b.full[b.rows_full] if fit_out and spec.mlp_post_norm is None else None
            if fit_out and spec.mlp_post_norm is not None:
                # a post-norm follows the MLP: W_out's target is the change of the MLP's output before
                # it (the full prompts' MLP on their rows minus the reduced one's, under its input patches)
                pre, attn_red = b.reduced, c.pop("attn_red")
                parts = finish_block_parts(model, spec, layer, pre, attn_red, new)
                mlp_full = finish_block_parts(model, spec, layer, c["pre_full"][None], c["attn_rows"][None]).mlp_out[0]
                h_fit.add(parts.hidden[b.rows_reduced].double(),
                          (mlp_full - parts.mlp_out[b.rows_reduced]).double(), b.weights)
                b.reduced, c["post"], c["mid"], c["mlp_out"] = parts.resid_post, parts.hidden, pre + attn_red, parts.mlp_out
            elif fit_out:  # resid_post and h under the block's other patches; the rows' residual differences
                b.reduced, c["post"] = finish_block_hidden(model, spec, layer, b.reduced, c.pop("attn_red"), new)
                h_fit.add(c["post"][b.rows_reduced].double(), (post_full - b.reduced[b.rows_reduced]).double(), b.weights)
            else:
                b.reduced = finish_block(model, spec, layer, b.reduced, c.pop("attn_red"), new)
            if b.base is not None:
                b.base = finish_block(model, spec, layer, b.base, c.pop("attn_base"))
        return h_fit

    def close(self, layer: int, dW_out: Tensor | None) -> None:
        """The reduced stream after the block's ``W_out`` patch; the unpatched prefix restored."""
        for b, c in zip(self.batches, self.scratch):
            if dW_out is not None and "mlp_out" in c:  # before the MLP's post-norm
                b.reduced = c["mid"] + _tl.mlp_post_norm(
                    self.model, layer, c["mlp_out"] + c["post"] @ dW_out.to(b.reduced.dtype))
            elif dW_out is not None:
                b.reduced = b.reduced + c["post"] @ dW_out.to(b.reduced.dtype)
            if self.prefix:  # the positions before the chunk's place, left unpatched: as in the full run
                b.reduced[:, : self.prefix] = self.common.resid[:, : self.prefix] if self.common.length \
                    else b.full[:, : self.prefix]
            c.clear()


def _check_fit(spec: _tl.ModelSpec, config: FitConfig, chunk: str, examples: Sequence[Example]) -> list[int]:
    """The blocks to fit; raises for what the model or the inputs cannot give."""
    if not isinstance(config, FitConfig):
        raise ArgumentTypeError(f"config must be a FitConfig (e.g. FitConfig.preset('paper')), got {type(config).__name__}")
    check_post_norm(spec, config)
    if config.fit != "vector" and not spec.has_mlp:
        raise InputError("attention-only model: only fit='vector' is possible (no MLP matrix)")
    if not isinstance(chunk, str):
        raise ArgumentTypeError(f"chunk must be a non-empty string, got {type(chunk).__name__}")
    if not chunk:
        raise InputError("the chunk must be a non-empty string")
    check_examples(examples)
    layers = list(range(spec.n_layers)) if config.layers is None else list(config.layers)
    if layers[-1] >= spec.n_layers:
        raise InputError(f"FitConfig.layers must be a subset of 0..{spec.n_layers - 1}, got {config.layers}")
    return layers


def check_post_norm(spec: _tl.ModelSpec, config: FitConfig) -> None:
    """Raise ``InputError`` for the options a model with norms after its sublayers (Gemma 2/3, OLMo
    2) cannot fit: there the thought vector and the ``W_O`` matrix are fitted to the attention
    output's change BEFORE the post-attention norm, where ``b_O`` and ``W_O`` act (this library's
    extension of the papers' fit to such blocks), so ``vector_target`` must be ``"attention"``
    (the residual difference lies after the norm, where no bias carries it) and a fitted vector
    sits on ``b_O`` (``vector_site="attn_out"``: ``b_out`` lies before the MLP's post-norm, which
    would rescale it). [`FitConfig.default_for`][] gives these options.

    Example:
        >>> check_post_norm(_tl.model_spec(model), FitConfig())  # pre-norm blocks: nothing raised
    """
    if not spec.post_norm:
        return
    wrong = []
    if config.vector_target != "attention":
        wrong.append(f"vector_target={config.vector_target!r} (use 'attention')")
    if config.vector_site != "attn_out" and config.fit in ("vector", "both") and spec.has_mlp:
        wrong.append(f"vector_site={config.vector_site!r} (use 'attn_out')")
    if wrong:
        raise InputError(
            "this model has norms after its sublayers (Gemma 2/3, OLMo 2): the thought vector is fitted before the "
            f"post-attention norm, on b_O; FitConfig has {' and '.join(wrong)}. FitConfig.default_for(model) and "
            "FitConfig.preset('benchmark') give such options"
        )


def _unpatched_prefix(encoded: Sequence[EncodedExample], config: FitConfig) -> int:
    """How many first positions stay unpatched (``patch_prefix=False``: the chunk's place)."""
    if config.patch_prefix:
        return 0
    starts = sorted({e.start for e in encoded})
    if len(starts) != 1:
        raise InputError(f"patch_prefix=False needs the same number of positions before the chunk in every "
                         f"example, got {starts}")
    return starts[0]


@torch.no_grad()
def fit_thought(
    model: Model,
    chunk: str,
    examples: Sequence[Example],
    config: FitConfig | None = None,
    *,
    template: PromptTemplate | None = None,
    rows: PromptRows | None = None,
    progress: bool = True,
) -> ThoughtPatch:
    """Fit a thought patch (a thought vector and/or thought matrices per block) from a chunk.

    Args:
        model: The model (not modified; no hooks may be attached).
        chunk: The chunk's text (an instruction, demonstrations, knowledge).
        examples: Queries (strings) or ``(query, answer)`` pairs; answers are teacher-forced.
        config: The options ([`FitConfig`][]; default [`FitConfig.default_for`][]``(model)``; presets
            ``FitConfig.preset("paper")`` and ``FitConfig.preset("benchmark")``).
        template: Where chunk and query go (default: the model's chat template, chunk and query in
            one user turn, or ``"{chunk}\\n{query}"`` without a chat template).
        rows: [`tl_thoughts.stream.PromptRows`][] of some of the examples
            ([`tl_thoughts.stream.prompt_rows`][] with this pool and query weight): their prompts
            with the chunk are read from them instead of streamed (batched apart from the
            others; the same patch to rounding). Not used where an unpatched prefix cannot be read
            from the shared positions.
        progress: Show a progress bar over blocks.

    Returns:
        The fitted [`ThoughtPatch`][].

    Raises:
        InputError: an empty chunk or no examples, hooks on the model, nothing to pool, a matrix
            fit on an attention-only model, rows kept for other options, options a model with
            norms after its sublayers cannot fit ([`check_post_norm`][]).

    Example:
        >>> patch = tl_thoughts.fit_thought(model, "Answer in French.", ["cat", "dog"])  # doctest: +SKIP
        >>> with patch.apply(model):  # doctest: +SKIP
        ...     logits = model("<prompt without the chunk>")
    """
    with _tl.linear_layout(model):  # many short runs of the blocks: the weights laid out once
        return _fit(model, chunk, examples, FitConfig.default_for(model) if config is None else config, template, rows,
                    progress, None)


def _fit(model, chunk, examples, config, template, rows, progress, memo) -> ThoughtPatch:
    spec = _tl.model_spec(model)
    _tl.check_no_hooks(model)
    _tl.require_hooked(model, "fit_thought")
    layers = _check_fit(spec, config, chunk, examples)
    if template is not None and not isinstance(template, PromptTemplate):
        raise ArgumentTypeError(f"template must be a PromptTemplate or None, got {type(template).__name__}")
    if rows is not None and not isinstance(rows, PromptRows):
        raise ArgumentTypeError(f"rows must be PromptRows (tl_thoughts.prompt_rows) or None, got {type(rows).__name__}")
    template = template or default_template(model)
    encoded = [encode_example(model, template, chunk, ex) for ex in examples]
    prefix = _unpatched_prefix(encoded, config)
    n_tokens = sum(int(e.pooled(config.pool).shape[0]) for e in encoded)
    if n_tokens == 0:
        raise InputError(f"no position to pool with pool={config.pool!r}")
    fit = [fitted_rows(e, config.pool, config.query_weight) for e in encoded]
    shared = shared_stream_length(encoded, fit, prefix)
    given = {} if rows is None else rows.lookup(encoded, fit, config.pool, config.query_weight, spec)
    if prefix and not shared:  # the unpatched positions are copied from the streamed prompts
        given = {}
    _, batches, common = make_batches(model, encoded, fit, config.batch_size, shared=shared,
                                      base=config.compare_steering, given=rows, given_index=given)
    f = _Fitter(model, spec, config, batches, common, n_tokens, prefix, memo)
    # blocks above the last fitted one change nothing in the fit: stop there
    for layer in tqdm(range(layers[-1] + 1), desc="fitting thought patch", disable=not progress):
        fitting = layer in layers
        sum_delta, z_fit = f.attention(layer, fitting)
        vector = solve_vector(sum_delta, n_tokens)  # float64
        if fitting and f.want_vector:
            f.deltas.put(_tl.param_name(layer, f.bias), vector.to(spec.dtype))
        dW_O = None
        if fitting and f.want_matrix and config.attention_matrix:
            solution = _W_O_solution(z_fit, vector if f.want_vector else torch.zeros_like(vector), f.config.ridge,
                                     f.n_weight, spec.n_heads, spec.d_head)
            dW_O = f.store(_tl.param_name(layer, "W_O"), solution, (spec.n_heads, spec.d_head, spec.d_model))
            dW_O = dW_O.flatten(0, 1)
        f.patch_attention(layer, vector if fitting and f.want_vector else None, dW_O)
        if fitting and f.want_matrix and spec.has_mlp:
            for name, solution in _mlp_input_solutions(model, layer, f.mlp_regression(layer), config.ridge,
                                                        f.n_weight).items():
                f.store(name, solution, (spec.d_model, spec.d_mlp))
        fit_out = fitting and f.want_matrix and config.output_matrix
        h_fit = f.finish(layer, fit_out)
        dW_out = None
        if fit_out:  # [d_mlp, d_model]
            dW_out = f.store(_tl.param_name(layer, "W_out"), _solution(h_fit, config.ridge, f.n_weight),
                             (spec.d_mlp, spec.d_model))
        f.close(layer, dW_out)
    meta = dict(chunk=chunk, template=dict(text=template.text, separator=template.separator), layers=layers,
                options=config.options(), n_examples=len(examples), n_tokens=n_tokens)
    if prefix:
        meta["unpatched_positions"] = prefix
    return ThoughtPatch.create(model, deltas=f.deltas, steering=f.steering, meta=meta)


@torch.no_grad()
def fit_thoughts(
    model: Model,
    chunk: str,
    examples: Sequence[Example],
    config: FitConfig | None = None,
    *,
    fits: Sequence[str] = FITS,
    template: PromptTemplate | None = None,
    rows: PromptRows | None = None,
    progress: bool = True,
) -> dict[str, ThoughtPatch]:
    """[`fit_thought`][] once for each of ``fits`` (``"vector"``, ``"matrix"``, ``"both"``: the
    ``fit`` of ``config`` replaced), streaming the prompts WITH the chunk only once: their
    activations do not depend on any patch, so the fits after the first reuse them (each then costs
    about one reduced pass instead of one full and one reduced pass; the price is memory: two
    tensors of the full prompts' residual size per block, kept until the last fit). The patches are
    bit for bit those of separate [`fit_thought`][] calls (``tests/test_thoughts.py``).

    Example:
        >>> patches = tl_thoughts.fit_thoughts(model, "Answer in French.", ["cat", "dog"])  # doctest: +SKIP
        >>> sorted(patches)  # doctest: +SKIP
        ['both', 'matrix', 'vector']
    """
    if isinstance(fits, str) or not isinstance(fits, Sequence):
        raise ArgumentTypeError(f"fits must be a list of distinct fits from {FITS}, got {fits!r}")
    if not fits or len(set(fits)) != len(fits) or any(f not in FITS for f in fits):
        raise InputError(f"fits must be distinct fits from {FITS}, not empty, got {fits!r}")
    config = FitConfig.default_for(model) if config is None else config
    if not isinstance(config, FitConfig):
        raise ArgumentTypeError(f"config must be a FitConfig, got {type(config).__name__}")
    memo: dict = {}
    with _tl.linear_layout(model):  # many short runs of the blocks: the weights laid out once
        return {kind: _fit(model, chunk, examples, config.replace(fit=kind), template, rows, progress, memo)
                for kind in fits}
