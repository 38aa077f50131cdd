"""Shared helpers for the tl_thoughts test suite: tiny random models covering the supported
architectures, tolerance assertions, and checks that a model was left untouched.

Nothing here loads a pretrained model; everything is built offline from a config.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

# --- tiny models --------------------------------------------------------------------------------

D_MODEL = 32
D_HEAD = 8
N_HEADS = 4
D_MLP = 64
D_VOCAB = 50
N_CTX = 64


@dataclass(frozen=True)
class Arch:
    """One tiny architecture of the test matrix: a readable id plus config overrides."""

    name: str
    overrides: dict = field(default_factory=dict)

    @property
    def attn_only(self) -> bool:
        return bool(self.overrides.get("attn_only", False))

    @property
    def gated(self) -> bool:
        return bool(self.overrides.get("gated_mlp", False)) and not self.attn_only

    @property
    def parallel(self) -> bool:
        return bool(self.overrides.get("parallel_attn_mlp", False))

    @property
    def rotary(self) -> bool:
        return self.overrides.get("positional_embedding_type", "standard") == "rotary"

    @property
    def post_norm(self) -> bool:
        """Norms after the sublayers (Gemma 2/3 style pre+post norms, or OLMo 2 post-norm)."""
        return bool(self.overrides.get("use_normalization_before_and_after")) or (
            self.overrides.get("original_architecture") == "Olmo2ForCausalLM"
        )


# Every supported feature appears in at least two configs, combined with different others:
# normalisation LN / LNPre / RMS / RMSPre; plain and gated MLPs with gelu, relu, silu; learned
# absolute ("standard") and rotary positions (full and partial rotary_dim); grouped-query attention
# (2 and 1 key/value heads); parallel attention + MLP; attention-only.
_ARCH_LIST = [
    Arch("ln_gelu_learned", dict(normalization_type="LN", act_fn="gelu")),
    Arch(
        "ln_relu_rotary_partial",
        dict(normalization_type="LN", act_fn="relu", positional_embedding_type="rotary", rotary_dim=4),
    ),
    Arch(
        "lnpre_relu_learned_parallel",
        dict(normalization_type="LNPre", act_fn="relu", parallel_attn_mlp=True),
    ),
    Arch(
        "lnpre_silu_learned_gqa",
        dict(normalization_type="LNPre", act_fn="silu", n_key_value_heads=2, n_layers=3),
    ),
    Arch(
        "rms_gated_silu_rotary_gqa",
        dict(
            normalization_type="RMS",
            act_fn="silu",
            gated_mlp=True,
            positional_embedding_type="rotary",
            n_key_value_heads=2,
            n_layers=3,
        ),
    ),
    Arch(
        "rms_gated_gelu_learned_parallel_gqa",
        dict(
            normalization_type="RMS",
            act_fn="gelu",
            gated_mlp=True,
            parallel_attn_mlp=True,
            n_key_value_heads=2,
        ),
    ),
    Arch("rms_silu_learned", dict(normalization_type="RMS", act_fn="silu")),
    Arch(
        "rmspre_gated_relu_rotary_parallel_mqa",
        dict(
            normalization_type="RMSPre",
            act_fn="relu",
            gated_mlp=True,
            parallel_attn_mlp=True,
            positional_embedding_type="rotary",
            n_key_value_heads=1,
        ),
    ),
    Arch(
        "rmspre_attn_only_rotary",
        dict(normalization_type="RMSPre", attn_only=True, positional_embedding_type="rotary"),
    ),
    Arch("ln_attn_only_learned_gqa", dict(normalization_type="LN", attn_only=True, n_key_value_heads=2)),
    Arch(
        "ln_gated_gelu_rotary_mqa",
        dict(
            normalization_type="LN",
            act_fn="gelu",
            gated_mlp=True,
            positional_embedding_type="rotary",
            n_key_value_heads=1,
        ),
    ),
    # norms after the sublayers: Gemma 2/3 style (pre and post norms; q/k norms, score soft-cap)
    Arch(
        "rms_gated_gelu_rotary_gqa_prepost",
        dict(
            normalization_type="RMS",
            act_fn="gelu",
            gated_mlp=True,
            positional_embedding_type="rotary",
            n_key_value_heads=2,
            use_normalization_before_and_after=True,
            use_qk_norm=True,
            attn_scores_soft_cap=20.0,
        ),
    ),
    # Gemma 3 style: pre and post norms, q/k norms, one key/value head, gated tanh-GELU, local
    # (sliding-window) and global blocks with their own rotary bases, attention scale of its own
    Arch(
        "gemma3_local_global_mqa",
        dict(
            normalization_type="RMS",
            act_fn="gelu_pytorch_tanh",
            gated_mlp=True,
            positional_embedding_type="rotary",
            n_key_value_heads=1,
            use_normalization_before_and_after=True,
            use_qk_norm=True,
            use_local_attn=True,
            window_size=24,
            attn_types=["local", "global"] * 4,  # up to 8 blocks (the property tests draw n_layers)
            rotary_base=1000000,
            rotary_base_local=10000,
            use_attn_scale=True,
            attn_scale=4.0,
            original_architecture="Gemma3ForCausalLM",
        ),
    ),
    Arch(
        "rmspre_relu_learned_prepost",
        dict(normalization_type="RMSPre", act_fn="relu", use_normalization_before_and_after=True),
    ),
    Arch(
        "rms_attn_only_rotary_prepost",
        dict(
            normalization_type="RMS",
            attn_only=True,
            positional_embedding_type="rotary",
            use_normalization_before_and_after=True,
        ),
    ),
    # OLMo 2 style post-norm (norms after the sublayers only; q/k norms over all heads)
    Arch(
        "olmo2_rms_gated_silu_rotary",
        dict(
            normalization_type="RMS",
            act_fn="silu",
            gated_mlp=True,
            positional_embedding_type="rotary",
            original_architecture="Olmo2ForCausalLM",
        ),
    ),
]

ARCHS: dict[str, Arch] = {a.name: a for a in _ARCH_LIST}
ARCHITECTURES: list[str] = [a.name for a in _ARCH_LIST]
MLP_ARCHITECTURES: list[str] = [a.name for a in _ARCH_LIST if not a.attn_only]
ATTN_ONLY_ARCHITECTURES: list[str] = [a.name for a in _ARCH_LIST if a.attn_only]
# architectures whose sublayers write straight into the residual stream (no post norm): thought
# patches and the additive per-head analyses apply to them
PRE_NORM_ARCHITECTURES: list[str] = [a.name for a in _ARCH_LIST if not a.post_norm]
PRE_NORM_MLP_ARCHITECTURES: list[str] = [a.name for a in _ARCH_LIST if not a.post_norm and not a.attn_only]
POST_NORM_ARCHITECTURES: list[str] = [a.name for a in _ARCH_LIST if a.post_norm]
POST_NORM_MLP_ARCHITECTURES: list[str] = [a.name for a in _ARCH_LIST if a.post_norm and not a.attn_only]


def make_config(arch: str, dtype: torch.dtype = torch.float64, **extra) -> HookedTransformerConfig:
    """The HookedTransformerConfig of architecture ``arch`` (see ``ARCHITECTURES``), tiny."""
    overrides = dict(ARCHS[arch].overrides)
    overrides.update(extra)
    kwargs = dict(
        n_layers=2,
        d_model=D_MODEL,
        d_head=D_HEAD,
        n_heads=N_HEADS,
        d_mlp=None if overrides.get("attn_only") else D_MLP,
        d_vocab=D_VOCAB,
        n_ctx=N_CTX,
        act_fn="relu",
        dtype=dtype,
        device="cpu",
        seed=None,  # a config seed would reseed the global RNGs; randomize_ sets every parameter
        default_prepend_bos=False,
    )
    kwargs.update(overrides)
    return HookedTransformerConfig(**kwargs)


def randomize_(model: HookedTransformer, seed: int = 0, scale: float = 0.3) -> HookedTransformer:
    """Give EVERY parameter a non-trivial random value (TransformerLens' init leaves biases at zero,
    norm weights at one and some matrices tiny, which would make some checks vacuous).

    Norm weights become ``1 + noise`` (so no coordinate is killed); everything else ``N(0, scale^2)``.
    Buffers (rotary tables, masks) are left alone.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            is_norm_weight = (".ln" in name or name.startswith("ln")) and name.endswith(".w")
            if is_norm_weight:
                value = 1.0 + 0.2 * noise
            else:
                value = scale * noise
            p.copy_(value.to(p.dtype))
    return model


