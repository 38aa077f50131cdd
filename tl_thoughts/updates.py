"""Exact implicit updates of every block, from one cached run of the full prompt (THEORY 2-3)."""

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import FactoredMatrix, HookedTransformer

from tl_thoughts import _math, _tl
from tl_thoughts.chunks import ChunkSpec, Span, resolve_chunk, resolve_tokens
from tl_thoughts.errors import UnsupportedArchitectureError, ZeroDenominatorError


@dataclass(frozen=True, eq=False)
class ImplicitUpdates:
    """The exact implicit update a chunk induces in every block, at every kept position after it.

    ``kept`` below indexes the positions after the chunk, in order (``positions``); at the positions
    before the chunk every update is zero. Row vectors, TransformerLens convention (``x @ W``).

    Attributes:
        tokens: ``[1, pos]`` the full prompt.
        span: The chunk's positions (``span.start``, ``span.stop``) and the prompt length.
        vectors: ``[layer, kept, d_model]`` virtual weight vectors: what the chunk adds to
            ``blocks.{l}.hook_attn_out`` at each kept position (THEORY 2).
        head_vectors: ``[layer, kept, head, d_model]`` the per-head decomposition; sums over heads to
            ``vectors`` (GQA heads read their shared key/value head).
        chunk_attention: ``[layer, kept, head]`` attention mass each head puts on the chunk.
        mlp_in: ``[layer, kept, d_model]`` the MLP input of the reduced run (``ln2`` output, weights
            included), ``a`` in THEORY 3. ``None`` for attention-only models.
        mlp_in_with_chunk: ``[layer, kept, d_model]`` the full run's MLP input ``a_C``. ``None`` for
            attention-only models.
        mlp_input_matrices: Names of the MLP matrices the virtual weight matrices patch
            (``("W_in",)``, or ``("W_gate", "W_in")`` for gated MLPs; empty for attention-only).

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> import torch, tl_thoughts
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32,
        ...     n_ctx=32, d_vocab=50, act_fn="gelu", dtype=torch.float64, seed=0)
        >>> model = HookedTransformer(cfg)
        >>> updates = tl_thoughts.implicit_updates(model, torch.arange(10)[None], slice(2, 5))
        >>> updates.vectors.shape
        torch.Size([2, 5, 16])
    """

    tokens: Int[Tensor, "1 pos"]
    span: Span
    vectors: Float[Tensor, "layer kept d_model"]
    head_vectors: Float[Tensor, "layer kept head d_model"]
    chunk_attention: Float[Tensor, "layer kept head"]
    mlp_in: Float[Tensor, "layer kept d_model"] | None
    mlp_in_with_chunk: Float[Tensor, "layer kept d_model"] | None
    mlp_input_matrices: tuple[str, ...]
    _weights: dict[str, list[Tensor]] = field(repr=False, default_factory=dict)

    @property
    def chunk(self) -> slice:
        """The chunk as a slice of token positions."""
        return self.span.as_slice()

    @property
    def positions(self) -> Int[Tensor, " kept"]:
        """Positions (in the full prompt) of the ``kept`` axis."""
        return self.span.positions

    @property
    def n_layers(self) -> int:
        return self.vectors.shape[0]

    @torch.no_grad()
    def matrix_factors(
        self, name: str = "W_in"
    ) -> tuple[Float[Tensor, "layer kept d_model"], Float[Tensor, "layer kept d_mlp"]]:
        """The token-wise rank-1 virtual weight matrices of ``name`` as two stacks of vectors.

        ``dW[l, t] = outer(keys[l, t], values[l, t])`` with ``keys = a / ||a||^2`` and
        ``values = (a_C - a) @ W``, so that ``a @ (W + dW) = a_C @ W`` (THEORY 3). This is ROME's
        rank-1 key-value edit with key ``a``.

        Args:
            name: ``"W_in"`` or, for gated MLPs, ``"W_gate"``.

        Returns:
            ``(keys, values)``.

        Raises:
            UnsupportedArchitectureError: attention-only model (no MLP: vectors only).
            ZeroDenominatorError: some reduced MLP input ``a`` has zero norm.
        """
        if not self.mlp_input_matrices:
            raise UnsupportedArchitectureError(
                "attention-only model: a chunk's implicit update is a vector only, there is no MLP "
                "matrix to patch"
            )
        if name not in self.mlp_input_matrices:
            raise ValueError(f"name must be one of {self.mlp_input_matrices}, got {name!r}")
        assert self.mlp_in is not None and self.mlp_in_with_chunk is not None
        sq_norms = (self.mlp_in**2).sum(-1, keepdim=True)
        if bool((sq_norms == 0).any()):
            layer, row = (sq_norms[..., 0] == 0).nonzero()[0].tolist()
            raise ZeroDenominatorError(
                f"layer {layer}, position {int(self.positions[row])}: the reduced run's MLP input "
                "has zero norm, so no rank-1 patch of the MLP input matrix can reproduce the chunk "
                "there (the formula divides by its squared norm)"
            )
        keys = self.mlp_in / sq_norms
        diff = self.mlp_in_with_chunk - self.mlp_in
        values = torch.stack([diff[l] @ W for l, W in enumerate(self._weights[name])])
        return keys, values

    def matrices(self, name: str = "W_in") -> FactoredMatrix:
        """The virtual weight matrices of ``name`` as a TransformerLens ``FactoredMatrix`` of shape
        ``[layer, kept, d_model, d_mlp]`` and rank 1 (never materialised densely).

        See :meth:`matrix_factors` for the definition and the errors raised.
        """
        keys, values = self.matrix_factors(name)
        return FactoredMatrix(keys[..., :, None], values[..., None, :])


