"""The behavioural benchmark (THEORY 5): does a patch fitted from a chunk make the model, run
WITHOUT the chunk, do what the chunk asked? Compared with the heuristics the theory explains.

Protocol (:func:`evaluate_task`), per seed:

1. the task's examples are shuffled with the seed and split into ``n_fit`` fit examples and the
   rest, the test examples (disjoint);
2. greedy decoding, exact match: an example is right when the model's greedy continuation of the
   prompt is the answer's tokens (``answer_prefix + answer``) followed by a line break (a token
   whose text starts with a line break after optional spaces, or an end-of-sequence / special
   token), i.e. the generation cut at its first line break equals the answer. This is computed
   exactly, for a whole batch in one forward pass, by teacher forcing: greedy decoding produces the
   answer iff the argmax at every answer position is the next answer token (checked against real
   generation in the test suite);
3. the test examples are filtered to those right WITH the chunk and wrong WITHOUT it (their number
   is reported; an example's verdicts do not depend on the split: :func:`example_verdicts`
   computes them once a task);
4. every method runs on the same filtered examples, without the chunk, after being fitted on the
   same fit rows: the fit examples plus the first ``EvalConfig.n_queries`` of the task's
   unlabelled queries that the model answers WITH the chunk, with those answers
   (:func:`query_answers`; the same queries for every seed, none of them an example, their
   prompts with the chunk run once a task for every seed's fit: their rows are read from the
   decoding's own runs, :func:`query_answers_with_rows`, the rows :func:`query_full_rows`
   streams; the refined patch's gradient steps use the labelled fit examples only):

   - ``with_chunk`` / ``without_chunk``: the prompt with / without the chunk, no patch (1 and 0 on
     the filtered set by construction; their unfiltered accuracies are reported too);
   - ``thought_patch``: :func:`tl_thoughts.fit_thought` with ``fit="both"``, applied in its weight
     form, the positions it leaves unpatched (the fixed first token, at the defaults) read from a
     key-value cache of the unpatched model (:func:`_match_under`: the values of
     :meth:`tl_thoughts.ThoughtPatch.apply`'s activation form); its matrices are used as fitted,
     or, with several candidates in ``EvalConfig.ranks``, at the candidate rank (their best
     low-rank approximations, :meth:`tl_thoughts.ThoughtPatch.truncations`, or as fitted for
     ``None``) that does best on the fit examples (or on the fit examples and the answered queries
     with ``EvalConfig.rank_on_queries``);
   - ``thought_vector``, ``thought_matrix``: that patch's thought vectors alone and its thought
     matrices alone, as fitted (:meth:`tl_thoughts.ThoughtPatch.only`; not fitted again);
   - ``thought_vector_fitted_alone``, ``thought_matrix_fitted_alone`` (not in
     :data:`DEFAULT_METHODS`): ``fit_thought(fit="vector" | "matrix")``, patches fitted on their
     own (in one :func:`tl_thoughts.fit_thoughts` call with the thought patch), as fitted;
   - ``thought_patch_refined`` (not in :data:`DEFAULT_METHODS`: on request, :data:`ON_REQUEST`):
     that thought patch (at its chosen rank) refined by
     ``EvalConfig.refine_steps`` full-batch Adam steps on the fit examples' answers, without the
     chunk (:func:`tl_thoughts.refine_thought`): the same numbers, trained on the behaviour;
   - ``steering_best_layer``: the mean-difference steering vector (residual stream after block
     ``l``, with the chunk minus without, averaged over the fit rows' pooled positions) added
     at ``blocks.{l}.hook_resid_post`` at every position after the chunk's place, ``l`` chosen on
     the fit examples;
   - ``steering_all_layers``: at every block, the mean difference of the block's own output
     (the increment of the mean residual difference), so that the vectors add up to the mean
     residual difference at every depth;
   - ``task_vector``: the hidden state of the run WITH the chunk after block ``l`` at the last
     prompt position (the one that predicts the answer), averaged over the fit rows, written
     into the run without the chunk at its last prompt position (Hendel et al. 2023), ``l`` chosen
     on the fit examples.

Choices on fit data (the baselines' layers, the thought matrices' rank) rank the candidates by
accuracy on the (labelled) fit examples without the chunk, then by the mean log-probability of
their continuations; with ``rank_on_queries``, the rank is chosen on the fit examples plus the
answered queries (scored against the model's own answers with the chunk).

An example is right when greedy decoding gives the answer's TEXT, so a greedy continuation that
spells the answer with other tokens than the tokenizer's (``" F" "ARMER"`` for ``" FARMER"``) is
right too: where the teacher-forced pass sees the model leave the answer's tokens for a token whose
text still fits the answer (after normalising whitespace), the example is decoded for real, under
the same patch or hooks, and its text compared (:func:`greedy_match`).
"""

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, TransformerLensKeyValueCache, TransformerLensKeyValueCacheEntry

from tl_thoughts import _tl
from tl_thoughts.errors import ChunkError, InputError, UnsupportedArchitectureError
from tl_thoughts.patch import ThoughtPatch
from tl_thoughts.tasks import Task
from tl_thoughts.templates import EncodedExample, encode_example, shared_prefix_length
from tl_thoughts.refine import check_options as check_refine_options
from tl_thoughts.refine import refine_thought
from tl_thoughts.thoughts import FullRows, _assemble_full_rows, _fitted_rows, fit_thoughts, full_prompt_rows

DEFAULT_METHODS = (  # the suite's methods
    "with_chunk",
    "without_chunk",
    "thought_vector",
    "thought_matrix",
    "thought_patch",
    "steering_best_layer",
    "steering_all_layers",
    "task_vector",
)
FITTED_ALONE = ("thought_vector_fitted_alone", "thought_matrix_fitted_alone")  # on request (methods=...)
ON_REQUEST = ("thought_patch_refined",) + FITTED_ALONE  # not in the suite's defaults: methods=... adds them
METHODS = DEFAULT_METHODS + ON_REQUEST
# least-squares fits: kind of fit_thought; the thought_patch's fit also gives its parts
FIT_METHODS = {"thought_patch": "both", "thought_vector_fitted_alone": "vector", "thought_matrix_fitted_alone": "matrix"}
PART_METHODS = {"thought_vector": "vectors", "thought_matrix": "matrices"}  # ThoughtPatch.only of the thought_patch


def _fit_kinds(methods: Sequence[str]) -> dict[str, str]:
    """The least-squares fits ``methods`` need (method -> ``fit_thought``'s ``fit``): their own, and
    the thought patch wherever its parts or its refinement are run."""
    patch_needed = "thought_patch_refined" in methods or any(name in methods for name in PART_METHODS)
    return {name: kind for name, kind in FIT_METHODS.items()
            if name in methods or (name == "thought_patch" and patch_needed)}
BASELINES = ("steering_best_layer", "steering_all_layers", "task_vector")  # fitted from the mean differences


@dataclass(frozen=True)
class EvalConfig:
    """Options of the protocol (recorded in ``results.json``).

    Attributes:
        n_fit: Fit examples per seed (the rest are test examples).
        n_queries: Unlabelled queries of the task (its ``queries``) answered by the model itself
            WITH the chunk (:func:`query_answers`: the first ``n_queries`` it answers) and added to
            every seed's fit examples for every method's fit (the thought patches, the steering
            vectors, the task vectors). They are none of the task's examples, so the test
            examples stay unseen. Choices on fit data (ranks, layers) and the refined patch's
            gradient steps use the ``n_fit`` labelled fit examples only (the rank choice uses the
            queries too with ``rank_on_queries``). 0: no queries (the task needs none).
        seeds: One split (and one fit) per seed.
        layers: Blocks the thought patches are fitted on (None: all).
        ridge: Ridge strength of the thought matrices, relative to the mean squared MLP input of
            ``n_fit`` rows: the fit's ridge is ``ridge * (n_fit + n_queries) / n_fit``
            (:func:`tl_thoughts.fit_thought` divides by the mean over rows, so the queries would
            otherwise weaken the ridge relative to the sum of squares).
        pool: Positions pooled by the thought patches and the steering vectors (see
            :func:`tl_thoughts.fit_thought`).
        vector_site, vector_target: Where the thought vector goes and what it restores.
        attention_matrix: Also fit a thought matrix on ``W_O`` (see :func:`tl_thoughts.fit_thought`).
        query_weight: Weight of the query positions in the matrices' fits.
        output_matrix: Also fit a thought matrix on ``W_out`` (see :func:`tl_thoughts.fit_thought`).
        patch_prefix: False leaves the positions before the chunk's place (the template's prefix)
            unpatched, in the fit and when applied (see :func:`tl_thoughts.fit_thought`).
        ranks: Candidate ranks of the ``thought_patch`` method's thought matrices: an integer
            ``k`` replaces every thought matrix by its best rank-``k`` approximation
            (:meth:`tl_thoughts.ThoughtPatch.truncations`), None keeps the matrices as fitted. With
            several candidates, the one doing best on the fit examples is used (per seed; recorded
            in ``SeedResult.ranks``). Default: as fitted, no choice (``docs/benchmark.md``, "480
            queries"). The ``thought_vector`` and ``thought_matrix`` ablations are the patch's
            vectors alone and matrices alone as fitted (:meth:`tl_thoughts.ThoughtPatch.only`).
        rank_on_queries: Choose the rank on the labelled fit examples plus the answered queries
            (each scored against the model's own answer with the chunk) instead of on the
            labelled fit examples alone (``docs/benchmark.md``, "More queries, a smaller ridge,
            the rank chosen on the queries").
        refine_steps, refine_lr: The ``thought_patch_refined`` method: the ``thought_patch`` (at its
            chosen rank) refined by that many full-batch Adam steps at that learning rate on the
            fit examples' answers (:func:`tl_thoughts.refine_thought`).
        batch_size: Sequences per forward pass.
        methods: The methods run (default: :data:`DEFAULT_METHODS`, the protocol's: all of
            :data:`METHODS` but those of :data:`ON_REQUEST`, ``thought_patch_refined`` and
            ``thought_vector_fitted_alone`` / ``thought_matrix_fitted_alone``, the vector-only and
            matrix-only patches fitted on their own, ``fit_thought(fit="vector" | "matrix")``).
    """

    n_fit: int = 20
    n_queries: int = 480
    seeds: tuple[int, ...] = (0, 1, 2)
    layers: tuple[int, ...] | None = None
    ridge: float = 0.5
    pool: str = "answer"
    vector_site: str = "attn_out"
    vector_target: str = "attention"
    attention_matrix: bool = True
    query_weight: float = 0.1
    output_matrix: bool = True
    patch_prefix: bool = False
    ranks: tuple[int | None, ...] = (None,)
    rank_on_queries: bool = False
    refine_steps: int = 10
    refine_lr: float = 1e-5
    batch_size: int = 64
    methods: tuple[str, ...] = DEFAULT_METHODS

    @property
    def fit_options(self) -> dict:
        """The keyword arguments of :func:`tl_thoughts.fit_thought` this configuration fits with.

        Example:
            >>> EvalConfig().fit_options["vector_target"]
            'attention'
        """
        return dict(layers=self.layers, ridge=self.ridge, pool=self.pool,
                    vector_site=self.vector_site, vector_target=self.vector_target,
                    attention_matrix=self.attention_matrix, query_weight=self.query_weight,
                    output_matrix=self.output_matrix, patch_prefix=self.patch_prefix)

    def fit_options_for(self, n_rows: int) -> dict:
        """:attr:`fit_options` for a fit on ``n_rows`` rows: the ridge scaled by ``n_rows / n_fit``
        (see ``ridge``), as the protocol fits on the fit examples plus the answered queries.

        Example:
            >>> EvalConfig(n_fit=20, ridge=1.0).fit_options_for(80)["ridge"]
            4.0
        """
        return {**self.fit_options, "ridge": self.ridge * n_rows / self.n_fit}

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
        if "with_chunk" not in self.methods or "without_chunk" not in self.methods:
            raise ValueError("the protocol filters on 'with_chunk' and 'without_chunk': keep both")
        if self.n_fit < 1:
            raise ValueError("n_fit must be >= 1")
        if isinstance(self.n_queries, bool) or not isinstance(self.n_queries, int) or self.n_queries < 0:
            raise ValueError(f"n_queries must be an integer >= 0, got {self.n_queries!r}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if not self.ranks:
            raise ValueError("at least one candidate rank is needed (None: the matrices as fitted)")
        for rank in self.ranks:
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
                raise ValueError(f"ranks must be None or integers >= 1, got {rank!r}")
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"ranks must be distinct, got {self.ranks}")
        check_refine_options(self.refine_steps, self.refine_lr, prefix="refine_")


