"""The TransformerLens 4 side of the backend seam: what differs on a ``TransformerBridge``.

``_tl`` is the seam every other module calls; for a bridge (TransformerLens 4, in compatibility
mode) it delegates here the few things a bridge does differently from a HookedTransformer:

- weights: a bridge's TransformerLens-named weights (``blocks.3.mlp.W_in``) are VIEWS of the
  wrapped HuggingFace model's parameters (``up_proj.weight`` transposed, split heads, ...). They
  are read here by name ([`weight`][]) and replaced through the parameter they view
  ([`swapped_weights`][]); a bias the checkpoint does not have (Llama's ``b_out``) reads as zeros
  and is added for the duration of a swap;
- positions: the reduced prompt keeps its tokens' original positions by handing the HuggingFace
  model ``position_ids`` ([`original_positions`][]), where a HookedTransformer's position tables
  are swapped;
- hooks: attached on the hook points themselves, with a context level of their own
  ([`attach_hook`][]).

The module loads on either version. TransformerLens 3.9 ships an earlier ``TransformerBridge``
too; this backend is written for and verified on 4.3, and a 3.9 bridge is refused
([`problems`][]). ``TransformerBridge`` is None where no bridge exists.
"""

import contextlib
import importlib.metadata
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor

from tl_thoughts.errors import InputError, UnsupportedArchitectureError

try:  # TransformerLens 4 (and 3.9's earlier bridge)
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:
    TransformerBridge = None
TL_MAJOR = int(importlib.metadata.version("transformer-lens").split(".")[0])

# the block weights a bridge exposes, by TransformerLens name, and, for the biases the library
# patches or reads (vectors: one per output unit), the bridge component owning their projection
# (where a missing bias is added). The query/key/value biases ([head, d_head]) are not handled.
_BLOCK_WEIGHT = re.compile(r"blocks\.(\d+)\.(attn|mlp)\.([Wb]_\w+)$")
_BIAS_COMPONENT = {"b_O": "o", "b_in": "in", "b_gate": "gate", "b_out": "out"}


def is_bridge(model: object) -> bool:
    """Whether ``model`` is a TransformerLens 4 ``TransformerBridge``."""
    return TransformerBridge is not None and isinstance(model, TransformerBridge)


def own_hook(fn: Callable) -> bool:
    """Whether a raw torch hook belongs to the bridge's own machinery (a TransformerBridge wires
    torch hooks on the HuggingFace modules, e.g. to capture a norm's input; transformers adds
    output-capturing hooks on the first ``run_with_cache``): not a user's hook."""
    fn = getattr(fn, "func", fn)  # functools.partial
    module = getattr(fn, "__module__", None) or ""
    # the bridge's own wiring, and transformers' output capture (read-only, installed by
    # run_with_cache: it records outputs while a capture is active and changes nothing)
    return (
        module.startswith("transformer_lens.model_bridge")
        or module == "transformers.utils.output_capturing"
    )


def problems(model) -> list[str]:
    """What keeps the library from computing exactly on this bridge (empty: nothing)."""
    found = []
    if TL_MAJOR < 4:
        return [
            f"a TransformerBridge of TransformerLens {importlib.metadata.version('transformer-lens')}: the "
            "bridge backend is written for TransformerLens 4 (verified on 4.3; scripts/setup_tl4.sh); "
            "on 3.9 use a HookedTransformer"
        ]
    if not getattr(model, "compatibility_mode", False):
        found.append(
            "the bridge is not in compatibility mode: call model.enable_compatibility_mode() first "
            "(tl_thoughts reads the TransformerLens hook names and weights it provides)"
        )
    cfg = model.cfg
    for flag in ("is_multimodal", "is_visual_model", "is_audio_model"):
        if getattr(cfg, flag, False):
            found.append(f"cfg.{flag}: only text-only causal language models are handled")
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None) or []
    local = [i for i, kind in enumerate(layer_types) if "sliding" in str(kind)]
    if window is not None and local and window < cfg.n_ctx:
        found.append(
            f"sliding-window attention (window {window} < n_ctx {cfg.n_ctx} in layers {local[:4]}...): a "
            "window sees other keys once the chunk is gone"
        )
    if getattr(cfg, "original_architecture", None) is None and getattr(
        cfg, "architecture", None
    ) in ("Olmo2ForCausalLM", "Olmo3ForCausalLM"):
        found.append(f"{cfg.architecture}: post-norm blocks are not handled on a bridge yet")
    if not getattr(model, "blocks", None):
        found.append("the bridge registers no 'blocks' stack (hook names blocks.{l}.* are needed)")
    return found


