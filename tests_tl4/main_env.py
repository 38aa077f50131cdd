"""The main environment (TransformerLens 3.9, a HookedTransformer) seen from ``tests_tl4``: the
cross-backend tests run ``hooked_side.py`` there as a subprocess. Its interpreter is
``$TL_THOUGHTS_MAIN_PYTHON``, or ``.venv/bin/python`` at the repository's root (CI has both,
``.ci/run``); without one the tests FAIL, saying so: they are never skipped."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def main_python() -> Path:
    """The main environment's interpreter."""
    given = os.environ.get("TL_THOUGHTS_MAIN_PYTHON")
    path = Path(given) if given else ROOT / ".venv" / "bin" / "python"
    if not path.exists():
        pytest.fail(
            f"this test needs the main environment (TransformerLens 3.9) to build a HookedTransformer: {path} "
            "does not exist. Create it with bash scripts/setup.sh, or point TL_THOUGHTS_MAIN_PYTHON at its python"
        )
    return path


def run_hooked_side(*args: str, timeout: float = 1800) -> str:
    """Run ``tests_tl4/hooked_side.py ARGS`` in the main environment (this checkout's tl_thoughts
    first on the path); its standard output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(main_python()), str(ROOT / "tests_tl4" / "hooked_side.py"), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"the HookedTransformer side failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout
