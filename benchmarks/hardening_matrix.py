"""The hardening table of docs/hardening.md: what was tried, how many cases, how many failures,
and the worst error seen per dtype.

1. Exactness: every tiny architecture of the test matrix (tests/helpers.py) x chunk layouts (at the
   start, after a 1-token prefix, in the middle, two chunks) x kept tokens after the last chunk
   (1, 5) x precision modes x batch shapes (alone; in a batch of three prompts of different
   lengths, left- and right-padded). Each case verifies the activation and the weight form against
   the full run; a batched case also compares its updates with the prompt's own. A case fails if
   an error exceeds the tolerance of its compute dtype (float64: 1e-10; float32: 1e-3) or if
   anything raises other than a documented ZeroDenominatorError of the weight form, which is
   counted apart.
2. Bad inputs: each must raise its documented error and leave the model bit-identical, hook-free.
3. Damaged patch files, foreign models and bad save paths: each must be refused.
4. Bad arguments: every row of tests/test_arguments.CASES (a public function given an argument of
   the wrong type or value) must raise the library's own error naming the argument, models untouched.
5. The command line: each bad option of `tl-thoughts eval` (tests/test_cli.BAD_OPTIONS, a missing
   task file, a task path that is a folder) must print one `error:` line and exit 2 before any
   model is loaded.
6. Patch applications: random sequences of attach (weight or activation form), remove (any handle)
   and merge_into of three patches, checked after every step (tests/helpers.run_patch_sequence):
   the model's own parameters plus the weight-form deltas still applied, a second application
   refused, the model's own tensors at the end.

Run: .venv/bin/python benchmarks/hardening_matrix.py [--out docs/hardening_table.md]
"""

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tl_thoughts as tt  # noqa: E402
from tl_thoughts import analysis  # noqa: E402
from tl_thoughts.tasks import TaskFormatError, load_task  # noqa: E402
from helpers import (  # noqa: E402
    ARCHITECTURES,
    D_VOCAB,
    assert_model_untouched,
    make_model,
    make_word_tokenizer,
    param_snapshot,
    run_patch_sequence,
    runtime_checks_off,
)

LAYOUTS = {"start": [slice(0, 4)], "bos": [slice(1, 5)], "middle": [slice(4, 8)],
           "two_chunks": [slice(1, 3), slice(5, 7)]}
N_AFTER = (1, 5)
# precision mode: (model dtype, dtype asked for, compute dtype)
MODES = {
    "float64": (torch.float64, None, torch.float64),
    "float32 model, float64 mode": (torch.float32, torch.float64, torch.float64),
    "float32": (torch.float32, None, torch.float32),
    "bfloat16 model (computed in float32)": (torch.bfloat16, None, torch.float32),
    "float16 model (computed in float32)": (torch.float16, None, torch.float32),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-3}
BATCHES = ("alone", "batch, left-padded", "batch, right-padded")


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(D_VOCAB, generator=torch.Generator().manual_seed(seed))[:n]


def exactness() -> tuple[list[dict], dict]:
    rows = []
    worst = {m: 0.0 for m in MODES}
    for arch in ARCHITECTURES:
        for mode, (model_dtype, ask, compute) in MODES.items():
            model = make_model(arch, dtype=model_dtype)
            snapshot = param_snapshot(model)
            for layout, chunk in LAYOUTS.items():
                for n_after in N_AFTER:
                    n = chunk[-1].stop + n_after
                    chunk_spec = chunk[0] if len(chunk) == 1 else chunk
                    tokens = _tokens(n, seed=n + 31 * chunk[0].start)
                    others = [_tokens(n + 3, seed=1), _tokens(max(n - 2, 5), seed=2)]
                    other_chunks = [slice(1, 3), slice(0, 2)]
                    for batch in BATCHES:
                        rows.append(_case(model, arch, mode, layout, n_after, batch, tokens, chunk_spec,
                                          others, other_chunks, ask, compute))
                        worst[mode] = max(worst[mode], rows[-1]["error"])
            assert_model_untouched(model, snapshot)
    return rows, worst