def norm_names(model) -> dict[str, str | None]:
    """The block's norm modules by role (``_tl.ModelSpec``'s fields), read from the bridge's first
    block: ``ln1``/``ln2`` before the sublayers, ``ln1_post``/``ln2_post`` after them (Gemma 2/3)."""
    block = model.blocks[0]
    has = {name for name, _ in block.named_children()}
    has_mlp = "mlp" in has
    return dict(
        attn_pre_norm="ln1" if "ln1" in has else None,
        attn_post_norm="ln1_post" if "ln1_post" in has else None,
        mlp_pre_norm="ln2" if has_mlp and "ln2" in has else None,
        mlp_post_norm="ln2_post" if has_mlp and "ln2_post" in has else None,
    )


def norm(module: torch.nn.Module, x: Tensor) -> Tensor:
    """A block norm of the bridge (a ``NormalizationBridge``) applied to ``x`` as its forward pass
    applies it, without its ``hook_in`` / ``hook_out``: a bridge's ``blocks.{l}.hook_resid_mid``
    is ``ln2.hook_in`` itself, so a hook there that normalises its activation (a thought patch's
    activation form) would call itself through the module's forward."""
    config = module.config
    if module.use_native_layernorm_autograd or getattr(config, "layer_norm_folding", False):
        return module._hf_autograd_forward_with_hooks(x)  # float64_norms' wrapper, if inside it
    return module._python_norm_forward(x)


def norm_kind(module: torch.nn.Module) -> str:
    """``"RMS"`` for a norm bridge that divides by the root mean square (its ``hook_normalized``
    receives the input divided by ``hook_scale``), else the wrapped module's class name."""
    if getattr(module, "uses_rms_norm", False):
        return "RMS"
    return type(getattr(module, "original_component", module)).__name__


def weight(model, name: str) -> Tensor:
    """A weight of the bridge by TransformerLens name (``blocks.3.mlp.W_in``, ``blocks.3.ln2.w``,
    ``W_E``...): the view the bridge exposes, or zeros for a bias the checkpoint lacks.

    Raises:
        InputError: no such weight.
    """
    match = _BLOCK_WEIGHT.match(name)
    if match:
        layer, module, attr = int(match[1]), match[2], match[3]
        component = getattr(model.blocks[layer], module)
        if attr.startswith("b_") and _missing_bias(component, attr):
            return torch.zeros(
                _bias_size(model, component, attr), dtype=model.cfg.dtype, device=model.W_E.device
            )
        value = getattr(component, attr)
        if value is None and attr in _BIAS_COMPONENT:  # a bias added by a swap: the bridge reads None
            value = getattr(component, _BIAS_COMPONENT[attr]).original_component.bias
        return value
    try:
        module_name, _, attr = name.rpartition(".")
        return getattr(model.get_submodule(module_name) if module_name else model, attr)
    except AttributeError:
        raise InputError(f"{name!r} is not a weight of this TransformerBridge") from None


def _missing_bias(component, attr: str) -> bool:
    if attr not in _BIAS_COMPONENT:
        return False
    projection = getattr(component, _BIAS_COMPONENT.get(attr, ""), None)
    original = getattr(projection, "original_component", None)
    return original is not None and getattr(original, "bias", None) is None


def _bias_size(model, component, attr: str) -> tuple[int, ...]:
    projection = getattr(component, _BIAS_COMPONENT[attr]).original_component
    if attr in ("b_O", "b_out"):
        return (model.cfg.d_model,)
    return (projection.weight.shape[0],)


def _owner(model, name: str, view: Tensor) -> tuple[torch.nn.Module, str, torch.nn.Parameter]:
    """The module, attribute and parameter whose memory the weight ``view`` lies in."""
    ptr = view.untyped_storage().data_ptr()
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            if param.untyped_storage().data_ptr() == ptr:
                if not param.is_contiguous():
                    break
                return module, attr, param
    raise UnsupportedArchitectureError(
        f"{name} of this TransformerBridge is not a view of one of its parameters (a processed copy): "
        "it cannot be patched in place; weight-form patches need the bridge's weights as views"
    )


