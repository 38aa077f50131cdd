"""Plots of the analysis: layer-by-head heatmaps, per-token bars over the prompt, top-k recovery
curves, spectra, steering comparisons and the verification report.

Every function returns a matplotlib ``Figure`` (it renders when it is the last expression of a
notebook cell with ``%matplotlib inline`` on, as in the tutorials' first cell) and saves it as PNG when given ``save=path``. Figures are built without pyplot, so
scripts need no display and leak no global figure state. Each figure has a title, axes naming
the quantity and the TransformerLens hook it is read at (``blocks.{l}.hook_resid_post``, ...), and
legend entries that say what each line is; token labels keep their spaces, shown as ``␣``.
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


def visible_token(token: str) -> str:
    """A token string as a tick label: escapes (``\\n``) as ``repr`` writes them, spaces as ``␣``
    (a leading space is part of the token: `` went`` and ``went`` are different tokens).

    Example:
        >>> visible_token(" went"), visible_token("\\n"), visible_token("it's")
        ('␣went', '\\\\n', "it's")
    """
    return repr(token)[1:-1].replace(" ", "␣")


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
            [`tl_thoughts.analysis.head_attribution`][] returns a column) with ``n_heads``.
        n_heads: Needed when ``scores`` is flat.
        title: Figure title (default: "score per head").
        label: Colour bar label: the quantity.
        diverging: Symmetric red-blue colour map around 0 (default: when scores take both signs).
        save: Optional PNG path.

    Example:
        >>> fig = head_heatmap(torch.randn(2, 4), title="direct effect")
        >>> fig.axes[0].get_ylabel()
        'layer l (blocks.{l})'
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
    ax.set_xlabel("head h (blocks.{l}.attn, head L{l}H{h})")
    ax.set_ylabel("layer l (blocks.{l})")
    step = max(1, n_layers // 16)
    ax.set_yticks(range(0, n_layers, step))
    ax.set_xticks(range(n_h))
    ax.set_title(title or "score per head")
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
        str_tokens: The ``pos`` token strings (``model.to_str_tokens``); shown with
            [`visible_token`][] (spaces as ``␣``).
        chunk: The chunk's positions (a slice, or a list of slices: ``updates.chunks``), shaded.
        title: Figure title (default: "value per token").
        label: Y-axis label: the quantity.
        save: Optional PNG path.

    Example:
        >>> fig = token_bars(torch.tensor([0.0, 1.0, 2.0]), ["a", " b", "\\n"], chunk=slice(0, 1))
        >>> " ".join(t.get_text() for t in fig.axes[0].get_xticklabels())
        'a ␣b \\\\n'
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
            ax.axvspan(c.start - 0.5, c.stop - 0.5, color="tab:orange", alpha=0.2,
                       label="chunk (removed; no value)" if i == 0 else None)
        ax.legend(loc="upper left", fontsize=7)
    ax.set_xticks(range(n))
    ax.set_xticklabels([visible_token(t) for t in str_tokens], rotation=90, fontsize=7)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel("token (position in the prompt; ␣ = space)")
    ax.set_ylabel(label)
    ax.set_title(title or "value per token")
    return _finish(fig, save)


def _by_block(curve: "RecoveryCurve") -> bool:
    """Whether the curve adds back whole blocks ([`tl_thoughts.analysis.layer_recovery`][],
    components ``L{l}``) rather than heads (``L{l}H{h}``)."""
    return all(label[:1] == "L" and label[1:].isdigit() for label in curve.order)


def recovery_curve(curve: "RecoveryCurve", *, title: str = "", save: str | Path | None = None) -> "Figure":
    """The causal check: fraction of the chunk's effect recovered against k, the number of
    components whose implicit-update vectors are added back (at ``blocks.{l}.hook_attn_out``) to
    the run without the chunk. The x label says what k counts: the top-k heads, best first
    ([`tl_thoughts.analysis.top_k_recovery`][]), or the blocks ``0..k-1``, all their heads
    ([`tl_thoughts.analysis.layer_recovery`][]).

    Example:
        >>> fig = recovery_curve(tl_thoughts.analysis.layer_recovery(model, updates, (7, 3)), save="curve.png")
        >>> print(fig.axes[0].get_xlabel())
        k: blocks 0..k-1 added back
        (all heads; vectors at blocks.{l}.hook_attn_out)
    """
    fig = _figure(5.0, 3.4)
    ax = fig.add_subplot()
    blocks = _by_block(curve)
    ax.plot(_numpy(curve.ks), _numpy(curve.recovered), marker="o", markersize=3,
            label="blocks 0..k-1 added back" if blocks else "top-k heads added back")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8, label="1: with the chunk")
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=0.8, label="0: without it, nothing added")
    if blocks:
        ax.set_xlabel("k: blocks 0..k-1 added back\n(all heads; vectors at blocks.{l}.hook_attn_out)")
        default = "recovery by depth: the first k blocks' vectors added back"
    else:
        ax.set_xlabel("k: top-k heads added back, best first\n(vectors at blocks.{l}.hook_attn_out)")
        default = f"recovery by the top-k heads (first: {', '.join(curve.order[:3])})"
    ax.set_ylabel("fraction of the chunk's effect\non the metric recovered")
    ax.set_title(title or default, fontsize=10)
    ax.legend(fontsize=7)
    return _finish(fig, save)


def spectra(
    spectra: Mapping[str, Float[Tensor, " rank"]],
    *,
    title: str = "singular values",
    normalise: bool = True,
    rtol: float = 1e-6,
    save: str | Path | None = None,
) -> "Figure":
    """Singular-value spectra on a log scale, one line per named spectrum, each cut at its
    numerical rank: the singular values above ``rtol`` times the largest (below it, rounding
    noise of a low-rank matrix), the rank said in the legend.

    Args:
        spectra: Name (e.g. ``"L3 W_in"``) -> descending singular values.
        normalise: Divide each spectrum by its largest value (zero spectra are drawn unscaled).
        rtol: The numerical rank's threshold, relative to the largest singular value.
        save: Optional PNG path.

    Example:
        >>> fig = spectra({"L0 W_in": torch.tensor([3.0, 1.0, 0.1, 1e-9])})
        >>> fig.axes[0].get_yscale(), fig.axes[0].get_legend().get_texts()[0].get_text()
        ('log', 'L0 W_in (rank 3 of 4)')
    """
    if not spectra:
        raise InputError("no spectrum to plot")
    fig = _figure(5.0, 3.4)
    ax = fig.add_subplot()
    longest = 1
    for name, sv in spectra.items():
        data = _numpy(sv)
        rank = int((data > rtol * data[0]).sum()) if len(data) and data[0] > 0 else 0
        shown = data[: max(rank, 1)]
        if normalise and len(shown) and shown[0] > 0:
            shown = shown / shown[0]
        longest = max(longest, len(shown))
        ax.plot(range(1, len(shown) + 1), shown, marker=".", label=f"{name} (rank {rank} of {len(data)})")
    ax.set_yscale("log")
    ax.set_xlim(0.5, longest + 0.5)
    ax.set_xlabel("singular value index (descending)")
    ax.set_ylabel("singular value" + (" / largest" if normalise else ""))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, title=f"cut at the numerical rank: σ > {rtol:.0e} σ_max", title_fontsize=7)
    return _finish(fig, save)


def steering_comparison(cmp: "SteeringComparison", *, save: str | Path | None = None) -> "Figure":
    """Per fitted layer: cosines between the thought vector ``v`` (the patch's bias), the
    mean-difference steering vector ``s`` (at ``blocks.{l}.hook_attn_out``) and the accumulated
    residual difference ``r`` entering the MLP (full minus reduced ``blocks.{l}.hook_resid_mid``)
    (left), and their norms (right).

    Example:
        >>> fig = steering_comparison(tl_thoughts.analysis.steering_comparison(patch))
        >>> len(fig.axes)
        2
    """
    fig = _figure(10.0, 3.8)
    left, right = fig.subplots(1, 2)
    panels = (
        (left, "cosines", "cosine", "linear", (
            ("cos(v, s): thought vs steering vector", cmp.cos_vector_steering),
            ("cos(v, r): thought vs residual difference", cmp.cos_vector_residual),
            ("cos(s, r): steering vs residual difference", cmp.cos_steering_residual),
        )),
        (right, "norms", "norm (L2)", "log", (
            ("|v|: thought vector (the patch's bias)", cmp.norm_vector),
            ("|s|: mean-difference steering vector (hook_attn_out)", cmp.norm_steering),
            ("|r|: residual difference, full - reduced (hook_resid_mid)", cmp.norm_residual),
        )),
    )
    for ax, panel, ylabel, scale, series in panels:
        for name, values in series:
            ax.plot(cmp.layers, _numpy(values), marker="o", markersize=3, label=name)
        ax.set_xlabel("layer l (fitted blocks.{l})")
        ax.set_ylabel(ylabel)
        ax.set_yscale(scale)
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=6)
    left.set_ylim(-1.05, 1.05)
    fig.suptitle("thought vector v vs mean-difference steering vector s vs accumulated residual difference r",
                 fontsize=10)
    return _finish(fig, save)


FORM_LEGEND = {
    "unpatched": "unpatched: chunk removed, nothing added",
    "activation": "activation: the vectors added by hooks",
    "weight": "weight: the patched weights",
}


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
        ax.plot(range(len(errors)), errors, marker="o", markersize=3,
                label=FORM_LEGEND.get(form.form, form.form))
    ax.set_yscale("log")
    ax.set_xlabel("layer l (blocks.{l}.hook_resid_post)")
    ax.set_ylabel("max |reduced - full| residual\nat the kept positions")
    ax.legend(fontsize=7)
    ax.set_title("run without the chunk vs the full run, per layer", fontsize=10)
    return _finish(fig, save)
