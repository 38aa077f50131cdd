"""Two other ways of making the thought patch's rank-k candidates, run through the suite's own
protocol. Two rows of the table of the section "Four more variants, on held-out seeds" in
``docs/benchmark.md`` come from this script:

    .venv/bin/python benchmarks/behaviour_rank_fits.py reduced --suite --seeds 3 4 5 \\
        --methods with_chunk without_chunk thought_patch --out DIR
    .venv/bin/python benchmarks/behaviour_rank_fits.py blockwise --suite --seeds 3 4 5 \\
        --methods with_chunk without_chunk thought_patch --out DIR

The first argument picks the variant; the others are those of ``tl-thoughts eval`` (it runs with
``--jobs 1``: worker processes would not see the changes below), at the suite's defaults until 2
December where not given, as its rows were measured: ``--queries 150 --ridge 0.5 --ranks 1 4 16 0``
(``behaviour_generalisation.SUITE_150``; with the matrices as fitted alone, the default since, no
candidate would be made). The protocol picks the thought patch's rank among those candidates on the
fit examples (``evaluation.choose_rank``); the candidates of a rank k are, instead of the fitted
matrices' best rank-k approximations (``ThoughtPatch.truncations``, the library's and the suite's):

- ``reduced``: the rank-k solution of each block's own ridge problem (reduced-rank ridge
  regression, Mukherjee and Zhu 2011: the ridge problem is least squares on the inputs stacked
  with ``sqrt(lam) I`` and the targets with zeros, whose rank-k solution is the full solution
  projected onto the top k right singular vectors of its fitted values): the fitted matrix
  projected onto the top k eigenvectors, in its output space, of ``M^T (A^T W A + lam I) M``,
  instead of those of ``M^T M``. The two differ where the inputs' second moment is far from isotropic. The
  ``W_in`` and ``W_gate`` matrices share one regression (``fit_thought`` solves for the change of
  the MLP's normalised input): its solution is projected, then multiplied by each matrix;
- ``blockwise``: the patch fitted again, block by block, with each block's solutions truncated to
  rank k (their best rank-k approximations; for ``W_in`` and ``W_gate``, that of the shared
  solution) before the stream goes on to the next block, so that every block is fitted on inputs
  under the rank-k patches below it. One more fit per candidate rank.

It changes, in this process only, ``tl_thoughts.thoughts._Regression.solve``,
``tl_thoughts.thoughts.fit_thought`` and ``ThoughtPatch.truncations``; nothing else differs from
the suite's ``thought_patch``.
"""

import sys

import torch
from behaviour_generalisation import SUITE_150  # this folder is on sys.path

import tl_thoughts.thoughts as th
from tl_thoughts import _tl
from tl_thoughts.patch import ThoughtPatch

VARIANTS = ("reduced", "blockwise")
_solve, _fit, _truncations = th._Regression.solve, th.fit_thought, ThoughtPatch.truncations
_state: dict = {"log": [], "rank": None}


def _solve_logged(self, ridge: float, n: float, shift=None):
    """``reduced``: the solution, and the eigenvectors (descending) of its fitted values' second
    moment plus the ridge's term, ``M^T (A^T W A + lam I) M``."""
    M = _solve(self, ridge, n, shift)
    if self.dual:
        G = torch.cat([g for _, g, _ in self.parts])
        gram_trace = (G * G).sum()  # trace(A^T W A)
        fitted = G @ M
        moment = fitted.T @ fitted
    else:
        gram_trace = torch.trace(self.AtA)
        moment = M.T @ (self.AtA @ M)
    lam = ridge * gram_trace / n  # the lam of _Regression.solve
    moment = moment + lam * (M.T @ M)
    _state["log"].append((M, torch.linalg.eigh(moment).eigenvectors.flip(-1)))
    return M


