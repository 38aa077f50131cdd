"""The tutorials and ``tl-thoughts demo`` execute on the default model, as a newcomer runs them
(each tutorial asserts its own claims: exactness, sums over heads, recovery at k = all heads)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def _run(args: list[str], out: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUTORIAL_OUT": str(out), "MPLBACKEND": "Agg"}
    return subprocess.run(args, cwd=out, env=env, capture_output=True, text=True, timeout=timeout)


def test_there_are_three_tutorials():
    assert [t.name[:3] for t in TUTORIALS] == ["01_", "02_", "03_"]


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(tutorial, tmp_path):
    done = _run([sys.executable, str(tutorial)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs and all(name.startswith(tutorial.name[:3]) for name in pngs), pngs


def test_demo_command(tmp_path):
    done = _run([sys.executable, "-m", "tl_thoughts.cli", "demo", "--out", str(tmp_path / "demo")], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "demo"
    report = (out / "report.md").read_text()
    for name in ("verification", "spectra", "steering", "direct_effect", "tokens", "layers"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
        assert f"({name}.png)" in report
    assert (out / "past_tense.safetensors").exists()
    assert "| query | answer | with the chunk | without | without, patched |" in report
    assert "activation" in report and "weight" in report  # the equivalence report
    # every query shown is answered right with the chunk (the demo checks it and says so), six of them
    assert "of the first" in report and "every query shown is answered right with the chunk (checked)" in report
    assert "WARNING" not in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| query")]
    assert len(rows) == 6, rows
    for row in rows:
        _, query, answer, with_chunk, *_ = [cell.strip() for cell in row.split("|")]
        assert with_chunk == repr(" " + answer), row
    # the attribution analyses one of those queries
    shown = {row.split("|")[1].strip() for row in rows}
    section = report.split("## 3. Which heads carry the demonstrations' effect on `")[1]
    assert section.split(" ->`")[0] in shown
    assert "[demo] generate:" in done.stdout and "[demo] summary table:" in done.stdout  # a line per stage
