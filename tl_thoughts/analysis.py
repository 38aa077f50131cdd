"""Circuit-level analysis: which heads carry a chunk's effect.

Per-head attribution of the implicit update (in the style of TransformerLens' ``ActivationCache``:
``"L{l}H{h}"`` labels, layer-major stacking, ``return_labels``, ``pos_slice``), its causal check
(add back only the top-k heads' vectors), the theory's explanation of steering vectors (thought
vector vs mean-difference steering vector vs accumulated residual difference, per layer) and the
low-rank structure of the virtual weight matrices (singular values).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_thoughts import _tl
from tl_thoughts._tl import Model
from tl_thoughts.errors import (
    ArgumentTypeError,
    InputError,
    UnsupportedArchitectureError,
    ZeroDenominatorError,
    check_int,
)
from tl_thoughts.patch import ThoughtPatch, svdvals_of
from tl_thoughts.updates import ImplicitUpdates

METRICS = ("norm", "chunk_attention", "direct_effect")
AnswerTokens = int | tuple[int, int] | Int[Tensor, " kept"] | Int[Tensor, "kept 2"]
PosSlice = int | slice | Sequence[int] | None


def check_updates(updates: object, model: Model | None = None) -> None:
    """Refuse anything but [`tl_thoughts.ImplicitUpdates`][] as ``updates``, and (when ``model``
    is given) updates computed on another model or with other weights
    ([`tl_thoughts.ImplicitUpdates.check_model`][]).

    Example:
        >>> check_updates(updates, model)  # from tl_thoughts.implicit_updates on model: nothing raised
    """
    if not isinstance(updates, ImplicitUpdates):
        raise ArgumentTypeError(f"updates must come from tl_thoughts.implicit_updates, got {type(updates).__name__}")
    if model is not None:
        updates.check_model(model)


def check_patch(patch: object) -> None:
    """Refuse anything but a [`tl_thoughts.ThoughtPatch`][] as ``patch``.

    Example:
        >>> check_patch(patch)  # from tl_thoughts.fit_thought: nothing raised
    """
    if not isinstance(patch, ThoughtPatch):
        raise ArgumentTypeError(f"patch must be a tl_thoughts.ThoughtPatch, got {type(patch).__name__}")


def head_labels(n_layers: int, n_heads: int) -> list[str]:
    """``["L0H0", "L0H1", ...]``, layer-major, as TransformerLens stacks heads.

    Example:
        >>> head_labels(2, 2)
        ['L0H0', 'L0H1', 'L1H0', 'L1H1']
    """
    return [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]


def _answer_ids(answer_tokens: AnswerTokens, n_kept: int, d_vocab: int) -> Int[Tensor, "kept k"]:
    """``answer_tokens`` as ``[kept, 1]`` (a logit) or ``[kept, 2]`` (a logit difference) ids."""
    if isinstance(answer_tokens, bool):
        raise ArgumentTypeError("answer_tokens: a token id, not a bool")
    if isinstance(answer_tokens, int):
        ids = torch.tensor([[answer_tokens]]).expand(n_kept, 1)
    elif isinstance(answer_tokens, tuple):
        if len(answer_tokens) != 2 or not all(isinstance(t, int) for t in answer_tokens):
            raise InputError("answer_tokens as a tuple is a (correct, incorrect) pair of token ids")
        ids = torch.tensor([answer_tokens]).expand(n_kept, 2)
    elif isinstance(answer_tokens, Tensor):
        if answer_tokens.dtype.is_floating_point or answer_tokens.dtype == torch.bool:
            raise InputError(f"answer_tokens must hold integer token ids, got {answer_tokens.dtype}")
        ids = answer_tokens.cpu()
        if ids.ndim == 1:
            ids = ids[:, None]
        if ids.ndim != 2 or ids.shape[1] not in (1, 2) or ids.shape[0] != n_kept:
            raise InputError(
                f"answer_tokens as a tensor is [kept] or [kept, 2] with kept = {n_kept}, got "
                f"{tuple(answer_tokens.shape)}"
            )
    else:
        raise ArgumentTypeError(
            "answer_tokens: a token id, a (correct, incorrect) pair, or a [kept] / [kept, 2] tensor; "
            f"got {type(answer_tokens).__name__}"
        )
    if bool((ids < 0).any()) or bool((ids >= d_vocab).any()):
        raise InputError(f"answer token ids must lie in [0, {d_vocab})")
    return ids


def _answer_directions(
    model: Model, answer_tokens: AnswerTokens, n_kept: int
) -> Float[Tensor, "kept d_model"]:
    """Unembedding direction per kept position: ``W_U[:, c]`` or ``W_U[:, c] - W_U[:, i]``."""
    W_U = model.W_U.detach()
    ids = _answer_ids(answer_tokens, n_kept, W_U.shape[1]).to(W_U.device)
    directions = W_U[:, ids[:, 0]].T
    if ids.shape[1] == 2:
        directions = directions - W_U[:, ids[:, 1]].T
    return directions


def _kept_index(position: int, n_kept: int) -> int:
    """``position`` (an index into the kept positions, negative from the end) made non-negative."""
    if isinstance(position, bool) or not isinstance(position, int):
        raise ArgumentTypeError(f"position must be an integer (an index into the kept positions), got {position!r}")
    if not -n_kept <= position < n_kept:
        raise InputError(f"position {position!r} out of range for {n_kept} kept positions")
    return position % n_kept


def _positions(pos_slice: PosSlice, n_kept: int) -> Int[Tensor, " n"]:
    """Indices into the kept axis selected by ``pos_slice`` (TransformerLens' convention)."""
    if pos_slice is None:
        return torch.arange(n_kept)
    if isinstance(pos_slice, slice):
        return torch.arange(n_kept)[pos_slice]
    items = [pos_slice] if isinstance(pos_slice, int) else pos_slice
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) \
            or any(isinstance(i, bool) or not isinstance(i, int) for i in items):
        raise ArgumentTypeError(f"pos_slice must be an int, a slice or a list of ints, got {pos_slice!r}")
    index = torch.as_tensor(items, dtype=torch.long)
    if index.ndim != 1:
        raise InputError(f"pos_slice must be an int, a slice or a list of ints, got {pos_slice!r}")
    if len(index) and (int(index.max()) >= n_kept or int(index.min()) < -n_kept):
        raise InputError(f"pos_slice {pos_slice!r} out of range for {n_kept} kept positions")
    return index % n_kept


