"""Thought vectors and thought matrices: token-independent patches fitted from a chunk (THEORY 4).

``fit_thought`` streams the examples through the model layer by layer, twice side by side: the full
prompts (with the chunk) and the reduced prompts (without it, natural positions, as at inference)
under the patches already fitted for the blocks below (the papers' Algorithm 1). Each block costs
one attention and one MLP call per stream, so the whole fit costs about one full and one reduced
forward pass, plus a third reduced pass without patches when ``compare_steering`` (the
mean-difference steering baseline). The first positions every full prompt shares (the template's
prefix and the chunk) run once, as one sequence whose keys and values every batch's attention
reads: the full pass then costs about as much as the reduced one. The matrices are fitted from
sufficient statistics, ``A^T A`` and ``A^T (A_C - A)`` (both ``d_model x d_model``, since every
target is ``u_i = (a_C,i - a_i) @ W``), whatever the number of examples, or, with fewer rows than
inputs, from the rows themselves in the row space (``_Regression``); the streamed residuals take
``O(examples x pos x d_model)``.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_thoughts import _tl
from tl_thoughts.errors import InputError, UnsupportedArchitectureError
from tl_thoughts.patch import ThoughtPatch
from tl_thoughts.templates import (
    POOLS,
    EncodedExample,
    Example,
    PromptTemplate,
    default_template,
    encode_example,
    shared_prefix_length,
)

FITS = ("vector", "matrix", "both")
SITES = ("b_out", "attn_out")
TARGETS = ("residual", "attention")


def ridge_solve(
    AtA: Float[Tensor, "d d"], AtU: Float[Tensor, "d m"], ridge: float, n: float | int
) -> Float[Tensor, "d m"]:
    """``argmin_M sum_i ||a_i @ M - u_i||^2 + lam ||M||^2`` from the sufficient statistics.

    ``lam = ridge * trace(A^T A) / n`` (ridge relative to the mean squared input norm; ``n`` is
    the number of rows, or their total weight in a weighted fit).
    ``ridge = 0`` gives the minimum-norm least-squares solution ``pinv(A^T A) @ A^T U``
    (``= pinv(A) @ U``).

    Example:
        >>> A, U = torch.randn(40, 8, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
        >>> M = ridge_solve(A.T @ A, A.T @ U, ridge=0.0, n=40)
        >>> bool((M - torch.linalg.lstsq(A, U).solution).abs().max() < 1e-10)
        True
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if ridge == 0:
        return torch.linalg.pinv(AtA, hermitian=True) @ AtU
    lam = ridge * torch.trace(AtA) / n
    eye = torch.eye(AtA.shape[0], dtype=AtA.dtype, device=AtA.device)
    factor, info = torch.linalg.cholesky_ex(AtA + lam * eye)  # symmetric positive definite when lam > 0
    if int(info) != 0:  # not numerically so (all-zero inputs: lam = 0): LU, which raises if singular
        return torch.linalg.solve(AtA + lam * eye, AtU)
    return torch.cholesky_solve(AtU, factor)


_GRAM_BLOCK = 384  # columns per block of _add_upper_gram


def _add_upper_gram(out: Float[Tensor, "d d"], wa: Float[Tensor, "n d"], a: Float[Tensor, "n d"]) -> None:
    """Add ``wa^T a`` (symmetric: ``wa`` is ``a`` with weighted rows) to ``out`` on and above the
    block diagonal only: blocks of about :data:`_GRAM_BLOCK` columns, each row block times the
    columns from its own on (with ``k`` blocks, ``(k + 1) / 2k`` of the whole ``d x d`` product's
    work; ``benchmarks/bench_gram.py`` times both). Read the result as its ``triu``, mirrored."""
    d = a.shape[1]
    k = max(1, round(d / _GRAM_BLOCK))
    edges = [round(i * d / k) for i in range(k + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        out[lo:hi, lo:] += wa[:, lo:hi].T @ a[:, lo:]


class _Regression:
    """A weighted ridge regression ``argmin_M sum_i w_i ||a_i @ M - u_i||^2 + lam ||M||^2`` whose
    rows arrive in parts (:func:`fit_thought` streams batches), solved as :func:`ridge_solve` does
    (``lam = ridge * sum_i w_i ||a_i||^2 / n``; ``ridge = 0``: minimum-norm least squares).

    With at least as many rows as input dimensions it keeps the sufficient statistics ``A^T W A``
    (on and above its block diagonal, :func:`_add_upper_gram`) and ``A^T W U`` (``d x d``,
    whatever the rows); with fewer (``n_rows < d``, e.g. a few hundred
    rows against an MLP's ``d_mlp``) it keeps the weighted rows themselves and solves in the row
    space, ``M = G^T (G G^T + lam I)^-1 F`` with ``G = W^1/2 A``, ``F = W^1/2 U``: the same
    solution (``tests/test_thoughts.py``) at ``n x n`` instead of ``d x d`` cost.
    ``solve(shift=s)`` fits the targets ``u_i - s``."""

    def __init__(self, d_in: int, n_rows: int) -> None:
        self.dual = n_rows < d_in
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []  # dual: (sqrt(w), G, F) per batch
        self.AtA: Tensor | None = None
        self.AtU: Tensor | None = None
        self.Asum: Tensor | None = None  # sum_i w_i a_i (the shift's term)

    def add(self, a: Float[Tensor, "n d"], u: Float[Tensor, "n m"], w: Float[Tensor, " n"]) -> None:
        """Rows ``a`` (inputs), ``u`` (targets) and their weights ``w``, all float64."""
        if self.dual:
            sw = w.sqrt()
            self.parts.append((sw, a * sw[:, None], u * sw[:, None]))
            return
        wa = a * w[:, None]
        if self.AtA is None:
            d = a.shape[1]
            self.AtA = a.new_zeros(d, d)
            self.AtU, self.Asum = wa.T @ u, wa.sum(0)
        else:
            self.AtU += wa.T @ u
            self.Asum += wa.sum(0)
        _add_upper_gram(self.AtA, wa, a)

    def solve(self, ridge: float, n: float, shift: Tensor | None = None) -> Tensor:
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if not self.dual:
            AtU = self.AtU if shift is None else self.AtU - torch.outer(self.Asum, shift)
            upper = self.AtA.triu()
            return ridge_solve(upper + upper.triu(1).T, AtU, ridge, n)
        sw, G, F = (torch.cat(t) for t in zip(*self.parts))
        if shift is not None:
            F = F - sw[:, None] * shift[None]
        K = G @ G.T
        if ridge == 0:
            return G.T @ (torch.linalg.pinv(K, hermitian=True) @ F)
        lam = ridge * torch.trace(K) / n  # trace(G G^T) = trace(A^T W A)
        K.diagonal().add_(lam)
        factor, info = torch.linalg.cholesky_ex(K)
        if int(info) != 0:
            return G.T @ torch.linalg.solve(K, F)
        return G.T @ torch.cholesky_solve(F, factor)


@dataclass
class _Batch:
    """Examples padded on the right (exact under causal attention: real positions never see pads).

    The fitted rows are the pooled positions (``in_pool``, weight 1: the thought vector's mean and
    the matrices' regressions) then, with ``query_weight > 0``, the query positions the pool
    leaves out (the matrices' regressions only, with that weight)."""

    full: Float[Tensor, "batch pos d_model"]
    reduced: Float[Tensor, "batch T d_model"]
    base: Float[Tensor, "batch T d_model"] | None
    rows_full: tuple[Int[Tensor, " n"], Int[Tensor, " n"]]  # (batch index, position) fitted
    rows_reduced: tuple[Int[Tensor, " n"], Int[Tensor, " n"]]
    in_pool: Bool[Tensor, " n"]
    weights: Float[Tensor, " n"]  # float64
    cache: dict = field(default_factory=dict)
    # the full prompts' rows given (FullRows), not streamed: resid_pre [layer + 1, n, d], attn_out [layer, n, d]
    given: tuple[Tensor, Tensor] | None = None


def _pad(seqs: list[Tensor]) -> Tensor:
    n = max(s.shape[0] for s in seqs)
    out = torch.zeros(len(seqs), n, dtype=seqs[0].dtype, device=seqs[0].device)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out


def _fitted_rows(ex: EncodedExample, pool: str, query_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """Positions (in ``full``) fitted for one example, their weights, and which are pooled: the
    pooled ones (weight 1), then the query positions the pool leaves out (``query_weight``, if > 0)."""
    pos = ex.pooled(pool)
    extra = pos[:0]
    if query_weight > 0:
        query = ex.pooled("query")
        extra = query[~torch.isin(query, pos)]
    weights = torch.cat([torch.ones(len(pos), dtype=torch.float64),
                         torch.full((len(extra),), float(query_weight), dtype=torch.float64)])
    return torch.cat([pos, extra]), weights, torch.arange(len(pos) + len(extra)) < len(pos)


def _shared_length(encoded: list[EncodedExample], rows: list[tuple[Tensor, Tensor, Tensor]], prefix: int) -> int:
    """How many first positions every full prompt shares, token for token (the template's prefix
    and the chunk), that the fit can compute once for all (:func:`fit_thought`): up to every
    example's first fitted row, and none unless it covers the unpatched ``prefix`` (whose residuals
    the reduced stream copies from it)."""
    first_row = min((int(pos.min()) for pos, _, _ in rows if len(pos)), default=None)
    n = shared_prefix_length([e.full for e in encoded], upto=first_row)
    return n if n >= prefix else 0


def _given_rows(
    full_rows: "FullRows | None", encoded: list[EncodedExample], rows: list[tuple[Tensor, Tensor, Tensor]],
    pool: str, query_weight: float, spec: _tl.ModelSpec,
) -> dict[int, Tensor]:
    """For each example whose prompt with the chunk ``full_rows`` holds: the indices of its rows
    there (checked: the same fitted positions, options, blocks, width and dtype)."""
    if full_rows is None:
        return {}
    if (full_rows.pool, full_rows.query_weight) != (pool, float(query_weight)):
        raise InputError(f"the full rows were kept for pool={full_rows.pool!r}, query_weight={full_rows.query_weight}; "
                         f"this fit reads pool={pool!r}, query_weight={query_weight}")
    n_pre, _, d = full_rows.pre.shape
    if n_pre != full_rows.attn.shape[0] + 1 or n_pre != spec.n_layers + 1 or d != spec.d_model \
            or full_rows.pre.dtype != spec.dtype:
        raise InputError(f"the full rows ({n_pre - 1} blocks, d_model {d}, {full_rows.pre.dtype}) are not this "
                         f"model's ({spec.n_layers} blocks, d_model {spec.d_model}, {spec.dtype})")
    given = {}
    for i, e in enumerate(encoded):
        idx = full_rows.rows_of(e.full)
        if idx is None:
            continue
        if not torch.equal(full_rows.positions[idx], rows[i][0]):
            raise InputError("the full rows of an example are not at the positions this fit reads")
        given[i] = idx
    return given


def _length_batches(encoded: list[EncodedExample], indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """``indices`` sorted by prompt lengths (with, then without the chunk; their order kept among
    equal lengths), in batches of ``batch_size``: the fewer padded positions, the less a batch computes."""
    order = sorted(indices, key=lambda i: (encoded[i].full.shape[0], encoded[i].reduced.shape[0]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _make_batch(
    model: HookedTransformer,
    encoded: list[EncodedExample],
    rows: list[tuple[Tensor, Tensor, Tensor]],
    shared: int,
    base: bool,
) -> tuple[_Batch, Tensor]:
    """The batch, its full prompts from position ``shared`` on (:func:`_shared_length`), and the
    residual entering block 0 of the ``shared`` first positions, ``[1, shared, d_model]``."""
    bf, pf, pr, w, inside = [], [], [], [], []
    seq_full, seq_red = [], []
    for i, (ex, (pos, weights, in_pool)) in enumerate(zip(encoded, rows)):
        bf.append(torch.full_like(pos, i))
        pf.append(pos - shared)
        pr.append(ex.to_reduced(pos))
        w.append(weights)
        inside.append(in_pool)
        # each prompt up to its last fitted row: the positions after it change no fitted row (causal attention)
        seq_full.append(ex.full[: int(pos.max()) + 1] if len(pos) else ex.full)
        seq_red.append(ex.reduced[: int(pr[-1].max()) + 1] if len(pos) else ex.reduced)
    full = _tl.embed(model, _pad(seq_full))
    reduced = _tl.embed(model, _pad(seq_red))
    dev = full.device
    rows_full = (torch.cat(bf).to(dev), torch.cat(pf).to(dev))
    rows_red = (rows_full[0], torch.cat(pr).to(dev))
    batch = _Batch(full[:, shared:], reduced, reduced.clone() if base else None, rows_full, rows_red,
                   torch.cat(inside).to(dev), torch.cat(w).to(dev))
    return batch, full[:1, :shared]


@dataclass
class FullRows:
    """The prompts WITH the chunk of some examples, streamed through every block (:func:`full_prompt_rows`),
    kept at the rows a fit reads (:func:`fit_thought`'s fitted positions for ``pool`` and
    ``query_weight``): ``resid_pre`` of every block then the residual after the last one
    (``pre``), and every block's attention output (``attn``). They do not depend on any patch:
    fits of other examples plus these (the protocol's seeds, whose fit rows share the answered
    queries) read them instead of streaming these prompts again (``fit_thought(_full_rows=...)``).
    ``index`` maps a prompt's tokens (``EncodedExample.full``, as a tuple) to its first row and
    number of rows."""

    pool: str
    query_weight: float
    index: dict[tuple[int, ...], tuple[int, int]]
    positions: Int[Tensor, " rows"]
    pre: Float[Tensor, "layer1 rows d_model"]
    attn: Float[Tensor, "layer rows d_model"]

    def rows_of(self, full: Int[Tensor, " pos"]) -> Int[Tensor, " n"] | None:
        """The indices of the rows of the prompt ``full`` (its tokens with the chunk), or None
        where it is not held.

        Example:
            >>> rows.positions[rows.rows_of(encoded.full)]  # doctest: +SKIP
        """
        place = self.index.get(tuple(full.tolist()))
        return None if place is None else torch.arange(place[0], place[0] + place[1])


@torch.no_grad()
def full_prompt_rows(
    model: HookedTransformer,
    chunk: str,
    examples: Sequence[Example],
    *,
    template: PromptTemplate | None = None,
    pool: str = "kept",
    query_weight: float = 0.0,
    batch_size: int = 16,
) -> FullRows:
    """:class:`FullRows` of ``examples``: their prompts with the chunk streamed block by block as
    :func:`fit_thought` streams them (the positions every prompt shares run once, each prompt up
    to its last fitted row, batches of similar lengths), kept at the rows a fit with this
    ``pool`` and ``query_weight`` reads. A fit given them
    (``fit_thought(..., _full_rows=rows)``) gives the patch it gives streaming those prompts
    itself, up to floating-point rounding (the batches differ;
    ``tests/test_thoughts.py::test_given_full_rows_give_the_same_fit``).

    Raises:
        UnsupportedArchitectureError: blocks with norms after their sublayers (as :func:`fit_thought`).
        InputError: no examples, or an example given twice.

    Example:
        >>> rows = tl_thoughts.thoughts.full_prompt_rows(model, "Answer in French.", ["cat", "dog"])  # doctest: +SKIP
        >>> patch = tl_thoughts.fit_thought(model, "Answer in French.", ["cat", "dog", "sun"], _full_rows=rows)  # doctest: +SKIP
    """
    spec = _tl.model_spec(model)
    _tl.check_no_hooks(model)
    if spec.post_norm:
        raise UnsupportedArchitectureError(
            "full_prompt_rows streams the blocks as fit_thought does, which does not support blocks with "
            "norms after their sublayers (Gemma 2/3 use_normalization_before_and_after, OLMo 2)"
        )
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if not query_weight >= 0:
        raise ValueError(f"query_weight must be >= 0, got {query_weight}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if len(examples) == 0:
        raise InputError("at least one example is needed")
    template = template or default_template(model)
    encoded = [encode_example(model, template, chunk, ex) for ex in examples]
    rows = [_fitted_rows(e, pool, query_weight) for e in encoded]
    shared = _shared_length(encoded, rows, 0)
    groups = _length_batches(encoded, range(len(encoded)), batch_size)
    made = [_make_batch(model, [encoded[i] for i in g], [rows[i] for i in g], shared, False) for g in groups]
    batches = [b for b, _ in made]
    common = made[0][1]
    pre: list[list[Tensor]] = [[] for _ in batches]
    attn: list[list[Tensor]] = [[] for _ in batches]
    for layer in range(spec.n_layers):
        kv = None
        if shared:
            attn_common, _, kv = _tl.block_attention_kv(model, layer, common)
            common = _finish_block(model, spec, layer, common, attn_common, {})
        for j, b in enumerate(batches):
            attn_full, _, _ = _tl.block_attention_kv(model, layer, b.full, prefix=kv)
            pre[j].append(b.full[b.rows_full])
            attn[j].append(attn_full[b.rows_full])
            b.full = _finish_block(model, spec, layer, b.full, attn_full, {})
    for j, b in enumerate(batches):
        pre[j].append(b.full[b.rows_full])
    parts: list[tuple[Tensor, Tensor] | None] = [None] * len(encoded)  # per example: its rows (resid_pre, attn_out)
    pre_b, attn_b = [torch.stack(p) for p in pre], [torch.stack(a) for a in attn]  # [layer(+1), rows of batch j, d]
    for j, g in enumerate(groups):
        lo = 0
        for i in g:
            hi = lo + len(rows[i][0])
            parts[i] = (pre_b[j][:, lo:hi], attn_b[j][:, lo:hi])
            lo = hi
    return _assemble_full_rows(pool, query_weight, encoded, [pos for pos, _, _ in rows], parts)


def _assemble_full_rows(
    pool: str, query_weight: float, encoded: Sequence[EncodedExample], positions: Sequence[Tensor],
    parts: Sequence[tuple[Tensor, Tensor]],
) -> FullRows:
    """:class:`FullRows` from each example's rows, in the examples' order: ``parts[i]`` holds
    ``encoded[i]``'s prompt with the chunk at its fitted rows ``positions[i]`` for ``pool`` and
    ``query_weight`` (:func:`_fitted_rows`, in its order), ``resid_pre`` of every block then the
    residual after the last one (``[n_layers + 1, rows, d_model]``) and every block's attention
    output (``[n_layers, rows, d_model]``). Raises :class:`InputError` for an example given twice
    (the same prompt with the chunk) or rows that are not its fitted rows' number."""
    index, first = {}, 0
    for e, pos, (pre, attn) in zip(encoded, positions, parts, strict=True):
        if pre.shape[1] != len(pos) or attn.shape[1] != len(pos) or pre.shape[0] != attn.shape[0] + 1:
            raise InputError(f"an example's rows: {tuple(pre.shape)} and {tuple(attn.shape)} for {len(pos)} fitted rows")
        key = tuple(e.full.tolist())
        if key in index:
            raise InputError("an example is given twice (the same prompt with the chunk)")
        index[key] = (first, len(pos))
        first += len(pos)
    return FullRows(pool=pool, query_weight=float(query_weight), index=index, positions=torch.cat(list(positions)),
                    pre=torch.cat([p for p, _ in parts], dim=1), attn=torch.cat([a for _, a in parts], dim=1))


@torch.no_grad()
def fit_thoughts(
    model: HookedTransformer,
    chunk: str,
    examples: Sequence[Example],
    fits: Sequence[str] = FITS,
    **options,
) -> dict[str, ThoughtPatch]:
    """:func:`fit_thought` once for each of ``fits`` (``"vector"``, ``"matrix"``, ``"both"``),
    with the same ``options``, streaming the prompts WITH the chunk only once: their activations do
    not depend on any patch, so the fits after the first reuse them (each then costs about one
    reduced pass instead of one full and one reduced pass; the price is memory: two tensors of the
    full prompts' residual size per block, kept until the last fit). The patches are the ones separate
    :func:`fit_thought` calls give (``tests/test_thoughts.py::test_fit_thoughts_equals_separate_fits``).

    Example:
        >>> patches = tl_thoughts.fit_thoughts(model, "Answer in French.", ["cat", "dog"])  # doctest: +SKIP
        >>> sorted(patches)  # doctest: +SKIP
        ['both', 'matrix', 'vector']
    """
    if not fits or len(set(fits)) != len(fits):
        raise ValueError(f"fits must be distinct and not empty, got {fits!r}")
    if "fit" in options:
        raise TypeError("give the fits as fits=..., not fit=...")
    if "_full_stream" in options:
        raise TypeError("fit_thoughts shares the full-prompt stream itself: do not pass _full_stream")
    stream: dict = {}
    return {kind: fit_thought(model, chunk, examples, fit=kind, _full_stream=stream, **options) for kind in fits}


@torch.no_grad()
def fit_thought(
    model: HookedTransformer,
    chunk: str,
    examples: Sequence[Example],
    *,
    template: PromptTemplate | None = None,
    layers: Sequence[int] | None = None,
    fit: str = "both",
    ridge: float = 1e-2,
    pool: str = "kept",
    vector_site: str = "b_out",
    vector_target: str = "residual",
    attention_matrix: bool = False,
    query_weight: float = 0.0,
    output_matrix: bool = False,
    patch_prefix: bool = True,
    batch_size: int = 16,
    compare_steering: bool = True,
    progress: bool = True,
    _full_stream: dict | None = None,
    _share_prefix: bool = True,
    _full_rows: FullRows | None = None,
) -> ThoughtPatch:
    """Fit a thought patch (a thought vector and/or thought matrix per block) from a chunk.

    Args:
        model: The model (not modified; no hooks may be attached).
        chunk: The chunk's text (an instruction, demonstrations, knowledge).
        examples: Queries (strings) or ``(query, answer)`` pairs; answers are teacher-forced.
        template: Where chunk and query go (default: the model's chat template, chunk and query in
            one user turn, or ``"{chunk}\\n{query}"`` without a chat template).
        layers: Blocks to patch (default: all). The other blocks are left as they are.
        fit: ``"vector"``, ``"matrix"`` or ``"both"``.
        ridge: Ridge strength relative to the mean squared MLP input norm (0: minimum-norm
            least squares).
        pool: Positions pooled in the fit: ``"query"``, ``"answer"``, ``"kept"`` (all after the
            chunk) or ``"all"`` (the prefix too). See ``EncodedExample.pooled``.
        vector_site: ``"b_out"`` (the papers: the vector on the MLP output bias, the matrix carries
            the effect on the MLP input) or ``"attn_out"`` (the vector on the attention output bias
            ``b_O``, where the MLP reads it: the usual steering site).
        vector_target: ``"residual"`` (the vector restores the mean residual difference entering
            the MLP: attention difference plus what lower patches left uncorrected) or
            ``"attention"`` (the attention-output difference only, as in Algorithm 1).
        attention_matrix: Also fit a thought matrix on the attention output matrix ``W_O``: the
            ridge regression of what the thought vector leaves of each token's attention-output
            change (``delta_i - vector``) on the reduced run's head outputs ``z_i`` (``hook_z``,
            heads concatenated), so that the attention output gains a token-dependent part
            ``z_i @ dW_O`` (a MEMIT-style edit of ``W_O``; fitted with ``fit="matrix"`` or
            ``"both"``).
        query_weight: Weight, in the matrices' regressions, of the query positions (after the
            chunk, before the answer) that ``pool`` leaves out; 0 (default) leaves them out. The
            thought vector is always the mean over the pooled positions.
        output_matrix: Also fit a thought matrix on the MLP output matrix ``W_out`` (the site of
            ROME and MEMIT edits): the ridge regression, on the reduced run's MLP hidden
            activations ``h_i`` (``mlp.hook_post``, under the block's other patches), of what is
            left of each fitted row's residual difference after the block (with the chunk minus
            without: the MLP's own and whatever the patches up to here left uncorrected), so that
            the MLP output gains a token-dependent part ``h_i @ dW_out`` (fitted with
            ``fit="matrix"`` or ``"both"``; weighted and regularised as the other matrices).
        patch_prefix: True (default): the patch acts at every position, as new weights do.
            False: the positions before the chunk's place (the template's prefix, e.g. a BOS
            token), which the chunk cannot change under causal attention, are left unpatched in
            the fit, and the patch records it (``ThoughtPatch.unpatched_positions``): it is then
            applied as activation hooks from that position on (``ThoughtPatch.apply``). Needs a
            prefix of the same length in every example and ``pool`` other than ``"all"``.
        batch_size: Examples per padded batch (the examples are batched by length, so that a
            batch pads few positions).
        compare_steering: Also stream the unpatched reduced prompts, to store the plain
            mean-difference steering vectors (``ThoughtPatch.steering``) for comparison.
        progress: Show a progress bar over blocks.
        _full_stream: Internal (:func:`fit_thoughts`): a dict, filled by the first call and read by
            the next ones with the same examples, template, chunk and batch size, that keeps the full
            prompts' attention outputs and residual streams per (batch, block).
        _share_prefix: Internal: False streams every full prompt whole, the positions they share
            included (the same fit, slower: ``tests/test_thoughts.py``).
        _full_rows: Internal: :class:`FullRows` of some of the examples (:func:`full_prompt_rows`,
            with this ``pool`` and ``query_weight``), whose prompts with the chunk are then read
            from them instead of streamed (batched apart from the others). Not used where the
            unpatched ``patch_prefix`` positions cannot be read from the shared positions.

    Returns:
        The fitted :class:`ThoughtPatch`.

    Raises:
        InputError: an empty chunk or no examples, hooks on the model, nothing to pool, a matrix
            fit on an attention-only model.
        UnsupportedArchitectureError: blocks with norms after their sublayers (no bias after the
            norm to carry a vector).

    Example:
        >>> patch = tl_thoughts.fit_thought(model, "Answer in French.", ["cat", "dog"])  # doctest: +SKIP
        >>> with patch.apply(model):  # doctest: +SKIP
        ...     logits = model("<prompt without the chunk>")
    """
    spec = _tl.model_spec(model)
    _tl.check_no_hooks(model)
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if vector_site not in SITES:
        raise ValueError(f"vector_site must be one of {SITES}, got {vector_site!r}")
    if vector_target not in TARGETS:
        raise ValueError(f"vector_target must be one of {TARGETS}, got {vector_target!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if spec.post_norm:
        raise UnsupportedArchitectureError(
            "thought patches for blocks with norms after their sublayers (Gemma 2/3 "
            "use_normalization_before_and_after, OLMo 2): a token-independent vector would have to "
            "be added after the norm, where the block has no bias to carry it. The exact updates, "
            "their verification and their weight form do support these models."
        )
    if fit != "vector" and not spec.has_mlp:
        raise InputError("attention-only model: only fit='vector' is possible (no MLP matrix)")
    if not isinstance(chunk, str) or not chunk:
        raise InputError("the chunk must be a non-empty string")
    if len(examples) == 0:
        raise InputError("at least one example is needed")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not query_weight >= 0:
        raise ValueError(f"query_weight must be >= 0, got {query_weight}")
    if not patch_prefix and pool == "all":
        raise InputError("patch_prefix=False leaves the prefix unpatched: it cannot also be pooled (pool='all')")
    layers = sorted(set(range(spec.n_layers) if layers is None else layers))
    if not layers or layers[0] < 0 or layers[-1] >= spec.n_layers:
        raise ValueError(f"layers must be a non-empty subset of 0..{spec.n_layers - 1}")
    template = template or default_template(model)

    encoded = [encode_example(model, template, chunk, ex) for ex in examples]
    prefix = 0
    if not patch_prefix:
        starts = sorted({e.start for e in encoded})
        if len(starts) != 1:
            raise InputError(
                f"patch_prefix=False needs the same number of positions before the chunk in every "
                f"example, got {starts}"
            )
        prefix = starts[0]
    n_tokens = sum(int(e.pooled(pool).shape[0]) for e in encoded)
    if n_tokens == 0:
        raise InputError(f"no position to pool with pool={pool!r}")
    rows = [_fitted_rows(e, pool, query_weight) for e in encoded]
    # the positions every full prompt shares (the prefix and the chunk) run once, as one sequence
    # whose keys and values every batch's attention reads (a key-value cache): the same values
    shared = _shared_length(encoded, rows, prefix) if _share_prefix else 0
    given = _given_rows(_full_rows, encoded, rows, pool, query_weight, spec)
    if prefix and not shared:  # the unpatched positions are copied from the streamed prompts
        given = {}
    # batches of examples of similar lengths (sorted by length, the order of the examples kept
    # among equal lengths): the fewer padded positions, the less each batch computes; the
    # examples whose full rows are given apart from the others
    groups = (_length_batches(encoded, [i for i in range(len(encoded)) if i not in given], batch_size)
              + _length_batches(encoded, [i for i in range(len(encoded)) if i in given], batch_size))
    made = [_make_batch(model, [encoded[i] for i in g], [rows[i] for i in g], shared, compare_steering) for g in groups]
    batches = [b for b, _ in made]
    for g, b in zip(groups, batches):
        if g[0] in given:  # their rows, in the batch's order, on the model's device
            idx = torch.cat([given[i] for i in g])
            b.given = tuple(t[:, idx].to(b.reduced.device) for t in (_full_rows.pre, _full_rows.attn))
            b.full = None
    common = made[0][1]  # [1, shared, d_model]: the shared positions' residual stream
    deltas: dict[str, Tensor] = {}
    steering: dict[str, Tensor] = {}
    want_vector, want_matrix = fit in ("vector", "both"), fit in ("matrix", "both")
    want_attn_matrix = attention_matrix and fit in ("matrix", "both")
    want_out_matrix = output_matrix and fit in ("matrix", "both")
    bias = "b_O" if vector_site == "attn_out" else "b_out"
    if not spec.has_mlp:
        bias = "b_O"
    device = _tl.model_device(model)
    n_weight = float(sum(float(b.weights.sum()) for b in batches))  # rows of the matrices' fits
    n_rows = sum(int(b.weights.shape[0]) for b in batches)
    d_z = spec.n_heads * spec.d_head
    # blocks above the last fitted one change nothing in the fit: stop there
    for layer in tqdm(range(layers[-1] + 1), desc="fitting thought patch", disable=not progress):
        fitting = layer in layers
        # 1. attention of every stream; the per-token targets at the fitted rows
        sum_delta = torch.zeros(spec.d_model, dtype=torch.float64, device=device)
        sum_steer = torch.zeros_like(sum_delta)
        sum_resid = torch.zeros_like(sum_delta)
        z_fit = _Regression(d_z, n_rows)
        kv = None
        if _full_stream is not None and ("shared", layer) in _full_stream:
            common = _full_stream["shared", layer]
        elif shared:
            attn_common, _, kv = _tl.block_attention_kv(model, layer, common)
            common = _finish_block(model, spec, layer, common, attn_common, {})
            if _full_stream is not None:
                _full_stream["shared", layer] = common  # after the block
        for j, b in enumerate(batches):
            if b.given is not None:  # the full prompts' rows, given (FullRows)
                b.cache["pre_full"], b.cache["attn_rows"] = b.given[0][layer], b.given[1][layer]
            else:
                if _full_stream is not None and (j, layer) in _full_stream:
                    b.cache["attn_full"], b.cache["next_full"] = _full_stream[j, layer]
                else:
                    b.cache["attn_full"], _, _ = _tl.block_attention_kv(model, layer, b.full, prefix=kv)
                b.cache["pre_full"], b.cache["attn_rows"] = b.full[b.rows_full], b.cache["attn_full"][b.rows_full]
            pre_full, attn_rows = b.cache["pre_full"], b.cache["attn_rows"]  # [n, d_model] at the fitted rows
            b.cache["attn_red"], b.cache["z_red"] = _tl.block_attention(model, layer, b.reduced)
            if vector_target == "residual":
                delta = (pre_full + attn_rows) - (b.reduced + b.cache["attn_red"])[b.rows_reduced]
            else:
                delta = attn_rows - b.cache["attn_red"][b.rows_reduced]
            delta = delta.double()
            sum_delta += delta[b.in_pool].sum(0)
            if fitting and want_attn_matrix:
                z_fit.add(b.cache["z_red"][b.rows_reduced].flatten(1).double(), delta, b.weights)  # z: [n, head * d_head]
            if b.base is not None:
                b.cache["attn_base"], _ = _tl.block_attention(model, layer, b.base)
                rows_b = (b.rows_reduced[0][b.in_pool], b.rows_reduced[1][b.in_pool])
                sum_steer += (attn_rows[b.in_pool] - b.cache["attn_base"][rows_b]).double().sum(0)
                sum_resid += ((pre_full + attn_rows)[b.in_pool]
                              - (b.base + b.cache["attn_base"])[rows_b]).double().sum(0)
        if compare_steering:
            steering[f"steering.{layer}"] = (sum_steer / n_tokens).to(spec.dtype)
            steering[f"residual.{layer}"] = (sum_resid / n_tokens).to(spec.dtype)
        vector = sum_delta / n_tokens  # float64
        if fitting and want_vector:
            deltas[_tl.param_name(layer, bias)] = vector.to(spec.dtype)
        # 2. the attention output matrix: what the vector leaves of each token's change, from z
        dW_O = None
        if fitting and want_attn_matrix:
            left = vector if want_vector else torch.zeros_like(vector)
            dW_O = z_fit.solve(ridge, n_weight, shift=left)  # [head*d_head, d]
            deltas[_tl.param_name(layer, "W_O")] = dW_O.reshape(spec.n_heads, spec.d_head, -1).to(spec.dtype)
        # the reduced stream's attention output under this block's attention-side patches
        for b in batches:
            attn = b.cache.pop("attn_red")
            if fitting and want_vector and bias == "b_O":
                attn = attn + vector.to(attn.dtype)
            if dW_O is not None:
                attn = attn + b.cache["z_red"].flatten(2) @ dW_O.to(attn.dtype)
            b.cache["attn_red"] = attn
        # 3. the MLP input matrices, from sufficient statistics
        if fitting and want_matrix and spec.has_mlp:
            # targets u_i = (a_C,i - a_i) @ W for every MLP input matrix W: accumulate
            # A^T A and A^T (A_C - A) (both d_model x d_model, weighted), and apply W once per layer
            a_fit = _Regression(spec.d_model, n_rows)
            for b in batches:
                r_full, r_red = _mlp_resids(spec, b)
                a = _tl.mlp_norm(model, layer, r_red[b.rows_reduced]).double()
                a_c = _tl.mlp_norm(model, layer, r_full).double()
                a_fit.add(a, a_c - a, b.weights)
            solved = a_fit.solve(ridge, n_weight)  # [d_model, d_model]
            for name in spec.mlp_input_matrices:
                M = solved @ _tl.mlp_matrix(model, layer, name).double()
                deltas[_tl.param_name(layer, name)] = M.to(spec.dtype)
        # 4. finish the block in every stream (the reduced one under this block's MLP patches)
        new = _tl.patched_values(
            model, {name: d for name, d in deltas.items() if name.startswith(f"blocks.{layer}.mlp.")}
        )
        fit_out = fitting and want_out_matrix
        if fit_out:
            h_fit = _Regression(spec.d_mlp, n_rows)
        for j, b in enumerate(batches):
            if b.given is not None:
                post_full = b.given[0][layer + 1]
            else:
                attn_full = b.cache.pop("attn_full")
                if "next_full" in b.cache:
                    b.full = b.cache.pop("next_full")
                else:
                    b.full = _finish_block(model, spec, layer, b.full, attn_full, {})
                    if _full_stream is not None:
                        _full_stream[j, layer] = (attn_full, b.full)
                post_full = b.full[b.rows_full] if fit_out else None
            if fit_out:  # resid_post and h under the block's other patches; the rows' residual differences
                b.reduced, b.cache["post"] = _finish_block(
                    model, spec, layer, b.reduced, b.cache.pop("attn_red"), new, keep_post=True
                )
                h_fit.add(b.cache["post"][b.rows_reduced].double(),
                          (post_full - b.reduced[b.rows_reduced]).double(), b.weights)
            else:
                b.reduced = _finish_block(model, spec, layer, b.reduced, b.cache.pop("attn_red"), new)
            if b.base is not None:
                b.base = _finish_block(model, spec, layer, b.base, b.cache.pop("attn_base"), {})
        if fit_out:
            dW_out = h_fit.solve(ridge, n_weight)  # [d_mlp, d_model]
            deltas[_tl.param_name(layer, "W_out")] = dW_out.to(spec.dtype)
        for b in batches:
            if fit_out:
                b.reduced = b.reduced + b.cache["post"] @ dW_out.to(b.reduced.dtype)
            if prefix:  # the positions before the chunk's place, left unpatched: as in the full run
                b.reduced[:, :prefix] = common[:, :prefix] if shared else b.full[:, :prefix]
            b.cache.clear()

    meta = dict(
        chunk=chunk,
        template=dict(text=template.text, separator=template.separator),
        layers=layers,
        options=dict(
            fit=fit, ridge=ridge, pool=pool, vector_site=vector_site, vector_target=vector_target,
            attention_matrix=attention_matrix, query_weight=query_weight, output_matrix=output_matrix,
            patch_prefix=patch_prefix,
        ),
        n_examples=len(examples),
        n_tokens=n_tokens,
    )
    if prefix:
        meta["unpatched_positions"] = prefix
    return ThoughtPatch.create(model, deltas=deltas, steering=steering, meta=meta)


def _mlp_resids(spec: _tl.ModelSpec, b: _Batch) -> tuple[Tensor, Tensor]:
    """What the MLP normalises (resid_mid, or resid_pre for parallel blocks): the full prompts'
    at the fitted rows, the reduced prompts' at every position."""
    if spec.parallel_attn_mlp:
        return b.cache["pre_full"], b.reduced
    return b.cache["pre_full"] + b.cache["attn_rows"], b.reduced + b.cache["attn_red"]


def _finish_block(
    model: HookedTransformer,
    spec: _tl.ModelSpec,
    layer: int,
    resid_pre: Tensor,
    attn_out: Tensor,
    mlp_patched: dict[str, Tensor],
    keep_post: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """resid_post of block ``layer`` from its input and its (already patched) attention output,
    with the block's MLP parameters temporarily replaced by ``mlp_patched`` (full values, by name);
    with ``keep_post``, also the MLP's hidden activations (``mlp.hook_post``)."""
    if not spec.has_mlp:
        return resid_pre + attn_out
    mlp_resid = resid_pre if spec.parallel_attn_mlp else resid_pre + attn_out
    with _tl.swapped_tensors(model, mlp_patched):
        mlp_in = _tl.mlp_norm(model, layer, mlp_resid)
        if keep_post:
            mlp_out, post = _tl.block_mlp_hidden(model, layer, mlp_in)
            return resid_pre + attn_out + mlp_out, post
        return resid_pre + attn_out + _tl.block_mlp(model, layer, mlp_in)
