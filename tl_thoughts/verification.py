"""Numerical verification: the reduced prompt under the patch reproduces the full prompt; and the
reduced prompt run with its tokens at their original positions ([`reduced_positions`][],
[`run_reduced`][]), for a user's own hooks."""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_thoughts import _tl
from tl_thoughts._tl import Model
from tl_thoughts.chunks import Span
from tl_thoughts.errors import ArgumentTypeError, InputError
from tl_thoughts.exact_weights import exact_weight_patch
from tl_thoughts.updates import ImplicitUpdates

FORMS = ("unpatched", "activation", "weight")


@dataclass(frozen=True, eq=False)
class FormReport:
    """How closely one run of the reduced prompt reproduces the full prompt.

    ``T`` indexes all kept positions (before and after the chunk), in order.

    Attributes:
        form: ``"unpatched"`` (reduced prompt, no patch: the chunk's own effect),
            ``"activation"`` (virtual weight vectors added at ``hook_attn_out``) or ``"weight"``
            (real parameter patches, no hooks).
        resid_errors: ``[layer]`` max |difference| of ``blocks.{l}.hook_resid_post`` over kept
            positions and ``d_model``.
        resid_rel_errors: ``[layer]`` the same relative to the residual's size: the max over kept
            positions of max |difference| / max |full run's residual| at that position. Rounding
            errors grow with the residual, which is large at a few positions (an attention sink
            can reach 2.5e4 on the default model): in float32 an absolute error of 3e-3 there is
            a relative one near float32's epsilon (1.2e-7). Infinite where the full run's residual
            row is exactly zero and the difference is not (0 where both are).
        logit_errors: ``[T]`` max |logit difference| at each kept position.
        kl: ``[T]`` KL(full || reduced) of the next-token distributions, in nats (float64).
        argmax_match: ``[T]`` whether the top token agrees.
        logits: ``[T, d_vocab]`` the run's logits at the kept positions.
    """

    form: str
    resid_errors: Float[Tensor, " layer"]
    resid_rel_errors: Float[Tensor, " layer"]
    logit_errors: Float[Tensor, " T"]
    kl: Float[Tensor, " T"]
    argmax_match: Bool[Tensor, " T"]
    logits: Float[Tensor, "T d_vocab"]

    @property
    def max_abs_logit_error(self) -> float:
        return float(self.logit_errors.max())

    @property
    def max_kl(self) -> float:
        return float(self.kl.max())

    @property
    def argmax_agreement(self) -> float:
        """Fraction of kept positions whose top token agrees with the full run."""
        return float(self.argmax_match.double().mean())

    @property
    def max_resid_error(self) -> float:
        return float(self.resid_errors.max())

    @property
    def max_resid_rel_error(self) -> float:
        return float(self.resid_rel_errors.max())

    def __repr__(self) -> str:
        return (
            f"FormReport({self.form!r}: {len(self.logit_errors)} kept positions, {len(self.resid_errors)} layers; "
            f"max |dlogit| {self.max_abs_logit_error:.2e}, max KL {self.max_kl:.2e}, "
            f"argmax {100 * self.argmax_agreement:.1f}%, max |resid error| {self.max_resid_error:.2e})"
        )


