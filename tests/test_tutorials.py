"""The tutorials: each jupytext script (``tutorials/NN_*.py``, the source of truth) and its notebook
(``tutorials/NN_*.ipynb``, committed without outputs) hold the same cells, and CI executes the
notebooks on the default model, in a Jupyter kernel running this interpreter, as a newcomer runs
them (each asserts its own claims: the top token with, without and patched, exactness, sums over
heads, recovery at k = all heads). ``tl-thoughts demo`` runs too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tl_thoughts.demo import N_SHOWN

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
REGENERATE = ".venv/bin/jupytext --update --to ipynb tutorials/0*.py"


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell["cell_type"], cell["source"]) for cell in nb["cells"]]


def test_there_are_three_tutorials_each_with_its_notebook():
    assert [t.name[:3] for t in TUTORIALS] == ["01_", "02_", "03_"]
    missing = [t.with_suffix(".ipynb").name for t in TUTORIALS if not t.with_suffix(".ipynb").exists()]
    assert not missing, f"no notebook for {missing}: run {REGENERATE}"


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda p: p.stem)
def test_notebook_matches_its_script(tutorial):
    """The notebook's cells are the ones jupytext derives from the script (sources and types), and
    it is stored without outputs (small diffs; CI runs it)."""
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    stored = nbformat.read(tutorial.with_suffix(".ipynb"), as_version=4)
    derived = jupytext.read(tutorial)
    assert _cells(stored) == _cells(derived), (
        f"{tutorial.name} and its notebook differ; after editing the script run {REGENERATE}"
        " (after editing the notebook in Jupyter with jupytext installed, both are saved)"
    )
    assert stored.metadata.get("kernelspec", {}).get("language") == "python"
    ran = [i for i, cell in enumerate(stored.cells)
           if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not ran, f"{tutorial.with_suffix('.ipynb').name} is stored with outputs (cells {ran}): {REGENERATE}"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernel spec for THIS interpreter (whatever `python3` kernel the user has installed)."""
    pytest.importorskip("ipykernel")
    name = "tl_thoughts_tests"
    spec = tmp_path_factory.mktemp("jupyter") / "kernels" / name
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", os.pathsep.join(
            p for p in (str(spec.parents[1]), os.environ.get("JUPYTER_PATH")) if p))
        yield name


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda p: p.stem)
@pytest.mark.real_model
@pytest.mark.slow
def test_notebook_runs(tutorial, tmp_path, kernel_name, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.setenv("TUTORIAL_OUT", str(tmp_path))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as in Jupyter
    nb = nbformat.read(tutorial.with_suffix(".ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=1800,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (the cell, the traceback) when a cell fails
    # (timeout: per cell; tutorial 2's protocol cell is the longest, minutes on a busy machine)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs and all(name.startswith(tutorial.name[:3]) for name in pngs), pngs
    shown = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
             if "image/png" in o.get("data", {})]
    assert shown, "no figure displayed in the notebook"


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda p: p.stem)
def test_scripts_compile(tutorial):
    """The scripts still run as plain Python (``python tutorials/01_...py``); CI executes the
    notebooks, which hold the same cells."""
    compile(tutorial.read_text(), str(tutorial), "exec")


def _run(args: list[str], out: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUTORIAL_OUT": str(out), "MPLBACKEND": "Agg"}
    return subprocess.run(args, cwd=out, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.real_model
@pytest.mark.slow
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
    assert len(rows) == N_SHOWN, rows
    for row in rows:
        _, query, answer, with_chunk, *_ = [cell.strip() for cell in row.split("|")]
        assert with_chunk == repr(" " + answer), row
    # the attribution analyses one of those queries
    shown = {row.split("|")[1].strip() for row in rows}
    section = report.split("## 3. Which heads carry the demonstrations' effect on `")[1]
    assert section.split(" ->`")[0] in shown
    assert "[demo] generate:" in done.stdout and "[demo] summary table:" in done.stdout  # a line per stage
