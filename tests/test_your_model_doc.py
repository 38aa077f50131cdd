"""``docs/your_model.md``: its offline code block (a tiny HookedTransformerConfig model) runs as
written, and the page is in the site's navigation and linked from the docs' index."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "your_model.md"
MARK = "# offline: run by tests/test_your_model_doc.py"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_the_offline_block_runs(capsys):
    offline = [b for b in _blocks() if b.startswith(MARK)]
    assert len(offline) == 1
    namespace: dict = {}
    exec(compile(offline[0], str(PAGE), "exec"), namespace)  # noqa: S102 - the page's own example
    out = capsys.readouterr().out
    assert out.startswith("ImplicitUpdates(chunk 4..7 of 16 tokens") and "positions shifted" in out
    assert namespace["report"].max_abs_logit_error < 1e-10
    assert namespace["miss"] > 1e-2
    assert namespace["seen"]["r"].shape == (1, 12, 32)
    assert isinstance(namespace["model"].cfg.dtype, torch.dtype)


def test_the_online_blocks_name_the_pretrained_models():
    online = [b for b in _blocks() if not b.startswith(MARK)]
    text = "\n".join(online)
    assert 'HookedTransformer.from_pretrained("gpt2")' in text
    assert '"meta-llama/Llama-3.2-1B"' in text
    assert "tl-thoughts verify --model gpt2" in PAGE.read_text()


def test_the_page_is_in_the_nav_and_linked_from_the_index():
    assert "your_model.md" in (ROOT / "mkdocs.yml").read_text()
    assert "(your_model.md)" in (ROOT / "docs" / "index.md").read_text()
