"""The mathematical kernel ``tl_thoughts._math`` against direct, obviously-correct implementations."""

import pytest
import torch

import tl_thoughts as tt
from tl_thoughts import _math
from helpers import assert_close


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- min_norm_factors ---------------------------------------------------------------------------

SHAPES = {
    "one_row": (1, 8, 5),
    "few_rows": (3, 16, 7),
    "half": (8, 16, 4),
    "square": (16, 16, 3),
    "wide": (5, 64, 32),
    "more_targets_than_inputs": (4, 6, 40),
}


@pytest.mark.parametrize("T, d_in, d_out", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("seed", [0, 1])
def test_min_norm_factors_is_the_pseudoinverse_solution(T, d_in, d_out, seed):
    g = _gen(seed)
    rows = torch.randn(T, d_in, generator=g, dtype=torch.float64)
    targets = torch.randn(T, d_out, generator=g, dtype=torch.float64)
    left, right = _math.min_norm_factors(rows, targets, "test")
    assert left.shape == (d_in, T) and right.shape == (T, d_out)
    assert torch.equal(right, targets)
    dW = left @ right
    assert_close(dW, torch.linalg.pinv(rows) @ targets, 1e-10, "vs pinv")
    lstsq = torch.linalg.lstsq(rows, targets, driver="gelsd").solution  # minimum-norm solution
    assert_close(dW, lstsq, 1e-10, "vs lstsq")
    assert_close(rows @ dW, targets, 1e-10, "rows @ dW == targets")
    assert int(torch.linalg.matrix_rank(dW)) <= T
    # the minimum-norm solution lies in the row space of ``rows``
    projector = torch.linalg.pinv(rows) @ rows
    assert_close(projector @ dW, dW, 1e-10, "in the row space")


def test_min_norm_factors_one_row_is_the_rank1_rome_edit():
    g = _gen(3)
    a = torch.randn(1, 12, generator=g, dtype=torch.float64)
    target = torch.randn(1, 20, generator=g, dtype=torch.float64)
    left, right = _math.min_norm_factors(a, target, "test")
    assert_close(left[:, 0], a[0] / (a[0] @ a[0]), 1e-15, "key a / ||a||^2")
    assert_close(left @ right, torch.outer(a[0] / (a[0] @ a[0]), target[0]), 1e-14, "outer")


def test_min_norm_factors_float32():
    g = _gen(4)
    rows = torch.randn(6, 32, generator=g)
    targets = torch.randn(6, 10, generator=g)
    left, right = _math.min_norm_factors(rows, targets, "test")
    assert left.dtype == torch.float32
    assert_close(rows @ (left @ right), targets, 1e-4, "float32")


def test_min_norm_factors_ill_conditioned_but_independent_rows_are_solved():
    g = _gen(5)
    rows = torch.randn(3, 10, generator=g, dtype=torch.float64)
    rows[2] = rows[0] + 1e-4 * rows[2]  # nearly, not exactly, dependent: a solution exists
    targets = torch.randn(3, 4, generator=g, dtype=torch.float64)
    left, right = _math.min_norm_factors(rows, targets, "test")
    assert_close(rows @ (left @ right), targets, 1e-8, "ill-conditioned")


def test_min_norm_factors_more_rows_than_dimensions():
    rows = torch.randn(9, 8, generator=_gen(6), dtype=torch.float64)
    with pytest.raises(tt.ZeroDenominatorError, match="blocks.0.mlp.W_in"):
        _math.min_norm_factors(rows, torch.ones(9, 3, dtype=torch.float64), "blocks.0.mlp.W_in")


def test_min_norm_factors_zero_row():
    rows = torch.randn(4, 8, generator=_gen(7), dtype=torch.float64)
    rows[2] = 0.0
    with pytest.raises(tt.ZeroDenominatorError, match="zero norm"):
        _math.min_norm_factors(rows, torch.ones(4, 3, dtype=torch.float64), "what")


def _dependent_rows(kind: str) -> torch.Tensor:
    a, b = torch.randn(2, 16, generator=_gen(8), dtype=torch.float64)
    if kind == "duplicate":
        return torch.stack([a, b, a])
    if kind == "scaled_copy":
        return torch.stack([a, 2.0 * a])
    if kind == "sum_of_two":
        return torch.stack([a, b, a + b])
    if kind == "integer_sum":  # exactly representable: QR meets an exact zero
        return torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]], dtype=torch.float64)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["duplicate", "scaled_copy", "sum_of_two", "integer_sum"])
def test_min_norm_factors_dependent_rows(kind):
    """Documented: linearly dependent rows raise ZeroDenominatorError (no exact patch maps each row
    to its own target). Returning a patch anyway gives |entries| ~ 1e15 and wrong outputs."""
    rows = _dependent_rows(kind)
    targets = torch.randn(rows.shape[0], 4, generator=_gen(9), dtype=torch.float64)
    with pytest.raises(tt.ZeroDenominatorError):
        _math.min_norm_factors(rows, targets, "what")


# --- head_updates ---------------------------------------------------------------------------------


