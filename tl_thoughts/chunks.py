"""Turning user input into a ``[1, pos]`` token tensor and a chunk span of positions."""

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_thoughts import _tl
from tl_thoughts.errors import ChunkError, InputError

ChunkSpec = slice | str | range


@dataclass(frozen=True)
class Span:
    """A resolved chunk: token positions ``start <= i < stop`` of a prompt of ``n_pos`` tokens."""

    start: int
    stop: int
    n_pos: int

    @property
    def prefix_positions(self) -> Int[Tensor, " prefix"]:
        """Positions before the chunk (never affected by it)."""
        return torch.arange(0, self.start)

    @property
    def positions(self) -> Int[Tensor, " kept"]:
        """Kept positions after the chunk, where the implicit updates live."""
        return torch.arange(self.stop, self.n_pos)

    @property
    def kept_positions(self) -> Int[Tensor, " T"]:
        """All positions of the reduced prompt, in order (prefix, then after the chunk)."""
        return torch.cat([self.prefix_positions, self.positions])

    def as_slice(self) -> slice:
        return slice(self.start, self.stop)


def resolve_tokens(
    model: HookedTransformer, tokens: Int[Tensor, "1 pos"] | Int[Tensor, " pos"] | str
) -> Int[Tensor, "1 pos"]:
    """Validate ``tokens`` (or tokenize a string with the model's own settings) as ``[1, pos]``.

    Raises:
        InputError: a string without a tokenizer, an empty prompt, a batch > 1, non-integer tokens,
            or token ids outside the vocabulary.
    """
    if isinstance(tokens, str):
        if model.tokenizer is None:
            raise InputError("a text prompt needs a model with a tokenizer; pass token ids instead")
        if tokens == "":
            raise InputError("the prompt is empty")
        tokens = model.to_tokens(tokens)
    if not isinstance(tokens, Tensor):
        raise InputError(f"tokens must be a string or an integer tensor, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise InputError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise InputError(f"tokens must have shape [1, pos], got {tuple(tokens.shape)}")
    if tokens.shape[0] != 1:
        raise InputError(
            f"batch of {tokens.shape[0]} prompts given; tl_thoughts handles one prompt at a time "
            "(shape [1, pos]) for now: loop over the prompts"
        )
    if tokens.shape[1] == 0:
        raise InputError("the prompt is empty")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise InputError(
            f"the prompt has {tokens.shape[1]} tokens, more than the model's context "
            f"(n_ctx={model.cfg.n_ctx})"
        )
    if bool((tokens < 0).any()) or bool((tokens >= model.cfg.d_vocab).any()):
        raise InputError(f"token ids must lie in [0, {model.cfg.d_vocab}) (the model's d_vocab)")
    return tokens.to(_tl.model_device(model)).long()


def resolve_chunk(model: HookedTransformer, tokens: Int[Tensor, "1 pos"], chunk: ChunkSpec) -> Span:
    """Resolve a chunk given as a slice or range of positions, or as a substring of the prompt.

    A substring is located in the concatenation of the prompt's token strings
    (``model.to_str_tokens``); it must occur exactly once, and its boundaries must fall on token
    boundaries (a token that straddles a boundary is accepted only if its part outside the
    substring is whitespace).

    Raises:
        ChunkError: empty chunk, out of range, a step other than 1, nothing after it, substring not
            found, found more than once, or cutting a token.
    """
    n_pos = tokens.shape[1]
    if isinstance(chunk, range):
        if chunk.step != 1:
            raise ChunkError(f"chunk {chunk} must be contiguous (step 1)")
        chunk = slice(chunk.start, chunk.stop)
    if isinstance(chunk, slice):
        start, stop = _slice_bounds(chunk, n_pos)
    elif isinstance(chunk, str):
        start, stop = _substring_bounds(model, tokens, chunk)
    else:
        raise ChunkError(
            f"chunk must be a slice of positions or a substring, got {type(chunk).__name__}"
        )
    if stop >= n_pos:
        raise ChunkError(
            f"the chunk covers positions {start}..{stop - 1}, up to the end of the {n_pos}-token "
            "prompt: no token follows it, so it has no effect to measure"
        )
    return Span(start=start, stop=stop, n_pos=n_pos)


def _slice_bounds(chunk: slice, n_pos: int) -> tuple[int, int]:
    if chunk.step not in (None, 1):
        raise ChunkError(f"chunk {chunk} must be contiguous (step 1)")
    start = 0 if chunk.start is None else int(chunk.start)
    stop = n_pos if chunk.stop is None else int(chunk.stop)
    for name, value in (("start", start), ("stop", stop)):
        if not -n_pos <= value <= n_pos:
            raise ChunkError(f"chunk {name}={value} is out of range for a {n_pos}-token prompt")
    start, stop = start % n_pos if start < 0 else start, stop % n_pos if stop < 0 else stop
    if stop <= start:
        raise ChunkError(f"chunk {chunk} is empty in a {n_pos}-token prompt")
    return start, stop


def _substring_bounds(model: HookedTransformer, tokens: Int[Tensor, "1 pos"], text: str) -> tuple[int, int]:
    if text == "":
        raise ChunkError("the chunk substring is empty")
    if model.tokenizer is None:
        raise InputError("locating a chunk by substring needs a model with a tokenizer")
    pieces = model.to_str_tokens(tokens[0])
    joined = "".join(pieces)
    first = joined.find(text)
    if first < 0:
        raise ChunkError(f"chunk {text!r} not found in the prompt")
    second = joined.find(text, first + 1)
    if second >= 0:
        raise ChunkError(
            f"chunk {text!r} occurs more than once in the prompt (at characters {first} and "
            f"{second}); pass a longer substring or a slice of positions"
        )
    return char_span_to_tokens(pieces, first, first + len(text))


def char_span_to_tokens(pieces: list[str], lo: int, hi: int, what: str = "chunk") -> tuple[int, int]:
    """Token positions ``[start, stop)`` covering characters ``[lo, hi)`` of ``"".join(pieces)``.

    A token straddling a boundary is accepted only if its part outside the span is whitespace.

    Raises:
        ChunkError: a boundary cuts a token, or no token lies in the span.
    """
    start = stop = None
    offset = 0
    for i, piece in enumerate(pieces):
        a, b = offset, offset + len(piece)
        offset = b
        if b <= lo or a >= hi or a == b:
            continue
        outside = piece[: max(lo - a, 0)] + piece[len(piece) - max(b - hi, 0) :]
        if outside.strip():
            raise ChunkError(
                f"the {what} boundary cuts token {i} ({piece!r}); extend or shorten the {what} to "
                "whole tokens, or pass a slice of positions"
            )
        start = i if start is None else start
        stop = i + 1
    if start is None or stop is None:
        raise ChunkError(f"no token of the {what} lies in characters {lo}..{hi} of the prompt")
    return start, stop
