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
from collections.abc import Callable, Iterator, Mapping

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
        return getattr(component, attr)
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


@contextlib.contextmanager
def swapped_weights(model, new: Mapping[str, Tensor]) -> Iterator[None]:
    """Temporarily give the bridge's TransformerLens-named weights the values ``new`` (full
    values, the weight's shape, cast to its dtype): each is written into a copy of the
    HuggingFace parameter it views, which replaces that parameter's data; a missing bias is added
    as a parameter. Everything is put back on exit, also on an exception.

    Raises:
        InputError: a shape that is not the weight's.
        UnsupportedArchitectureError: a weight that is not a view of a parameter.
    """
    saved: list[
        tuple[torch.nn.Module, str, object]
    ] = []  # (module, attribute, original data or None)
    try:
        copies: dict[int, tuple[torch.nn.Module, str, torch.nn.Parameter, Tensor]] = {}
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
                saved.append((owner, "bias", None))
                owner.bias = torch.nn.Parameter(
                    value.detach().to(owner.weight).clone(), requires_grad=False
                )
                continue
            view = weight(model, name)
            if tuple(value.shape) != tuple(view.shape):
                raise InputError(
                    f"{name}: replacement has shape {tuple(value.shape)}, expected {tuple(view.shape)}"
                )
            module, attr, param = _owner(model, name, view)
            if id(param) not in copies:
                copies[id(param)] = (module, attr, param, param.detach().clone())
            copy = copies[id(param)][3]
            offset = view.storage_offset() - param.storage_offset()
            copy.as_strided(view.shape, view.stride(), offset).copy_(value.detach())
        for module, attr, param, copy in copies.values():
            saved.append((module, attr, param.data))
            param.data = copy
    except BaseException:
        _restore(saved)
        raise
    try:
        yield
    finally:
        _restore(saved)


def _restore(saved: list[tuple[torch.nn.Module, str, object]]) -> None:
    for module, attr, original in reversed(saved):
        if original is None:
            setattr(module, attr, None)  # a bias added for the swap: removed
        else:
            getattr(module, attr).data = original


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
