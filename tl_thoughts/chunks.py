"""Turning user input into a ``[1, pos]`` token tensor and a chunk span of positions."""

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_thoughts import _tl
from tl_thoughts._tl import Model
from tl_thoughts.errors import ArgumentTypeError, ChunkError, InputError

Interval = slice | range | str
ChunkSpec = Interval | list[Interval] | list[int] | Bool[Tensor, " pos"]
# one chunk specification per prompt of a batch (prompts of different lengths)
BatchChunkSpec = Interval | list[Interval | list[Interval] | list[int] | Bool[Tensor, " _"]]


@dataclass(frozen=True)
class Span:
    """Resolved chunk(s): the token positions removed from a prompt of ``n_pos`` tokens.

    One chunk is the positions ``start <= i < stop``. Several chunks (``intervals``: sorted,
    disjoint, non-adjacent ``(start, stop)`` pairs) are removed at once; ``start`` is then the
    first removed position and ``stop`` one past the last. The *kept* positions are all the others;
    the ones before ``start`` (the prefix) are never affected, the others (``positions``, between
    and after the chunks) carry the implicit updates.

    Example:
        >>> span = Span(2, 5, n_pos=8)
        >>> span.positions.tolist(), span.kept_positions.tolist()
        ([5, 6, 7], [0, 1, 5, 6, 7])
        >>> two = Span.from_intervals([(1, 2), (4, 6)], n_pos=8)
        >>> two.positions.tolist(), two.describe()
        ([2, 3, 6, 7], '1, 4..5')
    """

    start: int
    stop: int
    n_pos: int
    intervals: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        intervals = tuple((int(a), int(b)) for a, b in self.intervals) or ((self.start, self.stop),)
        for (a, b), nxt in zip(intervals, intervals[1:] + ((self.n_pos + 1, None),)):
            if not 0 <= a < b <= self.n_pos or b >= nxt[0]:
                raise ChunkError(
                    f"chunk intervals {intervals} must be non-empty, sorted, disjoint, non-adjacent "
                    f"and inside the {self.n_pos}-token prompt"
                )
        if (intervals[0][0], intervals[-1][1]) != (self.start, self.stop):
            raise ChunkError(f"start/stop {self.start}, {self.stop} disagree with intervals {intervals}")
        object.__setattr__(self, "intervals", intervals)

    @classmethod
    def from_intervals(cls, intervals: "list[tuple[int, int]]", n_pos: int) -> "Span":
        """Several chunks at once (``[start, stop)`` pairs; sorted, adjacent ones merged)."""
        merged: list[list[int]] = []
        for a, b in sorted((int(a), int(b)) for a, b in intervals):
            if merged and a <= merged[-1][1]:
                if a < merged[-1][1]:
                    raise ChunkError(f"chunks overlap at positions {a}..{min(b, merged[-1][1]) - 1}")
                merged[-1][1] = b
            else:
                merged.append([a, b])
        if not merged:
            raise ChunkError("no chunk given")
        return cls(merged[0][0], merged[-1][1], n_pos, tuple((a, b) for a, b in merged))

    @property
    def n_chunks(self) -> int:
        return len(self.intervals)

    @property
    def chunk_mask(self) -> Bool[Tensor, " pos"]:
        """True at the removed positions."""
        mask = torch.zeros(self.n_pos, dtype=torch.bool)
        for a, b in self.intervals:
            mask[a:b] = True
        return mask

    @property
    def prefix_positions(self) -> Int[Tensor, " prefix"]:
        """Positions before the (first) chunk (never affected by it)."""
        return torch.arange(0, self.start)

    @property
    def positions(self) -> Int[Tensor, " kept"]:
        """Kept positions after the (first) chunk, where the implicit updates live."""
        return torch.arange(self.start, self.n_pos)[~self.chunk_mask[self.start :]]

    @property
    def kept_positions(self) -> Int[Tensor, " T"]:
        """All positions of the reduced prompt, in order (prefix, then after the chunk)."""
        return torch.cat([self.prefix_positions, self.positions])

    def as_slice(self) -> slice:
        """The chunk as a slice of positions (one chunk only)."""
        if self.n_chunks != 1:
            raise ChunkError(
                f"{self.n_chunks} chunks were removed ({self.describe()}): they are no single "
                "slice; use .intervals or .as_slices()"
            )
        return slice(self.start, self.stop)

    def as_slices(self) -> list[slice]:
        """Every chunk as a slice of positions."""
        return [slice(a, b) for a, b in self.intervals]

    def describe(self) -> str:
        """``"24..37"``; several chunks comma-separated; a one-token chunk as its position."""
        return ", ".join(f"{a}" if b == a + 1 else f"{a}..{b - 1}" for a, b in self.intervals)


