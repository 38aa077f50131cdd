"""The exact greedy-match check: teacher-forced verdicts ([`teacher_forced_verdicts`][]), an
answer spelt with other tokens decoded for real ([`greedy_match`][]), runs under a thought
patch's weight form ([`match_under`][]), and the protocol's filter ([`chunk_filter`][],
[`example_verdicts`][])."""

from collections.abc import Callable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_thoughts import _tl
from tl_thoughts._tl import Model
from tl_thoughts.errors import InputError
from tl_thoughts.stream import SharedPrefix, greedy_decode, pad_right, row_logits, run_to_end, unpatched_prefix
from tl_thoughts.evaluation.examples import TaskExample, encode_task_examples, n_positions_read, stop_tokens
from tl_thoughts.patch import ThoughtPatch
from tl_thoughts.tasks import Task

# hooks(batch of examples, with_chunk) -> TransformerLens forward hooks for that batch (steering, task vectors)
HookFactory = Callable[[list[TaskExample], bool], list[tuple[str, Callable]]]


def teacher_forced_verdicts(
    model: Model,
    batch: list[TaskExample],
    seqs: list[Tensor],
    final_resid: Float[Tensor, "batch pos d_model"],
    stops: Bool[Tensor, " d_vocab"],
    unembed_weight: Float[Tensor, "d_vocab d_model"],
) -> tuple[list[bool], list[float], list[list[int] | None]]:
    """Teacher-forced verdicts of a batch of examples, from the residual stream after the last block.

    Right/wrong at the token level (the greedy tokens are the continuation's) and the mean
    log-probability of each continuation, from ``final_resid`` (the residual stream after the last
    block of the batch's sequences ``seqs``, each example's prompt with or without the chunk then
    its continuation; the final norm and the unembedding are applied to the needed rows only),
    and, where a wrong verdict is open, the greedy tokens so far (None where the verdict is
    settled: the path ends the answer early with a stop token, or its text leaves the answer).

    ``unembed_weight`` is ``W_U.T.contiguous()``, made once by the caller: TransformerLens'
    ``Unembed`` computes ``F.linear(x, W_U.T.contiguous(), b_U)``, copying the 113 MB matrix at
    every call; the same product with a copy made once gives the same logits, bit for bit.

    Returns:
        ``(right, mean log-probability, open paths)``, one of each per example.

    Example:
        >>> seqs = [e.enc.reduced for e in examples]  # doctest: +SKIP
        >>> final = run_to_end(model, pad_right(seqs))  # doctest: +SKIP
        >>> right, logprob, open_ = teacher_forced_verdicts(model, examples, seqs, final, stops, unembed)  # doctest: +SKIP
    """
    b_idx, p_idx, spans = [], [], []
    for i, (e, seq) in enumerate(zip(batch, seqs)):
        n = seq.shape[0]
        rows = list(range(n - e.n_cont - 1, n - 1))
        spans.append((len(p_idx), len(p_idx) + len(rows), seq[n - e.n_cont :]))
        b_idx += [i] * len(rows)
        p_idx += rows
    picked = final_resid[torch.tensor(b_idx), torch.tensor(p_idx)]  # [rows, d_model]
    logits = row_logits(model, picked, unembed_weight)
    norm = torch.logsumexp(logits, -1)  # log-probabilities of the targets only (no [rows, d_vocab] copy)
    right, logprob, open_ = [], [], []
    for lo, hi, targets in spans:
        targets = targets.to(logits.device)
        preds = logits[lo:hi].argmax(-1)
        ok = bool((preds[:-1] == targets[:-1]).all()) and bool(stops[int(preds[-1])])
        right.append(ok)
        picked_logits = logits[lo:hi].gather(-1, targets[:, None])[:, 0]
        logprob.append(float((picked_logits.double() - norm[lo:hi].double()).mean()))
        open_.append(None if ok else _open_path(model, targets.tolist(), preds.tolist(), stops))
    return right, logprob, open_


def _norm(text: str) -> str:
    """Whitespace normalised as the protocol compares answers."""
    return " ".join(text.split())


def _fits(text: str, answer: str) -> bool:
    """Whether decoded greedy text may still become ``answer`` (after normalising whitespace); an
    incomplete character (``\ufffd``) only further decoding resolves."""
    return "\ufffd" in text or _norm(answer).startswith(_norm(text))


def _open_path(model: Model, targets: list[int], preds: list[int], stops: Tensor) -> list[int] | None:
    """For a continuation ``targets`` (answer tokens, then the line break) that the teacher-forced
    greedy predictions ``preds`` leave at their first wrong token: the greedy tokens up to and
    including that token, if greedy decoding may still spell the answer's text with other tokens
    (the path's text fits the answer); None if the verdict "wrong" is settled (the path ends the
    answer early with a stop token, or its text leaves the answer)."""
    n_answer = len(targets) - 1
    j = next((i for i in range(n_answer) if preds[i] != targets[i]), n_answer)
    if bool(stops[preds[j]]):
        return None  # stops early (j < n_answer; at j == n_answer the example is right)
    path = targets[:j] + [preds[j]]
    return path if _fits(model.tokenizer.decode(path), model.tokenizer.decode(targets[:n_answer])) else None


