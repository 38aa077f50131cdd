"""Exact implicit updates of every block, from one run of the full prompt (THEORY 2-3).

The run is streamed: hooks on each block reduce the attention pattern to what the updates need
(the reduced run's head outputs and the attention mass on the chunk) as soon as it is computed, so
memory grows with the kept positions, not with the square of the prompt length. Prompts of a batch
(left- or right-padded) are processed in one run; each one's result is the same as alone.
"""

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, FactoredMatrix

from tl_thoughts import _math, _tl
from tl_thoughts._tl import Model
from tl_thoughts.chunks import BatchChunkSpec, ChunkSpec, Span, check_window, resolve_chunk, resolve_tokens
from tl_thoughts.fingerprint import model_fingerprint
from tl_thoughts.errors import (
    ArgumentTypeError,
    ChunkError,
    InputError,
    PrecisionWarning,
    UnsupportedArchitectureError,
    ZeroDenominatorError,
)

HALF = (torch.float16, torch.bfloat16)
COMPUTE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class ImplicitUpdates:
    """The exact implicit update a chunk induces in every block, at every kept position after it.

    ``kept`` below indexes the positions after the (first) chunk that are not removed, in order
    (``positions``; a subset if asked for); at the positions before the chunk every update is
    zero. ``layer`` indexes ``layers`` (all blocks unless a subset was asked for). Row vectors,
    TransformerLens convention (``x @ W``). All tensors are in the dtype the updates were computed
    in (``dtype``).

    Attributes:
        tokens: ``[1, pos]`` the full prompt.
        span: The removed positions (``span.start``, ``span.stop``; ``span.intervals`` for several
            chunks) and the prompt length.
        vectors: ``[layer, kept, d_model]`` virtual weight vectors: what the chunk adds to
            ``blocks.{l}.hook_attn_out`` at each kept position (THEORY 2).
        head_vectors: ``[layer, kept, head, d_model]`` the per-head decomposition (GQA heads read
            their shared key/value head); sums over heads to ``vectors``, or, in blocks with a
            post-attention norm, to ``pre_norm_vectors``.
        chunk_attention: ``[layer, kept, head]`` attention mass each head puts on the chunk.
        mlp_in: ``[layer, kept, d_model]`` the MLP input of the reduced run (``ln2`` output, weights
            included), ``a`` in THEORY 3. ``None`` for attention-only models.
        mlp_in_with_chunk: ``[layer, kept, d_model]`` the full run's MLP input ``a_C``. ``None`` for
            attention-only models.
        mlp_input_matrices: Names of the MLP matrices the virtual weight matrices patch
            (``("W_in",)``, or ``("W_gate", "W_in")`` for gated MLPs; empty for attention-only).
        positions: ``[kept]`` the prompt positions of the ``kept`` axis.
        layers: The blocks of the ``layer`` axis.
        n_blocks: The model's number of blocks.
        pre_norm_vectors: ``[layer, kept, d_model]`` in blocks with a post-attention norm (Gemma 2/3
            ``ln1_post``, OLMo 2 ``ln1``): the change of the attention output BEFORE that norm (the
            sum of ``head_vectors``); ``None`` otherwise (``vectors`` is then that sum).
        model_fingerprint: The fingerprint of the weights the updates were computed with
            ([`tl_thoughts.fingerprint.model_fingerprint`][]): [`check_model`][] refuses
            another model.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> import torch, tl_thoughts
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32,
        ...     n_ctx=32, d_vocab=50, act_fn="gelu", dtype=torch.float64, seed=0)
        >>> model = HookedTransformer(cfg)
        >>> updates = tl_thoughts.implicit_updates(model, torch.arange(10)[None], slice(2, 5))
        >>> updates.vectors.shape
        torch.Size([2, 5, 16])
    """

    tokens: Int[Tensor, "1 pos"]
    span: Span
    vectors: Float[Tensor, "layer kept d_model"]
    head_vectors: Float[Tensor, "layer kept head d_model"]
    chunk_attention: Float[Tensor, "layer kept head"]
    mlp_in: Float[Tensor, "layer kept d_model"] | None
    mlp_in_with_chunk: Float[Tensor, "layer kept d_model"] | None
    mlp_input_matrices: tuple[str, ...]
    positions: Int[Tensor, " kept"]
    layers: tuple[int, ...]
    n_blocks: int
    pre_norm_vectors: Float[Tensor, "layer kept d_model"] | None = None
    model_fingerprint: str | None = None
    _weights: dict[str, list[Tensor]] = field(repr=False, default_factory=dict)

    @property
    def chunk(self) -> slice:
        """The chunk as a slice of token positions (one chunk; see ``chunks`` for several)."""
        return self.span.as_slice()

    @property
    def chunks(self) -> list[slice]:
        """Every removed chunk as a slice of token positions."""
        return self.span.as_slices()

    @property
    def n_layers(self) -> int:
        """Number of blocks on the ``layer`` axis."""
        return self.vectors.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the updates were computed in."""
        return self.vectors.dtype

    @property
    def reduced_tokens(self) -> Int[Tensor, "1 T"]:
        """``[1, T]`` the prompt without the chunk(s): ``tokens[:, span.kept_positions]``. Run it
        under [`tl_thoughts.reduced_positions`][] (or [`tl_thoughts.run_reduced`][]) so that
        its tokens keep their original positions.

        Example:
            >>> updates.reduced_tokens.tolist()
            [[0, 1, 5, 6, 7, 8, 9]]
        """
        return self.tokens[:, self.span.kept_positions.to(self.tokens.device)]

    @property
    def reduced_rows(self) -> Int[Tensor, " kept"]:
        """``[kept]`` the rows of [`reduced_tokens`][] that hold ``positions`` (the ``kept`` axis):
        where [`hooks`][] add the vectors.

        Example:
            >>> updates.reduced_rows.tolist()
            [2, 3, 4, 5, 6]
        """
        return torch.searchsorted(self.span.kept_positions, self.positions.cpu())

    def hooks(self) -> list[tuple[str, Callable[[Tensor, object], Tensor]]]:
        """TransformerLens forward hooks ``(hook_name, fn)``, one per block of ``layers``: each adds
        the block's virtual weight vectors at ``blocks.{l}.hook_attn_out`` to the rows of the
        REDUCED prompt ([`reduced_tokens`][]) that hold the kept positions after the chunk
        ([`reduced_rows`][]), in every sequence of a batch. Pass them as ``fwd_hooks`` to
        ``model.run_with_hooks`` or ``model.hooks``.

        The reduced prompt must run with its tokens at their ORIGINAL positions, as in the full
        prompt: inside [`tl_thoughts.reduced_positions`][], or through
        [`tl_thoughts.run_reduced`][]. Run plainly, its tokens after the chunk move up by the
        chunk's length, and the run differs from the full one by more than the vectors carry.

        Example:
            >>> names = [name for name, fn in updates.hooks()]
            >>> names
            ['blocks.0.hook_attn_out', 'blocks.1.hook_attn_out']
            >>> with tl_thoughts.reduced_positions(model, updates) as reduced:
            ...     logits = model.run_with_hooks(reduced, fwd_hooks=updates.hooks())
            >>> full = model(updates.tokens)[0, updates.span.kept_positions]
            >>> bool((logits[0] - full).abs().max() < 1e-10)
            True
        """
        rows = self.reduced_rows.to(self.vectors.device)
        return [
            (_tl.attn_out_name(layer), _tl.add_at_rows_hook(rows, self.vectors[i]))
            for i, layer in enumerate(self.layers)
        ]

    def __repr__(self) -> str:
        what = "chunk" if self.span.n_chunks == 1 else f"{self.span.n_chunks} chunks"
        layers = (f"{self.n_blocks} layers" if self.layers == tuple(range(self.n_blocks))
                  else f"layers {list(self.layers)} of {self.n_blocks}")
        mlp = ", ".join(self.mlp_input_matrices) if self.mlp_input_matrices else "none (attention-only)"
        return (
            f"ImplicitUpdates({what} {self.span.describe()} of {self.span.n_pos} tokens; "
            f"{len(self.positions)} of {len(self.span.positions)} kept positions after it; {layers}; "
            f"d_model {self.vectors.shape[-1]}, {self.head_vectors.shape[2]} heads; "
            f"MLP matrices: {mlp}; {str(self.dtype).replace('torch.', '')})"
        )

    @property
    def is_complete(self) -> bool:
        """Whether every block and every kept position after the chunk is present."""
        return self.layers == tuple(range(self.n_blocks)) and torch.equal(
            self.positions.cpu(), self.span.positions
        )

    def require_complete(self, what: str) -> None:
        """Raise unless every block and kept position is present (``what`` needs them all)."""
        if not self.is_complete:
            raise InputError(
                f"{what} needs the updates of every block at every kept position; these were "
                f"computed for layers {list(self.layers)} and {len(self.positions)} of "
                f"{len(self.span.positions)} kept positions"
            )

    def check_model(self, model: Model) -> None:
        """Raise ``InputError`` unless ``model`` has the weights these updates were computed with
        (the same fingerprint; a float64 copy of the model has the float32 model's): updates of
        another model, or of this one with other weights (a patch applied or removed since, a
        fine-tuning step), would be compared with the wrong runs.

        Example:
            >>> updates.check_model(model)  # the model they were computed on: no error
        """
        if self.model_fingerprint is not None and self.model_fingerprint != model_fingerprint(model):
            raise InputError(
                "these updates were computed on another model, or on this one with other weights (a patch "
                "applied or removed, weights changed since): compute them again on this model "
                f"(updates' weights fingerprint {self.model_fingerprint[:12]}..., the model's "
                f"{model_fingerprint(model)[:12]}...)"
            )

    @torch.no_grad()
    def matrix_factors(
        self, name: str = "W_in"
    ) -> tuple[Float[Tensor, "layer kept d_model"], Float[Tensor, "layer kept d_mlp"]]:
        """The token-wise rank-1 virtual weight matrices of ``name`` as two stacks of vectors.

        ``dW[l, t] = outer(keys[l, t], values[l, t])`` with ``keys = a / ||a||^2`` and
        ``values = (a_C - a) @ W``, so that ``a @ (W + dW) = a_C @ W`` (THEORY 3). This is ROME's
        rank-1 key-value edit with key ``a``.

        Args:
            name: ``"W_in"`` or, for gated MLPs, ``"W_gate"``.

        Returns:
            ``(keys, values)``.

        Raises:
            UnsupportedArchitectureError: attention-only model (no MLP: vectors only).
            ZeroDenominatorError: some reduced MLP input ``a`` has zero norm.

        Example:
            >>> keys, values = updates.matrix_factors("W_in")
            >>> keys.shape, values.shape
            (torch.Size([2, 5, 16]), torch.Size([2, 5, 32]))
        """
        if not self.mlp_input_matrices:
            raise UnsupportedArchitectureError(
                "attention-only model: a chunk's implicit update is a vector only, there is no MLP "
                "matrix to patch"
            )
        if name not in self.mlp_input_matrices:
            raise InputError(f"name must be one of {self.mlp_input_matrices}, got {name!r}")
        assert self.mlp_in is not None and self.mlp_in_with_chunk is not None
        sq_norms = (self.mlp_in**2).sum(-1, keepdim=True)
        if bool((sq_norms == 0).any()):
            layer, row = (sq_norms[..., 0] == 0).nonzero()[0].tolist()
            raise ZeroDenominatorError(
                f"layer {self.layers[layer]}, position {int(self.positions[row])}: the reduced "
                "run's MLP input has zero norm, so no rank-1 patch of the MLP input matrix can "
                "reproduce the chunk there (the formula divides by its squared norm)"
            )
        keys = self.mlp_in / sq_norms
        diff = self.mlp_in_with_chunk - self.mlp_in
        values = torch.stack([diff[i] @ W.to(diff.dtype) for i, W in enumerate(self._weights[name])])
        return keys, values

    def matrices(self, name: str = "W_in") -> FactoredMatrix:
        """The virtual weight matrices of ``name`` as a TransformerLens ``FactoredMatrix`` of shape
        ``[layer, kept, d_model, d_mlp]`` and rank 1 (never materialised densely).

        See [`matrix_factors`][] for the definition and the errors raised.

        Example:
            >>> updates.matrices("W_in").shape
            torch.Size([2, 5, 16, 32])
        """
        keys, values = self.matrix_factors(name)
        return FactoredMatrix(keys[..., :, None], values[..., None, :])


def compute_dtype(model_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype updates are computed in: ``dtype`` if given (float32 or float64), else the
    model's, except for half-precision models, which get float32 and a [`PrecisionWarning`][].

    Example:
        >>> compute_dtype(torch.float32, None), compute_dtype(torch.float32, torch.float64)
        (torch.float32, torch.float64)
    """
    if dtype is not None:
        if dtype not in COMPUTE_DTYPES:
            raise InputError(f"dtype: updates are computed in float32 or float64, not {dtype!r}")
        return dtype
    if model_dtype in HALF:
        warnings.warn(
            f"the model is in {str(model_dtype).replace('torch.', '')}: tl_thoughts computes the "
            "updates in float32 (pass dtype=torch.float64 for the exact checks); the model itself "
            "is left in its dtype",
            PrecisionWarning,
            stacklevel=3,
        )
        return torch.float32
    return model_dtype


@torch.no_grad()
def implicit_updates(
    model: Model,
    tokens: Int[Tensor, "1 pos"] | Int[Tensor, " pos"] | str,
    chunk: ChunkSpec,
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | Int[Tensor, " n"] | None = None,
    dtype: torch.dtype | None = None,
) -> ImplicitUpdates:
    """Exact implicit updates of every block for removing ``chunk`` from the prompt.

    One run of the full prompt, streamed (no re-run per layer, no attention pattern kept). See
    [`ImplicitUpdates`][].

    Args:
        model: A HookedTransformer (not modified; it must have no hooks attached).
        tokens: The prompt, ``[1, pos]`` token ids or a string (tokenized with ``model.to_tokens``).
        chunk: A ``slice``/``range`` of positions or a substring of the prompt occurring once; or
            several chunks at once: a list of those, a list of positions, a boolean mask.
        layers: Only these blocks (default: all). The run stops after the last one.
        positions: Only these kept positions (prompt positions after the chunk; default: all).
        dtype: Compute in this dtype (float32 or float64; the model is run in it temporarily and
            restored). Default: the model's, float32 for float16/bfloat16 models (with a warning).

    Returns:
        The updates at the chosen layers and kept positions.

    Raises:
        ChunkError: empty chunk, out of range, nothing after it, overlapping chunks, substring not
            found or ambiguous.
        InputError: a batch (use [`implicit_updates_batch`][]), bad token ids, text without a
            tokenizer, hooks on the model, bad ``layers``/``positions``/``dtype``.
        UnsupportedArchitectureError: a config feature without an exact construction.
        ZeroDenominatorError: a head attends only to the chunk at some position.

    Example:
        >>> updates = tl_thoughts.implicit_updates(model, torch.arange(10)[None], slice(2, 5))
        >>> updates.vectors.shape  # [layer, kept, d_model]
        torch.Size([2, 5, 16])
        >>> tl_thoughts.implicit_updates(model, torch.arange(10)[None], [slice(1, 2), slice(4, 6)],
        ...     layers=[1], positions=[8, 9]).vectors.shape
        torch.Size([1, 2, 16])
    """
    spec = _tl.model_spec(model)
    _tl.check_no_hooks(model)
    tokens = resolve_tokens(model, tokens)
    span = resolve_chunk(model, tokens, chunk)
    job = _Job(row=0, idx=torch.arange(tokens.shape[1]), tokens=tokens, span=span,
               positions=_resolve_positions(span, positions))
    dtype = compute_dtype(spec.dtype, dtype)
    with _tl.computing_in(model, dtype):
        return _extract(model, tokens, None, [job], _resolve_layers(spec, layers))[0]


@torch.no_grad()
def implicit_updates_batch(
    model: Model,
    prompts: Sequence[str] | Sequence[Int[Tensor, " _"]] | Int[Tensor, "batch padded"],
    chunks: BatchChunkSpec,
    *,
    attention_mask: Int[Tensor, "batch padded"] | None = None,
    padding_side: str = "right",
    layers: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> list[ImplicitUpdates]:
    """[`implicit_updates`][] for a batch of prompts of different lengths, in one padded run.

    Each result is that of its prompt run alone (same tokens, positions counted in the prompt
    itself, not in the padded batch), up to floating-point rounding of the batched products.

    Args:
        model: A HookedTransformer (not modified; no hooks attached).
        prompts: Strings or 1-D token tensors (padded here on ``padding_side``), or an already
            padded ``[batch, pos]`` tensor with its ``attention_mask`` (left or right padding).
        chunks: One chunk specification per prompt (a list as long as the batch; an entry may
            itself be a list, for several chunks of that prompt), or a single slice, range or
            substring used for every prompt.
        attention_mask: ``[batch, pos]`` 1 on real tokens, 0 on padding, for a padded tensor.
        padding_side: ``"right"`` or ``"left"``, when the prompts are padded here.
        layers: Only these blocks (default: all).
        dtype: As in [`implicit_updates`][].

    Returns:
        One [`ImplicitUpdates`][] per prompt, in order.

    Raises:
        InputError: an empty batch, a mask of the wrong shape or that is not left or right
            padding, a chunk list of another length than the batch, bad token ids.
        ChunkError, UnsupportedArchitectureError, ZeroDenominatorError: as in
            [`implicit_updates`][], naming the prompt.

    Example:
        >>> batch = tl_thoughts.implicit_updates_batch(
        ...     model, [torch.arange(10), torch.arange(3, 9)], [slice(2, 5), slice(0, 2)],
        ...     padding_side="left")
        >>> tuple(u.vectors.shape[1] for u in batch)
        (5, 4)
    """
    spec = _tl.model_spec(model)
    _tl.check_no_hooks(model)
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    padded, mask, rows = _pad_batch(model, prompts, attention_mask, padding_side)
    if isinstance(chunks, (slice, range, str)):
        chunks = [chunks] * len(rows)
    if not isinstance(chunks, (list, tuple)) or len(chunks) != len(rows):
        raise InputError(
            f"chunks must be one chunk specification per prompt ({len(rows)} prompts), or one "
            "slice, range or substring for all"
        )
    jobs = []
    for i, (idx, (tokens, chunk)) in enumerate(zip(rows, zip(_row_tokens(model, padded, rows), chunks))):
        try:
            span = resolve_chunk(model, tokens, chunk)
        except ChunkError as e:
            raise ChunkError(f"prompt {i}: {e}") from None
        jobs.append(_Job(row=i, idx=idx, tokens=tokens, span=span, positions=span.positions))
    dtype = compute_dtype(spec.dtype, dtype)
    with _tl.computing_in(model, dtype):
        return _extract(model, padded, mask, jobs, _resolve_layers(spec, layers))


@torch.no_grad()
def updates_from_cache(
    model: Model,
    tokens: Int[Tensor, "1 pos"] | Int[Tensor, " pos"] | str,
    chunk: ChunkSpec | Span,
    cache: ActivationCache | Mapping[str, Tensor],
) -> ImplicitUpdates:
    """The arithmetic of [`implicit_updates`][] on the cache of a run of the full prompt that
    you already have: ``logits, cache = model.run_with_cache(tokens)``.

    Args:
        model: The model the cache was computed with (no hooks on that run; its weights unchanged
            since).
        tokens: The prompt of that run, as in [`implicit_updates`][] (``[1, pos]``, ``[pos]`` or
            a string).
        chunk: As in [`implicit_updates`][] (a slice, a range, a substring, several chunks), or
            a [`Span`][].
        cache: A TransformerLens ``ActivationCache`` of a batch of one (as ``run_with_cache``
            returns it, or after ``cache.remove_batch_dim()``), or a dict of the same tensors.
            It must hold, for every layer, ``attn.hook_pattern``, ``attn.hook_v``,
            ``attn.hook_z`` and (MLP models) ``hook_resid_mid`` (``hook_resid_pre`` for parallel
            blocks), and, in blocks with a post-attention norm, ``hook_attn_out``: a
            ``names_filter`` that keeps those is enough.

    Returns:
        The updates of every block at every kept position after the chunk, in the cache's dtype:
        the same as [`implicit_updates`][] up to rounding.

    Raises:
        InputError: the cache lacks a name, holds a batch of several prompts, or another length
            than ``tokens``.
        ChunkError, ZeroDenominatorError: as in [`implicit_updates`][].

    Example:
        >>> tokens = torch.arange(10)[None]
        >>> logits, cache = model.run_with_cache(tokens)
        >>> again = tl_thoughts.updates_from_cache(model, tokens, slice(2, 5), cache)
        >>> bool((again.vectors - updates.vectors).abs().max() < 1e-12)
        True
    """
    spec = _tl.model_spec(model)
    tokens = resolve_tokens(model, tokens)
    if isinstance(chunk, Span):
        span = chunk
        if span.n_pos != tokens.shape[1]:
            raise InputError(f"chunk: a Span of a {span.n_pos}-token prompt, but tokens has {tokens.shape[1]} tokens")
        check_window(model, span)  # as resolve_chunk does for the other chunk specifications
    else:
        span = resolve_chunk(model, tokens, chunk)
    acts = _cache_rows(spec, cache, tokens.shape[1])
    job = _Job(row=0, idx=torch.arange(span.n_pos), tokens=tokens, span=span, positions=span.positions)
    queries = job.positions.to(tokens.device)
    chunk_keys = span.chunk_mask.to(tokens.device)
    stats = []
    for layer in range(spec.n_layers):
        v = _tl.expand_kv_heads(spec, acts[_tl.v_name(layer)])
        pattern = acts[_tl.pattern_name(layer)]
        z_red, attention = _reduced(layer, pattern[:, queries.to(pattern.device)], v, chunk_keys.to(v.device), job)
        stats.append(_stats_from(spec, layer, acts, queries.to(v.device), z_red, attention))
    return _assemble(model, spec, job, tuple(range(spec.n_layers)), stats, model_fingerprint(model))


def _cache_rows(spec: _tl.ModelSpec, cache: ActivationCache | Mapping[str, Tensor], n_pos: int) -> dict[str, Tensor]:
    """The activations [`updates_from_cache`][] reads, without a batch axis, checked."""
    if not hasattr(cache, "keys") or not hasattr(cache, "__getitem__"):
        raise ArgumentTypeError(
            f"cache: expected an ActivationCache (model.run_with_cache) or a dict, got {type(cache).__name__}"
        )
    names = []
    for layer in range(spec.n_layers):
        names += [_tl.pattern_name(layer), _tl.v_name(layer), _tl.z_name(layer)]
        if spec.has_mlp:
            names.append(_tl.mlp_input_resid_name(spec, layer))
        if spec.attn_post_norm is not None:
            names.append(_tl.attn_out_name(layer))
    present = set(cache.keys())
    missing = [n for n in dict.fromkeys(names) if n not in present]
    if missing:
        shown = ", ".join(missing[:4]) + (f" ... ({len(missing)} names)" if len(missing) > 4 else "")
        raise InputError(f"cache lacks {shown}: run model.run_with_cache(tokens) without a names_filter, or with "
                         "one that keeps these")
    batched = cache[_tl.pattern_name(0)].ndim == 4  # [batch, head, query, key] or [head, query, key]
    acts = {}
    for name in dict.fromkeys(names):
        act = cache[name]
        if batched:
            if act.shape[0] != 1:
                raise InputError(
                    f"cache holds a batch of {act.shape[0]} prompts: updates_from_cache reads one (run_with_cache "
                    "on that prompt alone; implicit_updates_batch computes a batch)"
                )
            act = act[0]
        length = act.shape[1] if name.endswith("hook_pattern") else act.shape[0]
        if length != n_pos:
            raise InputError(f"cache is of a {length}-token run ({name}), but tokens has {n_pos} tokens")
        acts[name] = act.detach()
    return acts


# --- the streamed extraction ----------------------------------------------------------------------


@dataclass
class _Job:
    """One prompt of a run: its row in the (padded) batch, the batch positions of its tokens, its
    own tokens, its chunk and the kept positions asked for."""

    row: int
    idx: Int[Tensor, " n"]  # batch positions of the prompt's tokens, in order
    tokens: Int[Tensor, "1 n"]
    span: Span
    positions: Int[Tensor, " kept"]  # prompt positions of the kept axis

    def batch_rows(self, device) -> Int[Tensor, " kept"]:
        return self.idx.to(device)[self.positions.to(device)]


def _resolve_layers(spec: _tl.ModelSpec, layers: Sequence[int] | None) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(spec.n_layers))
    if isinstance(layers, int) or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers):
        raise InputError(f"layers must be a sequence of block indices, got {layers!r}")
    chosen = tuple(sorted(set(layers)))
    if not chosen or chosen[0] < 0 or chosen[-1] >= spec.n_layers:
        raise InputError(f"layers must be a non-empty subset of 0..{spec.n_layers - 1}, got {list(layers)}")
    return chosen