def _case(model, arch, mode, layout, n_after, batch, tokens, chunk, others, other_chunks, ask, compute):
    row = dict(arch=arch, mode=mode, layout=layout, n_after=n_after, batch=batch, error=0.0,
               status="exact", detail="")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tt.PrecisionWarning)
            if batch == "alone":
                updates = tt.implicit_updates(model, tokens[None], chunk, dtype=ask)
            else:
                side = "left" if "left" in batch else "right"
                batch_updates = tt.implicit_updates_batch(
                    model, [others[0], tokens, others[1]], [other_chunks[0], chunk, other_chunks[1]],
                    padding_side=side, dtype=ask)
                updates = batch_updates[1]
                alone = tt.implicit_updates(model, tokens[None], chunk, dtype=ask)
                row["error"] = float((updates.vectors - alone.vectors).abs().max())
        assert updates.dtype == compute
        report = tt.verify(model, updates, forms=("activation",))
        row["error"] = max(row["error"], report.max_abs_logit_error)
        try:
            weight = tt.verify(model, updates, forms=("weight",))
            row["error"] = max(row["error"], weight.max_abs_logit_error)
        except tt.ZeroDenominatorError as e:
            row["status"], row["detail"] = "weight form refused", str(e)[:80]
        if row["error"] > TOL[compute] or report.argmax_agreement < 1.0:
            row["status"], row["detail"] = "FAILED", f"error {row['error']:.2e}"
    except Exception as e:  # noqa: BLE001 (a failure of the table, reported)
        row["status"], row["detail"] = "FAILED", f"{type(e).__name__}: {e}"[:120]
    return row