@torch.no_grad()
def _decode_open(
    model: Model,
    examples: list[TaskExample],
    with_chunk: bool,
    paths: list[list[int]],
    hooks: HookFactory | None,
    stops: Bool[Tensor, " d_vocab"],
    unembed_weight: Float[Tensor, "d_vocab d_model"],
    prefix: SharedPrefix | None = None,
) -> list[bool]:
    """Greedy decoding for real, for a batch of examples whose greedy tokens so far are ``paths``
    (under ``hooks`` and whatever patch is applied, after ``prefix``, see [`greedy_decode`][]):
    one token at a time, each example while its text fits its answer; right when it stops on the
    answer's text (whitespace normalised)."""
    prompts, answers = [], []
    for e in examples:
        cut = e.enc.answer_start - (0 if with_chunk else e.enc.stop - e.enc.start)
        prompts.append((e.enc.full if with_chunk else e.enc.reduced)[:cut].cpu())
        answers.append(model.tokenizer.decode(e.enc.full[e.enc.answer_start : -1].tolist()))  # no line break

    def keep(i: int, generated: list[int]) -> bool:
        # a path spelling the answer takes at most one token a byte (and whitespace)
        short = len(generated) <= len(answers[i].encode()) + 4
        return short and _fits(model.tokenizer.decode(generated), answers[i])

    def hook_factory(active: list[int]) -> list:
        return hooks([examples[i] for i in active], with_chunk) if hooks else []

    generated, stopped = greedy_decode(model, prompts, paths, keep, stops, unembed_weight, hook_factory, prefix)
    return [s and _norm(model.tokenizer.decode(g)) == _norm(a) for g, s, a in zip(generated, stopped, answers)]


@torch.no_grad()
def greedy_match(
    model: Model,
    examples: list[TaskExample],
    *,
    with_chunk: bool,
    hooks: HookFactory | None = None,
    stops: Bool[Tensor, " d_vocab"] | None = None,
    batch_size: int = 32,
    unembed_weight: Float[Tensor, "d_vocab d_model"] | None = None,
    compare: str = "text",
    prefix: SharedPrefix | None = None,
) -> tuple[Bool[Tensor, " n"], Float[Tensor, " n"]]:
    """Whether greedy decoding gives each example's answer, and its continuation's log-probability.

    The answer is compared as text, after normalising whitespace; the mean log-probability of the
    continuation's tokens comes from the same teacher-forced forward pass (one per batch). Where the greedy tokens leave the answer's tokens for a token whose text
    still fits the answer (another tokenization of the same text), that example is decoded for
    real ([`tl_thoughts.stream.greedy_decode`][], under the same hooks and patch) and compared as text.
    With the chunk, no ``hooks`` and no hook attached to the model, the first tokens every prompt
    shares (the prefix and the chunk) run once, read from TransformerLens' key-value cache: the
    same verdicts (``tests/test_evaluation.py``).

    Args:
        model: The model (as it is: apply a patch around the call to test the patch).
        examples: From [`tl_thoughts.evaluation.encode_task_examples`][].
        with_chunk: Run the prompts with the chunk (``full``) or without (``reduced``).
        hooks: ``hooks(batch_examples, with_chunk)`` -> TransformerLens forward hooks for a batch
            (steering, task vectors).
        stops: [`tl_thoughts.evaluation.stop_tokens`][] (computed if not given).
        batch_size: Sequences per forward pass.
        unembed_weight: ``model.W_U.T.contiguous()`` if the caller has it (saves one copy of the
            unembedding per call).
        compare: ``"text"`` (the protocol) or ``"tokens"``: right only when the greedy tokens are
            the tokenizer's tokens of the answer (no decoding; stricter where the model spells an
            answer with other tokens).
        prefix: [`tl_thoughts.stream.SharedPrefix`][]: the first tokens of every prompt (the
            same in every prompt) read from its cache instead of run, as [`match_under`][]
            gives them (no ``hooks`` then).

    Returns:
        ``(right [n], mean log-probability of the continuation's tokens [n])``.

    Example:
        >>> examples = encode_task_examples(model, task, range(10))  # doctest: +SKIP
        >>> right, logprob = greedy_match(model, examples, with_chunk=True)  # doctest: +SKIP
    """
    if compare not in ("text", "tokens"):
        raise InputError(f"compare must be 'text' or 'tokens', got {compare!r}")
    stops = stop_tokens(model) if stops is None else stops
    right, logprob = [], []
    device = _tl.model_device(model)
    unembed_weight = model.W_U.T.contiguous() if unembed_weight is None else unembed_weight
    # the caller's prefix (match_under) or, with the chunk, the first tokens every prompt shares
    # run once (TransformerLens' key-value cache), where no hook could depend on positions; the
    # verdicts read positions after them
    shared, kv = prefix if prefix is not None else (0, None)
    if prefix is not None and hooks is not None:
        raise InputError("hooks count positions from each sequence's start: no hooks with a prefix cache")
    if prefix is None and with_chunk and hooks is None and examples and not _tl.has_hooks(model):
        common = SharedPrefix.of(model, [e.enc.full for e in examples], upto=min(e.last_prompt_full for e in examples))
        shared, kv = common if common is not None else (0, None)
    for b in range(0, len(examples), batch_size):
        batch = examples[b : b + batch_size]
        seqs = [e.enc.full if with_chunk else e.enc.reduced for e in batch]
        with _tl.hooked(model, hooks(batch, with_chunk) if hooks else []):
            # the last position (the line break's) predicts nothing the verdicts read: not run
            final = run_to_end(model, pad_right([q[shared:n_positions_read(e, q)] for e, q in zip(batch, seqs)]).to(device),
                               prefix=kv)
            if shared:  # the shared positions' rows, never read: the verdicts' positions line up
                final = torch.cat([final.new_zeros(len(batch), shared, final.shape[-1]), final], dim=1)
        r, lp, open_ = teacher_forced_verdicts(model, batch, seqs, final, stops, unembed_weight)
        reopen = [i for i, path in enumerate(open_) if path is not None and compare == "text"]
        if reopen:
            decoded = _decode_open(model, [batch[i] for i in reopen], with_chunk, [open_[i] for i in reopen],
                                   hooks, stops, unembed_weight, prefix)
            for i, verdict in zip(reopen, decoded):
                r[i] = verdict
        right += r
        logprob += lp
    return torch.tensor(right, dtype=torch.bool), torch.tensor(logprob, dtype=torch.float64)


