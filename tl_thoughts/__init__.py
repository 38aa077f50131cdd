"""tl_thoughts: exact implicit weight updates of prompt chunks for TransformerLens models.

The effect of a chunk of a prompt on every later token is exactly a token-dependent update of the
model's weights: a vector added to each block's attention output (the virtual weight vector) and a
low-rank patch of each MLP's input matrix (the virtual weight matrix). See ``docs/theory.md``.

The package's names are imported on first use (``tl_thoughts.fit_thought`` imports
``tl_thoughts.thoughts`` then), so that ``import tl_thoughts`` and ``tl-thoughts --help`` need
neither torch nor TransformerLens; the errors and ``__version__`` are imported at once.
"""

import importlib
from types import MappingProxyType
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
    "FormReport": "tl_thoughts.verification",
    "VerificationReport": "tl_thoughts.verification",
    "verify": "tl_thoughts.verification",
    "reduced_positions": "tl_thoughts.verification",
    "run_reduced": "tl_thoughts.verification",
    "updates_from_cache": "tl_thoughts.updates",
})

# the submodules and subpackages a user reads names from (``tl_thoughts.analysis.top_k_recovery``),
# listed by ``dir(tl_thoughts)``; every other module is imported as needed (``tl_thoughts.updates``
# still works) but is not advertised
_NAMESPACES = ("analysis", "evaluation", "models", "plots", "stream", "tasks")

if TYPE_CHECKING:  # the same names, for static tools (type checkers, the API docs)
    from tl_thoughts._tl import computing_in
    from tl_thoughts.chunks import Span
    from tl_thoughts.exact_weights import ExactWeightPatch, exact_weight_patch
    from tl_thoughts.patch import IncompatibleModelError, PatchFileError, PatchHandle, ThoughtPatch
    from tl_thoughts.refine import refine_thought
    from tl_thoughts.stream import PromptRows, prompt_rows
    from tl_thoughts.templates import PromptTemplate
    from tl_thoughts.thoughts import FitConfig, fit_thought, fit_thoughts
    from tl_thoughts.updates import ImplicitUpdates, implicit_updates, implicit_updates_batch, updates_from_cache
    from tl_thoughts.verification import FormReport, VerificationReport, reduced_positions, run_reduced, verify


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
    "reduced_positions",
    "run_reduced",
    "updates_from_cache",
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
    """The public API (``__all__``) and the public namespaces ([`_NAMESPACES`][]); not the
    helpers of this file, nor the internal modules Python binds here as they are imported."""
    return sorted(set(__all__) | set(_NAMESPACES))
