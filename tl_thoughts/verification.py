"""Numerical verification: the reduced prompt under the patch reproduces the full prompt."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_thoughts import _tl
from tl_thoughts.chunks import Span
from tl_thoughts.errors import InputError
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


@dataclass(frozen=True, eq=False)
class VerificationReport:
    """The verification of :func:`verify`, layer by layer and at the output.

    Attributes:
        forms: form name -> :class:`FormReport`; always has ``"unpatched"`` as the baseline.
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
        """Worst relative residual error (:attr:`FormReport.resid_rel_errors`) over the verified forms."""
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


def verify(
    model: HookedTransformer,
    updates: ImplicitUpdates,
    forms: Sequence[str] = ("activation", "weight"),
) -> VerificationReport:
    """Run the prompt WITHOUT the chunk, patched, and compare with the full run.

    Kept tokens keep their original positions in every reduced run (THEORY 1). The forms:
    ``"activation"`` adds ``updates.vectors`` at ``blocks.{l}.hook_attn_out`` through temporary
    hooks; ``"weight"`` runs the reduced prompt through the model with really patched parameters
    and no hooks (see :func:`tl_thoughts.exact_weight_patch`). The unpatched reduced run is always
    reported as the baseline. Every run is in the dtype the updates were computed in
    (``report.dtype``). The model is restored afterwards, also if an error is raised.

    Args:
        model: The model the updates were computed on (no hooks attached).
        updates: From :func:`tl_thoughts.implicit_updates`.
        forms: Which patched forms to verify.

    Returns:
        The report (print it for a table; ``.max_abs_logit_error``, ``.argmax_agreement``).

    Raises:
        InputError: an unknown form.
        InputError: updates computed for a subset of layers or positions, or on another model
            (or on this one with other weights: :meth:`ImplicitUpdates.check_model`).
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


def _verify(model: HookedTransformer, updates: ImplicitUpdates, forms: Sequence[str]) -> VerificationReport:
    spec = _tl.model_spec(model)
    span = updates.span
    kept = span.kept_positions.to(updates.tokens.device)
    reduced = updates.tokens[:, kept]
    after_rows = torch.arange(span.start, kept.shape[0], device=kept.device)
    resid_names = [_tl.resid_post_name(layer) for layer in range(spec.n_layers)]
    full_logits, full_cache = _tl.forward(model, updates.tokens, cache_names=resid_names)
    reference = (full_logits[0, kept], [full_cache[n][kept] for n in resid_names])
    tables = _tl.position_tables(model, spec, kept)

    runs: dict[str, tuple[Tensor, list[Tensor]]] = {}
    with _tl.swapped_tensors(model, tables):
        logits, cache = _tl.forward(model, reduced, cache_names=resid_names)
        runs["unpatched"] = (logits[0], [cache[n] for n in resid_names])
        if "activation" in forms:
            hooks = [
                (_tl.attn_out_name(layer), _tl.add_at_rows_hook(after_rows, updates.vectors[layer]))
                for layer in range(spec.n_layers)
            ]
            logits, cache = _tl.forward(model, reduced, fwd_hooks=hooks, cache_names=resid_names)
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
