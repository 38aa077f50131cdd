"""Where the thought patch's misses come from, on the shipped tasks (protocol of ``tl-thoughts
eval``, one seed). The numbers under "Findings" in ``docs/benchmark.md`` come from this script:

    .venv/bin/python benchmarks/behaviour_diagnostics.py

Per task it prints:

- ``token-dependence``: how much of the exact per-token updates a token-independent vector can
  carry. Over the fit examples' pooled positions (those that predict the answer), the exact
  virtual weight vectors ``delta_{l,i}`` of block ``l`` (``implicit_updates``) and their mean
  ``m_l``: ``1 - sum_i ||delta_{l,i} - m_l||^2 / sum_i ||delta_{l,i}||^2``, the share of their
  energy the mean carries (median over blocks, and the lowest block);
- ``misses``: the filtered test examples the thought patch gets wrong, how many of them go wrong
  at the first answer token, and a few of them (query, expected, greedy output under the patch).

The thought matrices are used as fitted (``EvalConfig(ranks=(None,))``), as when these findings
were measured.

Options: ``--tasks`` (default: all shipped), ``--seed`` (default 0), ``--show`` (misses shown per
task, default 3), ``--old-patch`` (the options of the patch of 82.5%).
"""

import argparse
import time

import torch

from behaviour_generalisation import OLD_PATCH_HELP, findings_config  # this script's folder is on sys.path
from tl_thoughts import evaluation as E
from tl_thoughts import implicit_updates
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks
from tl_thoughts.thoughts import fit_thought


def mean_share(model, fit_set) -> tuple[float, float]:
    """Median over blocks (and minimum) of the energy share of the mean exact update."""
    rows = []
    for example in fit_set:
        enc = example.enc
        updates = implicit_updates(
            model, enc.full[None], slice(enc.start, enc.stop), positions=enc.pooled("answer")
        )
        rows.append(updates.vectors.double())  # [layer, n, d_model]
    deltas = torch.cat(rows, dim=1)
    mean = deltas.mean(dim=1, keepdim=True)
    share = 1 - ((deltas - mean) ** 2).sum((1, 2)) / (deltas**2).sum((1, 2))
    return float(share.median()), float(share.min())


@torch.no_grad()
def greedy_ids(model, tokens: torch.Tensor, n: int, stops) -> list[int]:
    out = []
    for _ in range(n):
        nxt = int(model(tokens[None], attention_mask=torch.ones_like(tokens[None]))[0, -1].argmax())
        out.append(nxt)
        if bool(stops[nxt]):
            break
        tokens = torch.cat([tokens, torch.tensor([nxt])])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=3)
    parser.add_argument("--old-patch", action="store_true", help=OLD_PATCH_HELP)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_default_model()
    config = findings_config(args.old_patch, seeds=(args.seed,),
                             methods=("with_chunk", "without_chunk", "thought_patch"), ranks=(None,))
    stops = E.stop_tokens(model)
    t0 = time.perf_counter()
    print("| task | mean's share of the exact updates (median block / lowest) | patch misses | "
          "first answer token wrong | examples (query: expected -> patched) |")
    print("|---|---|---|---|---|")
    for path in shipped_tasks():
        if args.tasks and path.stem not in args.tasks:
            continue
        task = load_task(path)
        seed = E.evaluate_seed(model, task, config, args.seed)
        fit_set = E.encode_task_examples(model, task, seed.fit_indices)
        median, lowest = mean_share(model, fit_set)
        misses = [i for i, right in zip(seed.filtered_indices, seed.right["thought_patch"]) if not right]
        patch = fit_thought(model, task.chunk, task.fit_examples(seed.fit_indices), template=task.template,
                            fit="both", compare_steering=False, progress=False, **config.fit_options)
        first_wrong, shown = 0, []
        with patch.apply(model):
            for example in E.encode_task_examples(model, task, misses):
                enc = example.enc
                expected = enc.reduced[example.last_prompt_reduced + 1 :].tolist()
                got = greedy_ids(model, enc.reduced[: example.last_prompt_reduced + 1], len(expected) + 2, stops)
                first_wrong += got[0] != expected[0]
                if len(shown) < args.show:
                    query, answer = task.examples[misses[len(shown)]]
                    text = model.tokenizer.decode([t for t in got if not bool(stops[t])]).strip()
                    shown.append(f"{query}: {answer} -> {text}")
        print(f"| {task.name} | {100 * median:.0f}% / {100 * lowest:.0f}% | {len(misses)} of "
              f"{len(seed.filtered_indices)} | {first_wrong} | {'; '.join(shown)} |", flush=True)
    print(f"\nseed {args.seed}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
