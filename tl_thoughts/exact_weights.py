"""The chunk's exact effect as REAL weight patches of the reduced prompt's model (THEORY 3).

With one kept token (Dherin et al.'s setting): rank-1 patches of the MLP input matrices
(``W_in``, and ``W_gate`` for gated MLPs) plus the virtual weight vector on ``b_out``.
With T kept tokens (a prefix, several query tokens): the minimum-norm rank <= T patches of the MLP
input matrices (prefix rows with a zero target) and of ``W_out`` (carrying the vectors).
Attention-only models carry the vectors on ``b_O`` (one token) or ``W_O`` (T tokens). Blocks with
norms after their sublayers (Gemma 2/3, OLMo 2): an output-side patch after Goldwaser et al. with
one token (rank-1 ``W_out`` and the post-MLP norm's scale), the ``W_O`` form with several (see
[`exact_weight_patch`][]).
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import FactoredMatrix

from tl_thoughts import _math, _tl
from tl_thoughts._tl import Model
from tl_thoughts.updates import ImplicitUpdates


@dataclass(frozen=True, eq=False)
class ExactWeightPatch:
    """Per-block weight deltas that make the reduced prompt reproduce the full prompt.

    Attributes:
        matrices: TransformerLens parameter name (e.g. ``"blocks.3.mlp.W_in"``) -> the delta as a
            ``FactoredMatrix`` of rank <= T (``left [d_in, T] @ right [T, d_out]``).
        biases: parameter name (``"blocks.3.mlp.b_out"`` or ``"blocks.3.attn.b_O"``) -> the delta
            vector ``[d_model]``.
        n_kept: T, the number of tokens of the reduced prompt.
        kept_positions: their positions in the full prompt.
        description: a short human-readable summary of the form used.
        scales: parameter name of a post-MLP norm's scale (``"blocks.3.ln2_post.w"``) -> its delta
            ``[d_model]`` (the output-side patch of post-norm blocks, one token).
        dtype: the dtype the patch was computed in; [`applied`][] runs the model in it.
    """

    matrices: dict[str, FactoredMatrix]
    biases: dict[str, Float[Tensor, " d_model"]]
    n_kept: int
    kept_positions: Tensor
    description: str
    scales: dict[str, Float[Tensor, " d_model"]] = field(default_factory=dict)
    dtype: torch.dtype | None = None

    @torch.no_grad()
    def parameters(self, model: Model) -> dict[str, Tensor]:
        """The patched parameters (original + delta), dense, keyed by parameter name."""
        dense = {name: delta.AB for name, delta in self.matrices.items()}
        return _tl.patched_values(model, {**dense, **self.biases, **self.scales})

    @contextlib.contextmanager
    def applied(self, model: Model) -> Iterator[Model]:
        """Context manager: run ``model`` on the REDUCED prompt with the patched weights and the
        kept tokens at their original positions, in the patch's dtype; everything is restored on
        exit (also on errors)."""
        with _tl.computing_in(model, self.dtype or model.cfg.dtype):
            spec = _tl.model_spec(model)
            kept = self.kept_positions.to(_tl.model_device(model))
            with _tl.original_positions(model, spec, kept), _tl.swapped_tensors(model, self.parameters(model)):
                yield model


@torch.no_grad()
def exact_weight_patch(model: Model, updates: ImplicitUpdates) -> ExactWeightPatch:
    """Fold the token-dependent updates into pure weight patches of every block (THEORY 3).

    The forms, per block:

    - pre-norm blocks with an MLP (the papers' form): minimum-norm rank <= T patches of the MLP
      input matrices (``W_in``, and ``W_gate`` for gated MLPs) so that the MLP sees the full run's
      input, and the vectors on ``b_out`` (T = 1) or as a minimum-norm ``W_out`` patch;
    - blocks with norms after the attention and the MLP (Gemma 2/3, OLMo 2), one kept token:
      rank-1 MLP input patches (Goldwaser et al.), then the vector carried through the post-MLP
      RMS norm: a rank-1 ``W_out`` patch adds ``c * vector / w`` to the MLP output (``c``: the
      full run's norm scale, ``w``: the norm's weight) and one common factor of ``w`` undoes the
      changed norm (``_math.rms_post_norm_patch``; where ``w`` is zero, Goldwaser et
      al.'s element-wise scale patch). Their element-wise patch everywhere, ``dw = vector / f_C``,
      is exact too but amplifies rounding from block to block on real weights (Gemma 3 270M);
    - attention-only blocks, and post-norm blocks with several kept tokens (a per-coordinate scale
      carries one vector only): the change of the attention output before its norm, on ``b_O``
      (T = 1) or as a minimum-norm rank <= T ``W_O`` patch from the reduced head outputs.

    Args:
        model: The model the updates were computed on.
        updates: From [`tl_thoughts.implicit_updates`][], every block and kept position.

    Returns:
        The patch; apply it with ``patch.applied(model)`` to the reduced prompt.

    Raises:
        ZeroDenominatorError: a zero-norm MLP input or hidden row, linearly dependent inputs, more
            kept tokens than the patched matrix's input dimension, or (post-norm blocks) a
            coordinate where the post-MLP norm's weight and the MLP output are both zero: no exact
            patch of this form exists.
        InputError: updates computed for a subset of layers or positions, or on another model
            ([`ImplicitUpdates.check_model`][]).

    Example:
        >>> patch = tl_thoughts.exact_weight_patch(model, updates)
        >>> reduced = updates.tokens[:, updates.span.kept_positions]
        >>> with patch.applied(model):
        ...     logits = model(reduced)
        >>> bool((logits[0, -1] - model(updates.tokens)[0, -1]).abs().max() < 1e-10)
        True
    """
    _tl.model_spec(model)
    _tl.check_no_hooks(model)
    updates.require_complete("exact_weight_patch")
    updates.check_model(model)
    with _tl.computing_in(model, updates.dtype):
        return _exact_weight_patch(model, updates)


def _exact_weight_patch(model: Model, updates: ImplicitUpdates) -> ExactWeightPatch:
    spec = _tl.model_spec(model)
    span = updates.span
    kept = span.kept_positions.to(updates.tokens.device)
    n_prefix, T = span.start, kept.shape[0]
    if not spec.has_mlp or (spec.post_norm and (T > 1 or spec.parallel_attn_mlp)):
        form = "attention"
    elif spec.post_norm:
        form = "goldwaser"
    else:
        form = "mlp"
    names = []
    for layer in range(spec.n_layers):
        if form == "attention":
            names += [_tl.pattern_name(layer), _tl.v_name(layer), _tl.z_name(layer)]
        else:
            names.append(_tl.mlp_input_resid_name(spec, layer))
            names.append(_tl.mlp_post_name(layer))
    _, cache = _tl.forward(model, updates.tokens, cache_names=names)
    matrices: dict[str, FactoredMatrix] = {}
    biases: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    for layer in range(spec.n_layers):
        if form == "attention":
            # the change of the attention output before any post-attention norm
            pre = updates.vectors if updates.pre_norm_vectors is None else updates.pre_norm_vectors
            z_full = cache[_tl.z_name(layer)]
            _, _, z_red = _math.head_updates(
                cache[_tl.pattern_name(layer)][:, span.positions],
                _tl.expand_kv_heads(spec, cache[_tl.v_name(layer)]),
                z_full[span.positions],
                _tl.W_O(model, layer),
                span.chunk_mask.to(kept.device),
            )
            z_rows = torch.cat([z_full[:n_prefix], z_red]).flatten(1)  # [T, head*d_head]
            pre_rows = _with_zero_prefix(pre[layer], n_prefix)
            _fold_vectors(layer, "W_O", "b_O", z_rows, pre_rows, matrices, biases)
            continue
        delta_rows = _with_zero_prefix(updates.vectors[layer], n_prefix)  # [T, d_model]
        resid = cache[_tl.mlp_input_resid_name(spec, layer)]
        a_prefix = _tl.mlp_norm(model, layer, resid[:n_prefix])
        assert updates.mlp_in is not None and updates.mlp_in_with_chunk is not None
        a_rows = torch.cat([a_prefix, updates.mlp_in[layer]])  # reduced MLP inputs [T, d]
        shift = _with_zero_prefix(updates.mlp_in_with_chunk[layer] - updates.mlp_in[layer], n_prefix)
        if not spec.parallel_attn_mlp:  # parallel blocks: the MLP input is unchanged
            for name in spec.mlp_input_matrices:
                W = _tl.mlp_matrix(model, layer, name)
                pname = _tl.param_name(layer, name)
                left, right = _math.min_norm_factors(a_rows, shift @ W, pname)
                matrices[pname] = FactoredMatrix(left, right)
        # with the input patches, the reduced run's hidden rows equal the full run's
        if form == "mlp":
            hidden = cache[_tl.mlp_post_name(layer)][kept]
            _fold_vectors(layer, "W_out", "b_out", hidden, delta_rows, matrices, biases)
        else:
            # post-MLP norm: the MLP output gains c * delta / w (a rank-1 W_out patch on the full
            # run's hidden row) and one common factor of the norm's scale undoes its new norm
            hidden = cache[_tl.mlp_post_name(layer)][kept[0]]
            W_out = _tl.mlp_matrix(model, layer, "W_out")
            y = hidden @ W_out + _tl.weight(model, _tl.param_name(layer, "b_out"))
            pname = _tl.norm_scale_name(layer, spec.mlp_post_norm)
            dy, dw = _math.rms_post_norm_patch(y, delta_rows[0], _tl.weight(model, pname),
                                                _tl.norm_eps(model, layer, spec.mlp_post_norm), pname)
            left, right = _math.min_norm_factors(hidden[None], dy[None], _tl.param_name(layer, "W_out"))
            matrices[_tl.param_name(layer, "W_out")] = FactoredMatrix(left, right)
            scales[pname] = dw
    inputs = "" if spec.parallel_attn_mlp else "/".join(spec.mlp_input_matrices) + " + "
    if form == "attention":
        where = " (before the post-attention norm)" if spec.attn_post_norm else ""
        description = ("b_O" if T == 1 else f"min-norm rank<={T} W_O") + where
    elif form == "goldwaser":
        description = f"rank-1 {inputs}rank-1 W_out + {spec.mlp_post_norm}.w common factor (post-norm)"
    else:
        description = f"rank-1 {inputs}b_out" if T == 1 else f"min-norm rank<={T} {inputs}W_out"
    return ExactWeightPatch(
        matrices=matrices,
        biases=biases,
        n_kept=T,
        kept_positions=span.kept_positions,
        description=description,
        scales=scales,
        dtype=updates.dtype,
    )


def _with_zero_prefix(rows: Float[Tensor, "kept d"], n_prefix: int) -> Float[Tensor, "T d"]:
    """Prepend ``n_prefix`` zero rows (the chunk changes nothing before itself)."""
    return torch.cat([rows.new_zeros(n_prefix, rows.shape[1]), rows])


def _fold_vectors(
    layer: int,
    matrix: str,
    bias: str,
    inputs: Float[Tensor, "T d_in"],
    vectors: Float[Tensor, "T d_model"],
    matrices: dict[str, FactoredMatrix],
    biases: dict[str, Tensor],
) -> None:
    """Carry the per-token vectors as weights: on the bias when there is one token, else as the
    minimum-norm patch of the output matrix that maps each token's input row to its vector."""
    if inputs.shape[0] == 1:
        biases[_tl.param_name(layer, bias)] = vectors[0]
    else:
        pname = _tl.param_name(layer, matrix)
        left, right = _math.min_norm_factors(inputs, vectors, pname)
        matrices[pname] = FactoredMatrix(left, right)
