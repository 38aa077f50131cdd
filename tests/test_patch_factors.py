"""Thought matrices held as exact factors (issue 34): fitted from the ridge solution's row-space
form, saved as factors (smaller files, loaded bit-identical), singular values and truncations from
the factors equal to the dense matrices'; the summary table within 100 columns; a short repr."""

import json
import os

import pytest
import torch
from helpers import assert_close, assert_same_logits_applied, fit, make_model, make_word_tokenizer
from safetensors import safe_open

import tl_thoughts as tt
from tl_thoughts.patch import PatchDeltas, factor_product, svdvals_of

TEMPLATE = tt.PromptTemplate("{chunk}{query}", separator="")
CHUNK = "the cat sat on the mat and"
EXAMPLES = [(" the dog", " ran"), (" a big red hat", " sat"), (" the red cat", " ran ."), (" a dog", " sat on")]
MATRIX_KINDS = ("W_O", "W_gate", "W_in", "W_out")


@pytest.fixture(scope="module")
def model():
    # wide enough that the fitted rows (17) make factors smaller than every dense matrix
    return make_model("rms_gated_silu_rotary_gqa", tokenizer=make_word_tokenizer(), d_model=48, d_mlp=96)


@pytest.fixture(scope="module")
def patch(model):
    return fit(model, CHUNK, EXAMPLES, template=TEMPLATE, attention_matrix=True, output_matrix=True)


def _dense_copy(patch):
    return tt.ThoughtPatch(deltas={k: patch.deltas[k] for k in patch.deltas}, steering=patch.steering,
                           meta=patch.meta)


def _matrices(patch):
    return [k for k in patch.deltas if k.rsplit(".", 1)[-1] in MATRIX_KINDS]


def test_the_fit_holds_every_thought_matrix_as_factors_and_no_dense_copy(model, patch):
    names = _matrices(patch)
    assert {k.rsplit(".", 1)[-1] for k in names} == set(MATRIX_KINDS)
    assert set(patch.factors) == set(names)  # every matrix: fewer fitted rows than dimensions
    n_rows = patch.meta["n_tokens"]  # query_weight=0: the pooled rows only
    for name, (left, right) in patch.factors.items():
        assert left.shape[-1] == right.shape[0] == n_rows, name
        assert patch.deltas.stored(name) is not None and isinstance(patch.deltas.stored(name), tuple)
        d = patch.deltas[name]
        assert d.shape == model.get_parameter(name).shape and d.dtype == left.dtype
        assert torch.equal(d, factor_product(left, right)), name
        # the left factor has orthonormal columns (QR of the fitted rows)
        q = left.reshape(-1, left.shape[-1])
        assert_close(q.T @ q, torch.eye(q.shape[1], dtype=q.dtype), 1e-10, f"{name}: orthonormal")
    vectors = [k for k in patch.deltas if k not in names]
    assert vectors and not any(isinstance(patch.deltas.stored(k), tuple) for k in vectors)
    held = sum(t.numel() * 8 for pair in patch.factors.values() for t in pair)
    held += sum(patch.deltas[k].numel() * 8 for k in vectors) + sum(v.numel() * 8 for v in patch.steering.values())
    assert patch.nbytes == held < _dense_copy(patch).nbytes


