"""Running prompts through the model for the protocol: right padding, the logits of residual rows,
runs to the last block, greedy decoding (every step from the start: :func:`greedy_decode`; with
TransformerLens' key-value cache: :func:`greedy_decode_cached`), and the answers of a task's
unlabelled queries with the chunk (:func:`query_answers`, :func:`query_answers_with_rows`)."""

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, TransformerLensKeyValueCache

from tl_thoughts import _tl
from tl_thoughts.errors import ChunkError, InputError, UnsupportedArchitectureError
from tl_thoughts.evaluation.config import EvalConfig, fit_kinds
from tl_thoughts.evaluation.examples import TaskExample, encode_task_example, stop_tokens
from tl_thoughts.tasks import Task
from tl_thoughts.templates import encode_example, shared_prefix_length
from tl_thoughts.thoughts import FullRows, _assemble_full_rows, _fitted_rows, full_prompt_rows


def right_pad(seqs: list[Tensor]) -> Int[Tensor, "batch pos"]:
    """Right padding of token sequences into one batch (exact under causal attention: real
    positions never see the pads).

    Example:
        >>> right_pad([torch.tensor([5, 6, 7]), torch.tensor([8])])
        tensor([[5, 6, 7],
                [8, 0, 0]])
    """
    n = max(s.shape[0] for s in seqs)
    out = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s.cpu()
    return out


Prefix = tuple[int, TransformerLensKeyValueCache]  # the first k tokens of every prompt, and their key-value cache
# an answered query's run (query_answers_with_runs): its example, the tokens run, (resid_pre rows, attn_out rows)
# from a position on, that position
QueryRun = tuple[TaskExample, Tensor, tuple[Tensor, Tensor], int]


def row_logits(
    model: HookedTransformer, rows: Float[Tensor, "rows d_model"], unembed_weight: Float[Tensor, "d_vocab d_model"]
) -> Float[Tensor, "rows d_vocab"]:
    """The logits of residual rows after the last block: the final norm, then the unembedding.

    ``unembed_weight`` is ``W_U.T.contiguous()``, made once by the caller (see
    :func:`tl_thoughts.evaluation.teacher_forced_verdicts`).

    Example:
        >>> tokens = torch.tensor([[1, 2, 3]])
        >>> resid = run_to_end(model, tokens)
        >>> torch.allclose(row_logits(model, resid[0], model.W_U.T.contiguous()), model(tokens)[0])
        True
    """
    return torch.nn.functional.linear(_tl.final_norm(model, rows), unembed_weight, model.b_U)


def run_to_end(
    model: HookedTransformer,
    x: Tensor,
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    prefix: TransformerLensKeyValueCache | None = None,
) -> Tensor:
    """The residual stream after the last block (or before block ``stop_at_layer``).

    From tokens or from a residual at a layer (``start_at_layer``); with ``prefix``
    (:func:`tl_thoughts._tl.prefix_cache`), of tokens that follow that one sequence's tokens in
    every sequence of the batch.

    Example:
        >>> run_to_end(model, torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 16])
    """
    n_layers = model.cfg.n_layers
    stop = n_layers if stop_at_layer is None else min(stop_at_layer, n_layers)
    if start_at_layer is not None and start_at_layer >= stop:
        return x
    mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
    cache = None if prefix is None else _tl.broadcast_cache(prefix, x.shape[0])
    return model(x, start_at_layer=start_at_layer, stop_at_layer=stop, attention_mask=mask, past_kv_cache=cache)


def _advance(i: int, token: int, generated: list[list[int]], stopped: list[bool], stops: Tensor,
             keep: Callable[[int, list[int]], bool]) -> bool:
    """One greedy step of sequence ``i`` (:func:`greedy_decode`, :func:`greedy_decode_cached`): a stop
    token ends it (``stopped[i]``); any other token is appended, and it goes on while ``keep``
    holds. Returns whether it goes on."""
    if bool(stops[token]):
        stopped[i] = True
        return False
    generated[i].append(token)
    return keep(i, generated[i])


