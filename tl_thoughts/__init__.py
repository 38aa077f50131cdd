"""tl_thoughts: exact implicit weight updates of prompt chunks for TransformerLens models.

The effect of a chunk of a prompt on every later token is exactly a token-dependent update of the
model's weights: a vector added to each block's attention output (the virtual weight vector) and a
low-rank patch of each MLP's input matrix (the virtual weight matrix). See ``docs/theory.md``.

The package's names are imported on first use (``tl_thoughts.fit_thought`` imports
``tl_thoughts.thoughts`` then), so that ``import tl_thoughts`` and ``tl-thoughts --help`` need
neither torch nor TransformerLens; the errors and ``__version__`` are imported at once.
"""

import importlib
import sys
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING

from tl_thoughts.errors import (
    ArgumentTypeError,
    ChunkError,
    InputError,
    PrecisionWarning,
    TLThoughtsError,
    UnsupportedArchitectureError,
    ZeroDenominatorError,
)
from tl_thoughts.version import __version__

# name -> the module that defines it (imported when the name is first read)
_LAZY = MappingProxyType({
    "computing_in": "tl_thoughts._tl",
    "Span": "tl_thoughts.chunks",
    "ExactWeightPatch": "tl_thoughts.exact_weights",
    "exact_weight_patch": "tl_thoughts.exact_weights",
    "IncompatibleModelError": "tl_thoughts.patch",
    "PatchFileError": "tl_thoughts.patch",
    "PatchHandle": "tl_thoughts.patch",
    "ThoughtPatch": "tl_thoughts.patch",
    "refine_thought": "tl_thoughts.refine",
    "PromptTemplate": "tl_thoughts.templates",
    "PromptRows": "tl_thoughts.stream",
    "prompt_rows": "tl_thoughts.stream",
    "FitConfig": "tl_thoughts.thoughts",
    "fit_thought": "tl_thoughts.thoughts",
    "fit_thoughts": "tl_thoughts.thoughts",
    "ImplicitUpdates": "tl_thoughts.updates",
    "implicit_updates": "tl_thoughts.updates",
    "implicit_updates_batch": "tl_thoughts.updates",
    "FormReport": "tl_thoughts.verify",
    "VerificationReport": "tl_thoughts.verify",
    "verify": "tl_thoughts.verify",
})

if TYPE_CHECKING:  # the same names, for static tools (type checkers, the API docs)
    from tl_thoughts._tl import computing_in
    from tl_thoughts.chunks import Span
    from tl_thoughts.exact_weights import ExactWeightPatch, exact_weight_patch
    from tl_thoughts.patch import IncompatibleModelError, PatchFileError, PatchHandle, ThoughtPatch
    from tl_thoughts.refine import refine_thought
    from tl_thoughts.stream import PromptRows, prompt_rows
    from tl_thoughts.templates import PromptTemplate
    from tl_thoughts.thoughts import FitConfig, fit_thought, fit_thoughts
    from tl_thoughts.updates import ImplicitUpdates, implicit_updates, implicit_updates_batch
    from tl_thoughts.verify import FormReport, VerificationReport, verify


__all__ = [
    "__version__",
    "ArgumentTypeError",
    "ChunkError",
    "ExactWeightPatch",
    "FormReport",
    "IncompatibleModelError",
    "PatchFileError",
    "PatchHandle",
    "PromptTemplate",
    "ThoughtPatch",
    "FitConfig",
    "PromptRows",
    "fit_thought",
    "prompt_rows",
    "fit_thoughts",
    "refine_thought",
    "ImplicitUpdates",
    "InputError",
    "PrecisionWarning",
    "Span",
    "TLThoughtsError",
    "UnsupportedArchitectureError",
    "VerificationReport",
    "ZeroDenominatorError",
    "exact_weight_patch",
    "computing_in",
    "implicit_updates",
    "implicit_updates_batch",
    "verify",
]


def __getattr__(name: str):
    """A public name, from its module (imported now), or a submodule (``tl_thoughts.stream``)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(ModuleType):
    """The package's module type: when a submodule is imported, Python binds it as an attribute of
    the package; where a public name has the submodule's name (``verify``, the function of
    ``tl_thoughts.verify``), the name is bound instead, as the eager imports did."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, ModuleType) and name in _LAZY and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