def make_model(
    arch: str, dtype: torch.dtype = torch.float64, seed: int = 0, tokenizer=None, **extra
) -> HookedTransformer:
    """A tiny randomised HookedTransformer of architecture ``arch`` (eval mode, CPU)."""
    cfg = make_config(arch, dtype=dtype, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "HookedTransformer is deprecated"
        if tokenizer is None:
            model = HookedTransformer(cfg)
        else:
            model = HookedTransformer(cfg, tokenizer=tokenizer)
    randomize_(model, seed=seed)
    model.eval()
    return model


def random_tokens(n: int, seed: int = 0, d_vocab: int = D_VOCAB) -> torch.Tensor:
    """``[1, n]`` random token ids (int64), reproducible."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, d_vocab, (1, n), generator=gen)


# --- runtime shape checks -----------------------------------------------------------------------


@contextlib.contextmanager
def runtime_checks_off():
    """Switch off jaxtyping's runtime checks (on in the suite through pytest's
    ``--jaxtyping-packages``), to test the library's own input validation as users meet it."""
    import jaxtyping

    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", previous)


# --- assertions ---------------------------------------------------------------------------------


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "") -> None:
    """Max-abs-difference check with a readable message (no relative tolerance: all tests here
    state the absolute error they accept)."""
    assert torch.is_tensor(actual) and torch.is_tensor(expected)
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    assert bool(torch.isfinite(actual.detach()).all()), f"{what}: non-finite values"
    err = max_abs_diff(actual, expected)
    assert err <= atol, f"{what}: max |difference| {err:.3e} > {atol:.1e}"