@torch.no_grad()
def head_attribution(
    model: Model,
    updates: ImplicitUpdates,
    *,
    metric: str = "norm",
    answer_tokens: AnswerTokens | None = None,
    pos_slice: PosSlice = None,
    return_labels: bool = False,
    per_head: bool = True,
) -> Float[Tensor, "component n_pos"] | tuple[Float[Tensor, "component n_pos"], list[str]]:
    """Per-head attribution of a chunk's implicit update, stacked like TransformerLens heads.

    Args:
        model: The model the updates were computed on.
        updates: From [`tl_thoughts.implicit_updates`][].
        metric: ``"norm"`` (norm of each head's vector), ``"chunk_attention"`` (attention mass the
            head puts on the chunk) or ``"direct_effect"`` (the head's vector straight to the
            unembedding, through the final norm with its scale frozen at the full run's value as
            ``ActivationCache.apply_ln_to_stack`` does, onto ``answer_tokens``). Direct effects
            are linear: per-head effects sum to the block's (``per_head=False``), and the blocks'
            to the whole update's.
        answer_tokens: Needed for ``"direct_effect"``: a token id (its logit), a
            ``(correct, incorrect)`` pair (the logit difference), or one of either per kept
            position (``[kept]`` or ``[kept, 2]`` tensor).
        pos_slice: Kept positions to keep (an index, a slice, or a list of indices into
            ``updates.positions``), as ``pos_slice`` in TransformerLens.
        return_labels: Also return the component labels.
        per_head: ``False`` gives one row per block (the block's whole vector), labels ``"L{l}"``;
            not available for ``"chunk_attention"``.

    Returns:
        ``[layer * head, n_pos]`` (layer-major; ``[layer, n_pos]`` if not ``per_head``) where
        ``n_pos`` counts the kept positions selected by ``pos_slice``, and the labels if asked.

    Example:
        >>> import torch, tl_thoughts
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32,
        ...     n_ctx=32, d_vocab=50, act_fn="gelu", dtype=torch.float64, seed=0)
        >>> model = HookedTransformer(cfg)
        >>> updates = tl_thoughts.implicit_updates(model, torch.arange(10)[None], slice(2, 5))
        >>> scores, labels = head_attribution(model, updates, metric="direct_effect",
        ...     answer_tokens=(7, 3), pos_slice=-1, return_labels=True)
        >>> scores.shape, labels[:3]
        (torch.Size([8, 1]), ['L0H0', 'L0H1', 'L0H2'])
    """
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, got {metric!r}")
    check_updates(updates, model)
    return _head_attribution(model, updates, metric, answer_tokens, pos_slice, per_head, return_labels)


