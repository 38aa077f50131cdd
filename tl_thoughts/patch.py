"""``ThoughtPatch``: a token-independent weight patch, applied without surprises, saved and loaded."""

import contextlib
import hashlib
import json
import math
import os
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from tl_thoughts import _tl
from tl_thoughts._tl import Model
from tl_thoughts.errors import InputError, TLThoughtsError, UnsupportedArchitectureError, check_int
from tl_thoughts.fingerprint import fingerprint
from tl_thoughts.version import __version__

FORMAT = "tl_thoughts.ThoughtPatch/2"
LEGACY_FORMATS = ("tl_thoughts.ThoughtPatch/1",)  # still read: see ThoughtPatch.load
FORMS = ("weight", "activation")
MATRICES = ("W_O", "W_gate", "W_in", "W_out")  # the thought matrices' parameters, in summary order
PARTS = ("vectors", "matrices")  # ThoughtPatch.only


class PatchFileError(TLThoughtsError, ValueError):
    """A saved patch that is truncated, corrupted, or not a tl_thoughts patch."""


class IncompatibleModelError(TLThoughtsError, ValueError):
    """A patch applied to (or loaded for) a model of other shapes or another identity."""


def model_identity(model: Model) -> dict:
    """Shapes and a fingerprint of every parameter ([`tl_thoughts.fingerprint.fingerprint`][]) of
    the model's own weights: those under any patch applied in its weight form right now (so that
    patches can be stacked), after any [`ThoughtPatch.merge_into`][] (a merged model is another
    model). A patch is only ever applied to the model it was fitted on.

    The identity does not depend on the backend: the parameters are read by their
    HookedTransformer names and shapes (on a TransformerBridge, the views it exposes and zeros
    for the biases its checkpoint lacks, as TransformerLens' conversion writes them), so the same
    weights give the same identity on a HookedTransformer (TransformerLens 3.9) and on a
    TransformerBridge (TransformerLens 4), and a patch saved on one loads into the other.

    Example:
        >>> sorted(model_identity(model))
        ['fingerprint', 'model_name', 'shapes']
    """
    cfg = model.cfg
    spec = _tl.model_spec(model)
    shapes = dict(
        n_layers=spec.n_layers, d_model=spec.d_model, d_mlp=spec.d_mlp, n_heads=spec.n_heads,
        n_kv_heads=spec.n_kv_heads, d_head=spec.d_head, d_vocab=cfg.d_vocab,
        gated_mlp=spec.gated_mlp, parallel_attn_mlp=spec.parallel_attn_mlp,
        normalization_type=cfg.normalization_type, act_fn=cfg.act_fn, positional=spec.positional,
    )
    h = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode())
    h.update(fingerprint(_own_parameters(model)).encode())
    return dict(model_name=cfg.model_name, shapes=shapes, fingerprint=h.hexdigest())


