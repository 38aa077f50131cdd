"""``tl-thoughts verify --backend``: under TransformerLens 3.9 (this environment) the bridge is
refused before anything is loaded (the bridge itself is tested in ``tests_tl4``, under
TransformerLens 4)."""

from tl_thoughts import cli


def test_the_bridge_backend_needs_transformerlens_4(monkeypatch, capsys):
    import tl_thoughts.bridges
    import tl_thoughts.models

    def never(**kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(tl_thoughts.bridges, "load_default_bridge", never)
    monkeypatch.setattr(tl_thoughts.models, "load_default_model", never)
    assert cli.main(["verify", "--backend", "bridge"]) == 2
    assert "--backend bridge needs TransformerLens 4" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["verify"]).backend == "auto"