# --- encoding and the exact greedy-match check --------------------------------------------------


@dataclass(frozen=True)
class _Example:
    """One example tokenised with and without the chunk, continuation teacher-forced."""

    enc: EncodedExample  # full = prompt with chunk + continuation; reduced = without the chunk
    n_cont: int  # continuation tokens: answer tokens then the stop token

    @property
    def last_prompt_full(self) -> int:
        return self.enc.answer_start - 1

    @property
    def last_prompt_reduced(self) -> int:
        return self.enc.answer_start - 1 - (self.enc.stop - self.enc.start)


def encode_task_examples(model: HookedTransformer, task: Task, indices: Sequence[int]) -> list[_Example]:
    """Tokenise examples with and without the chunk (aligned positions, see
    :func:`tl_thoughts.templates.encode_example`), checking that the continuation ends with a token
    of its own holding the line break.

    Example:
        >>> examples = encode_task_examples(load_default_model(), task, range(20))  # doctest: +SKIP
        >>> examples[0].n_cont  # answer tokens + the line-break token  # doctest: +SKIP
        2
    """
    return [_encode(model, task, *task.examples[i]) for i in indices]


def _encode(model: HookedTransformer, task: Task, query: str, answer: str) -> _Example:
    enc = encode_example(model, task.template, task.chunk, (query, task.continuation(answer)))
    n_cont = enc.full.shape[0] - enc.answer_start
    last = model.to_single_str_token(int(enc.full[-1])) if n_cont else ""
    if n_cont < 2 or "\n" not in last or last.strip():
        raise ChunkError(
            f"task {task.name!r}, example {query!r}: the continuation must tokenise as the answer's "
            f"tokens then a line-break token (got last token {last!r})"
        )
    return _Example(enc=enc, n_cont=n_cont)


def stop_tokens(model: HookedTransformer) -> Bool[Tensor, " d_vocab"]:
    """Tokens that end an answer under greedy decoding: a line break after optional spaces, or a
    special token (end of sequence, chat turn markers).

    Example:
        >>> stops = stop_tokens(model)
        >>> stops.shape, bool(stops[model.tokenizer.eos_token_id])
        (torch.Size([50]), True)
    """
    tok = model.tokenizer
    if tok is None:
        raise InputError("the behavioural benchmark needs a model with a tokenizer")
    strings = tok.convert_ids_to_tokens(list(range(model.cfg.d_vocab)))
    decoded = [tok.convert_tokens_to_string([s]) if s is not None else "" for s in strings]
    mask = torch.tensor([d.lstrip(" \t").startswith("\n") for d in decoded])
    special = [i for i in tok.all_special_ids if i < model.cfg.d_vocab]
    mask[special] = True
    return mask


def _pad(seqs: list[Tensor]) -> Int[Tensor, "batch pos"]:
    """Right padding (exact under causal attention: real positions never see the pads)."""
    n = max(s.shape[0] for s in seqs)
    out = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s.cpu()
    return out


HookFactory = Callable[[list[_Example], bool], list[tuple[str, Callable]]]
Prefix = tuple[int, TransformerLensKeyValueCache]  # the first k tokens of every prompt, and their key-value cache


def _row_logits(
    model: HookedTransformer, rows: Float[Tensor, "rows d_model"], unembed_weight: Float[Tensor, "d_vocab d_model"]
) -> Float[Tensor, "rows d_vocab"]:
    """The logits of residual rows after the last block: the final norm, then the unembedding
    (``unembed_weight`` is ``W_U.T.contiguous()``, see :func:`_verdicts`)."""
    return torch.nn.functional.linear(_tl.final_norm(model, rows), unembed_weight, model.b_U)


def _advance(i: int, token: int, generated: list[list[int]], stopped: list[bool], stops: Tensor,
             keep: Callable[[int, list[int]], bool]) -> bool:
    """One greedy step of sequence ``i`` (:func:`_greedy_loop`, :func:`_greedy_cached`): a stop
    token ends it (``stopped[i]``); any other token is appended, and it goes on while ``keep``
    holds. Returns whether it goes on."""
    if bool(stops[token]):
        stopped[i] = True
        return False
    generated[i].append(token)
    return keep(i, generated[i])


def _read_end(e: _Example, seq: Tensor) -> int:
    """How many first positions of ``seq`` (``e``'s prompt with or without the chunk) :func:`_verdicts`
    reads: all but the last, whose token (the line break) is the last target, where the example
    has a continuation (causal attention: the later position changes none read)."""
    return seq.shape[0] - (1 if e.n_cont else 0)


def _verdicts(
    model: HookedTransformer,
    batch: list[_Example],
    seqs: list[Tensor],
    final_resid: Float[Tensor, "batch pos d_model"],
    stops: Bool[Tensor, " d_vocab"],
    unembed_weight: Float[Tensor, "d_vocab d_model"],
) -> tuple[list[bool], list[float], list[list[int] | None]]:
    """Right/wrong (at the token level: the greedy tokens are the continuation's) and mean
    log-probability of each continuation, from the residual stream after the last block (the final
    norm and the unembedding are applied to the needed rows only), and, where a wrong verdict is
    open, the greedy tokens so far (:func:`_open_path`; None where the verdict is settled).

    ``unembed_weight`` is ``W_U.T.contiguous()``, made once by the caller: TransformerLens'
    ``Unembed`` computes ``F.linear(x, W_U.T.contiguous(), b_U)``, copying the 113 MB matrix at
    every call; the same product with a copy made once gives the same logits, bit for bit."""
    b_idx, p_idx, spans = [], [], []
    for i, (e, seq) in enumerate(zip(batch, seqs)):
        n = seq.shape[0]
        rows = list(range(n - e.n_cont - 1, n - 1))
        spans.append((len(p_idx), len(p_idx) + len(rows), seq[n - e.n_cont :]))
        b_idx += [i] * len(rows)
        p_idx += rows
    picked = final_resid[torch.tensor(b_idx), torch.tensor(p_idx)]  # [rows, d_model]
    logits = _row_logits(model, picked, unembed_weight)
    norm = torch.logsumexp(logits, -1)  # log-probabilities of the targets only (no [rows, d_vocab] copy)
    right, logprob, open_ = [], [], []
    for lo, hi, targets in spans:
        targets = targets.to(logits.device)
        preds = logits[lo:hi].argmax(-1)
        ok = bool((preds[:-1] == targets[:-1]).all()) and bool(stops[int(preds[-1])])
        right.append(ok)
        picked_logits = logits[lo:hi].gather(-1, targets[:, None])[:, 0]
        logprob.append(float((picked_logits.double() - norm[lo:hi].double()).mean()))
        open_.append(None if ok else _open_path(model, targets.tolist(), preds.tolist(), stops))
    return right, logprob, open_


def _norm(text: str) -> str:
    """Whitespace normalised as the protocol compares answers."""
    return " ".join(text.split())


def _fits(text: str, answer: str) -> bool:
    """Whether decoded greedy text may still become ``answer`` (after normalising whitespace); an
    incomplete character (``\ufffd``) only further decoding resolves."""
    return "\ufffd" in text or _norm(answer).startswith(_norm(text))


def _open_path(model: HookedTransformer, targets: list[int], preds: list[int], stops: Tensor) -> list[int] | None:
    """For a continuation ``targets`` (answer tokens, then the line break) that the teacher-forced
    greedy predictions ``preds`` leave at their first wrong token: the greedy tokens up to and
    including that token, if greedy decoding may still spell the answer's text with other tokens
    (the path's text fits the answer); None if the verdict "wrong" is settled (the path ends the
    answer early with a stop token, or its text leaves the answer)."""
    n_answer = len(targets) - 1
    j = next((i for i in range(n_answer) if preds[i] != targets[i]), n_answer)
    if bool(stops[preds[j]]):
        return None  # stops early (j < n_answer; at j == n_answer the example is right)
    path = targets[:j] + [preds[j]]
    return path if _fits(model.tokenizer.decode(path), model.tokenizer.decode(targets[:n_answer])) else None


@torch.no_grad()
def _decode_open(
    model: HookedTransformer,
    examples: list[_Example],
    with_chunk: bool,
    paths: list[list[int]],
    hooks: HookFactory | None,
    stops: Bool[Tensor, " d_vocab"],
    unembed_weight: Float[Tensor, "d_vocab d_model"],
    prefix: "Prefix | None" = None,
) -> list[bool]:
    """Greedy decoding for real, for a batch of examples whose greedy tokens so far are ``paths``
    (under ``hooks`` and whatever patch is applied, after ``prefix``, see :func:`_greedy_loop`):
    one token at a time, each example while its text fits its answer; right when it stops on the
    answer's text (whitespace normalised)."""
    prompts, answers = [], []
    for e in examples:
        cut = e.enc.answer_start - (0 if with_chunk else e.enc.stop - e.enc.start)
        prompts.append((e.enc.full if with_chunk else e.enc.reduced)[:cut].cpu())
        answers.append(model.tokenizer.decode(e.enc.full[e.enc.answer_start : -1].tolist()))  # no line break

    def keep(i: int, generated: list[int]) -> bool:
        # a path spelling the answer takes at most one token a byte (and whitespace)
        short = len(generated) <= len(answers[i].encode()) + 4
        return short and _fits(model.tokenizer.decode(generated), answers[i])

    def hook_factory(active: list[int]) -> list:
        return hooks([examples[i] for i in active], with_chunk) if hooks else []

    generated, stopped = _greedy_loop(model, prompts, paths, keep, stops, unembed_weight, hook_factory, prefix)
    return [s and _norm(model.tokenizer.decode(g)) == _norm(a) for g, s, a in zip(generated, stopped, answers)]


