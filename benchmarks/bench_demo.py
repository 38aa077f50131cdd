"""Benchmark: ``tl-thoughts demo`` against ``tl-thoughts verify``, measured in one run (issue 34:
the demo in at most 2.5 times the verify command's time), on the default model (float32).

In this one process, in the order verify, demo, verify (so that the machine's drift between the
two commands partly cancels): the verify command's work (``tl_thoughts.cli.main(["verify"])``,
its output discarded: loading the model, extracting the default case's implicit updates, verifying
every form), then the demo's (``tl_thoughts.demo.run_demo``, what ``tl-thoughts demo`` runs, into a
temporary folder). Each command loads the model itself, as it does on the command line. Prints
the wall times, each demo stage's time, and the ratio demo / verify (verify: the mean of its two
runs); then the same ratio without the demo's ``summary table`` stage (the patch's per-layer
table, whose cost is the patch's own, ``ThoughtPatch.summary``), so that each share can be read
apart.

Run: .venv/bin/python benchmarks/bench_demo.py [--out DIR]
"""

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

from tl_thoughts import cli
from tl_thoughts.demo import run_demo

TARGET = 2.5  # issue 34: the demo in at most this many times the verify command's time


def time_verify() -> float:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["verify"])
    elapsed = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"tl-thoughts verify failed (exit {code})")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="keep the demo's folder here (default: a temporary one)")
    args = parser.parse_args()
    verify = [time_verify()]
    stages: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            run_demo(Path(args.out or tmp), timings=stages)
        demo = time.perf_counter() - t0
    verify.append(time_verify())
    v = sum(verify) / len(verify)
    summary = stages.get("summary table", 0.0)
    print(f"{'command / stage':<28} {'wall s':>8}")
    print(f"{'tl-thoughts verify':<28} {v:>8.1f}   (runs: {', '.join(f'{t:.1f}' for t in verify)})")
    print(f"{'tl-thoughts demo':<28} {demo:>8.1f}")
    for name, t in stages.items():
        print(f"{'  ' + name:<28} {t:>8.1f}   ({t / demo:.0%} of the demo)")
    print(f"\nratio demo / verify: {demo / v:.2f} (target <= {TARGET})")
    print(f"ratio without the summary table: {(demo - summary) / v:.2f} "
          f"(the summary table: {summary / v:.2f} x verify)")


if __name__ == "__main__":
    main()