def _head_attribution(model, updates, metric, answer_tokens, pos_slice, per_head, return_labels):
    """[`head_attribution`][] of updates already checked against ``model``."""
    heads = updates.head_vectors  # [layer, kept, head, d_model]
    n_layers, n_kept, n_heads, _ = heads.shape
    index = _positions(pos_slice, n_kept)
    if metric == "chunk_attention":
        if not per_head:
            raise InputError("metric='chunk_attention' is a per-head quantity (per_head=True)")
        values = updates.chunk_attention.permute(0, 2, 1)  # [layer, head, kept]
    else:
        source = heads if per_head else updates.vectors[:, :, None]  # [layer, kept, h, d]
        source = source.permute(0, 2, 1, 3)  # [layer, h, kept, d]
        if metric == "norm":
            values = source.norm(dim=-1)
        else:
            if answer_tokens is None:
                raise InputError("metric='direct_effect' needs answer_tokens")
            if per_head and updates.pre_norm_vectors is not None:
                raise UnsupportedArchitectureError(
                    "per-head direct effects: this model normalises the attention output before "
                    "adding it to the residual stream (post-attention norm), so the heads' vectors "
                    "(taken before the norm) do not add up to what the block adds; use "
                    "per_head=False for the blocks' direct effects"
                )
            _tl.check_no_hooks(model)
            directions = _answer_directions(model, answer_tokens, n_kept)  # [kept, d_model]
            name = _tl.final_scale_name(model)
            scale = None
            if name is not None:
                _, cache = _tl.forward(model, updates.tokens, cache_names=[name])
                scale = cache[name][updates.positions]  # [kept, 1]
            normed = _tl.final_norm_linear(model, source, scale)
            values = (normed * directions.to(normed.dtype)).sum(-1)
    values = values.reshape(-1, n_kept)[:, index]
    if not return_labels:
        return values
    if per_head:
        labels = [f"L{layer}H{head}" for layer in updates.layers for head in range(n_heads)]
    else:
        labels = [f"L{layer}" for layer in updates.layers]
    return values, labels


def direct_effect(
    model: Model, updates: ImplicitUpdates, answer_tokens: AnswerTokens
) -> Float[Tensor, "layer kept"]:
    """Direct effect of each block's virtual weight vector on a logit or logit difference:
    [`head_attribution`][] with ``metric="direct_effect", per_head=False``.

    Example:
        >>> import torch, tl_thoughts
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32,
        ...     n_ctx=32, d_vocab=50, act_fn="gelu", dtype=torch.float64, seed=0)
        >>> model = HookedTransformer(cfg)
        >>> updates = tl_thoughts.implicit_updates(model, torch.arange(10)[None], slice(2, 5))
        >>> direct_effect(model, updates, answer_tokens=7).shape
        torch.Size([2, 5])
    """
    check_updates(updates, model)
    return _direct_effect(model, updates, answer_tokens)


