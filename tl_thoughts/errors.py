"""Errors raised by tl_thoughts.

Every error is a subclass of a builtin (``ValueError`` or ``NotImplementedError``) so that code
catching the builtin keeps working, and of :class:`TLThoughtsError` so that all of them can be
caught at once.
"""


class TLThoughtsError(Exception):
    """Base class of every error raised on purpose by tl_thoughts."""


class ChunkError(TLThoughtsError, ValueError):
    """The chunk does not describe a valid, non-empty span of the prompt with tokens after it."""


class InputError(TLThoughtsError, ValueError):
    """The tokens or the model given are not usable (wrong shape or dtype, batch > 1, hooks left on)."""


class UnsupportedArchitectureError(TLThoughtsError, NotImplementedError):
    """The model uses a feature for which the exact construction is not (yet) available.

    The message names the config field and why the construction would not be exact.
    """


class ZeroDenominatorError(TLThoughtsError, ZeroDivisionError):
    """A quantity the exact construction divides by is zero.

    tl_thoughts never adds an epsilon on the exact path: a zero-norm MLP input, a head that puts
    all its attention on the chunk, or linearly dependent rows in a minimum-norm solve raise this.
    """


class PrecisionWarning(UserWarning):
    """A half-precision model (float16, bfloat16): tl_thoughts computes its updates in float32 (or
    the dtype asked for) instead, since half precision cannot resolve the exact equivalence."""