def _greedy_loop(
    model: HookedTransformer,
    prompts: list[Tensor],
    starts: list[list[int]],
    keep: Callable[[int, list[int]], bool],
    stops: Bool[Tensor, " d_vocab"],
    unembed_weight: Float[Tensor, "d_vocab d_model"],
    hooks: Callable[[list[int]], list] | None = None,
    prefix: "Prefix | None" = None,
) -> tuple[list[list[int]], list[bool]]:
    """Greedy decoding of a batch of prompts (right-padded, every step from the start: no key-value
    cache), prompt ``i`` continued from the tokens ``starts[i]``: one token at a time, while no
    stop token comes and ``keep(i, tokens so far)`` holds. Returns the generated tokens (without
    the stop token) and whether each sequence ended on a stop token. ``hooks(active indices)``
    gives forward hooks for a step. ``prefix = (k, cache)``: the prompts' first ``k`` tokens (the
    same in every prompt) are not run, their keys and values read from ``cache``
    (:func:`tl_thoughts._tl.prefix_cache`)."""
    device = _tl.model_device(model)
    k, cache = prefix if prefix is not None else (0, None)
    generated = [list(p) for p in starts]
    stopped = [False] * len(prompts)
    active = list(range(len(prompts)))
    while active:
        seqs = [torch.cat([prompts[i], torch.tensor(generated[i], dtype=prompts[i].dtype)])[k:] for i in active]
        with _tl.hooked(model, hooks(active) if hooks else []):
            final = _run_to_end(model, _pad(seqs).to(device), prefix=cache)
        last = final[torch.arange(len(seqs)), torch.tensor([len(q) - 1 for q in seqs])]
        nxt = _row_logits(model, last, unembed_weight).argmax(-1)
        active = [i for i, token in zip(active, nxt.tolist()) if _advance(i, token, generated, stopped, stops, keep)]
    return generated, stopped