def _direct_effect(model, updates, answer_tokens) -> Tensor:
    """[`direct_effect`][] of updates already checked against ``model``."""
    return _head_attribution(model, updates, "direct_effect", answer_tokens, None, False, False)


@dataclass(frozen=True)
class RecoveryCurve:
    """The causal check of an attribution: how much of the chunk's effect returns when only the
    top-k heads' vectors are added back to the reduced prompt.

    Attributes:
        ks: ``[n]`` numbers of heads added back.
        values: ``[n]`` the metric (logit or logit difference) of the reduced run with them.
        full: The metric with the chunk.
        reduced: The metric without the chunk and without any vector (k = 0).
        recovered: ``[n]`` ``(values - reduced) / (full - reduced)``: 1 means all of the chunk's
            effect on the metric.
        order: Component labels, best first (by ``|score|``; by the signed score for the
            ``"ablation"`` ranking).
        scores: ``[layer * head]`` the ranking metric of each head at ``position`` (label order).
        position: The kept position measured (index into ``updates.positions``).
    """

    ks: Int[Tensor, " n"]
    values: Float[Tensor, " n"]
    full: float
    reduced: float
    recovered: Float[Tensor, " n"]
    order: list[str]
    scores: Float[Tensor, " component"]
    position: int


def _logit_metric(logits: Float[Tensor, " d_vocab"], answer_tokens: int | tuple[int, int]) -> float:
    if isinstance(answer_tokens, tuple):
        return float(logits[answer_tokens[0]] - logits[answer_tokens[1]])
    return float(logits[answer_tokens])


