"""Benchmark: the thought matrices' normal-equation products, ``A^T W A`` whole against its upper
block triangle (``tl_thoughts.thoughts._add_upper_gram``, what ``fit_thought`` accumulates since
2 December), at the fit's sizes, measured in one run.

With more fitted rows than inputs (``_Regression``'s primal form: e.g. 480 answered queries a task
give 1,900 to 3,900 rows, against the MLP's 1,536 hidden units), ``fit_thought`` accumulates
``A^T W A`` for its ``W_out``, ``W_in``/``W_gate`` and ``W_O`` regressions, in float64. The matrix is
symmetric, so the products on and above the block diagonal determine it. For each size (rows x
inputs; 1,536: the ``W_out`` regression's MLP hidden units, 576: ``d_model`` and the heads'
``d_head * n_heads``), prints the median time of the whole product ``(a * w)^T @ a`` and of the
blocked one, their ratio, and the largest difference between the two matrices (relative to the
largest entry: rounding, the products being the same dot products in another order).

Run: .venv/bin/python benchmarks/bench_gram.py [--repeats 5] [--threads 1]
(the suite's workers run one thread each).
"""

import argparse

import torch
from _timing import timed

from tl_thoughts.thoughts import _add_upper_gram


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"{args.threads} thread(s), float64, medians of {args.repeats}")
    print("| rows x inputs | whole (s) | upper blocks (s) | ratio | largest difference (relative) |")
    print("|---|---|---|---|---|")
    for n, d in ((2000, 1536), (4000, 1536), (2000, 576), (4000, 576)):
        a = torch.randn(n, d, generator=gen, dtype=torch.float64)
        w = torch.rand(n, generator=gen, dtype=torch.float64)

        def whole(a=a, w=w):
            return (a * w[:, None]).T @ a

        def upper(a=a, w=w, d=d):
            out = a.new_zeros(d, d)
            _add_upper_gram(out, a * w[:, None], a)
            return out.triu() + out.triu(1).T

        t_whole, full = timed(whole, args.repeats)
        t_upper, mirrored = timed(upper, args.repeats)
        gap = float((full - mirrored).abs().max() / full.abs().max())
        print(f"| {n} x {d} | {t_whole:.3f} | {t_upper:.3f} | {t_upper / t_whole:.2f} | {gap:.1e} |", flush=True)


if __name__ == "__main__":
    main()
