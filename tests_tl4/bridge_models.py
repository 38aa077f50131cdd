"""Tiny random TransformerBridges built offline: HuggingFace models from configs (Llama with
grouped-query attention, GPT-2, Gemma 3 with norms after the sublayers) wrapped by
``tl_thoughts.bridges.bridge_from_hf``, and TransformerLens-native models from
``TransformerBridge.boot_native``."""

import torch

from tl_thoughts.bridges import bridge_from_hf

VOCAB = 50


def hf_model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    """The tiny random HuggingFace model of ``arch`` (``llama_gqa``, ``gpt2``, ``gemma3``) that
    ``make_bridge`` wraps, before it is wrapped, in eval mode."""
    torch.manual_seed(seed)
    return _hf(arch).to(dtype).eval()


def _hf(arch: str):
    import transformers as tf

    if arch == "llama_gqa":
        return tf.LlamaForCausalLM(
            tf.LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                rope_theta=10000.0,
            )
        )
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)
        )
    if arch == "gemma3":
        return tf.Gemma3ForCausalLM(
            tf.Gemma3TextConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=64,
                sliding_window=4096,
                query_pre_attn_scalar=8,
            )
        )
    raise KeyError(arch)


NATIVE = {
    "native_ln": dict(normalization_type="LN", act_fn="gelu", positional_embedding_type="standard"),
    "native_rms_gqa": dict(
        normalization_type="RMS",
        act_fn="silu",
        gated_mlp=True,
        positional_embedding_type="rotary",
        n_key_value_heads=2,
    ),
}
ARCHITECTURES = ("llama_gqa", "gpt2", "gemma3", *NATIVE)


def make_bridge(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    """A tiny random bridge of ``arch`` (one of ``ARCHITECTURES``) in ``dtype``, in compatibility
    mode, in eval mode."""
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(seed)
    if arch in NATIVE:
        cfg = dict(
            n_layers=3,
            d_model=32,
            d_head=8,
            n_heads=4,
            d_mlp=48,
            d_vocab=VOCAB,
            n_ctx=64,
            seed=seed,
            **NATIVE[arch],
        )
        model = TransformerBridge.boot_native(cfg, dtype=dtype)
        model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
        return model.eval()
    return bridge_from_hf(hf_model(arch, dtype, seed))