class _ReducedRunner:
    """Runs of the reduced prompt (original positions kept, as in the exact construction) with a
    chosen subset of heads' vectors added back at every kept position, measuring one logit (or
    logit difference) at one kept position. Use as a context manager (the position tables are
    swapped in and restored on exit, also on an exception)."""

    def __init__(self, model: Model, updates: ImplicitUpdates, answer_tokens, position: int):
        if isinstance(answer_tokens, Tensor) or not isinstance(answer_tokens, (int, tuple)):
            raise ArgumentTypeError("the causal checks measure one logit or one logit difference: "
                                    "answer_tokens is a token id or a (correct, incorrect) pair")
        self.spec = _tl.model_spec(model)  # the updates are checked against the model by the caller
        _tl.check_no_hooks(model)
        updates.require_complete("a causal check")
        if updates.dtype != self.spec.dtype:
            raise InputError(
                f"the updates were computed in {updates.dtype} and the model runs in "
                f"{self.spec.dtype}: run the causal checks under "
                f"tl_thoughts.computing_in(model, {updates.dtype})"
            )
        n_kept = updates.vectors.shape[1]
        _answer_ids(answer_tokens, n_kept, model.cfg.d_vocab)  # validates the ids
        self.model, self.updates, self.answer_tokens = model, updates, answer_tokens
        self.position = _kept_index(position, n_kept)
        span = updates.span
        self.kept = span.kept_positions.to(updates.tokens.device)
        self.tokens = updates.tokens[:, self.kept]
        self.rows = torch.arange(span.start, self.kept.shape[0], device=self.kept.device)
        self.row = span.start + self.position
        full_logits, _ = _tl.forward(model, updates.tokens)
        self.full = _logit_metric(full_logits[0, int(updates.positions[self.position])], answer_tokens)
        self._swap = None

    def __enter__(self) -> "_ReducedRunner":
        self._swap = _tl.original_positions(self.model, self.spec, self.kept)
        self._swap.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._swap.__exit__(*exc)

    def run(self, mask: Float[Tensor, "layer head"]) -> float:
        """The metric with the vectors of the heads where ``mask`` is 1 added back."""
        return self.runs([mask])[0]

    def runs(self, masks: list[Tensor], batch_size: int = 32) -> list[float]:
        """[`run`][] of each mask, ``batch_size`` masks in one batched forward pass (the same
        reduced prompt in every row, each row with its own vectors added back)."""
        values: list[float] = []
        for b in range(0, len(masks), batch_size):
            chunk = masks[b : b + batch_size]
            added = torch.stack([self._added(mask) for mask in chunk])  # [batch, layer, kept, d_model]
            used = torch.stack([mask.bool().any(1) for mask in chunk]).any(0)  # blocks with a vector added
            hooks = [
                (_tl.attn_out_name(layer), _tl.add_at_rows_hook(self.rows, added[:, layer]))
                for layer in range(self.spec.n_layers)
                if bool(used[layer])
            ]
            logits = _tl.run(self.model, self.tokens.expand(len(chunk), -1).contiguous(), None, hooks)
            values += [_logit_metric(logits[i, self.row], self.answer_tokens) for i in range(len(chunk))]
        return values

    def _added(self, mask: Tensor) -> Tensor:
        """``[layer, kept, d_model]`` the vectors that ``mask``'s heads add back."""
        heads = self.updates.head_vectors  # [layer, kept, head, d_model]
        if self.updates.pre_norm_vectors is None:
            return torch.einsum("lthd,lh->ltd", heads, mask.to(heads.dtype))
        # post-attention norm: only whole blocks can be added back, as the block's vector
        whole = mask.bool().all(1)
        if bool((mask.bool().any(1) & ~whole).any()):
            raise UnsupportedArchitectureError(
                "adding back a subset of a block's heads: this model normalises the attention "
                "output before adding it to the residual stream, so the heads' vectors (taken "
                "before the norm) do not add up; only whole blocks can be added back "
                "(layer_recovery)"
            )
        return self.updates.vectors * whole.to(heads.dtype)[:, None, None]

    def curve(self, masks: list[Tensor], ks: list[int], order: list[str], scores: Tensor) -> "RecoveryCurve":
        values = self.runs(masks)
        reduced = values[ks.index(0)] if 0 in ks else self.run(torch.zeros_like(masks[0]))
        if self.full == reduced:
            raise ZeroDenominatorError(
                "the chunk does not change the metric at this position (full == reduced): the "
                "recovered fraction is undefined"
            )
        values_t = torch.tensor(values, dtype=torch.float64)
        return RecoveryCurve(
            ks=torch.tensor(ks),
            values=values_t,
            full=self.full,
            reduced=reduced,
            recovered=(values_t - reduced) / (self.full - reduced),
            order=order,
            scores=scores.detach().double().cpu(),
            position=self.position,
        )


@torch.no_grad()
def ablation_scores(
    model: Model,
    updates: ImplicitUpdates,
    answer_tokens: int | tuple[int, int],
    *,
    position: int = -1,
    progress: bool = False,
) -> Float[Tensor, " component"]:
    """Leave-one-out causal score of every head: the metric of the reduced prompt with ALL heads'
    vectors added back (the full run's value, exactly) minus the metric with all but that head's.

    Unlike the direct effect, this counts every path through the later blocks. It costs one
    forward pass of the reduced prompt per head (``n_layers * n_heads``).

    Returns:
        ``[layer * head]`` (layer-major, labels [`head_labels`][]).

    Example:
        >>> scores = ablation_scores(model, updates, answer_tokens=(7, 3))
        >>> scores.shape  # [layer * head]
        torch.Size([8])
    """
    check_updates(updates, model)
    return _ablation_scores(model, updates, answer_tokens, position, progress)