def resolve_tokens(
    model: Model, tokens: Int[Tensor, "1 pos"] | Int[Tensor, " pos"] | str
) -> Int[Tensor, "1 pos"]:
    """Validate ``tokens`` (or tokenize a string with the model's own settings) as ``[1, pos]``.

    Raises:
        InputError: a string without a tokenizer, an empty prompt, a batch > 1, non-integer tokens,
            token ids outside the vocabulary, or more tokens than ``n_ctx`` (a text prompt is
            never cut to fit).
        ArgumentTypeError: ``tokens`` neither a string nor a tensor.

    Example:
        >>> resolve_tokens(model, torch.arange(4, dtype=torch.int32)).tolist()
        [[0, 1, 2, 3]]
    """
    if isinstance(tokens, str):
        if model.tokenizer is None:
            raise InputError("a text prompt needs a model with a tokenizer; pass token ids instead")
        if tokens == "":
            raise InputError("the prompt is empty")
        tokens = _tl.to_tokens(model, tokens)  # never truncated: longer than n_ctx is refused
    if not isinstance(tokens, Tensor):
        raise ArgumentTypeError(f"tokens must be a string or an integer tensor, got {type(tokens).__name__}")
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


def resolve_chunk(model: Model, tokens: Int[Tensor, "1 pos"], chunk: ChunkSpec) -> Span:
    """Resolve the chunk(s) to remove.

    One chunk is a ``slice`` or ``range`` of positions (step 1), or a substring of the prompt.
    Several chunks are a list of those (removed together; they must not overlap), or any set of
    positions: a list of ints or a boolean mask over the prompt's positions.

    A substring is located in the concatenation of the prompt's token strings
    (``model.to_str_tokens``); it must occur exactly once, and its boundaries must fall on token
    boundaries (a token that straddles a boundary is accepted only if its part outside the
    substring is whitespace).

    Raises:
        ChunkError: empty chunk, out of range, a step other than 1, overlapping chunks, repeated
            positions, nothing after the last chunk, substring not found, found more than once, or
            cutting a token; a tuple of ints (ambiguous: a range or two positions?).

    Example:
        >>> tokens = torch.arange(10)[None]
        >>> resolve_chunk(model, tokens, slice(2, 5)).positions.tolist()
        [5, 6, 7, 8, 9]
        >>> resolve_chunk(model, tokens, [slice(1, 3), range(6, 8)]).describe()
        '1..2, 6..7'
        >>> resolve_chunk(model, tokens, [3, 4, 7]).intervals
        ((3, 5), (7, 8))
    """
    n_pos = tokens.shape[1]
    if isinstance(chunk, Tensor):
        if chunk.dtype != torch.bool or chunk.shape != (n_pos,):
            raise ChunkError(
                f"a chunk given as a tensor is a boolean mask of shape ({n_pos},), got dtype "
                f"{chunk.dtype} and shape {tuple(chunk.shape)}"
            )
        chunk = chunk.nonzero()[:, 0].tolist()
        if not chunk:
            raise ChunkError("the chunk mask selects no position")
    if isinstance(chunk, tuple):
        raise ChunkError(
            f"a tuple {chunk!r} is ambiguous as a chunk: pass slice(a, b) for positions a..b-1, a "
            "list of positions, or a list of slices/substrings for several chunks"
        )
    if isinstance(chunk, list):
        if not chunk:
            raise ChunkError("the list of chunks is empty")
        if all(isinstance(c, int) and not isinstance(c, bool) for c in chunk):
            intervals = _positions_to_intervals(chunk, n_pos)
        elif any(isinstance(c, (int, bool)) for c in chunk):
            raise ChunkError("a list of chunks holds either positions (ints) or slices/substrings, not both")
        else:
            intervals = [_interval(model, tokens, c) for c in chunk]
        span = Span.from_intervals(intervals, n_pos)
    else:
        start, stop = _interval(model, tokens, chunk)
        span = Span(start, stop, n_pos)
    if span.stop >= n_pos:
        raise ChunkError(
            f"the chunk covers positions {span.start}..{span.stop - 1}, up to the end of the {n_pos}-token "
            "prompt: no token follows it, so it has no effect to measure"
            if span.n_chunks == 1
            else f"the last chunk ({span.describe().split(', ')[-1]}) reaches the end of the {n_pos}-token "
            "prompt: no token follows it, so removing it has no effect to measure"
        )
    check_window(model, span)
    return span