@dataclass(frozen=True, eq=False)
class VerificationReport:
    """The verification of [`verify`][], layer by layer and at the output.

    Attributes:
        forms: form name -> [`FormReport`][]; always has ``"unpatched"`` as the baseline.
        kept_positions: ``[T]`` positions of the reduced prompt in the full prompt.
        full_logits: ``[T, d_vocab]`` the full run's logits at the kept positions (the reference).
        span: the removed positions (one chunk or several).
        dtype: the dtype the runs were computed in.
        weight_form: description of the weight patch used (``None`` if not verified).
    """

    forms: dict[str, FormReport]
    kept_positions: Int[Tensor, " T"]
    full_logits: Float[Tensor, "T d_vocab"]
    span: Span
    dtype: torch.dtype
    weight_form: str | None

    @property
    def chunk(self) -> slice:
        """The removed chunk as a slice (one chunk; ``span.as_slices()`` for several)."""
        return self.span.as_slice()

    @property
    def patched(self) -> list[FormReport]:
        return [r for name, r in self.forms.items() if name != "unpatched"]

    @property
    def max_abs_logit_error(self) -> float:
        """Worst max |logit error| over the verified (patched) forms and all kept positions."""
        return max(r.max_abs_logit_error for r in self.patched)

    @property
    def argmax_agreement(self) -> float:
        """Worst argmax agreement over the verified forms (fraction of kept positions)."""
        return min(r.argmax_agreement for r in self.patched)

    @property
    def max_kl(self) -> float:
        return max(r.max_kl for r in self.patched)

    @property
    def max_resid_error(self) -> float:
        return max(r.max_resid_error for r in self.patched)

    @property
    def max_resid_rel_error(self) -> float:
        """Worst relative residual error (`FormReport.resid_rel_errors`) over the verified forms."""
        return max(r.max_resid_rel_error for r in self.patched)

    def __getitem__(self, form: str) -> FormReport:
        return self.forms[form]

    def table(self) -> str:
        """The report as a fixed-width text table."""
        names = list(self.forms)
        n_prefix = self.span.start
        what = "Chunk positions" if self.span.n_chunks == 1 else f"{self.span.n_chunks} chunks, positions"
        lines = [
            f"{what} {self.span.describe()} removed; "
            f"{len(self.kept_positions)} kept positions ({n_prefix} before the chunk); "
            f"dtype {str(self.dtype).replace('torch.', '')}",
        ]
        if self.weight_form:
            lines.append(f"weight form: {self.weight_form}")
        lines.append("")
        lines.append("max |resid_post error| per layer: absolute, and relative to the residual's size at its position")
        lines.append("layer " + "".join(f"{n:>14}{'(relative)':>12}" for n in names))
        n_layers = len(next(iter(self.forms.values())).resid_errors)
        for layer in range(n_layers):
            row = "".join(f"{float(self.forms[n].resid_errors[layer]):>14.3e}"
                          f"{float(self.forms[n].resid_rel_errors[layer]):>12.1e}" for n in names)
            lines.append(f"{layer:>5} " + row)
        lines.append("")
        lines.append("output   " + "".join(f"{n:>14}" for n in names))
        for label, get, fmt in (
            ("max|dlogit|", lambda r: r.max_abs_logit_error, "{:>14.3e}"),
            ("max KL", lambda r: r.max_kl, "{:>14.3e}"),
            ("argmax", lambda r: 100 * r.argmax_agreement, "{:>13.1f}%"),
        ):
            lines.append(f"{label:<9}" + "".join(fmt.format(get(self.forms[n])) for n in names))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        what = "chunk" if self.span.n_chunks == 1 else f"{self.span.n_chunks} chunks"
        forms = "; ".join(
            f"{name}: max |dlogit| {r.max_abs_logit_error:.2e}, argmax {100 * r.argmax_agreement:.1f}%"
            for name, r in self.forms.items()
        )
        return (
            f"VerificationReport({what} {self.span.describe()} removed of {self.span.n_pos} tokens, "
            f"{len(self.kept_positions)} kept positions, {str(self.dtype).replace('torch.', '')}; {forms})"
        )


def verify(
    model: Model,
    updates: ImplicitUpdates,
    forms: Sequence[str] = ("activation", "weight"),
) -> VerificationReport:
    """Run the prompt WITHOUT the chunk, patched, and compare with the full run.

    Kept tokens keep their original positions in every reduced run (THEORY 1). The forms:
    ``"activation"`` adds ``updates.vectors`` at ``blocks.{l}.hook_attn_out`` through temporary
    hooks; ``"weight"`` runs the reduced prompt through the model with really patched parameters
    and no hooks (see [`tl_thoughts.exact_weight_patch`][]). The unpatched reduced run is always
    reported as the baseline. Every run is in the dtype the updates were computed in
    (``report.dtype``). The model is restored afterwards, also if an error is raised.

    Args:
        model: The model the updates were computed on (no hooks attached).
        updates: From [`tl_thoughts.implicit_updates`][].
        forms: Which patched forms to verify.

    Returns:
        The report (print it for a table; ``.max_abs_logit_error``, ``.argmax_agreement``).

    Raises:
        InputError: an unknown form.
        InputError: updates computed for a subset of layers or positions, or on another model
            (or on this one with other weights: [`ImplicitUpdates.check_model`][]).
        ZeroDenominatorError: the weight form has no exact solution (see ``exact_weight_patch``).

    Example:
        >>> report = tl_thoughts.verify(model, updates)
        >>> report.max_abs_logit_error < 1e-10, report.argmax_agreement
        (True, 1.0)
    """
    unknown = set(forms) - set(FORMS[1:])
    if unknown or not forms:
        raise InputError(f"forms must be a non-empty subset of {FORMS[1:]}, got {tuple(forms)}")
    _tl.model_spec(model)
    _tl.check_no_hooks(model)
    updates.require_complete("verify")
    updates.check_model(model)
    with _tl.computing_in(model, updates.dtype):
        return _verify(model, updates, forms)