def _ablation_scores(model, updates, answer_tokens, position, progress) -> Tensor:
    """[`ablation_scores`][] of updates already checked against ``model``."""
    from tqdm.auto import tqdm

    with _ReducedRunner(model, updates, answer_tokens, position) as runner:
        ones = torch.ones(runner.spec.n_layers, runner.spec.n_heads)
        everything = runner.run(ones)
        scores = torch.zeros(ones.numel(), dtype=torch.float64)
        for i in tqdm(range(ones.numel()), desc="leave-one-out over heads", disable=not progress):
            mask = ones.flatten().clone()
            mask[i] = 0
            scores[i] = everything - runner.run(mask.reshape(ones.shape))
    return scores


RANKINGS = METRICS + ("ablation",)


@torch.no_grad()
def top_k_recovery(
    model: Model,
    updates: ImplicitUpdates,
    answer_tokens: int | tuple[int, int],
    *,
    ranking: str = "direct_effect",
    position: int = -1,
    ks: Sequence[int] | None = None,
    progress: bool = False,
) -> RecoveryCurve:
    """Add back only the top-k heads' vectors (ranked by the ranking metric at ``position``) to
    the reduced prompt, at every kept position and every block, and measure the logit (difference)
    at ``position``, for each k.

    The reduced prompt keeps its original positions, as in the exact construction, so at k = all
    heads this is the activation form of [`tl_thoughts.verify`][]: the full run's value up to
    rounding; at k = 0 it is the reduced run's.

    Args:
        model: The model the updates were computed on.
        updates: From [`tl_thoughts.implicit_updates`][].
        answer_tokens: A token id or a ``(correct, incorrect)`` pair.
        ranking: ``"direct_effect"`` (by ``|direct effect|``), ``"norm"``, ``"chunk_attention"``,
            or ``"ablation"`` (by the signed leave-one-out score of [`ablation_scores`][],
            largest first; one extra forward pass per head).
        position: Kept position measured and ranked on (index into ``updates.positions``).
        ks: Numbers of heads to try (default: 0, 1, ..., all).
        progress: A progress bar over the leave-one-out runs of the ``"ablation"`` ranking.

    Returns:
        A [`RecoveryCurve`][].

    Raises:
        ZeroDenominatorError: The chunk does not change the metric (full == reduced), so the
            recovered fraction is undefined.

    Example:
        >>> import torch, tl_thoughts
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32,
        ...     n_ctx=32, d_vocab=50, act_fn="gelu", dtype=torch.float64, seed=0)
        >>> model = HookedTransformer(cfg)
        >>> updates = tl_thoughts.implicit_updates(model, torch.arange(10)[None], slice(2, 5))
        >>> curve = top_k_recovery(model, updates, answer_tokens=(7, 3))
        >>> round(float(curve.recovered[-1]), 6)
        1.0
    """
    if ranking not in RANKINGS:
        raise InputError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    check_updates(updates, model)
    spec = _tl.model_spec(model)
    n_total = spec.n_layers * spec.n_heads
    if ks is not None and (isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence)
                           or any(isinstance(k, bool) or not isinstance(k, int) for k in ks)):
        raise ArgumentTypeError(f"ks must be a list of integers (numbers of heads), got {ks!r}")
    ks = list(range(n_total + 1)) if ks is None else [int(k) for k in ks]
    if not ks or any(k < 0 or k > n_total for k in ks):
        raise InputError(f"ks must be a non-empty list of numbers in 0..{n_total}, got {ks}")
    index = _kept_index(position, updates.vectors.shape[1])
    # scores first: they need the model with its own position tables (the runner swaps them)
    if ranking == "ablation":
        scores = _ablation_scores(model, updates, answer_tokens, position, progress)
        order = torch.argsort(scores, descending=True, stable=True)
    else:
        scores = _head_attribution(
            model, updates, ranking, answer_tokens if ranking == "direct_effect" else None, None, True, False
        )[:, index]
        order = torch.argsort(scores.abs(), descending=True, stable=True)
    with _ReducedRunner(model, updates, answer_tokens, position) as runner:
        masks = []
        for k in ks:
            mask = torch.zeros(n_total)
            mask[order[:k]] = 1
            masks.append(mask.reshape(spec.n_layers, spec.n_heads))
        labels = head_labels(spec.n_layers, spec.n_heads)
        return runner.curve(masks, ks, [labels[int(i)] for i in order], scores)


