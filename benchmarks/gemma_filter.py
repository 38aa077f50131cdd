"""Gemma 3 270M: the protocol's filter on the 8 shipped tasks (issue 36), through the library's own
code: `prepare_task`'s verdicts (`example_verdicts`, once a task) and `evaluate_seed`'s split and filter
(`split`, then right WITH the chunk and wrong WITHOUT it), seeds 0, 1, 2, n_fit 20.

Run: .venv/bin/python benchmarks/gemma_filter.py docs/benchmark/gemma/filter_counts.json

Writes, per task: the examples, the seconds of the verdicts (every example with and without the
chunk, one `example_verdicts` call), and per seed the test examples, the filtered ones, and the
unfiltered accuracies with and without the chunk; and the load time. Thought patches are not
needed: this runs on Gemma before `fit_thought` supports its norms after the sublayers.
"""
import json
import sys
import time

import torch

from tl_thoughts import evaluation as E
from tl_thoughts.models import load_named_model
from tl_thoughts.tasks import load_task, shipped_tasks

config = E.EvalConfig(n_queries=0, methods=("with_chunk", "without_chunk", "steering_all_layers"))
t0 = time.perf_counter()
model = load_named_model("gemma-3-270m", dtype=torch.float32)
out = {"model": "gemma-3-270m", "dtype": "float32", "torch_threads": torch.get_num_threads(),
       "commit": E.checkout_commit(), "n_fit": config.n_fit, "seeds": list(config.seeds),
       "load_seconds": time.perf_counter() - t0, "tasks": {}}
print(f"loaded in {out['load_seconds']:.1f} s", flush=True)
for path in shipped_tasks():
    task = load_task(path)
    t = time.perf_counter()
    with_right, without_right = E.example_verdicts(model, task, batch_size=config.batch_size)
    seconds = time.perf_counter() - t
    seeds = []
    for seed in config.seeds:
        _, test = E.split(len(task.examples), config.n_fit, seed)
        w, wo = with_right[torch.tensor(test)], without_right[torch.tensor(test)]
        keep = w & ~wo
        seeds.append({"seed": seed, "n_test": len(test), "n_filtered": int(keep.sum()),
                      "with_chunk_all": float(w.double().mean()), "without_chunk_all": float(wo.double().mean())})
    out["tasks"][task.name] = {"n_examples": len(task.examples), "verdict_seconds": seconds,
                               "with_chunk_all_examples": float(with_right.double().mean()),
                               "without_chunk_all_examples": float(without_right.double().mean()),
                               "seeds": seeds}
    print(task.name, f"{seconds:.1f} s", [s["n_filtered"] for s in seeds],
          [round(100 * s["with_chunk_all"]) for s in seeds], [round(100 * s["without_chunk_all"]) for s in seeds],
          flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
out["total_seconds"] = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=1)