def check_window(model: Model, span: Span) -> None:
    """Refuse a chunk whose removal would change what a sliding window shows (models with
    local-attention blocks, ``cfg.use_local_attn``, such as Gemma 2 and 3).

    A local block's query sees the keys less than ``window_size`` positions before it, counted in
    the sequence it runs on. Without the chunk, the kept tokens move closer together, so a kept
    key that lay outside a kept query's window in the full prompt may come inside it in the
    reduced one; the reduced run then attends to a key the full run did not, and no update of
    the blocks reproduces the full run from the full run's cache. That never happens when the
    prompt is no longer than the window (every key is in every window, in both runs), nor when
    no kept query has a kept key ``window_size`` or more positions back with fewer than
    ``window_size`` kept positions between them. Every exact entry point
    ([`tl_thoughts.implicit_updates`][], [`tl_thoughts.implicit_updates_batch`][],
    [`tl_thoughts.updates_from_cache`][]) resolves its chunk through [`resolve_chunk`][], which
    calls this.

    Raises:
        InputError: such a kept query and key exist; the message names them and the window.
            An ``InputError`` (not ``UnsupportedArchitectureError``): the model is supported, and
            the same model is exact on a shorter prompt (the input is what to change).

    Example:
        >>> check_window(model, Span(2, 5, 10))  # no sliding window: nothing raised
    """
    window = _tl.attention_window(model)
    if window is None or span.n_pos <= window:
        return
    kept = span.kept_positions
    rows = torch.arange(len(kept))
    # the earliest kept key inside row i's window in the reduced run: row max(0, i - window + 1)
    first = (rows - window + 1).clamp(min=0)
    bad = (kept - kept[first]) >= window
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        query, key = int(kept[i]), int(kept[first[i]])
        raise InputError(
            f"the prompt has {span.n_pos} tokens, more than the sliding window of the model's local-attention "
            f"blocks (window_size={window}), and removing the chunk ({span.describe()}) matters there: in the "
            f"reduced prompt the token at position {query} would see the one at position {key}, which is "
            f"{query - key} positions before it in the full prompt, outside its window; the reduced run would "
            "not reproduce the full one. Use a prompt of at most window_size tokens (or a chunk that does not "
            "bring a kept token back into a window)"
        )


def _interval(model: Model, tokens: Int[Tensor, "1 pos"], chunk: Interval) -> tuple[int, int]:
    """One chunk as ``(start, stop)``."""
    n_pos = tokens.shape[1]
    if isinstance(chunk, range):
        if chunk.step != 1:
            raise ChunkError(f"chunk {chunk} must be contiguous (step 1)")
        chunk = slice(chunk.start, chunk.stop)
    if isinstance(chunk, slice):
        return _slice_bounds(chunk, n_pos)
    if isinstance(chunk, str):
        return _substring_bounds(model, tokens, chunk)
    raise ChunkError(
        "a chunk is a slice or range of positions or a substring (or a list of those, a list of "
        f"positions, a boolean mask), got {type(chunk).__name__}"
    )


