"""The TransformerLens backend seam: everything that reads a model's weights, hooks and caches.

The mathematics (``_math.py``) and the public objects never touch TransformerLens internals
directly; they go through the functions here. Two backends stand behind them:

- a ``HookedTransformer`` (TransformerLens 3.9), the primary one, implemented in this module;
- a ``TransformerBridge`` in compatibility mode (TransformerLens 4), where the functions below
  delegate what differs to ``_bridge`` (weights as views of the HuggingFace parameters, positions
  as ``position_ids``, hooks on the hook points). Functions a bridge cannot serve yet raise
  ``UnsupportedArchitectureError`` saying so ([`require_hooked`][]).

The interface, by concern: the model's shapes ([`model_spec`][]); its weights by TransformerLens
name ([`weight`][], [`patched_values`][], [`swapped_tensors`][], [`computing_in`][]); hook names
and hooks ([`attach_hooks`][], [`hooked`][], the ``*_name`` functions); runs ([`forward`][],
[`run`][], the reduced prompt at its original positions: [`original_positions`][]); the
block-by-block pieces and the key-value cache ([`embed`][], [`block_attention_kv`][],
[`prefix_cache`][]: HookedTransformer only today).
"""

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import TransformerLensKeyValueCache, TransformerLensKeyValueCacheEntry

from tl_thoughts import _bridge
from tl_thoughts.errors import ArgumentTypeError, InputError, UnsupportedArchitectureError

try:  # TransformerLens 3.9
    from transformer_lens import HookedTransformer
except ImportError:  # TransformerLens 4 removed it
    HookedTransformer = None

_MODEL_CLASSES = tuple(c for c in (HookedTransformer, _bridge.TransformerBridge) if c is not None)
Model = Union[_MODEL_CLASSES]  # noqa: UP007 (a union built from the classes installed)
"""The models the library accepts: a HookedTransformer (TransformerLens 3.9) or a TransformerBridge
(TransformerLens 4, in compatibility mode), whichever the installed TransformerLens has."""


def is_bridge(model: object) -> bool:
    """Whether ``model`` is a TransformerLens 4 ``TransformerBridge`` (else a HookedTransformer)."""
    return _bridge.is_bridge(model)


_BLOCK_BY_BLOCK = ("it runs the model block by block with TransformerLens' own key-value cache, which the "
                   "bridge (a wrapped HuggingFace model) does not have")


def require_hooked(model: object, what: str, why: str = _BLOCK_BY_BLOCK) -> None:
    """Refuse a TransformerBridge for ``what``, a part of the library not ported to it yet, saying
    ``why``.

    Raises:
        UnsupportedArchitectureError: ``model`` is a TransformerBridge.
    """
    if is_bridge(model):
        raise UnsupportedArchitectureError(
            f"{what} is not available on a TransformerBridge (TransformerLens 4) yet: {why}; use a "
            "HookedTransformer (TransformerLens 3.9) for it"
        )


@dataclass(frozen=True)
class ModelSpec:
    """The shapes and block structure of a supported model, read from its config."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int | None
    has_mlp: bool
    gated_mlp: bool
    parallel_attn_mlp: bool
    positional: str  # "standard" (learned absolute) or "rotary"
    dtype: torch.dtype
    # the block's norms, by TransformerLens module name (None: no such norm)
    attn_pre_norm: str | None = "ln1"  # normalises the attention input
    attn_post_norm: str | None = None  # normalises the attention output (Gemma 2/3: ln1_post; OLMo 2: ln1)
    mlp_pre_norm: str | None = "ln2"  # normalises the MLP input
    mlp_post_norm: str | None = None  # normalises the MLP output (Gemma 2/3: ln2_post; OLMo 2: ln2)

    @property
    def mlp_input_matrices(self) -> tuple[str, ...]:
        """Names of the MLP matrices that read the MLP input (``W_gate`` first when gated)."""
        if not self.has_mlp:
            return ()
        return ("W_gate", "W_in") if self.gated_mlp else ("W_in",)

    @property
    def post_norm(self) -> bool:
        """Whether a norm sits between a sublayer's output and the residual stream."""
        return self.attn_post_norm is not None or self.mlp_post_norm is not None