def _verify(model: Model, updates: ImplicitUpdates, forms: Sequence[str]) -> VerificationReport:
    spec = _tl.model_spec(model)
    span = updates.span
    kept = span.kept_positions.to(updates.tokens.device)
    reduced = updates.tokens[:, kept]
    resid_names = [_tl.resid_post_name(layer) for layer in range(spec.n_layers)]
    full_logits, full_cache = _tl.forward(model, updates.tokens, cache_names=resid_names)
    reference = (full_logits[0, kept], [full_cache[n][kept] for n in resid_names])
    runs: dict[str, tuple[Tensor, list[Tensor]]] = {}
    with _tl.original_positions(model, spec, kept):
        logits, cache = _tl.forward(model, reduced, cache_names=resid_names)
        runs["unpatched"] = (logits[0], [cache[n] for n in resid_names])
        if "activation" in forms:
            logits, cache = _tl.forward(model, reduced, fwd_hooks=updates.hooks(), cache_names=resid_names)
            runs["activation"] = (logits[0], [cache[n] for n in resid_names])
    weight_form = None
    if "weight" in forms:
        patch = exact_weight_patch(model, updates)
        weight_form = patch.description
        with patch.applied(model):
            logits, _ = _tl.forward(model, reduced)  # logits from a call with no hook at all
            _, cache = _tl.forward(model, reduced, cache_names=resid_names)  # read-only hooks
        runs["weight"] = (logits[0], [cache[n] for n in resid_names])

    return VerificationReport(
        forms={name: _compare(name, reference, run) for name, run in runs.items()},
        kept_positions=span.kept_positions,
        full_logits=reference[0].cpu(),
        span=span,
        dtype=spec.dtype,
        weight_form=weight_form,
    )


@contextlib.contextmanager
def reduced_positions(model: Model, updates: ImplicitUpdates | Span) -> Iterator[Int[Tensor, "1 T"]]:
    """Inside, a run of the REDUCED prompt (the prompt without the chunk) puts each of its tokens
    at its ORIGINAL position, as in the full prompt (THEORY 1); yields the reduced prompt
    (``updates.reduced_tokens``).

    The model's position tables are replaced for the duration of the context: row ``i`` of the
    learned ``W_pos``, or of every block's rotary ``sin``/``cos`` tables, holds the original
    position of the reduced prompt's token ``i``; the original tensors are put back on exit, also
    on an exception, so the model is bit-identical afterwards. Any run inside sees them:
    ``model(reduced)``, ``model.run_with_hooks(reduced, fwd_hooks=updates.hooks())``,
    ``model.run_with_cache(reduced)``, with a batch of copies of the reduced prompt too.

    Only the first ``T`` rows move: run the reduced prompt itself, from position 0, without
    padding and without a key-value cache (not ``model.generate``). Without this context, the
    tokens after the chunk sit ``len(chunk)`` positions earlier than in the full prompt, and
    ``updates.hooks()`` (which reproduce the chunk's effect at the original positions) miss the
    full run's logits (see ``docs/your_model.md``).

    Args:
        model: The model the updates were computed on.
        updates: From [`tl_thoughts.implicit_updates`][] (or just its ``span``; the reduced prompt
            is then not known and ``None`` is yielded).

    Raises:
        ArgumentTypeError: ``updates`` is neither ImplicitUpdates nor a Span.
        InputError: ``model`` is not the updates' ([`ImplicitUpdates.check_model`][]), or a
            kept position lies beyond the model's position tables.

    Example:
        >>> with tl_thoughts.reduced_positions(model, updates) as reduced:
        ...     logits = model.run_with_hooks(reduced, fwd_hooks=updates.hooks())
        >>> full = model(updates.tokens)[0, updates.span.kept_positions]
        >>> bool((logits[0] - full).abs().max() < 1e-10)
        True
    """
    if isinstance(updates, ImplicitUpdates):
        updates.check_model(model)
        span, reduced = updates.span, updates.reduced_tokens
    elif isinstance(updates, Span):
        span, reduced = updates, None
    else:
        raise ArgumentTypeError(
            f"updates: expected ImplicitUpdates (or a Span), got {type(updates).__name__}"
        )
    spec = _tl.model_spec(model)
    with _tl.original_positions(model, spec, span.kept_positions.to(_tl.model_device(model))):
        yield reduced


