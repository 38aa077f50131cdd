"""What a reader of each plot sees without the code: a title, axes naming the quantity and the
TransformerLens hook, legend entries saying what each line is, spectra cut at their numerical
rank, token labels with their spaces visible (matplotlib's Agg canvas, no display)."""

import pytest
import torch
from helpers import make_model

import tl_thoughts as tt
from tl_thoughts import analysis, plots

PROMPT = torch.tensor([[3, 17, 5, 41, 8, 22, 9, 30, 11, 2, 47, 13]])
CHUNK = slice(2, 6)
PAIR = (7, 19)


@pytest.fixture(scope="module")
def tiny():
    model = make_model("ln_gelu_learned")
    return model, tt.implicit_updates(model, PROMPT, CHUNK)


def _texts(fig):
    """Every axes' title, labels and legend entries, and the figure's suptitle."""
    out = [fig.get_suptitle()]
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        if ax.get_legend() is not None:
            out += [t.get_text() for t in ax.get_legend().get_texts()]
    return out


def test_head_heatmap_names_layers_heads_and_has_a_title():
    fig = plots.head_heatmap(torch.randn(3, 4), label="logit difference")
    ax = fig.axes[0]
    assert ax.get_title() == "score per head"
    assert "blocks.{l}" in ax.get_ylabel() and "head" in ax.get_xlabel()
    assert fig.axes[1].get_ylabel() == "logit difference"  # the colour bar names the quantity


def test_token_labels_keep_their_spaces():
    tokens = ["<|im_start|>", "go", " ->", " went", "\n"]
    fig = plots.token_bars(torch.arange(5.0), tokens, chunk=slice(1, 2), title="t", label="|v|")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["<|im_start|>", "go", "␣->", "␣went", "\\n"]
    assert labels[2] != labels[1] and " went" != "went"  # a leading space is visible, not dropped
    assert plots.visible_token(" went") == "␣went" and plots.visible_token("went") == "went"
    assert "chunk (removed; no value)" in _texts(fig)
    assert fig.axes[0].get_xlabel().startswith("token")


def test_recovery_curve_label_says_what_k_counts(tiny):
    model, updates = tiny
    by_block = analysis.layer_recovery(model, updates, PAIR)
    by_head = analysis.top_k_recovery(model, updates, PAIR)
    x_block = plots.recovery_curve(by_block).axes[0].get_xlabel()
    x_head = plots.recovery_curve(by_head).axes[0].get_xlabel()
    assert "blocks 0..k-1" in x_block and "heads" not in x_block.split("\n")[0]
    assert "top-k heads" in x_head and "blocks 0..k-1" not in x_head
    for x in (x_block, x_head):
        assert "blocks.{l}.hook_attn_out" in x
    fig = plots.recovery_curve(by_block)
    assert fig.axes[0].get_title().startswith("recovery by depth")
    assert "1: with the chunk" in _texts(fig) and "0: without it, nothing added" in _texts(fig)
    assert list(fig.axes[0].lines[0].get_ydata()) == by_block.recovered.tolist()


def test_spectra_are_cut_at_their_numerical_rank():
    sv = torch.tensor([4.0, 2.0, 1.0, 0.5, 3e-8, 2e-8, 1e-8, 1e-9] + [1e-9] * 40)  # rank 4, then rounding
    other = torch.tensor([1.0, 0.1, 1e-9, 1e-10])  # rank 2
    fig = plots.spectra({"L0 W_in": sv, "L1 W_in": other}, title="thought matrix spectra")
    ax = fig.axes[0]
    assert [len(line.get_xdata()) for line in ax.lines] == [4, 2]
    assert ax.get_xlim()[1] <= 4 + 1
    assert max(max(line.get_xdata()) for line in ax.lines) == 4
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["L0 W_in (rank 4 of 48)", "L1 W_in (rank 2 of 4)"]
    assert ax.get_xlabel().startswith("singular value index")
    assert "numerical rank" in ax.get_legend().get_title().get_text()
    assert ax.get_title() == "thought matrix spectra" and ax.get_ylabel() == "singular value / largest"
    assert min(min(line.get_ydata()) for line in ax.lines) > 1e-6  # no rounding floor drawn


def test_steering_comparison_has_a_title_and_explained_legends():
    n = 3
    cmp = analysis.SteeringComparison([0, 1, 2], *([torch.linspace(-0.5, 0.9, n)] * 3), *([torch.ones(n)] * 3))
    fig = plots.steering_comparison(cmp)
    texts = _texts(fig)
    assert "thought vector v vs mean-difference steering vector s" in texts[0]
    assert not any("residual diff" in t and "difference" not in t for t in texts)
    assert any("hook_resid_mid" in t for t in texts) and any("hook_attn_out" in t for t in texts)
    assert all(ax.get_title() and ax.get_xlabel().startswith("layer") for ax in fig.axes)


def test_verification_report_names_the_hook_and_explains_the_forms(tiny):
    model, updates = tiny
    fig = plots.verification_report(tt.verify(model, updates))
    ax = fig.axes[0]
    assert "blocks.{l}.hook_resid_post" in ax.get_xlabel() and ax.get_title() and ax.get_ylabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend and all(":" in entry for entry in legend), legend