@torch.no_grad()
def layer_recovery(
    model: Model,
    updates: ImplicitUpdates,
    answer_tokens: int | tuple[int, int],
    *,
    position: int = -1,
) -> RecoveryCurve:
    """Add back the vectors of the first k blocks (all their heads), k = 0 .. n_layers: where, in
    depth, the chunk's effect on the metric is built. At k = n_layers it is the full run's value.

    Returns:
        A [`RecoveryCurve`][] whose ``order`` is ``["L0", "L1", ...]`` and whose ``scores`` are
        the per-block direct effects at ``position``.

    Example:
        >>> curve = layer_recovery(model, updates, answer_tokens=(7, 3))
        >>> curve.ks.tolist(), round(float(curve.recovered[-1]), 6)
        ([0, 1, 2], 1.0)
    """
    check_updates(updates, model)
    index = _kept_index(position, updates.vectors.shape[1])
    scores = _direct_effect(model, updates, answer_tokens)[:, index]  # before the runner swaps tables
    with _ReducedRunner(model, updates, answer_tokens, position) as runner:
        spec = runner.spec
        masks = []
        for k in range(spec.n_layers + 1):
            mask = torch.zeros(spec.n_layers, spec.n_heads)
            mask[:k] = 1
            masks.append(mask)
        return runner.curve(masks, list(range(spec.n_layers + 1)),
                            [f"L{layer}" for layer in range(spec.n_layers)], scores)


@dataclass(frozen=True)
class SteeringComparison:
    """Per fitted layer, the thought vector ``v`` against the plain mean-difference steering vector
    ``s`` (full minus unpatched reduced attention output, averaged over the fit's pooled positions)
    and the accumulated residual difference ``r`` entering the block's MLP (all blocks below
    included): the theory's explanation of steering vectors (THEORY 5).

    Attributes:
        layers: The layers compared.
        cos_vector_steering, cos_vector_residual, cos_steering_residual: ``[layer]`` cosines.
        norm_vector, norm_steering, norm_residual: ``[layer]`` norms.
    """

    layers: list[int]
    cos_vector_steering: Float[Tensor, " layer"]
    cos_vector_residual: Float[Tensor, " layer"]
    cos_steering_residual: Float[Tensor, " layer"]
    norm_vector: Float[Tensor, " layer"]
    norm_steering: Float[Tensor, " layer"]
    norm_residual: Float[Tensor, " layer"]

    def table(self) -> str:
        """A fixed-width text table, one row per layer."""
        head = f"{'layer':>5} {'|v|':>9} {'|s|':>9} {'|r|':>9} {'cos(v,s)':>9} {'cos(v,r)':>9} {'cos(s,r)':>9}"
        lines = [head]
        for i, layer in enumerate(self.layers):
            lines.append(
                f"{layer:>5} {self.norm_vector[i]:>9.3g} {self.norm_steering[i]:>9.3g} "
                f"{self.norm_residual[i]:>9.3g} {self.cos_vector_steering[i]:>9.3f} "
                f"{self.cos_vector_residual[i]:>9.3f} {self.cos_steering_residual[i]:>9.3f}"
            )
        return "\n".join(lines)


