"""The default model on either backend, for the benchmark scripts' ``--backend`` option."""

import torch

BACKENDS = ("hooked", "bridge")


def load_model(backend: str, dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as a HookedTransformer (``hooked``, TransformerLens 3.9, ``.venv``) or
    a TransformerBridge (``bridge``, TransformerLens 4, ``.venv-tl4``), the checkpoint's weights."""
    if backend == "bridge":
        from tl_thoughts.bridges import load_default_bridge

        return load_default_bridge(dtype=dtype)
    from tl_thoughts.models import load_default_model

    return load_default_model(dtype=dtype)
