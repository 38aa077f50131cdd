"""Benchmark: the README's past-tense patch file, its thought matrices held as exact low-rank
factors against the same patch held dense (issue 34: at most a tenth of the dense size, loaded
values bit-identical), on the default model (float32).

Fits the README's third snippet (``FitConfig.preset("benchmark")``, four examples), saves it as
fitted (factors) and as a dense copy (every delta multiplied out:
``ThoughtPatch(deltas=dict(patch.deltas), ...)``), into a temporary folder; prints each file's
size, its load time (``ThoughtPatch.load(path, model=model)``), whether every loaded delta equals
the fitted patch's bit for bit (``torch.equal``), and the time of ``summary_table()`` on the
factored patch. ``--dense-summary`` also times ``summary_table()`` on the dense copy (float64
SVDs of every dense matrix: minutes).

Run: .venv/bin/python benchmarks/bench_patch_size.py [--dense-summary]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import tl_thoughts as tt
from tl_thoughts.models import load_default_model

CHUNK = "walk -> walked\ngo -> went\neat -> ate\n"
EXAMPLES = [("run", " ran\n"), ("write", " wrote\n"), ("sing", " sang\n"), ("jump", " jumped\n")]
TEMPLATE = tt.PromptTemplate("<|im_start|>{chunk}{query} ->", separator="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense-summary", action="store_true", help="also time summary_table() on the dense copy")
    args = parser.parse_args()
    model = load_default_model()
    patch = tt.fit_thought(model, CHUNK, EXAMPLES, tt.FitConfig.preset("benchmark"), template=TEMPLATE,
                           progress=False)
    dense = tt.ThoughtPatch(deltas=dict(patch.deltas), steering=patch.steering, meta=patch.meta)
    ranks = sorted({left.shape[-1] for left, _ in patch.factors.values()})
    print(f"thought matrices held as factors: {len(patch.factors)} of {len(patch.deltas)} deltas, "
          f"inner sizes {ranks}")
    print(f"{'file':<10} {'MB':>8} {'load s':>8} {'bit-identical':>14} {'summary_table s':>16}")
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, p in (("factors", patch), ("dense", dense)):
            path = p.save(Path(tmp) / f"{name}.safetensors")
            sizes[name] = os.path.getsize(path)
            t0 = time.perf_counter()
            loaded = tt.ThoughtPatch.load(path, model=model)
            load_s = time.perf_counter() - t0
            same = set(loaded.deltas) == set(patch.deltas) and all(
                torch.equal(loaded.deltas[k], patch.deltas[k]) for k in patch.deltas)
            summary = "-"
            if name == "factors" or args.dense_summary:
                t0 = time.perf_counter()
                loaded.summary_table()
                summary = f"{time.perf_counter() - t0:.2f}"
            print(f"{name:<10} {sizes[name] / 1e6:>8.1f} {load_s:>8.1f} {str(same):>14} {summary:>16}")
    print(f"\nfactored / dense size: {sizes['factors'] / sizes['dense']:.1%} (target <= 10%)")


if __name__ == "__main__":
    main()
