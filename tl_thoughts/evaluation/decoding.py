"""The answers of a task's unlabelled queries with the chunk ([`query_answers`][],
[`query_answers_with_rows`][]: greedy decoding through the stream engine's
[`tl_thoughts.stream.greedy_decode_cached`][], which also records the rows a fit reads), and
[`greedy_generate`][]."""

from collections.abc import Sequence

import torch
from torch import Tensor

from tl_thoughts import _tl
from tl_thoughts._tl import Model
from tl_thoughts.errors import ChunkError, InputError
from tl_thoughts.evaluation.config import EvalConfig, fit_kinds
from tl_thoughts.evaluation.examples import TaskExample, encode_task_example, stop_tokens
from tl_thoughts.tasks import Task
from tl_thoughts.stream import PromptRows, fitted_rows, greedy_decode, greedy_decode_cached, prompt_rows
from tl_thoughts.templates import encode_example


# an answered query's run (query_answers_with_runs): its example, the tokens run, (resid_pre rows, attn_out rows)
# from a position on, that position
QueryRun = tuple[TaskExample, Tensor, tuple[Tensor, Tensor], int]


@torch.no_grad()
def query_answers(
    model: Model, task: Task, n: int, *, batch_size: int = 32, max_new_tokens: int = 16
) -> list[tuple[str, str]]:
    """The first ``n`` of the task's unlabelled queries that the model answers with the chunk.

    With their answers: greedy decoding of the prompt with the chunk (the protocol's tokens) up to
    a stop token ([`stop_tokens`][]), through TransformerLens' key-value cache (the queries still
    wanted, at least ``batch_size`` of them, decoded together: the prompts of one length in
    batches of at most ``batch_size``; the same tokens as decoding every step from the start,
    ``tests/test_evaluation.py``). A query is skipped (and the next one taken) where the
    generation does not stop within ``max_new_tokens`` tokens, does not start with the task's
    ``answer_prefix``, leaves an empty answer or one with surrounding whitespace or an incomplete
    character, or where the answer's continuation does not tokenise as answer tokens then a
    line-break token (as [`tl_thoughts.evaluation.encode_task_examples`][] requires). A query
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
    model: Model, task: Task, n: int, batch_size: int, max_new_tokens: int, keep_runs: bool
) -> tuple[list[tuple[str, str]], list[QueryRun]]:
    """[`query_answers`][], and each answered query's run.

    Returns:
        ``(answered queries, runs)``: ``runs`` (empty unless ``keep_runs``) holds, per answered
        query, ``(its example ([`tl_thoughts.evaluation.encode_task_example`][]), the tokens
        run (the prompt then the generated tokens but the last), their residual stream from the
        first position after the chunk on ([`greedy_decode_cached`][]'s records), that
        position)``: what [`query_answers_with_rows`][] reads its rows from.

    Example:
        >>> queries, runs = query_answers_with_runs(model, task, 2, 32, 16, keep_runs=True)  # doctest: +SKIP
        >>> example, tokens, (pre, attn), first = runs[0]  # doctest: +SKIP
    """
    if n < 0:
        raise InputError(f"n must be >= 0, got {n}")
    if max_new_tokens < 1 or batch_size < 1:
        raise InputError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
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
    model: Model, task: Task, queries: Sequence[tuple[str, str]], config: EvalConfig
) -> PromptRows | None:
    """The answered queries' prompts with the chunk, streamed once, at the rows the fits read.

    Streamed through every block once, at the rows the fits read
    ([`tl_thoughts.stream.prompt_rows`][]): the same in every seed (the seeds' fit rows
    differ in their labelled examples only), so that each seed's fit streams the labelled
    examples' prompts with the chunk only. None where ``config`` fits no patch or
    has no query.

    Example:
        >>> rows = query_full_rows(model, task, queries, config)  # doctest: +SKIP
    """
    if not queries or not fit_kinds(config.methods):
        return None
    with _tl.linear_layout(model):
        return prompt_rows(model, task.chunk, [(q, task.continuation(a)) for q, a in queries],
                                template=task.template, pool=config.pool, query_weight=config.query_weight,
                                batch_size=config.batch_size)


def query_answers_with_rows(
    model: Model, task: Task, config: EvalConfig, *, max_new_tokens: int = 16
) -> tuple[list[tuple[str, str]], PromptRows | None]:
    """[`query_answers`][] of ``config.n_queries`` queries and their [`query_full_rows`][].

    The rows are read from the decoding's own runs: greedy decoding runs each answered query's
    prompt with the chunk, then its answer's tokens, through every block, which is the prompt a fit reads
    up to its last fitted row. The same queries as [`query_answers`][], and the rows of
    [`query_full_rows`][] up to floating-point rounding (the decoding runs other shapes;
    ``tests/test_evaluation.py::test_query_rows_from_the_decoding_equal_the_streamed_ones``).
    A query whose answer the decoding spelt with other tokens than its continuation's tokenization
    (then the prompt differs from the run) is streamed as [`query_full_rows`][] streams it.

    Raises:
        InputError: Fewer than ``config.n_queries`` usable queries.

    Example:
        >>> queries, rows = query_answers_with_rows(model, task, config)  # doctest: +SKIP
    """
    want_rows = config.n_queries > 0 and bool(fit_kinds(config.methods))
    queries, runs = query_answers_with_runs(model, task, config.n_queries, config.batch_size, max_new_tokens,
                                            keep_runs=want_rows)
    if not want_rows:
        return queries, None
    parts: list[tuple[Tensor, Tensor] | None] = []
    fitted = [fitted_rows(example.enc, config.pool, config.query_weight).positions for example, _, _, _ in runs]
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
            streamed = prompt_rows(model, task.chunk, [(q, task.continuation(a)) for q, a in
                                                            (queries[i] for i in missing)],
                                        template=task.template, pool=config.pool, query_weight=config.query_weight,
                                        batch_size=config.batch_size)
        for i in missing:
            idx = streamed.rows_of(runs[i][0].enc.full)
            parts[i] = (streamed.pre[:, idx], streamed.attn[:, idx])
    return queries, PromptRows.assemble(config.pool, config.query_weight, [r[0].enc for r in runs], fitted, parts)


@torch.no_grad()
def greedy_generate(
    model: Model, prompt: str, max_new_tokens: int = 10, stop_at_newline: bool = True
) -> str:
    """Greedy continuation of a prompt's text, as the model is (apply a patch around the call), cut
    at the first line break or special token when ``stop_at_newline``.

    One decoding path for the library ([`tl_thoughts.stream`][]): through TransformerLens'
    key-value cache ([`tl_thoughts.stream.greedy_decode_cached`][]) when no hook is attached or
    only a thought patch's (its activation form reads how many positions the cache holds), else
    every step from the start under the model's hooks ([`tl_thoughts.stream.greedy_decode`][]:
    a user's hooks may count positions from each sequence's start, so they see whole sequences;
    see `tl_thoughts._tl.has_whole_sequence_hooks`).

    Example:
        >>> greedy_generate(model, "<|im_start|>walk -> walked\\ngo ->")  # doctest: +SKIP
        ' went'
    """
    return greedy_generate_all(model, [prompt], max_new_tokens, stop_at_newline)[0]


@torch.no_grad()
def greedy_generate_all(
    model: Model, prompts: Sequence[str], max_new_tokens: int = 10, stop_at_newline: bool = True
) -> list[str]:
    """[`greedy_generate`][] of several prompts, decoded together (batched by length; the prompts'
    shared first tokens run once through the key-value cache), each continuation the one
    [`greedy_generate`][] gives its prompt alone.

    Example:
        >>> greedy_generate_all(model, ["<|im_start|>go ->", "<|im_start|>eat ->"])  # doctest: +SKIP
        [' went', ' ate']
    """
    if model.tokenizer is None:
        raise InputError("greedy_generate needs a model with a tokenizer")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    stops = stop_tokens(model) if stop_at_newline else torch.zeros(model.cfg.d_vocab, dtype=torch.bool)
    tokens = [_tl.to_tokens(model, prompt)[0].cpu() for prompt in prompts]
    unembed_weight = model.W_U.T.contiguous()

    def keep(i: int, generated: list[int]) -> bool:
        return len(generated) < max_new_tokens

    with _tl.linear_layout(model):  # many short runs: the weights laid out once (the same values)
        if _tl.has_whole_sequence_hooks(model):  # hooks see whole sequences (a patch's see a cache)
            generated, _ = greedy_decode(model, tokens, [[] for _ in tokens], keep, stops, unembed_weight)
        else:
            generated, _ = greedy_decode_cached(model, tokens, keep, stops, unembed_weight)
    return [model.tokenizer.decode(g) for g in generated]
