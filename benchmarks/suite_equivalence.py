"""Exact-equivalence suite on the real model: every built-in prompt, chunk removed, both forms.

Prints a markdown table per dtype (the one in docs/results.md comes from this script):
for each prompt of `tl_thoughts.prompts.SUITE` (instruction and few-shot chunks in SmolLM2's chat
template), the max |logit error| of the activation and weight forms over every kept position,
the argmax agreement, the max KL, and the unpatched reduced run's error (the chunk's own effect).

Run: .venv/bin/python benchmarks/suite_equivalence.py [--dtype float32 float64]
On TransformerLens 4 (a TransformerBridge over the same checkpoint):
     .venv-tl4/bin/python benchmarks/suite_equivalence.py --backend bridge
"""

import argparse

import torch
from _backends import BACKENDS, load_model

import tl_thoughts as tt
from tl_thoughts.prompts import SUITE, chat_prompt

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def run(dtype: torch.dtype, backend: str = "hooked") -> list[dict]:
    model = load_model(backend, dtype)
    rows = []
    for case in SUITE:
        prompt = chat_prompt(model, case)
        updates = tt.implicit_updates(model, prompt, case.chunk)
        report = tt.verify(model, updates)
        rows.append(
            dict(
                name=case.name,
                pos=updates.tokens.shape[1],
                chunk=f"{updates.chunk.start}..{updates.chunk.stop - 1}",
                kept=len(report.kept_positions),
                activation=report["activation"].max_abs_logit_error,
                weight=report["weight"].max_abs_logit_error,
                argmax=report.argmax_agreement,
                kl=report.max_kl,
                unpatched=report["unpatched"].max_abs_logit_error,
            )
        )
    return rows


def markdown(rows: list[dict], dtype: str, backend: str = "hooked") -> str:
    lines = [
        f"**{dtype}**{' (TransformerBridge)' if backend == 'bridge' else ''}, {len(rows)} prompts: worst activation-form error "
        f"{max(r['activation'] for r in rows):.2e}, worst weight-form error "
        f"{max(r['weight'] for r in rows):.2e}, minimum argmax agreement "
        f"{100 * min(r['argmax'] for r in rows):.1f}%",
        "",
        "| prompt | tokens | chunk | kept | activation max abs dlogit | weight max abs dlogit "
        "| argmax | max KL | unpatched max abs dlogit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['pos']} | {r['chunk']} | {r['kept']} | {r['activation']:.2e} "
            f"| {r['weight']:.2e} | {100 * r['argmax']:.0f}% | {r['kl']:.1e} | {r['unpatched']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32", "float64"])
    parser.add_argument("--backend", choices=BACKENDS, default="hooked")
    args = parser.parse_args()
    for name in args.dtype:
        print(markdown(run(DTYPES[name], args.backend), name, args.backend))
        print()


if __name__ == "__main__":
    main()