def bad_inputs() -> list[dict]:
    model = make_model("ln_gelu_learned")
    text = make_model("rms_gated_silu_rotary_gqa", tokenizer=make_word_tokenizer())
    toks = _tokens(10, 0)[None]
    hooked = make_model("ln_gelu_learned")
    hooked.add_hook("blocks.0.hook_attn_out", lambda a, hook: None)
    raw_hooked = make_model("ln_gelu_learned")
    raw_handles = [raw_hooked.blocks[1].mlp.register_forward_hook(lambda mod, args, out: out * 2),
                   raw_hooked.blocks[0].attn.register_forward_pre_hook(lambda mod, args, kwargs: None, with_kwargs=True)]
    stale_half = make_model("ln_gelu_learned", dtype=torch.float32).half()  # cfg.dtype left float32
    stale_double = make_model("ln_gelu_learned", dtype=torch.float32).double()
    mixed = make_model("ln_gelu_learned", dtype=torch.float32)
    mixed.blocks[1].half()
    long_text = " ".join(["the cat sat on the mat ."] * 12)  # 84 tokens, n_ctx 64
    pairs = [(" sat on", " the mat"), (" ran on", " a mat")]
    template = tt.PromptTemplate("{chunk}{query}", separator="")
    patch = tt.fit_thought(text, "the cat", pairs, template=template, progress=False)
    tasks_dir = Path(tt.__file__).parent / "tasks" / "data"
    cases = {
        "empty string prompt": (text, lambda m: tt.implicit_updates(m, "", slice(0, 1)), tt.InputError),
        "text given to a model without tokenizer": (model, lambda m: tt.implicit_updates(m, "the cat", slice(0, 1)), tt.InputError),
        "substring chunk on a model without tokenizer": (model, lambda m: tt.implicit_updates(m, toks, "cat"), tt.InputError),
        "unicode prompt, chunk not in it": (text, lambda m: tt.implicit_updates(m, "the cat ☃ sat", "dog"), tt.ChunkError),
        "chunk equal to the whole prompt": (model, lambda m: tt.implicit_updates(m, toks, slice(None)), tt.ChunkError),
        "empty chunk": (model, lambda m: tt.implicit_updates(m, toks, slice(3, 3)), tt.ChunkError),
        "chunk out of range": (model, lambda m: tt.implicit_updates(m, toks, slice(5, 40)), tt.ChunkError),
        "chunk covering the end": (model, lambda m: tt.implicit_updates(m, toks, slice(5, 10)), tt.ChunkError),
        "overlapping chunks": (model, lambda m: tt.implicit_updates(m, toks, [slice(1, 4), slice(3, 6)]), tt.ChunkError),
        "repeated positions": (model, lambda m: tt.implicit_updates(m, toks, [2, 2, 3]), tt.ChunkError),
        "ambiguous tuple chunk": (model, lambda m: tt.implicit_updates(m, toks, (2, 5)), tt.ChunkError),
        "substring found twice": (text, lambda m: tt.implicit_updates(m, "the cat sat on the mat", "the"), tt.ChunkError),
        "substring cutting a token": (text, lambda m: tt.implicit_updates(m, "the cat sat on the mat", "at s"), tt.ChunkError),
        "token id >= d_vocab": (model, lambda m: tt.implicit_updates(m, torch.tensor([[1, D_VOCAB, 2, 3]]), slice(0, 1)), tt.InputError),
        "negative token id": (model, lambda m: tt.implicit_updates(m, torch.tensor([[1, -1, 2, 3]]), slice(0, 1)), tt.InputError),
        "float tokens": (model, lambda m: tt.implicit_updates(m, toks.double(), slice(0, 1)), tt.InputError),
        "3-d tokens": (model, lambda m: tt.implicit_updates(m, toks[None], slice(0, 1)), tt.InputError),
        "batch given to implicit_updates": (model, lambda m: tt.implicit_updates(m, toks.repeat(2, 1), slice(0, 1)), tt.InputError),
        "prompt longer than n_ctx": (model, lambda m: tt.implicit_updates(m, torch.zeros(1, 80, dtype=torch.long), slice(0, 1)), tt.InputError),
        "mask that is not padding": (model, lambda m: tt.implicit_updates_batch(m, toks.reshape(2, 5), slice(0, 1), attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1] * 5])), tt.InputError),
        "chunk list of the wrong length": (model, lambda m: tt.implicit_updates_batch(m, [toks[0], toks[0, :6]], [slice(0, 1)]), tt.InputError),
        "layers out of range": (model, lambda m: tt.implicit_updates(m, toks, slice(2, 4), layers=[7]), tt.InputError),
        "positions before the chunk": (model, lambda m: tt.implicit_updates(m, toks, slice(2, 4), positions=[1]), tt.InputError),
        "float16 compute dtype": (model, lambda m: tt.implicit_updates(m, toks, slice(2, 4), dtype=torch.float16), tt.InputError),
        "model with a hook attached": (hooked, lambda m: tt.implicit_updates(m, toks, slice(2, 4)), tt.InputError),
        "alibi positions": (make_model("ln_gelu_learned", positional_embedding_type="alibi"), lambda m: tt.implicit_updates(m, toks, slice(2, 4)), tt.UnsupportedArchitectureError),
        "local attention, a key back in the window": (make_model("ln_gelu_learned", use_local_attn=True, window_size=4, attn_types=["global", "local"]), lambda m: tt.implicit_updates(m, toks, slice(2, 4)), tt.InputError),
        "mixture of experts": (make_model("rms_gated_silu_rotary_gqa", num_experts=2, experts_per_token=1), lambda m: tt.implicit_updates(m, toks, slice(2, 4)), tt.UnsupportedArchitectureError),
        "thought patch on a post-norm model, residual target": (make_model("olmo2_rms_gated_silu_rotary", tokenizer=make_word_tokenizer()), lambda m: tt.fit_thought(m, "the cat", [" sat"], tt.FitConfig(), progress=False), tt.InputError),
        "more kept tokens than d_model (weight form)": (make_model("ln_gelu_learned"), lambda m: tt.verify(m, tt.implicit_updates(m, _tokens(45, 3)[None], slice(2, 4)), forms=("weight",)), tt.ZeroDenominatorError),
        "verify on a subset of layers": (model, lambda m: tt.verify(m, tt.implicit_updates(m, toks, slice(2, 4), layers=[0])), tt.InputError),
        # issue 33: nothing silently wrong
        "text prompt longer than n_ctx (was cut silently)": (text, lambda m: tt.implicit_updates(m, long_text, slice(2, 4)), tt.InputError),
        "fit example longer than n_ctx": (text, lambda m: tt.fit_thought(m, "the cat", [(" sat", " " + long_text)], template=template, progress=False), tt.InputError),
        "raw torch forward hook and pre-hook": (raw_hooked, lambda m: tt.implicit_updates(m, toks, slice(2, 4)), tt.InputError),
        "model.half() with a stale cfg.dtype": (stale_half, lambda m: tt.implicit_updates(m, toks, slice(2, 4)), tt.InputError),
        "model.double() with a stale cfg.dtype": (stale_double, lambda m: tt.implicit_updates(m, toks, slice(2, 4)), tt.InputError),
        "parameters of mixed dtypes": (mixed, lambda m: tt.implicit_updates(m, toks, slice(2, 4)), tt.InputError),
        "ints as examples": (text, lambda m: tt.fit_thought(m, "the cat", [1, 2], progress=False), tt.ArgumentTypeError),
        "an int as the examples": (text, lambda m: tt.fit_thought(m, "the cat", 5, progress=False), tt.ArgumentTypeError),
        "an example that is not a pair": (text, lambda m: tt.fit_thought(m, "the cat", [(" sat",)], progress=False), tt.ArgumentTypeError),
        "ridge=nan": (text, lambda m: tt.fit_thought(m, "the cat", pairs, tt.FitConfig(ridge=float("nan")), progress=False), tt.InputError),
        "ridge=inf": (text, lambda m: tt.fit_thought(m, "the cat", pairs, tt.FitConfig(ridge=float("inf")), progress=False), tt.InputError),
        "refine with lr=inf (NaN deltas before)": (text, lambda m: tt.refine_thought(m, patch, pairs, lr=float("inf"), progress=False), tt.InputError),
        "refine with steps=-1": (text, lambda m: tt.refine_thought(m, patch, pairs, steps=-1, progress=False), tt.InputError),
        "FitConfig(layers=5)": (model, lambda m: tt.FitConfig(layers=5), tt.ArgumentTypeError),
        "analysis on updates=None": (model, lambda m: analysis.layer_recovery(m, None, (3, 4)), tt.ArgumentTypeError),
        "template without placeholders": (model, lambda m: tt.PromptTemplate("no placeholders"), tt.InputError),
        "task path is a directory": (model, lambda m: load_task(tasks_dir), TaskFormatError),
        "verify with another model's updates": (model, lambda m: tt.verify(m, tt.implicit_updates(make_model("ln_gelu_learned", seed=1), toks, slice(2, 4))), tt.InputError),
        "verify after the weights changed since": (text, lambda m: _verify_after_patch(m, patch), tt.InputError),
        "the same patch applied twice (nested)": (text, lambda m: _nested(m, patch, patch), tt.InputError),
        "a loaded copy applied with the patch": (text, lambda m: _nested(m, patch, _copy(patch)), tt.InputError),
    }
    rows = []
    for name, (m, call, error) in cases.items():
        had_hooks = name == "model with a hook attached"
        snapshot = param_snapshot(m)
        status = "refused as documented"
        try:
            with runtime_checks_off():
                call(m)
            status = "FAILED: no error"
        except error:
            pass
        except Exception as e:  # noqa: BLE001
            status = f"FAILED: {type(e).__name__}: {e}"[:100]
        if had_hooks:
            m.reset_hooks(including_permanent=True)
        if m is raw_hooked:  # the user's raw hooks stay on after the refusal; removed here
            for handle in raw_handles:
                handle.remove()
        rows.append(dict(case=name, expected=error.__name__, status=_untouched(status, [(m, snapshot)])))
    return rows