def model_spec(model: Model) -> ModelSpec:
    """Check that the exact construction applies to ``model`` and read its shapes.

    Raises:
        ArgumentTypeError: ``model`` is not a HookedTransformer.
        InputError: the parameters' dtypes disagree with each other or with ``model.cfg.dtype``
            ([`check_dtypes`][]).
        UnsupportedArchitectureError: a config feature breaks exactness; the message says which.
    """
    if not isinstance(model, _MODEL_CLASSES):
        expected = " or ".join(f"{c.__module__.split('.')[0]}.{c.__name__}" for c in _MODEL_CLASSES)
        raise ArgumentTypeError(f"model: expected a {expected}, got {type(model).__name__}")
    problems = _bridge.problems(model) if is_bridge(model) else []
    if is_bridge(model) and _bridge.TL_MAJOR < 4:  # before reading anything of an earlier bridge
        raise UnsupportedArchitectureError("tl_thoughts cannot use this model: " + "; ".join(problems))
    cfg = model.cfg
    if cfg.attention_dir != "causal":
        problems.append("attention_dir != 'causal': the chunk would change the prefix")
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        problems.append(
            f"positional_embedding_type={cfg.positional_embedding_type!r}: only learned absolute "
            "('standard') and 'rotary' positions are handled"
        )
    if getattr(cfg, "use_attention_sinks", False):
        problems.append("use_attention_sinks: the pattern rows do not sum to one")
    if getattr(cfg, "use_logn_attn", False) or getattr(cfg, "use_dynamic_ntk_rope", False):
        problems.append("use_logn_attn / use_dynamic_ntk_rope: queries depend on the sequence length")
    if getattr(cfg, "num_experts", None):
        problems.append("num_experts (mixture of experts) is not supported yet")
    post_only = _norm_names(model)["attn_pre_norm"] is None  # OLMo 2/3: norms after the sublayers only
    post = f"original_architecture={cfg.original_architecture!r} (post-norm blocks)"
    if post_only and cfg.use_normalization_before_and_after:
        problems.append(f"{post} with use_normalization_before_and_after (TransformerLens applies both)")
    if post_only and cfg.parallel_attn_mlp:
        problems.append(f"{post} with parallel_attn_mlp (TransformerLens skips the MLP's post-norm there)")
    if post_only and (cfg.use_attn_in or cfg.use_split_qkv_input):
        problems.append(f"{post} with use_attn_in / use_split_qkv_input (no pre-norm to split)")
    if getattr(cfg, "load_in_4bit", False):
        problems.append("load_in_4bit: weights are not plain tensors")
    if problems:
        raise UnsupportedArchitectureError(
            "tl_thoughts cannot compute exact implicit updates for this model: " + "; ".join(problems)
        )
    check_dtypes(model)  # after the architecture: a refused feature may hold other dtypes (MoE routers)
    n_kv = cfg.n_key_value_heads
    if n_kv is None or getattr(cfg, "ungroup_grouped_query_attention", False):
        n_kv = cfg.n_heads
    return ModelSpec(
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=n_kv,
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        d_mlp=None if cfg.attn_only else cfg.d_mlp,
        has_mlp=not cfg.attn_only,
        gated_mlp=bool(cfg.gated_mlp) and not cfg.attn_only,
        parallel_attn_mlp=bool(cfg.parallel_attn_mlp),
        positional=cfg.positional_embedding_type,
        dtype=cfg.dtype,
        **_norm_names(model),
    )


def attention_window(model: Model) -> int | None:
    """The sliding window of the model's local-attention blocks (``cfg.window_size``: a query
    sees the keys less than that many positions before it), or None when no block has one. The
    exact construction holds with a window as long as removing the chunk brings no key into a
    kept query's window that was outside it in the full prompt ([`check_window`][tl_thoughts.chunks.check_window])."""
    cfg = model.cfg  # a bridge with a window shorter than its context is refused by model_spec
    if not getattr(cfg, "use_local_attn", False) or not any(t == "local" for t in (getattr(cfg, "attn_types", None) or ())):
        return None
    return int(cfg.window_size)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_dtypes(model: Model) -> None:
    """Refuse a model whose floating parameters have several dtypes, or another dtype than
    ``model.cfg.dtype`` (``model.half()``, ``.float()``, ``.double()``, ``.bfloat16()`` convert the
    parameters and leave the config as it was; TransformerLens casts some activations to
    ``cfg.dtype``, so such a model fails inside torch or computes in a dtype nobody asked for).

    Raises:
        InputError: what was found and how to fix it.
    """
    dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    if len(dtypes) > 1:
        first = {}
        for name, p in model.named_parameters():
            if p.dtype.is_floating_point:
                first.setdefault(p.dtype, name)
        shown = ", ".join(f"{_dtype_name(d)} (e.g. {n})" for d, n in first.items())
        raise InputError(
            f"the model's parameters have mixed dtypes: {shown}; model.cfg.dtype is "
            f"{_dtype_name(model.cfg.dtype)}. Convert the whole model to one dtype (model.to(dtype) also "
            "sets model.cfg.dtype), or compute in one dtype under tl_thoughts.computing_in(model, dtype)"
        )
    if dtypes and (found := dtypes.pop()) != model.cfg.dtype:
        raise InputError(
            f"the model's parameters are {_dtype_name(found)} but model.cfg.dtype is "
            f"{_dtype_name(model.cfg.dtype)} (model.half(), .float(), .double() and .bfloat16() change the "
            "parameters and not the config; model.to(dtype) changes both): set model.cfg.dtype = "
            f"torch.{_dtype_name(found)}, or load the model in the dtype wanted (from_pretrained(..., "
            "dtype=...)); to compute in another dtype, use tl_thoughts.computing_in(model, dtype)"
        )