def _cosine(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return float("nan")  # undefined, not a division by a fudge factor
    return float((a.double() @ b.double()) / (na * nb))


@torch.no_grad()
def steering_comparison(patch: ThoughtPatch) -> SteeringComparison:
    """Compare, per fitted layer, the thought vector with the mean-difference steering vector and
    the accumulated residual difference stored in the patch (``fit_thought(...,
    compare_steering=True)``, the default). A zero vector gives a NaN cosine.

    Raises:
        InputError: The patch has no thought vectors or no steering statistics.

    Example:
        >>> cmp = steering_comparison(patch)
        >>> cmp.layers == patch.layers, cmp.cos_vector_steering.shape
        (True, torch.Size([2]))
    """
    check_patch(patch)
    layers = [layer for layer in patch.layers if patch.vector(layer) is not None]
    if not layers:
        raise InputError("the patch has no thought vector (fitted with fit='matrix')")
    missing = [layer for layer in layers if f"steering.{layer}" not in patch.steering]
    if missing:
        raise InputError(
            f"the patch has no steering statistics for layers {missing}: fit it with compare_steering=True"
        )
    v = [patch.vector(layer) for layer in layers]
    s = [patch.steering[f"steering.{layer}"] for layer in layers]
    r = [patch.steering[f"residual.{layer}"] for layer in layers]

    def cos(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
        return torch.tensor([_cosine(x, y) for x, y in zip(xs, ys)], dtype=torch.float64)

    def norms(xs: list[Tensor]) -> Tensor:
        return torch.tensor([float(x.double().norm()) for x in xs], dtype=torch.float64)

    return SteeringComparison(
        layers=layers,
        cos_vector_steering=cos(v, s),
        cos_vector_residual=cos(v, r),
        cos_steering_residual=cos(s, r),
        norm_vector=norms(v),
        norm_steering=norms(s),
        norm_residual=norms(r),
    )


@torch.no_grad()
def token_patch_spectrum(
    updates: ImplicitUpdates, layer: int, name: str = "W_in", pos_slice: PosSlice = None
) -> Float[Tensor, " rank"]:
    """Singular values (descending) of the sum of the token-wise rank-1 virtual weight matrices of
    block ``layer`` over the selected kept positions, ``sum_t outer(k_t, u_t) = K^T U``: how
    low-rank the chunk's effect on the MLP is, computed from the factors (never the dense sum).

    Returns:
        ``[min(n_pos, d_model, d_mlp)]`` singular values.

    Raises:
        UnsupportedArchitectureError: Attention-only model.
        ZeroDenominatorError: A reduced MLP input has zero norm.

    Example:
        >>> token_patch_spectrum(updates, layer=1).shape  # 5 kept tokens: rank <= 5
        torch.Size([5])
    """
    check_updates(updates)
    check_int(layer, "layer")
    if not layer < updates.n_layers:
        raise InputError(f"layer {layer} out of range for {updates.n_layers} layers")
    keys, values = updates.matrix_factors(name)
    index = _positions(pos_slice, keys.shape[1])
    K, U = keys[layer, index].double(), values[layer, index].double()  # [n, d_model], [n, d_mlp]
    # K^T U = Q_k R_k R_u^T Q_u^T: same singular values as the small R_k R_u^T
    r_k = torch.linalg.qr(K.T, mode="r").R
    r_u = torch.linalg.qr(U.T, mode="r").R
    return torch.linalg.svdvals(r_k @ r_u.T)


@torch.no_grad()
def thought_matrix_spectrum(patch: ThoughtPatch, layer: int, name: str = "W_in") -> Float[Tensor, " rank"]:
    """Singular values (descending, float64) of the thought matrix of ``name`` at ``layer``
    ([`tl_thoughts.patch.svdvals_of`][]): for a matrix held as factors ``(left, right)`` of inner
    size ``r`` (a fitted patch's), its ``r`` values, from the factors (the others are exactly zero;
    the dense matrix is never formed); for a dense one, all ``min(rows, cols)`` of its SVD.

    Raises:
        InputError: The patch has no such matrix.

    Example:
        >>> thought_matrix_spectrum(patch, layer=0).shape  # held as factors of inner size 8: 8 values
        torch.Size([8])
    """
    check_patch(patch)
    check_int(layer, "layer")
    key = _tl.param_name(layer, name)
    if key not in patch.deltas:
        raise InputError(f"the patch has no thought matrix {name!r} at layer {layer} (layers {patch.layers})")
    return svdvals_of(patch.deltas.stored(key))