def _legacy_fingerprint(model: Model, shapes: dict) -> str:
    """The fingerprint of format-1 patch files: float32 bytes of the first 4096 values of W_E,
    W_U and the first query matrix."""
    h = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode())
    own = _own_parameters(model)
    for name in _tl.IDENTITY_NAMES:
        h.update(own[name].detach().flatten()[:4096].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


def _checksum(tensors: dict[str, Tensor], meta: dict) -> str:
    """SHA-256 of the tensors ([`_tensor_digest`][]) and of the metadata (canonical JSON)."""
    h = hashlib.sha256(_tensor_digest(tensors).encode())
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def _tensor_digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def factor_product(left: Tensor, right: Tensor) -> Tensor:
    """The delta a thought matrix stored as factors stands for: ``left @ right``, shaped
    ``left.shape[:-1] + right.shape[1:]`` (``left``: ``[..., r]``, the parameter's leading
    dimensions; ``right``: ``[r, out]``), in the factors' dtype, on their device. The one function
    that materialises factored deltas, in a fitted patch and a loaded one alike: the same factors
    give the same bits (on the same device).

    Example:
        >>> factor_product(torch.ones(2, 3, 1), torch.ones(1, 4)).shape
        torch.Size([2, 3, 4])
    """
    r = left.shape[-1]
    return (left.reshape(-1, r) @ right).reshape(*left.shape[:-1], right.shape[-1])


class PatchDeltas(Mapping):
    """A patch's deltas by parameter name (``ThoughtPatch.deltas``): each one held either as a
    dense tensor or, for a thought matrix of low rank, as exact factors ``(left, right)``
    (`factors`), materialised by [`factor_product`][] on each access and not kept (a
    fitted patch holds the factors only). A read-only mapping for its users; ``put`` and
    ``put_factors`` fill it."""

    def __init__(self, deltas: Mapping[str, Tensor] | None = None,
                 factors: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> None:
        self._entries: dict[str, Tensor | tuple[Tensor, Tensor]] = {}
        if isinstance(deltas, PatchDeltas):
            self._entries.update(deltas._entries)
        elif deltas is not None:
            for name, d in deltas.items():
                self.put(name, d)
        for name, pair in (factors or {}).items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InputError(f"factors[{name!r}] must be a pair (left, right) of tensors")
            if name in self._entries and not isinstance(self._entries[name], tuple):
                raise InputError(f"{name!r} is given both as a dense delta and as factors")
            self.put_factors(name, *pair)

    def put(self, name: str, delta: Tensor) -> None:
        """Hold ``delta`` (dense) for ``name``, the tensor itself."""
        if not isinstance(delta, Tensor):
            raise InputError(f"delta {name!r} must be a tensor, got {type(delta).__name__}")
        self._entries[name] = delta

    def put_factors(self, name: str, left: Tensor, right: Tensor) -> None:
        """Hold ``name``'s delta as ``factor_product(left, right)``."""
        if not (isinstance(left, Tensor) and isinstance(right, Tensor)) or left.dim() < 2 or right.dim() != 2 \
                or left.shape[-1] != right.shape[0] or left.dtype != right.dtype or left.device != right.device:
            raise InputError(f"factors of {name!r}: left [..., r] and right [r, out] tensors of one dtype and device")
        self._entries[name] = (left, right)

    def __getitem__(self, name: str) -> Tensor:
        entry = self._entries[name]
        return factor_product(*entry) if isinstance(entry, tuple) else entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries  # Mapping's own would multiply factors out to answer

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"PatchDeltas({len(self)} deltas, {len(self.factors)} as factors)"

    @property
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``name -> (left, right)`` for the deltas held as factors (a new dict, the same tensors)."""
        return {n: e for n, e in self._entries.items() if isinstance(e, tuple)}

    def subset(self, names: Sequence[str]) -> "PatchDeltas":
        """A new mapping holding ``names``' entries (the same tensors, dense or factors)."""
        out = PatchDeltas()
        out._entries = {n: self._entries[n] for n in names}
        return out

    def stored(self, name: str) -> Tensor | tuple[Tensor, Tensor]:
        """What is held for ``name``: the dense tensor or the ``(left, right)`` factors."""
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self._entries[name]
        return (*entry[0].shape[:-1], entry[1].shape[1]) if isinstance(entry, tuple) else tuple(entry.shape)

    def dtype(self, name: str) -> torch.dtype:
        entry = self._entries[name]
        return entry[0].dtype if isinstance(entry, tuple) else entry.dtype

    def nbytes(self) -> int:
        """Bytes held (factors counted as the factors, not their product)."""
        tensors = [t for e in self._entries.values() for t in (e if isinstance(e, tuple) else (e,))]
        return sum(t.numel() * t.element_size() for t in tensors)


def svdvals_of(entry: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """Singular values (float64, descending) of a thought matrix, ``W_O`` with its heads stacked:
    of the dense matrix, or of ``left @ right`` from its factors (QR of each factor, the SVD of the
    small ``r x r`` core ``R_left @ R_right^T``; only its ``r`` values, the others being 0).

    Example:
        >>> left, right = torch.randn(50, 2, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64)
        >>> bool(torch.allclose(svdvals_of((left, right)), torch.linalg.svdvals(left @ right)[:2]))
        True
    """
    if not isinstance(entry, tuple):
        m = entry.flatten(0, 1) if entry.dim() == 3 else entry
        return torch.linalg.svdvals(m.double())
    return torch.linalg.svdvals(_core(*entry)[1])


def _core(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Q_l, C, Q_r)`` with ``left @ right = Q_l @ C @ Q_r^T`` (float64; ``left`` flattened to
    ``[rows, r]``): ``Q_l R_l = left``, ``Q_r R_r = right^T``, ``C = R_l @ R_r^T`` (``r x r``)."""
    q_l, r_l = torch.linalg.qr(left.reshape(-1, left.shape[-1]).double())
    q_r, r_r = torch.linalg.qr(right.double().T)
    return q_l, r_l @ r_r.T, q_r


class ThoughtPatch:
    """Token-independent weight deltas fitted from a chunk, per block (THEORY 4).

    ``ThoughtPatch(deltas, steering=None, meta=None, factors=None)``: ``deltas`` dense tensors by
    parameter name, ``factors`` thought matrices as ``(left, right)`` pairs (see `factors`).

    Attributes:
        deltas: TransformerLens parameter name -> the delta, same shape as the parameter (a
            read-only mapping, [`PatchDeltas`][]; a delta held as factors is materialised by
            [`factor_product`][] on each access):
            ``blocks.{l}.mlp.b_out`` or ``blocks.{l}.attn.b_O`` ``[d_model]`` (the thought vector,
            at its site), ``blocks.{l}.mlp.W_in`` / ``W_gate`` ``[d_model, d_mlp]`` (the thought
            matrices of the MLP input), ``blocks.{l}.attn.W_O`` ``[head, d_head, d_model]`` (the
            thought matrix of the attention output, with ``attention_matrix=True``) and
            ``blocks.{l}.mlp.W_out`` ``[d_mlp, d_model]`` (the thought matrix of the MLP output,
            with ``output_matrix=True``).
        steering: ``"steering.{l}"`` -> the plain mean-difference steering vector at block ``l``'s
            attention output (full minus unpatched reduced run, averaged over the pooled
            positions), and ``"residual.{l}"`` -> the mean accumulated residual difference entering
            block ``l``'s MLP; empty if not computed.
        meta: JSON metadata: the model's identity and shapes, layers, options, the chunk's text,
            the template, how many examples and tokens it was fitted on, the library version;
            ``"unpatched_positions"`` when fitted with ``patch_prefix=False`` (see
            [`unpatched_positions`][]).
        factors: The thought matrices held as exact factors, ``name -> (left, right)``: a
            ridge solution lies in the span of its fitted rows, so ``fit_thought`` stores each
            matrix of rank ``r`` (at most the number of fitted rows) as ``left`` ``[..., r]``
            (orthonormal columns, the parameter's leading dimensions) and ``right`` ``[r, out]``
            when that is smaller than the dense matrix; its delta is ``factor_product(left,
            right)``, in a fitted patch and a loaded one alike (bit-identical). Empty for a patch
            of dense deltas.
    """

    def __init__(self, deltas: Mapping[str, Tensor] | None = None, steering: dict[str, Tensor] | None = None,
                 meta: dict | None = None, factors: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> None:
        self.deltas = PatchDeltas(deltas, factors)
        self.steering = {} if steering is None else steering
        self.meta = {} if meta is None else meta

    @property
    def deltas(self) -> PatchDeltas:
        return self._deltas

    @deltas.setter
    def deltas(self, value: Mapping[str, Tensor]) -> None:
        self._deltas = value if isinstance(value, PatchDeltas) else PatchDeltas(value)

    @property
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        return self.deltas.factors

    @property
    def nbytes(self) -> int:
        """Bytes of the deltas as held (factors, not their products) and of the steering vectors."""
        return self.deltas.nbytes() + sum(t.numel() * t.element_size() for t in self.steering.values())

    @classmethod
    @torch.no_grad()
    def create(
        cls, model: Model, deltas: Mapping[str, Tensor], steering: dict[str, Tensor], meta: dict
    ) -> "ThoughtPatch":
        """A patch of ``model`` (``deltas``: dense tensors, or a [`PatchDeltas`][] holding
        factors), its identity, the library version and the format recorded in ``meta``."""
        params = _tl.weights(model)
        deltas = PatchDeltas(deltas)
        for name in deltas:
            if name not in params or params[name].shape != deltas.shape(name):
                raise InputError(f"delta {name!r} does not match a parameter of the model")
        meta = {**meta, "model": model_identity(model), "version": __version__, "format": FORMAT}
        return cls(deltas=deltas, steering=dict(steering), meta=meta)

    # --- inspection ---

    @property
    def layers(self) -> list[int]:
        return sorted({int(n.split(".")[1]) for n in self.deltas})

    @property
    def unpatched_positions(self) -> int:
        """How many leading positions the patch leaves unpatched: 0 (it acts everywhere, as new
        weights do), or the length of the prefix before the chunk's place when fitted with
        ``patch_prefix=False`` (then it is applied as activation hooks, from that position on)."""
        return int(self.meta.get("unpatched_positions", 0))

    def vector(self, layer: int) -> Tensor | None:
        """The thought vector of ``layer`` (at its site), or None."""
        for name in (f"blocks.{layer}.mlp.b_out", f"blocks.{layer}.attn.b_O"):
            if name in self.deltas:
                return self.deltas[name]
        return None

    def matrix(self, layer: int, name: str = "W_in") -> Tensor | None:
        """The thought matrix of ``layer`` for ``W_in``, ``W_gate`` (``[d_model, d_mlp]``),
        ``W_out`` (``[d_mlp, d_model]``) or ``W_O`` (``[head * d_head, d_model]``, heads stacked),
        or None."""
        delta = self.deltas.get(_tl.param_name(layer, name))
        return delta.flatten(0, 1) if delta is not None and name == "W_O" else delta

    @torch.no_grad()
    def summary(self) -> list[dict]:
        """Per fitted layer: the vector's norm, each matrix's norm (``W_O``, ``W_gate``, ``W_in``, ``W_out``),
        numerical rank and effective rank (exp of the entropy of its normalised singular values),
        and the cosine between the thought vector and the plain mean-difference steering vector at
        the same layer. The singular values of a matrix held as factors come from its factors
        ([`svdvals_of`][]: QR of each, the SVD of an ``r x r`` core), in float64; of a dense one,
        from its SVD in float64."""
        rows = []
        for layer in self.layers:
            row: dict = {"layer": layer}
            v = self.vector(layer)
            if v is not None:
                row["vector_norm"] = float(v.norm())
                s = self.steering.get(f"steering.{layer}")
                r = self.steering.get(f"residual.{layer}")
                if s is not None:
                    row["cos_steering"] = _cos(v, s)
                if r is not None:
                    row["cos_residual"] = _cos(v, r)
            for name in MATRICES:
                key = _tl.param_name(layer, name)
                if key not in self.deltas:
                    continue
                sv = svdvals_of(self.deltas.stored(key))
                shape = self.deltas.shape(key)
                size = max(math.prod(shape[:-1]), shape[-1])
                row[f"{name}_norm"] = float(sv.norm())
                row[f"{name}_rank"] = int((sv > sv.max() * size * torch.finfo(self.deltas.dtype(key)).eps).sum())
                p = sv / sv.sum() if float(sv.sum()) > 0 else sv
                nz = p[p > 0]
                row[f"{name}_effective_rank"] = float(torch.exp(-(nz * nz.log()).sum())) if len(nz) else 0.0
            rows.append(row)
        return rows

    @torch.no_grad()
    def truncated(self, rank: int) -> "ThoughtPatch":
        """A copy whose every thought matrix is replaced by its best rank-``rank`` approximation:
        its projection on its top ``rank`` singular directions, the closest matrix of that rank in
        Frobenius and spectral norm (Eckart-Young; the directions are the top eigenvectors of the
        smaller Gram matrix ``m @ m.T`` or ``m.T @ m``, computed in the delta's precision, float32
        at least). The thought vectors and steering vectors are copied as they are. ``W_O`` is
        truncated with its heads stacked, ``[head * d_head, d_model]``, as [`matrix`][] returns
        it. A matrix whose smaller dimension is at most ``rank`` is copied unchanged. ``rank=1``
        gives rank-1 edits, the form of ROME's. A matrix held as factors (`factors`) is
        truncated from them (float64: QR of each factor, the SVD of the ``r x r`` core) and copied
        unchanged when ``rank`` is at least its ``r``. The truncated matrices are held as factors
        (``[..., rank]`` and ``[rank, out]``) when these are smaller. The original patch is not
        changed; ``meta["truncated_rank"]`` records the rank.

        Raises:
            ArgumentTypeError: ``rank`` is not an integer.
            InputError: ``rank < 1``.
            InputError: The patch has no thought matrix.

        Example:
            >>> small = patch.truncated(1)
            >>> int(torch.linalg.matrix_rank(small.matrix(0, "W_in"))), small.meta["truncated_rank"]
            (1, 1)
        """
        return self.truncations([rank])[0]

    @torch.no_grad()
    def truncations(self, ranks: Sequence[int]) -> list["ThoughtPatch"]:
        """[`truncated`][] at each of ``ranks``, in that order, from ONE eigendecomposition per
        matrix (the same copies as separate calls, at the cost of one).

        Raises:
            ArgumentTypeError: A rank is not an integer.
            InputError: A rank is < 1, or no rank is given.
            InputError: The patch has no thought matrix.

        Example:
            >>> tuple(int(torch.linalg.matrix_rank(p.matrix(0, "W_in"))) for p in patch.truncations((1, 2)))
            (1, 2)
        """
        ranks = list(ranks)
        if not ranks:
            raise InputError("ranks: at least one rank is needed")
        for rank in ranks:
            check_int(rank, "rank", minimum=1)
        matrices = [k for k in self.deltas if k.rsplit(".", 1)[-1] in MATRICES]
        if not matrices:
            raise InputError("the patch has no thought matrix to truncate (a vector-only patch)")
        out = [PatchDeltas(self.deltas) for _ in ranks]
        for name in matrices:
            entry, shape = self.deltas.stored(name), self.deltas.shape(name)
            lead, p, q = shape[:-1], math.prod(shape[:-1]), shape[-1]
            if isinstance(entry, tuple):  # from the factors: float64, the SVD of the r x r core
                wanted = [i for i, rank in enumerate(ranks) if rank < min(entry[0].shape[-1], p, q)]
                if not wanted:
                    continue
                q_l, core, q_r = _core(*entry)
                u, sv, vh = torch.linalg.svd(core)
                for i in wanted:
                    k = ranks[i]
                    out[i].put_factors(name, (q_l @ (u[:, :k] * sv[:k])).reshape(*lead, k).to(entry[0].dtype),
                                       (vh[:k] @ q_r.T).to(entry[0].dtype))
                continue
            d = entry
            m = (d.flatten(0, 1) if name.endswith("W_O") else d).to(torch.promote_types(d.dtype, torch.float32))
            wanted = [i for i, rank in enumerate(ranks) if rank < min(m.shape)]
            if not wanted:
                continue
            wide = m.shape[0] <= m.shape[1]
            vecs = torch.linalg.eigh(m @ m.T if wide else m.T @ m).eigenvectors  # ascending eigenvalues
            for i in wanted:
                k = ranks[i]
                top = vecs[:, -k:]
                left, right = (top, top.T @ m) if wide else (m @ top, top.T)
                if m.dtype == d.dtype and k * (p + q) < p * q:  # the factors are smaller: kept as such
                    out[i].put_factors(name, left.reshape(*lead, k), right)
                else:
                    out[i].put(name, (left @ right).reshape(d.shape).to(d.dtype))
        return [ThoughtPatch(deltas=deltas, steering=dict(self.steering), meta={**self.meta, "truncated_rank": rank})
                for deltas, rank in zip(out, ranks)]

    def only(self, part: str) -> "ThoughtPatch":
        """A copy with one part of the patch: ``"vectors"`` keeps the thought vectors (the bias
        deltas ``b_O`` / ``b_out``) and drops the thought matrices, ``"matrices"`` keeps the thought
        matrices (``W_O``, ``W_gate``, ``W_in``, ``W_out``) and drops the vectors. The kept deltas
        are the same tensors (dense, or the same factors), not fitted again (an ablation of this patch; to fit a vector-only or
        matrix-only patch, use ``fit_thought(fit="vector" | "matrix")``). The steering vectors and
        the metadata are copied; ``meta["part"]`` records the part.

        Raises:
            InputError: ``part`` is neither ``"vectors"`` nor ``"matrices"``.
            InputError: The patch has no delta of that part.

        Example:
            >>> sorted({name.rsplit(".", 1)[-1] for name in patch.only("vectors").deltas})
            ['b_out']
        """
        if part not in PARTS:
            raise InputError(f"part must be one of {PARTS}, got {part!r}")
        keep = self.deltas.subset([name for name in self.deltas
                                   if (name.rsplit(".", 1)[-1] in MATRICES) == (part == "matrices")])
        if not keep:
            raise InputError(f"the patch has no {'thought matrix' if part == 'matrices' else 'thought vector'} to keep")
        return ThoughtPatch(deltas=keep, steering=dict(self.steering), meta={**self.meta, "part": part})

    def summary_table(self) -> str:
        """[`summary`][] as text, every line at most 100 characters, one row per layer: a table
        of the thought vectors (norm, cosine with the steering vector and with the residual
        difference), then one of the thought matrices, a column group per parameter (``norm``,
        numerical ``rank``, effective rank ``eff``); ``-`` where a layer has no such value.

        Example:
            >>> print(patch.summary_table())  # doctest: +SKIP
            layer  vector norm  cos steering  cos residual
                0        1.234         0.912         0.876
            <BLANKLINE>
                  W_gate                 W_in
            layer      norm  rank    eff      norm  rank    eff
                0     2.345    12   3.02     4.567    12   3.41
        """
        rows = self.summary()
        if not rows:
            return "(a patch without deltas)"
        lines: list[str] = []
        if any("vector_norm" in row for row in rows):
            lines.append("layer  vector norm  cos steering  cos residual")
            for row in rows:
                lines.append(f"{row['layer']:>5}" + "".join(
                    _cell(row.get(key), width, spec)
                    for key, width, spec in (("vector_norm", 13, ".4g"), ("cos_steering", 14, ".3f"),
                                             ("cos_residual", 14, ".3f"))))
        names = [n for n in MATRICES if any(f"{n}_norm" in row for row in rows)]
        if names:
            if lines:
                lines.append("")
            lines.append("     " + "".join(f"   {n:<20}" for n in names).rstrip())
            lines.append("layer" + "      norm  rank    eff" * len(names))
            for row in rows:
                lines.append(f"{row['layer']:>5}" + "".join(
                    _cell(row.get(f"{n}_norm"), 10, ".4g") + _cell(row.get(f"{n}_rank"), 6, "d")
                    + _cell(row.get(f"{n}_effective_rank"), 7, ".2f") for n in names))
        return "\n".join(lines)

    def __repr__(self) -> str:
        """A short description: the chunk (truncated), the layers, the vectors' parameter, each
        matrix parameter with its rank (held as factors) or ``dense``, the dtype, the bytes held;
        never a tensor's values."""
        kinds: dict[str, list[int | None]] = {}
        for name in self.deltas:
            entry = self.deltas.stored(name)
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append(entry[0].shape[-1] if isinstance(entry, tuple) else None)
        parts = []
        for kind, ranks in kinds.items():
            if kind not in MATRICES:
                parts.append(kind)
            elif all(r is None for r in ranks):
                parts.append(f"{kind} dense")
            else:
                known = [r for r in ranks if r is not None]
                parts.append(f"{kind} rank<={max(known)}" + (" (some dense)" if len(known) < len(ranks) else ""))
        layers = self.layers
        where = (f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2
                 else ",".join(map(str, layers))) if layers else "none"
        dtypes = sorted({str(self.deltas.dtype(n)).removeprefix("torch.") for n in self.deltas})
        chunk = self.meta.get("chunk")
        text = f"chunk={chunk[:24]!r}{'...' if len(chunk) > 24 else ''}, " if isinstance(chunk, str) else ""
        if len(where) > 40:
            where = where[:37] + "..."
        return (f"ThoughtPatch({text}layers={where} ({len(layers)}), {', '.join(parts)}, "
                f"{'/'.join(dtypes) or 'no dtype'}, {_size(self.nbytes)})")

    # --- applying ---

    def check_compatible(self, model: Model) -> None:
        """Refuse a model of other shapes or another identity than the one the patch was fitted on
        (its own weights, under any patch applied in the weight form: [`model_identity`][]). A
        model that other patches were merged into ([`merge_into`][], in this process) since the
        patch was fitted on it is accepted: the patch then applies on top of them, as when patches
        are stacked.

        Raises:
            IncompatibleModelError: Other shapes, or other weights (the message lists the patches
                merged into the model, if any).
        """
        mine = self.meta.get("model", {})
        theirs = model_identity(model)
        if mine.get("shapes") != theirs["shapes"]:
            diff = {k: (mine.get("shapes", {}).get(k), v) for k, v in theirs["shapes"].items()
                    if mine.get("shapes", {}).get(k) != v}
            raise IncompatibleModelError(
                f"this patch was fitted on a model with other shapes (patch vs model: {diff})"
            )
        if self.meta.get("format") in LEGACY_FORMATS:
            theirs["fingerprint"] = _legacy_fingerprint(model, theirs["shapes"])
        merged = _STATES[model].merged if model in _STATES else []
        if mine.get("fingerprint") != theirs["fingerprint"] and mine.get("fingerprint") not in [fp for _, fp in merged]:
            why = f"; patches merged into this model: {', '.join(label for label, _ in merged)}" if merged else ""
            raise IncompatibleModelError(
                f"this patch was fitted on another model ({mine.get('model_name')!r}, weights "
                f"fingerprint {str(mine.get('fingerprint'))[:12]}...) than this one "
                f"({theirs['model_name']!r}, {theirs['fingerprint'][:12]}...){why}"
            )

    @torch.no_grad()
    def parameters(self, model: Model) -> dict[str, Tensor]:
        """The patched parameter values (original + delta), by name."""
        return _tl.patched_values(model, self.deltas)

    @contextlib.contextmanager
    def apply(self, model: Model, form: str | None = None) -> Iterator[Model]:
        """Context manager: ``model`` behaves as if the chunk were there (as far as the patch
        carries it); restored bit-identically on exit, also on an exception.

        Patches can be stacked (several applied at once, in either form) and removed in any order
        ([`attach`][]): the parameters are always the model's own plus the deltas of the patches
        applied in the weight form, added in the order they were applied, and the model's own
        tensors once none is left. The same patch cannot be applied twice at once, nor after
        [`merge_into`][].

        Args:
            model: The model the patch was fitted on.
            form: ``"weight"`` (parameters really patched) or ``"activation"`` (hooks adding the
                same changes to the activations). Default: ``"weight"``, or ``"activation"`` for a
                patch that leaves a prefix unpatched ([`unpatched_positions`][]), which new
                weights cannot do. Its hooks count positions from the first of each sequence,
                also through TransformerLens' key-value cache in ``generate``; with left padding
                the prefix is not at the first positions: pad on the right (a forward pass on a
                left-padded batch raises ``InputError``).

        Raises:
            InputError: ``form="weight"`` for a patch that leaves a prefix unpatched; this patch
                is applied to the model already, or merged into it.
            IncompatibleModelError: The patch was fitted on another model.
        """
        remove = self._apply(model, form)
        try:
            yield model
        finally:
            remove()

    def attach(self, model: Model, form: str | None = None) -> "PatchHandle":
        """Apply the patch until ``handle.remove()`` (or the end of a ``with handle:`` block), as
        [`apply`][] does; handles can be removed in any order."""
        return PatchHandle(self._apply(model, form))

    def merge_into(self, model: Model) -> None:
        """Add the patch to the model's parameters FOR GOOD (explicit, not undone). Patches applied
        at the time stay applied, on top of the merged weights. The model's fingerprint changes;
        patches fitted on it before the merge still apply, on top of the merged one
        ([`check_compatible`][]), but the merged patch itself cannot be applied again.

        Raises:
            InputError: The patch leaves a prefix unpatched ([`unpatched_positions`][]): new
                weights would patch it too; or it is applied to the model now, or merged already.
            IncompatibleModelError: The patch was fitted on another model.
        """
        self._refuse_weights("merged into the weights it would patch them too")
        state = _state(model)
        key = self._refuse_twice(state)
        self.check_compatible(model)
        if unstored := _tl.unstored_weights(model, list(self.deltas)):
            raise UnsupportedArchitectureError(
                f"merge_into: this TransformerBridge's checkpoint has no {unstored[0]} (it reads as zeros): "
                "merging would add parameters to the HuggingFace model; apply the patch instead (apply/attach)"
            )
        before = model_identity(model)["fingerprint"]
        own = _own_parameters(model)
        with torch.no_grad():
            for name, delta in self.deltas.items():
                target = own[name]
                target.copy_(target + delta.reshape(target.shape).to(target))
        state.merged.append((self._label(), before))
        state.merged_keys.append(key)
        state.install(model)

    def _apply(self, model: Model, form: str | None) -> Callable[[], None]:
        """Apply the patch (checked) and return the function that removes it."""
        if form is None:
            form = "activation" if self.unpatched_positions else "weight"
        if form not in FORMS:
            raise InputError(f"form must be one of {FORMS}, got {form!r}")
        if form == "weight":
            self._refuse_weights("which new weights cannot do: apply it with form='activation'")
        state = _state(model)
        key = self._refuse_twice(state)
        self.check_compatible(model)
        application = _Application(key=key, label=self._label(), form=form, deltas=self.deltas)
        if form == "weight":
            state.check_untouched(model)
            state.active.append(application)
            try:
                state.install(model)
            except BaseException:
                state.active.remove(application)
                state.install(model)
                raise
        else:
            # cache-safe: the hooks read how many positions a key-value cache holds (_Positions)
            application.remove_hooks = _tl.attach_hooks(model, self.hooks(model), cache_safe=True)
            state.active.append(application)
        return lambda: state.remove(model, application)

    def _label(self) -> str:
        chunk = self.meta.get("chunk")
        return f"the patch of chunk {chunk[:40]!r}" if isinstance(chunk, str) else "a patch"

    def _refuse_twice(self, state: "_ModelState") -> str:
        """The patch's key; raise ``InputError`` if it is applied to the model or merged into it."""
        held: dict[str, Tensor] = {}  # what the patch holds: factors are read as they are, not multiplied out
        for name in self.deltas:
            entry = self.deltas.stored(name)
            if isinstance(entry, tuple):
                held[f"left:{name}"], held[f"right:{name}"] = entry
            else:
                held[f"delta:{name}"] = entry
        key = fingerprint(held) + f":{self.unpatched_positions}"
        for application in state.active:
            if application.key == key:
                raise InputError(
                    f"{self._label()} is applied to this model already ({application.form} form): applying "
                    "it again would add its deltas twice; remove the first application (handle.remove(), "
                    "or leave its `with` block) first"
                )
        if key in state.merged_keys:
            raise InputError(
                f"{self._label()} was merged into this model's weights (merge_into): applying it again "
                "would add its deltas twice"
            )
        return key

    def _refuse_weights(self, why: str) -> None:
        """Raise ``InputError`` (saying ``why``) if the patch leaves a prefix unpatched, which new
        weights, acting on every position, cannot do."""
        if self.unpatched_positions:
            raise InputError(
                f"this patch leaves the first {self.unpatched_positions} position(s) unpatched (fitted "
                f"with patch_prefix=False), {why}"
            )

    def _matrix(self, name: str) -> Tensor | tuple[Tensor, Tensor] | None:
        """The delta of matrix ``name`` as its activation hook multiplies by it, with the input
        dimensions flattened (``W_O``: heads and ``d_head``): dense, or the factors ``(left,
        right)`` of a low-rank one; None if the patch has none."""
        if name not in self.deltas:
            return None
        entry = self.deltas.stored(name)
        if isinstance(entry, tuple):
            left, right = entry
            return left.reshape(-1, left.shape[-1]), right
        return entry.flatten(0, -2)

    def hooks(self, model: Model) -> list[tuple[str, object]]:
        """TransformerLens forward hooks that add the patch's effect to the activations (from
        position [`unpatched_positions`][] on; each patched block's ``attn.hook_pattern`` then
        reads how many positions a key-value cache holds already, and raises ``InputError`` on a
        left-padded batch)."""
        spec = _tl.model_spec(model)
        hooks: list[tuple[str, object]] = []
        where = _Positions(self.unpatched_positions)
        for layer in self.layers:
            if where.first:  # the offset of this call's first position: keys minus queries
                hooks.append((_tl.pattern_name(layer), where.read_offset))
            b_O = self.deltas.get(_tl.param_name(layer, "b_O"))
            b_out = self.deltas.get(_tl.param_name(layer, "b_out"))
            W_O = self._matrix(_tl.param_name(layer, "W_O"))
            W_out = self._matrix(_tl.param_name(layer, "W_out"))
            attn_adders, mlp_adders = [], []  # hooks adding to the attention / MLP output
            if W_O is not None:  # attn_out gains z @ dW_O: keep z, add to the attention output
                z_store: dict[str, Tensor] = {}

                def keep_z(act, hook, store=z_store):
                    store["x"] = act.flatten(-2)

                hooks.append((_tl.z_name(layer), keep_z))
                attn_adders.append(_matmul_hook(z_store, W_O, where))
            if b_O is not None:
                attn_adders.append(_add_hook(b_O, where))
            if b_out is not None:
                mlp_adders.append(_add_hook(b_out, where))
            mats = {n: self._matrix(_tl.param_name(layer, n)) for n in spec.mlp_input_matrices
                    if _tl.param_name(layer, n) in self.deltas}
            if mats:
                store: dict[str, Tensor] = {}

                def keep(act, hook, store=store, layer=layer):
                    store["x"] = _tl.mlp_norm(model, layer, act)

                hooks.append((_tl.mlp_input_resid_name(spec, layer), keep))
                for name, site in _tl.mlp_input_product_names(spec, layer).items():
                    if name in mats:
                        hooks.append((site, _matmul_hook(store, mats[name], where)))
            if W_out is not None:  # mlp_out gains h @ dW_out (h: the patched MLP's hidden activations)
                post_store: dict[str, Tensor] = {}

                def keep_post(act, hook, store=post_store):
                    store["x"] = act

                hooks.append((_tl.mlp_post_name(layer), keep_post))
                mlp_adders.append(_matmul_hook(post_store, W_out, where))
            # where a post-norm follows the sublayer, its output changes before the norm, as the
            # weights' deltas change it (b_O and W_O inside the attention, b_out and W_out inside the MLP)
            hooks += _output_hooks(model, layer, spec.attn_post_norm, _tl.attn_out_name(layer), attn_adders)
            hooks += _output_hooks(model, layer, spec.mlp_post_norm, _tl.mlp_out_name(layer), mlp_adders)
        return hooks

    # --- saving and loading ---

    def save(self, path: str | os.PathLike) -> Path:
        """Write the patch to one safetensors file (tensors + JSON metadata), atomically; a
        SHA-256 checksum covers the tensors and the metadata. Each delta is stored as it is held:
        ``delta:{name}`` (dense), or ``left:{name}`` and ``right:{name}`` (a thought matrix held as
        factors, `factors`: rank times the sum of its dimensions instead of their product);
        steering vectors as ``steering:{name}``. The file is readable by others
        (mode 0644 under the usual umask), as files written by ``open`` are.

        Raises:
            PatchFileError: ``path`` is a folder, lies under a file, or cannot be written (the
                message names the path and the reason); nothing is left behind.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir():
            raise PatchFileError(f"{path}: is a folder; give the path of the file to write")
        if self.meta.get("format") in LEGACY_FORMATS:
            raise PatchFileError(
                f"{path}: this patch was read from a {self.meta['format']} file without its model; load it "
                "with ThoughtPatch.load(file, model=the model it was fitted on) to upgrade it, then save it"
            )
        tensors = {}
        for k in self.deltas:
            entry = self.deltas.stored(k)
            if isinstance(entry, tuple):  # a thought matrix held as factors: the factors
                tensors[f"left:{k}"], tensors[f"right:{k}"] = (t.detach().contiguous().cpu() for t in entry)
            else:
                tensors[f"delta:{k}"] = entry.detach().contiguous().cpu()
        tensors.update({f"steering:{k}": v.detach().contiguous().cpu() for k, v in self.steering.items()})
        meta = {**self.meta, "format": FORMAT}
        meta["sha256"] = _checksum(tensors, meta)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            save_file(tensors, tmp, metadata={"tl_thoughts": json.dumps(meta)})
            umask = os.umask(0)  # read it back: mkstemp's files are private (0600)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except OSError as e:
            raise PatchFileError(f"{path}: cannot write the patch ({e.strerror or e})") from e
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Model | None = None) -> "ThoughtPatch":
        """Read a patch written by [`save`][]; refuse a truncated or corrupted file, edited
        tensors or metadata, and (when ``model`` is given) a model of other shapes or another
        identity. Thought matrices stored as factors are held as factors again (the same
        values, bit for bit, as the patch saved: [`factor_product`][]). Files of the previous format (``tl_thoughts.ThoughtPatch/1``, whose checksum
        covers the tensors only and whose fingerprint covers three weights) are read with a
        warning; save them again to upgrade them.

        Raises:
            FileNotFoundError: No file at ``path``.
            PatchFileError: Not a readable patch file, or its checksum does not match.
            IncompatibleModelError: ``model`` is not the one the patch was fitted on.
        """
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            raise PatchFileError(f"{path}: is a folder, not a patch file")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = (f.metadata() or {}).get("tl_thoughts")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises several types on a damaged file
            raise PatchFileError(f"{path}: not a readable patch file ({type(e).__name__}: {e})") from e
        if raw_meta is None:
            raise PatchFileError(f"{path}: no tl_thoughts metadata (not a ThoughtPatch file)")
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError as e:
            raise PatchFileError(f"{path}: corrupted metadata") from e
        if not isinstance(meta, dict):
            raise PatchFileError(f"{path}: corrupted metadata (not a JSON object)")
        fmt = meta.get("format")
        if fmt not in (FORMAT, *LEGACY_FORMATS):
            raise PatchFileError(f"{path}: unknown format {fmt!r}, expected {FORMAT!r}")
        stored = meta.pop("sha256", None)
        if fmt == FORMAT:
            if stored != _checksum(tensors, {**meta, "format": FORMAT}):
                raise PatchFileError(
                    f"{path}: the tensors or the metadata do not match their checksum (file corrupted or edited)"
                )
        else:
            if stored != _tensor_digest(tensors):
                raise PatchFileError(f"{path}: the tensors do not match their checksum (file corrupted or edited)")
            warnings.warn(
                f"{path} is a {fmt} file: its checksum does not cover its metadata and its model fingerprint "
                "covers three weights only; load it with model= and save it again to write the current format",
                stacklevel=2,
            )
        lefts = {k[len("left:"):]: v for k, v in tensors.items() if k.startswith("left:")}
        rights = {k[len("right:"):]: v for k, v in tensors.items() if k.startswith("right:")}
        if set(lefts) != set(rights):
            raise PatchFileError(f"{path}: factors without their pair ({sorted(set(lefts) ^ set(rights))})")
        try:
            patch = cls(
                deltas={k[len("delta:"):]: v for k, v in tensors.items() if k.startswith("delta:")},
                steering={k[len("steering:"):]: v for k, v in tensors.items() if k.startswith("steering:")},
                meta=meta,
                factors={k: (lefts[k], rights[k]) for k in lefts},
            )
        except InputError as e:
            raise PatchFileError(f"{path}: inconsistent deltas ({e})") from e
        if model is not None:
            patch.check_compatible(model)
            if fmt != FORMAT:  # checked against its model: upgraded to the current fingerprint
                patch.meta = {**meta, "model": model_identity(model), "format": FORMAT}
        return patch


class PatchHandle:
    """Returned by [`ThoughtPatch.attach`][]; ``remove()`` restores the model (handles of several
    patches can be removed in any order)."""

    def __init__(self, remove: Callable[[], None]):
        self._remove = remove
        self.active = True

    def remove(self) -> None:
        if self.active:
            self._remove()
            self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass(eq=False)
class _Application:
    """One patch applied to a model: its key, a label for messages, its form, its deltas (the
    weight form) or the function removing its hooks (the activation form)."""

    key: str
    label: str
    form: str
    deltas: Mapping[str, Tensor]
    remove_hooks: Callable[[], None] | None = None


@dataclass(eq=False)
class _ModelState:
    """The patches applied to one model right now, and those merged into it.

    ``own`` holds, for each parameter a weight-form patch changes, the model's own tensor (the
    object the parameter held before); ``installed`` the tensor put in its place (own + the deltas
    of the weight-form patches, in the order they were applied)."""

    active: list[_Application] = field(default_factory=list)
    own: dict[str, Tensor] = field(default_factory=dict)
    installed: dict[str, Tensor] = field(default_factory=dict)
    merged: list[tuple[str, str]] = field(default_factory=list)  # (label, fingerprint before)
    merged_keys: list[str] = field(default_factory=list)
    # a TransformerBridge's installed weights (its TransformerLens weights are views of the
    # HuggingFace parameters: written through them, _tl.install_weights); None on a HookedTransformer
    swap: object | None = None

    def check_untouched(self, model: Model) -> None:
        """Raise ``InputError`` if a parameter no longer holds the tensor installed here (replaced
        since by other code, e.g. ``tl_thoughts.computing_in`` entered after the patch)."""
        if _tl.is_bridge(model):
            moved = self.swap.moved() if self.swap is not None else []
        else:
            params = _tl.parameters(model)
            moved = [n for n, t in self.installed.items() if params[n].data.data_ptr() != t.data_ptr()
                     or params[n].dtype != t.dtype]
        if moved:
            raise InputError(
                f"{moved[0]} was replaced since the patch was applied (by code that swaps parameters, "
                "such as tl_thoughts.computing_in entered after it): leave that context before removing "
                "the patch; the model is left as it is"
            )

    @torch.no_grad()
    def install(self, model: Model) -> None:
        """Put own + the weight-form deltas in every parameter they change; own tensors back where
        none is left."""
        self.check_untouched(model)
        wanted: dict[str, list[Tensor]] = {}
        for application in self.active:
            if application.form == "weight":
                for name, delta in application.deltas.items():
                    wanted.setdefault(name, []).append(delta)
        if _tl.is_bridge(model):
            self._install_on_bridge(model, wanted)
            return
        params = _tl.parameters(model)
        for name in list(self.own):
            if name not in wanted:
                params[name].data = self.own.pop(name)
                del self.installed[name]
        for name, deltas in wanted.items():
            value = _with_deltas(self.own.setdefault(name, params[name].data), deltas)
            params[name].data = value
            self.installed[name] = value

    def _install_on_bridge(self, model: Model, wanted: dict[str, list[Tensor]]) -> None:
        """A bridge's weights are views of its HuggingFace parameters: the previous installation
        is undone, then own + the deltas installed anew (``own``: the views of the parameters'
        own data, zeros for a bias the checkpoint lacks)."""
        if self.swap is not None:
            self.swap.restore()
            self.swap = None
        self.own.clear()
        self.installed.clear()
        if not wanted:
            return
        own = {name: _tl.weight(model, name).detach() for name in wanted}
        values = {name: _with_deltas(own[name], deltas) for name, deltas in wanted.items()}
        self.swap = _tl.install_weights(model, values)
        self.own, self.installed = own, values

    def remove(self, model: Model, application: _Application) -> None:
        if application not in self.active:
            return
        if application.form == "weight":
            self.check_untouched(model)
            self.active.remove(application)
            self.install(model)
        else:
            self.active.remove(application)
            application.remove_hooks()


_STATES: "weakref.WeakKeyDictionary[Model, _ModelState]" = weakref.WeakKeyDictionary()


def _with_deltas(own: Tensor, deltas: list[Tensor]) -> Tensor:
    """``own`` plus ``deltas``, added in order (each reshaped and cast to ``own``)."""
    value = own
    for delta in deltas:
        value = value + delta.reshape(own.shape).to(own)
    return value


def _state(model: Model) -> _ModelState:
    if model not in _STATES:
        _STATES[model] = _ModelState()
    return _STATES[model]


def _own_parameters(model: Model) -> dict[str, Tensor]:
    """The model's parameters by name, with each one a weight-form patch changes now replaced by
    the model's own tensor under it."""
    params = {n: p.detach() for n, p in _tl.weights(model).items()}
    if model in _STATES:
        params.update(_STATES[model].own)
    return params


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.double().norm()), float(b.double().norm())
    if na == 0 or nb == 0:
        return math.nan
    # clamped: rounding can put the cosine of parallel vectors a few ulps outside [-1, 1]
    return min(1.0, max(-1.0, float(a.double() @ b.double()) / (na * nb)))


class _Positions:
    """Where a patch's hooks act: every position from ``first`` (counted from the sequence's start)
    on. ``read_offset`` (a hook on ``attn.hook_pattern``, ``[batch, head, query, key]``) records how
    many positions come before this call's first one (those a key-value cache holds)."""

    def __init__(self, first: int):
        self.first = first
        self.offset = 0

    def read_offset(self, pattern: Tensor, hook) -> None:
        self.offset = pattern.shape[-1] - pattern.shape[-2]
        # causal attention without a sliding window (refused by model_spec) gives the first key some
        # weight; exactly none in every head (not an underflow in one) means it is masked: a
        # left-padded sequence, whose prefix is not at the first positions
        if bool((pattern[:, :, -1, 0] == 0).all(dim=1).any()):
            raise InputError(
                f"a sequence of this batch is padded on the left (its first position is masked), but this "
                f"patch leaves the first {self.first} position(s) of each sequence unpatched: pad on the "
                f"right (padding_side='right')"
            )

    def start(self) -> int:
        """Index, in this call's positions, of the first patched one."""
        return max(0, self.first - self.offset)


def _added_from(act: Tensor, change: Tensor, start: int) -> Tensor:
    """``act + change`` from position ``start`` (dimension 1) on."""
    if start == 0:
        return act + change
    out = act.clone()
    out[:, start:] = out[:, start:] + change[:, start:] if change.dim() > 1 else out[:, start:] + change
    return out


def _add_hook(vector: Tensor, where: _Positions):
    def hook(act: Tensor, hook) -> Tensor:
        return _added_from(act, vector.to(act), where.start())

    return hook


def _matmul_hook(store: dict, matrix: Tensor | tuple[Tensor, Tensor], where: _Positions):
    """A hook adding ``x @ matrix`` (``x`` kept in ``store`` by an earlier hook); a matrix held as
    factors ``(left, right)`` is applied as ``(x @ left) @ right``, never multiplied out."""
    if isinstance(matrix, tuple):
        left, right = matrix

        def hook(act: Tensor, hook) -> Tensor:
            return _added_from(act, (store["x"] @ left.to(act)) @ right.to(act), where.start())
    else:

        def hook(act: Tensor, hook) -> Tensor:
            return _added_from(act, store["x"] @ matrix.to(act), where.start())

    return hook


def _output_hooks(model: Model, layer: int, norm: str | None, out_name: str, adders: list) -> list:
    """Hooks adding the ``adders``' changes to a sublayer's output: at ``out_name``
    (``hook_attn_out``, ``hook_mlp_out``) where no norm follows the sublayer; else to the input of
    the block's post-norm ``norm`` (an RMSNorm: Gemma 2/3's ``ln1_post``/``ln2_post``, OLMo 2's
    ``ln1``/``ln2``), which TransformerLens does not hook: ``hook_scale`` keeps the norm's scale,
    and at ``hook_normalized`` the input is rebuilt (normalised input times scale, to rounding),
    changed, and normalised again with the norm's epsilon."""
    if not adders:
        return []
    if norm is None:
        return [(out_name, add) for add in adders]
    kind = _tl.norm_kind(model, layer, norm)
    if kind != "RMS":
        raise UnsupportedArchitectureError(
            f"blocks.{layer}.{norm} is a {kind} norm after the sublayer: the activation form of a patch changes the "
            "sublayer's output before such a norm only for RMS norms (Gemma 2/3, OLMo 2)"
        )
    eps = _tl.norm_eps(model, layer, norm)
    store: dict[str, Tensor] = {}

    def keep_scale(act: Tensor, hook) -> None:
        store["scale"] = act

    def renormalise(act: Tensor, hook) -> Tensor:
        x = act * store["scale"]  # the norm's input
        for add in adders:
            x = add(x, hook)
        return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    return [(_tl.norm_scale_hook_name(layer, norm), keep_scale),
            (_tl.norm_normalized_name(layer, norm), renormalise)]


def _cell(value, width: int, spec: str) -> str:
    """``value`` formatted by ``spec``, right-aligned in ``width``; ``-`` for a missing or NaN one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return format(value, spec).rjust(width)


def _size(n: int) -> str:
    """``n`` bytes, in B, kB or MB."""
    if n < 1000:
        return f"{n} B"
    return f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.1f} MB"