def head_updates_loop(pattern, v, z, W_O, chunk_keys):
    """Direct loops over heads and queries (THEORY 2)."""
    H, Q, K = pattern.shape
    d_model = W_O.shape[-1]
    vectors = torch.zeros(Q, H, d_model, dtype=pattern.dtype)
    beta = torch.zeros(Q, H, dtype=pattern.dtype)
    z_red = torch.zeros(Q, H, v.shape[-1], dtype=pattern.dtype)
    for h in range(H):
        for q in range(Q):
            mass = 0.0
            acc = torch.zeros(v.shape[-1], dtype=pattern.dtype)
            for k in range(K):
                if chunk_keys[k]:
                    beta[q, h] += pattern[h, q, k]
                else:
                    mass += pattern[h, q, k]
                    acc += pattern[h, q, k] * v[k, h]
            z_red[q, h] = acc / mass
            vectors[q, h] = (z[q, h] - z_red[q, h]) @ W_O[h]
    return vectors, beta, z_red


def _random_head_inputs(seed, H=4, Q=3, K=9, D=5, M=7):
    g = _gen(seed)
    scores = 2.0 * torch.randn(H, Q, K, generator=g, dtype=torch.float64)
    pattern = torch.softmax(scores, dim=-1)
    v = torch.randn(K, H, D, generator=g, dtype=torch.float64)
    W_O = torch.randn(H, D, M, generator=g, dtype=torch.float64)
    z = torch.einsum("hqk,khd->qhd", pattern, v)  # consistent with the pattern, as in a real run
    return pattern, v, z, W_O


CHUNKS = {
    "middle": [0, 0, 1, 1, 1, 0, 0, 0, 0],
    "start": [1, 1, 1, 1, 0, 0, 0, 0, 0],
    "single": [0, 0, 0, 0, 0, 1, 0, 0, 0],
    "scattered": [0, 1, 0, 1, 0, 0, 1, 0, 0],
}


@pytest.mark.parametrize("chunk", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_head_updates_against_loops(chunk, seed):
    pattern, v, z, W_O = _random_head_inputs(seed)
    chunk_keys = torch.tensor(chunk, dtype=torch.bool)
    vectors, beta, z_red = _math.head_updates(pattern, v, z, W_O, chunk_keys)
    ref_vectors, ref_beta, ref_z_red = head_updates_loop(pattern, v, z, W_O, chunk_keys)
    assert vectors.shape == (3, 4, 7) and beta.shape == (3, 4) and z_red.shape == (3, 4, 5)
    assert_close(vectors, ref_vectors, 1e-12, "head vectors")
    assert_close(beta, ref_beta, 1e-14, "chunk attention")
    assert_close(z_red, ref_z_red, 1e-12, "reduced z")
    assert bool((beta >= 0).all()) and bool((beta <= 1).all())
    # THEORY 2's second form: beta * (vbar_I - z_red) @ W_O, vbar_I the chunk's mean value
    p_chunk = pattern[:, :, chunk_keys]  # [head, query, chunk]
    vbar = torch.einsum("hqk,khd->qhd", p_chunk, v[chunk_keys]) / beta[..., None]
    second = torch.einsum("qhd,hdm->qhm", beta[..., None] * (vbar - z_red), W_O)
    assert_close(vectors, second, 1e-12, "beta * (vbar_I - z_red) @ W_O")


def test_head_updates_with_arbitrary_z():
    """The function uses the z it is given (the cached hook_z): vectors = (z - z_red) @ W_O."""
    pattern, v, _, W_O = _random_head_inputs(4)
    z = torch.randn(3, 4, 5, generator=_gen(10), dtype=torch.float64)
    chunk_keys = torch.tensor(CHUNKS["middle"], dtype=torch.bool)
    vectors, _, _ = _math.head_updates(pattern, v, z, W_O, chunk_keys)
    ref, _, _ = head_updates_loop(pattern, v, z, W_O, chunk_keys)
    assert_close(vectors, ref, 1e-12, "arbitrary z")


def test_head_updates_chunk_not_attended_gives_zero():
    pattern, v, _, W_O = _random_head_inputs(5)
    chunk_keys = torch.tensor(CHUNKS["middle"], dtype=torch.bool)
    pattern = pattern.masked_fill(chunk_keys, 0.0)
    pattern = pattern / pattern.sum(-1, keepdim=True)
    z = torch.einsum("hqk,khd->qhd", pattern, v)
    vectors, beta, _ = _math.head_updates(pattern, v, z, W_O, chunk_keys)
    assert not bool(beta.any())
    assert_close(vectors, torch.zeros_like(vectors), 1e-13, "no attention on the chunk")


def test_head_updates_all_attention_on_chunk_raises():
    pattern, v, z, W_O = _random_head_inputs(6)
    chunk_keys = torch.tensor(CHUNKS["middle"], dtype=torch.bool)
    pattern = pattern.clone()
    pattern[1, 2] = 0.0
    pattern[1, 2, 2:5] = 1.0 / 3  # head 1, query 2: everything on the chunk
    with pytest.raises(tt.ZeroDenominatorError, match="head 1"):
        _math.head_updates(pattern, v, z, W_O, chunk_keys)


def test_head_updates_float32():
    pattern, v, z, W_O = (x.float() for x in _random_head_inputs(7))
    chunk_keys = torch.tensor(CHUNKS["middle"], dtype=torch.bool)
    vectors, beta, _ = _math.head_updates(pattern, v, z, W_O, chunk_keys)
    ref, ref_beta, _ = head_updates_loop(*(x.double() for x in (pattern, v, z, W_O)), chunk_keys)
    assert vectors.dtype == torch.float32
    assert_close(vectors, ref, 1e-5, "float32 head vectors")
    assert_close(beta, ref_beta, 1e-6, "float32 chunk attention")