def _untouched(status: str, snapshots: list) -> str:
    """``status``, or a failure if a model differs from its snapshot (values, objects, hooks)."""
    for m, snapshot in snapshots:
        try:
            assert_model_untouched(m, snapshot)
        except AssertionError as e:
            return f"FAILED: model changed ({e})"[:100]
    return status


def _verify_after_patch(model, patch):
    updates = tt.implicit_updates(model, model.to_tokens("the cat sat on the mat"), "cat")
    with patch.apply(model):
        tt.verify(model, updates)


def _nested(model, patch, again):
    with patch.apply(model), again.apply(model, "activation"):
        pass


def _copy(patch):
    with tempfile.TemporaryDirectory() as tmp:
        return tt.ThoughtPatch.load(patch.save(Path(tmp) / "p.safetensors"))


def patch_applications(n: int = 300, seed: int = 0) -> dict:
    """``n`` random sequences of up to 10 attach / remove / merge steps on three patches."""
    import random

    rng = random.Random(seed)
    make = lambda: make_model("ln_gelu_learned", tokenizer=make_word_tokenizer())  # noqa: E731
    model = make()
    template = tt.PromptTemplate("{chunk}{query}", separator="")
    pairs = [(" the dog", " ran"), (" a big red hat", " sat")]
    first = tt.fit_thought(model, "the cat sat on the mat and", pairs, template=template, progress=False)
    second = tt.fit_thought(model, "a big red hat and", pairs, template=template, progress=False)
    patches = [first, second, first.only("vectors")]
    counts = dict(sequences=n, steps=0, merges=0, problems=[])
    for _ in range(n):
        ops = []
        for _ in range(rng.randint(1, 10)):
            op = rng.choice(["attach", "attach", "remove", "remove", "merge"])
            ops.append((op, rng.randrange(6 if op == "remove" else 3), rng.choice(["weight", "activation"])))
        finish = rng.sample(range(10), 10)
        counts["steps"] += len(ops)
        counts["merges"] += sum(op == "merge" for op, _, _ in ops)
        counts["problems"] += run_patch_sequence(make(), patches, ops, finish)
    return counts