@torch.no_grad()
def _greedy_cached(
    model: HookedTransformer,
    prompts: list[Tensor],
    keep: Callable[[int, list[int]], bool],
    stops: Bool[Tensor, " d_vocab"],
    unembed_weight: Float[Tensor, "d_vocab d_model"],
    batch_size: int | None = None,
    record_from: int | None = None,
    records: list | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """:func:`_greedy_loop` without hooks, with TransformerLens' key-value cache
    (``TransformerLensKeyValueCache``): the first tokens every prompt shares run once (a task's
    prompts with the chunk: the prefix and the chunk), then the prompts of one length run as one
    batch (no padding; at most ``batch_size`` sequences, a larger length group split evenly) from
    there, each prompt once, then one new token per step, for the sequences still going: a finished
    sequence leaves the batch and its rows of the cache. The same decoding up to floating-point
    rounding (the cached step multiplies other shapes): a near tie between two tokens may break
    the other way (``tests/test_evaluation.py``
    ``test_cached_greedy_decoding_equals_the_uncached_loop``).

    ``records`` (a list, with ``record_from``): appended, for each prompt, the residual stream it ran
    through, from position ``record_from`` to the last one run (the prompt, then every generated
    token but the last: the stop token, or the one ``keep`` refused): ``(resid_pre of every block
    then the residual after the last one [n_layers + 1, pos, d_model], every block's hook_attn_out
    [n_layers, pos, d_model])``, as the run computes them."""
    device = _tl.model_device(model)
    generated: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(int(p.shape[0]), []).append(i)
    groups = []
    for same in by_length.values():
        k = 1 if batch_size is None else -(-len(same) // batch_size)  # parts of at most batch_size, as even as can be
        groups += [same[round(j * len(same) / k) : round((j + 1) * len(same) / k)] for j in range(k)]
    shared = shared_prefix_length(prompts)  # the first tokens every prompt shares (the prefix and the chunk) run once
    n_layers = model.cfg.n_layers
    pre_names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + [_tl.resid_post_name(n_layers - 1)]
    attn_names = [_tl.attn_out_name(layer) for layer in range(n_layers)]
    store: dict[str, Tensor] = {}

    def save(act, hook):
        store[hook.name] = act

    recording = records is not None
    if recording and record_from is None:
        raise ValueError("records need record_from")
    hooks = [(name, save) for name in pre_names + attn_names] if recording else []
    parts: list[list[tuple[Tensor, Tensor]]] = [[] for _ in prompts]

    def record(rows: list[int], first: int) -> None:
        """The rows just run (positions ``first`` on) of the sequences ``rows``."""
        pre, attn = torch.stack([store[n] for n in pre_names]), torch.stack([store[n] for n in attn_names])
        lo = max(0, record_from - first)
        if lo < pre.shape[2]:
            for r, i in enumerate(rows):
                parts[i].append((pre[:, r, lo:], attn[:, r, lo:]))

    prefix = None
    if shared:
        with _tl.hooked(model, hooks if recording and record_from < shared else []):
            prefix = _tl.prefix_cache(model, prompts[0][None, :shared])
        if recording and record_from < shared:  # the shared positions, the same rows in every sequence
            record([0], 0)
            parts = [list(parts[0]) for _ in prompts]
    with _tl.hooked(model, hooks):
        for group in groups:
            if prefix is None:
                cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(group))
            else:
                cache = _tl.broadcast_cache(prefix, len(group), frozen=False)
            x = torch.stack([prompts[i][shared:] for i in group]).to(device)
            first = shared
            while group:
                mask = torch.ones(x.shape, dtype=torch.long, device=device)
                final = model(x, stop_at_layer=model.cfg.n_layers, attention_mask=mask, past_kv_cache=cache)
                if recording:
                    record(group, first)
                first += x.shape[1]
                nxt = _row_logits(model, final[:, -1], unembed_weight).argmax(-1)
                going = [r for r, i in enumerate(group) if _advance(i, int(nxt[r]), generated, stopped, stops, keep)]
                if going and len(going) < len(group):  # the finished sequences leave the batch and the cache
                    rows = torch.tensor(going, device=device)
                    for entry in cache.entries:
                        entry.past_keys, entry.past_values = entry.past_keys[rows], entry.past_values[rows]
                    cache.previous_attention_mask = cache.previous_attention_mask[rows]
                    nxt = nxt[rows]
                group = [group[r] for r in going]
                x = nxt[:, None]
    if recording:
        d, dtype = model.cfg.d_model, model.cfg.dtype
        for seq in parts:  # no position from record_from on: no rows
            seq = seq or [(torch.zeros(n_layers + 1, 0, d, dtype=dtype, device=device),
                           torch.zeros(n_layers, 0, d, dtype=dtype, device=device))]
            records.append((torch.cat([p for p, _ in seq], dim=1), torch.cat([a for _, a in seq], dim=1)))
    return generated, stopped


@torch.no_grad()
def query_answers(
    model: HookedTransformer, task: Task, n: int, *, batch_size: int = 32, max_new_tokens: int = 16
) -> list[tuple[str, str]]:
    """The first ``n`` of the task's unlabelled ``queries`` that the model answers WITH the chunk,
    with their answers: greedy decoding of the prompt with the chunk (the protocol's tokens) up to
    a stop token (:func:`stop_tokens`), through TransformerLens' key-value cache (the queries still
    wanted, at least ``batch_size`` of them, decoded together: the prompts of one length in
    batches of at most ``batch_size``; the same tokens as decoding every step from the start,
    ``tests/test_evaluation.py``). A query is skipped (and the next one taken) where the
    generation does not stop within ``max_new_tokens`` tokens, does not start with the task's
    ``answer_prefix``, leaves an empty answer or one with surrounding whitespace or an incomplete
    character, or where the answer's continuation does not tokenise as answer tokens then a
    line-break token (as :func:`encode_task_examples` requires). A query is also skipped where
    its answer and itself are an example's query and answer the other way round (``late -> early``
    for the example ``early -> late``): such a row would hand the fit a test example's pair.

    Raises:
        InputError: Fewer than ``n`` usable queries (the message says how many).

    Example:
        >>> query_answers(model, task, 2)  # doctest: +SKIP
        [('swim', 'swam'), ('dance', 'danced')]
    """
    return _answer_queries(model, task, n, batch_size, max_new_tokens, keep_runs=False)[0]


def _answer_queries(
    model: HookedTransformer, task: Task, n: int, batch_size: int, max_new_tokens: int, keep_runs: bool
) -> tuple[list[tuple[str, str]], list[tuple[_Example, Tensor, tuple[Tensor, Tensor], int]]]:
    """:func:`query_answers`, and with ``keep_runs`` each answered query's run: ``(its example
    (:func:`_encode`), the tokens run (the prompt then the generated tokens but the last), their
    residual stream from the first position after the chunk on (``_greedy_cached``'s records),
    that position)``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    if n == 0:
        return [], []
    stops = stop_tokens(model)
    unembed_weight = model.W_U.T.contiguous()
    prefix = task.answer_prefix
    examples = set(task.examples)
    out: list[tuple[str, str]] = []
    runs = []
    start = 0
    with _tl.linear_layout(model):
        while len(out) < n and start < len(task.queries):
            # the queries still wanted (at least a batch's), grouped by length in batches of batch_size
            batch = task.queries[start : start + max(batch_size, n - len(out))]
            start += len(batch)
            encoded = [encode_example(model, task.template, task.chunk, q) for q in batch]
            prompts = [e.full.cpu() for e in encoded]
            records = [] if keep_runs else None
            first = min(e.stop for e in encoded)
            generated, stopped = _greedy_cached(model, prompts, lambda i, g: len(g) <= max_new_tokens, stops,
                                                unembed_weight, batch_size, record_from=first, records=records)
            for k, (query, tokens, ended) in enumerate(zip(batch, generated, stopped)):
                text = model.tokenizer.decode(tokens)
                answer = text[len(prefix):]
                if not ended or not text.startswith(prefix) or "\ufffd" in answer or answer != answer.strip() \
                        or not answer or (answer, query) in examples:
                    continue
                try:
                    example = _encode(model, task, query, answer)
                except ChunkError:
                    continue
                out.append((query, answer))
                if keep_runs:
                    run = torch.cat([prompts[k], torch.tensor(tokens, dtype=prompts[k].dtype)])
                    runs.append((example, run, records[k], first))
                if len(out) == n:
                    break
    if len(out) < n:
        raise InputError(
            f"task {task.name!r}: {len(out)} of its {len(task.queries)} unlabelled queries are answered by "
            f"the model with the chunk, {n} wanted (add queries to the task file or lower n_queries)"
        )
    return out, runs


def _run_to_end(
    model: HookedTransformer,
    x: Tensor,
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    prefix: TransformerLensKeyValueCache | None = None,
) -> Tensor:
    """The residual stream after the last block (or before block ``stop_at_layer``), from tokens
    or from a residual at a layer; with ``prefix`` (:func:`tl_thoughts._tl.prefix_cache`), of
    tokens that follow that one sequence's tokens in every sequence of the batch."""
    n_layers = model.cfg.n_layers
    stop = n_layers if stop_at_layer is None else min(stop_at_layer, n_layers)
    if start_at_layer is not None and start_at_layer >= stop:
        return x
    mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
    cache = None if prefix is None else _tl.broadcast_cache(prefix, x.shape[0])
    return model(x, start_at_layer=start_at_layer, stop_at_layer=stop, attention_mask=mask, past_kv_cache=cache)


@torch.no_grad()
def greedy_match(
    model: HookedTransformer,
    examples: list[_Example],
    *,
    with_chunk: bool,
    hooks: HookFactory | None = None,
    stops: Bool[Tensor, " d_vocab"] | None = None,
    batch_size: int = 32,
    unembed_weight: Float[Tensor, "d_vocab d_model"] | None = None,
    compare: str = "text",
    _prefix: "Prefix | None" = None,
) -> tuple[Bool[Tensor, " n"], Float[Tensor, " n"]]:
    """Whether greedy decoding gives each example's answer (as text, after normalising
    whitespace), and the mean log-probability of its continuation's tokens, in one teacher-forced
    forward pass per batch. Where the greedy tokens leave the answer's tokens for a token whose text
    still fits the answer (another tokenization of the same text), that example is decoded for
    real (:func:`greedy_generate`'s loop, under the same hooks and patch) and compared as text.
    With the chunk, no ``hooks`` and no hook attached to the model, the first tokens every prompt
    shares (the prefix and the chunk) run once, read from TransformerLens' key-value cache: the
    same verdicts (``tests/test_evaluation.py``).

    Args:
        model: The model (as it is: apply a patch around the call to test the patch).
        examples: From :func:`encode_task_examples`.
        with_chunk: Run the prompts with the chunk (``full``) or without (``reduced``).
        hooks: ``hooks(batch_examples, with_chunk)`` -> TransformerLens forward hooks for a batch
            (steering, task vectors).
        stops: :func:`stop_tokens` (computed if not given).
        batch_size: Sequences per forward pass.
        unembed_weight: ``model.W_U.T.contiguous()`` if the caller has it (saves one copy of the
            unembedding per call).
        compare: ``"text"`` (the protocol) or ``"tokens"``: right only when the greedy tokens are
            the tokenizer's tokens of the answer (no decoding; stricter where the model spells an
            answer with other tokens).
        _prefix: Internal (:func:`_match_under`): ``(k, cache)``, the first ``k`` tokens of every
            prompt read from ``cache`` instead of run (no ``hooks`` then).

    Returns:
        ``(right [n], mean log-probability of the continuation's tokens [n])``.

    Example:
        >>> examples = encode_task_examples(model, task, range(10))  # doctest: +SKIP
        >>> right, logprob = greedy_match(model, examples, with_chunk=True)  # doctest: +SKIP
    """
    if compare not in ("text", "tokens"):
        raise ValueError(f"compare must be 'text' or 'tokens', got {compare!r}")
    stops = stop_tokens(model) if stops is None else stops
    right, logprob = [], []
    device = _tl.model_device(model)
    unembed_weight = model.W_U.T.contiguous() if unembed_weight is None else unembed_weight
    # the caller's prefix (_match_under) or, with the chunk, the first tokens every prompt shares
    # run once (TransformerLens' key-value cache), where no hook could depend on positions; the
    # verdicts read positions after them
    shared, prefix = _prefix if _prefix is not None else (0, None)
    if _prefix is not None and hooks is not None:
        raise ValueError("hooks count positions from each sequence's start: no hooks with a prefix cache")
    if _prefix is None and with_chunk and hooks is None and examples and not _tl.hooked_points(model):
        shared = shared_prefix_length([e.enc.full for e in examples], upto=min(e.last_prompt_full for e in examples))
        prefix = _tl.prefix_cache(model, examples[0].enc.full[None, :shared]) if shared else None
    for b in range(0, len(examples), batch_size):
        batch = examples[b : b + batch_size]
        seqs = [e.enc.full if with_chunk else e.enc.reduced for e in batch]
        with _tl.hooked(model, hooks(batch, with_chunk) if hooks else []):
            # the last position (the line break's) predicts nothing the verdicts read: not run
            final = _run_to_end(model, _pad([q[shared:_read_end(e, q)] for e, q in zip(batch, seqs)]).to(device),
                                prefix=prefix)
            if shared:  # the shared positions' rows, never read: the verdicts' positions line up
                final = torch.cat([final.new_zeros(len(batch), shared, final.shape[-1]), final], dim=1)
        r, lp, open_ = _verdicts(model, batch, seqs, final, stops, unembed_weight)
        reopen = [i for i, path in enumerate(open_) if path is not None and compare == "text"]
        if reopen:
            decoded = _decode_open(model, [batch[i] for i in reopen], with_chunk, [open_[i] for i in reopen],
                                   hooks, stops, unembed_weight, _prefix)
            for i, verdict in zip(reopen, decoded):
                r[i] = verdict
        right += r
        logprob += lp
    return torch.tensor(right, dtype=torch.bool), torch.tensor(logprob, dtype=torch.float64)


def _match_under(
    model: HookedTransformer,
    patch: ThoughtPatch,
    examples: list[_Example],
    *,
    stops: Bool[Tensor, " d_vocab"],
    batch_size: int,
    unembed_weight: Float[Tensor, "d_vocab d_model"],
) -> tuple[Bool[Tensor, " n"], Float[Tensor, " n"]]:
    """:func:`greedy_match` without the chunk under ``patch``, in its weight form: one product per
    patched matrix where the activation form's hooks compute two. The positions the patch leaves
    unpatched (:attr:`ThoughtPatch.unpatched_positions`, the same tokens in every prompt) run
    once, unpatched, into TransformerLens' key-value cache, which the patched positions read: the
    values of ``with patch.apply(model): greedy_match(...)`` (the activation form), up to
    floating-point rounding (``tests/test_evaluation.py``).

    Raises:
        InputError: the prompts differ within those positions (one template gives them all the
            same tokens).
    """
    k = patch.unpatched_positions
    if k and shared_prefix_length([e.enc.reduced for e in examples]) < k:
        raise InputError(f"the patch leaves the first {k} position(s) unpatched, but the prompts' first {k} "
                         "tokens differ: one cache cannot hold them")
    prefix = (k, _tl.prefix_cache(model, examples[0].enc.reduced[None, :k])) if k and examples else None
    patch.check_compatible(model)
    with _tl.swapped_tensors(model, patch.parameters(model)):
        return greedy_match(model, examples, with_chunk=False, stops=stops, batch_size=batch_size,
                            unembed_weight=unembed_weight, _prefix=prefix)


def chunk_filter(
    model: HookedTransformer,
    examples: list[_Example],
    *,
    stops: Bool[Tensor, " d_vocab"] | None = None,
    batch_size: int = 32,
) -> tuple[Bool[Tensor, " n"], Bool[Tensor, " n"], Bool[Tensor, " n"]]:
    """The protocol's filter: ``(keep, right with the chunk, right without it)``, where ``keep``
    marks the examples right WITH the chunk and wrong WITHOUT it.

    Example:
        >>> keep, with_right, without_right = chunk_filter(model, examples)  # doctest: +SKIP
    """
    with_right, _ = greedy_match(model, examples, with_chunk=True, stops=stops, batch_size=batch_size)
    without_right, _ = greedy_match(model, examples, with_chunk=False, stops=stops, batch_size=batch_size)
    return with_right & ~without_right, with_right, without_right


@torch.no_grad()
def example_verdicts(
    model: HookedTransformer, task: Task, *, batch_size: int = 32
) -> tuple[Bool[Tensor, " n_examples"], Bool[Tensor, " n_examples"]]:
    """Every example of ``task`` right with the chunk / right without it (no patch), by example
    index. An example's verdicts do not depend on the seed's split, so the protocol computes them
    once a task and each seed filters its test examples with them (:func:`evaluate_seed`).

    Example:
        >>> with_right, without_right = example_verdicts(model, task)  # doctest: +SKIP
        >>> keep = with_right & ~without_right  # the protocol's filter, every example  # doctest: +SKIP
    """
    with _tl.linear_layout(model):
        examples = encode_task_examples(model, task, range(len(task.examples)))
        _, with_right, without_right = chunk_filter(model, examples, stops=stop_tokens(model), batch_size=batch_size)
    return with_right, without_right


# --- the baselines ---------------------------------------------------------------------------------


def _shared_full_length(examples: list[_Example], pool: str) -> int:
    """:func:`~tl_thoughts.templates.shared_prefix_length` of the prompts with the chunk, up to
    the first position :func:`_mean_differences` reads (pooled or last prompt position)."""
    first_read = min(min([e.last_prompt_full] + e.enc.pooled(pool).tolist()) for e in examples)
    return shared_prefix_length([e.enc.full for e in examples], upto=first_read)


@dataclass
class DifferenceSums:
    """The steering baselines' sums over some examples (:func:`difference_sums`): of
    ``resid(full) - resid(reduced)`` over their pooled positions at ``blocks.0.hook_resid_pre``
    then every ``blocks.{l}.hook_resid_post`` (``diff``, ``[n_layers + 1, d_model]``, over
    ``n_positions``), and of the full run's ``resid_post`` at the last prompt position (``task``,
    ``[n_layers, d_model]``, over ``n_examples``), float64. Sums over disjoint sets of examples add
    up (``+``) to the sums over their union: the answered queries' part, the same in every seed, is
    computed once a task (:func:`query_difference_sums`)."""

    diff: Float[Tensor, "layer1 d_model"]
    n_positions: int
    task: Float[Tensor, "layer d_model"]
    n_examples: int

    def __add__(self, other: "DifferenceSums") -> "DifferenceSums":
        return DifferenceSums(self.diff + other.diff, self.n_positions + other.n_positions,
                              self.task + other.task, self.n_examples + other.n_examples)

    def means(self) -> tuple[Float[Tensor, "layer1 d_model"], Float[Tensor, "layer d_model"]]:
        """The mean differences and the task vectors (:func:`_mean_differences`)."""
        if self.n_positions == 0 or self.n_examples == 0:
            raise InputError("no pooled position to average the steering baselines over")
        return self.diff / self.n_positions, self.task / self.n_examples


@torch.no_grad()
def difference_sums(
    model: HookedTransformer, examples: list[_Example], pool: str, batch_size: int, full_rows: FullRows | None = None
) -> DifferenceSums:
    """:class:`DifferenceSums` over ``examples`` (none: zero sums). The positions every prompt with
    the chunk shares (the prefix and the chunk) run once, their keys and values read by every batch
    from TransformerLens' key-value cache. ``full_rows``: :class:`tl_thoughts.thoughts.FullRows`
    holding every example's prompt with the chunk at its ``pool`` positions and its last prompt
    position (:func:`query_full_rows` of the same queries): the sums with the chunk are read from
    them instead of run (the same sums up to floating-point rounding).

    Example:
        >>> fit_part = difference_sums(model, encode_task_examples(model, task, range(20)), "answer", 64)  # doctest: +SKIP
        >>> deltas, task_vectors = (fit_part + query_difference_sums(model, task, queries, config)).means()  # doctest: +SKIP
    """
    n_layers = model.cfg.n_layers
    names = ["blocks.0.hook_resid_pre"] + [_tl.resid_post_name(layer) for layer in range(n_layers)]
    diff = torch.zeros(n_layers + 1, model.cfg.d_model, dtype=torch.float64)
    task = torch.zeros(n_layers, model.cfg.d_model, dtype=torch.float64)
    n_pos = 0
    if not examples:
        return DifferenceSums(diff, 0, task, 0)
    device = _tl.model_device(model)
    read = _rows_read(full_rows, examples, pool)
    shared = _shared_full_length(examples, pool) if read is None else 0
    prefix = _tl.prefix_cache(model, examples[0].enc.full[None, :shared]) if shared else None
    if read is not None:  # the prompts with the chunk: their rows given
        pooled_rows, last_rows = (torch.cat(rows) for rows in zip(*read))
        diff += full_rows.pre[:, pooled_rows].double().sum(1)
        task += full_rows.pre[1:, last_rows].double().sum(1)
    # batches of examples of similar lengths: the fewer padded positions, the less each batch computes
    examples = sorted(examples, key=lambda e: (e.enc.full.shape[0], e.enc.reduced.shape[0]))
    for b in range(0, len(examples), batch_size):
        batch = examples[b : b + batch_size]
        pooled = [e.enc.pooled(pool) for e in batch]
        in_batch = torch.cat([torch.full_like(p, i) for i, p in enumerate(pooled)])
        pooled_full = (in_batch, torch.cat(pooled) - shared)  # the full prompts run from position ``shared``
        reduced_pos = [e.enc.to_reduced(p) for e, p in zip(batch, pooled)]
        pooled_reduced = (in_batch, torch.cat(reduced_pos))
        last_full = (torch.arange(len(batch)), torch.tensor([e.last_prompt_full - shared for e in batch]))
        picked = {}
        # each prompt up to the last position read (the later ones change nothing read: causal attention)
        ends = {"full": [max([e.last_prompt_full] + p.tolist()) + 1 for e, p in zip(batch, pooled)],
                "reduced": [max([0] + r.tolist()) + 1 for r in reduced_pos]}
        runs = (("full", shared, (pooled_full, last_full)), ("reduced", 0, (pooled_reduced,)))
        for which, skip, rows in runs[1:] if read is not None else runs:
            tokens = _pad([getattr(e.enc, which)[skip:end] for e, end in zip(batch, ends[which])]).to(device)
            store: dict[str, list[Tensor]] = {}

            def save(act, hook, store=store, rows=rows):  # the rows read, not every position
                store[hook.name] = [act[r].detach().double().cpu() for r in rows]

            with _tl.hooked(model, [(name, save) for name in names]):
                _run_to_end(model, tokens, prefix=prefix if skip else None)
            picked[which] = [torch.stack([store[name][k] for name in names]) for k in range(len(rows))]  # [L+1, n, d]
        (reduced,) = picked["reduced"]
        if read is None:
            (full, last) = picked["full"]
            diff += (full - reduced).sum(1)
            task += last[1:].sum(1)
        else:  # the sums with the chunk were added above
            diff -= reduced.sum(1)
        n_pos += reduced.shape[1]
    return DifferenceSums(diff, n_pos, task, len(examples))


def _rows_read(full_rows: FullRows | None, examples: list[_Example], pool: str) -> list[tuple[Tensor, Tensor]] | None:
    """Where ``full_rows`` holds every example's prompt with the chunk at its ``pool`` positions and
    its last prompt position: per example, the indices of those rows (pooled, last); else None."""
    if full_rows is None or full_rows.pool != pool:
        return None
    read = []
    for e in examples:
        idx = full_rows.rows_of(e.enc.full)
        if idx is None:
            return None
        positions, pooled = full_rows.positions[idx], e.enc.pooled(pool)
        last = (positions == e.last_prompt_full).nonzero()
        if not torch.equal(positions[: len(pooled)], pooled) or len(last) == 0:
            return None
        read.append((idx[: len(pooled)], idx[last[0]]))
    return read


def _mean_differences(
    model: HookedTransformer, examples: list[_Example], pool: str, batch_size: int
) -> tuple[Float[Tensor, "layer1 d_model"], Float[Tensor, "layer d_model"]]:
    """Mean over the examples' pooled positions of ``resid(full) - resid(reduced)`` at
    ``blocks.0.hook_resid_pre`` then every ``blocks.{l}.hook_resid_post`` (``[n_layers + 1, d]``),
    and the task vectors: mean full-run ``resid_post`` at the last prompt position (``[n_layers, d]``)
    (:func:`difference_sums`, :meth:`DifferenceSums.means`)."""
    return difference_sums(model, examples, pool, batch_size).means()


def query_difference_sums(
    model: HookedTransformer, task: Task, queries: Sequence[tuple[str, str]], config: EvalConfig,
    query_rows: FullRows | None = None,
) -> DifferenceSums | None:
    """The answered queries' part of the steering baselines' sums (:class:`DifferenceSums`), the
    same in every seed (the seeds differ in their fit examples only): what :func:`evaluate_seed`
    takes as ``query_sums``. None where ``config`` runs no steering baseline. ``query_rows``: the
    queries' :func:`query_full_rows`, if computed: the sums with the chunk are read from them
    (:func:`difference_sums`).

    Example:
        >>> queries = query_answers(model, task, config.n_queries)  # doctest: +SKIP
        >>> sums = query_difference_sums(model, task, queries, config)  # doctest: +SKIP
        >>> seed = evaluate_seed(model, task, config, 0, queries=queries, query_sums=sums)  # doctest: +SKIP
    """
    if not set(BASELINES) & set(config.methods):
        return None
    with _tl.linear_layout(model):
        rows = [_encode(model, task, q, a) for q, a in queries]
        return difference_sums(model, rows, config.pool, config.batch_size, query_rows)


def query_full_rows(
    model: HookedTransformer, task: Task, queries: Sequence[tuple[str, str]], config: EvalConfig
) -> FullRows | None:
    """The answered queries' prompts with the chunk, streamed through every block once, at the rows
    the fits read (:func:`tl_thoughts.thoughts.full_prompt_rows`): the same in every seed (the
    seeds' fit rows differ in their labelled examples only), so that each seed's fit streams
    the labelled examples' prompts with the chunk only. None where ``config`` fits no patch or
    has no query.

    Example:
        >>> rows = query_full_rows(model, task, queries, config)  # doctest: +SKIP
        >>> seed = evaluate_seed(model, task, config, 0, queries=queries, query_rows=rows)  # doctest: +SKIP
    """
    if not queries or not _fit_kinds(config.methods):
        return None
    with _tl.linear_layout(model):
        return full_prompt_rows(model, task.chunk, [(q, task.continuation(a)) for q, a in queries],
                                template=task.template, pool=config.pool, query_weight=config.query_weight,
                                batch_size=config.batch_size)


def query_answers_with_rows(
    model: HookedTransformer, task: Task, config: EvalConfig, *, max_new_tokens: int = 16
) -> tuple[list[tuple[str, str]], FullRows | None]:
    """:func:`query_answers` of ``config.n_queries`` queries and their :func:`query_full_rows`, the
    rows read from the decoding's own runs: greedy decoding runs each answered query's prompt
    with the chunk, then its answer's tokens, through every block, which is the prompt a fit reads
    up to its last fitted row. The same queries as :func:`query_answers`, and the rows of
    :func:`query_full_rows` up to floating-point rounding (the decoding runs other shapes;
    ``tests/test_evaluation.py::test_query_rows_from_the_decoding_equal_the_streamed_ones``).
    A query whose answer the decoding spelt with other tokens than its continuation's tokenization
    (then the prompt differs from the run) is streamed as :func:`query_full_rows` streams it.

    Raises:
        InputError: Fewer than ``config.n_queries`` usable queries.
        UnsupportedArchitectureError: rows wanted on a model with norms after its sublayers (as
            :func:`tl_thoughts.thoughts.full_prompt_rows`).

    Example:
        >>> queries, rows = query_answers_with_rows(model, task, config)  # doctest: +SKIP
        >>> seed = evaluate_seed(model, task, config, 0, queries=queries, query_rows=rows)  # doctest: +SKIP
    """
    want_rows = config.n_queries > 0 and bool(_fit_kinds(config.methods))
    if want_rows and _tl.model_spec(model).post_norm:
        raise UnsupportedArchitectureError(
            "the queries' rows are read as fit_thought reads them, which does not support blocks with norms "
            "after their sublayers (Gemma 2/3 use_normalization_before_and_after, OLMo 2)"
        )
    queries, runs = _answer_queries(model, task, config.n_queries, config.batch_size, max_new_tokens,
                                    keep_runs=want_rows)
    if not want_rows:
        return queries, None
    parts: list[tuple[Tensor, Tensor] | None] = []
    fitted = [_fitted_rows(example.enc, config.pool, config.query_weight)[0] for example, _, _, _ in runs]
    for positions, (example, run, (pre, attn), first) in zip(fitted, runs):
        end = int(positions.max()) + 1 if len(positions) else 0  # the rows read depend on the tokens before them
        same = run.shape[0] >= end and torch.equal(example.enc.full[:end].cpu(), run[:end])
        if same and (not len(positions) or int(positions.min()) >= first):
            parts.append((pre[:, positions - first], attn[:, positions - first]))
        else:
            parts.append(None)
    missing = [i for i, part in enumerate(parts) if part is None]
    if missing:  # another tokenization of the answer than the run's: streamed
        with _tl.linear_layout(model):
            streamed = full_prompt_rows(model, task.chunk, [(q, task.continuation(a)) for q, a in
                                                            (queries[i] for i in missing)],
                                        template=task.template, pool=config.pool, query_weight=config.query_weight,
                                        batch_size=config.batch_size)
        for i in missing:
            idx = streamed.rows_of(runs[i][0].enc.full)
            parts[i] = (streamed.pre[:, idx], streamed.attn[:, idx])
    return queries, _assemble_full_rows(config.pool, config.query_weight, [r[0].enc for r in runs], fitted, parts)


def _region_start(examples: list[_Example]) -> int:
    """First position after the chunk's place in the reduced prompts (the same for every example
    of a task: the template puts the chunk at a fixed place)."""
    starts = {e.enc.start for e in examples}
    if len(starts) != 1:
        raise InputError("the chunk must start at the same token position in every prompt of a task")
    return starts.pop()


def _add_from(start: int, vector: Tensor) -> Callable:
    def hook(act, hook):
        act = act.clone()
        act[:, start:] += vector.to(act.dtype)
        return act

    return hook


def _steering_hooks(deltas: Float[Tensor, "layer1 d_model"], layers: Sequence[int], start: int) -> HookFactory:
    """Hooks adding the mean residual difference after each block of ``layers`` (index ``l + 1`` of
    ``deltas``) at every position from ``start`` on, in runs without the chunk."""

    def make(batch, with_chunk):
        return [(_tl.resid_post_name(layer), _add_from(start, deltas[layer + 1])) for layer in layers]

    return make


def _all_layer_steering_hooks(deltas: Float[Tensor, "layer1 d_model"], start: int) -> HookFactory:
    """At every block, the increment of the mean residual difference (``deltas[l+1] - deltas[l]``),
    plus ``deltas[0]`` on the embeddings: the vectors add up to ``deltas[l+1]`` after block ``l``."""
    n_layers = deltas.shape[0] - 1

    def make(batch, with_chunk):
        hooks = [("blocks.0.hook_resid_pre", _add_from(start, deltas[0]))] if bool(deltas[0].any()) else []
        hooks += [
            (_tl.resid_post_name(layer), _add_from(start, deltas[layer + 1] - deltas[layer]))
            for layer in range(n_layers)
        ]
        return hooks

    return make


def _task_vector_hooks(vectors: Float[Tensor, "layer d_model"], layer: int) -> HookFactory:
    """Hooks writing the task vector of ``layer`` over the residual stream after block ``layer`` at
    each prompt's last position (the one predicting the answer), in runs without the chunk."""

    def make(batch, with_chunk):
        rows = torch.arange(len(batch))
        cols = torch.tensor([e.last_prompt_reduced for e in batch])

        def hook(act, hook):
            act = act.clone()
            act[rows, cols] = vectors[layer].to(act.dtype)
            return act

        return [(_tl.resid_post_name(layer), hook)]

    return make


@dataclass(frozen=True)
class ResidEdit:
    """A residual edit of :func:`_best_layers`: ``apply(layer, resid_after_block_layer, batch)``
    returns the edited residual (it may edit in place), changing no position before
    ``first(batch)``."""

    apply: Callable[[int, Tensor, list[_Example]], Tensor]
    first: Callable[[list[_Example]], int]


def _steering_edit(deltas: Tensor, start: int) -> ResidEdit:
    def edit(layer: int, x: Tensor, batch: list[_Example]) -> Tensor:
        x[:, start:] += deltas[layer + 1].to(x.dtype)
        return x

    return ResidEdit(edit, lambda batch: start)


def _task_vector_edit(vectors: Tensor) -> ResidEdit:
    def edit(layer: int, x: Tensor, batch: list[_Example]) -> Tensor:
        x[torch.arange(len(batch)), torch.tensor([e.last_prompt_reduced for e in batch])] = vectors[layer].to(x.dtype)
        return x

    return ResidEdit(edit, lambda batch: min(e.last_prompt_reduced for e in batch))


@torch.no_grad()
def _best_layers(
    model: HookedTransformer, fit_set: list[_Example], edits: dict[str, ResidEdit], stops, batch_size: int
) -> dict[str, tuple[int, list[float], list[float]]]:
    """For each named residual edit, the layer whose edit does best on the fit examples without
    the chunk (accuracy, then mean log-probability), and the accuracy and mean log-probability of
    every layer's edit.

    Every candidate runs from the cached residual after its block, not from the start, and the
    candidates run together, staggered: block ``k`` runs once on the stack of every candidate
    edited below it (the same products as one run per candidate, in ``n_layers`` calls instead of
    ``n_layers^2 / 2``). The positions before an edit's first one (:class:`ResidEdit`), which no
    edit changes (causal attention), do not run again: a candidate's block reads their keys and
    values from the unedited run, as TransformerLens' key-value cache holds them."""
    n_layers = model.cfg.n_layers
    device = _tl.model_device(model)
    unembed_weight = model.W_U.T.contiguous()
    names = [_tl.resid_post_name(layer) for layer in range(n_layers)]
    scores = {(e, layer): ({}, {}) for e in edits for layer in range(n_layers)}  # by example: right, logprob
    group = max(1, batch_size // 2)  # the stack holds up to len(edits) * n_layers * group sequences
    for indices in _search_groups(fit_set, edits, group):
        batch = [fit_set[i] for i in indices]
        seqs = [e.enc.reduced for e in batch]
        store: dict[str, Tensor] = {}

        def save(act, hook, store=store):
            store[hook.name] = act.detach().clone()

        tokens = _pad([s[:_read_end(e, s)] for e, s in zip(batch, seqs)]).to(device)
        kv = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(batch))  # filled by the run
        with _tl.hooked(model, [(name, save) for name in names]):
            model(tokens, stop_at_layer=n_layers, attention_mask=torch.ones_like(tokens), past_kv_cache=kv)
        # the edits by their first position (never after the first one the verdicts read)
        first_read = min(e.last_prompt_reduced for e in batch)
        by_first: dict[int, list[str]] = {}
        for name, edit in edits.items():
            by_first.setdefault(max(0, min(edit.first(batch), first_read)), []).append(name)
        order = {p: [] for p in by_first}
        stacks: dict[int, Tensor | None] = {p: None for p in by_first}
        for layer in range(n_layers):
            for p, family in by_first.items():
                new = []
                for name in family:
                    before = store[names[layer]]
                    edited = edits[name].apply(layer, before.clone(), batch)
                    if not torch.equal(edited[:, :p], before[:, :p]):
                        raise RuntimeError(f"the edit {name!r} changes positions before its first one ({p})")
                    new.append(edited[:, p:])
                order[p] += [(name, layer) for name in family]
                stack = torch.cat(([] if stacks[p] is None else [stacks[p]]) + new)
                stacks[p] = _run_block_after(model, stack, layer + 1, kv, p, len(batch))
        for p, keys in order.items():
            for i, key in enumerate(keys):
                final = stacks[p][i * len(batch) : (i + 1) * len(batch)]
                if p:  # the rows before p, never read: the verdicts' positions line up
                    final = torch.cat([final.new_zeros(len(batch), p, final.shape[-1]), final], dim=1)
                r, lp, _ = _verdicts(model, batch, seqs, final, stops, unembed_weight)  # token level: a ranking
                for i, right, logprob in zip(indices, r, lp):
                    scores[key][0][i], scores[key][1][i] = right, logprob
    best = {}
    for name in edits:
        # means in the examples' order, whatever the groups
        accuracy = [float(np.mean([scores[name, layer][0][i] for i in range(len(fit_set))])) for layer in range(n_layers)]
        logprob = [float(np.mean([scores[name, layer][1][i] for i in range(len(fit_set))])) for layer in range(n_layers)]
        layer = max(range(n_layers), key=lambda layer: (accuracy[layer], logprob[layer], -layer))
        best[name] = (layer, accuracy, logprob)
    return best


_GROUP_COST = 48  # a group's fixed cost in _search_groups, in positions run (its calls, its copies of the cache)


def _search_groups(examples: list[_Example], edits: dict[str, ResidEdit], most: int) -> list[list[int]]:
    """The examples of :func:`_best_layers` (their indices) in groups of at most ``most``, of similar lengths: sorted
    by the positions the verdicts read, cut where the positions each edit's candidates run (padding
    included: every sequence runs to its group's longest) plus :data:`_GROUP_COST` a group are
    fewest (dynamic programming over the cuts)."""
    order = sorted(range(len(examples)), key=lambda i: (_read_end(examples[i], examples[i].enc.reduced),
                                                       examples[i].last_prompt_reduced))

    def cost(indices: list[int]) -> int:
        batch = [examples[i] for i in indices]
        end = max(_read_end(e, e.enc.reduced) for e in batch)
        first_read = min(e.last_prompt_reduced for e in batch)
        return _GROUP_COST + sum(len(batch) * (end - max(0, min(edit.first(batch), first_read)))
                                 for edit in edits.values())

    best = [0] + [None] * len(order)  # best[j]: the cheapest cut of the first j examples
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(max(0, j - most), j):
            c = best[i] + cost(order[i:j])
            if best[j] is None or c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _run_block_after(
    model: HookedTransformer, stack: Tensor, layer: int, kv: TransformerLensKeyValueCache, p: int, n: int
) -> Tensor:
    """Block ``layer`` (none past the last) on ``stack``: candidates of ``n`` sequences each, holding
    their positions from ``p`` on; the positions before ``p`` are read from ``kv``, the key-value
    cache of the unedited run of the ``n`` sequences (:func:`_best_layers`), the same for every
    candidate."""
    if layer >= model.cfg.n_layers:
        return stack
    if p == 0:
        return _run_to_end(model, stack, start_at_layer=layer, stop_at_layer=layer + 1)
    copies = stack.shape[0] // n
    entry = kv.entries[layer]
    keys, values = (t[:, :p].repeat(copies, *[1] * (t.dim() - 1)) for t in (entry.past_keys, entry.past_values))
    entry = TransformerLensKeyValueCacheEntry(keys, values, frozen=True)
    mask = torch.ones(stack.shape[0], p + stack.shape[1], dtype=torch.long, device=stack.device)
    # only this block's entry is read (start_at_layer=layer, stop_at_layer=layer + 1)
    cache = TransformerLensKeyValueCache([entry] * model.cfg.n_layers, mask[:, :p], frozen=True)
    return model(stack, start_at_layer=layer, stop_at_layer=layer + 1, attention_mask=mask, past_kv_cache=cache)


# --- the protocol ------------------------------------------------------------------------------------


@dataclass
class SeedResult:
    """One seed of one task: the split, the filter, and every method's right/wrong per filtered
    test example."""

    seed: int
    fit_indices: list[int]
    test_indices: list[int]
    filtered_indices: list[int]
    with_chunk_all: float  # accuracy on all test examples (before filtering)
    without_chunk_all: float
    accuracy: dict[str, float] = field(default_factory=dict)  # on the filtered examples
    right: dict[str, list[bool]] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)  # layer chosen on fit data
    ranks: dict[str, int | None] = field(default_factory=dict)  # thought matrices' rank chosen on fit data
    seconds: float = 0.0


