"""``ThoughtPatch``: a token-independent weight patch, applied without surprises, saved and loaded."""

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_thoughts import _tl
from tl_thoughts.errors import InputError, TLThoughtsError
from tl_thoughts.version import __version__

FORMAT = "tl_thoughts.ThoughtPatch/1"
FORMS = ("weight", "activation")
MATRICES = ("W_O", "W_gate", "W_in", "W_out")  # the thought matrices' parameters, in summary order
PARTS = ("vectors", "matrices")  # ThoughtPatch.only


class PatchFileError(TLThoughtsError, ValueError):
    """A saved patch that is truncated, corrupted, or not a tl_thoughts patch."""


class IncompatibleModelError(TLThoughtsError, ValueError):
    """A patch applied to (or loaded for) a model of other shapes or another identity."""


def model_identity(model: HookedTransformer) -> dict:
    """Shapes and a fingerprint of the weights (float32 bytes of a sample of W_E, W_U and the
    first query matrix, which no patch changes), so that a patch is only ever applied to the model
    it was fitted on, also when other patches are applied or merged.

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
    for t in _tl.identity_tensors(model):
        h.update(t.detach().flatten()[:4096].to(torch.float32).cpu().numpy().tobytes())
    return dict(model_name=cfg.model_name, shapes=shapes, fingerprint=h.hexdigest())


def _tensor_digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(eq=False)
class ThoughtPatch:
    """Token-independent weight deltas fitted from a chunk, per block (THEORY 4).

    Attributes:
        deltas: TransformerLens parameter name -> the delta, same shape as the parameter:
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
            :attr:`unpatched_positions`).
    """

    deltas: dict[str, Tensor]
    steering: dict[str, Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def create(
        cls, model: HookedTransformer, deltas: dict[str, Tensor], steering: dict[str, Tensor], meta: dict
    ) -> "ThoughtPatch":
        params = _tl.parameters(model)
        for name, d in deltas.items():
            if name not in params or params[name].shape != d.shape:
                raise InputError(f"delta {name!r} does not match a parameter of the model")
        meta = {**meta, "model": model_identity(model), "version": __version__, "format": FORMAT}
        return cls(deltas=dict(deltas), steering=dict(steering), meta=meta)

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
        the same layer."""
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
                m = self.matrix(layer, name)
                if m is None:
                    continue
                sv = torch.linalg.svdvals(m.double())
                row[f"{name}_norm"] = float(sv.norm())
                row[f"{name}_rank"] = int((sv > sv.max() * max(m.shape) * torch.finfo(m.dtype).eps).sum())
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
        truncated with its heads stacked, ``[head * d_head, d_model]``, as :meth:`matrix` returns
        it. A matrix whose smaller dimension is at most ``rank`` is copied unchanged. ``rank=1``
        gives rank-1 edits, the form of ROME's. The original patch is not changed;
        ``meta["truncated_rank"]`` records the rank.

        Raises:
            TypeError: ``rank`` is not an integer.
            ValueError: ``rank < 1``.
            InputError: The patch has no thought matrix.

        Example:
            >>> small = patch.truncated(1)
            >>> int(torch.linalg.matrix_rank(small.matrix(0, "W_in"))), small.meta["truncated_rank"]
            (1, 1)
        """
        return self.truncations([rank])[0]

    @torch.no_grad()
    def truncations(self, ranks: Sequence[int]) -> list["ThoughtPatch"]:
        """:meth:`truncated` at each of ``ranks``, in that order, from ONE eigendecomposition per
        matrix (the same copies as separate calls, at the cost of one).

        Raises:
            TypeError: A rank is not an integer.
            ValueError: A rank is < 1, or no rank is given.
            InputError: The patch has no thought matrix.

        Example:
            >>> tuple(int(torch.linalg.matrix_rank(p.matrix(0, "W_in"))) for p in patch.truncations((1, 2)))
            (1, 2)
        """
        ranks = list(ranks)
        if not ranks:
            raise ValueError("at least one rank is needed")
        for rank in ranks:
            if isinstance(rank, bool) or not isinstance(rank, int):
                raise TypeError(f"rank must be an integer, got {rank!r}")
            if rank < 1:
                raise ValueError(f"rank must be >= 1, got {rank}")
        matrices = [k for k in self.deltas if k.rsplit(".", 1)[-1] in MATRICES]
        if not matrices:
            raise InputError("the patch has no thought matrix to truncate (a vector-only patch)")
        out = [dict(self.deltas) for _ in ranks]
        for name in matrices:
            d = self.deltas[name]
            m = (d.flatten(0, 1) if name.endswith("W_O") else d).to(torch.promote_types(d.dtype, torch.float32))
            wanted = [i for i, rank in enumerate(ranks) if rank < min(m.shape)]
            if not wanted:
                continue
            wide = m.shape[0] <= m.shape[1]
            vecs = torch.linalg.eigh(m @ m.T if wide else m.T @ m).eigenvectors  # ascending eigenvalues
            for i in wanted:
                top = vecs[:, -ranks[i]:]
                low = top @ (top.T @ m) if wide else (m @ top) @ top.T
                out[i][name] = low.reshape(d.shape).to(d.dtype)
        return [ThoughtPatch(deltas=deltas, steering=dict(self.steering), meta={**self.meta, "truncated_rank": rank})
                for deltas, rank in zip(out, ranks)]

    def only(self, part: str) -> "ThoughtPatch":
        """A copy with one part of the patch: ``"vectors"`` keeps the thought vectors (the bias
        deltas ``b_O`` / ``b_out``) and drops the thought matrices, ``"matrices"`` keeps the thought
        matrices (``W_O``, ``W_gate``, ``W_in``, ``W_out``) and drops the vectors. The kept deltas
        are the same tensors, not fitted again (an ablation of this patch; to fit a vector-only or
        matrix-only patch, use ``fit_thought(fit="vector" | "matrix")``). The steering vectors and
        the metadata are copied; ``meta["part"]`` records the part.

        Raises:
            ValueError: ``part`` is neither ``"vectors"`` nor ``"matrices"``.
            InputError: The patch has no delta of that part.

        Example:
            >>> sorted({name.rsplit(".", 1)[-1] for name in patch.only("vectors").deltas})
            ['b_out']
        """
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        keep = {name: d for name, d in self.deltas.items() if (name.rsplit(".", 1)[-1] in MATRICES) == (part == "matrices")}
        if not keep:
            raise InputError(f"the patch has no {'thought matrix' if part == 'matrices' else 'thought vector'} to keep")
        return ThoughtPatch(deltas=keep, steering=dict(self.steering), meta={**self.meta, "part": part})

    def summary_table(self) -> str:
        """``summary()`` as a fixed-width text table."""
        rows = self.summary()
        keys = [k for k in rows[0] if k != "layer"] if rows else []
        lines = ["layer " + "".join(f"{k:>20}" for k in keys)]
        for row in rows:
            lines.append(f"{row['layer']:>5} " + "".join(f"{row.get(k, float('nan')):>20.4g}" for k in keys))
        return "\n".join(lines)

    # --- applying ---

    def check_compatible(self, model: HookedTransformer) -> None:
        """Refuse a model of other shapes or another identity than the one the patch was fitted on."""
        mine = self.meta.get("model", {})
        theirs = model_identity(model)
        if mine.get("shapes") != theirs["shapes"]:
            diff = {k: (mine.get("shapes", {}).get(k), v) for k, v in theirs["shapes"].items()
                    if mine.get("shapes", {}).get(k) != v}
            raise IncompatibleModelError(
                f"this patch was fitted on a model with other shapes (patch vs model: {diff})"
            )
        if mine.get("fingerprint") != theirs["fingerprint"]:
            raise IncompatibleModelError(
                f"this patch was fitted on another model ({mine.get('model_name')!r}, weights "
                f"fingerprint {str(mine.get('fingerprint'))[:12]}...) than this one "
                f"({theirs['model_name']!r}, {theirs['fingerprint'][:12]}...)"
            )

    @torch.no_grad()
    def parameters(self, model: HookedTransformer) -> dict[str, Tensor]:
        """The patched parameter values (original + delta), by name."""
        return _tl.patched_values(model, self.deltas)

    @contextlib.contextmanager
    def apply(self, model: HookedTransformer, form: str | None = None) -> Iterator[HookedTransformer]:
        """Context manager: ``model`` behaves as if the chunk were there (as far as the patch
        carries it); restored bit-identically on exit, also on an exception.

        Args:
            model: The model the patch was fitted on.
            form: ``"weight"`` (parameters really patched) or ``"activation"`` (hooks adding the
                same changes to the activations). Default: ``"weight"``, or ``"activation"`` for a
                patch that leaves a prefix unpatched (:attr:`unpatched_positions`), which new
                weights cannot do. Its hooks count positions from the first of each sequence,
                also through TransformerLens' key-value cache in ``generate``; with left padding
                the prefix is not at the first positions: pad on the right (a forward pass on a
                left-padded batch raises ``InputError``).

        Raises:
            InputError: ``form="weight"`` for a patch that leaves a prefix unpatched.
        """
        if form is None:
            form = "activation" if self.unpatched_positions else "weight"
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if form == "weight":
            self._refuse_weights("which new weights cannot do: apply it with form='activation'")
        self.check_compatible(model)
        if form == "weight":
            with _tl.swapped_tensors(model, self.parameters(model)):
                yield model
        else:
            with _tl.hooked(model, self.hooks(model)):
                yield model

    def attach(self, model: HookedTransformer, form: str | None = None) -> "PatchHandle":
        """Apply the patch until ``handle.remove()`` (or the end of a ``with handle:`` block)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.apply(model, form))
        return PatchHandle(stack)

    def merge_into(self, model: HookedTransformer) -> None:
        """Add the patch to the model's parameters FOR GOOD (explicit, not undone).

        Raises:
            InputError: The patch leaves a prefix unpatched (:attr:`unpatched_positions`): new
                weights would patch it too.
        """
        self._refuse_weights("merged into the weights it would patch them too")
        self.check_compatible(model)
        new = self.parameters(model)
        params = _tl.parameters(model)
        with torch.no_grad():
            for name, value in new.items():
                params[name].copy_(value)

    def _refuse_weights(self, why: str) -> None:
        """Raise ``InputError`` (saying ``why``) if the patch leaves a prefix unpatched, which new
        weights, acting on every position, cannot do."""
        if self.unpatched_positions:
            raise InputError(
                f"this patch leaves the first {self.unpatched_positions} position(s) unpatched (fitted "
                f"with patch_prefix=False), {why}"
            )

    def hooks(self, model: HookedTransformer) -> list[tuple[str, object]]:
        """TransformerLens forward hooks that add the patch's effect to the activations (from
        position :attr:`unpatched_positions` on; each patched block's ``attn.hook_pattern`` then
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
            W_O = self.deltas.get(_tl.param_name(layer, "W_O"))
            W_out = self.deltas.get(_tl.param_name(layer, "W_out"))
            if W_O is not None:  # attn_out gains z @ dW_O: keep z, add at hook_attn_out
                z_store: dict[str, Tensor] = {}

                def keep_z(act, hook, store=z_store):
                    store["x"] = act.flatten(-2)

                hooks.append((_tl.z_name(layer), keep_z))
                hooks.append((_tl.attn_out_name(layer), _matmul_hook(z_store, W_O.flatten(0, 1), where)))
            if b_O is not None:
                hooks.append((_tl.attn_out_name(layer), _add_hook(b_O, where)))
            if b_out is not None:
                hooks.append((_tl.mlp_out_name(layer), _add_hook(b_out, where)))
            mats = {n: self.deltas[_tl.param_name(layer, n)] for n in spec.mlp_input_matrices
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
                hooks.append((_tl.mlp_out_name(layer), _matmul_hook(post_store, W_out, where)))
        return hooks

    # --- saving and loading ---

    def save(self, path: str | os.PathLike) -> Path:
        """Write the patch to one safetensors file (tensors + JSON metadata), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"delta:{k}": v.detach().contiguous().cpu() for k, v in self.deltas.items()}
        tensors.update({f"steering:{k}": v.detach().contiguous().cpu() for k, v in self.steering.items()})
        meta = {**self.meta, "sha256": _tensor_digest(tensors)}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"tl_thoughts": json.dumps(meta)})
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: HookedTransformer | None = None) -> "ThoughtPatch":
        """Read a patch written by :meth:`save`; refuse a truncated or corrupted file, and (when
        ``model`` is given) a model of other shapes or another identity."""
        from safetensors import safe_open

        path = Path(path)
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
        if meta.get("format") != FORMAT:
            raise PatchFileError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.pop("sha256", None) != _tensor_digest(tensors):
            raise PatchFileError(f"{path}: the tensors do not match their checksum (file corrupted or edited)")
        patch = cls(
            deltas={k[len("delta:"):]: v for k, v in tensors.items() if k.startswith("delta:")},
            steering={k[len("steering:"):]: v for k, v in tensors.items() if k.startswith("steering:")},
            meta=meta,
        )
        if model is not None:
            patch.check_compatible(model)
        return patch


class PatchHandle:
    """Returned by :meth:`ThoughtPatch.attach`; ``remove()`` restores the model."""

    def __init__(self, stack: contextlib.ExitStack):
        self._stack = stack
        self.active = True

    def remove(self) -> None:
        if self.active:
            self.active = False
            self._stack.close()

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


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


def _matmul_hook(store: dict, matrix: Tensor, where: _Positions):
    def hook(act: Tensor, hook) -> Tensor:
        return _added_from(act, store["x"] @ matrix.to(act), where.start())

    return hook
