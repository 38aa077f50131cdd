"""Plots of the analysis: layer-by-head heatmaps, per-token bars over the prompt, top-k recovery
curves, spectra, steering comparisons and the verification report.

Every function returns a matplotlib ``Figure`` (it renders when it is the last expression of a
notebook cell) and saves it as PNG when given ``save=path``. Figures are built without pyplot, so
scripts need no display and leak no global figure state. Axes carry TransformerLens labels
(``L{l}H{h}``, layer and head indices, token strings).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from tl_thoughts.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from tl_thoughts.analysis import RecoveryCurve, SteeringComparison
    from tl_thoughts.verification import VerificationReport


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _finish(fig: "Figure", save: str | Path | None) -> "Figure":
    if save is not None:
        path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def _numpy(x: Tensor | Sequence[float]):
    return torch.as_tensor(x).detach().double().cpu().numpy()


def head_heatmap(
    scores: Float[Tensor, "layer head"] | Float[Tensor, " component"],
    n_heads: int | None = None,
    *,
    title: str = "",
    label: str = "",
    diverging: bool | None = None,
    save: str | Path | None = None,
) -> "Figure":
    """Layer-by-head heatmap of one score per head.

    Args:
        scores: ``[layer, head]``, or ``[layer * head]`` stacked layer-major (as
            :func:`tl_thoughts.analysis.head_attribution` returns a column) with ``n_heads``.
        n_heads: Needed when ``scores`` is flat.
        title: Figure title.
        label: Colour bar label.
        diverging: Symmetric red-blue colour map around 0 (default: when scores take both signs).
        save: Optional PNG path.

    Example:
        >>> fig = head_heatmap(torch.randn(2, 4), title="direct effect")
        >>> fig.axes[0].get_ylabel()
        'layer'
    """
    scores = torch.as_tensor(scores).detach()
    if scores.ndim == 1:
        if n_heads is None or n_heads <= 0 or scores.shape[0] % n_heads:
            raise InputError("flat scores need n_heads dividing their length")
        scores = scores.reshape(-1, n_heads)
    if scores.ndim != 2:
        raise InputError(f"scores must be [layer, head] or [layer * head], got {tuple(scores.shape)}")
    data = _numpy(scores)
    n_layers, n_h = data.shape
    if diverging is None:
        diverging = bool(data.min() < 0 < data.max())
    fig = _figure(1.2 + 0.35 * n_h, 1.0 + 0.3 * n_layers)
    ax = fig.add_subplot()
    if diverging:
        bound = float(abs(data).max()) or 1.0
        image = ax.imshow(data, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    else:
        image = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    step = max(1, n_layers // 16)
    ax.set_yticks(range(0, n_layers, step))
    ax.set_xticks(range(n_h))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    return _finish(fig, save)


def token_bars(
    values: Float[Tensor, " pos"],
    str_tokens: Sequence[str],
    *,
    chunk: slice | Sequence[slice] | None = None,
    title: str = "",
    label: str = "",
    save: str | Path | None = None,
) -> "Figure":
    """Bars over the prompt's tokens (one value per token), the chunk(s) shaded.

    Args:
        values: ``[pos]``, one value per token (NaN for tokens without a value, e.g. the chunk).
        str_tokens: The ``pos`` token strings (``model.to_str_tokens``).
        chunk: The chunk's positions (a slice, or a list of slices: ``updates.chunks``), shaded.
        title: Figure title.
        label: Y-axis label.
        save: Optional PNG path.

    Example:
        >>> fig = token_bars(torch.tensor([0.0, 1.0, 2.0]), ["a", "b", "c"], chunk=slice(0, 1))
        >>> " ".join(t.get_text() for t in fig.axes[0].get_xticklabels())
        'a b c'
    """
    values = torch.as_tensor(values).detach()
    if values.ndim != 1 or values.shape[0] != len(str_tokens):
        raise InputError(f"values must be [pos] with pos = {len(str_tokens)} tokens, got {tuple(values.shape)}")
    n = len(str_tokens)
    fig = _figure(max(4.0, 0.28 * n + 1.5), 3.0)
    ax = fig.add_subplot()
    ax.bar(range(n), _numpy(values), color="tab:blue")
    if chunk is not None:
        for i, c in enumerate([chunk] if isinstance(chunk, slice) else chunk):
            ax.axvspan(c.start - 0.5, c.stop - 0.5, color="tab:orange", alpha=0.2, label="chunk" if i == 0 else None)
        ax.legend(loc="upper left")
    ax.set_xticks(range(n))
    ax.set_xticklabels([repr(t)[1:-1] for t in str_tokens], rotation=90, fontsize=7)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylabel(label)
    ax.set_title(title)
    return _finish(fig, save)


def recovery_curve(curve: "RecoveryCurve", *, title: str = "", save: str | Path | None = None) -> "Figure":
    """The top-k causal check: fraction of the chunk's effect recovered against k.

    Example:
        >>> fig = recovery_curve(curve, save="curve.png")
        >>> fig.axes[0].get_xlabel()
        'k (heads added back, best first)'
    """
    fig = _figure(5.0, 3.2)
    ax = fig.add_subplot()
    ax.plot(_numpy(curve.ks), _numpy(curve.recovered), marker="o", markersize=3)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("k (heads added back, best first)")
    ax.set_ylabel("fraction of the effect recovered")
    ax.set_title(title or f"top-k heads (first: {', '.join(curve.order[:3])})")
    return _finish(fig, save)


def spectra(
    spectra: Mapping[str, Float[Tensor, " rank"]],
    *,
    title: str = "singular values",
    normalise: bool = True,
    save: str | Path | None = None,
) -> "Figure":
    """Singular-value spectra on a log scale, one line per named spectrum.

    Args:
        spectra: Name (e.g. ``"L3 W_in"``) -> descending singular values.
        normalise: Divide each spectrum by its largest value (zero spectra are drawn unscaled).
        save: Optional PNG path.

    Example:
        >>> fig = spectra({"L0 W_in": torch.tensor([3.0, 1.0, 0.1])})
        >>> fig.axes[0].get_yscale()
        'log'
    """
    if not spectra:
        raise InputError("no spectrum to plot")
    fig = _figure(5.0, 3.2)
    ax = fig.add_subplot()
    for name, sv in spectra.items():
        data = _numpy(sv)
        if normalise and len(data) and data[0] > 0:
            data = data / data[0]
        ax.plot(range(1, len(data) + 1), data, marker=".", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value" + (" / largest" if normalise else ""))
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _finish(fig, save)


def steering_comparison(cmp: "SteeringComparison", *, save: str | Path | None = None) -> "Figure":
    """Per layer: cosines between the thought vector, the mean-difference steering vector and the
    accumulated residual difference (left), and their norms (right).

    Example:
        >>> fig = steering_comparison(tl_thoughts.analysis.steering_comparison(patch))
        >>> len(fig.axes)
        2
    """
    fig = _figure(9.0, 3.2)
    left, right = fig.subplots(1, 2)
    panels = (
        (left, "cosine", "linear", (
            ("cos(thought, steering)", cmp.cos_vector_steering),
            ("cos(thought, residual diff)", cmp.cos_vector_residual),
            ("cos(steering, residual diff)", cmp.cos_steering_residual),
        )),
        (right, "norm", "log", (
            ("|thought vector|", cmp.norm_vector),
            ("|steering vector|", cmp.norm_steering),
            ("|residual diff|", cmp.norm_residual),
        )),
    )
    for ax, ylabel, scale, series in panels:
        for name, values in series:
            ax.plot(cmp.layers, _numpy(values), marker="o", markersize=3, label=name)
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_yscale(scale)
        ax.legend(fontsize=7)
    left.set_ylim(-1.05, 1.05)
    return _finish(fig, save)


def verification_report(report: "VerificationReport", *, save: str | Path | None = None) -> "Figure":
    """Per-layer max |residual error| of each form of a verification report (log scale).

    Example:
        >>> fig = verification_report(tl_thoughts.verify(model, updates))
        >>> fig.axes[0].get_yscale()
        'log'
    """
    fig = _figure(5.0, 3.2)
    ax = fig.add_subplot()
    tiny = torch.finfo(torch.float64).tiny
    for form in report.forms.values():
        errors = _numpy(form.resid_errors).clip(min=tiny)  # log axis: exact zeros drawn at the floor
        ax.plot(range(len(errors)), errors, marker="o", markersize=3, label=form.form)
    ax.set_yscale("log")
    ax.set_xlabel("layer (blocks.{l}.hook_resid_post)")
    ax.set_ylabel("max |residual error|")
    ax.legend(fontsize=7)
    ax.set_title("reduced run vs full run")
    return _finish(fig, save)