@torch.no_grad()
def choose_rank(
    model: HookedTransformer,
    patch: ThoughtPatch,
    ranks: Sequence[int | None],
    fit_set: list[_Example],
    *,
    stops: Bool[Tensor, " d_vocab"] | None = None,
    batch_size: int = 32,
    unembed_weight: Float[Tensor, "d_vocab d_model"] | None = None,
) -> tuple[ThoughtPatch, int | None]:
    """The patch with its thought matrices at the candidate rank (``None``: as fitted) that does
    best on ``fit_set`` without the chunk: accuracy, then mean log-probability of the
    continuations, then the smaller rank. With one candidate, that one (nothing is run).

    Example:
        >>> patch, rank = choose_rank(model, patch, (1, 4, 16, None), fit_set)  # doctest: +SKIP
    """
    ranks = list(ranks)
    ints = [r for r in ranks if r is not None]
    made = dict(zip(ints, patch.truncations(ints))) if ints else {}
    candidates = {r: (patch if r is None else made[r]) for r in ranks}
    if len(candidates) == 1:
        return candidates[ranks[0]], ranks[0]
    scores = {}
    stops = stop_tokens(model) if stops is None else stops
    unembed_weight = model.W_U.T.contiguous() if unembed_weight is None else unembed_weight
    for r, p in candidates.items():
        right, logprob = _match_under(model, p, fit_set, stops=stops, batch_size=batch_size,
                                      unembed_weight=unembed_weight)
        size = float("inf") if r is None else r
        scores[r] = (float(right.double().mean()), float(logprob.mean()), -size)
    best = max(ranks, key=lambda r: scores[r])
    return candidates[best], best