# --- the model must be left exactly as it was -----------------------------------------------------


def param_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every parameter and buffer (by name), plus the parameter objects' identities."""
    snap = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    snap.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    snap["__ids__"] = {n: id(p) for n, p in model.named_parameters()}  # type: ignore[assignment]
    return snap


def hooks_attached(model: HookedTransformer) -> list[str]:
    """Names of hook points that have any forward or backward hook."""
    return [name for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]


def torch_module_hooks(model: torch.nn.Module) -> list[str]:
    """Names of modules with any raw torch hook (HookPoint hooks included)."""
    out = []
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            out.append(name)
    return out


def assert_model_untouched(model: HookedTransformer, snapshot: dict) -> None:
    """Every parameter and buffer is bit-identical to ``snapshot`` (same names, shapes, dtypes,
    values), the parameter objects are the same objects, and no hook is left anywhere."""
    now = {f"param:{n}": p.detach() for n, p in model.named_parameters()}
    now.update({f"buffer:{n}": b.detach() for n, b in model.named_buffers()})
    expected_keys = set(snapshot) - {"__ids__"}
    assert set(now) == expected_keys, (
        f"parameter/buffer names changed: missing {sorted(expected_keys - set(now))}, "
        f"new {sorted(set(now) - expected_keys)}"
    )
    for name, value in now.items():
        old = snapshot[name]
        assert value.dtype == old.dtype, f"{name}: dtype {value.dtype} != {old.dtype}"
        assert value.shape == old.shape, f"{name}: shape {tuple(value.shape)} != {tuple(old.shape)}"
        assert torch.equal(value, old), f"{name} changed (max diff {max_abs_diff(value, old):.3e})"
    ids = {n: id(p) for n, p in model.named_parameters()}
    assert ids == snapshot["__ids__"], "parameter objects were replaced"
    assert hooks_attached(model) == [], f"hooks left attached at {hooks_attached(model)}"
    assert torch_module_hooks(model) == [], f"torch hooks left on {torch_module_hooks(model)}"


# --- an offline tokenizer ---------------------------------------------------------------------------

TOKENIZER_WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "big", "red", "hat", "and", ".", ":"]


def make_word_tokenizer():
    """A tiny GPT-2-like tokenizer built offline: byte-level pre-tokenisation (a word's leading space
    belongs to its token, ``" cat"``), a word-level vocabulary of ``TOKENIZER_WORDS`` with and without
    the leading space, ``<unk>``/``<eos>``/``<pad>``. No BOS token (TransformerLens would otherwise try
    to download a BOS-adding copy)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    for word in TOKENIZER_WORDS:
        for piece in (word, "\u0120" + word):  # "\u0120" is the byte-level space marker
            vocab.setdefault(piece, len(vocab))
    assert len(vocab) <= D_VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
    )


FIT_CALL_ARGS = ("template", "rows", "progress")


def fit(model, chunk, examples, **options):
    """``tl_thoughts.fit_thought`` with the fit options as keywords (made into a ``FitConfig``;
    ``layers`` as a tuple) and ``template``, ``rows``, ``progress`` (default False) passed on."""
    import tl_thoughts as tt

    call = {k: options.pop(k) for k in FIT_CALL_ARGS if k in options}
    call.setdefault("progress", False)
    if options.get("layers") is not None:
        options["layers"] = tuple(options["layers"])
    return tt.fit_thought(model, chunk, examples, tt.FitConfig(**options), **call)


def fit_all(model, chunk, examples, fits, **options):
    """``tl_thoughts.fit_thoughts`` as :func:`fit` calls ``fit_thought``."""
    import tl_thoughts as tt

    call = {k: options.pop(k) for k in FIT_CALL_ARGS if k in options}
    call.setdefault("progress", False)
    return tt.fit_thoughts(model, chunk, examples, tt.FitConfig(**options), fits=fits, **call)


# --- patches applied, removed and merged in any order ----------------------------------------------


def parameters_copy(model: HookedTransformer) -> dict[str, torch.Tensor]:
    """Clones of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def expected_parameters(own: dict[str, torch.Tensor], weight_patches: list) -> dict[str, torch.Tensor]:
    """The model's own parameters plus the deltas of ``weight_patches``, added in that order (the
    same arithmetic as applying them one after the other)."""
    out = dict(own)
    for patch in weight_patches:
        for name, delta in patch.deltas.items():
            out[name] = out[name] + delta.reshape(out[name].shape).to(out[name])
    return out


