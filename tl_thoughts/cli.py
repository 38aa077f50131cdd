"""The ``tl-thoughts`` console command."""

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

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


def cmd_eval(args: argparse.Namespace) -> int:
    from tl_thoughts import evaluation as E
    from tl_thoughts.models import DEFAULT_MODEL_NAME, load_default_model
    from tl_thoughts.tasks import TaskFormatError, load_task, shipped_tasks

    if bool(args.task) == bool(args.suite):
        print("error: give --task FILE (one or more) or --suite", file=sys.stderr)
        return 2
    try:
        paths = shipped_tasks() if args.suite else [Path(p) for p in args.task]
        tasks = [load_task(p) for p in paths]
        config = E.EvalConfig(
            n_fit=args.n_fit, n_queries=args.queries, seeds=tuple(args.seeds), ridge=args.ridge, pool=args.pool,
            attention_matrix=not args.no_attention_matrix, query_weight=args.query_weight,
            output_matrix=not args.no_output_matrix, patch_prefix=args.patch_prefix,
            ranks=tuple(r or None for r in args.ranks), rank_on_queries=args.rank_on_queries,
            refine_steps=args.refine_steps, refine_lr=args.refine_lr,
            methods=tuple(dict.fromkeys((tuple(args.methods) if args.methods else E.DEFAULT_METHODS)
                                        + tuple(args.also or ()))),
        )
    except (TaskFormatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return 2
    short = [f"{t.name} ({len(t.queries)})" for t in tasks if len(t.queries) < config.n_queries]
    if short:
        print(f"error: --queries {config.n_queries} needs at least that many unlabelled queries a task; "
              f"these tasks have fewer: {', '.join(short)} (add a 'queries' list to the task file, see "
              "docs/benchmark.md, or pass --queries 0)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()

    def report(result) -> None:
        summary = ", ".join(
            f"{m} {100 * (result.summary(m)['accuracy'] or 0):.0f}%" for m in config.methods[2:]
        )
        seconds = sum(s.seconds for s in result.seeds)
        print(f"{result.task}: filtered {result.summary('with_chunk')['n_filtered']} | {summary} "
              f"({seconds:.0f} s)", flush=True)

    jobs = min(args.jobs, len(tasks) * len(config.seeds))
    if jobs > 1:
        print(f"evaluating {len(tasks)} task(s) x {len(config.seeds)} seed(s) in {jobs} processes "
              "(one torch thread each)", flush=True)
        results = E.evaluate_in_processes(tasks, config, jobs=jobs, dtype=DTYPES[args.dtype], on_result=report)
    else:
        model = load_default_model(dtype=DTYPES[args.dtype])
        results = []
        for task in tasks:
            results.append(E.evaluate_task(model, task, config, progress=not args.quiet))
            report(results[-1])
    out = E.write_results(results, config, DEFAULT_MODEL_NAME, args.out, command=args.command_line)
    print()
    print(E.markdown_table(results, config))
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'} "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tl_thoughts.demo import run_demo

    run_demo(Path(args.out), dtype=DTYPES[args.dtype])
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

    from tl_thoughts.evaluation import METHODS, ON_REQUEST, EvalConfig

    defaults = EvalConfig()

    e = sub.add_parser(
        "eval",
        help="the behavioural benchmark: thought patches vs steering baselines on tasks",
        description=(
            "Run the behavioural protocol (greedy decoding, exact match, filtered to examples right "
            "with the chunk and wrong without it, several seeds) on task files, on the default "
            "model, and write results.json, results.md and results.png into --out."
        ),
    )
    e.add_argument("--task", nargs="+", help="task JSON file(s) (see docs/benchmark.md)")
    e.add_argument("--suite", action="store_true", help="all the tasks shipped with the library")
    e.add_argument("--out", required=True, help="output folder (created)")
    e.add_argument("--seeds", nargs="+", type=int, default=list(defaults.seeds))
    e.add_argument("--n-fit", type=int, default=defaults.n_fit, help="fit examples per seed")
    e.add_argument("--queries", type=int, default=defaults.n_queries,
                   help="unlabelled queries of each task, answered by the model with the chunk, added "
                        "to the fit examples of every method (0: none; default: %(default)s)")
    e.add_argument("--ridge", type=float, default=defaults.ridge,
                   help="ridge of the thought matrices relative to --n-fit rows: the fit's is this times "
                        "(fit examples + queries) / --n-fit (default: %(default)s)")
    e.add_argument("--pool", default=defaults.pool, choices=["query", "answer", "kept", "all"])
    e.add_argument("--query-weight", type=float, default=defaults.query_weight,
                   help="weight of the query positions in the thought matrices' fits (default: %(default)s)")
    e.add_argument("--no-attention-matrix", action="store_true",
                   help="no thought matrix on W_O (the papers' vector + MLP-input matrices only)")
    e.add_argument("--no-output-matrix", action="store_true", help="no thought matrix on W_out")
    e.add_argument("--patch-prefix", action="store_true",
                   help="patch the positions before the chunk's place too (as new weights do; "
                        "default: left unpatched, as the chunk leaves them)")
    e.add_argument("--ranks", type=int, nargs="+", default=[r or 0 for r in defaults.ranks],
                   help="candidate ranks of the thought matrices (0: as fitted); the one doing best "
                        "on the fit examples is used (default: %(default)s)")
    e.add_argument("--rank-on-queries", action="store_true",
                   help="choose the rank on the fit examples plus the answered queries (default: on the "
                        "labelled fit examples alone)")
    e.add_argument("--refine-steps", type=int, default=defaults.refine_steps,
                   help="Adam steps of the thought_patch_refined method (default: %(default)s)")
    e.add_argument("--refine-lr", type=float, default=defaults.refine_lr,
                   help="its learning rate (default: %(default)s)")
    e.add_argument("--methods", nargs="+", choices=METHODS,
                   help="the methods run (default: the protocol's, all but " + ", ".join(ON_REQUEST) + ")")
    e.add_argument("--also", nargs="+", choices=ON_REQUEST, metavar="METHOD",
                   help="methods added to the others: " + ", ".join(ON_REQUEST)
                        + " (e.g. --also thought_patch_refined)")
    e.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="seeds of tasks evaluated at once, in as many processes of one torch "
                        "thread each (1: in this process, with progress bars; default: %(default)s)")
    e.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser(
        "demo",
        help="the first thing to run: equivalence report, a thought patch, generations, plots",
        description=(
            "On the default model: remove an instruction chunk and print the equivalence report; "
            "fit a small thought patch for a few-shot task; show generations with the chunk, "
            "without it, and without it but patched; write plots and a markdown report to --out."
        ),
    )
    d.add_argument("--out", default="tl_thoughts_demo", help="output folder (default: %(default)s)")
    d.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    d.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    # the command line as run (recorded in results.json)
    args.command_line = shlex.join(["tl-thoughts", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
