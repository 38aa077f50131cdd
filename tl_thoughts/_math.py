"""The mathematical kernel: implicit updates from cached activations (THEORY.md sections 2-3), and
the ridge solves of the thought matrices (section 4).

Pure tensor functions, no TransformerLens plumbing, row-vector convention (``x @ W``).
Read each function against THEORY.md line by line.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_thoughts.errors import ZeroDenominatorError, check_number


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
    axis), at the given query positions (THEORY 2): [`reduced_attention`][] then
    [`head_vectors`][].

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


def rms_post_norm_patch(
    y: Float[Tensor, " d_model"], delta: Float[Tensor, " d_model"], w: Float[Tensor, " d_model"], eps: float, what: str
) -> tuple[Float[Tensor, " d_model"], Float[Tensor, " d_model"]]:
    """What a block with an RMS norm after its MLP (``out = w * y / sqrt(mean(y^2) + eps)``) needs
    so that its output gains ``delta``: a change ``dy`` of the MLP output and a change ``dw`` of
    the norm's scale, with ``(w + dw) * (y + dy) / sqrt(mean((y + dy)^2) + eps) = out + delta``.

    ``c = sqrt(mean(y^2) + eps)``; where ``w != 0``, ``dy = c * delta / w``, so that
    ``w * (y + dy) / c = out + delta`` there; the norm then divides by
    ``c' = sqrt(mean((y + dy)^2) + eps)`` instead of ``c``, which one common factor of the scale
    undoes, ``dw = w * (c' / c - 1)``. Where ``w == 0`` (the output is zero whatever ``y``), only
    the scale can act: ``dy = 0`` and ``dw = delta * c' / y``, Goldwaser et al.'s element-wise
    patch. Dividing by ``w`` elsewhere, instead of by the normalised output ``y / c`` everywhere
    (Goldwaser et al.'s ``dw = delta / f``, exact too), keeps the factors near ``w``: theirs reach
    1e2 times ``w`` where ``y`` is small, which amplifies the reduced run's rounding errors from
    block to block (real Gemma 3 270M, one kept token: residual errors of 2.5e5 in float64 after 18 blocks,
    measured at commit b2774a1).

    Args:
        y: The MLP output of the run to reproduce, before the norm.
        delta: What the block's output must gain.
        w: The norm's scale.
        eps: The norm's epsilon (inside the square root, as TransformerLens' ``RMSNorm``).
        what: The scale's name for error messages (``"blocks.3.ln2_post.w"``).

    Returns:
        ``(dy, dw)``.

    Raises:
        ZeroDenominatorError: a coordinate where both ``w`` and ``y`` are zero and ``delta`` is not.

    Example:
        >>> y, delta, w = (torch.randn(6, dtype=torch.float64) for _ in range(3))
        >>> w[2] = 0.0
        >>> dy, dw = rms_post_norm_patch(y, delta, w, 1e-6, "ln2_post.w")
        >>> norm = lambda y, w: w * y / (y.pow(2).mean() + 1e-6).sqrt()
        >>> bool((norm(y + dy, w + dw) - norm(y, w) - delta).abs().max() < 1e-12)
        True
    """
    dead = w == 0
    if bool((dead & (y == 0) & (delta != 0)).any()):
        coord = int((dead & (y == 0) & (delta != 0)).nonzero()[0])
        raise ZeroDenominatorError(
            f"{what}: coordinate {coord} of the norm's scale and of the MLP output are both zero, so no patch "
            "of the MLP output or of the scale can add the chunk's vector there (the scale patch divides by "
            "the MLP output)"
        )
    c = (y.pow(2).mean() + eps).sqrt()
    dy = torch.where(dead, torch.zeros_like(y), c * delta / torch.where(dead, torch.ones_like(w), w))
    c_new = ((y + dy).pow(2).mean() + eps).sqrt()
    dw_dead = torch.where(y == 0, torch.zeros_like(y), delta * c_new / torch.where(y == 0, torch.ones_like(y), y))
    return dy, torch.where(dead, dw_dead, w * (c_new / c - 1))


# --- the thought matrices' least-squares solves (THEORY 4) ---------------------------------------


def ridge_solve(
    AtA: Float[Tensor, "d d"], AtU: Float[Tensor, "d m"], ridge: float, n: float | int
) -> Float[Tensor, "d m"]:
    """``argmin_M sum_i ||a_i @ M - u_i||^2 + lam ||M||^2`` from the sufficient statistics.

    ``lam = ridge * trace(A^T A) / n`` (ridge relative to the mean squared input norm; ``n`` is
    the number of rows, or their total weight in a weighted fit).
    ``ridge = 0`` gives the minimum-norm least-squares solution ``pinv(A^T A) @ A^T U``
    (``= pinv(A) @ U``).

    Example:
        >>> A, U = torch.randn(40, 8, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
        >>> M = ridge_solve(A.T @ A, A.T @ U, ridge=0.0, n=40)
        >>> bool((M - torch.linalg.lstsq(A, U).solution).abs().max() < 1e-10)
        True
    """
    check_number(ridge, "ridge")  # finite, >= 0 (an infinite ridge would give NaN silently)
    if ridge == 0:
        return torch.linalg.pinv(AtA, hermitian=True) @ AtU
    lam = ridge * torch.trace(AtA) / n
    eye = torch.eye(AtA.shape[0], dtype=AtA.dtype, device=AtA.device)
    factor, info = torch.linalg.cholesky_ex(AtA + lam * eye)  # symmetric positive definite when lam > 0
    if int(info) != 0:  # not numerically so (all-zero inputs: lam = 0): LU, which raises if singular
        return torch.linalg.solve(AtA + lam * eye, AtU)
    return torch.cholesky_solve(AtU, factor)


GRAM_BLOCK = 384  # columns per block of add_upper_gram


def add_upper_gram(out: Float[Tensor, "d d"], wa: Float[Tensor, "n d"], a: Float[Tensor, "n d"]) -> None:
    """Add ``wa^T a`` (symmetric: ``wa`` is ``a`` with weighted rows) to ``out`` on and above the
    block diagonal only: blocks of about [`GRAM_BLOCK`][] columns, each row block times the
    columns from its own on (with ``k`` blocks, ``(k + 1) / 2k`` of the whole ``d x d`` product's
    work; measured at 0.74-0.86 of the whole product's time at commit ``0246a97``,
    ``benchmarks/bench_gram.py`` there). Read the result as its ``triu``, mirrored."""
    d = a.shape[1]
    k = max(1, round(d / GRAM_BLOCK))
    edges = [round(i * d / k) for i in range(k + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        out[lo:hi, lo:] += wa[:, lo:hi].T @ a[:, lo:]


class RidgeRegression:
    """A weighted ridge regression ``argmin_M sum_i w_i ||a_i @ M - u_i||^2 + lam ||M||^2`` whose
    rows arrive in parts (``fit_thought`` streams batches), solved as [`ridge_solve`][] does
    (``lam = ridge * sum_i w_i ||a_i||^2 / n``; ``ridge = 0``: minimum-norm least squares).

    With at least as many rows as input dimensions it keeps the sufficient statistics ``A^T W A``
    (on and above its block diagonal, [`add_upper_gram`][]) and ``A^T W U`` (``d x d``,
    whatever the rows); with fewer (``n_rows < d``, e.g. a few hundred
    rows against an MLP's ``d_mlp``) it keeps the weighted rows themselves and solves in the row
    space, ``M = G^T (G G^T + lam I)^-1 F`` with ``G = W^1/2 A``, ``F = W^1/2 U``: the same
    solution (``tests/test_thoughts.py``) at ``n x n`` instead of ``d x d`` cost.
    ``solve(shift=s)`` fits the targets ``u_i - s``; ``solve_factors`` gives the row-space solution
    as its two factors (rank at most the number of rows)."""

    def __init__(self, d_in: int, n_rows: int) -> None:
        self.dual = n_rows < d_in
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []  # dual: (sqrt(w), G, F) per batch
        self.AtA: Tensor | None = None
        self.AtU: Tensor | None = None
        self.Asum: Tensor | None = None  # sum_i w_i a_i (the shift's term)

    def add(self, a: Float[Tensor, "n d"], u: Float[Tensor, "n m"], w: Float[Tensor, " n"]) -> None:
        """Rows ``a`` (inputs), ``u`` (targets) and their weights ``w``, all float64."""
        if self.dual:
            sw = w.sqrt()
            self.parts.append((sw, a * sw[:, None], u * sw[:, None]))
            return
        wa = a * w[:, None]
        if self.AtA is None:
            d = a.shape[1]
            self.AtA = a.new_zeros(d, d)
            self.AtU, self.Asum = wa.T @ u, wa.sum(0)
        else:
            self.AtU += wa.T @ u
            self.Asum += wa.sum(0)
        add_upper_gram(self.AtA, wa, a)

    def solve(self, ridge: float, n: float, shift: Tensor | None = None) -> Tensor:
        check_number(ridge, "ridge")
        if not self.dual:
            AtU = self.AtU if shift is None else self.AtU - torch.outer(self.Asum, shift)
            upper = self.AtA.triu()
            return ridge_solve(upper + upper.triu(1).T, AtU, ridge, n)
        left, right = self.solve_factors(ridge, n, shift)
        return left @ right

    def solve_factors(self, ridge: float, n: float, shift: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """The solution in its row-space form ``(G^T, Y)``, ``M = G^T @ Y`` (``G^T``: ``[d_in, rows]``,
        ``Y``: ``[rows, m]``), when the regression holds fewer rows than inputs; None otherwise."""
        check_number(ridge, "ridge")
        if not self.dual:
            return None
        sw, G, F = (torch.cat(t) for t in zip(*self.parts))
        if shift is not None:
            F = F - sw[:, None] * shift[None]
        K = G @ G.T
        if ridge == 0:
            return G.T, torch.linalg.pinv(K, hermitian=True) @ F
        lam = ridge * torch.trace(K) / n  # trace(G G^T) = trace(A^T W A)
        K.diagonal().add_(lam)
        factor, info = torch.linalg.cholesky_ex(K)
        if int(info) != 0:
            return G.T, torch.linalg.solve(K, F)
        return G.T, torch.cholesky_solve(F, factor)