def split(n_examples: int, n_fit: int, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint fit and test indices, from a seeded permutation (deterministic across machines).

    Example:
        >>> fit, test = split(80, 20, seed=0)
        >>> len(fit), len(test), set(fit) & set(test)
        (20, 60, set())
    """
    if n_fit >= n_examples:
        raise InputError(f"n_fit={n_fit} leaves no test example out of {n_examples}")
    order = np.random.default_rng(seed).permutation(n_examples).tolist()
    return sorted(order[:n_fit]), sorted(order[n_fit:])


@torch.no_grad()
def evaluate_seed(
    model: HookedTransformer,
    task: Task,
    config: EvalConfig,
    seed: int,
    verdicts: tuple[Bool[Tensor, " n_examples"], Bool[Tensor, " n_examples"]] | None = None,
    queries: Sequence[tuple[str, str]] | None = None,
    query_sums: DifferenceSums | None = None,
    query_rows: FullRows | None = None,
) -> SeedResult:
    """The protocol on one seed (see the module docstring). ``verdicts``: the task's
    :func:`example_verdicts` if the caller has them (computed here otherwise; the same either
    way); ``queries``: likewise its :func:`query_answers` for ``config.n_queries``;
    ``query_sums``: likewise :func:`query_difference_sums` of those queries (the steering
    baselines' part that is the same in every seed; ignored where ``config`` runs no baseline);
    ``query_rows``: likewise :func:`query_full_rows` (the prompts with the chunk of those queries,
    which the fits read instead of streaming them again; with neither ``queries`` nor
    ``query_rows`` given, both come from :func:`query_answers_with_rows`).
    The model is left as it was (its gated MLP weights are stored transposed in memory during the
    runs, :func:`tl_thoughts._tl.linear_layout`).

    Example:
        >>> seed = evaluate_seed(load_default_model(), task, EvalConfig(), seed=0)  # doctest: +SKIP
        >>> seed.accuracy["thought_patch"], len(seed.filtered_indices)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if queries is not None and len(queries) != config.n_queries:
        raise InputError(f"{len(queries)} answered queries given, config.n_queries is {config.n_queries}")
    if verdicts is None:
        verdicts = example_verdicts(model, task, batch_size=config.batch_size)
    if any(tuple(v.shape) != (len(task.examples),) for v in verdicts):
        raise InputError(f"verdicts must hold one value per example of {task.name!r} ({len(task.examples)})")
    if queries is None and query_rows is None:
        queries, query_rows = query_answers_with_rows(model, task, config)
    elif queries is None:
        queries = query_answers(model, task, config.n_queries, batch_size=config.batch_size)
    if query_rows is None:
        query_rows = query_full_rows(model, task, queries, config)
    if query_sums is None:
        query_sums = query_difference_sums(model, task, queries, config, query_rows)
    elif query_sums.n_examples != len(queries):
        raise InputError(f"query_sums are sums over {query_sums.n_examples} queries, {len(queries)} queries given")
    with _tl.linear_layout(model):
        result = _evaluate_seed(model, task, config, seed, verdicts, list(queries), query_sums, query_rows)
    result.seconds = time.perf_counter() - t0
    return result


def _evaluate_seed(
    model: HookedTransformer, task: Task, config: EvalConfig, seed: int, verdicts: tuple[Tensor, Tensor],
    queries: list[tuple[str, str]], query_sums: DifferenceSums | None, query_rows: FullRows | None,
) -> SeedResult:
    stops = stop_tokens(model)
    fit_idx, test_idx = split(len(task.examples), config.n_fit, seed)
    fit_set = encode_task_examples(model, task, fit_idx)  # labelled: the choices on fit data
    test_set = encode_task_examples(model, task, test_idx)
    bs = config.batch_size
    with_right, without_right = (v[torch.tensor(test_idx)] for v in verdicts)
    keep = with_right & ~without_right
    filtered = [e for e, k in zip(test_set, keep.tolist()) if k]
    result = SeedResult(
        seed=seed,
        fit_indices=fit_idx,
        test_indices=test_idx,
        filtered_indices=[i for i, k in zip(test_idx, keep.tolist()) if k],
        with_chunk_all=float(with_right.double().mean()),
        without_chunk_all=float(without_right.double().mean()),
    )
    result.right["with_chunk"] = [True] * len(filtered)
    result.right["without_chunk"] = [False] * len(filtered)

    unembed_weight = model.W_U.T.contiguous()

    def run(name: str, hooks: HookFactory | None = None, patch: ThoughtPatch | None = None) -> None:
        if patch is not None:  # in its weight form
            right, _ = _match_under(model, patch, filtered, stops=stops, batch_size=bs, unembed_weight=unembed_weight)
        else:
            right, _ = greedy_match(model, filtered, with_chunk=False, hooks=hooks, stops=stops, batch_size=bs,
                                    unembed_weight=unembed_weight)
        result.right[name] = right.tolist()

    if filtered:
        # every method is fitted on the fit examples plus the answered queries
        labelled = task.fit_examples(fit_idx)
        fit_pairs = labelled + [(q, task.continuation(a)) for q, a in queries]
        wanted = set(BASELINES) & set(config.methods)
        # the answered queries as protocol rows, where the rank choice or the baselines use them
        query_set = [_encode(model, task, q, a) for q, a in queries] if config.rank_on_queries or wanted else []
        refine = "thought_patch_refined" in config.methods
        parts = [name for name in PART_METHODS if name in config.methods]
        kinds = _fit_kinds(config.methods)
        patches = fit_thoughts(  # the prompts with the chunk streamed once for all the fits, the queries' read
            model, task.chunk, fit_pairs, fits=list(kinds.values()), template=task.template,
            compare_steering=False, progress=False, batch_size=bs, _full_rows=query_rows,
            **config.fit_options_for(len(fit_pairs)),
        ) if kinds else {}
        for name, kind in kinds.items():
            patch = patches[kind]
            if name == "thought_patch":
                for part in parts:  # the least-squares patch's vectors alone, its matrices alone (as fitted)
                    run(part, patch=patch.only(PART_METHODS[part]))
                choice_set = fit_set + query_set if config.rank_on_queries else fit_set
                patch, rank = choose_rank(model, patch, config.ranks, choice_set, stops=stops,
                                          batch_size=bs, unembed_weight=unembed_weight)
                if refine:  # from the least-squares patch at its chosen rank
                    # trained on the labelled answers only (the queries' answers are the chunk's own)
                    refined = refine_thought(model, patch, labelled, steps=config.refine_steps,
                                             lr=config.refine_lr, batch_size=bs, progress=False)
                    result.ranks["thought_patch_refined"] = rank
                    run("thought_patch_refined", patch=refined)
                if name not in config.methods:
                    continue
                result.ranks[name] = rank
            run(name, patch=patch)
        if wanted:
            # the fit examples' sums, plus the queries' (the same in every seed: computed once a task)
            deltas, task_vectors = (difference_sums(model, fit_set, config.pool, bs) + query_sums).means()
            start = _region_start(fit_set + query_set + filtered)
            edits = {"steering_best_layer": _steering_edit(deltas, start), "task_vector": _task_vector_edit(task_vectors)}
            edits = {name: edit for name, edit in edits.items() if name in wanted}
            best = _best_layers(model, fit_set, edits, stops, bs) if edits else {}
            if "steering_best_layer" in wanted:
                layer = best["steering_best_layer"][0]
                result.layers["steering_best_layer"] = layer
                run("steering_best_layer", _steering_hooks(deltas, [layer], start))
            if "steering_all_layers" in wanted:
                run("steering_all_layers", _all_layer_steering_hooks(deltas, start))
            if "task_vector" in wanted:
                layer = best["task_vector"][0]
                result.layers["task_vector"] = layer
                run("task_vector", _task_vector_hooks(task_vectors, layer))
    for name in config.methods:
        values = result.right.get(name, [])
        result.accuracy[name] = float(np.mean(values)) if values else float("nan")
    return result


@dataclass
class TaskResult:
    """All seeds of one task."""

    task: str
    n_examples: int
    seeds: list[SeedResult]
    queries: list[tuple[str, str]] = field(default_factory=list)  # answered unlabelled queries, every seed

    def summary(self, method: str) -> dict:
        """``accuracy`` (mean over seeds with filtered examples), ``std``, ``per_seed``,
        ``n_filtered`` (per seed)."""
        per_seed = [s.accuracy.get(method, float("nan")) for s in self.seeds]
        valid = [a for a in per_seed if not np.isnan(a)]
        return {
            "accuracy": float(np.mean(valid)) if valid else None,
            "std": float(np.std(valid)) if valid else None,
            "per_seed": [None if np.isnan(a) else a for a in per_seed],
            "n_filtered": [len(s.filtered_indices) for s in self.seeds],
        }


def evaluate_task(
    model: HookedTransformer, task: Task, config: EvalConfig = EvalConfig(), progress: bool = True
) -> TaskResult:
    """Run the protocol on ``task`` for every seed of ``config``. The model is left untouched
    (every patch and hook is removed on exit, also on an exception).

    Example:
        >>> from tl_thoughts.tasks import load_task, shipped_tasks
        >>> result = evaluate_task(load_default_model(), load_task(shipped_tasks()[0]))  # doctest: +SKIP
        >>> result.summary("thought_patch")["accuracy"]  # doctest: +SKIP
    """
    _tl.model_spec(model)
    _tl.check_no_hooks(model)
    # once for every seed
    verdicts = example_verdicts(model, task, batch_size=config.batch_size)
    queries, query_rows = query_answers_with_rows(model, task, config)
    query_sums = query_difference_sums(model, task, queries, config, query_rows)
    seeds = [
        evaluate_seed(model, task, config, seed, verdicts, queries, query_sums, query_rows)
        for seed in tqdm(config.seeds, desc=f"{task.name}: seeds", disable=not progress)
    ]
    return TaskResult(task=task.name, n_examples=len(task.examples), seeds=seeds, queries=queries)


_WORKER_MODEL: HookedTransformer | None = None


def _worker_init(dtype: torch.dtype, threads: int) -> None:
    """A worker process of :func:`evaluate_in_processes`: its own copy of the default model."""
    global _WORKER_MODEL
    from tl_thoughts.models import load_default_model

    torch.set_num_threads(threads)
    _WORKER_MODEL = load_default_model(dtype=dtype)


def _worker_verdicts(
    task: Task, config: EvalConfig
) -> tuple[tuple[list[bool], list[bool]], list[tuple[str, str]], DifferenceSums | None, FullRows | None]:
    """A task's :func:`example_verdicts` (plain lists between processes),
    :func:`query_answers_with_rows` and :func:`query_difference_sums`."""
    assert _WORKER_MODEL is not None, "the worker was not initialised"
    _tl.check_no_hooks(_WORKER_MODEL)
    with_right, without_right = example_verdicts(_WORKER_MODEL, task, batch_size=config.batch_size)
    queries, query_rows = query_answers_with_rows(_WORKER_MODEL, task, config)
    query_sums = query_difference_sums(_WORKER_MODEL, task, queries, config, query_rows)
    return (with_right.tolist(), without_right.tolist()), queries, query_sums, query_rows


def _worker_seed(task: Task, config: EvalConfig, seed: int, verdicts: tuple[list[bool], list[bool]],
                 queries: list[tuple[str, str]], query_sums: DifferenceSums | None,
                 query_rows: FullRows | None) -> SeedResult:
    assert _WORKER_MODEL is not None, "the worker was not initialised"
    _tl.check_no_hooks(_WORKER_MODEL)
    tensors = tuple(torch.tensor(v, dtype=torch.bool) for v in verdicts)
    return evaluate_seed(_WORKER_MODEL, task, config, seed, tensors, queries, query_sums, query_rows)


def evaluate_in_processes(
    tasks: Sequence[Task],
    config: EvalConfig = EvalConfig(),
    *,
    jobs: int = 2,
    dtype: torch.dtype = torch.float32,
    threads: int = 1,
    on_result: Callable[[TaskResult], None] | None = None,
) -> list[TaskResult]:
    """:func:`evaluate_task` for every task on the DEFAULT model, in ``jobs`` worker processes of
    ``threads`` torch threads each (each loads its own copy of the model; the workers take one
    unit at a time: a task's :func:`example_verdicts`, :func:`query_answers_with_rows` and
    :func:`query_difference_sums`, then each of its seeds; the biggest
    tasks first). On this
    project's 2-core machine this is as fast as one process with both threads
    (``benchmarks/bench_jobs.py``).
    ``on_result(result)`` is called as each task finishes. Results come back in the order of
    ``tasks``, the same as :func:`evaluate_task` gives at the same thread count
    (``tests/test_evaluation.py::test_worker_processes_give_the_same_results``); another thread
    count may change the order of floating-point sums inside torch's kernels.

    Example:
        >>> from tl_thoughts.tasks import load_task, shipped_tasks
        >>> results = evaluate_in_processes([load_task(p) for p in shipped_tasks()], jobs=2)  # doctest: +SKIP
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1, got {jobs} and {threads}")
    order = sorted(range(len(tasks)), key=lambda i: -len(tasks[i].examples))  # the biggest tasks first
    seeds: dict[int, dict[int, SeedResult]] = {i: {} for i in range(len(tasks))}
    queries: dict[int, list[tuple[str, str]]] = {}
    results: dict[int, TaskResult] = {}
    workers = min(jobs, len(tasks) * len(config.seeds))
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(dtype, threads)) as pool:
        # every task's verdicts with and without the chunk first, then its seeds as they arrive
        pending = {pool.submit(_worker_verdicts, tasks[i], config): (i, None) for i in order}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i, seed = pending.pop(future)
                if seed is None:
                    verdicts, queries[i], query_sums, query_rows = future.result()
                    for s in config.seeds:
                        pending[pool.submit(_worker_seed, tasks[i], config, s, verdicts, queries[i], query_sums,
                                            query_rows)] = (i, s)
                    continue
                seeds[i][seed] = future.result()
                if len(seeds[i]) == len(config.seeds):
                    results[i] = TaskResult(task=tasks[i].name, n_examples=len(tasks[i].examples),
                                            seeds=[seeds[i][s] for s in config.seeds], queries=queries[i])
                    if on_result is not None:
                        on_result(results[i])
    return [results[i] for i in range(len(tasks))]


def results_json(results: list[TaskResult], config: EvalConfig, model_name: str) -> dict:
    """The content of ``results.json``: one top-level key per method (accuracy averaged over tasks,
    each task's mean over seeds, spread, per-seed values and filtered counts), plus ``meta``.

    Example:
        >>> data = results_json([evaluate_task(model, task)], EvalConfig(), "SmolLM2")  # doctest: +SKIP
        >>> data["thought_patch"]["accuracy"]  # doctest: +SKIP
    """
    from tl_thoughts import __version__

    out: dict = {}
    for method in config.methods:
        per_task = {r.task: r.summary(method) for r in results}
        means = [t["accuracy"] for t in per_task.values() if t["accuracy"] is not None]
        out[method] = {
            "accuracy": float(np.mean(means)) if means else None,
            "std_over_tasks": float(np.std(means)) if means else None,
            "n_filtered": {task: t["n_filtered"] for task, t in per_task.items()},
            "per_seed": {task: t["per_seed"] for task, t in per_task.items()},
            "per_task": per_task,
        }
    out["meta"] = {
        "model": model_name,
        "version": __version__,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "tasks": {
            r.task: {
                "n_examples": r.n_examples,
                "queries": [list(pair) for pair in r.queries],
                "with_chunk_all": [s.with_chunk_all for s in r.seeds],
                "without_chunk_all": [s.without_chunk_all for s in r.seeds],
                "layers": [s.layers for s in r.seeds],
                "ranks": [s.ranks for s in r.seeds],
                "fit_indices": [s.fit_indices for s in r.seeds],
                "filtered_indices": [s.filtered_indices for s in r.seeds],
                "seconds": sum(s.seconds for s in r.seeds),
            }
            for r in results
        },
    }
    return out


def markdown_table(results: list[TaskResult], config: EvalConfig) -> str:
    """Per task: every method's accuracy on the filtered examples (mean ± spread over seeds) and
    the number of filtered examples per seed; a last row averages over tasks.

    Example:
        >>> print(markdown_table([evaluate_task(model, task)], EvalConfig()))  # doctest: +SKIP
    """
    methods = list(config.methods)
    lines = [
        "| task | filtered (per seed) | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    means: dict[str, list[float]] = {m: [] for m in methods}
    for r in results:
        cells = []
        for m in methods:
            s = r.summary(m)
            if s["accuracy"] is None:
                cells.append("n/a")
            else:
                means[m].append(s["accuracy"])
                cells.append(f"{100 * s['accuracy']:.0f} ± {100 * s['std']:.0f}")
        n = "/".join(str(k) for k in r.summary(methods[0])["n_filtered"])
        lines.append(f"| {r.task} | {n} | " + " | ".join(cells) + " |")
    avg = [f"**{100 * float(np.mean(v)):.0f}**" if v else "n/a" for v in means.values()]
    lines.append("| **mean over tasks** | | " + " | ".join(avg) + " |")
    return "\n".join(lines)


def plot_results(results: list[TaskResult], config: EvalConfig, save: str | Path | None = None):
    """Grouped bars: accuracy on the filtered examples per task and method (mean over seeds, with
    the spread as error bars).

    Example:
        >>> fig = plot_results([evaluate_task(model, task)], EvalConfig(), save="results.png")  # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    methods = [m for m in config.methods if m not in ("with_chunk", "without_chunk")]
    fig = Figure(figsize=(max(6.0, 1.1 * len(results) + 3), 3.8), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        acc = [r.summary(m)["accuracy"] or 0.0 for r in results]
        err = [r.summary(m)["std"] or 0.0 for r in results]
        xs = np.arange(len(results)) + (j - (len(methods) - 1) / 2) * width
        ax.bar(xs, acc, width, yerr=err, label=m, capsize=2)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels([r.task for r in results], rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy without the chunk\n(filtered examples)")
    ax.legend(fontsize=7, ncols=2)
    if save is not None:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=120)
    return fig


def write_results(results: list[TaskResult], config: EvalConfig, model_name: str, out: str | Path) -> Path:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out`` (created).

    Example:
        >>> write_results([evaluate_task(model, task)], EvalConfig(), "SmolLM2", "out")  # doctest: +SKIP
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results_json(results, config, model_name), indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(results, config) + "\n")
    plot_results(results, config, save=out / "results.png")
    return out


@torch.no_grad()
def greedy_generate(
    model: HookedTransformer, prompt: str, max_new_tokens: int = 10, stop_at_newline: bool = True
) -> str:
    """Greedy continuation of ``prompt`` (as the model is: apply a patch around the call), cut at
    the first line break or special token when ``stop_at_newline``.

    Example:
        >>> greedy_generate(model, "<|im_start|>walk -> walked\\ngo ->")  # doctest: +SKIP
        ' went'
    """
    if model.tokenizer is None:
        raise InputError("greedy_generate needs a model with a tokenizer")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    stops = stop_tokens(model) if stop_at_newline else None
    tokens = model.to_tokens(prompt)
    pieces = []
    for _ in range(max_new_tokens):
        logits = model(tokens, attention_mask=torch.ones_like(tokens))
        nxt = int(logits[0, -1].argmax())
        if stops is not None and bool(stops[nxt]):
            break
        pieces.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([[nxt]], device=tokens.device)], dim=1)
    return model.tokenizer.decode(pieces)