def _positions_to_intervals(positions: list[int], n_pos: int) -> list[tuple[int, int]]:
    for p in positions:
        if not -n_pos <= p < n_pos:
            raise ChunkError(f"position {p} is out of range for a {n_pos}-token prompt")
    resolved = sorted(p % n_pos for p in positions)
    if len(set(resolved)) != len(resolved):
        raise ChunkError(f"repeated positions in the chunk {positions}")
    intervals: list[list[int]] = []
    for p in resolved:
        if intervals and p == intervals[-1][1]:
            intervals[-1][1] = p + 1
        else:
            intervals.append([p, p + 1])
    return [(a, b) for a, b in intervals]


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


def _substring_bounds(model: Model, tokens: Int[Tensor, "1 pos"], text: str) -> tuple[int, int]:
    if text == "":
        raise ChunkError("the chunk substring is empty")
    if model.tokenizer is None:
        raise InputError("locating a chunk by substring needs a model with a tokenizer")
    pieces = token_pieces(model, tokens[0])
    joined = "".join(p for _, _, p in pieces)
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


Piece = tuple[int, int, str]


def token_pieces(model: Model, tokens: Int[Tensor, " pos"]) -> list[Piece]:
    """The prompt's text cut at token boundaries: ``(first token, one past the last, text)`` per
    piece, in order. A piece is one token (its ``to_str_tokens`` string), except where a character
    is split over several tokens (a multi-byte character in a byte-level tokenizer, e.g. an emoji):
    those tokens form one piece holding the whole character, found by decoding prefixes.

    Example:
        >>> token_pieces(model, model.to_tokens("the cat")[0])
        [(0, 1, 'the'), (1, 2, ' cat')]
    """
    strings = model.to_str_tokens(tokens)
    if "\ufffd" not in "".join(strings):  # every token decodes to whole characters
        return [(i, i + 1, piece) for i, piece in enumerate(strings)]
    ids = [int(t) for t in tokens]

    def decode(n: int) -> str:
        return model.tokenizer.decode(ids[:n], clean_up_tokenization_spaces=False)

    full = decode(len(ids))
    pieces: list[Piece] = []
    first, at = 0, 0
    for n in range(1, len(ids) + 1):
        prefix = decode(n) if n < len(ids) else full
        if full.startswith(prefix) and not prefix.endswith("\ufffd"):  # a character boundary
            pieces.append((first, n, full[at : len(prefix)]))
            first, at = n, len(prefix)
    if first < len(ids):
        pieces.append((first, len(ids), full[at:]))
    return pieces


def char_span_to_tokens(pieces: list[Piece], lo: int, hi: int, what: str = "chunk") -> tuple[int, int]:
    """Token positions ``[start, stop)`` covering characters ``[lo, hi)`` of the joined pieces
    ([`token_pieces`][]).

    A piece straddling a boundary is accepted only if its part outside the span is whitespace.

    Raises:
        ChunkError: a boundary cuts a token, or no token lies in the span.

    Example:
        >>> char_span_to_tokens([(0, 1, "the"), (1, 2, " cat"), (2, 3, " sat")], 3, 11)
        (1, 3)
    """
    start = stop = None
    offset = 0
    for first, last, piece in pieces:
        a, b = offset, offset + len(piece)
        offset = b
        if b <= lo or a >= hi or a == b:
            continue
        outside = piece[: max(lo - a, 0)] + piece[len(piece) - max(b - hi, 0) :]
        if outside.strip():
            where = f"token {first}" if last == first + 1 else f"tokens {first}..{last - 1}"
            raise ChunkError(
                f"the {what} boundary cuts {where} ({piece!r}); extend or shorten the {what} to "
                "whole tokens, or pass a slice of positions"
            )
        start = first if start is None else start
        stop = last
    if start is None or stop is None:
        raise ChunkError(f"no token of the {what} lies in characters {lo}..{hi} of the prompt")
    return start, stop
