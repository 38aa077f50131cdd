"""The mathematical kernel: implicit updates from cached activations (THEORY.md sections 2-3).

Pure tensor functions, no TransformerLens plumbing, row-vector convention (``x @ W``).
Read each function against THEORY.md line by line.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_thoughts.errors import ZeroDenominatorError


def reduced_attention(
    pattern: Float[Tensor, "*layer head query key"],
    v: Float[Tensor, "*layer key head d_head"],
    chunk_keys: Bool[Tensor, " key"],
) -> tuple[Float[Tensor, "*layer query head d_head"], Float[Tensor, "*layer query head"]]:
    """The reduced run's head outputs, from the full run's attention (THEORY 2).

    The reduced run attends only to kept keys, with the pattern renormalised over them:
    ``p'[k] = p[k] / sum_{j kept} p[j]``, so its head output is ``z_red = sum_{k kept} p'[k] v_k``.
    Keys the full run never attends to (causally masked, padding) have ``p = 0`` and drop out.

    Args:
        pattern: Full-run attention pattern of the query positions of interest, over every key.
        v: Full-run value vectors of every key position, one per query head (GQA expanded).
        chunk_keys: True at the key positions of the chunk(s).

    Returns:
        ``(z_reduced, chunk_attention)``: the reduced run's head outputs and the attention mass
        each head puts on the chunk in the full run.

    Raises:
        ZeroDenominatorError: a head puts all of its attention on the chunk at some query (the
            reduced attention is then undefined).
    """
    kept = ~chunk_keys
    p_kept = pattern[..., kept]  # [*layer, head, query, kept_key]
    kept_mass = p_kept.sum(-1)  # [*layer, head, query]  (= 1 - chunk mass, without cancellation)
    if bool((kept_mass == 0).any()):
        *where, head, query = (kept_mass == 0).nonzero()[0].tolist()
        layer = f"layer {where[0]}, " if where else ""
        raise ZeroDenominatorError(
            f"{layer}head {head} puts all of its attention on the chunk at query row {query}: the "
            "attention of the reduced prompt is undefined there (the kept keys' weights underflowed "
            "to zero). Try float64, or a chunk that does not absorb the whole attention."
        )
    z_red_unnormalised = torch.einsum("...hqk,...khd->...qhd", p_kept, v[..., kept, :, :])
    z_red = z_red_unnormalised / kept_mass.transpose(-1, -2)[..., None]  # [*layer, query, head, d_head]
    chunk_attention = pattern[..., chunk_keys].sum(-1).transpose(-1, -2)  # [*layer, query, head]
    return z_red, chunk_attention


def head_vectors(
    z: Float[Tensor, "*layer query head d_head"],
    z_red: Float[Tensor, "*layer query head d_head"],
    W_O: Float[Tensor, "*layer head d_head d_model"],
) -> Float[Tensor, "*layer query head d_model"]:
    """Per-head update ``(z - z_red) @ W_O[h]`` (``b_O`` cancels); sums over heads to the change
    of the attention output (before any post-attention norm)."""
    return torch.einsum("...qhd,...hdm->...qhm", z - z_red, W_O)


def head_updates(
    pattern: Float[Tensor, "*layer head query key"],
    v: Float[Tensor, "*layer key head d_head"],
    z: Float[Tensor, "*layer query head d_head"],
    W_O: Float[Tensor, "*layer head d_head d_model"],
    chunk_keys: Bool[Tensor, " key"],
) -> tuple[
    Float[Tensor, "*layer query head d_model"],
    Float[Tensor, "*layer query head"],
    Float[Tensor, "*layer query head d_head"],
]:
    """Per-head virtual weight vectors of one block (or a stack of blocks, leading ``layer``
    axis), at the given query positions (THEORY 2): :func:`reduced_attention` then
    :func:`head_vectors`.

    Args:
        pattern: Full-run attention pattern of the chosen queries (kept positions after the chunk).
        v: Full-run value vectors of every key position, one per query head.
        z: Full-run ``hook_z`` of the chosen queries.
        W_O: The block's output matrices.
        chunk_keys: True at the key positions of the chunk.

    Returns:
        ``(head_vectors, chunk_attention, z_reduced)``: the per-head update (sums over heads to the
        block's virtual weight vector), the attention mass each head puts on the chunk, and the
        reduced run's head outputs.

    Raises:
        ZeroDenominatorError: a head puts all of its attention on the chunk at some query.
    """
    z_red, chunk_attention = reduced_attention(pattern, v, chunk_keys)
    return head_vectors(z, z_red, W_O), chunk_attention, z_red


def min_norm_factors(
    rows: Float[Tensor, "T d_in"], targets: Float[Tensor, "T d_out"], what: str
) -> tuple[Float[Tensor, "d_in T"], Float[Tensor, "T d_out"]]:
    """Factored minimum-norm solution of ``rows @ dW = targets`` (THEORY 3).

    ``dW = pinv(rows) @ targets = rows^T (rows rows^T)^{-1} targets``, computed stably from the QR
    factorisation ``rows^T = Q R``: ``dW = (Q R^{-T}) @ targets``, rank <= T. For one row ``a`` this
    is the rank-1 patch ``outer(a / ||a||^2, target)`` of Dherin et al.

    Args:
        rows: The inputs the patched matrix must map exactly (one per kept token).
        targets: What each input must gain when multiplied by the patch.
        what: A name for error messages, e.g. ``"blocks.3.mlp.W_in"``.

    Returns:
        ``(left, right)`` with ``dW = left @ right``: ``left`` is ``d_in x T``, ``right`` is
        ``targets`` itself.

    Raises:
        ZeroDenominatorError: the rows are linearly dependent (a zero-norm row included), or there
            are more rows than dimensions, so no exact patch of this form exists.
    """
    T, d_in = rows.shape
    if T > d_in:
        raise ZeroDenominatorError(
            f"{what}: {T} kept tokens but the input dimension is {d_in}; an exact weight patch of "
            f"this form needs at most {d_in} kept tokens (use the activation form instead)."
        )
    norms = rows.norm(dim=-1)
    if bool((norms == 0).any()):
        bad = (norms == 0).nonzero()[0].item()
        raise ZeroDenominatorError(
            f"{what}: the input at kept row {bad} has zero norm, so no weight patch can map it to "
            "a nonzero change (the rank-1 formula divides by its squared norm)."
        )
    Q, R = torch.linalg.qr(rows.T, mode="reduced")  # rows^T = Q R, Q: [d_in, T], R: [T, T]
    # numerical rank: a diagonal entry of R at rounding level means a row is (numerically) a
    # combination of the others; solving would divide by rounding noise
    diag = R.diagonal().abs()
    tol = max(T, d_in) * torch.finfo(R.dtype).eps * float(diag.max())
    if bool((diag <= tol).any()):
        raise ZeroDenominatorError(
            f"{what}: the {T} kept inputs are linearly dependent (numerical rank "
            f"{int((diag > tol).sum())} < {T}), so no exact minimum-norm patch maps each of them to "
            "its own target (e.g. a repeated token with identical activations)."
        )
    # left = Q R^{-T} = (R^{-1} Q^T)^T, with R upper triangular
    left = torch.linalg.solve_triangular(R, Q.T, upper=True).T
    return left, targets