def bad_arguments() -> list[dict]:
    """Every row of ``tests/test_arguments.CASES``, run as users run the library (no runtime type
    checks): the expected ``TLThoughtsError`` subclass, the argument named, models untouched."""
    from test_arguments import CASES, Ctx

    ctx = Ctx()
    rows = []
    for name, (call, error, word) in CASES.items():
        snapshots = [(m, param_snapshot(m)) for m in (ctx.model, ctx.text)]
        try:
            with runtime_checks_off():
                call(ctx)
            status = "FAILED: no error"
        except error as e:
            status = "refused as documented" if word in str(e) and isinstance(e, tt.TLThoughtsError) \
                else f"FAILED: message without {word!r}"
        except Exception as e:  # noqa: BLE001
            status = f"FAILED: {type(e).__name__}: {e}"[:100]
        rows.append(dict(case=name, expected=error.__name__, status=_untouched(status, snapshots)))
    return rows


def command_line() -> list[dict]:
    """``tl-thoughts eval`` with each bad option, the model loader and the evaluation replaced by a
    function that records a call: refused in one line, exit status 2, nothing loaded."""
    import contextlib
    import io

    from test_cli import BAD_OPTIONS

    from tl_thoughts import cli, models
    from tl_thoughts.evaluation import protocol

    loaded = []
    saved = (models.load_default_model, protocol.evaluate_task, protocol.evaluate_in_processes)
    models.load_default_model = protocol.evaluate_task = protocol.evaluate_in_processes = \
        lambda *a, **k: loaded.append(1)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = {"name": "a", "chunk": "a -> b\n", "queries": ["q0", "q1"],
                    "examples": [{"query": f"a{i}", "answer": f"x{i}"} for i in range(60)]}
            (tmp / "a.json").write_text(json.dumps(data))
            (tmp / "FILE").write_text("not a folder")
            cases = [(" ".join(options), ["--task", str(tmp / "a.json"), "--queries", "0",
                                          *[str(tmp / "FILE") if o == "FILE" else o for o in options]])
                     for options, _ in BAD_OPTIONS]
            cases += [("--task naming a missing file", ["--task", str(tmp / "missing.json")]),
                      ("--task naming a folder", ["--task", str(tmp)])]
            for name, argv in cases:
                loaded.clear()
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    code = cli.main(["eval", "--out", str(tmp / "out"), *argv])
                text = err.getvalue()
                ok = code == 2 and text.startswith("error: ") and text.count("\n") == 1 and not loaded
                rows.append(dict(case=f"eval {name}", expected="one `error:` line, exit 2",
                                 status="refused as documented" if ok else f"FAILED: exit {code}, {text[:80]!r}"))
    finally:
        models.load_default_model, protocol.evaluate_task, protocol.evaluate_in_processes = saved
    return rows


