"""The ``tl-thoughts`` console command."""

import argparse
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _top_k(model, logits: torch.Tensor, k: int) -> str:
    probs = torch.softmax(logits.double(), -1)
    values, ids = probs.topk(k)
    return "  ".join(f"{model.to_single_str_token(int(i))!r} {float(p):.3f}" for p, i in zip(values, ids))


def cmd_verify(args: argparse.Namespace) -> int:
    import tl_thoughts as tt
    from tl_thoughts.models import load_default_model
    from tl_thoughts.prompts import DEFAULT_CASE, chat_prompt

    if (args.prompt is None) != (args.chunk is None):
        print("error: --prompt and --chunk go together", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model = load_default_model(dtype=DTYPES[args.dtype])
    print(f"loaded {model.cfg.model_name} ({args.dtype}) in {time.perf_counter() - t0:.1f} s")
    if args.prompt is not None:
        prompt, chunk = args.prompt, args.chunk
    else:
        prompt, chunk = chat_prompt(model, DEFAULT_CASE), DEFAULT_CASE.chunk
    tokens = model.to_tokens(prompt)
    updates = tt.implicit_updates(model, tokens, chunk)
    print(f"\nprompt ({tokens.shape[1]} tokens), chunk removed: {chunk!r}")
    print(repr(prompt))
    print()
    report = tt.verify(model, updates, forms=tuple(args.forms))
    print(report)
    print(f"\ntop-5 next tokens after {model.to_single_str_token(int(tokens[0, -1]))!r}:")
    rows = [("with the chunk", report.full_logits[-1])] + [
        (
            "without it" if name == "unpatched" else f"without, patched ({name})",
            form.logits[-1],
        )
        for name, form in report.forms.items()
    ]
    for label, logits in rows:
        print(f"  {label:<30} {_top_k(model, logits, 5)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tl-thoughts", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "verify",
        help="remove a chunk from a prompt and verify that the patched model reproduces it",
        description=(
            "Load the default model (SmolLM2-135M-Instruct), remove the instruction chunk from a "
            "built-in chat prompt (or --prompt/--chunk), and print the layer-by-layer equivalence "
            "report and the top-5 next tokens with the chunk, without it, and without it but patched."
        ),
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--prompt", help="full prompt text (default: a built-in chat prompt)")
    p.add_argument("--chunk", help="substring of the prompt to remove (default: the instruction)")
    p.add_argument(
        "--forms", nargs="+", choices=["activation", "weight"], default=["activation", "weight"]
    )
    p.set_defaults(func=cmd_verify)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