class WeightSwap:
    """Weights installed by [`install_weights`][]: ``restore()`` puts the bridge back as it was
    (a second call does nothing); ``moved()`` names the weights whose parameter no longer holds
    what was put there (replaced since by other code, e.g. ``tl_thoughts.computing_in`` entered
    afterwards)."""

    def __init__(self) -> None:
        # (module, attribute, its original data or None for a bias added here, the tensor put
        # there, the TransformerLens names written into it)
        self.saved: list[tuple[torch.nn.Module, str, Tensor | None, Tensor, list[str]]] = []

    def moved(self) -> list[str]:
        out = []
        for module, attr, _, put, names in self.saved:
            now = getattr(module, attr, None)
            if now is None or now.data.data_ptr() != put.data_ptr() or now.dtype != put.dtype:
                out.extend(names)
        return out

    def restore(self) -> None:
        for module, attr, original, _, _ in reversed(self.saved):
            if original is None:
                setattr(module, attr, None)  # a bias added for the swap: removed
            else:
                getattr(module, attr).data = original
        self.saved.clear()


def install_weights(model, new: Mapping[str, Tensor]) -> WeightSwap:
    """Give the bridge's TransformerLens-named weights the values ``new`` (full values, the
    weight's shape, cast to its dtype) until ``restore()`` is called on the returned
    [`WeightSwap`][]: each is written into a copy of the HuggingFace parameter it views, which
    replaces that parameter's data; a missing bias is added as a parameter. If installing fails,
    what was installed is undone before the error propagates.

    Raises:
        InputError: a shape that is not the weight's.
        UnsupportedArchitectureError: a weight that is not a view of a parameter.
    """
    swap = WeightSwap()
    try:
        copies: dict[int, tuple[torch.nn.Module, str, torch.nn.Parameter, Tensor, list[str]]] = {}
        for name, value in new.items():
            match = _BLOCK_WEIGHT.match(name)
            component = getattr(model.blocks[int(match[1])], match[2]) if match else None
            if match and match[3].startswith("b_") and _missing_bias(component, match[3]):
                owner = getattr(component, _BIAS_COMPONENT[match[3]]).original_component
                size = _bias_size(model, component, match[3])
                if tuple(value.shape) != size:
                    raise InputError(
                        f"{name}: replacement has shape {tuple(value.shape)}, expected {size}"
                    )
                owner.bias = torch.nn.Parameter(
                    value.detach().to(owner.weight).clone(), requires_grad=False
                )
                swap.saved.append((owner, "bias", None, owner.bias, [name]))
                continue
            view = weight(model, name)
            if tuple(value.shape) != tuple(view.shape):
                raise InputError(
                    f"{name}: replacement has shape {tuple(value.shape)}, expected {tuple(view.shape)}"
                )
            module, attr, param = _owner(model, name, view)
            if id(param) not in copies:
                copies[id(param)] = (module, attr, param, param.detach().clone(), [])
            copy = copies[id(param)][3]
            copies[id(param)][4].append(name)
            offset = view.storage_offset() - param.storage_offset()
            copy.as_strided(view.shape, view.stride(), offset).copy_(value.detach())
        for module, attr, param, copy, names in copies.values():
            swap.saved.append((module, attr, param.data, copy, names))
            param.data = copy
    except BaseException:
        swap.restore()
        raise
    return swap


@contextlib.contextmanager
def swapped_weights(model, new: Mapping[str, Tensor]) -> Iterator[None]:
    """Temporarily give the bridge's TransformerLens-named weights the values ``new``
    ([`install_weights`][]); everything is put back on exit, also on an exception.

    Raises:
        InputError: a shape that is not the weight's.
        UnsupportedArchitectureError: a weight that is not a view of a parameter.
    """
    swap = install_weights(model, new)
    try:
        yield
    finally:
        swap.restore()


def unstored_weights(model, names: Iterable[str]) -> list[str]:
    """Those of ``names`` that no parameter of the bridge holds: the biases the checkpoint lacks
    (they read as zeros; a swap adds them for its duration only)."""
    out = []
    for name in names:
        match = _BLOCK_WEIGHT.match(name)
        if match and _missing_bias(getattr(model.blocks[int(match[1])], match[2]), match[3]):
            out.append(name)
    return out


