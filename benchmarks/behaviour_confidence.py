"""Which filtered examples does the thought patch miss, and through which position does it act?
The confidence and first-position findings in ``docs/benchmark.md`` come from this script:

    .venv/bin/python benchmarks/behaviour_confidence.py

Per task (one seed; the protocol of ``tl-thoughts eval``: the same split, filter and thought patch,
its rank chosen on the fit examples among 1, 4, 16 and as fitted, as ``EvalConfig`` did until 2
December, pinned by ``findings_config``), for every filtered test example:

- ``confidence``: how sure the model is WITH the chunk, the smallest probability it gives to one of
  the answer's tokens (teacher-forced; the filter only asks that each be the argmax);
- whether the thought patch gets it right without the chunk (as in the benchmark);
- with ``--old-patch`` (the patch of 82.5%, which patches every position), whether it still does
  when the residual stream at the first position (the fixed first token, ``<|im_start|>``, every
  head's attention sink) is held at its value in the unpatched model after every block. A patch
  that acts at every position changes that position too, although the chunk, which comes after it,
  never does. ``EvalConfig``'s patch leaves it unpatched (``patch_prefix=False``); the script then
  checks that holding it changes no verdict.

It prints the patch's accuracy per confidence bin over all tasks, and per task the accuracy on the
less and the more confident half of its filtered examples (split at the median), and (with
``--old-patch``) with the first position held. A last table counts the verdicts where comparing the answer's text (the protocol)
and its tokens (``greedy_match(compare="tokens")``, the check before the protocol compared text)
differ: on the test examples with and without the chunk (the filter), and under the patch.

Options: ``--tasks`` (default: all shipped), ``--seed`` (default 0), ``--old-patch`` (the options of
the patch of 82.5%).
"""

import argparse
import time

import numpy as np
import torch

from behaviour_generalisation import OLD_PATCH_HELP, findings_config  # this script's folder is on sys.path
from tl_thoughts import _tl
from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.tasks import load_task, shipped_tasks
from tl_thoughts.thoughts import fit_thought

BINS = [0.0, 0.3, 0.5, 0.7, 1.0001]


@torch.no_grad()
def confidence(model, example) -> float:
    """Smallest probability, with the chunk, of one of the answer's tokens (not the line break)."""
    enc = example.enc
    logp = torch.log_softmax(model(enc.full[None])[0].double(), -1)
    rows = torch.arange(enc.answer_start - 1, enc.full.shape[0] - 2)
    return float(logp[rows, enc.full[rows + 1]].exp().min())


def hold_first_position(model, first_token: int) -> E.HookFactory:
    """Hooks holding the residual after every block, at position 0, at its unpatched value (taken
    now, before any patch is applied: position 0 sees only itself)."""
    names = [_tl.resid_post_name(layer) for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(torch.tensor([[first_token]]), names_filter=lambda n: n in names)
    clean = {name: cache[name][0, 0].clone() for name in names}

    def make(batch, with_chunk):
        def hold(act, hook):
            act = act.clone()
            act[:, 0] = clean[hook.name].to(act.dtype)
            return act

        return [(name, hold) for name in names]

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--old-patch", action="store_true", help=OLD_PATCH_HELP)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_default_model()
    config = findings_config(args.old_patch, seeds=(args.seed,))
    stops = E.stop_tokens(model)
    bs = config.batch_size
    t0 = time.perf_counter()
    tasks = [load_task(p) for p in shipped_tasks() if args.tasks is None or p.stem in args.tasks]
    conf_all, right_all = [], []
    rows, counts = [], []
    for task in tasks:
        fit_idx, test_idx = E.split(len(task.examples), config.n_fit, args.seed)
        test = E.encode_task_examples(model, task, test_idx)
        with_right, without_right = (v[test_idx] for v in E.example_verdicts(model, task, batch_size=bs))
        keep = with_right & ~without_right
        filtered = [e for e, k in zip(test, keep.tolist()) if k]
        by_tokens = [E.greedy_match(model, test, with_chunk=c, stops=stops, batch_size=bs, compare="tokens")[0]
                     for c in (True, False)]
        differ = [int((a != b).sum()) for a, b in zip((with_right, without_right), by_tokens)]
        fit_set = E.encode_task_examples(model, task, fit_idx)
        first = {int(e.enc.full[0]) for e in fit_set + filtered}
        assert len(first) == 1 and first == {int(e.enc.reduced[0]) for e in filtered}, "one fixed first token"
        held = hold_first_position(model, first.pop())
        patch = fit_thought(model, task.chunk, task.fit_examples(fit_idx), template=task.template, fit="both",
                            compare_steering=False, progress=False, batch_size=bs, **config.fit_options)
        patch, rank = E.choose_rank(model, patch, config.ranks, fit_set, stops=stops, batch_size=bs)
        with patch.apply(model):
            right, _ = E.greedy_match(model, filtered, with_chunk=False, stops=stops, batch_size=bs)
            right_held, _ = E.greedy_match(model, filtered, with_chunk=False, hooks=held, stops=stops, batch_size=bs)
            right_tokens, _ = E.greedy_match(model, filtered, with_chunk=False, stops=stops, batch_size=bs,
                                             compare="tokens")
        differ.append(int((right != right_tokens).sum()))
        if not config.patch_prefix:  # the first position is left unpatched: holding it changes nothing
            assert torch.equal(right, right_held), "the unpatched first position moved"
        conf = np.array([confidence(model, e) for e in filtered])
        right = right.numpy()
        low = conf < np.median(conf)
        rows.append((task.name, len(filtered), rank, float(np.median(conf)), right[low].mean(), right[~low].mean(),
                     right.mean(), right_held.double().mean().item()))
        counts.append((task.name, len(test), len(filtered), *differ))
        conf_all += conf.tolist()
        right_all += right.tolist()
        print(f"{task.name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    conf_all, right_all = np.array(conf_all), np.array(right_all)
    print("\n| with-chunk confidence (smallest answer-token probability) | filtered examples | thought patch |")
    print("|---|---|---|")
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        inside = (conf_all >= lo) & (conf_all < hi)
        print(f"| [{lo:.1f}, {min(hi, 1.0):.1f}{']' if hi > 1 else ')'} | {int(inside.sum())} | "
              f"{100 * right_all[inside].mean():.0f}% |")
    held = config.patch_prefix  # the column is only informative for a patch that moves the first position
    print("\n| task | filtered | rank chosen | median confidence | patch: less confident half | "
          "more confident half | all |" + (" all, first position held |" if held else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if held else ""))
    for name, n, rank, median, lo, hi, acc, acc_held in rows:
        print(f"| {name} | {n} | {rank if rank is not None else 'as fitted'} | {median:.2f} | {100 * lo:.0f}% | "
              f"{100 * hi:.0f}% | {100 * acc:.0f}% |" + (f" {100 * acc_held:.0f}% |" if held else ""))
    means = np.array([r[4:] if held else r[4:-1] for r in rows]).mean(0)
    print("| **mean over tasks** | | | | " + " | ".join(f"**{100 * v:.0f}%**" for v in means) + " |")
    print("\n| task | test examples | verdicts text != tokens: with the chunk | without it | "
          "filtered | under the patch |")
    print("|---|---|---|---|---|---|")
    for name, n_test, n_filtered, d_with, d_without, d_patch in counts:
        print(f"| {name} | {n_test} | {d_with} | {d_without} | {n_filtered} | {d_patch} |")
    print(f"\nseed {args.seed}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
