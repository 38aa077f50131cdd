"""``tl-thoughts verify --model NAME``: TransformerLens pretrained names through
``HookedTransformer.from_pretrained``; without the network (as here) one clean error line that
names the model and the reason, at once (no retries of the Hub client), and nothing loaded."""

import time

import pytest

from tl_thoughts.cli import build_parser, main
from tl_thoughts.models import ModelLoadError, hub_reachable, load_pretrained_model

UNCACHED = "meta-llama/Llama-3.2-1B"  # gated: never in a test machine's Hugging Face cache


def _run(argv, capsys):
    t0 = time.perf_counter()
    status = main(argv)
    seconds = time.perf_counter() - t0
    out, err = capsys.readouterr()
    return status, out, err, seconds


def test_the_option_is_parsed_and_defaults_to_the_embedded_model():
    assert build_parser().parse_args(["verify"]).model is None
    assert build_parser().parse_args(["verify", "--model", "gpt2"]).model == "gpt2"


def test_offline_the_error_is_one_line_naming_the_model_and_the_reason(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status, out, err, seconds = _run(["verify", "--model", UNCACHED], capsys)
    assert status == 2 and out == "" and seconds < 30
    assert err.count("\n") == 1 and err.startswith("error: cannot load model 'meta-llama/Llama-3.2-1B'")
    assert "not in the local Hugging Face cache" in err and "HF_HUB_OFFLINE is set" in err


def test_an_unreachable_hub_fails_after_a_short_check(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    assert not hub_reachable()
    status, out, err, seconds = _run(["verify", "--model", UNCACHED, "--dtype", "float64"], capsys)
    assert status == 2 and seconds < 30
    assert err.count("\n") == 1 and "'meta-llama/Llama-3.2-1B'" in err and "unreachable" in err


def test_an_unknown_name_is_refused_before_anything_is_fetched(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status, _, err, _ = _run(["verify", "--model", "no-such-model-xyz"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "'no-such-model-xyz'" in err and "not a TransformerLens pretrained model name" in err
    assert len(err) < 400  # not TransformerLens' list of every name
    with pytest.raises(ModelLoadError, match="no-such-model-xyz"):
        load_pretrained_model("no-such-model-xyz")
    assert issubclass(ModelLoadError, OSError)
