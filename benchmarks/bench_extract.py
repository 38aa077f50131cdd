"""Benchmark: cost of extracting every layer's implicit update, on SmolLM2 and a 128-token prompt.

Prints, measured in this one run (medians over repeats):
  (a) the extraction arithmetic (everything after the cached forward pass: `updates_from_cache`)
      as a ratio to the cached forward pass itself (target <= 0.25); and, for the streamed
      `implicit_updates` (hooks reduce each block's attention during one forward pass, no cache),
      its cost above a plain forward pass as a ratio to that pass;
  (b) the speed-up of `implicit_updates` over the naive exact method that re-runs the reduced
      prompt once per layer, each run patched with the layers below (target >= 10x), with the
      largest difference between the two methods' vectors.

Run: .venv/bin/python benchmarks/bench_extract.py [--pos 128] [--repeats 7] [--threads 1]
On TransformerLens 4 (a TransformerBridge over the same checkpoint):
     .venv-tl4/bin/python benchmarks/bench_extract.py --backend bridge
"""

import argparse

import torch
from _backends import BACKENDS, load_model
from _timing import timed

import tl_thoughts as tt
from tl_thoughts import _tl
from tl_thoughts.chunks import resolve_chunk
from tl_thoughts.prompts import PromptCase, chat_prompt
from tl_thoughts.updates import updates_from_cache

STORY = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who told "
    "stories to the children every evening. He spoke of storms and stars, of whales that sang, "
    "and of a lighthouse whose keeper never slept. The children listened, and the sea listened "
    "too, and every night the tide carried his words far away across the water to other shores "
    "where other children were waiting to hear them."
)


def naive_vectors(model, tokens, span) -> torch.Tensor:
    """Exact vectors by re-running the reduced prompt once per layer (the method to beat)."""
    spec = _tl.model_spec(model)
    kept = span.kept_positions
    names = [_tl.attn_out_name(layer) for layer in range(spec.n_layers)]
    _, full = _tl.forward(model, tokens, cache_names=names)
    reduced = tokens[:, kept]
    rows = torch.arange(span.start, kept.shape[0])
    vectors: list[torch.Tensor] = []
    with _tl.original_positions(model, spec, kept):
        for layer in range(spec.n_layers):
            hooks = [
                (_tl.attn_out_name(i), _tl.add_at_rows_hook(rows, vectors[i])) for i in range(layer)
            ]
            name = _tl.attn_out_name(layer)
            _, red = _tl.forward(model, reduced, fwd_hooks=hooks, cache_names=[name])
            vectors.append(full[name][span.positions] - red[name][rows])
    return torch.stack(vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backend", choices=BACKENDS, default="hooked")
    parser.add_argument("--skip-naive", action="store_true", help="skip (b), the naive method")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 is steadier on a machine shared with other jobs")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(args.backend)
    case = PromptCase("bench", "Summarise the story below in one sentence, in French.", STORY * 4)
    tokens = model.to_tokens(chat_prompt(model, case))[:, : args.pos]
    assert tokens.shape[1] == args.pos, f"prompt too short: {tokens.shape[1]} tokens"
    span = resolve_chunk(model, tokens, case.chunk)
    spec = _tl.model_spec(model)
    names = [
        n
        for layer in range(spec.n_layers)
        for n in (
            _tl.pattern_name(layer),
            _tl.v_name(layer),
            _tl.z_name(layer),
            _tl.mlp_input_resid_name(spec, layer),
        )
    ]
    print(
        f"SmolLM2-135M-Instruct ({type(model).__name__}), {spec.n_layers} layers, {args.pos}-token prompt, chunk "
        f"positions {span.start}..{span.stop - 1}, {len(span.positions)} kept positions after it; "
        f"torch threads {torch.get_num_threads()}, {args.repeats} repeats (median)"
    )
    timed(lambda: model(tokens), 2)  # warm-up
    t_plain, _ = timed(lambda: model(tokens, attention_mask=torch.ones_like(tokens)), args.repeats)
    t_cached, (_, cache) = timed(
        lambda: _tl.forward(model, tokens, cache_names=names), args.repeats
    )
    t_math, _ = timed(lambda: updates_from_cache(model, tokens, span, cache), args.repeats)
    t_total, updates = timed(lambda: tt.implicit_updates(model, tokens, case.chunk), args.repeats)
    if not args.skip_naive:
        t_naive, naive = timed(lambda: naive_vectors(model, tokens, span), max(2, args.repeats // 3))
        diff = float((naive - updates.vectors).abs().max())
    print(f"plain forward pass              {1e3 * t_plain:8.1f} ms")
    print(f"cached forward pass             {1e3 * t_cached:8.1f} ms")
    print(f"extraction after the cache      {1e3 * t_math:8.1f} ms")
    print(f"implicit_updates (end to end)   {1e3 * t_total:8.1f} ms")
    if not args.skip_naive:
        print(f"naive: one re-run per layer     {1e3 * t_naive:8.1f} ms")
    print()
    print(f"(a) extraction / cached forward pass    = {t_math / t_cached:.3f}   (target <= 0.25)")
    print(f"    streamed implicit_updates: (total - plain forward) / plain forward = "
          f"{(t_total - t_plain) / t_plain:.3f}")
    if not args.skip_naive:
        print(f"(b) speed-up over the naive method      = {t_naive / t_total:.1f}x  (target >= 10x)")
        print(f"    max |naive - implicit_updates| vectors = {diff:.2e}")


if __name__ == "__main__":
    main()