def match_under(
    model: Model,
    patch: ThoughtPatch,
    examples: list[TaskExample],
    *,
    stops: Bool[Tensor, " d_vocab"],
    batch_size: int,
    unembed_weight: Float[Tensor, "d_vocab d_model"],
) -> tuple[Bool[Tensor, " n"], Float[Tensor, " n"]]:
    """[`greedy_match`][] without the chunk under a thought patch, in its weight form.

    One product per patched matrix where the activation form's hooks compute two. The positions the patch leaves
    unpatched ([`ThoughtPatch.unpatched_positions`][], the same tokens in every prompt) run
    once, unpatched, into TransformerLens' key-value cache, which the patched positions read: the
    values of ``with patch.apply(model): greedy_match(...)`` (the activation form), up to
    floating-point rounding (``tests/test_evaluation.py``).

    Raises:
        InputError: the prompts differ within those positions (one template gives them all the
            same tokens).

    Example:
        >>> right, logprob = match_under(model, patch, examples, stops=stop_tokens(model), batch_size=32,
        ...                              unembed_weight=model.W_U.T.contiguous())  # doctest: +SKIP
    """
    prefix = unpatched_prefix(model, [e.enc.reduced for e in examples], patch.unpatched_positions)
    patch.check_compatible(model)
    with _tl.swapped_tensors(model, patch.parameters(model)):
        return greedy_match(model, examples, with_chunk=False, stops=stops, batch_size=batch_size,
                            unembed_weight=unembed_weight, prefix=prefix)


def chunk_filter(
    model: Model,
    examples: list[TaskExample],
    *,
    stops: Bool[Tensor, " d_vocab"] | None = None,
    batch_size: int = 32,
) -> tuple[Bool[Tensor, " n"], Bool[Tensor, " n"], Bool[Tensor, " n"]]:
    """The protocol's filter: the examples right with the chunk and wrong without it.

    Returns ``(keep, right with the chunk, right without it)``, where ``keep`` marks the examples
    right WITH the chunk and wrong WITHOUT it.

    Example:
        >>> keep, with_right, without_right = chunk_filter(model, examples)  # doctest: +SKIP
    """
    with_right, _ = greedy_match(model, examples, with_chunk=True, stops=stops, batch_size=batch_size)
    without_right, _ = greedy_match(model, examples, with_chunk=False, stops=stops, batch_size=batch_size)
    return with_right & ~without_right, with_right, without_right


@torch.no_grad()
def example_verdicts(
    model: Model, task: Task, *, batch_size: int = 32
) -> tuple[Bool[Tensor, " n_examples"], Bool[Tensor, " n_examples"]]:
    """Every example of a task right with the chunk / right without it (no patch), by index.

    An example's verdicts do not depend on the seed's split, so the protocol computes them
    once a task ([`tl_thoughts.evaluation.prepare_task`][]) and each seed filters its test
    examples with them ([`tl_thoughts.evaluation.evaluate_seed`][]).

    Example:
        >>> with_right, without_right = example_verdicts(model, task)  # doctest: +SKIP
        >>> keep = with_right & ~without_right  # the protocol's filter, every example  # doctest: +SKIP
    """
    with _tl.linear_layout(model):
        examples = encode_task_examples(model, task, range(len(task.examples)))
        _, with_right, without_right = chunk_filter(model, examples, stops=stop_tokens(model), batch_size=batch_size)
    return with_right, without_right

