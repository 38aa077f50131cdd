"""The chunk's exact effect as REAL weight patches of the reduced prompt's model (THEORY 3).

With one kept token (Dherin et al.'s setting): rank-1 patches of the MLP input matrices
(``W_in``, and ``W_gate`` for gated MLPs) plus the virtual weight vector on ``b_out``.
With T kept tokens (a prefix, several query tokens): the minimum-norm rank <= T patches of the MLP
input matrices (prefix rows with a zero target) and of ``W_out`` (carrying the vectors).
Attention-only models carry the vectors on ``b_O`` (one token) or ``W_O`` (T tokens).
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import FactoredMatrix, HookedTransformer

from tl_thoughts import _math, _tl
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
    """

    matrices: dict[str, FactoredMatrix]
    biases: dict[str, Float[Tensor, " d_model"]]
    n_kept: int
    kept_positions: Tensor
    description: str

    @torch.no_grad()
    def parameters(self, model: HookedTransformer) -> dict[str, Tensor]:
        """The patched parameters (original + delta), dense, keyed by parameter name."""
        dense = {name: delta.AB for name, delta in self.matrices.items()}
        return _tl.patched_values(model, {**dense, **self.biases})

    @contextlib.contextmanager
    def applied(self, model: HookedTransformer) -> Iterator[HookedTransformer]:
        """Context manager: run ``model`` on the REDUCED prompt with the patched weights and the
        kept tokens at their original positions; everything is restored on exit (also on errors).
        """
        spec = _tl.model_spec(model)
        tables = _tl.position_tables(model, spec, self.kept_positions.to(_tl.model_device(model)))
        with _tl.swapped_tensors(model, {**self.parameters(model), **tables}):
            yield model


@torch.no_grad()
def exact_weight_patch(model: HookedTransformer, updates: ImplicitUpdates) -> ExactWeightPatch:
    """Fold the token-dependent updates into pure weight patches of every block (THEORY 3).

    Args:
        model: The model the updates were computed on.
        updates: From :func:`tl_thoughts.implicit_updates`.

    Returns:
        The patch; apply it with ``patch.applied(model)`` to the reduced prompt.

    Raises:
        ZeroDenominatorError: a zero-norm MLP input, linearly dependent inputs, or more kept tokens
            than the patched matrix's input dimension (no exact patch of this form exists).

    Example:
        >>> patch = tl_thoughts.exact_weight_patch(model, updates)
        >>> reduced = updates.tokens[:, updates.span.kept_positions]
        >>> with patch.applied(model):
        ...     logits = model(reduced)
        >>> bool((logits[0, -1] - model(updates.tokens)[0, -1]).abs().max() < 1e-10)
        True
    """
    spec = _tl.model_spec(model)
    _tl.check_no_hooks(model)
    span = updates.span
    kept = span.kept_positions.to(updates.tokens.device)
    n_prefix, T = span.start, kept.shape[0]
    names = []
    for layer in range(spec.n_layers):
        if spec.has_mlp:
            names += [_tl.mlp_input_resid_name(spec, layer), _tl.mlp_post_name(layer)]
        else:
            names += [_tl.pattern_name(layer), _tl.v_name(layer), _tl.z_name(layer)]
    _, cache = _tl.forward(model, updates.tokens, cache_names=names)
    matrices: dict[str, FactoredMatrix] = {}
    biases: dict[str, Tensor] = {}
    with torch.no_grad():
        for layer in range(spec.n_layers):
            delta_rows = _with_zero_prefix(updates.vectors[layer], n_prefix)  # [T, d_model]
            if spec.has_mlp:
                resid = cache[_tl.mlp_input_resid_name(spec, layer)]
                a_prefix = _tl.mlp_norm(model, layer, resid[: n_prefix])
                assert updates.mlp_in is not None and updates.mlp_in_with_chunk is not None
                a_rows = torch.cat([a_prefix, updates.mlp_in[layer]])  # reduced MLP inputs [T, d]
                shift = _with_zero_prefix(
                    updates.mlp_in_with_chunk[layer] - updates.mlp_in[layer], n_prefix
                )
                if not spec.parallel_attn_mlp:  # parallel blocks: the MLP input is unchanged
                    for name in spec.mlp_input_matrices:
                        W = _tl.mlp_matrix(model, layer, name)
                        pname = _tl.param_name(layer, name)
                        left, right = _math.min_norm_factors(a_rows, shift @ W, pname)
                        matrices[pname] = FactoredMatrix(left, right)
                # with the input patches, the reduced run's hidden rows equal the full run's
                hidden = cache[_tl.mlp_post_name(layer)][kept]
                _fold_vectors(layer, "W_out", "b_out", hidden, delta_rows, matrices, biases)
            else:
                pattern = cache[_tl.pattern_name(layer)][:, span.positions]
                v = _tl.expand_kv_heads(spec, cache[_tl.v_name(layer)])
                z_full = cache[_tl.z_name(layer)]
                chunk_keys = torch.zeros(span.n_pos, dtype=torch.bool, device=kept.device)
                chunk_keys[span.start : span.stop] = True
                _, _, z_red = _math.head_updates(
                    pattern, v, z_full[span.positions], _tl.W_O(model, layer), chunk_keys
                )
                z_rows = torch.cat([z_full[: n_prefix], z_red]).flatten(1)  # [T, head*d_head]
                _fold_vectors(layer, "W_O", "b_O", z_rows, delta_rows, matrices, biases)
    inputs = "" if spec.parallel_attn_mlp else "/".join(spec.mlp_input_matrices) + " + "
    if T == 1:
        form = f"rank-1 {inputs}b_out" if spec.has_mlp else "b_O"
    else:
        form = f"min-norm rank<={T} {inputs}W_out" if spec.has_mlp else f"min-norm rank<={T} W_O"
    return ExactWeightPatch(
        matrices=matrices,
        biases=biases,
        n_kept=T,
        kept_positions=span.kept_positions,
        description=form,
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