def _solve_truncated(self, ridge: float, n: float, shift=None):
    """``blockwise``: the solution at its best rank-k approximation while a rank-k fit runs."""
    M = _solve(self, ridge, n, shift)
    k = _state["rank"]
    if k is None or k >= min(M.shape):
        return M
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def _fit_reduced(model, chunk, examples, **options):
    _state["log"].clear()
    patch = _fit(model, chunk, examples, **options)
    factors, i = {}, 0
    for layer in range(model.cfg.n_layers):  # fit_thought's order of solves, block by block
        if f"blocks.{layer}.attn.W_O" in patch.deltas:
            factors[f"blocks.{layer}.attn.W_O"] = (*_state["log"][i], None)
            i += 1
        if f"blocks.{layer}.mlp.W_in" in patch.deltas:
            for name in ("W_in", "W_gate"):
                if f"blocks.{layer}.mlp.{name}" in patch.deltas:
                    factors[f"blocks.{layer}.mlp.{name}"] = (
                        *_state["log"][i], _tl.mlp_matrix(model, layer, name).double())
            i += 1
        if f"blocks.{layer}.mlp.W_out" in patch.deltas:
            factors[f"blocks.{layer}.mlp.W_out"] = (*_state["log"][i], None)
            i += 1
    if i != len(_state["log"]):
        raise RuntimeError(f"{len(_state['log'])} solves for {i} regressions: fit_thought changed")
    for name, (M, _, W) in factors.items():  # the logged solutions are the patch's matrices
        full = M if W is None else M @ W
        d = patch.deltas[name]
        if not torch.allclose(full.reshape(d.shape).to(d.dtype), d, rtol=1e-4, atol=1e-6 * float(d.abs().max())):
            raise RuntimeError(f"{name}: the logged solution is not the patch's matrix")
    patch.meta["_reduced"] = factors
    return patch


def _truncations_reduced(self, ranks):
    factors = self.meta["_reduced"]
    meta = {k: v for k, v in self.meta.items() if k != "_reduced"}
    out = []
    for rank in ranks:
        deltas = dict(self.deltas)
        for name, (M, V, W) in factors.items():
            low = M @ V[:, :rank] @ V[:, :rank].T
            if W is not None:
                low = low @ W
            deltas[name] = low.reshape(self.deltas[name].shape).to(self.deltas[name].dtype)
        out.append(ThoughtPatch(deltas=deltas, steering=dict(self.steering), meta={**meta, "truncated_rank": rank}))
    return out


def _fit_blockwise(model, chunk, examples, **options):
    patch = _fit(model, chunk, examples, **options)
    if options.get("fit") == "both":  # the thought patch: its candidates are fits at rank k
        def refit(rank):
            _state["rank"] = rank
            try:
                return _fit(model, chunk, examples, **{k: v for k, v in options.items() if k != "_full_stream"})
            finally:
                _state["rank"] = None
        patch.meta["_refit"] = refit
    return patch


def _truncations_blockwise(self, ranks):
    out = []
    for rank in ranks:
        fitted = self.meta["_refit"](rank)
        out.append(ThoughtPatch(deltas=fitted.deltas, steering=dict(self.steering),
                                meta={**fitted.meta, "truncated_rank": rank}))
    return out


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in VARIANTS:
        print(__doc__)
        print(f"first argument: one of {VARIANTS}")
        return 2
    variant, rest = argv[0], list(argv[1:])
    if "--jobs" in rest and rest[rest.index("--jobs") + 1] != "1":
        raise SystemExit("--jobs must be 1: worker processes would not see this script's changes")
    if "--jobs" not in rest:
        rest += ["--jobs", "1"]
    pinned = {"--queries": [str(SUITE_150["n_queries"])], "--ridge": [str(SUITE_150["ridge"])],
              "--ranks": [str(r or 0) for r in SUITE_150["ranks"]]}  # the options its rows were measured at
    for flag, values in pinned.items():
        if not any(a == flag or a.startswith(flag + "=") for a in rest):
            rest += [flag, *values]
    if variant == "reduced":
        th._Regression.solve, th.fit_thought, ThoughtPatch.truncations = (
            _solve_logged, _fit_reduced, _truncations_reduced)
    else:
        th._Regression.solve, th.fit_thought, ThoughtPatch.truncations = (
            _solve_truncated, _fit_blockwise, _truncations_blockwise)
    from tl_thoughts.cli import main as cli_main

    return cli_main(["eval", *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
