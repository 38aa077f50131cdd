"""Exactness over the tiny-model architecture matrix (float64): the worst max |logit error| of
each form, per architecture, over chunk placements {start, after a 1-token prefix, middle} and
{1, 5} kept tokens after the chunk. The same matrix is asserted (<= 1e-10) in
tests/test_core_equivalence.py; this script prints the numbers for docs/results.md.

Run: .venv/bin/python benchmarks/tiny_equivalence.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tl_thoughts as tt  # noqa: E402
from helpers import ARCHITECTURES, D_VOCAB, make_model  # noqa: E402

PLACEMENTS = {"start": 0, "bos": 1, "middle": 4}


def main() -> None:
    torch.set_num_threads(1)
    print("| architecture | cases | activation worst | weight worst | unpatched smallest |")
    print("|---|---|---|---|---|")
    overall = {"activation": 0.0, "weight": 0.0}
    n_cases = 0
    for arch in ARCHITECTURES:
        model = make_model(arch)
        worst = {"activation": 0.0, "weight": 0.0}
        smallest_effect = float("inf")
        cases = 0
        for prefix in PLACEMENTS.values():
            for n_after in (1, 5):
                gen = torch.Generator().manual_seed(17 * prefix + n_after)
                tokens = torch.randperm(D_VOCAB, generator=gen)[: prefix + 4 + n_after][None]
                report = tt.verify(model, tt.implicit_updates(model, tokens, slice(prefix, prefix + 4)))
                for form in worst:
                    worst[form] = max(worst[form], report[form].max_abs_logit_error)
                smallest_effect = min(smallest_effect, report["unpatched"].max_abs_logit_error)
                cases += 1
        n_cases += cases
        for form in overall:
            overall[form] = max(overall[form], worst[form])
        print(
            f"| {arch} | {cases} | {worst['activation']:.1e} | {worst['weight']:.1e} "
            f"| {smallest_effect:.2f} |"
        )
    print()
    print(
        f"{len(ARCHITECTURES)} architectures, {n_cases} cases: worst activation-form error "
        f"{overall['activation']:.1e}, worst weight-form error {overall['weight']:.1e} (bar 1e-10)"
    )


if __name__ == "__main__":
    main()
