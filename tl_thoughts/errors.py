"""Errors raised by tl_thoughts.

Every error is a subclass of a builtin (``ValueError``, ``TypeError``, ``NotImplementedError``,
``ZeroDivisionError``) so that code catching the builtin keeps working, and of
[`TLThoughtsError`][] so that all of them can be caught at once.

Errors a caller can cause with an argument are the library's own, raised at the boundary and
naming the argument: [`InputError`][] (a ``ValueError``) for a value that is not usable, and
its subclass [`ArgumentTypeError`][] (also a ``TypeError``) for an argument of the wrong type.
Catch ``InputError`` for both. A plain ``ValueError`` or ``TypeError`` from inside the library is a
bug (or an internal invariant broken), never a message meant for the caller.
"""


class TLThoughtsError(Exception):
    """Base class of every error raised on purpose by tl_thoughts."""


class ChunkError(TLThoughtsError, ValueError):
    """The chunk does not describe a valid, non-empty span of the prompt with tokens after it."""


class InputError(TLThoughtsError, ValueError):
    """An argument is not usable: the tokens or the model (wrong shape or dtype, batch > 1, hooks
    left on, parameters in another dtype than ``cfg.dtype``, a text longer than the context), or
    any other argument (empty, out of range, not finite, not one of the choices). The message
    names the argument."""


class ArgumentTypeError(InputError, TypeError):
    """An argument of the wrong type (an int where a list of examples is expected, an example that
    is not a string or a ``(query, answer)`` pair of strings, ``None``). Both an
    [`InputError`][] (a ``ValueError``, as the library raised before) and a ``TypeError``. The
    message names the argument."""


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


# --- argument checks at the boundary (every module may use them: this is the lowest floor) ---


def check_number(value: object, name: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a float if it is a real, finite number ``>= minimum`` (``> minimum`` when
    ``strict``); else [`ArgumentTypeError`][] (not a number: a bool, a string, None) or
    [`InputError`][] (NaN, infinite, too small), naming the argument ``name``.

    Example:
        >>> check_number(0.5, "ridge")
        0.5
    """
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    if value < minimum or (strict and value == minimum):
        raise InputError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value:g}")
    return value


def check_int(value: object, name: str, *, minimum: int = 0) -> int:
    """``value`` if it is an integer (not a bool) ``>= minimum``; else [`ArgumentTypeError`][]
    (not an integer) or [`InputError`][] (too small), naming the argument ``name``.

    Example:
        >>> check_int(16, "batch_size", minimum=1)
        16
    """
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)
