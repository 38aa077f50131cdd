"""tl_thoughts: exact implicit weight updates of prompt chunks for TransformerLens models.

The effect of a chunk of a prompt on every later token is exactly a token-dependent update of the
model's weights: a vector added to each block's attention output (the virtual weight vector) and a
low-rank patch of each MLP's input matrix (the virtual weight matrix). See ``docs/theory.md``.
"""

from tl_thoughts._tl import computing_in
from tl_thoughts.chunks import Span
from tl_thoughts.errors import (
    ArgumentTypeError,
    ChunkError,
    InputError,
    PrecisionWarning,
    TLThoughtsError,
    UnsupportedArchitectureError,
    ZeroDenominatorError,
)
from tl_thoughts.exact_weights import ExactWeightPatch, exact_weight_patch
from tl_thoughts.patch import IncompatibleModelError, PatchFileError, PatchHandle, ThoughtPatch
from tl_thoughts.refine import refine_thought
from tl_thoughts.templates import PromptTemplate
from tl_thoughts.stream import PromptRows, prompt_rows
from tl_thoughts.thoughts import FitConfig, fit_thought, fit_thoughts
from tl_thoughts.updates import ImplicitUpdates, implicit_updates, implicit_updates_batch
from tl_thoughts.verify import FormReport, VerificationReport, verify
from tl_thoughts.version import __version__


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