def tl_weights(model) -> dict[str, Tensor]:
    """The bridge's weights under the names and shapes of the parameters the equivalent
    HookedTransformer (TransformerLens 3.9) has: ``embed.W_E``, ``pos_embed.W_pos`` (learned
    positions), per block the norms' ``w`` (and ``b`` for LayerNorm), ``attn.W_Q``, ``W_K``,
    ``W_V``, ``W_O`` and their biases (``_W_K``, ``_W_V``, ``_b_K``, ``_b_V`` with grouped-query
    attention, as TransformerLens stores them), ``attn.q_norm.w`` / ``k_norm.w`` where present,
    ``mlp.W_in``, ``W_gate`` (gated), ``W_out``, ``b_in``, ``b_out``, then ``ln_final.w`` (``b``)
    and ``unembed.W_U``, ``b_U``. Each is the view the bridge exposes (the checkpoint's values),
    or zeros (+0.0) for a bias the checkpoint lacks, as TransformerLens' weight conversions write
    them. A fingerprint of these equals the HookedTransformer's for architectures whose
    TransformerLens 3.9 conversion keeps the checkpoint's values (Llama, GPT-2...); not for
    Gemma, whose conversion folds the embedding scale and the norms' ``1 +`` into the weights."""
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    grouped = n_kv != cfg.n_heads
    device = model.W_E.device

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=model.W_E.dtype, device=device)

    norm_params = {"LN": ("w", "b"), "RMS": ("w",)}.get(cfg.normalization_type, ())
    out: dict[str, Tensor] = {"embed.W_E": model.W_E}
    if cfg.positional_embedding_type == "standard":
        out["pos_embed.W_pos"] = model.W_pos
    roles = norm_names(model)
    for layer, block in enumerate(model.blocks):
        prefix = f"blocks.{layer}."
        for module in roles.values():
            if module is not None:
                for p in norm_params:
                    out[f"{prefix}{module}.{p}"] = getattr(getattr(block, module), p)
        attn = block.attn
        for kind, n in (("Q", cfg.n_heads), ("K", n_kv), ("V", n_kv)):
            tl = f"{prefix}attn.{'_' if grouped and kind != 'Q' else ''}"
            out[f"{tl}W_{kind}"] = getattr(attn, f"W_{kind}")
            bias = getattr(attn, f"b_{kind}", None)
            out[f"{tl}b_{kind}"] = zeros(n, cfg.d_head) if bias is None else bias
        out[f"{prefix}attn.W_O"] = attn.W_O
        out[f"{prefix}attn.b_O"] = weight(model, f"{prefix}attn.b_O")
        for qk in ("q_norm", "k_norm"):
            if getattr(attn, qk, None) is not None:
                out[f"{prefix}attn.{qk}.w"] = getattr(attn, qk).w
        if getattr(block, "mlp", None) is not None and not getattr(cfg, "attn_only", False):
            for attr in (("W_gate",) if cfg.gated_mlp else ()) + ("W_in", "W_out", "b_in", "b_out"):
                name = f"{prefix}mlp.{attr}"
                value = weight(model, name)
                out[name] = zeros(cfg.d_mlp) if value is None else value
    for p in norm_params:
        out[f"ln_final.{p}"] = getattr(model.ln_final, p)
    out["unembed.W_U"] = model.W_U
    out["unembed.b_U"] = zeros(cfg.d_vocab) if getattr(model, "b_U", None) is None else model.b_U
    return out


@contextlib.contextmanager
def original_positions(model, positions: Tensor) -> Iterator[None]:
    """Inside, a forward pass of the bridge on ``n`` tokens puts token ``i`` at position
    ``positions[i]`` (``i < len(positions)``; later tokens keep their own positions), by handing
    the HuggingFace model ``position_ids``, as a HookedTransformer's swapped position tables do;
    a call that passes ``position_ids`` itself is left alone. The bridge's ``forward`` is wrapped
    on the instance (``run_with_hooks`` and ``run_with_cache`` call it directly, past torch's
    forward pre-hooks); the wrapper is removed on exit, also on an exception."""
    positions = positions.long()
    if "forward" in vars(model):
        raise InputError(
            "the bridge's forward is already wrapped (nested reduced runs are not supported)"
        )
    original = model.forward

    def forward(*args, **kwargs):
        tokens = args[0] if args else kwargs.get("input")
        if (
            "position_ids" not in kwargs
            and isinstance(tokens, Tensor)
            and tokens.ndim == 2
            and not tokens.is_floating_point()
            and kwargs.get("start_at_layer") is None
        ):
            batch, n = tokens.shape
            ids = torch.arange(n, device=tokens.device)
            k = min(n, len(positions))
            ids[:k] = positions[:k].to(ids.device)
            kwargs["position_ids"] = ids[None].expand(batch, n)
        return original(*args, **kwargs)

    model.__dict__["forward"] = forward
    try:
        yield
    finally:
        del model.__dict__["forward"]