def test_saved_as_factors_smaller_and_loaded_bit_identical(model, patch, tmp_path):
    path = patch.save(tmp_path / "p.safetensors")
    dense_path = _dense_copy(patch).save(tmp_path / "dense.safetensors")
    saved = sum(t.numel() * 8 for pair in patch.factors.values() for t in pair)
    assert os.path.getsize(dense_path) - os.path.getsize(path) > sum(
        patch.deltas[k].numel() * 8 for k in patch.factors) - saved - 4096  # the header's size aside
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["tl_thoughts"])
    assert meta["format"] == "tl_thoughts.ThoughtPatch/2"
    assert {f"left:{k}" for k in patch.factors} | {f"right:{k}" for k in patch.factors} <= keys
    assert not {f"delta:{k}" for k in patch.factors} & keys
    loaded = tt.ThoughtPatch.load(path, model=model)
    assert list(loaded.deltas) == list(patch.deltas) or set(loaded.deltas) == set(patch.deltas)
    assert set(loaded.factors) == set(patch.factors)
    for name in patch.deltas:
        assert torch.equal(loaded.deltas[name], patch.deltas[name]), name  # bit for bit
        assert loaded.deltas[name].dtype == patch.deltas[name].dtype
    assert_same_logits_applied(model, patch, loaded)
    with patch.apply(model), pytest.raises(tt.InputError, match="applied to this model already"):
        loaded.attach(model)  # the loaded copy holds the same factors: the same patch
    # a dense file (the layout before factors) still loads, to the same values
    dense = tt.ThoughtPatch.load(dense_path, model=model)
    assert not dense.factors and all(torch.equal(dense.deltas[k], patch.deltas[k]) for k in patch.deltas)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_singular_values_from_factors_equal_the_dense_ones(patch):
    for name, pair in patch.factors.items():
        sv = svdvals_of(pair)
        dense = torch.linalg.svdvals(patch.matrix(int(name.split(".")[1]), name.rsplit(".", 1)[-1]).double())
        assert_close(sv, dense[: len(sv)], 1e-10, name)
        assert bool((dense[len(sv):] < 1e-10 * dense[0]).all()), name
    rows, dense_rows = patch.summary(), _dense_copy(patch).summary()
    assert [sorted(r) for r in rows] == [sorted(r) for r in dense_rows]
    for row, ref in zip(rows, dense_rows):
        for key, value in ref.items():
            if key.endswith("_rank") and not key.endswith("_effective_rank"):
                assert row[key] == value, key
            else:
                assert abs(row[key] - value) <= 1e-10 * max(1.0, abs(value)), key


@pytest.mark.parametrize("rank", [1, 3])
def test_truncations_from_factors_equal_the_dense_truncations(patch, rank):
    small, ref = patch.truncated(rank), _dense_copy(patch).truncated(rank)
    assert set(small.deltas) == set(patch.deltas)
    for name in patch.deltas:
        assert_close(small.deltas[name], ref.deltas[name], 1e-10 * float(patch.deltas[name].abs().max()), name)
    for name, (left, right) in small.factors.items():
        assert left.shape[-1] == right.shape[0] == rank, name
    assert set(small.factors) == set(_matrices(patch))
    # at or above a matrix's factor rank it is copied unchanged
    big = patch.truncated(max(left.shape[-1] for left, _ in patch.factors.values()))
    assert all(big.deltas.stored(k) is patch.deltas.stored(k) for k in patch.factors)


def test_summary_table_is_readable_at_100_columns(patch):
    table = patch.summary_table()
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 100, table
    header = next(line for line in lines if "W_gate" in line)
    assert header.split() == ["W_O", "W_gate", "W_in", "W_out"]
    assert any(line.split()[:3] == ["layer", "vector", "norm"] for line in lines)
    assert any(line.split() == ["layer"] + ["norm", "rank", "eff"] * 4 for line in lines)
    rows = patch.summary()
    body = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert len(body) == 2 * len(rows)  # the vectors' table and the matrices' table
    matrix_rows = body[len(rows):]
    for row, cells in zip(rows, matrix_rows):
        assert int(cells[0]) == row["layer"]
        assert [int(cells[2 + 3 * i]) for i in range(4)] == [row[f"{n}_rank"] for n in MATRIX_KINDS]
    # a patch of matrices only: no vectors' table; a missing value is a dash
    only = patch.only("matrices").summary_table()
    assert "vector" not in only and max(len(line) for line in only.splitlines()) <= 100
    part = tt.ThoughtPatch(deltas={k: v for k, v in patch.deltas.items() if not k.startswith("blocks.1.attn")},
                           meta=patch.meta).summary_table()
    assert " - " in part + " "


def test_repr_is_short_and_shows_no_values(patch):
    text = repr(patch)
    assert len(text) < 300, text
    assert text.startswith("ThoughtPatch(") and "tensor(" not in text
    for kind in MATRIX_KINDS:
        assert f"{kind} rank<=" in text, text
    assert "float64" in text and "layers=0-2 (3)" in text and "b_out" in text
    assert repr(CHUNK[:24]) in text
    assert str(patch) == text
    long = tt.ThoughtPatch(deltas=_dense_copy(patch).deltas, meta={**patch.meta, "chunk": "x" * 5000})
    text = repr(long)
    assert len(text) < 300 and "W_in dense" in text


def test_factors_are_checked(patch):
    name, (left, right) = next(iter(patch.factors.items()))
    with pytest.raises(tt.InputError, match="both"):
        PatchDeltas({name: patch.deltas[name]}, {name: (left, right)})
    with pytest.raises(tt.InputError, match="factors of"):
        PatchDeltas(factors={name: (left, right.T)})
