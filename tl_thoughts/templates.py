"""Prompt templates and the tokenisation of (chunk, query, answer) examples for thought patches."""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from tl_thoughts import _tl
from tl_thoughts._tl import Model
from tl_thoughts.chunks import char_span_to_tokens, token_pieces
from tl_thoughts.errors import ArgumentTypeError, ChunkError, InputError

Example = str | tuple[str, str]
POOLS = ("query", "answer", "kept", "all")
BOS = "{bos}"
"""The placeholder of the model's BOS token at the start of a template's text
([`PromptTemplate.for_model`][] renders it for a model: [`bos_text`][])."""


@dataclass(frozen=True)
class PromptTemplate:
    """Where the chunk and the query go in a prompt.

    ``text`` holds the placeholders ``{chunk}`` and ``{query}`` once each, the chunk first. The
    chunk is rendered as ``chunk + separator``, and that whole piece is what is removed: the
    reduced prompt is ``text`` with ``{chunk}`` replaced by nothing.

    ``text`` may start with ``{bos}`` (``templates.BOS``): the model's BOS token, so that the prompt
    without the chunk keeps a fixed first token on any model with one. Such a template is rendered
    for a model ([`for_model`][]: [`encode_example`][] does, so do ``fit_thought`` and the
    benchmark); [`render`][] refuses it unresolved.

    Example:
        >>> t = PromptTemplate("Q: {chunk}{query}\\nA:", separator=" ")
        >>> t.render("2+2?", "Answer briefly.")
        'Q: Answer briefly. 2+2?\\nA:'
        >>> t.render("2+2?")
        'Q: 2+2?\\nA:'
    """

    text: str = "{chunk}{query}"
    separator: str = "\n"

    def __post_init__(self) -> None:
        for name in ("text", "separator"):
            if not isinstance(getattr(self, name), str):
                raise ArgumentTypeError(f"PromptTemplate.{name} must be a string, got {getattr(self, name)!r}")
        if self.text.count("{chunk}") != 1 or self.text.count("{query}") != 1:
            raise InputError(f"PromptTemplate.text holds '{{chunk}}' and '{{query}}' exactly once each, got {self.text!r}")
        if self.text.index("{chunk}") > self.text.index("{query}"):
            raise InputError("PromptTemplate.text: the chunk must come before the query in the template")
        if BOS in self.text and (self.text.count(BOS) != 1 or not self.text.startswith(BOS)):
            raise InputError(f"PromptTemplate.text: '{BOS}' (the model's BOS token) may only start the text, "
                             f"once; got {self.text!r}")

    @property
    def needs_model(self) -> bool:
        """Whether the text starts with ``{bos}``, which [`for_model`][] renders for a model."""
        return self.text.startswith(BOS)

    def for_model(self, model: Model) -> "PromptTemplate":
        """This template with ``{bos}`` rendered for ``model`` ([`bos_text`][]: nothing where the
        model's tokenization prepends the BOS token itself, else the BOS token's text); the
        template itself when it holds no ``{bos}``.

        Raises:
            InputError: ``model`` has no BOS token, or one that its tokenization does not give as
                one token at the start of a prompt; the message names the template and the model.

        Example:
            >>> PromptTemplate("{bos}{chunk}{query} ->", separator="").for_model(smollm2).text  # doctest: +SKIP
            '<|im_start|>{chunk}{query} ->'
            >>> PromptTemplate("{bos}{chunk}{query} ->", separator="").for_model(gemma).text  # doctest: +SKIP
            '{chunk}{query} ->'
        """
        if not self.needs_model:
            return self
        try:
            piece = bos_text(model)
        except InputError as e:
            raise InputError(f"the template {self.text!r} starts with {BOS}: {e}") from None
        return PromptTemplate(text=piece + self.text[len(BOS):], separator=self.separator)

    def render(self, query: str, chunk: str | None = None) -> str:
        """The prompt for ``query``, with ``chunk`` (and the separator) or without it.

        Raises:
            InputError: The text starts with ``{bos}``: render ``template.for_model(model)``.
        """
        if self.needs_model:
            raise InputError(f"the template {self.text!r} starts with {BOS}, the model's BOS token: render it for "
                             "a model, template.for_model(model).render(...)")
        piece = "" if chunk is None else chunk + self.separator
        return self.text.replace("{chunk}", piece).replace("{query}", query)

    def chunk_chars(self, query: str, chunk: str) -> tuple[int, int]:
        """Character span of ``chunk + separator`` in ``render(query, chunk)``."""
        lo = self.text.index("{chunk}")
        return lo, lo + len(chunk) + len(self.separator)

    @classmethod
    def chat(cls, model: Model, separator: str = "\n") -> "PromptTemplate":
        """The model's chat template, chunk and query in one user turn, ready for the answer."""
        tok = model.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise InputError("PromptTemplate.chat needs a tokenizer with a chat template")
        text = tok.apply_chat_template(
            [{"role": "user", "content": "{chunk}{query}"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        return cls(text=text, separator=separator)


def bos_text(model: Model) -> str:
    """What ``{bos}`` at the start of a template renders as for ``model``, so that the prompt's
    first token is the model's BOS token: ``""`` where the model's tokenization
    (``model.to_tokens``, ``cfg.default_prepend_bos``) prepends that token itself (Gemma), else the
    BOS token's text (SmolLM2's ``<|im_start|>``).

    Raises:
        InputError: No tokenizer, no BOS token, or a tokenization that gives neither (the empty
            text as the BOS token alone or as nothing, the BOS token's text as the BOS token); the
            message names the model.

    Example:
        >>> bos_text(smollm2), bos_text(gemma)  # doctest: +SKIP
        ('<|im_start|>', '')
    """
    tok = model.tokenizer
    name = getattr(model.cfg, "model_name", None) or type(model).__name__
    if tok is None or tok.bos_token is None or tok.bos_token_id is None:
        raise InputError(f"model {name!r} has no BOS token (its tokenizer's bos_token is None)")
    bos = int(tok.bos_token_id)
    empty = _tl.to_tokens(model, "", what="the empty text")[0].tolist()
    if empty == [bos]:
        return ""  # prepended by the tokenization
    alone = _tl.to_tokens(model, tok.bos_token, what="the BOS token's text")[0].tolist()
    if empty == [] and alone == [bos]:
        return tok.bos_token
    raise InputError(f"model {name!r}: its tokenization gives the BOS token {tok.bos_token!r} (id {bos}) neither "
                     f"by itself nor from its text (the empty text gives {empty}, {tok.bos_token!r} gives {alone})")


def check_examples(examples: object, what: str = "examples", pairs: bool = False) -> None:
    """Refuse anything but a non-empty sequence of queries (strings) or ``(query, answer)`` pairs of
    strings (only pairs with ``pairs``), naming the argument (``what``) and the bad example.

    Raises:
        ArgumentTypeError: not a sequence (an int, None, one string), or an example that is
            neither a string nor a pair of strings.
        InputError: no example, or a query alone where ``pairs`` are needed.

    Example:
        >>> check_examples([("cat", "chat"), "dog"])  # queries and pairs: nothing raised
    """
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise ArgumentTypeError(
            f"{what} must be a list of queries (strings) or (query, answer) pairs of strings, got "
            f"{type(examples).__name__} {examples!r}"[:200]
        )
    if len(examples) == 0:
        raise InputError(f"{what}: at least one example is needed (a non-empty list)")
    for i, example in enumerate(examples):
        if isinstance(example, str):
            if pairs:
                raise InputError(f"{what}[{i}]: (query, answer) pairs are needed, got the query {example!r} alone")
            continue
        if not isinstance(example, (tuple, list)) or len(example) != 2 or not all(isinstance(x, str) for x in example):
            raise ArgumentTypeError(
                f"{what}[{i}] must be a query (a string) or a (query, answer) pair of strings, got {example!r}"[:200]
            )


def default_template(model: Model) -> PromptTemplate:
    """The chat template when the tokenizer has one, else ``"{chunk}\\n{query}"``.

    Example:
        >>> default_template(model).render("x", chunk="c")  # no chat template on this tokenizer
        'c\\nx'
    """
    tok = model.tokenizer
    if tok is not None and getattr(tok, "chat_template", None):
        return PromptTemplate.chat(model)
    return PromptTemplate()


@dataclass(frozen=True)
class EncodedExample:
    """One example tokenised with and without the chunk, with aligned positions.

    Attributes:
        full: ``[pos]`` tokens with the chunk (and the answer, teacher-forced).
        reduced: ``[T]`` the same tokens with the chunk removed.
        start, stop: the chunk's positions in ``full``.
        answer_start: position in ``full`` of the first answer token (``len(full)`` if none).
    """

    full: Int[Tensor, " pos"]
    reduced: Int[Tensor, " T"]
    start: int
    stop: int
    answer_start: int

    def pooled(self, pool: str) -> Int[Tensor, " n"]:
        """Positions in ``full`` pooled for fitting: ``"query"`` (after the chunk, before the
        answer), ``"answer"`` (the positions that predict the answer tokens), ``"kept"`` (every
        position after the chunk) or ``"all"`` (every kept position, the prefix too)."""
        n = self.full.shape[0]
        if pool == "query":
            return torch.arange(self.stop, self.answer_start)
        if pool == "answer":
            if self.answer_start >= n:
                raise InputError("pool='answer' needs (query, answer) examples")
            return torch.arange(self.answer_start - 1, n - 1)
        if pool == "kept":
            return torch.arange(self.stop, n)
        if pool == "all":
            return torch.cat([torch.arange(0, self.start), torch.arange(self.stop, n)])
        raise InputError(f"pool must be one of {POOLS}, got {pool!r}")

    def to_reduced(self, positions: Int[Tensor, " n"]) -> Int[Tensor, " n"]:
        """Map kept positions of ``full`` to their index in ``reduced``."""
        return torch.where(positions >= self.stop, positions - (self.stop - self.start), positions)


def encode_example(
    model: Model, template: PromptTemplate, chunk: str, example: Example
) -> EncodedExample:
    """Tokenise one example with and without the chunk.

    A template starting with ``{bos}`` is rendered for the model first
    ([`PromptTemplate.for_model`][]). The reduced tokens are the full tokens minus the chunk's tokens, so that positions align; if
    tokenising the reduced text directly gives other tokens, a warning says so (the patch is then
    fitted on a tokenisation the user would not type).

    Example:
        >>> ex = encode_example(model, PromptTemplate("{chunk}{query}", separator=""), "the cat", (" sat", " on"))
        >>> ex.full.shape[0] - ex.reduced.shape[0], ex.start, ex.stop  # the chunk's 2 tokens removed
        (2, 0, 2)
    """
    if model.tokenizer is None:
        raise InputError("fitting from text needs a model with a tokenizer")
    if not isinstance(template, PromptTemplate):
        raise ArgumentTypeError(f"template must be a PromptTemplate, got {type(template).__name__}")
    if not isinstance(chunk, str):
        raise ArgumentTypeError(f"chunk must be a string, got {type(chunk).__name__}")
    check_examples([example], what="example")
    template = template.for_model(model)  # {bos}: the model's BOS token
    query, answer = (example, "") if isinstance(example, str) else example
    prompt = template.render(query, chunk)
    text = prompt + answer
    tokens = _tl.to_tokens(model, text, what=f"the prompt of example {query!r}")[0]  # never truncated
    pieces = token_pieces(model, tokens)
    joined = "".join(p for _, _, p in pieces)
    if not joined.endswith(text):
        raise ChunkError(
            "the tokenizer's token strings do not concatenate back to the prompt; cannot align the "
            f"chunk by characters (prompt {text[:60]!r}...)"
        )
    offset = len(joined) - len(text)  # e.g. a prepended BOS
    lo, hi = template.chunk_chars(query, chunk)
    start, stop = char_span_to_tokens(pieces, offset + lo, offset + hi)
    if answer:
        answer_start, _ = char_span_to_tokens(pieces, offset + len(prompt), offset + len(text), "answer")
        if answer_start <= stop:
            raise ChunkError(f"the answer {answer!r} starts inside the chunk or right at its end")
    else:
        answer_start = tokens.shape[0]
    if stop >= tokens.shape[0]:
        raise ChunkError("nothing follows the chunk in the prompt")
    reduced = torch.cat([tokens[:start], tokens[stop:]])
    direct = _tl.to_tokens(model, template.render(query) + answer, what=f"the reduced prompt of example {query!r}")[0]
    if not torch.equal(direct.cpu(), reduced.cpu()):
        warnings.warn(
            f"for example {query!r}, tokenising the prompt without the chunk gives other tokens than "
            "removing the chunk's tokens; the latter are used",
            stacklevel=3,
        )
    return EncodedExample(full=tokens, reduced=reduced, start=start, stop=stop, answer_start=answer_start)


def shared_prefix_length(seqs: Sequence[Tensor], upto: int | None = None) -> int:
    """How many first tokens every sequence shares (for a task's prompts with the chunk: the
    template's prefix and the chunk), at most ``upto`` and at most one less than the shortest
    sequence (so that every sequence keeps a position after it); 0 for no sequence.

    Example:
        >>> shared_prefix_length([torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 5])])
        2
    """
    if not seqs:
        return 0
    first = seqs[0]
    n = min(int(q.shape[0]) for q in seqs) - 1
    n = n if upto is None else min(n, upto)
    for q in seqs:
        same = (q[:n] == first[:n]).tolist()
        n = same.index(False) if False in same else n
    return max(n, 0)
