"""The steering baselines (THEORY 5): the mean residual differences and task vectors they are
fitted from ([`DifferenceSums`][], [`difference_sums`][]), their hooks and residual edits,
and the layer search that places them ([`best_layers`][], its example groups
[`search_groups`][])."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import TransformerLensKeyValueCache

from tl_thoughts import _tl
from tl_thoughts._tl import Model
from tl_thoughts.errors import InputError
from tl_thoughts.evaluation.config import BASELINES, EvalConfig
from tl_thoughts.evaluation.examples import TaskExample, encode_task_example, n_positions_read
from tl_thoughts.evaluation.verdicts import HookFactory, teacher_forced_verdicts
from tl_thoughts.tasks import Task
from tl_thoughts.templates import shared_prefix_length
from tl_thoughts.stream import PromptRows, SharedPrefix, length_batches, pad_right, run_block_after, run_to_end


def shared_full_length(examples: list[TaskExample], pool: str) -> int:
    """How many first positions the examples' prompts with the chunk share, up to the first one read.

    [`shared_prefix_length`][tl_thoughts.templates.shared_prefix_length] of the prompts with the chunk, up to the
    first position [`difference_sums`][] reads (pooled or last prompt position): the positions
    it runs once, into a key-value cache.

    Example:
        >>> shared_full_length(encode_task_examples(model, task, range(20)), "answer")  # doctest: +SKIP
        25
    """
    first_read = min(min([e.last_prompt_full] + e.enc.pooled(pool).tolist()) for e in examples)
    return shared_prefix_length([e.enc.full for e in examples], upto=first_read)


@dataclass
class DifferenceSums:
    """The steering baselines' sums over some examples ([`difference_sums`][]).

    Of ``resid(full) - resid(reduced)`` over their pooled positions at ``blocks.0.hook_resid_pre``
    then every ``blocks.{l}.hook_resid_post`` (``diff``, ``[n_layers + 1, d_model]``, over
    ``n_positions``), and of the full run's ``resid_post`` at the last prompt position (``task``,
    ``[n_layers, d_model]``, over ``n_examples``), float64. Sums over disjoint sets of examples add
    up (``+``) to the sums over their union: the answered queries' part, the same in every seed, is
    computed once a task ([`query_difference_sums`][]).

    Attributes:
        diff: ``[n_layers + 1, d_model]``: the sum of the differences over the pooled positions.
        n_positions: The pooled positions summed over.
        task: ``[n_layers, d_model]``: the sum of the full runs' residuals at the last prompt position.
        n_examples: The examples summed over.

    Example:
        >>> sums = difference_sums(model, fit_examples, "answer", 64) + query_sums  # doctest: +SKIP
        >>> deltas, task_vectors = sums.means()  # doctest: +SKIP
    """

    diff: Float[Tensor, "layer1 d_model"]
    n_positions: int
    task: Float[Tensor, "layer d_model"]
    n_examples: int

    def __add__(self, other: "DifferenceSums") -> "DifferenceSums":
        return DifferenceSums(self.diff + other.diff, self.n_positions + other.n_positions,
                              self.task + other.task, self.n_examples + other.n_examples)

    def means(self) -> tuple[Float[Tensor, "layer1 d_model"], Float[Tensor, "layer d_model"]]:
        """The mean differences and the task vectors ([`mean_differences`][])."""
        if self.n_positions == 0 or self.n_examples == 0:
            raise InputError("no pooled position to average the steering baselines over")
        return self.diff / self.n_positions, self.task / self.n_examples


@torch.no_grad()
def difference_sums(
    model: Model, examples: list[TaskExample], pool: str, batch_size: int, full_rows: PromptRows | None = None
) -> DifferenceSums:
    """[`DifferenceSums`][] over ``examples`` (none: zero sums). The positions every prompt with
    the chunk shares (the prefix and the chunk) run once, their keys and values read by every batch
    from TransformerLens' key-value cache. ``full_rows``: [`tl_thoughts.stream.PromptRows`][]
    holding every example's prompt with the chunk at its ``pool`` positions and its last prompt
    position ([`query_full_rows`][] of the same queries): the sums with the chunk are read from
    them instead of run (the same sums up to floating-point rounding).

    Example:
        >>> fit_part = difference_sums(model, encode_task_examples(model, task, range(20)), "answer", 64)  # doctest: +SKIP
        >>> deltas, task_vectors = (fit_part + query_difference_sums(model, task, queries, config)).means()  # doctest: +SKIP
    """
    n_layers = model.cfg.n_layers
    names = ["blocks.0.hook_resid_pre"] + [_tl.resid_post_name(layer) for layer in range(n_layers)]
    diff = torch.zeros(n_layers + 1, model.cfg.d_model, dtype=torch.float64)
    task = torch.zeros(n_layers, model.cfg.d_model, dtype=torch.float64)
    n_pos = 0
    if not examples:
        return DifferenceSums(diff, 0, task, 0)
    device = _tl.model_device(model)
    read = _rows_read(full_rows, examples, pool)
    shared = shared_full_length(examples, pool) if read is None else 0
    prefix = SharedPrefix.first(model, examples[0].enc.full, shared).cache if shared else None
    if read is not None:  # the prompts with the chunk: their rows given
        pooled_rows, last_rows = (torch.cat(rows) for rows in zip(*read))
        diff += full_rows.pre[:, pooled_rows].double().sum(1)
        task += full_rows.pre[1:, last_rows].double().sum(1)
    # batches of examples of similar lengths: the fewer padded positions, the less each batch computes
    for group in length_batches(lambda i: (examples[i].enc.full.shape[0], examples[i].enc.reduced.shape[0]),
                                range(len(examples)), batch_size):
        batch = [examples[i] for i in group]
        pooled = [e.enc.pooled(pool) for e in batch]
        in_batch = torch.cat([torch.full_like(p, i) for i, p in enumerate(pooled)])
        pooled_full = (in_batch, torch.cat(pooled) - shared)  # the full prompts run from position ``shared``
        reduced_pos = [e.enc.to_reduced(p) for e, p in zip(batch, pooled)]
        pooled_reduced = (in_batch, torch.cat(reduced_pos))
        last_full = (torch.arange(len(batch)), torch.tensor([e.last_prompt_full - shared for e in batch]))
        picked = {}
        # each prompt up to the last position read (the later ones change nothing read: causal attention)
        ends = {"full": [max([e.last_prompt_full] + p.tolist()) + 1 for e, p in zip(batch, pooled)],
                "reduced": [max([0] + r.tolist()) + 1 for r in reduced_pos]}
        runs = (("full", shared, (pooled_full, last_full)), ("reduced", 0, (pooled_reduced,)))
        for which, skip, rows in runs[1:] if read is not None else runs:
            tokens = pad_right([getattr(e.enc, which)[skip:end] for e, end in zip(batch, ends[which])]).to(device)
            store: dict[str, list[Tensor]] = {}

            def save(act, hook, store=store, rows=rows):  # the rows read, not every position
                store[hook.name] = [act[r].detach().double().cpu() for r in rows]

            with _tl.hooked(model, [(name, save) for name in names]):
                run_to_end(model, tokens, prefix=prefix if skip else None)
            picked[which] = [torch.stack([store[name][k] for name in names]) for k in range(len(rows))]  # [L+1, n, d]
        (reduced,) = picked["reduced"]
        if read is None:
            (full, last) = picked["full"]
            diff += (full - reduced).sum(1)
            task += last[1:].sum(1)
        else:  # the sums with the chunk were added above
            diff -= reduced.sum(1)
        n_pos += reduced.shape[1]
    return DifferenceSums(diff, n_pos, task, len(examples))


def _rows_read(full_rows: PromptRows | None, examples: list[TaskExample], pool: str) -> list[tuple[Tensor, Tensor]] | None:
    """Where ``full_rows`` holds every example's prompt with the chunk at its ``pool`` positions and
    its last prompt position: per example, the indices of those rows (pooled, last); else None."""
    if full_rows is None or full_rows.pool != pool:
        return None
    read = []
    for e in examples:
        idx = full_rows.rows_of(e.enc.full)
        if idx is None:
            return None
        positions, pooled = full_rows.positions[idx], e.enc.pooled(pool)
        last = (positions == e.last_prompt_full).nonzero()
        if not torch.equal(positions[: len(pooled)], pooled) or len(last) == 0:
            return None
        read.append((idx[: len(pooled)], idx[last[0]]))
    return read


def mean_differences(
    model: Model, examples: list[TaskExample], pool: str, batch_size: int
) -> tuple[Float[Tensor, "layer1 d_model"], Float[Tensor, "layer d_model"]]:
    """The mean residual differences and the task vectors of some examples.

    The mean over the examples' pooled positions of ``resid(full) - resid(reduced)`` at
    ``blocks.0.hook_resid_pre`` then every ``blocks.{l}.hook_resid_post`` (``[n_layers + 1, d]``),
    and the task vectors: mean full-run ``resid_post`` at the last prompt position
    (``[n_layers, d]``) ([`difference_sums`][], [`DifferenceSums.means`][]).

    Example:
        >>> deltas, task_vectors = mean_differences(model, fit_examples, "answer", 64)  # doctest: +SKIP
    """
    return difference_sums(model, examples, pool, batch_size).means()


def query_difference_sums(
    model: Model, task: Task, queries: Sequence[tuple[str, str]], config: EvalConfig,
    query_rows: PromptRows | None = None,
) -> DifferenceSums | None:
    """The answered queries' part of the steering baselines' sums ([`DifferenceSums`][]).

    The same in every seed (the seeds differ in their fit examples only): the ``query_sums`` of
    [`tl_thoughts.evaluation.TaskInputs`][]. None where ``config`` runs no steering baseline.
    ``query_rows``: the queries' [`tl_thoughts.evaluation.query_full_rows`][], if computed: the
    sums with the chunk are read from them ([`difference_sums`][]).

    Example:
        >>> queries = query_answers(model, task, config.n_queries)  # doctest: +SKIP
        >>> sums = query_difference_sums(model, task, queries, config)  # doctest: +SKIP
    """
    if not set(BASELINES) & set(config.methods):
        return None
    with _tl.linear_layout(model):
        rows = [encode_task_example(model, task, q, a) for q, a in queries]
        return difference_sums(model, rows, config.pool, config.batch_size, query_rows)


def region_start(examples: list[TaskExample]) -> int:
    """The first position after the chunk's place in the prompts without the chunk.

    The same for every example of a task: the template puts the chunk at a fixed place.

    Raises:
        InputError: The examples' chunks start at different positions.

    Example:
        >>> region_start(encode_task_examples(model, task, range(20)))  # doctest: +SKIP
        1
    """
    starts = {e.enc.start for e in examples}
    if len(starts) != 1:
        raise InputError("the chunk must start at the same token position in every prompt of a task")
    return starts.pop()


def _add_from(start: int, vector: Tensor) -> Callable:
    def hook(act, hook):
        act = act.clone()
        act[:, start:] += vector.to(act.dtype)
        return act

    return hook


def steering_hooks(deltas: Float[Tensor, "layer1 d_model"], layers: Sequence[int], start: int) -> HookFactory:
    """Hooks adding the mean residual difference after each block of ``layers``.

    The difference after block ``l`` is ``deltas[l + 1]``, added at every position from ``start``
    on, in runs without the chunk (the ``steering_best_layer`` method).

    Example:
        >>> make = steering_hooks(torch.zeros(3, 16), [1], start=2)
        >>> ", ".join(name for name, _ in make([], False))
        'blocks.1.hook_resid_post'
    """

    def make(batch, with_chunk):
        return [(_tl.resid_post_name(layer), _add_from(start, deltas[layer + 1])) for layer in layers]

    return make


def all_layer_steering_hooks(deltas: Float[Tensor, "layer1 d_model"], start: int) -> HookFactory:
    """Hooks adding, at every block, the increment of the mean residual difference.

    ``deltas[l+1] - deltas[l]`` after block ``l``, plus ``deltas[0]`` on the embeddings (where it
    is not zero), at every position from ``start`` on: the vectors add up to ``deltas[l+1]`` after
    block ``l`` (the ``steering_all_layers`` method).

    Example:
        >>> make = all_layer_steering_hooks(torch.zeros(3, 16), start=2)
        >>> ", ".join(name for name, _ in make([], False))
        'blocks.0.hook_resid_post, blocks.1.hook_resid_post'
    """
    n_layers = deltas.shape[0] - 1

    def make(batch, with_chunk):
        hooks = [("blocks.0.hook_resid_pre", _add_from(start, deltas[0]))] if bool(deltas[0].any()) else []
        hooks += [
            (_tl.resid_post_name(layer), _add_from(start, deltas[layer + 1] - deltas[layer]))
            for layer in range(n_layers)
        ]
        return hooks

    return make


def task_vector_hooks(vectors: Float[Tensor, "layer d_model"], layer: int) -> HookFactory:
    """Hooks writing a task vector over the residual stream after block ``layer``.

    ``vectors[layer]`` replaces the residual at each prompt's last position (the one predicting
    the answer), in runs without the chunk (the ``task_vector`` method).

    Example:
        >>> make = task_vector_hooks(torch.zeros(2, 16), 1)
        >>> ", ".join(name for name, _ in make([], False))
        'blocks.1.hook_resid_post'
    """

    def make(batch, with_chunk):
        rows = torch.arange(len(batch))
        cols = torch.tensor([e.last_prompt_reduced for e in batch])

        def hook(act, hook):
            act = act.clone()
            act[rows, cols] = vectors[layer].to(act.dtype)
            return act

        return [(_tl.resid_post_name(layer), hook)]

    return make


@dataclass(frozen=True)
class ResidEdit:
    """A residual edit of [`best_layers`][].

    Attributes:
        apply: ``apply(layer, resid_after_block_layer [batch, pos, d_model], batch)`` returns the
            edited residual (it may edit in place), changing no position before ``first(batch)``.
        first: ``first(batch)``: the first position the edit may change.

    Example:
        >>> edit = steering_edit(torch.ones(3, 4), start=2)
        >>> edit.apply(0, torch.zeros(1, 3, 4), [])[0, :, 0], edit.first([])
        (tensor([0., 0., 1.]), 2)
    """

    apply: Callable[[int, Tensor, list[TaskExample]], Tensor]
    first: Callable[[list[TaskExample]], int]


# a group's fixed cost in search_groups, in positions run (its calls, its copies of the cache)
SEARCH_GROUP_COST = 48


def steering_edit(deltas: Tensor, start: int) -> ResidEdit:
    """The residual edit of [`steering_hooks`][] for the layer search.

    After block ``layer``, ``deltas[layer + 1]`` is added at every position from ``start`` on.

    Example:
        >>> edit = steering_edit(torch.ones(3, 4), start=2)
        >>> edit.apply(1, torch.zeros(1, 3, 4), [])[0, :, 0]
        tensor([0., 0., 1.])
    """

    def edit(layer: int, x: Tensor, batch: list[TaskExample]) -> Tensor:
        x[:, start:] += deltas[layer + 1].to(x.dtype)
        return x

    return ResidEdit(edit, lambda batch: start)


def task_vector_edit(vectors: Tensor) -> ResidEdit:
    """The residual edit of [`task_vector_hooks`][] for the layer search.

    After block ``layer``, ``vectors[layer]`` replaces the residual at each prompt's last position.

    Example:
        >>> edit = task_vector_edit(task_vectors)  # doctest: +SKIP
        >>> edit.first(batch) == min(e.last_prompt_reduced for e in batch)  # doctest: +SKIP
        True
    """

    def edit(layer: int, x: Tensor, batch: list[TaskExample]) -> Tensor:
        x[torch.arange(len(batch)), torch.tensor([e.last_prompt_reduced for e in batch])] = vectors[layer].to(x.dtype)
        return x

    return ResidEdit(edit, lambda batch: min(e.last_prompt_reduced for e in batch))


@torch.no_grad()
def best_layers(
    model: Model, fit_set: list[TaskExample], edits: dict[str, ResidEdit], stops, batch_size: int,
    *, group_cost: int = SEARCH_GROUP_COST,
) -> dict[str, tuple[int, list[float], list[float]]]:
    """For each named residual edit, the layer whose edit does best on the fit examples.

    Without the chunk, by accuracy, then mean log-probability (at the token level, a ranking),
    then the lower layer; with the accuracy and mean log-probability of every layer's edit.

    Every candidate runs from the cached residual after its block, not from the start, and the
    candidates run together, staggered: block ``k`` runs once on the stack of every candidate
    edited below it (the same products as one run per candidate, in ``n_layers`` calls instead of
    ``n_layers^2 / 2``). The positions before an edit's first one ([`ResidEdit`][]), which no
    edit changes (causal attention), do not run again: a candidate's block reads their keys and
    values from the unedited run, as TransformerLens' key-value cache holds them. The fit examples
    run in groups of similar lengths ([`search_groups`][], at ``group_cost``); the means are
    taken in the examples' order, whatever the groups.

    Returns:
        ``{name: (best layer, accuracy per layer [n_layers], mean log-probability per layer [n_layers])}``.

    Example:
        >>> edits = {"steering": steering_edit(deltas, region_start(fit_set))}  # doctest: +SKIP
        >>> layer, accuracy, logprob = best_layers(model, fit_set, edits, stop_tokens(model), 64)["steering"]  # doctest: +SKIP
    """
    n_layers = model.cfg.n_layers
    device = _tl.model_device(model)
    unembed_weight = model.W_U.T.contiguous()
    names = [_tl.resid_post_name(layer) for layer in range(n_layers)]
    scores = {(e, layer): ({}, {}) for e in edits for layer in range(n_layers)}  # by example: right, logprob
    group = max(1, batch_size // 2)  # the stack holds up to len(edits) * n_layers * group sequences
    for indices in search_groups(fit_set, edits, group, group_cost=group_cost):
        batch = [fit_set[i] for i in indices]
        seqs = [e.enc.reduced for e in batch]
        store: dict[str, Tensor] = {}

        def save(act, hook, store=store):
            store[hook.name] = act.detach().clone()

        tokens = pad_right([s[:n_positions_read(e, s)] for e, s in zip(batch, seqs)]).to(device)
        kv = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(batch))  # filled by the run
        with _tl.hooked(model, [(name, save) for name in names]):
            model(tokens, stop_at_layer=n_layers, attention_mask=torch.ones_like(tokens), past_kv_cache=kv)
        # the edits by their first position (never after the first one the verdicts read)
        first_read = min(e.last_prompt_reduced for e in batch)
        by_first: dict[int, list[str]] = {}
        for name, edit in edits.items():
            by_first.setdefault(max(0, min(edit.first(batch), first_read)), []).append(name)
        order = {p: [] for p in by_first}
        stacks: dict[int, Tensor | None] = {p: None for p in by_first}
        for layer in range(n_layers):
            for p, family in by_first.items():
                new = []
                for name in family:
                    before = store[names[layer]]
                    edited = edits[name].apply(layer, before.clone(), batch)
                    if not torch.equal(edited[:, :p], before[:, :p]):
                        raise RuntimeError(f"the edit {name!r} changes positions before its first one ({p})")
                    new.append(edited[:, p:])
                order[p] += [(name, layer) for name in family]
                stack = torch.cat(([] if stacks[p] is None else [stacks[p]]) + new)
                stacks[p] = run_block_after(model, stack, layer + 1, kv, p, len(batch))
        for p, keys in order.items():
            for i, key in enumerate(keys):
                final = stacks[p][i * len(batch) : (i + 1) * len(batch)]
                if p:  # the rows before p, never read: the verdicts' positions line up
                    final = torch.cat([final.new_zeros(len(batch), p, final.shape[-1]), final], dim=1)
                r, lp, _ = teacher_forced_verdicts(model, batch, seqs, final, stops, unembed_weight)  # token level: a ranking
                for i, right, logprob in zip(indices, r, lp):
                    scores[key][0][i], scores[key][1][i] = right, logprob
    best = {}
    for name in edits:
        # means in the examples' order, whatever the groups
        accuracy = [float(np.mean([scores[name, layer][0][i] for i in range(len(fit_set))])) for layer in range(n_layers)]
        logprob = [float(np.mean([scores[name, layer][1][i] for i in range(len(fit_set))])) for layer in range(n_layers)]
        layer = max(range(n_layers), key=lambda layer: (accuracy[layer], logprob[layer], -layer))
        best[name] = (layer, accuracy, logprob)
    return best


def search_groups(
    examples: list[TaskExample], edits: dict[str, ResidEdit], most: int, *, group_cost: int = SEARCH_GROUP_COST
) -> list[list[int]]:
    """The examples of [`best_layers`][] (their indices) in groups of similar lengths.

    Groups of at most ``most``, sorted by the positions the verdicts read, cut where the positions
    each edit's candidates run (padding included: every sequence runs to its group's longest) plus
    ``group_cost`` a group (default [`SEARCH_GROUP_COST`][]) are fewest (dynamic programming
    over the cuts).

    Example:
        >>> search_groups(fit_set, {"steering": steering_edit(deltas, 1)}, 32)  # doctest: +SKIP
        [[3, 0, 7], [1, 2, 4, 5, 6]]
    """
    order = sorted(range(len(examples)), key=lambda i: (n_positions_read(examples[i], examples[i].enc.reduced),
                                                       examples[i].last_prompt_reduced))

    def cost(indices: list[int]) -> int:
        batch = [examples[i] for i in indices]
        end = max(n_positions_read(e, e.enc.reduced) for e in batch)
        first_read = min(e.last_prompt_reduced for e in batch)
        return group_cost + sum(len(batch) * (end - max(0, min(edit.first(batch), first_read)))
                                for edit in edits.values())

    best = [0] + [None] * len(order)  # best[j]: the cheapest cut of the first j examples
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(max(0, j - most), j):
            c = best[i] + cost(order[i:j])
            if best[j] is None or c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]