def damaged_files() -> list[dict]:
    model = make_model("rms_gated_silu_rotary_gqa", tokenizer=make_word_tokenizer())
    patch = tt.fit_thought(model, "the cat sat on the mat and", [(" the dog", " ran")],
                           template=tt.PromptTemplate("{chunk}{query}", separator=""), progress=False)
    other = make_model("rms_gated_silu_rotary_gqa", seed=1, tokenizer=make_word_tokenizer())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = patch.save(Path(tmp) / "p.safetensors")
        good = path.read_bytes()
        header_len = int.from_bytes(good[:8], "little")

        def edit_meta(change):
            header = json.loads(good[8 : 8 + header_len])
            meta = json.loads(header["__metadata__"]["tl_thoughts"])
            change(meta)
            header["__metadata__"]["tl_thoughts"] = json.dumps(meta)
            new = json.dumps(header).encode()
            return len(new).to_bytes(8, "little") + new + good[8 + header_len :]

        damages = {
            "truncated to half": (good[: len(good) // 2], None, tt.PatchFileError),
            "truncated by one byte": (good[:-1], None, tt.PatchFileError),
            "one tensor byte flipped": (good[:-5] + bytes([good[-5] ^ 0xFF]) + good[-4:], None, tt.PatchFileError),
            "checksum edited": (edit_meta(lambda m: m.update(sha256="0" * 64)), None, tt.PatchFileError),
            "format edited": (edit_meta(lambda m: m.update(format="other/1")), None, tt.PatchFileError),
            "empty file": (b"", None, tt.PatchFileError),
            "garbage": (b"\x00" * 100, None, tt.PatchFileError),
            "loaded for another model (same shapes)": (good, other, tt.IncompatibleModelError),
            "loaded for another model (other shapes)": (good, make_model("ln_gelu_learned"), tt.IncompatibleModelError),
            "metadata edited (the chunk)": (edit_meta(lambda m: m.update(chunk="another chunk")), None, tt.PatchFileError),
            "metadata edited (unpatched positions)": (edit_meta(lambda m: m.update(unpatched_positions=3)), None, tt.PatchFileError),
            "loaded for the model changed in its last block": (good, _changed_last_block(model), tt.IncompatibleModelError),
        }
        for name, (data, target, error) in damages.items():
            path.write_bytes(data)
            try:
                tt.ThoughtPatch.load(path, model=target)
                status = "FAILED: loaded"
            except error:
                status = "refused as documented"
            except Exception as e:  # noqa: BLE001
                status = f"FAILED: {type(e).__name__}: {e}"[:100]
            rows.append(dict(case=name, expected=error.__name__, status=status))
        (Path(tmp) / "a_file").write_text("x")
        for name, target in (("saved to a folder", Path(tmp)), ("saved under a file", Path(tmp) / "a_file" / "p"),
                             ("saved into a place that cannot be written", Path("/proc/tl_thoughts/p.safetensors"))):
            try:
                patch.save(target)
                status = "FAILED: saved"
            except tt.PatchFileError:
                status = "refused as documented"
            except Exception as e:  # noqa: BLE001
                status = f"FAILED: {type(e).__name__}: {e}"[:100]
            rows.append(dict(case=name, expected="PatchFileError", status=status))
    return rows


def _changed_last_block(model):
    changed = make_model("rms_gated_silu_rotary_gqa", tokenizer=make_word_tokenizer())
    with torch.no_grad():
        changed.blocks[-1].mlp.W_out.data[0, 0] += 1e-4
    return changed


def table(rows: list[dict], worst: dict, bad: list[dict], damaged: list[dict], arguments: list[dict],
          cli_rows: list[dict], applied: dict, seconds: float) -> str:
    n_fail = sum(r["status"] == "FAILED" for r in rows)
    n_refused = sum(r["status"] == "weight form refused" for r in rows)
    named = bad + damaged + arguments + cli_rows
    n_named_fail = sum(r["status"] != "refused as documented" for r in named)
    modified = sum("model changed" in r["status"] for r in named) + sum(
        "after removing every handle" in p for p in applied["problems"])
    lines = [
        f"Generated by `.venv/bin/python benchmarks/hardening_matrix.py` ({seconds:.0f} s).",
        "",
        f"**In all**: {len(rows)} exactness cases ({n_fail} failures), {len(named)} named bad-input cases "
        f"({len(bad)} inputs, {len(damaged)} patch files and save paths, {len(arguments)} arguments, "
        f"{len(cli_rows)} command lines; {n_named_fail} not ending in their documented error) and "
        f"{applied['sequences']} random patch sequences ({applied['steps']} steps; "
        f"{len(applied['problems'])} problems). **Models left modified: {modified}.**",
        "",
        "**Exactness.** "
        f"{len(ARCHITECTURES)} architectures x {len(LAYOUTS)} chunk layouts ({', '.join(LAYOUTS)}) x "
        f"{len(N_AFTER)} numbers of kept tokens after the last chunk ({', '.join(map(str, N_AFTER))}) x "
        f"{len(MODES)} precision modes x {len(BATCHES)} batch shapes ({', '.join(BATCHES)}) = "
        f"**{len(rows)} cases, {n_fail} failures**. Each case verifies the activation and the weight "
        "form against the full run (batched cases also against the prompt run alone); "
        + (f"{n_refused} weight forms were refused with the documented `ZeroDenominatorError` "
           "(no exact patch of that form), their activation form still checked."
           if n_refused else "no weight form was refused."),
        "",
        "| precision mode | compute dtype | cases | failures | worst error | tolerance |",
        "|---|---|---|---|---|---|",
    ]
    for mode, (_, _, compute) in MODES.items():
        mine = [r for r in rows if r["mode"] == mode]
        fails = sum(r["status"] == "FAILED" for r in mine)
        lines.append(f"| {mode} | {str(compute).replace('torch.', '')} | {len(mine)} | {fails} | "
                     f"{worst[mode]:.1e} | {TOL[compute]:.0e} |")
    lines += ["", "| batch shape | cases | failures | worst error |", "|---|---|---|---|"]
    for batch in BATCHES:
        mine = [r for r in rows if r["batch"] == batch]
        lines.append(f"| {batch} | {len(mine)} | {sum(r['status'] == 'FAILED' for r in mine)} | "
                     f"{max(r['error'] for r in mine if r['mode'] in ('float64', 'float32 model, float64 mode')):.1e} (float64) |")
    failed = [r for r in rows if r["status"] == "FAILED"]
    if failed:
        lines += ["", "Failures:", ""] + [f"- {r['arch']}, {r['mode']}, {r['layout']}, {r['n_after']} after, "
                                          f"{r['batch']}: {r['detail']}" for r in failed]
    lines += ["", f"**Patch applications.** {applied['sequences']} random sequences of {applied['steps']} steps "
              f"(attach in either form, remove any handle, merge_into; {applied['merges']} merges asked for), "
              "each step checked (the model's own parameters plus the weight-form deltas still applied, "
              "in order; a second application refused; the model's own tensors, bit-identical, at the end): "
              f"**{len(applied['problems'])} problems, 0 allowed**; models left modified: "
              f"{sum('after removing every handle' in p for p in applied['problems'])}."]
    lines += [f"- {p}" for p in applied["problems"][:10]]
    rules = {"Bad inputs": "each must raise its documented error and leave the model bit-identical with no "
                           "hook attached",
             "Damaged or foreign patch files, bad save paths": "each must be refused",
             "Bad arguments": "`tests/test_arguments.py`'s table: each must raise the library's error naming "
                              "the argument and leave the models bit-identical",
             "The command line": "each must print one `error:` line and exit 2 before any model is loaded"}
    for title, items in zip(rules, (bad, damaged, arguments, cli_rows)):
        n_bad_fail = sum(r["status"] != "refused as documented" for r in items)
        rule = rules[title]
        lines += ["", f"**{title}.** {len(items)} cases, {n_bad_fail} failures ({rule}).", "",
                  "| case | expected error | outcome |", "|---|---|---|"]
        lines += [f"| {r['case']} | `{r['expected']}` | {r['status']} |" for r in items]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows, worst = exactness()
    bad = bad_inputs()
    damaged = damaged_files()
    arguments = bad_arguments()
    cli_rows = command_line()
    applied = patch_applications()
    text = table(rows, worst, bad, damaged, arguments, cli_rows, applied, time.perf_counter() - t0)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