def _norm_names(model: Model) -> dict[str, str | None]:
    """The block's norm modules by role (see [`ModelSpec`][]), from the config (a
    HookedTransformer) or from the block's modules (a TransformerBridge: its config does not say
    whether a block has norms after its sublayers)."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    if is_bridge(model):
        return _bridge.norm_names(model)
    cfg = model.cfg

    post_only = cfg.original_architecture in POST_NORM_ARCHITECTURES  # OLMo 2/3: norms after only
    both = bool(cfg.use_normalization_before_and_after) and cfg.normalization_type is not None
    has_mlp = not cfg.attn_only
    return dict(
        attn_pre_norm=None if post_only else "ln1",
        attn_post_norm="ln1" if post_only else ("ln1_post" if both else None),
        mlp_pre_norm="ln2" if has_mlp and not post_only else None,
        mlp_post_norm=("ln2" if post_only else ("ln2_post" if both else None)) if has_mlp else None,
    )


def hooked_points(model: Model) -> list[str]:
    """The names of the hook points with hooks attached (forward or backward)."""
    return [name for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]


def raw_torch_hooks(model: Model) -> list[str]:
    """The forward hooks and forward pre-hooks that torch would run in a forward pass of ``model``
    and that TransformerLens' hook points do not manage (``register_forward_hook``,
    ``register_forward_pre_hook``, with or without kwargs, on any submodule; global module
    hooks), each as ``"<module> (<kind>)"``. A hook point's own torch hooks (how ``add_hook``
    works) are not listed here: [`hooked_points`][] lists those. Backward hooks change no forward
    value and are not listed."""
    from torch.nn.modules import module as torch_module
    from transformer_lens.hook_points import HookPoint

    found = []
    own = _bridge.own_hook if is_bridge(model) else (lambda fn: False)  # the bridge's wiring
    for name, module in model.named_modules():
        managed = {h.hook.id for h in module.fwd_hooks} if isinstance(module, HookPoint) else set()
        where = name or "the model itself"
        if any(key not in managed and not own(fn) for key, fn in module._forward_hooks.items()):
            found.append(f"{where} (forward hook)")
        if any(not own(fn) for fn in module._forward_pre_hooks.values()):
            found.append(f"{where} (forward pre-hook)")
    if torch_module._global_forward_hooks:
        found.append("every module (global forward hook, register_module_forward_hook)")
    if torch_module._global_forward_pre_hooks:
        found.append("every module (global forward pre-hook, register_module_forward_pre_hook)")
    return found


def has_hooks(model: Model) -> bool:
    """Whether any hook is attached: TransformerLens hooks ([`hooked_points`][]) or raw torch
    forward hooks and pre-hooks ([`raw_torch_hooks`][])."""
    return bool(hooked_points(model) or raw_torch_hooks(model))


def has_whole_sequence_hooks(model: Model) -> bool:
    """Whether a hook is attached that may read positions from each sequence's start: any hook of
    [`has_hooks`][] except those attached by [`attach_hooks`][] with ``cache_safe=True`` (a
    thought patch's activation form, which reads how many positions a key-value cache holds).
    Code that runs a model in pieces (a key-value cache, one position a step) takes its
    whole-sequence path when this is True."""
    if raw_torch_hooks(model):
        return True
    safe = _CACHE_SAFE_LEVELS.get(model, set())
    return any(
        handle.context_level not in safe
        for hp in model.hook_dict.values()
        for handle in (*hp.fwd_hooks, *hp.bwd_hooks)
    )


def check_no_hooks(model: Model) -> None:
    """Refuse a model with hooks attached: they would change the runs the equivalence compares.
    Both TransformerLens hooks (on hook points) and raw torch forward hooks or pre-hooks (on any
    submodule, or global) are refused, each kind with how to remove it."""
    problems = []
    hooked = hooked_points(model)
    if hooked:
        shown = ", ".join(hooked[:5]) + (" ..." if len(hooked) > 5 else "")
        problems.append(
            f"TransformerLens hooks attached at {shown} (remove them with "
            "model.reset_hooks(including_permanent=True))"
        )
    raw = raw_torch_hooks(model)
    if raw:
        shown = ", ".join(raw[:5]) + (" ..." if len(raw) > 5 else "")
        problems.append(
            f"raw torch hooks on {shown} (model.reset_hooks() does not remove these: call .remove() on "
            "the handle that register_forward_hook / register_forward_pre_hook / "
            "register_module_forward_hook returned)"
        )
    if problems:
        raise InputError(
            "the model has " + "; and ".join(problems) + ". They would change the runs compared here: "
            "remove them first."
        )


def to_tokens(
    model: Model, text: str, what: str = "the prompt", prepend_bos: bool | None = None
) -> Int[Tensor, "1 pos"]:
    """``text`` tokenized with the model's own settings (``model.to_tokens``), never truncated:
    every text the library tokenizes goes through here. TransformerLens cuts a text longer than
    ``n_ctx`` to its first ``n_ctx`` tokens by default, silently; here it is refused.

    Args:
        what: How the error messages name the text (``"the prompt"``, ``"example 3"``).
        prepend_bos: Overrides ``model.cfg.default_prepend_bos`` (None: the model's setting).

    Raises:
        ArgumentTypeError: ``text`` is not a string.
        InputError: no tokenizer, or more than ``n_ctx`` tokens (the message gives both numbers).
    """
    if not isinstance(text, str):
        raise ArgumentTypeError(f"{what} must be a string, got {type(text).__name__}")
    if model.tokenizer is None:
        raise InputError(f"{what} is text: tokenizing it needs a model with a tokenizer; pass token ids instead")
    options = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
    tokens = model.to_tokens(text, truncate=False, **options)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise InputError(
            f"{what} has {tokens.shape[1]} tokens, more than the model's context (n_ctx={model.cfg.n_ctx}); "
            "it is refused rather than cut to its first n_ctx tokens (which TransformerLens does by default)"
        )
    return tokens


def model_device(model: Model) -> torch.device:
    return model.W_E.device


def parameters(model: Model) -> dict[str, torch.nn.Parameter]:
    """The HookedTransformer's parameters by TransformerLens name (``blocks.3.mlp.W_in``, ...), to
    assign their data; [`weights`][] reads the same names on either backend."""
    require_hooked(model, "assigning parameters by TransformerLens name", "a bridge's TransformerLens "
                   "weights are views of the HuggingFace parameters (weights, install_weights)")
    return dict(model.named_parameters())


def weights(model: Model) -> dict[str, Tensor]:
    """Every weight of the model by TransformerLens parameter name, as a HookedTransformer names
    its parameters (``embed.W_E``, ``blocks.3.attn._W_K``, ``blocks.3.mlp.b_out``...): the
    parameters of a HookedTransformer; on a TransformerBridge the same names and shapes, read
    from the views it exposes, zeros for a bias the checkpoint lacks (``_bridge.tl_weights``).
    A model identity computed on these is backend-independent: the same checkpoint gives the
    same fingerprint on either backend (where TransformerLens 3.9's conversion keeps the
    checkpoint's values: Llama, GPT-2; see docs/transformerlens4.md)."""
    if is_bridge(model):
        return _bridge.tl_weights(model)
    return dict(model.named_parameters())


def install_weights(model: Model, values: Mapping[str, Tensor]) -> "_bridge.WeightSwap":
    """Give a TransformerBridge's TransformerLens-named weights ``values`` until ``restore()`` is
    called on the returned handle (``moved()`` on it names the weights replaced since by other
    code): written through the HuggingFace parameters they view, a missing bias added. The
    handle-returning form of [`swapped_tensors`][] on a bridge (a HookedTransformer's parameters
    are assigned directly).

    Raises:
        ArgumentTypeError: ``model`` is not a TransformerBridge.
        InputError: a shape that is not the weight's.
        UnsupportedArchitectureError: a weight that is not a view of a parameter.
    """
    if not is_bridge(model):
        raise ArgumentTypeError("install_weights is for a TransformerBridge; assign a HookedTransformer's parameters")
    return _bridge.install_weights(model, values)


def unstored_weights(model: Model, names: list[str]) -> list[str]:
    """Those of ``names`` that no parameter holds: on a TransformerBridge, the biases its
    checkpoint lacks (they read as zeros); none on a HookedTransformer."""
    return _bridge.unstored_weights(model, names) if is_bridge(model) else []


def weight(model: Model, name: str) -> Tensor:
    """One weight by TransformerLens name (``blocks.3.mlp.W_in``, ``blocks.3.attn.b_O``,
    ``blocks.3.ln2.w``): the parameter of a HookedTransformer; on a TransformerBridge the view of
    the HuggingFace parameter it exposes, zeros for a bias the checkpoint lacks."""
    if is_bridge(model):
        return _bridge.weight(model, name)
    return model.get_parameter(name)


def patched_values(model: Model, deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``parameter + delta`` for each named delta (reshaped to the parameter, in its dtype)."""
    out = {}
    for name, delta in deltas.items():
        param = weight(model, name)  # one lookup (not a dict of every parameter per call)
        out[name] = param.detach() + delta.reshape(param.shape).to(param)
    return out


IDENTITY_NAMES = ("embed.W_E", "unembed.W_U", "blocks.0.attn.W_Q")
"""The three weights the fingerprint of format-1 patch files read (the embedding, the
unembedding, the first query matrix), by [`weights`][] name, to check those files against their
model."""


_HOOK_LEVELS = itertools.count(1_000_000)  # above any TransformerLens context level
# per model, the levels of hooks attached with cache_safe=True (see has_whole_sequence_hooks)
_CACHE_SAFE_LEVELS: "weakref.WeakKeyDictionary[Model, set[int]]" = weakref.WeakKeyDictionary()


def attach_hooks(
    model: Model, fwd_hooks: list[tuple[str, Callable]], *, cache_safe: bool = False
) -> Callable[[], None]:
    """Add forward hooks and return the function that removes exactly these hooks (and no other:
    they carry a context level of their own, so hooks attached and removed in any order, or the
    user's own, are left alone). If adding one fails, those added are removed before the error
    propagates. ``cache_safe=True`` declares that the hooks give the same values when a sequence
    runs in pieces through a key-value cache as when it runs whole
    ([`has_whole_sequence_hooks`][] then does not count them)."""
    level = next(_HOOK_LEVELS)
    touched = []
    if cache_safe:
        _CACHE_SAFE_LEVELS.setdefault(model, set()).add(level)

    def remove() -> None:
        for hook_point in touched:
            hook_point.remove_hooks("fwd", including_permanent=False, level=level)
        touched.clear()
        _CACHE_SAFE_LEVELS.get(model, set()).discard(level)

    try:
        for name, hook in fwd_hooks:
            if is_bridge(model):  # the bridge's add_hook has no context level
                touched.append(_bridge.attach_hook(model, name, hook, level))
                continue
            if name not in model.hook_dict:
                raise InputError(f"{name!r} is not a hook point of this model")
            model.add_hook(name, hook, dir="fwd", level=level)
            touched.append(model.hook_dict[name])
    except BaseException:
        remove()
        raise
    return remove


@contextlib.contextmanager
def hooked(model: Model, fwd_hooks: list[tuple[str, Callable]]) -> Iterator[None]:
    """Temporary forward hooks, removed on exit (also on an exception); the user's own hooks,
    and hooks of other contexts (also exited in another order), are left alone.

    The same as ``model.hooks(fwd_hooks=...)``, except that on exit only these hooks are removed
    (TransformerLens' context resets every hook point of the model, a cost that dominates short
    runs such as the evaluation's)."""
    remove = attach_hooks(model, fwd_hooks)
    try:
        yield
    finally:
        remove()


# --- hook names (TransformerLens vocabulary) ---


def pattern_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def v_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_v"


def z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def attn_out_name(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


def resid_post_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def mlp_input_resid_name(spec: ModelSpec, layer: int) -> str:
    """The residual stream the block's MLP normalises: resid_mid, or resid_pre in parallel blocks."""
    if spec.parallel_attn_mlp:
        return f"blocks.{layer}.hook_resid_pre"
    return f"blocks.{layer}.hook_resid_mid"


def mlp_post_name(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def mlp_out_name(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def mlp_input_product_names(spec: ModelSpec, layer: int) -> dict[str, str]:
    """Where each MLP input matrix's product ``x @ W`` appears: gated MLPs put ``x @ W_gate`` at
    ``mlp.hook_pre`` and ``x @ W_in`` at ``mlp.hook_pre_linear``; plain MLPs ``x @ W_in + b_in`` at
    ``mlp.hook_pre``."""
    if spec.gated_mlp:
        return {"W_gate": f"blocks.{layer}.mlp.hook_pre", "W_in": f"blocks.{layer}.mlp.hook_pre_linear"}
    return {"W_in": f"blocks.{layer}.mlp.hook_pre"}


def param_name(layer: int, weight: str) -> str:
    """TransformerLens parameter name of a block weight: ``W_in``, ``W_gate``, ``b_out``, ``W_out``
    (MLP) or ``W_O``, ``b_O`` (attention)."""
    module = "attn" if weight in ("W_O", "b_O") else "mlp"
    return f"blocks.{layer}.{module}.{weight}"


# --- weights ---


def W_O(model: Model, layer: int) -> Float[Tensor, "head d_head d_model"]:
    return model.blocks[layer].attn.W_O


def b_O(model: Model, layer: int) -> Float[Tensor, " d_model"]:
    """The attention output bias (zeros where a bridged checkpoint has none)."""
    return weight(model, param_name(layer, "b_O"))


def attn_output(
    model: Model, layer: int, z: Float[Tensor, "... head d_head"]
) -> Float[Tensor, "... d_model"]:
    """The attention output before any post-attention norm, ``sum_h z[h] @ W_O[h] + b_O``."""
    return z.flatten(-2) @ W_O(model, layer).flatten(0, 1) + b_O(model, layer)


def mlp_matrix(model: Model, layer: int, name: str) -> Float[Tensor, "d_model d_mlp"]:
    return getattr(model.blocks[layer].mlp, name)


def expand_kv_heads(
    spec: ModelSpec, v: Float[Tensor, "pos kv_head d_head"]
) -> Float[Tensor, "pos head d_head"]:
    """Give every query head its value vectors (GQA: head h reads key/value head h // group)."""
    if spec.n_kv_heads == spec.n_heads:
        return v
    return torch.repeat_interleave(v, spec.n_heads // spec.n_kv_heads, dim=1)


# --- runs ---


def forward(
    model: Model,
    tokens: Int[Tensor, "1 pos"],
    fwd_hooks: list[tuple[str, Callable]] | None = None,
    cache_names: list[str] | None = None,
) -> tuple[Float[Tensor, "1 pos d_vocab"], dict[str, Tensor]]:
    """A forward pass with optional temporary hooks, caching ``cache_names``.

    The attention mask is passed explicitly (all ones), so TransformerLens never guesses padding
    from pad-token ids that also occur in the prompt (e.g. ``<|im_end|>`` in a chat template).
    Hooks are added through ``model.hooks``, which removes exactly these hooks on exit, also on an
    exception.
    """
    cache: dict[str, Tensor] = {}
    hooks = list(fwd_hooks or [])
    for name in cache_names or []:

        def save(act: Tensor, hook, _name: str = name) -> None:
            cache[_name] = act.detach()[0]

        hooks.append((name, save))
    with torch.no_grad(), hooked(model, hooks), _full_precision(model):
        logits = model(tokens, attention_mask=torch.ones_like(tokens))
    return logits, cache


def _full_precision(model: Model) -> contextlib.AbstractContextManager:
    """A bridge's float64 runs in float64 throughout (``_bridge.float64_throughout``); nothing for
    a HookedTransformer. Every run through this seam ([`forward`][], [`run`][]) enters it."""
    return _bridge.float64_throughout(model) if is_bridge(model) else contextlib.nullcontext()


def run(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    fwd_hooks: list[tuple[str, Callable]],
    stop_at_layer: int | None = None,
) -> Tensor:
    """A batched forward pass with temporary hooks and an explicit attention mask (all ones when
    ``None``: TransformerLens then never guesses padding from pad-token ids), optionally stopping
    after block ``stop_at_layer - 1``. Left padding is handled by TransformerLens (positions
    offset by the mask, padded keys masked)."""
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    with torch.no_grad(), hooked(model, fwd_hooks), _full_precision(model):
        return model(tokens, attention_mask=mask, stop_at_layer=stop_at_layer)


def add_at_rows_hook(
    rows: Int[Tensor, " n"], vectors: Float[Tensor, "*batch n d_model"]
) -> Callable[[Tensor, object], Tensor]:
    """A forward hook that adds ``vectors[i]`` to position ``rows[i]`` of a ``[batch pos d_model]``
    activation, in every sequence of the batch (or, given ``[batch, n, d_model]`` vectors, each
    sequence's own)."""

    def hook(act: Tensor, hook) -> Tensor:
        act = act.clone()
        act[:, rows.to(act.device)] += vectors.to(act)
        return act

    return hook


@contextlib.contextmanager
def swapped_tensors(
    model: Model, new: Mapping[str, Tensor], keep_dtype: bool = True
) -> Iterator[None]:
    """Temporarily replace parameters or buffers of ``model`` by name; the original tensor objects
    are put back on exit, also on an exception, so the model is bit-identical afterwards. The
    replacements are cast to the originals' dtype unless ``keep_dtype`` is False.

    On a TransformerBridge, TransformerLens weight names (``blocks.3.mlp.W_in``) are written
    through the HuggingFace parameters they view (``_bridge.swapped_weights``); other names are
    the bridge's own module paths (as ``named_parameters`` gives them)."""
    if is_bridge(model):
        views = {n: v for n, v in new.items() if _is_tl_weight_name(model, n)}
        if views:
            rest = {n: v for n, v in new.items() if n not in views}
            with _bridge.swapped_weights(model, views), swapped_tensors(model, rest, keep_dtype):
                yield
            return
    saved: list[tuple[torch.nn.Module, str, Tensor, bool]] = []
    try:
        for full_name, value in new.items():
            module_name, _, attr = full_name.rpartition(".")
            module = model.get_submodule(module_name)
            current = getattr(module, attr)
            if tuple(value.shape) != tuple(current.shape):
                raise InputError(
                    f"{full_name}: replacement has shape {tuple(value.shape)}, "
                    f"expected {tuple(current.shape)}"
                )
            is_param = isinstance(current, torch.nn.Parameter)
            saved.append((module, attr, current.data if is_param else current, is_param))
            value = value.to(device=current.device, dtype=current.dtype if keep_dtype else value.dtype)
            if is_param:
                current.data = value
            else:
                setattr(module, attr, value)
    except BaseException:
        _restore(saved)
        raise
    try:
        yield
    finally:
        _restore(saved)


def _is_tl_weight_name(model: Model, name: str) -> bool:
    """Whether ``name`` is a TransformerLens weight name rather than a module path of ``model``."""
    module_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return True
    return attr not in owner._parameters and attr not in owner._buffers


@contextlib.contextmanager
def linear_layout(model: Model) -> Iterator[None]:
    """The gated MLPs' weights and the unembedding ``W_U`` stored transposed in memory (the same
    values), so that TransformerLens' ``F.linear(x, W.T.contiguous())`` finds ``W.T`` contiguous
    and copies nothing (it copies these weights at every forward pass otherwise); the original
    tensors are put back on exit. ``F.linear`` gets the same operands either way, so every run
    gives the same values, bit for bit. A speed-up for many short runs (the fits, the decoding,
    the evaluation); costs one copy of those weights while inside; a nested call copies nothing.
    Nothing changes on a TransformerBridge (its weights are the HuggingFace model's, already laid
    out for ``F.linear``)."""
    spec = model_spec(model)
    if is_bridge(model):
        yield
        return
    names = ["unembed.W_U"]
    if spec.gated_mlp:
        names += [param_name(layer, w) for layer in range(spec.n_layers) for w in ("W_gate", "W_in", "W_out")]
    new = {}
    for name in names:
        weight = model.get_parameter(name)
        if weight.T.is_contiguous():
            continue  # already laid out (a nested call)
        new[name] = weight.detach().T.contiguous().T
    with swapped_tensors(model, new):
        yield


def _restore(saved: list[tuple[torch.nn.Module, str, Tensor, bool]]) -> None:
    for module, attr, original, is_param in reversed(saved):
        if is_param:
            getattr(module, attr).data = original
        else:
            setattr(module, attr, original)


@contextlib.contextmanager
def original_positions(model: Model, spec: ModelSpec, positions: Int[Tensor, " T"]) -> Iterator[None]:
    """Inside, a run of ``T`` tokens puts token ``i`` at position ``positions[i]`` (THEORY 1): the
    HookedTransformer's position tables are swapped ([`position_tables`][]); a TransformerBridge
    is handed the matching ``position_ids``. Put back on exit, also on an exception."""
    if is_bridge(model):
        if positions.numel() and int(positions.max()) >= model.cfg.n_ctx:
            raise InputError(f"position {int(positions.max())} beyond the model's context ({model.cfg.n_ctx})")
        with _bridge.original_positions(model, positions):
            yield
        return
    with swapped_tensors(model, position_tables(model, spec, positions)):
        yield


def position_tables(
    model: Model, spec: ModelSpec, positions: Int[Tensor, " T"]
) -> dict[str, Tensor]:
    """Replacement position tables that put reduced-run row ``i`` at original position
    ``positions[i]`` (THEORY 1): rows of ``W_pos`` for learned positions, rows of every block's
    rotary sin/cos tables for rotary models. Same shapes as the originals."""
    T = positions.shape[0]
    tables: dict[str, Tensor] = {}
    if spec.positional == "standard":
        W_pos = model.pos_embed.W_pos
        new = W_pos.detach().clone()
        new[:T] = W_pos.detach()[positions]
        tables["pos_embed.W_pos"] = new
    else:
        for layer, block in enumerate(model.blocks):
            for buf in ("rotary_sin", "rotary_cos"):
                old = getattr(block.attn, buf)
                if int(positions.max()) >= old.shape[0]:
                    raise InputError(
                        f"position {int(positions.max())} beyond the rotary table ({old.shape[0]})"
                    )
                new = old.clone()
                new[:T] = old[positions]
                tables[f"blocks.{layer}.attn.{buf}"] = new
    return tables


# --- block-level pieces, for streaming a stored residual through one block ---


def embed(model: Model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering block 0 (token + position embeddings, natural positions; the
    explicit all-ones mask keeps TransformerLens from guessing padding from pad-token ids)."""
    require_hooked(model, "running a model block by block")
    with torch.no_grad():
        return model(tokens, stop_at_layer=0, attention_mask=torch.ones_like(tokens))


def block_attention(
    model: Model, layer: int, resid_pre: Float[Tensor, "batch pos d_model"], normed: bool = True
) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos head d_head"]]:
    """Block ``layer``'s attention output (``hook_attn_out``) and head outputs (``hook_z``) for a
    stored residual stream, causal, without an attention mask (right padding never reaches a real
    position under causal attention), natural positions. Mirrors ``TransformerBlock.forward``.
    ``normed=False``: the attention output before the block's post-attention norm (where ``b_O``
    is added; the same as ``hook_attn_out`` for blocks without one)."""
    out, z, _ = block_attention_kv(model, layer, resid_pre, normed=normed)
    return out, z


def prefix_cache(model: Model, tokens: Int[Tensor, "batch prefix"]) -> TransformerLensKeyValueCache:
    """TransformerLens' key-value cache of ``tokens`` (as the model is now: no hook, no patch
    should be attached), frozen: their keys and values at every block, read by the tokens that
    follow them (``model(rest, past_kv_cache=cache)``, or [`broadcast_cache`][] for one
    sequence read by a batch)."""
    require_hooked(model, "a shared-prefix key-value cache")
    device = model_device(model)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, tokens.shape[0])
    with torch.no_grad():
        model(tokens.to(device), stop_at_layer=model.cfg.n_layers, attention_mask=torch.ones_like(tokens, device=device),
              past_kv_cache=cache)
    cache.freeze()
    return cache


def broadcast_cache(cache: TransformerLensKeyValueCache, n: int, frozen: bool = True) -> TransformerLensKeyValueCache:
    """A one-sequence cache ([`prefix_cache`][]) read by a batch of ``n`` sequences (views, no
    copy). Frozen: every forward pass reads the prefix alone; not frozen: it grows with each pass
    (decoding)."""
    entries = [TransformerLensKeyValueCacheEntry(e.past_keys.expand(n, -1, -1, -1), e.past_values.expand(n, -1, -1, -1),
                                                 frozen=frozen) for e in cache.entries]
    return TransformerLensKeyValueCache(entries, cache.previous_attention_mask.expand(n, -1), frozen=frozen)


KeysValues = tuple[Float[Tensor, "1 prefix kv_head d_head"], Float[Tensor, "1 prefix kv_head d_head"]]
AllKeysValues = tuple[Float[Tensor, "1 kv_pos kv_head d_head"], Float[Tensor, "1 kv_pos kv_head d_head"]]


def block_attention_kv(
    model: Model,
    layer: int,
    resid_pre: Float[Tensor, "batch pos d_model"],
    prefix: KeysValues | None = None,
    normed: bool = True,
) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos head d_head"], AllKeysValues]:
    """[`block_attention`][] after a shared prefix: ``resid_pre`` holds the positions that follow
    ``prefix``, the keys and values (as TransformerLens caches them, before rotary) of the prefix's
    positions at this block, the same for every sequence of the batch (one sequence, broadcast).
    The positions are offset by the prefix's length (rotary), and every position attends to the
    whole prefix, causally: the values the whole sequences would give at those positions, without
    recomputing the prefix (TransformerLens' ``TransformerLensKeyValueCacheEntry``). Also returns
    this block's keys and values of the whole sequence (prefix included) of the FIRST sequence of
    the batch: the ``prefix`` argument of the next positions when ``resid_pre`` is a prefix itself
    (one sequence). ``normed=False``: the attention output before the post-attention norm, as in
    [`block_attention`][]."""
    from transformer_lens.utilities import repeat_along_head_dimension

    require_hooked(model, "running a model block by block")
    block = model.blocks[layer]
    cfg = model.cfg
    if cfg.use_attn_in or cfg.use_split_qkv_input:
        n_kv = (cfg.n_key_value_heads if cfg.n_key_value_heads and not getattr(cfg, "ungroup_grouped_query_attention", False)
                else cfg.n_heads)
        q_in = repeat_along_head_dimension(resid_pre, n_heads=cfg.n_heads)
        kv_in = repeat_along_head_dimension(resid_pre, n_heads=n_kv if cfg.use_split_qkv_input else cfg.n_heads)
    else:
        q_in = kv_in = resid_pre
    names = _norm_names(model)
    pre = (lambda x: x) if names["attn_pre_norm"] is None else getattr(block, names["attn_pre_norm"])
    store: dict[str, Tensor] = {}

    def keep_z(z: Tensor, hook) -> None:
        store["z"] = z.detach()

    if prefix is not None:
        n = resid_pre.shape[0]
        keys, values = (t.expand(n, *t.shape[1:]) for t in prefix)
        entry = TransformerLensKeyValueCacheEntry(past_keys=keys, past_values=values)
    else:
        entry = TransformerLensKeyValueCacheEntry.init_cache_entry(cfg, resid_pre.device, resid_pre.shape[0])
        entry.past_keys, entry.past_values = (t.to(resid_pre.dtype) for t in (entry.past_keys, entry.past_values))
    with torch.no_grad(), hooked(model, [(z_name(layer), keep_z)]):
        out = block.attn(query_input=pre(q_in), key_input=pre(kv_in), value_input=pre(kv_in),
                         past_kv_cache_entry=entry)
    out = attn_post_norm(model, layer, out) if normed else out
    return out, store["z"], (entry.past_keys[:1], entry.past_values[:1])


def block_mlp(
    model: Model, layer: int, mlp_in: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "batch pos d_model"]:
    """Block ``layer``'s MLP output for an already normalised MLP input."""
    with torch.no_grad():
        return model.blocks[layer].mlp(mlp_in)


def block_mlp_hidden(
    model: Model, layer: int, mlp_in: Float[Tensor, "batch pos d_model"]
) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos d_mlp"]]:
    """Block ``layer``'s MLP output and hidden activations (``mlp.hook_post``, what ``W_out``
    reads) for an already normalised MLP input."""
    store: dict[str, Tensor] = {}

    def keep_post(post: Tensor, hook) -> None:
        store["post"] = post.detach()

    with torch.no_grad(), hooked(model, [(mlp_post_name(layer), keep_post)]):
        out = model.blocks[layer].mlp(mlp_in)
    return out, store["post"]


def final_scale_name(model: Model) -> str | None:
    """Hook name of the final norm's scale (``ln_final.hook_scale``), or None without a final norm."""
    if model.cfg.normalization_type is None or not hasattr(model, "ln_final"):
        return None
    return "ln_final.hook_scale"


def final_norm(model: Model, x: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_model"]:
    """The model's final norm (``ln_final``) applied to residual rows, as its forward pass applies
    it (none where ``normalization_type`` is None). Applying it to the rows that are unembedded,
    not to every position, gives the same values: the norm acts on each position alone."""
    if model.cfg.normalization_type is None:
        return x
    return model.ln_final(x[None])[0]


def final_norm_linear(
    model: Model, x: Float[Tensor, "*rest kept d_model"], scale: Float[Tensor, "kept 1"] | None
) -> Float[Tensor, "*rest kept d_model"]:
    """The final norm as a LINEAR map, its scale frozen (TransformerLens' ``apply_ln_to_stack``):
    centre (LN, LNPre), divide by ``scale``, multiply by ``ln_final.w`` (LN, RMS); no bias, so that
    the map is additive over the pieces of a residual stream. Identity without a final norm."""
    kind = model.cfg.normalization_type
    if kind is None or scale is None:
        return x
    if kind in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    x = x / scale.to(x.dtype)
    if kind in ("LN", "RMS"):
        x = x * model.ln_final.w.detach().to(x.dtype)
    return x


def _norm(
    model: Model, layer: int, name: str | None, x: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... d_model"]:
    """Apply the block's norm module ``name`` (weights included) on any leading shape; identity
    for ``None``."""
    if name is None:
        return x
    shape = x.shape  # differentiable: the activation form of a patch is trained through it (refine_thought)
    if is_bridge(model):  # without the norm's hook_in / hook_out (a bridge's hook_resid_mid IS ln2.hook_in)
        return _bridge.norm(getattr(model.blocks[layer], name), x.reshape(1, -1, shape[-1])).reshape(shape)
    return getattr(model.blocks[layer], name)(x.reshape(1, -1, shape[-1])).reshape(shape)


def mlp_norm(
    model: Model, layer: int, resid: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... d_model"]:
    """The block's pre-MLP normalisation (``ln2``, weights included; identity for post-norm
    architectures such as OLMo 2) on any leading shape."""
    return _norm(model, layer, _norm_names(model)["mlp_pre_norm"], resid)


def attn_post_norm(
    model: Model, layer: int, x: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... d_model"]:
    """The block's post-attention normalisation (``ln1_post``, or ``ln1`` for OLMo 2); identity
    when the block has none."""
    return _norm(model, layer, _norm_names(model)["attn_post_norm"], x)


def mlp_post_norm(
    model: Model, layer: int, x: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... d_model"]:
    """The block's post-MLP normalisation (``ln2_post``, or ``ln2`` for OLMo 2); identity when
    the block has none."""
    return _norm(model, layer, _norm_names(model)["mlp_post_norm"], x)


def norm_scale_name(layer: int, norm: str) -> str:
    """Parameter name of a block norm's scale (``blocks.3.ln2_post.w``)."""
    return f"blocks.{layer}.{norm}.w"


def norm_eps(model: Model, layer: int, norm: str) -> float:
    """The epsilon a block norm adds to the mean square inside its square root."""
    return float(getattr(model.blocks[layer], norm).eps)


def norm_kind(model: Model, layer: int, norm: str) -> str:
    """``"RMS"`` for a block norm that divides by the root mean square (TransformerLens' ``RMSNorm``
    and ``RMSNormPre``: its ``hook_normalized`` receives the input divided by ``hook_scale``), else
    the module's class name (``LayerNorm``...)."""
    module = getattr(model.blocks[layer], norm)
    if is_bridge(model):  # a NormalizationBridge over the HuggingFace norm
        return _bridge.norm_kind(module)
    from transformer_lens.components import RMSNorm, RMSNormPre

    return "RMS" if isinstance(module, (RMSNorm, RMSNormPre)) else type(module).__name__


def norm_scale_hook_name(layer: int, norm: str) -> str:
    """Hook name of a block norm's scale (``blocks.3.ln1_post.hook_scale``)."""
    return f"blocks.{layer}.{norm}.hook_scale"


def norm_normalized_name(layer: int, norm: str) -> str:
    """Hook name of a block norm's input divided by its scale, before the weights."""
    return f"blocks.{layer}.{norm}.hook_normalized"


# --- precision ---


@contextlib.contextmanager
def computing_in(model: Model, dtype: torch.dtype) -> Iterator[None]:
    """Run ``model`` in ``dtype`` for the duration of the context: every floating parameter and
    buffer is replaced by a converted copy and ``cfg.dtype`` is set (TransformerLens casts some
    activations to it); the original tensor objects and config are put back on exit, also on an
    exception, so the model is bit-identical afterwards. No-op when ``dtype`` is the model's and
    every parameter's (a model whose parameters disagree with ``cfg.dtype``, e.g. after
    ``model.half()``, is converted too: inside, it is consistent).

    Example:
        >>> with tl_thoughts.computing_in(model, torch.float64):  # a float32 model, run in float64
        ...     updates = tl_thoughts.implicit_updates(model, tokens, slice(2, 5))
        ...     report = tl_thoughts.verify(model, updates)
        >>> report.dtype, model.cfg.dtype
        (torch.float64, torch.float32)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating torch dtype, got {dtype!r}")
    if is_bridge(model):  # float64 patterns and norms (TransformerLens 4.3 / HF round them to float32)
        with _bridge.float64_throughout(model), _computing_in(model, dtype):
            yield
        return
    with _computing_in(model, dtype):
        yield


@contextlib.contextmanager
def _computing_in(model: Model, dtype: torch.dtype) -> Iterator[None]:
    if dtype == model.cfg.dtype and all(p.dtype == dtype for p in model.parameters() if p.dtype.is_floating_point):
        yield
        return
    new = {
        name: t.detach().to(dtype)
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if t.dtype.is_floating_point
    }
    previous = model.cfg.dtype
    with swapped_tensors(model, new, keep_dtype=False):
        model.cfg.dtype = dtype
        try:
            yield
        finally:
            model.cfg.dtype = previous
