"""The stream engine: how prompts run through the model, written once for every method above the exact core.

Fitting ([`tl_thoughts.fit_thought`][]), refining ([`tl_thoughts.refine_thought`][]) and the
behavioural benchmark ([`tl_thoughts.evaluation`][]: verdicts, query answers, steering baselines,
layer search) all run their prompts through the pieces here; none re-implements them:

- [`pad_right`][] and [`length_batches`][]: right padding (exact under causal attention: a
  real position never sees a pad) and batches of similar lengths (the fewer pads, the less a batch
  computes);
- [`shared_stream_length`][] and [`SharedStream`][]: the first positions every prompt with the
  chunk shares (the template's prefix and the chunk), run once as one sequence whose keys and
  values every batch's attention reads (TransformerLens' key-value cache entries);
- [`StreamBatch`][]: a batch of examples streamed block by block, side by side: the prompts
  WITH the chunk, the reduced prompts (without it, under the patches fitted so far) and, for the
  steering record, the reduced prompts unpatched; [`finish_block`][] and
  [`finish_block_hidden`][] run a block's MLP half;
- [`fitted_rows`][], [`PromptRows`][] and [`prompt_rows`][]: the positions a fit reads,
  and the prompts with the chunk recorded there at every block (they depend on no patch, so they
  are computed once and read by several fits);
- [`SharedPrefix`][], [`run_to_end`][] and [`run_block_after`][]: forward passes to the
  residual stream after the last block (or one block), after a cached prefix that every prompt
  shares or after the cached positions of an earlier run;
- [`greedy_decode_cached`][] (TransformerLens' key-value cache, optionally recording the residual
  stream it ran through) and [`greedy_decode`][] (position-dependent hooks allowed), with
  [`row_logits`][].

Shapes: ``pos`` positions, ``rows`` recorded rows, ``layer1 = n_layers + 1`` (``resid_pre`` of
every block, then the residual after the last one).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import TransformerLensKeyValueCache, TransformerLensKeyValueCacheEntry

from tl_thoughts import _tl
from tl_thoughts._tl import Model
from tl_thoughts.errors import ArgumentTypeError, InputError, check_int, check_number
from tl_thoughts.templates import (
    POOLS,
    EncodedExample,
    Example,
    PromptTemplate,
    check_examples,
    default_template,
    encode_example,
    shared_prefix_length,
)

__all__ = [
    "BlockParts",
    "FittedRows",
    "PromptRows",
    "SharedPrefix",
    "SharedStream",
    "StreamBatch",
    "finish_block",
    "finish_block_hidden",
    "finish_block_parts",
    "fitted_rows",
    "greedy_decode",
    "greedy_decode_cached",
    "length_batches",
    "make_batches",
    "pad_right",
    "prompt_rows",
    "row_logits",
    "run_block_after",
    "run_to_end",
    "shared_stream_length",
    "unpatched_prefix",
]


# --- padding and batching -----------------------------------------------------------------------


def pad_right(seqs: Sequence[Tensor]) -> Tensor:
    """The sequences (token ids ``[pos]`` or residuals ``[pos, d_model]``) stacked with zeros on the
    right, on the first one's device and dtype: exact under causal attention, where a real position
    never sees a later one.

    Example:
        >>> pad_right([torch.tensor([1, 2, 3]), torch.tensor([4])]).tolist()
        [[1, 2, 3], [4, 0, 0]]
    """
    if len(seqs) == 0:
        raise InputError("pad_right needs at least one sequence")
    n = max(s.shape[0] for s in seqs)
    out = torch.zeros(len(seqs), n, *seqs[0].shape[1:], dtype=seqs[0].dtype, device=seqs[0].device)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s.to(out.device)
    return out


def length_batches(key: Callable[[int], object], indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """``indices`` sorted by ``key`` (a sequence's length, or a tuple of lengths; the given order
    kept among equal keys), cut in batches of ``batch_size``: the fewer padded positions, the less
    a batch computes.

    Example:
        >>> lengths = [5, 2, 9, 2]
        >>> length_batches(lambda i: lengths[i], range(4), 2)
        [[1, 3], [0, 2]]
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(indices, key=key)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# --- forward passes -----------------------------------------------------------------------------