def _resolve_positions(span: Span, positions: Sequence[int] | Tensor | None) -> Int[Tensor, " kept"]:
    if positions is None:
        return span.positions
    chosen = torch.as_tensor(positions).cpu()
    if chosen.dtype.is_floating_point or chosen.dtype == torch.bool or chosen.ndim != 1 or not len(chosen):
        raise InputError(f"positions must be a non-empty list of prompt positions, got {positions!r}")
    chosen = torch.unique(chosen.long())  # sorted, deduplicated
    allowed = span.positions
    bad = [int(p) for p in chosen if not bool((allowed == p).any())]
    if bad:
        raise InputError(
            f"positions {bad} are not kept positions after the chunk ({span.describe()} removed "
            f"from a {span.n_pos}-token prompt): nothing changes before the chunk, and removed "
            "positions have no update"
        )
    return chosen


def _pad_batch(
    model: Model,
    prompts: Sequence[str] | Sequence[Tensor] | Tensor,
    attention_mask: Tensor | None,
    padding_side: str,
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], list[Int[Tensor, " n"]]]:
    """The padded batch, its mask, and each prompt's batch positions."""
    device = _tl.model_device(model)
    if isinstance(prompts, Tensor) and prompts.ndim == 2:
        mask = torch.ones_like(prompts) if attention_mask is None else attention_mask
        if not isinstance(mask, Tensor) or mask.shape != prompts.shape:
            raise InputError(
                f"attention_mask must have the tokens' shape {tuple(prompts.shape)}, got "
                f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise InputError("attention_mask must hold 0 (padding) and 1 (tokens) only")
        rows = []
        for i, m in enumerate(mask.bool().cpu()):
            idx = m.nonzero()[:, 0]
            if not len(idx):
                raise InputError(f"prompt {i} has no token (its attention_mask is all zeros)")
            if int(idx[-1] - idx[0]) + 1 != len(idx) or (idx[0] != 0 and idx[-1] != len(m) - 1):
                raise InputError(
                    f"prompt {i}: the attention_mask must be left or right padding (one block of "
                    "ones at the start or at the end of the row)"
                )
            rows.append(idx)
        return prompts.to(device).long(), mask.to(device).long(), rows
    if attention_mask is not None:
        raise InputError("attention_mask goes with a padded [batch, pos] tensor of tokens")
    if isinstance(prompts, (str, Tensor)) or not isinstance(prompts, Sequence):
        raise ArgumentTypeError("prompts must be a non-empty list of strings or 1-D token tensors, or a [batch, pos] "
                                f"tensor, got {type(prompts).__name__}")
    if not len(prompts):
        raise InputError("prompts must be a non-empty list of strings or 1-D token tensors, or a [batch, pos] tensor")
    seqs = []
    for i, p in enumerate(prompts):
        if isinstance(p, Tensor) and p.ndim != 1:
            raise InputError(f"prompt {i}: a 1-D token tensor is expected, got shape {tuple(p.shape)}")
        try:
            seqs.append(resolve_tokens(model, p)[0])
        except InputError as e:
            raise type(e)(f"prompt {i}: {e}") from None
    n = max(len(s) for s in seqs)
    padded = torch.zeros(len(seqs), n, dtype=torch.long, device=device)
    mask = torch.zeros_like(padded)
    rows = []
    for i, s in enumerate(seqs):
        lo = n - len(s) if padding_side == "left" else 0
        padded[i, lo : lo + len(s)] = s
        mask[i, lo : lo + len(s)] = 1
        rows.append(torch.arange(lo, lo + len(s)))
    return padded, mask, rows


def _row_tokens(model: Model, padded: Tensor, rows: list[Tensor]) -> list[Tensor]:
    out = []
    for i, idx in enumerate(rows):
        try:
            out.append(resolve_tokens(model, padded[i, idx.to(padded.device)][None]))
        except InputError as e:
            raise InputError(f"prompt {i}: {e}") from None
    return out


def _reduced(
    layer: int, pattern: Tensor, v: Tensor, chunk_keys: Tensor, job: _Job
) -> tuple[Tensor, Tensor]:
    """[`_math.reduced_attention`][] with the layer and prompt position in its error."""
    try:
        return _math.reduced_attention(pattern, v, chunk_keys)
    except ZeroDenominatorError:
        kept_mass = pattern[..., ~chunk_keys].sum(-1)  # [head, query]
        head, row = (kept_mass == 0).nonzero()[0].tolist()
        raise ZeroDenominatorError(
            f"layer {layer}, head {head} puts all of its attention on the chunk at position "
            f"{int(job.positions[row])}: the attention of the reduced prompt is undefined there "
            "(the kept keys' weights underflowed to zero). Try dtype=torch.float64, or a chunk "
            "that does not absorb the whole attention."
        ) from None


def _stats_from(
    spec: _tl.ModelSpec, layer: int, acts: dict[str, Tensor], rows: Tensor, z_red: Tensor, attention: Tensor
) -> dict[str, Tensor]:
    """What the assembly needs of one block, from the full run's activations ``acts`` (no batch
    axis) at the batch rows of the kept positions."""
    out = {"z_red": z_red, "attention": attention, "z": acts[_tl.z_name(layer)][rows]}
    if spec.has_mlp:
        out["resid"] = acts[_tl.mlp_input_resid_name(spec, layer)][rows]
    if spec.attn_post_norm is not None:
        out["attn_out"] = acts[_tl.attn_out_name(layer)][rows]
    return out


def _extract(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"] | None,
    jobs: list[_Job],
    layers: tuple[int, ...],
) -> list[ImplicitUpdates]:
    """One streamed run of the (padded) batch: each hooked block hands its activations to every
    job, which keeps only its kept rows and its reduced attention."""
    spec = _tl.model_spec(model)
    device = tokens.device
    chunk_keys = [job.span.chunk_mask.to(device) for job in jobs]
    query_rows = [job.batch_rows(device) for job in jobs]
    key_rows = [job.idx.to(device) for job in jobs]
    stats: list[dict[int, dict[str, Tensor]]] = [{layer: {} for layer in layers} for _ in jobs]
    pending: dict[int, dict[str, Tensor]] = {layer: {} for layer in layers}

    def keep(layer: int, act: Tensor, hook) -> None:
        pending[layer][hook.name] = act.detach()

    def reduce_attention(layer: int, pattern: Tensor, hook) -> None:
        v_all = pending[layer].pop(_tl.v_name(layer))
        for j, job in enumerate(jobs):
            p = pattern[job.row][:, query_rows[j]][:, :, key_rows[j]]  # [head, kept, n]
            v = _tl.expand_kv_heads(spec, v_all[job.row, key_rows[j]])  # [n, head, d_head]
            z_red, attention = _reduced(layer, p, v, chunk_keys[j], job)
            stats[j][layer].update(z_red=z_red, attention=attention)

    def finish(layer: int, act: Tensor, hook) -> None:
        pending[layer][hook.name] = act.detach()
        if _tl.z_name(layer) not in pending[layer] or (spec.has_mlp and mlp_name(layer) not in pending[layer]):
            return
        if spec.attn_post_norm is not None and _tl.attn_out_name(layer) not in pending[layer]:
            return
        acts = pending.pop(layer)
        for j, job in enumerate(jobs):
            rows = query_rows[j]
            per_row = {name: a[job.row] for name, a in acts.items()}
            s = stats[j][layer]
            s.update(_stats_from(spec, layer, per_row, rows, s["z_red"], s["attention"]))

    def mlp_name(layer: int) -> str:
        return _tl.mlp_input_resid_name(spec, layer)

    hooks = []
    for layer in layers:
        hooks.append((_tl.v_name(layer), lambda a, hook, l=layer: keep(l, a, hook)))
        hooks.append((_tl.pattern_name(layer), lambda a, hook, l=layer: reduce_attention(l, a, hook)))
        names = [_tl.z_name(layer)]
        if spec.has_mlp:
            names.append(mlp_name(layer))
        if spec.attn_post_norm is not None:
            names.append(_tl.attn_out_name(layer))
        for name in dict.fromkeys(names):
            hooks.append((name, lambda a, hook, l=layer: finish(l, a, hook)))
    stop = layers[-1] + 1 if layers[-1] + 1 < spec.n_layers else None
    _tl.run(model, tokens, mask, hooks, stop_at_layer=stop)
    weights = model_fingerprint(model)
    return [_assemble(model, spec, job, layers, [stats[j][l] for l in layers], weights) for j, job in enumerate(jobs)]


def _assemble(
    model: Model,
    spec: _tl.ModelSpec,
    job: _Job,
    layers: tuple[int, ...],
    stats: list[dict[str, Tensor]],
    weights_fingerprint: str,
) -> ImplicitUpdates:
    """Per-head vectors, block vectors and MLP inputs from each block's reduced attention."""
    heads, vectors, pre_norm, mlp_in, mlp_in_c = [], [], [], [], []
    for layer, s in zip(layers, stats):
        hv = _math.head_vectors(s["z"], s["z_red"], _tl.W_O(model, layer).detach())  # [kept, head, d]
        heads.append(hv)
        if spec.attn_post_norm is not None:
            # the block adds attn_post_norm(attention output): its change is a difference of norms
            reduced_out = _tl.attn_post_norm(model, layer, _tl.attn_output(model, layer, s["z_red"]))
            vectors.append(s["attn_out"] - reduced_out)
            pre_norm.append(hv.sum(1))
        else:
            vectors.append(hv.sum(1))
        if spec.has_mlp:
            a_c = _tl.mlp_norm(model, layer, s["resid"])
            # parallel blocks: the MLP reads resid_pre, which the chunk does not change at layer l
            a = a_c if spec.parallel_attn_mlp else _tl.mlp_norm(model, layer, s["resid"] - vectors[-1])
            mlp_in.append(a)
            mlp_in_c.append(a_c)
    weights: dict[str, list[Tensor]] = {
        name: [_tl.mlp_matrix(model, layer, name).detach() for layer in layers]
        for name in spec.mlp_input_matrices
    }
    return ImplicitUpdates(
        tokens=job.tokens,
        span=job.span,
        vectors=torch.stack(vectors),
        head_vectors=torch.stack(heads),
        chunk_attention=torch.stack([s["attention"] for s in stats]),
        mlp_in=torch.stack(mlp_in) if spec.has_mlp else None,
        mlp_in_with_chunk=torch.stack(mlp_in_c) if spec.has_mlp else None,
        mlp_input_matrices=spec.mlp_input_matrices,
        positions=job.positions.to(job.tokens.device),
        layers=layers,
        n_blocks=spec.n_layers,
        pre_norm_vectors=torch.stack(pre_norm) if pre_norm else None,
        model_fingerprint=weights_fingerprint,
        _weights=weights,
    )
