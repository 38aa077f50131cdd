"""Would gradient descent do better than least squares? The thought patch's numbers (a vector on
``b_O``, matrices on ``W_O``, ``W_in`` and ``W_gate`` in every block) refined by Adam on the same
20 fit examples, as in context distillation. The table under "Would gradient descent do better
than least squares?" in ``docs/benchmark.md`` comes from this script:

    .venv/bin/python benchmarks/behaviour_refine.py

Same examples as ``behaviour_generalisation.py`` (one seed): the protocol's 20 fit examples (the
first 20 of the shuffled order) and the filtered test examples after the first 40. The
least-squares patch is fitted with the options of the patch of 82.5% (``OLD_PATCH``: no ``W_out``
thought matrix, every position patched, so that the patch is a change of the weights this loop trains
through; matrices as fitted), then every
one of its deltas is trained, the model's own weights frozen, by full-batch Adam (``--lr``) on one
of two losses over the positions that predict the fit examples' continuations, without the chunk:

- ``ce``: cross-entropy of the task's answers (the labels the least-squares fit used too);
- ``kl``: KL divergence from the model's next-token distribution WITH the chunk (context
  distillation: no labels).

A third run trains the same parameters from zero with ``ce`` (no least-squares start). Each cell:
accuracy % on the filtered fit examples / on the filtered test examples, without the chunk, after
that many steps (0: the least-squares patch).

Options: ``--tasks`` (default: all shipped), ``--seed`` (default 0), ``--steps`` (checkpoints,
default 10 20 30), ``--lr`` (default 1e-5).
"""

import argparse
import time

import numpy as np
import torch
from behaviour_generalisation import FINDINGS, OLD_PATCH, fit_and_test_accuracy, filtered  # this folder is on sys.path
from torch.func import functional_call

from tl_thoughts import evaluation as E
from tl_thoughts.models import load_default_model
from tl_thoughts.patch import ThoughtPatch
from tl_thoughts.tasks import load_task, shipped_tasks
from tl_thoughts.thoughts import fit_thought

N_FIT = E.EvalConfig().n_fit
N_SKIP = 40  # the test examples start here, as in behaviour_generalisation.py


def continuation_rows(examples, seqs):
    """(batch, position) of the positions that predict each continuation token, and the tokens."""
    b_idx, p_idx, targets = [], [], []
    for i, (e, s) in enumerate(zip(examples, seqs)):
        n = s.shape[0]
        b_idx += [i] * e.n_cont
        p_idx += list(range(n - e.n_cont - 1, n - 1))
        targets.append(s[n - e.n_cont:])
    return torch.tensor(b_idx), torch.tensor(p_idx), torch.cat(targets)


def refine(model, patch: ThoughtPatch, fit_set, loss: str, steps: list[int], lr: float, from_zero: bool = False):
    """Adam on the patch's deltas (the model's weights frozen); the patch after each of ``steps``
    (positive step counts)."""
    base = dict(model.named_parameters())
    deltas = {k: (torch.zeros_like(v) if from_zero else v.detach().clone()).requires_grad_(True)
              for k, v in patch.deltas.items()}
    reduced = [e.enc.reduced for e in fit_set]
    b_r, p_r, targets = continuation_rows(fit_set, reduced)
    tokens = E._pad(reduced)
    if loss == "kl":
        full = [e.enc.full for e in fit_set]
        b_f, p_f, _ = continuation_rows(fit_set, full)
        with torch.no_grad():
            teacher = torch.log_softmax(model(E._pad(full))[b_f, p_f], -1)
    opt = torch.optim.Adam(list(deltas.values()), lr=lr)
    out = {}
    for step in range(max(steps) + 1):
        if step in steps:  # after ``step`` updates
            out[step] = ThoughtPatch(deltas={k: v.detach().clone() for k, v in deltas.items()},
                                     steering={}, meta=patch.meta)
        if step == max(steps):
            break
        params = {k: base[k] + deltas[k] if k in deltas else base[k] for k in base}
        logp = torch.log_softmax(functional_call(model, params, (tokens,))[b_r, p_r], -1)
        if loss == "ce":
            value = -logp.gather(-1, targets[:, None]).mean()
        else:
            value = (teacher.exp() * (teacher - logp)).sum(-1).mean()
        opt.zero_grad()
        value.backward()
        opt.step()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20, 30])
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_default_model()
    for p in model.parameters():
        p.requires_grad_(False)
    stops = E.stop_tokens(model)
    config = E.EvalConfig(**{**FINDINGS, **OLD_PATCH})  # ridge 1, as when this table was measured
    bs = config.batch_size
    tasks = [load_task(p) for p in shipped_tasks() if args.tasks is None or p.stem in args.tasks]
    steps = sorted(set(args.steps))
    if steps[0] < 1:
        parser.error("--steps must be positive (step 0, the least-squares patch, is always reported)")
    runs = {f"least squares, then Adam on {loss}": (loss, False) for loss in ("ce", "kl")}
    runs["from zero, Adam on ce"] = ("ce", True)
    least_squares = []
    cells = {(run, s): [] for run in runs for s in steps}
    t0 = time.perf_counter()
    counts = []
    for task in tasks:
        order = np.random.default_rng(args.seed).permutation(len(task.examples)).tolist()
        fit_idx = sorted(order[:N_FIT])
        assert fit_idx == E.split(len(task.examples), N_FIT, args.seed)[0]
        fit_set = E.encode_task_examples(model, task, fit_idx)
        fit_right = filtered(model, task, fit_idx, stops, bs)
        test = filtered(model, task, sorted(order[N_SKIP:]), stops, bs)
        counts.append(len(test))
        patch = fit_thought(model, task.chunk, task.fit_examples(fit_idx), template=task.template, fit="both",
                            compare_steering=False, progress=False, batch_size=bs, **config.fit_options)
        least_squares.append(fit_and_test_accuracy(model, patch, fit_right, test, stops, bs))
        for run, (loss, from_zero) in runs.items():
            for step, p in refine(model, patch, fit_set, loss, steps, args.lr, from_zero).items():
                cells[run, step].append(fit_and_test_accuracy(model, p, fit_right, test, stops, bs))
        print(f"{task.name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    names = [t.name for t in tasks]
    print("\n| patch | steps | " + " | ".join(names) + " | mean |")
    print("|---|---|" + "---|" * (len(names) + 1))
    print("| filtered test examples | | " + " | ".join(map(str, counts)) + " | |")
    rows = [("least squares (as fitted)", 0, least_squares)]
    rows += [(run, step, cells[run, step]) for run in runs for step in steps]
    for run, step, values in rows:
        m_fit, m_test = np.mean([v[0] for v in values]), np.mean([v[1] for v in values])
        print(f"| {run} | {step} | " + " | ".join(f"{100 * a:.0f} / {100 * b:.0f}" for a, b in values)
              + f" | {100 * m_fit:.0f} / {100 * m_test:.0f} |")
    print(f"\nseed {args.seed}, lr {args.lr:g}; cells: accuracy % on the filtered fit examples / on the filtered "
          f"test examples, without the chunk; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
