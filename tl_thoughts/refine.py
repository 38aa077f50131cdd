"""Refining a thought patch by gradient descent: the least-squares patch as the start, the same
numbers (its vectors and matrices, nothing else) trained by Adam on the cross-entropy of the
examples' answers WITHOUT the chunk. The model's own weights are never changed.

The least-squares fit ([`tl_thoughts.fit_thought`][]) matches the run with the chunk block by
block; what the patch is for is the behaviour at the output. A few full-batch steps on the same
examples close part of that gap (``docs/benchmark.md``, "Refining the thought patch").
"""

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import functional_call
from tqdm.auto import tqdm

from tl_thoughts import _tl
from tl_thoughts._tl import Model
from tl_thoughts.errors import ArgumentTypeError, InputError, check_int, check_number
from tl_thoughts.patch import ThoughtPatch
from tl_thoughts.templates import Example, PromptTemplate, check_examples, encode_example
from tl_thoughts.stream import pad_right, unpatched_prefix


def _rows(model: Model, patch: ThoughtPatch, examples: Sequence[Example]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per example: the reduced prompt's tokens, the positions that predict the answer's tokens
    (the ``"answer"`` pool, in the reduced prompt) and those tokens."""
    try:
        chunk, template = patch.meta["chunk"], PromptTemplate(**patch.meta["template"])
    except KeyError as e:
        raise InputError(f"the patch's meta has no {e}: refine a patch made by fit_thought") from None
    out = []
    for ex in examples:
        enc = encode_example(model, template, chunk, ex)
        pos = enc.to_reduced(enc.pooled("answer"))
        # the prompt up to the last position read (the line break's own position predicts nothing)
        out.append((enc.reduced[: int(pos.max()) + 1], pos, enc.reduced[pos + 1]))
    return out


def _like(layout: Tensor, values: Tensor) -> Tensor:
    """A copy of ``values`` in the memory layout (strides) of ``layout`` (a dense tensor, such as a
    parameter: ``empty_like`` keeps its strides)."""
    return torch.empty_like(layout).copy_(values)


def check_options(steps: int, lr: float, prefix: str = "") -> None:
    """Raise [`InputError`][] (a ``ValueError``; [`ArgumentTypeError`][] for a wrong type)
    unless ``steps`` is an integer >= 0 and ``lr`` a finite number > 0 (``prefix``: how the caller
    names them, e.g. ``"refine_"`` for ``EvalConfig``)."""
    check_int(steps, f"{prefix}steps", minimum=0)
    check_number(lr, f"{prefix}lr", strict=True)  # finite: lr=inf gave NaN deltas silently


def refine_thought(
    model: Model,
    patch: ThoughtPatch,
    examples: Sequence[Example],
    *,
    steps: int = 10,
    lr: float = 1e-5,
    batch_size: int = 32,
    progress: bool = True,
) -> ThoughtPatch:
    """Train a thought patch's deltas by full-batch Adam on the answers' cross-entropy without the chunk.

    The loss is the mean, over every position that predicts an answer token (the ``"answer"``
    pool of [`tl_thoughts.fit_thought`][]) of every example, of ``-log p(answer token)``, the
    model run on the prompt WITHOUT the chunk under the patch, in its weight form (each delta added
    to its parameter for the call, ``torch.func.functional_call``: one product per matrix, where
    the activation form's hooks compute two). A prefix the patch leaves unpatched runs first,
    unpatched, into a frozen key-value cache that the patched positions read: the values of the
    activation form (``tests/test_refine.py``). Each step takes the
    gradient over all the examples (accumulated over batches of ``batch_size``) and makes one Adam
    step on every delta; the model's parameters are not touched.

    Args:
        model: The model the patch was fitted on (not modified; no hooks may be attached).
        patch: A patch from [`tl_thoughts.fit_thought`][] (its chunk and template are read from
            its meta), for example the least-squares fit on the same examples.
        examples: ``(query, answer)`` pairs; the answers are the labels.
        steps: Adam steps (0 returns the same deltas).
        lr: Adam's learning rate (each step moves every number by about ``lr``).
        batch_size: Sequences per forward pass.
        progress: Show a progress bar.

    Returns:
        A new patch, the same parameters trained; its meta's ``"refined"`` list gains one entry
        per call (refining a refined patch adds one): the steps, the learning rate, the number of
        examples and of answer positions, and the mean loss before and after.

    Raises:
        InputError: ``steps`` not an integer >= 0, ``lr`` not a finite number > 0, ``batch_size``
            < 1, no examples, a query without an answer, hooks on the model, or a patch without the
            chunk and template in its meta.
        ArgumentTypeError: an argument of the wrong type (examples that are not a list of
            (query, answer) pairs of strings, a patch that is not a ThoughtPatch, a float
            ``steps``).
        IncompatibleModelError: a patch fitted on another model.

    Example:
        >>> patch = tl_thoughts.fit_thought(model, chunk, pairs, template=template)  # doctest: +SKIP
        >>> refined = tl_thoughts.refine_thought(model, patch, pairs, steps=10)  # doctest: +SKIP
    """
    check_options(steps, lr)
    check_int(batch_size, "batch_size", minimum=1)
    check_examples(examples, pairs=True)
    if not isinstance(patch, ThoughtPatch):
        raise ArgumentTypeError(f"patch must be a ThoughtPatch (from fit_thought), got {type(patch).__name__}")
    _tl.model_spec(model)
    _tl.check_no_hooks(model)
    _tl.require_hooked(model, "refine_thought")
    patch.check_compatible(model)
    rows = _rows(model, patch, examples)
    n_layers = model.cfg.n_layers
    n_rows = sum(len(r[1]) for r in rows)
    device = _tl.model_device(model)
    batches = []
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        which = torch.cat([torch.full_like(r[1], j) for j, r in enumerate(part)])
        batches.append((pad_right([r[0] for r in part]).to(device), which.to(device),
                        torch.cat([r[1] for r in part]).to(device), torch.cat([r[2] for r in part]).to(device)))
    # the weight form: each delta added to its parameter for the call (functional_call), which
    # costs one product per matrix where the activation form's hooks cost two; an unpatched
    # prefix runs once, unpatched, into a frozen key-value cache that the patched positions read
    # (the positions after it see it only through its keys and values): the activation form's values
    weights = {name: model.get_parameter(name).detach() for name in patch.deltas}
    # the deltas, and the buffers holding W + delta, in W's memory layout (see _tl.linear_layout):
    # the sum reads and writes memory in order, into the same memory at every step
    leaves = {name: _like(w, patch.deltas[name]).requires_grad_(True) for name, w in weights.items()}
    patched = {name: torch.empty_like(w).requires_grad_(True) for name, w in weights.items()}  # filled at each step
    params, sums = list(leaves.values()), list(patched.values())
    # fused: one pass over each tensor's memory (Adam's update, rounded as torch's fused kernel does)
    opt = torch.optim.Adam(params, lr=lr, fused=True)
    prefix = patch.unpatched_positions
    shared = unpatched_prefix(model, [r[0] for r in rows], prefix)
    caches = [None if shared is None else _tl.broadcast_cache(shared.cache, tokens.shape[0]) for tokens, *_ in batches]

    def loss_and_grads(grad: bool = True) -> tuple[float, list[Tensor]]:
        """The mean loss over every answer position, and its gradient with respect to the deltas
        (none without ``grad``): the gradient with respect to ``W + delta``, the same."""
        total, grads = 0.0, []
        with torch.no_grad():
            for name, w in weights.items():
                torch.add(w, leaves[name], out=patched[name])
        with torch.set_grad_enabled(grad):
            for (tokens, which, pos, targets), cache in zip(batches, caches):
                rest = tokens[:, prefix:]
                # the final norm and the unembedding at the answer positions only (the same logits)
                resid = functional_call(model, patched, (rest,), dict(
                    stop_at_layer=n_layers, attention_mask=torch.ones_like(rest), past_kv_cache=cache))[which, pos - prefix]
                logits = torch.nn.functional.linear(_tl.final_norm(model, resid), model.W_U.T, model.b_U)
                logp = torch.log_softmax(logits, dim=-1)
                loss = -logp.gather(-1, targets[:, None]).sum() / n_rows
                if grad:
                    # in the deltas' own layout: the fused step reads a gradient's memory as its parameter's
                    parts = [torch.zeros_like(p) if part is None else part if part.stride() == p.stride() else _like(p, part)
                             for p, part in zip(params, torch.autograd.grad(loss, sums, allow_unused=True))]
                    if grads:  # accumulated over batches
                        for g, part in zip(grads, parts):
                            g += part
                    else:
                        grads = parts
                total += float(loss.detach())
        return total, grads

    before = None
    for _ in tqdm(range(steps), desc="refining thought patch", disable=not progress):
        loss, grads = loss_and_grads()
        before = loss if before is None else before  # the first step's loss is the start's
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    after = loss_and_grads(grad=False)[0]
    before = after if before is None else before
    rounds = list(patch.meta.get("refined", []))
    rounds.append(dict(steps=steps, lr=lr, n_examples=len(examples), n_tokens=n_rows,
                       loss_before=before, loss_after=after))
    meta = {**patch.meta, "refined": rounds}
    return ThoughtPatch(deltas={k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in leaves.items()},
                        steering=dict(patch.steering),
                        meta=meta)
