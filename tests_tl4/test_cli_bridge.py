"""``tl-thoughts verify`` under TransformerLens 4: the choice of backend (the run itself on the
default model is ``test_bridge_smollm2.py::test_the_verify_command_runs_on_the_bridge``)."""

import pytest

from tl_thoughts import cli


def test_auto_is_the_bridge_and_hooked_is_refused_here(capsys):
    assert cli.build_parser().parse_args(["verify"]).backend == "auto"
    assert cli.main(["verify", "--backend", "hooked"]) == 2
    assert "--backend hooked needs TransformerLens 3.9" in capsys.readouterr().err


def test_the_bridge_backend_loads_the_default_model_only(capsys, monkeypatch):
    import tl_thoughts.bridges

    def never(**kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(tl_thoughts.bridges, "load_default_bridge", never)
    for argv in (["verify", "--model", "gpt2"], ["verify", "--backend", "bridge", "--model", "gpt2"]):
        assert cli.main(argv) == 2
        assert "--backend bridge loads the default model only" in capsys.readouterr().err


def test_help_names_the_backends(capsys):
    with pytest.raises(SystemExit):
        cli.main(["verify", "--help"])
    assert "--backend {auto,hooked,bridge}" in capsys.readouterr().out
