"""The README's Python examples run as written (on the default model)."""

import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch, smollm2):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # the examples write files
    import tl_thoughts.models

    # reuse the session's model instead of loading it again
    monkeypatch.setattr(tl_thoughts.models, "load_default_model", lambda **kw: smollm2)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    report = namespace["report"]
    assert report.max_abs_logit_error <= 1e-2 and report.argmax_agreement == 1.0
    assert namespace["two"].span.n_chunks == 2 and len(namespace["batch"]) == 2
    exact = namespace["exact"]
    assert str(exact.dtype) == "torch.float64" and exact.max_abs_logit_error <= 1e-8
    assert namespace["part"].vectors.shape[:2] == (10, 1)
    assert (tmp_path / "past_tense.safetensors").exists()
    assert namespace["patch"].meta["n_examples"] == 4 and namespace["patch"].unpatched_positions == 1
    assert namespace["small"].meta["truncated_rank"] == 16
    (refined,) = namespace["refined"].meta["refined"]
    assert refined["steps"] == 10 and refined["loss_after"] < refined["loss_before"]
    assert namespace["refined"].unpatched_positions == 1