def run_to_end(
    model: Model,
    x: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    prefix: TransformerLensKeyValueCache | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream after the last block (or before block ``stop_at_layer``) of right-padded
    tokens, or of a residual entering block ``start_at_layer``, as the model is (apply patches or
    hooks around the call). ``prefix``: a frozen one-sequence key-value cache
    (`tl_thoughts._tl.prefix_cache`) of tokens that come before every sequence of the batch,
    read and not run again.

    Example:
        >>> resid = run_to_end(model, model.to_tokens("Hello"))  # doctest: +SKIP
    """
    n_layers = model.cfg.n_layers
    stop = n_layers if stop_at_layer is None else min(stop_at_layer, n_layers)
    if start_at_layer is not None and start_at_layer >= stop:
        return x
    mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
    cache = None if prefix is None else _tl.broadcast_cache(prefix, x.shape[0])
    return model(x, start_at_layer=start_at_layer, stop_at_layer=stop, attention_mask=mask, past_kv_cache=cache)


class BlockParts(NamedTuple):
    """A block's MLP half ([`finish_block_parts`][]): ``resid_post``, the MLP's hidden activations
    (``mlp.hook_post``) and its output before the block's post-MLP norm, if any (``hook_mlp_out``
    otherwise: where ``b_out`` and ``W_out`` act)."""

    resid_post: Float[Tensor, "batch pos d_model"]
    hidden: Float[Tensor, "batch pos d_mlp"]
    mlp_out: Float[Tensor, "batch pos d_model"]


def _mlp_half(model, spec, layer, resid_pre, attn_out, mlp_patched, hidden) -> BlockParts:
    """Block ``layer``'s MLP half (the hidden activations only with ``hidden``; else None)."""
    mlp_resid = resid_pre if spec.parallel_attn_mlp else resid_pre + attn_out
    with _tl.swapped_tensors(model, mlp_patched or {}):
        mlp_in = _tl.mlp_norm(model, layer, mlp_resid)
        if hidden:
            mlp_out, post = _tl.block_mlp_hidden(model, layer, mlp_in)
        else:
            mlp_out, post = _tl.block_mlp(model, layer, mlp_in), None
        return BlockParts(resid_pre + attn_out + _tl.mlp_post_norm(model, layer, mlp_out), post, mlp_out)


def finish_block(
    model: Model,
    spec: _tl.ModelSpec,
    layer: int,
    resid_pre: Float[Tensor, "batch pos d_model"],
    attn_out: Float[Tensor, "batch pos d_model"],
    mlp_patched: dict[str, Tensor] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """``resid_post`` of block ``layer`` from its input and its (already patched) attention output
    (after the block's post-attention norm, if any: ``hook_attn_out``), the block's MLP parameters
    replaced for the call by ``mlp_patched`` (full values, by name); the MLP's post-norm, if any, is
    applied to its output.

    Example:
        >>> from tl_thoughts import _tl
        >>> tokens = torch.tensor([[1, 2, 3]])
        >>> x = _tl.embed(model, tokens)
        >>> attn, _ = _tl.block_attention(model, 0, x)
        >>> torch.allclose(finish_block(model, _tl.model_spec(model), 0, x, attn), run_to_end(model, tokens, stop_at_layer=1))
        True
    """
    if not spec.has_mlp:
        return resid_pre + attn_out
    return _mlp_half(model, spec, layer, resid_pre, attn_out, mlp_patched, hidden=False).resid_post


def finish_block_hidden(
    model: Model,
    spec: _tl.ModelSpec,
    layer: int,
    resid_pre: Float[Tensor, "batch pos d_model"],
    attn_out: Float[Tensor, "batch pos d_model"],
    mlp_patched: dict[str, Tensor] | None = None,
) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos d_mlp"]]:
    """[`finish_block`][] and the MLP's hidden activations (``mlp.hook_post``) it computed.

    Example:
        >>> from tl_thoughts import _tl
        >>> x = _tl.embed(model, torch.tensor([[1, 2, 3]]))
        >>> attn, _ = _tl.block_attention(model, 0, x)
        >>> resid, post = finish_block_hidden(model, _tl.model_spec(model), 0, x, attn)
        >>> tuple(post.shape)
        (1, 3, 32)
    """
    parts = finish_block_parts(model, spec, layer, resid_pre, attn_out, mlp_patched)
    return parts.resid_post, parts.hidden


def finish_block_parts(
    model: Model,
    spec: _tl.ModelSpec,
    layer: int,
    resid_pre: Float[Tensor, "batch pos d_model"],
    attn_out: Float[Tensor, "batch pos d_model"],
    mlp_patched: dict[str, Tensor] | None = None,
) -> BlockParts:
    """[`finish_block_hidden`][] and the MLP's output before the block's post-MLP norm
    ([`BlockParts`][]): what a ``W_out`` patch changes in a block with norms after its sublayers.

    Example:
        >>> from tl_thoughts import _tl
        >>> x = _tl.embed(model, torch.tensor([[1, 2, 3]]))
        >>> attn, _ = _tl.block_attention(model, 0, x)
        >>> parts = finish_block_parts(model, _tl.model_spec(model), 0, x, attn)
        >>> torch.equal(parts.resid_post, x + attn + parts.mlp_out)  # no post-MLP norm here
        True
    """
    if not spec.has_mlp:
        raise InputError("an attention-only block has no MLP hidden activations")
    return _mlp_half(model, spec, layer, resid_pre, attn_out, mlp_patched, hidden=True)


# --- the rows a fit reads -----------------------------------------------------------------------


class FittedRows(NamedTuple):
    """The positions (in the prompt with the chunk) a fit reads for one example: the pooled ones
    (weight 1: the thought vector's mean and the matrices' regressions), then the query positions
    the pool leaves out (the matrices' regressions only, weighted ``query_weight``)."""

    positions: Int[Tensor, " n"]
    weights: Float[Tensor, " n"]  # float64
    in_pool: Bool[Tensor, " n"]


def fitted_rows(example: EncodedExample, pool: str, query_weight: float) -> FittedRows:
    """The [`FittedRows`][] of ``example`` for ``pool`` (see ``EncodedExample.pooled``) and
    ``query_weight`` (0: no query row beyond the pool).

    Example:
        >>> rows = fitted_rows(encoded, "answer", 0.1)  # doctest: +SKIP
        >>> rows.positions[rows.in_pool]  # the pooled positions  # doctest: +SKIP
    """
    pos = example.pooled(pool)
    extra = pos[:0]
    if query_weight > 0:
        query = example.pooled("query")
        extra = query[~torch.isin(query, pos)]
    weights = torch.cat([torch.ones(len(pos), dtype=torch.float64),
                         torch.full((len(extra),), float(query_weight), dtype=torch.float64)])
    return FittedRows(torch.cat([pos, extra]), weights, torch.arange(len(pos) + len(extra)) < len(pos))


def shared_stream_length(encoded: Sequence[EncodedExample], rows: Sequence[FittedRows], prefix: int = 0) -> int:
    """How many first positions every prompt with the chunk shares, token for token (the
    template's prefix and the chunk), that a stream computes once for all ([`SharedStream`][]):
    up to every example's first fitted row, and none unless it covers the ``prefix`` first positions
    (an unpatched prefix, whose residuals the reduced stream copies from it).

    Example:
        >>> shared_stream_length(encoded, [fitted_rows(e, "answer", 0.0) for e in encoded])  # doctest: +SKIP
    """
    first_row = min((int(r.positions.min()) for r in rows if len(r.positions)), default=None)
    n = shared_prefix_length([e.full for e in encoded], upto=first_row)
    return n if n >= prefix else 0


@dataclass
class PromptRows:
    """The prompts WITH the chunk of some examples, streamed through every block, kept at the rows a
    fit reads ([`fitted_rows`][] for ``pool`` and ``query_weight``).

    They depend on no patch: fits of these examples plus others (the benchmark's seeds, whose fit
    rows share the answered queries) read them (``fit_thought(..., rows=...)``) instead of
    streaming these prompts again.

    Attributes:
        pool, query_weight: The fit options the rows were kept for.
        index: A prompt's tokens (``EncodedExample.full``, as a tuple) -> (first row, number of rows).
        positions: ``[rows]`` each row's position in its prompt.
        pre: ``[n_layers + 1, rows, d_model]`` ``resid_pre`` of every block, then the residual after
            the last one.
        attn: ``[n_layers, rows, d_model]`` every block's attention output before the block's
            post-attention norm, if it has one (``hook_attn_out`` otherwise): where ``b_O`` is added.
    """

    pool: str
    query_weight: float
    index: dict[tuple[int, ...], tuple[int, int]]
    positions: Int[Tensor, " rows"]
    pre: Float[Tensor, "layer1 rows d_model"]
    attn: Float[Tensor, "layer rows d_model"]

    def __repr__(self) -> str:
        return (f"PromptRows(prompts={len(self.index)}, rows={self.positions.shape[0]}, "
                f"blocks={self.attn.shape[0]}, d_model={self.pre.shape[-1]}, pool={self.pool!r}, "
                f"query_weight={self.query_weight}, dtype={self.pre.dtype})")

    def rows_of(self, full: Int[Tensor, " pos"]) -> Int[Tensor, " n"] | None:
        """The indices of the rows of the prompt ``full`` (its tokens with the chunk), or None
        where it is not held.

        Example:
            >>> rows.positions[rows.rows_of(encoded.full)]  # doctest: +SKIP
        """
        place = self.index.get(tuple(full.tolist()))
        return None if place is None else torch.arange(place[0], place[0] + place[1])

    @classmethod
    def assemble(
        cls, pool: str, query_weight: float, encoded: Sequence[EncodedExample], positions: Sequence[Tensor],
        parts: Sequence[tuple[Tensor, Tensor]],
    ) -> "PromptRows":
        """[`PromptRows`][] from each example's rows, in the examples' order: ``parts[i]`` holds
        ``encoded[i]``'s prompt with the chunk at its fitted positions ``positions[i]``
        (``resid_pre`` of every block then the residual after the last one, ``[n_layers + 1,
        rows, d_model]``, and every block's attention output before its post-attention norm, if
        any, ``[n_layers, rows, d_model]``).

        Raises:
            InputError: an example given twice (the same prompt with the chunk), or rows that are
                not its positions' number.
        """
        index, first = {}, 0
        for e, pos, (pre, attn) in zip(encoded, positions, parts, strict=True):
            if pre.shape[1] != len(pos) or attn.shape[1] != len(pos) or pre.shape[0] != attn.shape[0] + 1:
                raise InputError(f"an example's rows: {tuple(pre.shape)} and {tuple(attn.shape)} for {len(pos)} fitted rows")
            key = tuple(e.full.tolist())
            if key in index:
                raise InputError("an example is given twice (the same prompt with the chunk)")
            index[key] = (first, len(pos))
            first += len(pos)
        return cls(pool=pool, query_weight=float(query_weight), index=index, positions=torch.cat(list(positions)),
                   pre=torch.cat([p for p, _ in parts], dim=1), attn=torch.cat([a for _, a in parts], dim=1))

    def lookup(
        self, encoded: Sequence[EncodedExample], rows: Sequence[FittedRows], pool: str, query_weight: float,
        spec: _tl.ModelSpec,
    ) -> dict[int, Int[Tensor, " n"]]:
        """For each example of ``encoded`` whose prompt with the chunk these rows hold: the indices
        of its rows here (checked: the same fitted positions, fit options, blocks, width and dtype).

        Raises:
            InputError: rows kept for other options or another model, or at other positions.
        """
        if (self.pool, self.query_weight) != (pool, float(query_weight)):
            raise InputError(f"the prompt rows were kept for pool={self.pool!r}, query_weight={self.query_weight}; "
                             f"this fit reads pool={pool!r}, query_weight={query_weight}")
        n_pre, _, d = self.pre.shape
        if n_pre != self.attn.shape[0] + 1 or n_pre != spec.n_layers + 1 or d != spec.d_model \
                or self.pre.dtype != spec.dtype:
            raise InputError(f"the prompt rows ({n_pre - 1} blocks, d_model {d}, {self.pre.dtype}) are not this "
                             f"model's ({spec.n_layers} blocks, d_model {spec.d_model}, {spec.dtype})")
        found = {}
        for i, e in enumerate(encoded):
            idx = self.rows_of(e.full)
            if idx is None:
                continue
            if not torch.equal(self.positions[idx], rows[i].positions):
                raise InputError("the prompt rows of an example are not at the positions this fit reads")
            found[i] = idx
        return found


# --- streaming block by block -------------------------------------------------------------------


class SharedStream:
    """The ``length`` first positions every prompt with the chunk shares, streamed block by block as
    one sequence (``[1, length, d_model]``): each block's keys and values of these positions are
    read by every batch's attention (`tl_thoughts._tl.block_attention_kv`), so that they run
    once instead of once a prompt (the same values, to rounding)."""

    def __init__(self, resid: Float[Tensor, "1 shared d_model"]) -> None:
        self.resid = resid

    @property
    def length(self) -> int:
        return self.resid.shape[1]

    def step(self, model: Model, spec: _tl.ModelSpec, layer: int) -> "_tl.AllKeysValues | None":
        """Run block ``layer`` on the shared positions; return their keys and values at this block
        (None when nothing is shared)."""
        if not self.length:
            return None
        attn, _, kv = _tl.block_attention_kv(model, layer, self.resid)
        self.resid = finish_block(model, spec, layer, self.resid, attn)
        return kv


@dataclass
class StreamBatch:
    """Examples padded on the right, streamed block by block side by side ([`make_batches`][]).

    Attributes:
        full: ``[batch, pos - shared, d_model]`` the prompts WITH the chunk from position ``shared``
            on (None where their rows are given, ``given``).
        reduced: ``[batch, T, d_model]`` the prompts without the chunk (natural positions), under
            the patches fitted so far.
        base: ``[batch, T, d_model]`` the same, unpatched (the steering record), or None.
        rows_full, rows_reduced: (batch index, position) of the fitted rows in ``full`` and ``reduced``.
        in_pool: ``[n]`` which fitted rows are pooled; weights: ``[n]`` their weights (float64).
        given: the rows of ``full`` given ([`PromptRows`][]): ``resid_pre`` ``[n_layers + 1, n,
            d_model]`` and ``attn_out`` ``[n_layers, n, d_model]``, or None.
    """

    full: Float[Tensor, "batch pos d_model"] | None
    reduced: Float[Tensor, "batch T d_model"]
    base: Float[Tensor, "batch T d_model"] | None
    rows_full: tuple[Int[Tensor, " n"], Int[Tensor, " n"]]
    rows_reduced: tuple[Int[Tensor, " n"], Int[Tensor, " n"]]
    in_pool: Bool[Tensor, " n"]
    weights: Float[Tensor, " n"]
    given: tuple[Tensor, Tensor] | None = None

    @classmethod
    def make(
        cls, model: Model, encoded: Sequence[EncodedExample], rows: Sequence[FittedRows], shared: int,
        base: bool,
    ) -> tuple["StreamBatch", Float[Tensor, "1 shared d_model"]]:
        """The batch, its prompts with the chunk from position ``shared`` on
        ([`shared_stream_length`][]), each prompt up to its last fitted row (the later positions
        change no fitted row: causal attention), and the residual entering block 0 of the
        ``shared`` first positions, ``[1, shared, d_model]``."""
        bf, pf, pr, w, inside = [], [], [], [], []
        seq_full, seq_red = [], []
        for i, (ex, (pos, weights, in_pool)) in enumerate(zip(encoded, rows)):
            bf.append(torch.full_like(pos, i))
            pf.append(pos - shared)
            pr.append(ex.to_reduced(pos))
            w.append(weights)
            inside.append(in_pool)
            seq_full.append(ex.full[: int(pos.max()) + 1] if len(pos) else ex.full)
            seq_red.append(ex.reduced[: int(pr[-1].max()) + 1] if len(pos) else ex.reduced)
        full = _tl.embed(model, pad_right(seq_full))
        reduced = _tl.embed(model, pad_right(seq_red))
        dev = full.device
        rows_full = (torch.cat(bf).to(dev), torch.cat(pf).to(dev))
        rows_red = (rows_full[0], torch.cat(pr).to(dev))
        batch = cls(full[:, shared:], reduced, reduced.clone() if base else None, rows_full, rows_red,
                    torch.cat(inside).to(dev), torch.cat(w).to(dev))
        return batch, full[:1, :shared]


def make_batches(
    model: Model, encoded: Sequence[EncodedExample], rows: Sequence[FittedRows], batch_size: int,
    *, shared: int, base: bool, given: "PromptRows | None" = None, given_index: dict[int, Tensor] | None = None,
) -> tuple[list[list[int]], list[StreamBatch], SharedStream]:
    """The examples in [`StreamBatch`][] es of similar lengths ([`length_batches`][] on the
    prompts' lengths with, then without the chunk), those whose rows ``given`` holds
    (``given_index``, from [`PromptRows.lookup`][]) batched apart after the others, and the
    [`SharedStream`][] of their ``shared`` first positions. Returns the batches' example
    indices, the batches and the shared stream.

    Example:
        >>> from tl_thoughts.templates import PromptTemplate, encode_example
        >>> template = PromptTemplate("{chunk}{query}", separator="")
        >>> encoded = [encode_example(model, template, "the cat sat", ex) for ex in [(" a dog", " ran"), (" the mat", " sat on")]]
        >>> rows = [fitted_rows(e, "answer", 0.0) for e in encoded]
        >>> groups, batches, common = make_batches(model, encoded, rows, 1, shared=shared_stream_length(encoded, rows), base=False)
        >>> groups, common.length, tuple(batches[0].reduced.shape)
        ([[0], [1]], 3, (1, 2, 16))
    """
    given_index = given_index or {}

    def key(i: int) -> tuple[int, int]:
        return encoded[i].full.shape[0], encoded[i].reduced.shape[0]

    everything = range(len(encoded))
    groups = (length_batches(key, [i for i in everything if i not in given_index], batch_size)
              + length_batches(key, [i for i in everything if i in given_index], batch_size))
    made = [StreamBatch.make(model, [encoded[i] for i in g], [rows[i] for i in g], shared, base) for g in groups]
    batches = [b for b, _ in made]
    for g, b in zip(groups, batches):
        if g[0] in given_index:  # their rows, in the batch's order, on the model's device
            idx = torch.cat([given_index[i] for i in g])
            b.given = tuple(t[:, idx].to(b.reduced.device) for t in (given.pre, given.attn))
            b.full = None
    return groups, batches, SharedStream(made[0][1])


@torch.no_grad()
def prompt_rows(
    model: Model,
    chunk: str,
    examples: Sequence[Example],
    *,
    template: PromptTemplate | None = None,
    pool: str = "kept",
    query_weight: float = 0.0,
    batch_size: int = 16,
    share_prefix: bool = True,
) -> PromptRows:
    """[`PromptRows`][] of ``examples``: their prompts with the chunk streamed block by block as
    [`tl_thoughts.fit_thought`][] streams them (the positions every prompt shares run once, each
    prompt up to its last fitted row, batches of similar lengths), kept at the rows a fit with this
    ``pool`` and ``query_weight`` reads. A fit given them gives the patch it gives streaming those
    prompts itself, to floating-point rounding (``tests/test_thoughts.py``).

    Args:
        model: The model (no hooks may be attached).
        chunk: The chunk's text, as for [`tl_thoughts.fit_thought`][].
        examples: Queries or ``(query, answer)`` pairs, as for [`tl_thoughts.fit_thought`][].
        template: Where chunk and query go, as for [`tl_thoughts.fit_thought`][].
        pool: The fit's ``pool`` whose rows are kept.
        query_weight: The fit's ``query_weight`` whose rows are kept.
        batch_size: Prompts per forward pass.
        share_prefix: False runs every prompt whole, the positions they share included (the same
            rows, to rounding; slower).

    Raises:
        InputError: no examples, an example given twice, a bad option.

    Example:
        >>> rows = prompt_rows(model, "Answer in French.", ["cat", "dog"])  # doctest: +SKIP
        >>> patch = tl_thoughts.fit_thought(model, "Answer in French.", ["cat", "dog", "sun"], rows=rows)  # doctest: +SKIP
    """
    spec = _tl.model_spec(model)
    _tl.check_no_hooks(model)
    if pool not in POOLS:
        raise InputError(f"pool must be one of {POOLS}, got {pool!r}")
    check_number(query_weight, "query_weight")  # finite, >= 0
    check_int(batch_size, "batch_size", minimum=1)
    if not isinstance(chunk, str) or not chunk:
        raise ArgumentTypeError(f"chunk must be a non-empty string, got {chunk!r}")
    check_examples(examples)
    if template is not None and not isinstance(template, PromptTemplate):
        raise ArgumentTypeError(f"template must be a PromptTemplate or None, got {type(template).__name__}")
    template = template or default_template(model)
    encoded = [encode_example(model, template, chunk, ex) for ex in examples]
    rows = [fitted_rows(e, pool, query_weight) for e in encoded]
    shared = shared_stream_length(encoded, rows) if share_prefix else 0
    groups, batches, common = make_batches(model, encoded, rows, batch_size, shared=shared, base=False)
    pre: list[list[Tensor]] = [[] for _ in batches]
    attn: list[list[Tensor]] = [[] for _ in batches]
    for layer in range(spec.n_layers):
        kv = common.step(model, spec, layer)
        for j, b in enumerate(batches):
            attn_full, _, _ = _tl.block_attention_kv(model, layer, b.full, prefix=kv, normed=False)
            pre[j].append(b.full[b.rows_full])
            attn[j].append(attn_full[b.rows_full])
            b.full = finish_block(model, spec, layer, b.full, _tl.attn_post_norm(model, layer, attn_full))
    for j, b in enumerate(batches):
        pre[j].append(b.full[b.rows_full])
    parts: list[tuple[Tensor, Tensor] | None] = [None] * len(encoded)  # per example: its rows (resid_pre, attn_out)
    pre_b, attn_b = [torch.stack(p) for p in pre], [torch.stack(a) for a in attn]  # [layer(+1), rows of batch j, d]
    for j, g in enumerate(groups):
        lo = 0
        for i in g:
            hi = lo + len(rows[i].positions)
            parts[i] = (pre_b[j][:, lo:hi], attn_b[j][:, lo:hi])
            lo = hi
    return PromptRows.assemble(pool, query_weight, encoded, [r.positions for r in rows], parts)


# --- shared prefixes and forward passes after them ------------------------------------------------


class SharedPrefix(NamedTuple):
    """The first ``length`` tokens of every prompt of a batch (the same tokens in each), and their
    frozen key-value cache (TransformerLens' ``TransformerLensKeyValueCache``, one sequence): the
    positions after them run alone and read their keys and values ([`run_to_end`][],
    [`greedy_decode`][]), so they run once instead of once a prompt (the same values, to
    rounding). Unpacks as ``(length, cache)``."""

    length: int
    cache: TransformerLensKeyValueCache

    @classmethod
    def of(
        cls, model: Model, seqs: Sequence[Int[Tensor, " _pos"]], upto: int | None = None
    ) -> "SharedPrefix | None":
        """The tokens every one of ``seqs`` shares from its start (at most ``upto``, and at most
        one less than the shortest: [`shared_prefix_length`][tl_thoughts.templates.shared_prefix_length]), run
        through the model as it is now (no hook or patch should be attached); None when they
        share nothing.

        Example:
            >>> prefix = SharedPrefix.of(model, [e.full for e in encoded])  # doctest: +SKIP
            >>> final = run_to_end(model, pad_right([e.full[prefix.length:] for e in encoded]), prefix=prefix.cache)  # doctest: +SKIP
        """
        n = shared_prefix_length(seqs, upto=upto)
        return cls.first(model, seqs[0], n) if n else None

    @classmethod
    def first(cls, model: Model, tokens: Int[Tensor, " pos"], length: int) -> "SharedPrefix":
        """The first ``length`` tokens of ``tokens`` and their cache (the caller checks that every
        prompt starts with them)."""
        if not 0 < length <= tokens.shape[0]:
            raise InputError(f"a shared prefix of {length} tokens out of {tokens.shape[0]}")
        return cls(length, _tl.prefix_cache(model, tokens[None, :length]))


def unpatched_prefix(model: Model, seqs: Sequence[Int[Tensor, " _pos"]], k: int) -> SharedPrefix | None:
    """The [`SharedPrefix`][] of the first ``k`` tokens of every sequence: the positions a
    thought patch leaves unpatched (``ThoughtPatch.unpatched_positions``), run once unpatched for
    the patched positions to read. None for ``k = 0`` or no sequence.

    Raises:
        InputError: the sequences differ within their first ``k`` tokens (one cache cannot hold them).

    Example:
        >>> unpatched_prefix(model, [torch.tensor([1, 2, 3]), torch.tensor([1, 4, 5])], 1).length
        1
    """
    if not k or not seqs:
        return None
    if shared_prefix_length(seqs) < k:
        raise InputError(f"the patch leaves the first {k} position(s) unpatched, but the prompts' first {k} "
                         "tokens differ: one cache cannot hold them")
    return SharedPrefix.first(model, seqs[0], k)


def run_block_after(
    model: Model,
    stack: Float[Tensor, "batch pos d_model"],
    layer: int,
    kv: TransformerLensKeyValueCache,
    p: int,
    n: int,
) -> Float[Tensor, "batch pos d_model"]:
    """Block ``layer`` (none past the last) on ``stack``: copies of ``n`` sequences each (e.g. one
    candidate edit a copy), holding their positions from ``p`` on; the positions before ``p`` are
    read from ``kv``, the key-value cache of one run of the ``n`` sequences (the same for every
    copy; ``TransformerLensKeyValueCache`` filled by ``model(..., past_kv_cache=kv)``).

    Example:
        >>> after = run_block_after(model, edited, 5, kv, p=3, n=len(batch))  # doctest: +SKIP
    """
    if layer >= model.cfg.n_layers:
        return stack
    if p == 0:
        return run_to_end(model, stack, start_at_layer=layer, stop_at_layer=layer + 1)
    copies = stack.shape[0] // n
    entry = kv.entries[layer]
    keys, values = (t[:, :p].repeat(copies, *[1] * (t.dim() - 1)) for t in (entry.past_keys, entry.past_values))
    entry = TransformerLensKeyValueCacheEntry(keys, values, frozen=True)
    mask = torch.ones(stack.shape[0], p + stack.shape[1], dtype=torch.long, device=stack.device)
    # only this block's entry is read (start_at_layer=layer, stop_at_layer=layer + 1)
    cache = TransformerLensKeyValueCache([entry] * model.cfg.n_layers, mask[:, :p], frozen=True)
    return model(stack, start_at_layer=layer, stop_at_layer=layer + 1, attention_mask=mask, past_kv_cache=cache)


# --- greedy decoding ----------------------------------------------------------------------------

Keep = Callable[[int, list[int]], bool]  # keep(sequence index, tokens generated so far): go on?


def row_logits(
    model: Model, rows: Float[Tensor, "rows d_model"], unembed_weight: Float[Tensor, "d_vocab d_model"]
) -> Float[Tensor, "rows d_vocab"]:
    """The logits of residual rows after the last block: the final norm, then the unembedding.

    ``unembed_weight`` is ``model.W_U.T.contiguous()``, made once by the caller: TransformerLens'
    ``Unembed`` computes ``F.linear(x, W_U.T.contiguous(), b_U)``, copying the matrix at every
    call; the same product with a copy made once gives the same logits, bit for bit.

    Example:
        >>> tokens = torch.tensor([[1, 2, 3]])
        >>> torch.allclose(row_logits(model, run_to_end(model, tokens)[0], model.W_U.T.contiguous()), model(tokens)[0])
        True
    """
    return torch.nn.functional.linear(_tl.final_norm(model, rows), unembed_weight, model.b_U)


def _advance(i: int, token: int, generated: list[list[int]], stopped: list[bool], stops: Tensor, keep: Keep) -> bool:
    """One greedy step of sequence ``i``: a stop token ends it (``stopped[i]``); any other token is
    appended, and it goes on while ``keep`` holds. Returns whether it goes on."""
    if bool(stops[token]):
        stopped[i] = True
        return False
    generated[i].append(token)
    return keep(i, generated[i])


def greedy_decode(
    model: Model,
    prompts: Sequence[Int[Tensor, " _pos"]],
    starts: Sequence[list[int]],
    keep: Keep,
    stops: Bool[Tensor, " d_vocab"],
    unembed_weight: Float[Tensor, "d_vocab d_model"],
    hooks: Callable[[list[int]], list] | None = None,
    prefix: SharedPrefix | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Greedy decoding of a batch of prompts that may run under position-dependent hooks
    (right-padded, every step from the start: no key-value cache for the generated tokens), prompt
    ``i`` continued from the tokens ``starts[i]``: one token at a time, while no stop token comes
    and ``keep(i, tokens so far)`` holds. ``hooks(active indices)`` gives forward hooks for a step.
    ``prefix``: the prompts' first tokens (the same in every prompt) are not run, their keys and
    values read from its cache. Without hooks, [`greedy_decode_cached`][] is the faster path.

    Returns:
        The generated tokens (without the stop token) and whether each sequence ended on a stop token.

    Example:
        >>> stops = torch.zeros(model.cfg.d_vocab, dtype=torch.bool)
        >>> tokens, stopped = greedy_decode(model, [torch.tensor([1, 2, 3])], [[]], lambda i, g: len(g) < 4,
        ...                                 stops, model.W_U.T.contiguous())
        >>> len(tokens[0]), stopped
        (4, [False])
    """
    device = _tl.model_device(model)
    k, cache = prefix if prefix is not None else (0, None)
    generated = [list(p) for p in starts]
    stopped = [False] * len(prompts)
    active = list(range(len(prompts)))
    while active:
        seqs = [torch.cat([prompts[i], torch.tensor(generated[i], dtype=prompts[i].dtype)])[k:] for i in active]
        with _tl.hooked(model, hooks(active) if hooks else []):
            final = run_to_end(model, pad_right(seqs).to(device), prefix=cache)
        last = final[torch.arange(len(seqs)), torch.tensor([len(q) - 1 for q in seqs])]
        nxt = row_logits(model, last, unembed_weight).argmax(-1)
        active = [i for i, token in zip(active, nxt.tolist()) if _advance(i, token, generated, stopped, stops, keep)]
    return generated, stopped


Record = tuple[Float[Tensor, "layer1 pos d_model"], Float[Tensor, "layer pos d_model"]]


@torch.no_grad()
def greedy_decode_cached(
    model: Model,
    prompts: Sequence[Int[Tensor, " _pos"]],
    keep: Keep,
    stops: Bool[Tensor, " d_vocab"],
    unembed_weight: Float[Tensor, "d_vocab d_model"],
    batch_size: int | None = None,
    record_from: int | None = None,
    records: list[Record] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Greedy decoding with TransformerLens' key-value cache (``TransformerLensKeyValueCache``; no
    hooks): the first tokens every prompt shares run once ([`SharedPrefix`][]; a task's prompts
    with the chunk: the prefix and the chunk), then the prompts of one length run as one batch (no
    padding; at most ``batch_size`` sequences, a larger length group split evenly) from there, each
    prompt once, then one new token per step for the sequences still going: a finished sequence
    leaves the batch and its rows of the cache. The same decoding as [`greedy_decode`][] up to
    floating-point rounding (the cached step multiplies other shapes): a near tie between two
    tokens may break the other way (``tests/test_evaluation.py``).

    ``records`` (a list, with ``record_from``): appended, for each prompt, the residual stream it ran
    through, from position ``record_from`` to the last one run (the prompt, then every generated
    token but the last: the stop token, or the one ``keep`` refused): ``(resid_pre of every block
    then the residual after the last one [n_layers + 1, pos, d_model], every block's attention
    output before its post-attention norm, if any (``hook_attn_out`` otherwise; the norm's input
    rebuilt as its normalised input times its scale, to rounding) [n_layers, pos, d_model])``, as
    the run computes them ([`PromptRows`][]).

    Example:
        >>> prompts = [torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])]
        >>> stops, unembed = torch.zeros(model.cfg.d_vocab, dtype=torch.bool), model.W_U.T.contiguous()
        >>> keep = lambda i, g: len(g) < 4
        >>> greedy_decode_cached(model, prompts, keep, stops, unembed) == greedy_decode(
        ...     model, prompts, [[] for _ in prompts], keep, stops, unembed)
        True
    """
    device = _tl.model_device(model)
    generated: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(int(p.shape[0]), []).append(i)
    groups = []
    for same in by_length.values():
        k = 1 if batch_size is None else -(-len(same) // batch_size)  # parts of at most batch_size, as even as can be
        groups += [same[round(j * len(same) / k) : round((j + 1) * len(same) / k)] for j in range(k)]
    shared = shared_prefix_length(prompts)  # the first tokens every prompt shares (the prefix and the chunk) run once
    n_layers = model.cfg.n_layers
    pre_names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + [_tl.resid_post_name(n_layers - 1)]
    post = _tl.model_spec(model).attn_post_norm  # recorded before it: its input, normalised times scale
    attn_names = [_tl.norm_normalized_name(layer, post) if post else _tl.attn_out_name(layer) for layer in range(n_layers)]
    scale_names = [_tl.norm_scale_hook_name(layer, post) for layer in range(n_layers)] if post else []
    store: dict[str, Tensor] = {}

    def save(act, hook):
        store[hook.name] = act

    recording = records is not None
    if recording and record_from is None:
        raise InputError("records need record_from")
    hooks = [(name, save) for name in pre_names + attn_names + scale_names] if recording else []
    parts: list[list[tuple[Tensor, Tensor]]] = [[] for _ in prompts]

    def record(rows: list[int], first: int) -> None:
        """The rows just run (positions ``first`` on) of the sequences ``rows``."""
        pre, attn = torch.stack([store[n] for n in pre_names]), torch.stack([store[n] for n in attn_names])
        if scale_names:
            attn = attn * torch.stack([store[n] for n in scale_names])
        lo = max(0, record_from - first)
        if lo < pre.shape[2]:
            for r, i in enumerate(rows):
                parts[i].append((pre[:, r, lo:], attn[:, r, lo:]))

    prefix = None
    if shared:
        with _tl.hooked(model, hooks if recording and record_from < shared else []):
            prefix = SharedPrefix.first(model, prompts[0], shared).cache
        if recording and record_from < shared:  # the shared positions, the same rows in every sequence
            record([0], 0)
            parts = [list(parts[0]) for _ in prompts]
    with _tl.hooked(model, hooks):
        for group in groups:
            if prefix is None:
                cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(group))
            else:
                cache = _tl.broadcast_cache(prefix, len(group), frozen=False)
            x = torch.stack([prompts[i][shared:] for i in group]).to(device)
            first = shared
            while group:
                mask = torch.ones(x.shape, dtype=torch.long, device=device)
                final = model(x, stop_at_layer=model.cfg.n_layers, attention_mask=mask, past_kv_cache=cache)
                if recording:
                    record(group, first)
                first += x.shape[1]
                nxt = row_logits(model, final[:, -1], unembed_weight).argmax(-1)
                going = [r for r, i in enumerate(group) if _advance(i, int(nxt[r]), generated, stopped, stops, keep)]
                if going and len(going) < len(group):  # the finished sequences leave the batch and the cache
                    rows = torch.tensor(going, device=device)
                    for entry in cache.entries:
                        entry.past_keys, entry.past_values = entry.past_keys[rows], entry.past_values[rows]
                    cache.previous_attention_mask = cache.previous_attention_mask[rows]
                    nxt = nxt[rows]
                group = [group[r] for r in going]
                x = nxt[:, None]
    if recording:
        d, dtype = model.cfg.d_model, model.cfg.dtype
        for seq in parts:  # no position from record_from on: no rows
            seq = seq or [(torch.zeros(n_layers + 1, 0, d, dtype=dtype, device=device),
                           torch.zeros(n_layers, 0, d, dtype=dtype, device=device))]
            records.append((torch.cat([p for p, _ in seq], dim=1), torch.cat([a for _, a in seq], dim=1)))
    return generated, stopped
