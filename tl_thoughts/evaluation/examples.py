"""A task's examples as the protocol runs them: tokenised with and without the chunk
([`TaskExample`][]), and the tokens that end an answer ([`stop_tokens`][])."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

from tl_thoughts._tl import Model
from tl_thoughts.errors import ChunkError, InputError
from tl_thoughts.tasks import Task
from tl_thoughts.templates import EncodedExample, encode_example


@dataclass(frozen=True)
class TaskExample:
    """One example tokenised with and without the chunk, its continuation teacher-forced.

    Attributes:
        enc: The prompt with the chunk then the continuation (``enc.full [pos_full]``) and without
            the chunk (``enc.reduced [pos_reduced]``), positions aligned
            ([`tl_thoughts.templates.encode_example`][]).
        n_cont: Continuation tokens: the answer's tokens then the stop token (the line break).

    Example:
        >>> example = encode_task_example(model, task, "walk", "walked")  # doctest: +SKIP
        >>> example.last_prompt_full - example.last_prompt_reduced == example.enc.stop - example.enc.start  # doctest: +SKIP
        True
    """

    enc: EncodedExample  # full = prompt with chunk + continuation; reduced = without the chunk
    n_cont: int  # continuation tokens: answer tokens then the stop token

    @property
    def last_prompt_full(self) -> int:
        """The last prompt position (the one predicting the answer) in ``enc.full``."""
        return self.enc.answer_start - 1

    @property
    def last_prompt_reduced(self) -> int:
        """The last prompt position (the one predicting the answer) in ``enc.reduced``."""
        return self.enc.answer_start - 1 - (self.enc.stop - self.enc.start)


def encode_task_examples(model: Model, task: Task, indices: Sequence[int]) -> list[TaskExample]:
    """Tokenise examples with and without the chunk (aligned positions, see
    [`tl_thoughts.templates.encode_example`][]), checking that the continuation ends with a token
    of its own holding the line break.

    Example:
        >>> examples = encode_task_examples(load_default_model(), task, range(20))  # doctest: +SKIP
        >>> examples[0].n_cont  # answer tokens + the line-break token  # doctest: +SKIP
        2
    """
    return [encode_task_example(model, task, *task.examples[i]) for i in indices]


def encode_task_example(model: Model, task: Task, query: str, answer: str) -> TaskExample:
    """Tokenise one ``(query, answer)`` pair of ``task`` (an example or an answered query), as
    [`encode_task_examples`][] does.

    Raises:
        ChunkError: The continuation does not tokenise as the answer's tokens then a token of its
            own holding the line break.

    Example:
        >>> example = encode_task_example(load_default_model(), task, "swim", "swam")  # doctest: +SKIP
        >>> example.n_cont  # doctest: +SKIP
        2
    """
    enc = encode_example(model, task.template, task.chunk, (query, task.continuation(answer)))
    n_cont = enc.full.shape[0] - enc.answer_start
    last = model.to_single_str_token(int(enc.full[-1])) if n_cont else ""
    if n_cont < 2 or "\n" not in last or last.strip():
        raise ChunkError(
            f"task {task.name!r}, example {query!r}: the continuation must tokenise as the answer's "
            f"tokens then a line-break token (got last token {last!r})"
        )
    return TaskExample(enc=enc, n_cont=n_cont)


def stop_tokens(model: Model) -> Bool[Tensor, " d_vocab"]:
    """Tokens that end an answer under greedy decoding: a line break after optional spaces, or a
    special token (end of sequence, chat turn markers).

    Example:
        >>> stops = stop_tokens(model)
        >>> stops.shape, bool(stops[model.tokenizer.eos_token_id])
        (torch.Size([50]), True)
    """
    tok = model.tokenizer
    if tok is None:
        raise InputError("the behavioural benchmark needs a model with a tokenizer")
    strings = tok.convert_ids_to_tokens(list(range(model.cfg.d_vocab)))
    decoded = [tok.convert_tokens_to_string([s]) if s is not None else "" for s in strings]
    mask = torch.tensor([d.lstrip(" \t").startswith("\n") for d in decoded])
    special = [i for i in tok.all_special_ids if i < model.cfg.d_vocab]
    mask[special] = True
    return mask


def n_positions_read(e: TaskExample, seq: Tensor) -> int:
    """How many first positions of a prompt the teacher-forced verdicts read.

    ``seq`` is ``e``'s prompt with or without the chunk (``e.enc.full`` or ``e.enc.reduced``).
    [`tl_thoughts.evaluation.teacher_forced_verdicts`][] reads all its positions but the last,
    whose token (the line break) is the last target, where the example has a continuation
    (causal attention: the later position changes none read).

    Example:
        >>> n_positions_read(example, example.enc.reduced) == example.enc.reduced.shape[0] - 1  # doctest: +SKIP
        True
    """
    return seq.shape[0] - (1 if e.n_cont else 0)
