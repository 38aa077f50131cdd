"""Benchmark: greedy decoding of the unlabelled queries (``evaluation.query_answers``) through
TransformerLens' key-value cache, against decoding every step from the start, on SmolLM2.

For every shipped task (or ``--tasks``), the prompts WITH the chunk of all its ``queries``, in
batches of ``EvalConfig.batch_size`` (as ``query_answers`` takes them), are decoded greedily up to
a stop token or 17 tokens, both ways: ``evaluation.greedy_decode`` (right padding, every step
re-runs the whole batch) and ``evaluation.greedy_decode_cached`` (the key-value cache, prompts
grouped by length). Prints, measured in this one run: per task, the two wall times, their ratio,
and how many queries' generations differ (the two agree up to floating-point rounding, so a near
tie could break the other way); then the totals. The reference loop's resident memory peaks far above the model's
(11 GB on one batch of 64 antonyms prompts, cause not found): on successor it ran out of this
machine's 23 GB, so ``--tasks`` runs a subset.

Run: .venv/bin/python benchmarks/bench_decoding.py [--tasks plural successor]
"""

import argparse
import time

import torch

from tl_thoughts import _tl
from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks
from tl_thoughts.templates import encode_example

MAX_NEW_TOKENS = 16  # query_answers' default: a generation is cut after 17 tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=None, help="task names (default: all shipped)")
    args = parser.parse_args()
    model = load_default_model()
    stops = E.stop_tokens(model)
    unembed = model.W_U.T.contiguous()
    bs = E.EvalConfig().batch_size
    keep = lambda i, g: len(g) <= MAX_NEW_TOKENS  # noqa: E731
    totals = [0.0, 0.0, 0, 0]
    print(f"torch threads: {torch.get_num_threads()}; batches of {bs} prompts")
    print("| task | queries | every step from the start (s) | key-value cache (s) | speed-up | generations that differ |")
    print("|---|---|---|---|---|---|")
    for path in shipped_tasks():
        task = load_task(path)
        if args.tasks is not None and task.name not in args.tasks:
            continue
        prompts = [encode_example(model, task.template, task.chunk, q).full.cpu() for q in task.queries]
        t_loop = t_cached = 0.0
        differ = 0
        with _tl.linear_layout(model):
            for b in range(0, len(prompts), bs):
                batch = prompts[b : b + bs]
                t0 = time.perf_counter()
                slow = E.greedy_decode(model, batch, [[] for _ in batch], keep, stops, unembed)
                t1 = time.perf_counter()
                fast = E.greedy_decode_cached(model, batch, keep, stops, unembed)
                t2 = time.perf_counter()
                t_loop, t_cached = t_loop + t1 - t0, t_cached + t2 - t1
                differ += sum((g, s) != (h, u) for g, s, h, u in zip(*slow, *fast))
        print(f"| {task.name} | {len(prompts)} | {t_loop:.1f} | {t_cached:.1f} | {t_loop / t_cached:.1f}x | {differ} |",
              flush=True)
        totals = [totals[0] + t_loop, totals[1] + t_cached, totals[2] + len(prompts), totals[3] + differ]
    print(f"| all | {totals[2]} | {totals[0]:.1f} | {totals[1]:.1f} | {totals[0] / totals[1]:.1f}x | {totals[3]} |")


if __name__ == "__main__":
    main()
