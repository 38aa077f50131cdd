"""Benchmark: memory of extracting the implicit updates of a 2,048-token prompt on SmolLM2.

Each phase runs in a fresh process (so that each peak is its own) and prints the process's peak
resident memory (``ru_maxrss``), model and Python included:

  baseline   load the model, one plain forward pass of the prompt;
  streamed   ``implicit_updates``: every layer, every kept position (bar: <= 8 GB);
  subset     ``implicit_updates(..., layers=range(5), positions=<last 16>)``;
  cached     for contrast, the non-streamed way: ``run_with_cache`` of every pattern, value,
             ``hook_z`` and MLP input, then ``updates_from_cache`` (skipped with --no-cached).

Run: .venv/bin/python benchmarks/bench_long.py [--pos 2048] [--no-cached]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

PHASES = ("baseline", "streamed", "subset", "cached")


def _prompt_tokens(model, n_pos: int):
    from tl_thoughts.prompts import PromptCase, chat_prompt

    body = " ".join(f"The {i}th line of the ledger records {i * 7 % 101} barrels." for i in range(600))
    case = PromptCase("long", "Keep this ledger in mind and answer questions about it.", body)
    tokens = model.to_tokens(chat_prompt(model, case), truncate=False)[:, :n_pos]
    assert tokens.shape[1] == n_pos, f"prompt too short: {tokens.shape[1]} tokens"
    return tokens, case.chunk


def run_phase(phase: str, n_pos: int) -> dict:
    import torch

    import tl_thoughts as tt
    from tl_thoughts import _tl
    from tl_thoughts.chunks import resolve_chunk
    from tl_thoughts.models import load_default_model
    from tl_thoughts.updates import updates_from_cache

    torch.set_grad_enabled(False)
    model = load_default_model(n_ctx=max(2048, n_pos))
    tokens, chunk = _prompt_tokens(model, n_pos)
    t0 = time.perf_counter()
    out: dict = {"phase": phase, "pos": n_pos}
    if phase == "baseline":
        model(tokens, attention_mask=torch.ones_like(tokens))
    elif phase == "streamed":
        updates = tt.implicit_updates(model, tokens, chunk)
        out["shape"] = list(updates.head_vectors.shape)
    elif phase == "subset":
        span = resolve_chunk(model, tokens, chunk)
        updates = tt.implicit_updates(model, tokens, chunk, layers=range(5), positions=span.positions[-16:])
        out["shape"] = list(updates.head_vectors.shape)
    else:
        spec = _tl.model_spec(model)
        names = [n for layer in range(spec.n_layers) for n in (
            _tl.pattern_name(layer), _tl.v_name(layer), _tl.z_name(layer), _tl.mlp_input_resid_name(spec, layer))]
        _, cache = _tl.forward(model, tokens, cache_names=names)
        updates = updates_from_cache(model, tokens, resolve_chunk(model, tokens, chunk), cache)
        out["shape"] = list(updates.head_vectors.shape)
    out["seconds"] = time.perf_counter() - t0
    out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pos", type=int, default=2048)
    parser.add_argument("--no-cached", action="store_true", help="skip the non-streamed contrast")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.pos)))
        return
    phases = [p for p in PHASES if not (args.no_cached and p == "cached")]
    print(f"SmolLM2-135M-Instruct, {args.pos}-token prompt, float32; peak resident memory of a fresh "
          "process per phase (model and Python included)")
    results = {}
    for phase in phases:
        done = subprocess.run([sys.executable, __file__, "--phase", phase, "--pos", str(args.pos)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{phase:<9} failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results[phase] = r
        shape = f"head_vectors {r['shape']}" if "shape" in r else "logits only"
        print(f"{phase:<9} peak {r['peak_gb']:6.2f} GB   {r['seconds']:6.1f} s   {shape}")
    if "streamed" in results:
        peak = results["streamed"]["peak_gb"]
        print(f"\nstreamed extraction at {args.pos} tokens: peak {peak:.2f} GB (bar <= 8 GB): "
              f"{'met' if peak <= 8 else 'NOT met'}")
        if "baseline" in results:
            print(f"above the plain forward pass: {peak - results['baseline']['peak_gb']:.2f} GB")


if __name__ == "__main__":
    main()