@torch.no_grad()
def implicit_updates(
    model: HookedTransformer,
    tokens: Int[Tensor, "1 pos"] | Int[Tensor, " pos"] | str,
    chunk: ChunkSpec,
) -> ImplicitUpdates:
    """Exact implicit updates of every block for removing ``chunk`` from the prompt.

    One cached run of the full prompt; no re-run per layer. See :class:`ImplicitUpdates`.

    Args:
        model: A HookedTransformer (not modified; it must have no hooks attached).
        tokens: The prompt, ``[1, pos]`` token ids or a string (tokenized with ``model.to_tokens``).
        chunk: A ``slice``/``range`` of positions, or a substring of the prompt occurring once.

    Returns:
        The updates at every layer and every kept position after the chunk.

    Raises:
        ChunkError: empty chunk, out of range, nothing after it, substring not found or ambiguous.
        InputError: batch > 1, bad token ids, text without a tokenizer, hooks on the model.
        UnsupportedArchitectureError: a config feature without an exact construction.
        ZeroDenominatorError: a head attends only to the chunk at some position.

    Example:
        >>> updates = tl_thoughts.implicit_updates(model, torch.arange(10)[None], slice(2, 5))
        >>> updates.vectors.shape  # [layer, kept, d_model]
        torch.Size([2, 5, 16])
    """
    spec = _tl.model_spec(model)
    _tl.check_no_hooks(model)
    tokens = resolve_tokens(model, tokens)
    span = resolve_chunk(model, tokens, chunk)
    names = [
        name
        for layer in range(spec.n_layers)
        for name in (_tl.pattern_name(layer), _tl.v_name(layer), _tl.z_name(layer))
        + ((_tl.mlp_input_resid_name(spec, layer),) if spec.has_mlp else ())
    ]
    _, cache = _tl.forward(model, tokens, cache_names=names)
    return updates_from_cache(model, tokens, span, cache)


@torch.no_grad()
def updates_from_cache(
    model: HookedTransformer, tokens: Int[Tensor, "1 pos"], span: Span, cache: dict[str, Tensor]
) -> ImplicitUpdates:
    """The arithmetic of :func:`implicit_updates` on an existing full-run cache (batch dim removed).

    The cache must hold, for every layer, ``attn.hook_pattern``, ``attn.hook_v``, ``attn.hook_z``
    and (MLP models) ``hook_resid_mid`` (``hook_resid_pre`` for parallel blocks).

    Example:
        >>> from tl_thoughts.chunks import Span
        >>> tokens = torch.arange(10)[None]
        >>> _, cache = model.run_with_cache(tokens)
        >>> cache = {name: act[0] for name, act in cache.items()}
        >>> again = updates_from_cache(model, tokens, Span(2, 5, 10), cache)
        >>> bool((again.vectors - updates.vectors).abs().max() < 1e-12)
        True
    """
    spec = _tl.model_spec(model)
    queries = span.positions
    chunk_keys = torch.zeros(span.n_pos, dtype=torch.bool, device=queries.device)
    chunk_keys[span.start : span.stop] = True
    layers = range(spec.n_layers)
    # all blocks at once: [layer, head, query, key], [layer, key, head, d_head], ...
    pattern = torch.stack([cache[_tl.pattern_name(l)][:, queries] for l in layers])
    v = torch.stack([_tl.expand_kv_heads(spec, cache[_tl.v_name(l)]) for l in layers])
    z = torch.stack([cache[_tl.z_name(l)][queries] for l in layers])
    W_O = torch.stack([_tl.W_O(model, l) for l in layers])
    head_stack, attention, _ = _math.head_updates(pattern, v, z, W_O, chunk_keys)
    vectors = head_stack.sum(2)
    mlp_in, mlp_in_c = [], []
    if spec.has_mlp:
        for layer in layers:
            resid = cache[_tl.mlp_input_resid_name(spec, layer)][queries]
            a_c = _tl.mlp_norm(model, layer, resid)
            if spec.parallel_attn_mlp:
                a = a_c  # the MLP reads resid_pre, which the chunk does not change at layer l
            else:
                a = _tl.mlp_norm(model, layer, resid - vectors[layer])
            mlp_in.append(a)
            mlp_in_c.append(a_c)
    weights = {
        name: [_tl.mlp_matrix(model, layer, name).detach() for layer in range(spec.n_layers)]
        for name in spec.mlp_input_matrices
    }
    return ImplicitUpdates(
        tokens=tokens,
        span=span,
        vectors=vectors,
        head_vectors=head_stack,
        chunk_attention=attention,
        mlp_in=torch.stack(mlp_in) if spec.has_mlp else None,
        mlp_in_with_chunk=torch.stack(mlp_in_c) if spec.has_mlp else None,
        mlp_input_matrices=spec.mlp_input_matrices,
        _weights=weights,
    )
