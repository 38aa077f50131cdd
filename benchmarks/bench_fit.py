"""Benchmark: the cost of fitting a thought patch on SmolLM2, as a ratio to one full plus one reduced
forward pass over the same examples, as the number of fitted layers grows; and the speed-up over
the naive Algorithm 1 that re-runs the reduced prompts through the model once per fitted layer.

Prints, measured in this one run (medians over repeats):
  - t_pass: one full + one reduced forward pass over the examples (same batching, plain calls);
  - for k fitted layers spread over the depth: fit time / t_pass (target <= 3, flat in k), with
    and without the steering comparison stream;
  - the naive method's time for the same fit and the speed-up, with the largest difference
    between the two methods' thought matrices (they compute the same thing).

Run: .venv/bin/python benchmarks/bench_fit.py [--examples 32] [--repeats 3]
"""

import argparse

import torch
from _timing import timed

import tl_thoughts as tt
from tl_thoughts import _tl
from tl_thoughts.models import load_default_model
from tl_thoughts.templates import encode_example
from tl_thoughts.thoughts import ridge_solve

CHUNK = "walk -> walked\ngo -> went\neat -> ate\nsee -> saw\ntake -> took"
VERBS = (
    "run ran|write wrote|sing sang|jump jumped|drink drank|buy bought|make made|fly flew|swim swam|"
    "give gave|come came|think thought|speak spoke|drive drove|break broke|choose chose|begin began|"
    "forget forgot|play played|talk talked|open opened|cook cooked|dance danced|teach taught|"
    "catch caught|sleep slept|keep kept|feel felt|leave left|meet met|send sent|build built"
)
TEMPLATE = tt.PromptTemplate("<|im_start|>{chunk}{query} ->", separator="\n")



def pad(seqs):
    out = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def naive_fit(model, examples, layers, ridge, bs):
    """Algorithm 1 by re-running: for each fitted layer, the reduced prompts go through the whole
    model again under the patches fitted so far (vector on b_out, residual target, pool 'kept'),
    in the same padded batches as the streamed fit."""
    spec = _tl.model_spec(model)
    enc = [encode_example(model, TEMPLATE, CHUNK, ex) for ex in examples]
    batches = [enc[i : i + bs] for i in range(0, len(enc), bs)]

    def rows(cache, name, batch, reduced):
        out = []
        for i, e in enumerate(batch):
            pos = e.pooled("kept")
            out.append(cache[name][i, e.to_reduced(pos) if reduced else pos])
        return torch.cat(out)

    full = []
    for batch in batches:
        _, c = model.run_with_cache(pad([e.full for e in batch]), names_filter=[_tl.mlp_input_resid_name(spec, l) for l in layers])
        full.append(c)
    deltas: dict[str, torch.Tensor] = {}
    n = sum(len(e.pooled("kept")) for e in enc)
    for layer in layers:
        patch = tt.ThoughtPatch(deltas=dict(deltas), meta={})
        AtA = torch.zeros(spec.d_model, spec.d_model, dtype=torch.float64)
        AtU = {k: torch.zeros(spec.d_model, spec.d_mlp, dtype=torch.float64) for k in spec.mlp_input_matrices}
        total = torch.zeros(spec.d_model, dtype=torch.float64)
        with _tl.swapped_tensors(model, patch.parameters(model)):
            for batch, fc in zip(batches, full):
                _, rc = model.run_with_cache(pad([e.reduced for e in batch]), names_filter=[_tl.mlp_input_resid_name(spec, layer)])
                r_full = rows(fc, _tl.mlp_input_resid_name(spec, layer), batch, False)
                r_red = rows(rc, _tl.mlp_input_resid_name(spec, layer), batch, True)
                total += (r_full - r_red).double().sum(0)
                a = _tl.mlp_norm(model, layer, r_red).double()
                a_c = _tl.mlp_norm(model, layer, r_full).double()
                AtA += a.T @ a
                for k in AtU:
                    AtU[k] += a.T @ ((a_c - a) @ _tl.mlp_matrix(model, layer, k).double())
        deltas[_tl.param_name(layer, "b_out")] = (total / n).to(spec.dtype)
        for k in AtU:
            deltas[_tl.param_name(layer, k)] = ridge_solve(AtA, AtU[k], ridge, n).to(spec.dtype)
    return deltas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_default_model()
    spec = _tl.model_spec(model)
    pairs = [tuple(p.split()) for p in VERBS.split("|")][: args.examples]
    examples = [(q, " " + a) for q, a in pairs]
    enc = [encode_example(model, TEMPLATE, CHUNK, ex) for ex in examples]
    bs = args.batch_size

    def passes():
        for i in range(0, len(enc), bs):
            model(pad([e.full for e in enc[i : i + bs]]))
            model(pad([e.reduced for e in enc[i : i + bs]]))

    passes()  # warm-up
    t_pass, _ = timed(passes, args.repeats)
    n_tok = sum(len(e.full) for e in enc)
    print(
        f"SmolLM2-135M-Instruct, {len(examples)} (query, answer) examples, {n_tok} tokens with the "
        f"chunk, batch {bs}; torch threads {torch.get_num_threads()}; medians of {args.repeats}"
    )
    print(f"one full + one reduced forward pass over the examples: {t_pass:.2f} s")
    print()
    print("fitted layers | fit (s) | fit / passes | fit without steering stream / passes")
    for k in (1, 4, 8, 15, 30):
        layers = sorted({round(x) for x in torch.linspace(spec.n_layers - 1, 0, k).tolist()})
        def fit(steer: bool, layers: list[int] = layers) -> tt.ThoughtPatch:
            config = tt.FitConfig(layers=tuple(layers), ridge=1.0, batch_size=bs, compare_steering=steer)
            return tt.fit_thought(model, CHUNK, examples, config, template=TEMPLATE, progress=False)

        t_fit, _ = timed(lambda fit=fit: fit(True), args.repeats)
        t_fit_ns, _ = timed(lambda fit=fit: fit(False), args.repeats)
        print(f"{len(layers):>13} | {t_fit:7.2f} | {t_fit / t_pass:12.2f} | {t_fit_ns / t_pass:10.2f}")
    # naive Algorithm 1, all layers (one re-run of the reduced prompts per fitted layer)
    layers = list(range(spec.n_layers))
    t_naive, naive = timed(lambda: naive_fit(model, examples, layers, 1.0, bs), 1)
    t_ours, ours = timed(
        lambda: tt.fit_thought(model, CHUNK, examples, tt.FitConfig(ridge=1.0, batch_size=bs, compare_steering=False),
                               template=TEMPLATE, progress=False),
        args.repeats,
    )
    diff = max(float((naive[k] - ours.deltas[k]).abs().max() / ours.deltas[k].abs().max()) for k in naive)
    print()
    print(f"naive (re-run per layer), {len(layers)} layers: {t_naive:.2f} s; streamed: {t_ours:.2f} s")
    print(f"speed-up over re-running once per layer = {t_naive / t_ours:.1f}x")
    print(f"max relative difference between the two fits' deltas = {diff:.2e}")


if __name__ == "__main__":
    main()