@contextlib.contextmanager
def float64_throughout(model) -> Iterator[None]:
    """Inside, a float64 bridge computes its attention softmax ([`float64_softmax`][]) and its
    norms ([`float64_norms`][]) in float64, where TransformerLens 4.3 and HuggingFace round them
    to float32; float32 and lower runs are unchanged. Undone on exit."""
    with float64_softmax(model), float64_norms(model):
        yield


@contextlib.contextmanager
def float64_norms(model) -> Iterator[None]:
    """Inside, the bridge's RMS norms keep float64 inputs in float64.

    In compatibility mode a norm bridge calls the HuggingFace module (``LlamaRMSNorm``,
    ``Gemma3RMSNorm``...), which computes in float32 whatever the model's dtype. For float64
    inputs each norm bridge takes TransformerLens' own path instead (``_python_norm_forward``:
    the same formula, ``eps`` and weight, with the weight offset of Gemma's norms, in the input's
    dtype); float32 inputs keep HuggingFace's. Wrapped on the instances, removed on exit."""
    try:
        from transformer_lens.model_bridge.generalized_components.normalization import (
            NormalizationBridge,
        )
    except ImportError:  # another layout of TransformerLens: nothing to wrap
        yield
        return
    wrapped = []
    try:
        for module in model.modules():
            if not isinstance(
                module, NormalizationBridge
            ) or "_hf_autograd_forward_with_hooks" in vars(module):
                continue
            original = module._hf_autograd_forward_with_hooks
            python_path = module._python_norm_forward

            def forward(x, _original=original, _python=python_path):
                return _python(x) if x.dtype == torch.float64 else _original(x)

            module.__dict__["_hf_autograd_forward_with_hooks"] = forward
            wrapped.append(module)
        yield
    finally:
        for module in wrapped:
            del module.__dict__["_hf_autograd_forward_with_hooks"]


@contextlib.contextmanager
def float64_softmax(model) -> Iterator[None]:
    """Inside, the bridge's attention softmax keeps float64 scores in float64.

    TransformerLens 4.3's attention bridges for rotary models (``PositionEmbeddingsAttentionBridge``:
    Llama, Gemma, Qwen...) compute the softmax with ``dtype=torch.float32`` whatever the model's
    dtype, so a float64 model's patterns carry float32 rounding (rows summing to one within
    about 1e-7) and float64 exactness is lost. Each block's ``_masked_softmax`` is wrapped, on
    the instance, to drop that float32 request for float64 scores (float32 and lower: unchanged);
    the wrappers are removed on exit, also on an exception."""
    wrapped = []
    try:
        for block in model.blocks:
            attn = getattr(block, "attn", None)
            original = getattr(attn, "_masked_softmax", None)
            if original is None or "_masked_softmax" in vars(attn):
                continue

            def softmax(scores, dtype=None, _original=original):
                if scores.dtype == torch.float64 and dtype == torch.float32:
                    dtype = None
                return _original(scores, dtype=dtype)

            attn.__dict__["_masked_softmax"] = softmax
            wrapped.append(attn)
        yield
    finally:
        for attn in wrapped:
            del attn.__dict__["_masked_softmax"]


def attach_hook(model, name: str, hook: Callable, level: int) -> object:
    """Add a forward hook at hook point ``name`` with context level ``level``; return the hook
    point (``hook_point.remove_hooks("fwd", level=level)`` removes exactly it)."""
    hook_point = model.hook_dict.get(name)
    if hook_point is None:
        raise InputError(f"{name!r} is not a hook point of this model")
    hook_point.add_hook(hook, dir="fwd", level=level)
    return hook_point