def greedy_decode(
    model: HookedTransformer,
    prompts: list[Tensor],
    starts: list[list[int]],
    keep: Callable[[int, list[int]], bool],
    stops: Bool[Tensor, " d_vocab"],
    unembed_weight: Float[Tensor, "d_vocab d_model"],
    hooks: Callable[[list[int]], list] | None = None,
    prefix: "Prefix | None" = None,
) -> tuple[list[list[int]], list[bool]]:
    """Greedy decoding of a batch of prompts, every step from the start (no key-value cache).

    The prompts are right-padded; prompt ``i`` is continued from the tokens ``starts[i]``, one
    token at a time, while no stop token comes and ``keep(i, tokens so far)`` holds.
    ``hooks(active indices)`` gives forward hooks for a step. ``prefix = (k, cache)``: the
    prompts' first ``k`` tokens (the same in every prompt) are not run, their keys and values read
    from ``cache`` (:func:`tl_thoughts._tl.prefix_cache`).

    Returns:
        ``(generated tokens without the stop token, per prompt; whether each ended on a stop token)``.

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
            final = run_to_end(model, right_pad(seqs).to(device), prefix=cache)
        last = final[torch.arange(len(seqs)), torch.tensor([len(q) - 1 for q in seqs])]
        nxt = row_logits(model, last, unembed_weight).argmax(-1)
        active = [i for i, token in zip(active, nxt.tolist()) if _advance(i, token, generated, stopped, stops, keep)]
    return generated, stopped


@torch.no_grad()
def greedy_decode_cached(
    model: HookedTransformer,
    prompts: list[Tensor],
    keep: Callable[[int, list[int]], bool],
    stops: Bool[Tensor, " d_vocab"],
    unembed_weight: Float[Tensor, "d_vocab d_model"],
    batch_size: int | None = None,
    record_from: int | None = None,
    records: list | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Greedy decoding of a batch of prompts through TransformerLens' key-value cache.

    :func:`greedy_decode` without hooks, with ``TransformerLensKeyValueCache``: the first tokens
    every prompt shares run once (a task's prompts with the chunk: the prefix and the chunk), then
    the prompts of one length run as one batch (no padding; at most ``batch_size`` sequences, a
    larger length group split evenly) from there, each prompt once, then one new token per step,
    for the sequences still going: a finished sequence leaves the batch and its rows of the cache.
    The same decoding up to floating-point rounding (the cached step multiplies other shapes): a
    near tie between two tokens may break the other way (``tests/test_evaluation.py``
    ``test_cached_greedy_decoding_equals_the_uncached_loop``).

    ``records`` (a list, with ``record_from``): appended, for each prompt, the residual stream it ran
    through, from position ``record_from`` to the last one run (the prompt, then every generated
    token but the last: the stop token, or the one ``keep`` refused): ``(resid_pre of every block
    then the residual after the last one [n_layers + 1, pos, d_model], every block's hook_attn_out
    [n_layers, pos, d_model])``, as the run computes them.

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
    attn_names = [_tl.attn_out_name(layer) for layer in range(n_layers)]
    store: dict[str, Tensor] = {}

    def save(act, hook):
        store[hook.name] = act

    recording = records is not None
    if recording and record_from is None:
        raise ValueError("records need record_from")
    hooks = [(name, save) for name in pre_names + attn_names] if recording else []
    parts: list[list[tuple[Tensor, Tensor]]] = [[] for _ in prompts]

    def record(rows: list[int], first: int) -> None:
        """The rows just run (positions ``first`` on) of the sequences ``rows``."""
        pre, attn = torch.stack([store[n] for n in pre_names]), torch.stack([store[n] for n in attn_names])
        lo = max(0, record_from - first)
        if lo < pre.shape[2]:
            for r, i in enumerate(rows):
                parts[i].append((pre[:, r, lo:], attn[:, r, lo:]))

    prefix = None
    if shared:
        with _tl.hooked(model, hooks if recording and record_from < shared else []):
            prefix = _tl.prefix_cache(model, prompts[0][None, :shared])
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


@torch.no_grad()
def query_answers(
    model: HookedTransformer, task: Task, n: int, *, batch_size: int = 32, max_new_tokens: int = 16
) -> list[tuple[str, str]]:
    """The first ``n`` of the task's unlabelled queries that the model answers with the chunk.

    With their answers: greedy decoding of the prompt with the chunk (the protocol's tokens) up to
    a stop token (:func:`stop_tokens`), through TransformerLens' key-value cache (the queries still
    wanted, at least ``batch_size`` of them, decoded together: the prompts of one length in
    batches of at most ``batch_size``; the same tokens as decoding every step from the start,
    ``tests/test_evaluation.py``). A query is skipped (and the next one taken) where the
    generation does not stop within ``max_new_tokens`` tokens, does not start with the task's
    ``answer_prefix``, leaves an empty answer or one with surrounding whitespace or an incomplete
    character, or where the answer's continuation does not tokenise as answer tokens then a
    line-break token (as :func:`tl_thoughts.evaluation.encode_task_examples` requires). A query
    is also skipped where its answer and itself are an example's query and answer the other way
    round (``late -> early`` for the example ``early -> late``): such a row would hand the fit a
    test example's pair.

    Raises:
        InputError: Fewer than ``n`` usable queries (the message says how many).

    Example:
        >>> query_answers(model, task, 2)  # doctest: +SKIP
        [('swim', 'swam'), ('dance', 'danced')]
    """
    return query_answers_with_runs(model, task, n, batch_size, max_new_tokens, keep_runs=False)[0]


def query_answers_with_runs(
    model: HookedTransformer, task: Task, n: int, batch_size: int, max_new_tokens: int, keep_runs: bool
) -> tuple[list[tuple[str, str]], list[QueryRun]]:
    """:func:`query_answers`, and each answered query's run.

    Returns:
        ``(answered queries, runs)``: ``runs`` (empty unless ``keep_runs``) holds, per answered
        query, ``(its example (:func:`tl_thoughts.evaluation.encode_task_example`), the tokens
        run (the prompt then the generated tokens but the last), their residual stream from the
        first position after the chunk on (:func:`greedy_decode_cached`'s records), that
        position)``: what :func:`query_answers_with_rows` reads its rows from.

    Example:
        >>> queries, runs = query_answers_with_runs(model, task, 2, 32, 16, keep_runs=True)  # doctest: +SKIP
        >>> example, tokens, (pre, attn), first = runs[0]  # doctest: +SKIP
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    if n == 0:
        return [], []
    stops = stop_tokens(model)
    unembed_weight = model.W_U.T.contiguous()
    prefix = task.answer_prefix
    examples = set(task.examples)
    out: list[tuple[str, str]] = []
    runs = []
    start = 0
    with _tl.linear_layout(model):
        while len(out) < n and start < len(task.queries):
            # the queries still wanted (at least a batch's), grouped by length in batches of batch_size
            batch = task.queries[start : start + max(batch_size, n - len(out))]
            start += len(batch)
            encoded = [encode_example(model, task.template, task.chunk, q) for q in batch]
            prompts = [e.full.cpu() for e in encoded]
            records = [] if keep_runs else None
            first = min(e.stop for e in encoded)
            generated, stopped = greedy_decode_cached(model, prompts, lambda i, g: len(g) <= max_new_tokens, stops,
                                                      unembed_weight, batch_size, record_from=first, records=records)
            for k, (query, tokens, ended) in enumerate(zip(batch, generated, stopped)):
                text = model.tokenizer.decode(tokens)
                answer = text[len(prefix):]
                if not ended or not text.startswith(prefix) or "\ufffd" in answer or answer != answer.strip() \
                        or not answer or (answer, query) in examples:
                    continue
                try:
                    example = encode_task_example(model, task, query, answer)
                except ChunkError:
                    continue
                out.append((query, answer))
                if keep_runs:
                    run = torch.cat([prompts[k], torch.tensor(tokens, dtype=prompts[k].dtype)])
                    runs.append((example, run, records[k], first))
                if len(out) == n:
                    break
    if len(out) < n:
        raise InputError(
            f"task {task.name!r}: {len(out)} of its {len(task.queries)} unlabelled queries are answered by "
            f"the model with the chunk, {n} wanted (add queries to the task file or lower n_queries)"
        )
    return out, runs


def query_full_rows(
    model: HookedTransformer, task: Task, queries: Sequence[tuple[str, str]], config: EvalConfig
) -> FullRows | None:
    """The answered queries' prompts with the chunk, streamed once, at the rows the fits read.

    Streamed through every block once, at the rows the fits read
    (:func:`tl_thoughts.thoughts.full_prompt_rows`): the same in every seed (the seeds' fit rows
    differ in their labelled examples only), so that each seed's fit streams the labelled
    examples' prompts with the chunk only. None where ``config`` fits no patch or
    has no query.

    Example:
        >>> rows = query_full_rows(model, task, queries, config)  # doctest: +SKIP
    """
    if not queries or not fit_kinds(config.methods):
        return None
    with _tl.linear_layout(model):
        return full_prompt_rows(model, task.chunk, [(q, task.continuation(a)) for q, a in queries],
                                template=task.template, pool=config.pool, query_weight=config.query_weight,
                                batch_size=config.batch_size)


def query_answers_with_rows(
    model: HookedTransformer, task: Task, config: EvalConfig, *, max_new_tokens: int = 16
) -> tuple[list[tuple[str, str]], FullRows | None]:
    """:func:`query_answers` of ``config.n_queries`` queries and their :func:`query_full_rows`.

    The rows are read from the decoding's own runs: greedy decoding runs each answered query's
    prompt with the chunk, then its answer's tokens, through every block, which is the prompt a fit reads
    up to its last fitted row. The same queries as :func:`query_answers`, and the rows of
    :func:`query_full_rows` up to floating-point rounding (the decoding runs other shapes;
    ``tests/test_evaluation.py::test_query_rows_from_the_decoding_equal_the_streamed_ones``).
    A query whose answer the decoding spelt with other tokens than its continuation's tokenization
    (then the prompt differs from the run) is streamed as :func:`query_full_rows` streams it.

    Raises:
        InputError: Fewer than ``config.n_queries`` usable queries.
        UnsupportedArchitectureError: rows wanted on a model with norms after its sublayers (as
            :func:`tl_thoughts.thoughts.full_prompt_rows`).

    Example:
        >>> queries, rows = query_answers_with_rows(model, task, config)  # doctest: +SKIP
    """
    want_rows = config.n_queries > 0 and bool(fit_kinds(config.methods))
    if want_rows and _tl.model_spec(model).post_norm:
        raise UnsupportedArchitectureError(
            "the queries' rows are read as fit_thought reads them, which does not support blocks with norms "
            "after their sublayers (Gemma 2/3 use_normalization_before_and_after, OLMo 2)"
        )
    queries, runs = query_answers_with_runs(model, task, config.n_queries, config.batch_size, max_new_tokens,
                                            keep_runs=want_rows)
    if not want_rows:
        return queries, None
    parts: list[tuple[Tensor, Tensor] | None] = []
    fitted = [_fitted_rows(example.enc, config.pool, config.query_weight)[0] for example, _, _, _ in runs]
    for positions, (example, run, (pre, attn), first) in zip(fitted, runs):
        end = int(positions.max()) + 1 if len(positions) else 0  # the rows read depend on the tokens before them
        same = run.shape[0] >= end and torch.equal(example.enc.full[:end].cpu(), run[:end])
        if same and (not len(positions) or int(positions.min()) >= first):
            parts.append((pre[:, positions - first], attn[:, positions - first]))
        else:
            parts.append(None)
    missing = [i for i, part in enumerate(parts) if part is None]
    if missing:  # another tokenization of the answer than the run's: streamed
        with _tl.linear_layout(model):
            streamed = full_prompt_rows(model, task.chunk, [(q, task.continuation(a)) for q, a in
                                                            (queries[i] for i in missing)],
                                        template=task.template, pool=config.pool, query_weight=config.query_weight,
                                        batch_size=config.batch_size)
        for i in missing:
            idx = streamed.rows_of(runs[i][0].enc.full)
            parts[i] = (streamed.pre[:, idx], streamed.attn[:, idx])
    return queries, _assemble_full_rows(config.pool, config.query_weight, [r[0].enc for r in runs], fitted, parts)


@torch.no_grad()
def greedy_generate(
    model: HookedTransformer, prompt: str, max_new_tokens: int = 10, stop_at_newline: bool = True
) -> str:
    """Greedy continuation of a prompt's text.

    As the model is (apply a patch around the call), cut at the first line break or special token
    when ``stop_at_newline``.

    Example:
        >>> greedy_generate(model, "<|im_start|>walk -> walked\\ngo ->")  # doctest: +SKIP
        ' went'
    """
    if model.tokenizer is None:
        raise InputError("greedy_generate needs a model with a tokenizer")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    stops = stop_tokens(model) if stop_at_newline else None
    tokens = model.to_tokens(prompt)
    pieces = []
    for _ in range(max_new_tokens):
        logits = model(tokens, attention_mask=torch.ones_like(tokens))
        nxt = int(logits[0, -1].argmax())
        if stops is not None and bool(stops[nxt]):
            break
        pieces.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([[nxt]], device=tokens.device)], dim=1)
    return model.tokenizer.decode(pieces)