def parameters_differ(model: HookedTransformer, expected: dict[str, torch.Tensor]) -> list[str]:
    """Names of the parameters that are not bit-identical (value and dtype) to ``expected``."""
    return [n for n, p in model.named_parameters()
            if p.dtype != expected[n].dtype or not torch.equal(p.detach(), expected[n])]


def run_patch_sequence(model: HookedTransformer, patches: list, ops: list[tuple], finish: list[int]) -> list[str]:
    """Apply, remove and merge ``patches`` on ``model`` as ``ops`` say, then remove what is left in
    the order ``finish`` gives; return every discrepancy seen (empty when all went as documented).

    ``ops`` items: ``("attach", i, form)``, ``("remove", k, "")`` (the ``k % n``-th handle still
    attached), ``("merge", i, "")``. A second application of a patch applied or merged must be
    refused with ``InputError`` and leave the model as it was. After every step the parameters must
    be bit-identical to the model's own (with the merged deltas) plus the deltas of the weight-form
    patches still applied, in order, and the hooked points those of the activation-form patches; at
    the end, the model's own parameters (the very tensor objects if nothing was merged) and no hook.
    """
    import tl_thoughts as tt

    problems: list[str] = []
    snapshot = param_snapshot(model)
    own = parameters_copy(model)
    active: list[tuple] = []  # (handle, patch index, form), in the order applied
    merged: set[int] = set()
    for step, (op, i, form) in enumerate(ops):
        before = parameters_copy(model)
        twice = i in merged or any(j == i for _, j, _ in active)
        if op in ("attach", "merge") and twice:
            try:
                patches[i].attach(model, form) if op == "attach" else patches[i].merge_into(model)
                problems.append(f"step {step}: a second {op} of patch {i} was accepted")
            except tt.InputError:
                pass
            if parameters_differ(model, before):
                problems.append(f"step {step}: a refused {op} changed the model")
            continue
        if op == "attach":
            active.append((patches[i].attach(model, form), i, form))
        elif op == "remove" and active:
            active.pop(i % len(active))[0].remove()
        elif op == "merge":
            patches[i].merge_into(model)
            merged.add(i)
            own = expected_parameters(own, [patches[i]])
        wrong = parameters_differ(model, expected_parameters(own, [patches[j] for _, j, f in active if f == "weight"]))
        if wrong:
            problems.append(f"step {step} ({op}): parameters {wrong[:3]} differ")
        hooked = {name for _, j, f in active if f == "activation" for name, _ in patches[j].hooks(model)}
        if set(hooks_attached(model)) != hooked:
            problems.append(f"step {step} ({op}): hooks {sorted(hooks_attached(model))} != {sorted(hooked)}")
    for k in [k for k in finish if k < len(active)]:
        active[k][0].remove()
    if parameters_differ(model, own) or hooks_attached(model):
        problems.append("after removing every handle: the model is not its own (or merged) weights, hook-free")
    if not merged:
        try:
            assert_model_untouched(model, snapshot)
        except AssertionError as e:
            problems.append(f"after removing every handle: {e}")
    return problems


def assert_same_logits_applied(model: HookedTransformer, first, second, text: str = " a big dog") -> None:
    """Two patches (a fitted one and its loaded copy, say), each applied in turn, give the same
    logits on ``text``, bit for bit."""
    tokens = model.to_tokens(text)
    with torch.no_grad():
        with first.apply(model):
            before = model(tokens)
        with second.apply(model):
            after = model(tokens)
    assert torch.equal(before, after)