def run_reduced(
    model: Model,
    updates: ImplicitUpdates,
    fwd_hooks: Sequence[tuple[str, Callable]] = (),
    *,
    patched: bool = True,
    **kwargs: Any,
) -> Any:
    """Run the reduced prompt with its tokens at their original positions
    ([`reduced_positions`][]), in the dtype the updates were computed in, through
    ``model.run_with_hooks``: with the updates' hooks ([`ImplicitUpdates.hooks`][], unless
    ``patched=False``) and then the user's ``fwd_hooks``. The result is the full prompt's run at
    the kept positions (``updates.span.kept_positions``), up to rounding.

    Args:
        model: The model the updates were computed on.
        updates: From [`tl_thoughts.implicit_updates`][].
        fwd_hooks: Your own TransformerLens forward hooks ``(hook_name, fn)``, run after the
            updates' own at the same hook point (they see the patched activation).
        patched: Add the updates' vectors (default); ``False`` runs the reduced prompt alone (the
            chunk's effect is then missing).
        **kwargs: Passed to ``model.run_with_hooks`` (``return_type``, ``stop_at_layer``...). The
            attention mask is all ones unless given.

    Returns:
        What ``model.run_with_hooks`` returns (logits ``[1, T, d_vocab]`` by default).

    Example:
        >>> seen = {}
        >>> def read(resid, hook):
        ...     seen[hook.name] = resid
        >>> logits = tl_thoughts.run_reduced(model, updates, [("blocks.1.hook_resid_post", read)])
        >>> full = model(updates.tokens)[0, updates.span.kept_positions]
        >>> bool((logits[0] - full).abs().max() < 1e-10), tuple(seen["blocks.1.hook_resid_post"].shape)
        (True, (1, 7, 16))
    """
    if not isinstance(updates, ImplicitUpdates):
        raise ArgumentTypeError(f"updates: expected ImplicitUpdates, got {type(updates).__name__}")
    hooks = (updates.hooks() if patched else []) + list(fwd_hooks)
    with _tl.computing_in(model, updates.dtype), reduced_positions(model, updates) as reduced:
        kwargs.setdefault("attention_mask", torch.ones_like(reduced))
        with torch.no_grad():
            return model.run_with_hooks(reduced, fwd_hooks=hooks, **kwargs)


def _compare(
    form: str,
    reference: tuple[Tensor, list[Tensor]],
    run: tuple[Tensor, list[Tensor]],
) -> FormReport:
    ref_logits, ref_resids = reference
    logits, resids = run
    diffs = [(a - b).abs().amax(-1) for a, b in zip(resids, ref_resids)]  # [T] per layer
    scales = [b.abs().amax(-1) for b in ref_resids]
    resid_errors = torch.stack([d.amax() for d in diffs])
    # relative to the residual's size at each position; a zero residual row gives inf (or 0 if the
    # difference is zero too), not a guarded division
    resid_rel_errors = torch.stack([
        torch.where(s > 0, d / torch.where(s > 0, s, torch.ones_like(s)), torch.where(d > 0, torch.inf, 0.0)).amax()
        for d, s in zip(diffs, scales)
    ])
    ref_logp = torch.log_softmax(ref_logits.double(), -1)
    logp = torch.log_softmax(logits.double(), -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return FormReport(
        form=form,
        resid_errors=resid_errors.cpu(),
        resid_rel_errors=resid_rel_errors.cpu(),
        logit_errors=(logits - ref_logits).abs().amax(-1).cpu(),
        kl=kl.cpu(),
        argmax_match=(logits.argmax(-1) == ref_logits.argmax(-1)).cpu(),
        logits=logits.cpu(),
    )
