"""The behavioural benchmark's protocol (tl_thoughts.tasks, tl_thoughts.evaluation): the task
format is validated, splits are disjoint and deterministic, the teacher-forced exact-match check
equals real greedy decoding, the filter keeps exactly the examples right with the chunk and wrong
without it, the cached layer search equals the hooked runs, and a small slice of the suite runs end
to end through the command line. Real-model tests run on a slice of a shipped task."""

import dataclasses
import json

import pytest
import torch
from helpers import (
    ARCHITECTURES,
    make_word_tokenizer,
    D_VOCAB,
    POST_NORM_MLP_ARCHITECTURES,
    PRE_NORM_MLP_ARCHITECTURES,
    assert_close,
    assert_model_untouched,
    hooks_attached,
    param_snapshot,
    random_tokens,
)

import tl_thoughts as tt
from tl_thoughts import _tl
from tl_thoughts import evaluation as E
from tl_thoughts import stream as S
from tl_thoughts.evaluation import decoding, protocol
from tl_thoughts.tasks import MIN_EXAMPLES, TaskFormatError, load_task, shipped_tasks, task_from_dict
from tl_thoughts.templates import PromptTemplate, bos_text, encode_example, shared_prefix_length

# --- the task format (no model needed) -------------------------------------------------------------


def _task_dict(**changes):
    data = {
        "name": "t",
        "chunk": "a -> b\n",
        "examples": [{"query": f"q{i}", "answer": f"a{i}"} for i in range(MIN_EXAMPLES)],
    }
    data.update(changes)
    return data


def test_shipped_tasks_follow_the_format():
    paths = shipped_tasks()
    assert len(paths) >= 8
    for path in paths:
        task = load_task(path)
        assert task.name == path.stem
        assert len(task.examples) >= 60
        demos = {line.split(" -> ")[0] for line in task.chunk.splitlines()}
        assert not demos & {q for q, _ in task.examples}, f"{task.name}: a demonstration is also an example"
        # the benchmark's default answers 60 unlabelled queries a task; some are skipped
        assert len(task.queries) >= E.EvalConfig().n_queries + 5, task.name
        assert not demos & set(task.queries), f"{task.name}: a demonstration is also an unlabelled query"
        if task.name == "antonyms":  # a symmetric relation: a query that is an example's answer would
            # most likely be answered with that example's query, the test pair reversed
            assert not set(task.queries) & {a for _, a in task.examples}


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "lnpre_relu_learned_parallel", "rms_gated_silu_rotary_gqa",
                                  "rmspre_relu_learned_prepost"])
@pytest.mark.parametrize("normalization", ["as built", None])
def test_final_norm_on_rows_gives_the_forward_passs_logits(fresh_model, arch, normalization):
    """``_tl.final_norm`` on picked rows of the residual after the last block, then the unembedding
    (what ``teacher_forced_verdicts`` and the greedy decoding compute, on the rows they need only), gives
    the model's own logits at those positions, for every kind of final norm and without one."""
    extra = {} if normalization == "as built" else {"normalization_type": None}
    model = fresh_model(arch, **extra)
    assert (model.cfg.normalization_type is None) == (normalization is None)
    tokens = torch.cat([random_tokens(7, seed=1), random_tokens(7, seed=2)])
    with torch.no_grad():
        logits = model(tokens)
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([2, 6, 4])
    picked = _tl.final_norm(model, resid[rows, cols]) @ model.W_U + model.b_U
    # 1e-12 relative to the logits' size: without a norm, a random gated model's logits reach 1e8,
    # where float64 rounding alone (the products of 3 rows against those of the whole batch) is 1e-8
    assert_close(picked, logits[rows, cols], 1e-12 * max(1.0, float(logits.abs().max())), "logits")


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("shared", [0, 4])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_cached_greedy_decoding_equals_the_uncached_loop(tiny_model, arch, shared, batch_size):
    """``greedy_decode_cached`` (the key-value cache, prompts grouped by length, the first tokens they all
    share run once) decodes exactly what ``greedy_decode`` (every step from the start, right
    padding) decodes: the same tokens, the same stops, for prompts of several lengths, some ending
    on a stop token and some on ``keep``, without and with a shared prefix of 4 tokens. Three or
    four prompts share a length, so that a batch's prompts finish at different steps (the finished
    ones leave the batch and its cache); with ``batch_size=2`` those groups are split."""
    model = tiny_model(arch)
    unembed = model.W_U.T.contiguous()
    keep = lambda i, g: len(g) <= 5  # noqa: E731
    for seed in range(99, 109):  # a shared prefix after which the prompts' generations still differ
        common = random_tokens(shared, seed=seed)[0]
        prompts = [torch.cat([common, random_tokens(n, seed=n + k)[0]]) for k, n in enumerate([3, 5, 5, 8, 3, 6, 5, 3, 5])]
        free, _ = S.greedy_decode(model, prompts, [[] for _ in prompts], keep,
                                 torch.zeros(D_VOCAB, dtype=torch.bool), unembed)
        # a stop token: one that some prompt generates and some other prompt does not
        stop = next((t for g in free for t in g if any(t not in h for h in free)), None)
        if stop is not None:
            break
    assert stop is not None and shared_prefix_length(prompts) == shared
    stops = torch.zeros(D_VOCAB, dtype=torch.bool)
    stops[stop] = True
    expected = S.greedy_decode(model, prompts, [[] for _ in prompts], keep, stops, unembed)
    assert S.greedy_decode_cached(model, prompts, keep, stops, unembed, batch_size) == expected
    if shared:  # the loop itself after a prefix read from a key-value cache
        prefix = S.SharedPrefix.of(model, prompts)
        assert prefix.length == shared
        assert S.greedy_decode(model, prompts, [[] for _ in prompts], keep, stops, unembed, prefix=prefix) == expected
    generated, stopped = expected
    assert any(stopped) and not all(stopped), stopped  # both endings occur
    assert all(len(g) == 6 for g, s in zip(generated, stopped) if not s)
    # the runs' residual stream, recorded from a position (inside the shared prefix, and after it):
    # that of whole runs of each prompt then its generated tokens (all but the last where keep
    # refused it: never run), float64
    n_layers = model.cfg.n_layers
    for first in sorted({2, shared + 1}):
        records = []
        assert S.greedy_decode_cached(model, prompts, keep, stops, unembed, batch_size, record_from=first,
                                records=records) == expected
        assert len(records) == len(prompts)
        for prompt, g, s, (pre, attn) in zip(prompts, generated, stopped, records):
            run = torch.cat([prompt, torch.tensor(g if s else g[:-1], dtype=prompt.dtype)])
            with torch.no_grad():
                _, cache = model.run_with_cache(run[None])
            want_pre = torch.stack([cache[f"blocks.{layer}.hook_resid_pre"][0] for layer in range(n_layers)]
                                   + [cache[f"blocks.{n_layers - 1}.hook_resid_post"][0]])[:, first:]
            post = _tl.model_spec(model).attn_post_norm  # recorded before it: the norm's input
            want_attn = torch.stack([cache[f"blocks.{layer}.hook_attn_out"][0] if post is None else
                                     (cache[f"blocks.{layer}.{post}.hook_normalized"]
                                      * cache[f"blocks.{layer}.{post}.hook_scale"])[0]
                                     for layer in range(n_layers)])[:, first:]
            assert_close(pre, want_pre, 1e-10, f"recorded resid (from {first})")
            assert_close(attn, want_attn, 1e-10, f"recorded attn_out (from {first})")
    with pytest.raises(tt.InputError, match="record_from"):
        S.greedy_decode_cached(model, prompts, keep, stops, unembed, records=[])


@pytest.mark.parametrize("arch", PRE_NORM_MLP_ARCHITECTURES + POST_NORM_MLP_ARCHITECTURES)
@pytest.mark.parametrize("prefixed", [False, True])
def test_runs_under_a_patch_use_its_weight_form(text_models, arch, prefixed):
    """The protocol runs a thought patch in its weight form (``match_under``), the positions it
    leaves unpatched (a fixed first token here) read from a key-value cache of the unpatched
    model: the verdicts and log-probabilities (float64) of the activation form's hooks, position
    by position; the model is left untouched."""
    from tl_thoughts.templates import encode_example

    model = text_models(arch)
    snap = param_snapshot(model)
    template = tt.PromptTemplate("<eos>{chunk}{query}" if prefixed else "{chunk}{query}", separator="")
    chunk = "the cat sat on the mat and"
    pairs = [(" the dog", " ran ."), (" a big red hat", " sat ."), (" the red cat", " ran on ."), (" a dog", " sat .")]
    config = tt.FitConfig.preset("benchmark", patch_prefix=not prefixed, ridge=0.05)
    patch = tt.fit_thought(model, chunk, pairs, config, template=template, progress=False)
    assert patch.unpatched_positions == int(prefixed)
    examples = []
    for pair in pairs:
        enc = encode_example(model, template, chunk, pair)
        examples.append(E.TaskExample(enc, enc.full.shape[0] - enc.answer_start))
    stops = torch.zeros(model.cfg.d_vocab, dtype=torch.bool)
    stops[model.to_single_token(".")] = True
    unembed = model.W_U.T.contiguous()
    weight = E.match_under(model, patch, examples, stops=stops, batch_size=3, unembed_weight=unembed)
    assert not hooks_attached(model)
    assert_model_untouched(model, snap)
    with patch.apply(model, "activation"):
        hooked = E.greedy_match(model, examples, with_chunk=False, stops=stops, batch_size=3)
    plain = E.greedy_match(model, examples, with_chunk=False, stops=stops, batch_size=3)
    assert weight[0].tolist() == hooked[0].tolist()
    assert_close(weight[1], hooked[1], 1e-10, "log-probabilities")
    assert (hooked[1] - plain[1]).abs().max() > 1e-3  # the patch changes them
    if prefixed:  # prompts whose unpatched first tokens differ: refused, not run under one cache
        enc = examples[0].enc
        other = E.TaskExample(dataclasses.replace(enc, reduced=torch.cat([enc.reduced[1:2], enc.reduced[1:]])),
                           examples[0].n_cont)
        with pytest.raises(tt.InputError, match="first 1 tokens differ"):
            E.match_under(model, patch, [other] + examples, stops=stops, batch_size=3, unembed_weight=unembed)
        with pytest.raises(ValueError, match="no hooks with a prefix cache"):
            E.greedy_match(model, examples, with_chunk=False, hooks=lambda batch, with_chunk: [],
                           prefix=S.SharedPrefix.first(model, examples[0].enc.reduced, 1))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("pool", ["answer", "kept"])
def test_mean_differences_equal_whole_runs(text_models, arch, pool):
    """The steering baselines' mean differences and task vectors, whose prompts with the chunk run
    their shared positions once (TransformerLens' key-value cache, read by every batch) and stop
    at the last position read (``"answer"``: the line break's own position is not run;
    ``"kept"``: it is, and read), equal the same means taken from whole runs of each prompt alone
    (``run_with_cache``), float64."""
    from tl_thoughts.templates import encode_example

    model = text_models(arch)
    template = tt.PromptTemplate("<eos>{chunk}{query}", separator="")
    chunk = "the cat sat on the mat and"
    pairs = [(" the dog", " ran ."), (" a big red hat", " sat ."), (" the red cat", " ran on ."), (" a dog", " sat on .")]
    examples = [E.TaskExample(encode_example(model, template, chunk, p), 0) for p in pairs]
    assert E.shared_full_length(examples, "answer") == examples[0].enc.stop > 1
    names = ["blocks.0.hook_resid_pre"] + [_tl.resid_post_name(layer) for layer in range(model.cfg.n_layers)]
    diff = torch.zeros(len(names), model.cfg.d_model, dtype=torch.float64)
    task = torch.zeros(len(names) - 1, model.cfg.d_model, dtype=torch.float64)
    n_pos = 0
    for e in examples:
        _, full = model.run_with_cache(e.enc.full[None], names_filter=names.__contains__)
        _, reduced = model.run_with_cache(e.enc.reduced[None], names_filter=names.__contains__)
        pos = e.enc.pooled(pool)
        assert (int(pos.max()) == e.enc.full.shape[0] - 1) == (pool == "kept")
        for k, name in enumerate(names):
            diff[k] += (full[name][0, pos] - reduced[name][0, e.enc.to_reduced(pos)]).sum(0)
            if k:
                task[k - 1] += full[name][0, e.last_prompt_full]
        n_pos += len(pos)
    deltas, vectors = E.mean_differences(model, examples, pool, batch_size=3)  # a batch of 3, then 1
    assert diff.abs().max() > 1e-2
    assert_close(deltas, diff / n_pos, 1e-10, "mean differences")
    assert_close(vectors, task / len(examples), 1e-10, "task vectors")
    # the sums over a split of the examples (as the protocol splits fit examples and queries) add up
    parts = E.difference_sums(model, examples[:1], pool, 3) + E.difference_sums(model, examples[1:], pool, 3)
    assert (parts.n_positions, parts.n_examples) == (n_pos, len(examples))
    assert_close(parts.means()[0], diff / n_pos, 1e-10, "mean differences from two parts")
    assert_close(parts.means()[1], task / len(examples), 1e-10, "task vectors from two parts")
    none = E.difference_sums(model, [], "answer", 3)
    assert (none.n_positions, none.n_examples) == (0, 0) and not none.diff.any()
    with pytest.raises(tt.InputError, match="no pooled position"):
        none.means()
    # the sums with the chunk read from the prompts' rows streamed once (as the protocol's queries')
    rows = tt.prompt_rows(model, chunk, pairs, template=template, pool=pool, query_weight=0.5, batch_size=3)
    read = E.difference_sums(model, examples, pool, 3, rows)
    assert_close(read.means()[0], diff / n_pos, 1e-10, "mean differences from the rows")
    assert_close(read.means()[1], task / len(examples), 1e-10, "task vectors from the rows")
    doubled = dataclasses.replace(rows, pre=2 * rows.pre)  # they are read: doubled rows, other sums
    assert (E.difference_sums(model, examples, pool, 3, doubled).diff - read.diff).abs().max() > 1e-3
    other = tt.prompt_rows(model, chunk, pairs, template=template, pool="query", batch_size=3)
    run = E.difference_sums(model, examples, pool, 3).diff
    assert torch.equal(E.difference_sums(model, examples, pool, 3, other).diff, run)  # not read: run


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_teacher_forced_verdicts_with_the_chunk_run_its_positions_once(text_models, arch):
    """``greedy_match`` with the chunk and no hook runs the positions every prompt shares once (a
    key-value cache): the same verdicts and log-probabilities (float64) as whole runs (forced here
    by an empty hook list), over batches of 3 then 1."""
    from tl_thoughts.templates import encode_example

    model = text_models(arch)
    template = tt.PromptTemplate("<eos>{chunk}{query}", separator="")
    pairs = [(" the dog", " ran ."), (" a big red hat", " sat ."), (" the red cat", " ran on ."), (" a dog", " sat .")]
    examples = []
    for query, answer in pairs:
        enc = encode_example(model, template, "the cat sat on the mat and", (query, answer))
        examples.append(E.TaskExample(enc, enc.full.shape[0] - enc.answer_start))
    stops = torch.zeros(model.cfg.d_vocab, dtype=torch.bool)
    stops[model.to_single_token(".")] = True
    once = E.greedy_match(model, examples, with_chunk=True, stops=stops, batch_size=3, compare="tokens")
    whole = E.greedy_match(model, examples, with_chunk=True, stops=stops, batch_size=3, compare="tokens",
                           hooks=lambda batch, with_chunk: [])
    assert once[0].tolist() == whole[0].tolist()
    assert_close(once[1], whole[1], 1e-10, "log-probabilities")
    assert shared_prefix_length([e.enc.full for e in examples]) >= examples[0].enc.stop


def test_task_defaults_and_rendering():
    task = task_from_dict(_task_dict())
    assert task.prompt("x", True) == "a -> b\nx ->" and task.prompt("x", False) == "x ->"
    assert task.continuation("y") == " y\n"
    assert task_from_dict(task.to_json()) == task
    assert task.queries == () and "queries" not in task.to_json()
    with_queries = task_from_dict(_task_dict(queries=["x", "y"]))
    assert with_queries.queries == ("x", "y") and task_from_dict(with_queries.to_json()) == with_queries


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"chunk": ""}, "must not be empty"),
        ({"examples": [{"query": "q", "answer": "a"}]}, "at least 60"),
        ({"extra": 1}, "unknown keys"),
        ({"template": {"text": "{query}"}}, "exactly once"),
        ({"template": {"text": "{chunk}{bos}{query}"}}, "may only start the text"),
        ({"template": {"text": "{bos}{chunk}{bos}{query}"}}, "may only start the text, once"),
        ({"answer_suffix": " "}, "line break"),
        ({"examples": [{"query": "q", "answer": "a"}] * MIN_EXAMPLES}, "twice"),
        ({"examples": [{"query": f"q{i}", "answer": " a"} for i in range(MIN_EXAMPLES)]}, "whitespace"),
        ({"examples": [{"query": f"q{i}"} for i in range(MIN_EXAMPLES)]}, "'query' and 'answer'"),
        ({"name": 3}, "must be a string"),
        ({"queries": "x"}, "list of strings"),
        ({"queries": ["x", 3]}, "query 1"),
        ({"queries": ["x "]}, "surrounding whitespace"),
        ({"queries": ["x", "x"]}, "twice in 'queries'"),
        ({"queries": ["q3"]}, "also an example's query"),
    ],
)
def test_bad_task_files_are_refused(changes, message):
    with pytest.raises(TaskFormatError, match=message):
        task_from_dict(_task_dict(**changes))


# --- {bos}: the model's BOS token at the start of a template ----------------------------------------

BOS_TEMPLATE = PromptTemplate("{bos}{chunk}{query}", separator="")


def _bos_model(fresh_model, prepends: bool, bos_token: str | None = "<eos>"):
    """A tiny model with the word tokenizer, whose BOS token is ``bos_token`` (``"<eos>"``: id 1);
    ``prepends``: its tokenization prepends that token itself (``cfg.default_prepend_bos``), as
    Gemma's does, or not, as SmolLM2's."""
    model = fresh_model("ln_gelu_learned", tokenizer=make_word_tokenizer())
    model.tokenizer.bos_token = bos_token
    model.cfg.default_prepend_bos = prepends
    return model


@pytest.mark.parametrize("prepends", [False, True], ids=["bos-as-text", "bos-prepended"])
def test_bos_gives_the_models_bos_token_once(fresh_model, prepends):
    """``{bos}`` is the BOS token as the first token, once, with and without the chunk: its text where
    the tokenization does not prepend it (SmolLM2), nothing where it does (Gemma; the literal text
    would give it twice); the same tokens as the template written for that model."""
    model = _bos_model(fresh_model, prepends)
    bos = model.tokenizer.bos_token_id
    assert bos_text(model) == ("" if prepends else "<eos>")
    literal = PromptTemplate(("" if prepends else "<eos>") + "{chunk}{query}", separator="")
    enc = encode_example(model, BOS_TEMPLATE, "the cat", (" sat", " on"))
    same = encode_example(model, literal, "the cat", (" sat", " on"))
    assert torch.equal(enc.full, same.full) and torch.equal(enc.reduced, same.reduced)
    assert (enc.start, enc.stop, enc.answer_start) == (same.start, same.stop, same.answer_start)
    for tokens in (enc.full, enc.reduced):
        assert int(tokens[0]) == bos and int((tokens == bos).sum()) == 1
    assert (enc.start, enc.stop) == (1, 3)
    task = task_from_dict(_task_dict(chunk="the cat", template={"text": "{bos}{chunk}{query}", "separator": ""}))
    for with_chunk in (True, False):  # the prompt's text tokenises as the protocol's tokens
        text = task.prompt(" sat", with_chunk, model)
        assert text.startswith("<eos>") != prepends
        expected = enc.full[:enc.answer_start] if with_chunk else enc.reduced[:2]
        assert _tl.to_tokens(model, text)[0].tolist() == expected.tolist()


def test_a_template_the_model_cannot_honour_is_refused(fresh_model):
    """``{bos}`` on a model without a BOS token, or one its tokenization does not give as one token,
    is an error naming the template and the model (never the text ``{bos}`` tokenised as it is)."""
    task = task_from_dict(_task_dict(chunk="the cat", template={"text": "{bos}{chunk}{query}", "separator": ""}))
    for bos_token, reason in [(None, "has no BOS token"), ("cat dog", "neither by itself nor from its text")]:
        model = _bos_model(fresh_model, prepends=False, bos_token=bos_token)
        name = model.cfg.model_name
        for call in (lambda: encode_example(model, BOS_TEMPLATE, "the cat", (" sat", " on")),
                     lambda: task.prompt(" sat", True, model),
                     lambda: E.encode_task_example(model, task, "q1", "a1"),
                     lambda: tt.fit_thought(model, "the cat", [(" sat", " on")], template=BOS_TEMPLATE,
                                            progress=False)):
            with pytest.raises(tt.InputError) as info:
                call()
            message = str(info.value)
            assert "'{bos}{chunk}{query}'" in message and repr(name) in message and reason in message, message
    for call in (lambda: task.prompt(" sat", True), lambda: BOS_TEMPLATE.render(" sat")):  # no model given
        with pytest.raises(tt.InputError, match=r"starts with \{bos\}.*for_model"):
            call()


def test_shipped_templates_start_with_the_bos_placeholder():
    for path in shipped_tasks():
        template = load_task(path).template
        assert (template.text, template.separator) == ("{bos}{chunk}{query} ->", ""), path.name


@pytest.mark.real_model
def test_shipped_prompts_on_smollm2_are_the_literal_bos_tokens(smollm2):
    """On SmolLM2 the shipped tasks' ``{bos}`` is ``<|im_start|>``: every example's and query's tokens,
    with and without the chunk, are token for token those of the templates written with the literal
    ``<|im_start|>`` (the shipped files before ``{bos}``), and so are the prompts' texts."""
    literal = PromptTemplate("<|im_start|>{chunk}{query} ->", separator="")
    for path in shipped_tasks():
        task = load_task(path)
        before = dataclasses.replace(task, template=literal)
        for query, answer in task.examples:
            new, old = E.encode_task_example(smollm2, task, query, answer), E.encode_task_example(smollm2, before,
                                                                                                  query, answer)
            assert torch.equal(new.enc.full, old.enc.full) and torch.equal(new.enc.reduced, old.enc.reduced)
            assert (new.enc.start, new.enc.stop, new.enc.answer_start, new.n_cont) == (
                old.enc.start, old.enc.stop, old.enc.answer_start, old.n_cont)
            assert int(new.enc.full[0]) == smollm2.tokenizer.bos_token_id == 1
        for query in task.queries[:40]:
            new = encode_example(smollm2, task.template, task.chunk, query)
            assert torch.equal(new.full, encode_example(smollm2, literal, task.chunk, query).full)
            for with_chunk in (True, False):
                assert task.prompt(query, with_chunk, smollm2) == before.prompt(query, with_chunk)


@pytest.mark.gemma
def test_shipped_prompts_on_gemma_start_with_one_bos():
    """On Gemma 3 270M (its tokenization prepends ``<bos>``), the shipped tasks' prompts start with
    one ``<bos>``, with and without the chunk, and hold no trace of SmolLM2's ``<|im_start|>``."""
    from tl_thoughts.models import load_model

    gemma = load_model("gemma-3-270m")
    bos = gemma.tokenizer.bos_token_id
    assert bos_text(gemma) == ""
    for path in shipped_tasks():
        task = load_task(path)
        for query, answer in task.examples[:10]:
            enc = E.encode_task_example(gemma, task, query, answer).enc
            for tokens in (enc.full, enc.reduced):
                assert int(tokens[0]) == bos and int((tokens == bos).sum()) == 1
            assert enc.start == 1 and "im_start" not in gemma.tokenizer.decode(enc.full)
            assert task.prompt(query, True, gemma) == task.chunk + query + " ->"


def test_load_task_errors(tmp_path):
    with pytest.raises(TaskFormatError, match="no such task file"):
        load_task(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TaskFormatError, match="not valid JSON"):
        load_task(tmp_path / "bad.json")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_splits_are_disjoint_complete_and_deterministic(seed):
    fit, test = E.split(75, 20, seed)
    assert len(fit) == 20 and not set(fit) & set(test) and sorted(fit + test) == list(range(75))
    assert (fit, test) == E.split(75, 20, seed)
    assert fit != E.split(75, 20, seed + 10)[0]
    with pytest.raises(Exception, match="no test example"):
        E.split(20, 20, seed)


def test_task_inputs_are_checked():
    """``TaskInputs`` (what ``prepare_task`` computes once a task) holds its queries as a tuple and
    refuses inconsistent parts; ``check`` refuses inputs that do not fit the task or the config."""
    task = task_from_dict(_task_dict())
    n = len(task.examples)
    verdicts = (torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool))
    inputs = E.TaskInputs(verdicts, [("x", "y")])
    assert inputs.queries == (("x", "y"),) and inputs.query_rows is None and inputs.query_sums is None
    methods = ("with_chunk", "without_chunk", "thought_patch")
    inputs.check(task, E.EvalConfig(n_queries=1, methods=methods))
    with pytest.raises(tt.InputError, match="n_queries is 2"):
        inputs.check(task, E.EvalConfig(n_queries=2, methods=methods))
    with pytest.raises(tt.InputError, match="query_sums are needed"):
        inputs.check(task, E.EvalConfig(n_queries=1))  # the default methods run the steering baselines
    with pytest.raises(tt.InputError, match="one value per example"):
        E.TaskInputs((verdicts[0][1:], verdicts[1][1:]), [("x", "y")]).check(task, E.EvalConfig(n_queries=1, methods=methods))
    with pytest.raises((tt.InputError, TypeError), match="verdicts|n_examples"):  # TypeCheckError under the suite's checks
        E.TaskInputs((verdicts[0], verdicts[1][1:]), [("x", "y")])
    sums = E.DifferenceSums(torch.zeros(3, 4, dtype=torch.float64), 5, torch.zeros(2, 4, dtype=torch.float64), 2)
    with pytest.raises(tt.InputError, match="query_sums are sums over 2 queries, 1 queries given"):
        E.TaskInputs(verdicts, [("x", "y")], query_sums=sums)
    E.TaskInputs(verdicts, [("x", "y"), ("z", "w")], query_sums=sums).check(task, E.EvalConfig(n_queries=2))


def test_results_record_the_commit_and_the_command(tmp_path, monkeypatch):
    """``results.json``'s ``meta`` records the git commit of the package's checkout (``+dirty``
    with changes to tracked files; None without git) and the command given."""
    import subprocess
    from pathlib import Path

    package = Path(E.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package,
                            capture_output=True, text=True)
    expected = None if head.returncode else head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
    meta = E.results_json([], E.EvalConfig(), "m", command="tl-thoughts eval --suite")["meta"]
    assert meta["commit"] == expected and meta["command"] == "tl-thoughts eval --suite"
    assert E.results_json([], E.EvalConfig(), "m")["meta"]["command"] is None
    out = E.write_results([], E.EvalConfig(), "m", tmp_path / "out", command="tl-thoughts eval --task t.json")
    written = json.loads((out / "results.json").read_text())["meta"]
    assert (written["commit"], written["command"]) == (expected, "tl-thoughts eval --task t.json")
    monkeypatch.setenv("PATH", str(tmp_path))  # no git found: None, no error
    assert E.checkout_commit() is None and E.results_json([], E.EvalConfig(), "m")["meta"]["commit"] is None


def test_the_package_exports_its_public_names():
    """``tl_thoughts.evaluation`` re-exports every public name its modules define (and nothing
    else), and docs/api.md documents each."""
    import ast
    import importlib
    import inspect
    from pathlib import Path

    defined = []
    for name in ("config", "examples", "decoding", "verdicts", "baselines", "protocol", "report"):
        module = importlib.import_module(f"tl_thoughts.evaluation.{name}")
        for node in ast.parse(inspect.getsource(module)).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                names = [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]
            else:
                continue
            for n in names:
                if not n.startswith("_"):
                    defined.append(n)
                    assert getattr(E, n) is getattr(module, n), (name, n)
    assert sorted(defined) == sorted(E.__all__)
    api = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    for n in E.__all__:
        assert f"::: tl_thoughts.evaluation.{n}\n" in api, n


def test_config_is_validated():
    # the suite's default methods are the protocol's (results.json's keys); the others on request
    assert E.EvalConfig().methods == E.DEFAULT_METHODS and set(E.DEFAULT_METHODS) == {
        "with_chunk", "without_chunk", "thought_vector", "thought_matrix", "thought_patch", "thought_patch_paper",
        "steering_best_layer", "steering_all_layers", "task_vector"}
    # the thought patches' fit options: one validated FitConfig, the benchmark's and the papers' presets
    config = E.EvalConfig(n_fit=20, ridge=0.5)
    assert config.fit_config(500) == tt.FitConfig.preset("benchmark", ridge=0.5 * 500 / 20, batch_size=64,
                                                         compare_steering=False)
    assert config.paper_fit_config() == tt.FitConfig.preset("paper", ridge=0.5, batch_size=64, compare_steering=False)
    with pytest.raises(tt.InputError, match="ridge"):  # refused when the config is made, before any run
        E.EvalConfig(ridge=float("nan"))
    with pytest.raises(tt.InputError, match="pool"):
        E.EvalConfig(pool="nope")
    assert set(E.METHODS) == set(E.DEFAULT_METHODS) | set(E.ON_REQUEST) and "thought_patch_refined" in E.ON_REQUEST
    with pytest.raises(ValueError, match="unknown methods"):
        E.EvalConfig(methods=("with_chunk", "without_chunk", "magic"))
    with pytest.raises(ValueError, match="filters on"):
        E.EvalConfig(methods=("thought_patch",))
    for bad in (0, -2, True):
        with pytest.raises(ValueError, match="ranks must be None or integers"):
            E.EvalConfig(ranks=(4, bad))
    with pytest.raises((TypeError, ValueError)):  # TypeCheckError under the suite's runtime checks
        E.EvalConfig(ranks=(4, 1.5))
    with pytest.raises(ValueError, match="at least one candidate rank"):
        E.EvalConfig(ranks=())
    with pytest.raises(ValueError, match="distinct"):
        E.EvalConfig(ranks=(4, None, 4))
    for bad in (-1, True):
        with pytest.raises(ValueError, match="refine_steps"):
            E.EvalConfig(refine_steps=bad)
    with pytest.raises(ValueError, match="refine_lr"):
        E.EvalConfig(refine_lr=0.0)
    for bad in (-1, True):
        with pytest.raises(ValueError, match="n_queries"):
            E.EvalConfig(n_queries=bad)


# --- the protocol on the real model ------------------------------------------------------------------


N_QUERIES = 6  # unlabelled queries of the slice's configurations (CI time)


@pytest.fixture(scope="module")
def slice_task():
    """The first 24 examples of a shipped task (a slice: CI time)."""
    task = load_task(next(p for p in shipped_tasks() if p.stem == "past_tense"))
    return dataclasses.replace(task, examples=task.examples[:24])


@pytest.mark.slow
@pytest.mark.real_model
def test_teacher_forced_check_equals_greedy_generation(smollm2, slice_task):
    examples = E.encode_task_examples(smollm2, slice_task, range(12))
    for with_chunk in (True, False):
        right, _ = E.greedy_match(smollm2, examples, with_chunk=with_chunk, batch_size=5)
        for (query, answer), verdict in zip(slice_task.examples[:12], right.tolist()):
            generated = E.greedy_generate(smollm2, slice_task.prompt(query, with_chunk, smollm2), max_new_tokens=8)
            assert verdict == (" ".join(generated.split()) == answer), (query, generated, verdict)
    # both outcomes occur, so the comparison is not vacuous
    assert E.greedy_match(smollm2, examples, with_chunk=True)[0].any()
    assert not E.greedy_match(smollm2, examples, with_chunk=False)[0].all()


@pytest.mark.slow
@pytest.mark.real_model
def test_protocol_invariants_on_a_slice(smollm2, slice_task):
    snap = param_snapshot(smollm2)
    config = E.EvalConfig(n_fit=8, n_queries=N_QUERIES, seeds=(0, 1))
    result = E.evaluate_task(smollm2, slice_task, config, progress=False)
    assert len(result.queries) == N_QUERIES and not {q for q, _ in result.queries} & {q for q, _ in slice_task.examples}
    for seed_result in result.seeds:
        assert (seed_result.fit_indices, seed_result.test_indices) == E.split(24, 8, seed_result.seed)
        assert set(seed_result.filtered_indices) <= set(seed_result.test_indices)
        # the filter, recomputed independently by greedy generation (seed 0: CI time)
        for i in seed_result.test_indices if seed_result.seed == 0 else []:
            query, answer = slice_task.examples[i]
            right_with = " ".join(E.greedy_generate(smollm2, slice_task.prompt(query, True, smollm2)).split()) == answer
            right_without = " ".join(E.greedy_generate(smollm2, slice_task.prompt(query, False, smollm2)).split()) == answer
            assert (i in seed_result.filtered_indices) == (right_with and not right_without), i
        n = len(seed_result.filtered_indices)
        assert n > 0
        assert set(seed_result.right) == set(config.methods) == set(E.DEFAULT_METHODS)
        for method in config.methods:
            assert len(seed_result.right[method]) == n
        assert seed_result.accuracy["with_chunk"] == 1.0 and seed_result.accuracy["without_chunk"] == 0.0
    # deterministic: the same seed gives the same numbers (here with the queries' part of the
    # baselines' sums computed in the call, where evaluate_task computed it once for both seeds)
    again = E.evaluate_seed(smollm2, slice_task, config, 1)
    assert again.right == result.seeds[1].right and again.layers == result.seeds[1].layers
    other = E.query_difference_sums(smollm2, slice_task, result.queries[:-1], config)  # sums over other queries
    n = len(slice_task.examples)
    verdicts = (torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool))
    with pytest.raises(tt.InputError, match="query_sums"):
        E.TaskInputs(verdicts, result.queries, query_sums=other)
    with pytest.raises(tt.InputError, match="query_sums are needed"):  # the config runs steering baselines
        E.evaluate_seed(smollm2, slice_task, config, 1, E.TaskInputs(verdicts, result.queries))
    assert_model_untouched(smollm2, snap)


@pytest.mark.slow
@pytest.mark.real_model
def test_each_seed_filters_with_the_task_verdicts(smollm2, slice_task):
    """The verdicts with and without the chunk are computed once a task (``example_verdicts``) and
    each seed filters its test examples with them: they equal ``chunk_filter`` on those examples,
    and given verdicts are the ones used (made-up verdicts keep every test example)."""
    config = E.EvalConfig(n_fit=8, n_queries=N_QUERIES, seeds=(0,), methods=("with_chunk", "without_chunk", "thought_vector"))
    with_right, without_right = E.example_verdicts(smollm2, slice_task, batch_size=config.batch_size)
    assert with_right.shape == without_right.shape == (len(slice_task.examples),)
    _, test_idx = E.split(len(slice_task.examples), 8, 0)
    keep, w, wo = E.chunk_filter(smollm2, E.encode_task_examples(smollm2, slice_task, test_idx))
    assert torch.equal(w, with_right[test_idx]) and torch.equal(wo, without_right[test_idx])
    seed = E.evaluate_seed(smollm2, slice_task, config, 0)
    assert seed.filtered_indices == [i for i, k in zip(test_idx, keep.tolist()) if k]
    inputs = E.prepare_task(smollm2, slice_task, config)  # the inputs evaluate_seed computed
    assert all(torch.equal(a, b) for a, b in zip(inputs.verdicts, (with_right, without_right)))
    assert E.evaluate_seed(smollm2, slice_task, config, 0, inputs).right == seed.right
    n = len(slice_task.examples)
    made_up = (torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool))
    given = dataclasses.replace(inputs, verdicts=made_up)
    assert E.evaluate_seed(smollm2, slice_task, config, 0, given).filtered_indices == test_idx
    shorter = dataclasses.replace(inputs, verdicts=(made_up[0][:-1], made_up[1][:-1]))
    with pytest.raises(tt.InputError, match="one value per example"):
        E.evaluate_seed(smollm2, slice_task, config, 0, shorter)


@pytest.mark.slow
@pytest.mark.real_model
def test_the_papers_method_is_the_paper_preset_on_the_labelled_examples(smollm2, slice_task, monkeypatch):
    """``thought_patch_paper`` is ``fit_thought`` with the ``"paper"`` preset on the seed's labelled
    fit examples alone (no answered query): the protocol's patch equals, tensor for tensor, an
    independent fit (vectors on ``b_out``, matrices on the MLP input only), and its verdicts are
    those of that patch applied as hooks."""
    from tl_thoughts.evaluation import protocol

    fitted = []

    def keep(*args, **kwargs):
        fitted.append(tt.fit_thought(*args, **kwargs))
        return fitted[-1]

    monkeypatch.setattr(protocol, "fit_thought", keep)
    methods = ("with_chunk", "without_chunk", "thought_patch_paper")
    assert "thought_patch_paper" in E.DEFAULT_METHODS
    config = E.EvalConfig(n_fit=8, n_queries=N_QUERIES, methods=methods)
    seed = E.evaluate_seed(smollm2, slice_task, config, 0)
    (used,) = fitted
    assert set(seed.right) == set(methods) and len(seed.filtered_indices) > 0
    patch = tt.fit_thought(smollm2, slice_task.chunk, slice_task.fit_examples(seed.fit_indices),
                           tt.FitConfig.preset("paper", ridge=config.ridge), template=slice_task.template,
                           progress=False)
    assert {name.split(".", 2)[2] for name in patch.deltas} == {"mlp.b_out", "mlp.W_in", "mlp.W_gate"}
    assert set(used.deltas) == set(patch.deltas) and all(torch.equal(used.deltas[k], patch.deltas[k]) for k in patch.deltas)
    assert used.meta["n_examples"] == 8 and used.unpatched_positions == 0
    filtered = E.encode_task_examples(smollm2, slice_task, seed.filtered_indices)
    with patch.apply(smollm2):
        right, _ = E.greedy_match(smollm2, filtered, with_chunk=False, batch_size=64)
    assert right.tolist() == seed.right["thought_patch_paper"]


@pytest.mark.slow
@pytest.mark.real_model
def test_the_fitted_alone_ablations_are_fits_of_their_kind(smollm2, slice_task):
    """``thought_vector_fitted_alone`` and ``thought_matrix_fitted_alone`` (not in the default
    methods) give the verdicts of ``fit_thought(fit="vector" | "matrix")`` on the same rows, at the
    same options; they are not the thought patch's parts."""
    methods = ("with_chunk", "without_chunk", "thought_vector_fitted_alone", "thought_matrix_fitted_alone")
    assert not set(methods[2:]) & set(E.DEFAULT_METHODS) and set(methods) <= set(E.METHODS)
    config = E.EvalConfig(n_fit=8, n_queries=N_QUERIES, methods=methods)
    seed = E.evaluate_seed(smollm2, slice_task, config, 0)
    assert set(seed.right) == set(methods) and len(seed.filtered_indices) > 0 and not seed.ranks
    queries = E.query_answers(smollm2, slice_task, N_QUERIES)
    fit_rows = slice_task.fit_examples(seed.fit_indices) + [(q, slice_task.continuation(a)) for q, a in queries]
    filtered = E.encode_task_examples(smollm2, slice_task, seed.filtered_indices)
    for method, kind in (("thought_vector_fitted_alone", "vector"), ("thought_matrix_fitted_alone", "matrix")):
        patch = tt.fit_thought(smollm2, slice_task.chunk, fit_rows, config.fit_config(len(fit_rows)).replace(fit=kind),
                               template=slice_task.template, progress=False)
        with patch.apply(smollm2):
            right, _ = E.greedy_match(smollm2, filtered, with_chunk=False, batch_size=64)
        assert right.tolist() == seed.right[method], method


@pytest.fixture(scope="module")
def fitted_slice(smollm2, slice_task):
    """A thought patch fitted on 8 examples of the slice, and those examples encoded."""
    fit_idx = list(range(8))
    patch = tt.fit_thought(smollm2, slice_task.chunk, slice_task.fit_examples(fit_idx), E.EvalConfig().fit_config(),
                           template=slice_task.template, progress=False)
    return patch, E.encode_task_examples(smollm2, slice_task, fit_idx)


@pytest.mark.slow
@pytest.mark.real_model
def test_the_rank_is_chosen_on_the_fit_examples(smollm2, fitted_slice):
    """``choose_rank`` returns the candidate that an independent scoring of every candidate on
    the fit examples (accuracy, then mean log-probability, then the smaller rank) ranks first, at
    that rank, and leaves the model untouched."""
    patch, fit_set = fitted_slice
    snap = param_snapshot(smollm2)
    ranks = (1, 2, 16, None)
    chosen, rank = E.choose_rank(smollm2, patch, ranks, fit_set)
    assert_model_untouched(smollm2, snap)
    scores = {}
    for r in ranks:
        candidate = patch if r is None else patch.truncated(r)
        with candidate.apply(smollm2):
            right, logprob = E.greedy_match(smollm2, fit_set, with_chunk=False)
        scores[r] = (float(right.double().mean()), float(logprob.mean()), -(r or 10**9))
    assert len(set(scores.values())) == len(ranks), "the candidates should differ on the fit examples"
    assert rank == max(ranks, key=scores.get)
    expected = patch if rank is None else patch.truncated(rank)
    assert all(torch.equal(chosen.deltas[k], d) for k, d in expected.deltas.items())
    # one candidate: that one, as fitted or truncated
    assert E.choose_rank(smollm2, patch, (None,), fit_set) == (patch, None)
    alone, r = E.choose_rank(smollm2, patch, (2,), fit_set)
    assert r == 2 and alone.meta["truncated_rank"] == 2


@pytest.mark.slow
@pytest.mark.real_model
def test_the_benchmark_patch_leaves_the_first_token_unpatched(smollm2, fitted_slice):
    """With ``EvalConfig``'s options the patch has ``W_out`` matrices and leaves the fixed first
    token (``<|im_start|>``, before the chunk) unpatched: ``apply`` gives that position's logits
    bit for bit as without the patch and changes the later ones; the weight form is refused."""
    patch, fit_set = fitted_slice
    assert patch.unpatched_positions == 1 == fit_set[0].enc.start
    assert {k for k in patch.deltas if k.endswith(".W_out")}
    snap = param_snapshot(smollm2)
    tokens = fit_set[0].enc.reduced[None]
    with torch.no_grad():
        base = smollm2(tokens)
        with patch.apply(smollm2):
            patched = smollm2(tokens)
    assert torch.equal(patched[0, 0], base[0, 0])
    assert (patched[0, 1:] - base[0, 1:]).abs().max() > 1e-2
    with pytest.raises(tt.InputError, match="form='activation'"):
        with patch.apply(smollm2, "weight"):
            pass
    assert_model_untouched(smollm2, snap)


@pytest.mark.slow
@pytest.mark.real_model
def test_evaluate_seed_records_the_chosen_ranks(smollm2, slice_task):
    methods = ("with_chunk", "without_chunk", "thought_vector", "thought_matrix", "thought_patch")
    seed = E.evaluate_seed(smollm2, slice_task, E.EvalConfig(n_fit=8, n_queries=N_QUERIES, methods=methods, ranks=(3,)), 0)
    assert len(seed.filtered_indices) > 0
    assert seed.ranks == {"thought_patch": 3}  # the ablations are used as fitted
    # the recorded rank is the one applied: the patch's verdicts are those of its rank-3 version,
    # fitted on the fit examples plus the answered queries, at the ridge scaled by the rows
    fit_idx = seed.fit_indices
    queries = E.query_answers(smollm2, slice_task, N_QUERIES)
    fit_rows = slice_task.fit_examples(fit_idx) + [(q, slice_task.continuation(a)) for q, a in queries]
    config = E.EvalConfig().fit_config().replace(ridge=E.EvalConfig().ridge * (8 + N_QUERIES) / 8)
    patch = tt.fit_thought(smollm2, slice_task.chunk, fit_rows, config, template=slice_task.template, progress=False)
    filtered = E.encode_task_examples(smollm2, slice_task, seed.filtered_indices)
    with patch.truncated(3).apply(smollm2):
        right, _ = E.greedy_match(smollm2, filtered, with_chunk=False, batch_size=64)
    assert right.tolist() == seed.right["thought_patch"]
    # the ablations are that patch's parts, as fitted: its vectors alone, its matrices alone
    for method, part in (("thought_vector", "vectors"), ("thought_matrix", "matrices")):
        with patch.only(part).apply(smollm2):
            right, _ = E.greedy_match(smollm2, filtered, with_chunk=False, batch_size=64)
        assert right.tolist() == seed.right[method], method
    seed = E.evaluate_seed(smollm2, slice_task, E.EvalConfig(n_fit=8, n_queries=N_QUERIES, methods=methods, ranks=(None,)), 0)
    assert seed.ranks == {"thought_patch": None}
    # the refined method alone: the rank-3 patch refined on the fit examples, as refine_thought does
    config = E.EvalConfig(n_fit=8, n_queries=N_QUERIES, methods=("with_chunk", "without_chunk", "thought_patch_refined"), ranks=(3,),
                          refine_steps=4)
    seed = E.evaluate_seed(smollm2, slice_task, config, 0)
    assert seed.ranks == {"thought_patch_refined": 3} and set(seed.right) == set(config.methods)
    refined = tt.refine_thought(smollm2, patch.truncated(3), slice_task.fit_examples(fit_idx), steps=4,
                                lr=config.refine_lr, batch_size=64, progress=False)
    assert refined.meta["refined"][0]["loss_after"] < refined.meta["refined"][0]["loss_before"]
    with refined.apply(smollm2):
        right, _ = E.greedy_match(smollm2, filtered, with_chunk=False, batch_size=64)
    assert right.tolist() == seed.right["thought_patch_refined"]


@pytest.mark.slow
@pytest.mark.real_model
def test_the_rank_is_chosen_on_the_fit_examples_and_the_answered_queries(smollm2, slice_task, monkeypatch):
    """``rank_on_queries=True`` chooses the rank on the labelled fit examples plus the answered
    queries (each query scored against the model's own answer with the chunk), False (the default)
    on the labelled fit examples alone; the rank recorded is ``choose_rank``'s on that set."""
    calls = []

    def spy(model, patch, ranks, rows, **kwargs):
        out = choose_rank(model, patch, ranks, rows, **kwargs)
        calls.append(([(e.enc.full.tolist(), e.n_cont) for e in rows], out[1]))
        return out

    choose_rank = E.choose_rank
    monkeypatch.setattr(protocol, "choose_rank", spy)
    methods = ("with_chunk", "without_chunk", "thought_patch")
    queries = E.query_answers(smollm2, slice_task, N_QUERIES)
    fit_idx = E.split(len(slice_task.examples), 8, 0)[0]
    labelled = [(e.enc.full.tolist(), e.n_cont) for e in E.encode_task_examples(smollm2, slice_task, fit_idx)]
    answered = [(e.enc.full.tolist(), e.n_cont) for e in (E.encode_task_example(smollm2, slice_task, q, a) for q, a in queries)]
    for on_queries, expected in ((True, labelled + answered), (False, labelled)):
        config = E.EvalConfig(n_fit=8, n_queries=N_QUERIES, methods=methods, ranks=(1, None), rank_on_queries=on_queries)
        seed = E.evaluate_seed(smollm2, slice_task, config, 0)
        rows, rank = calls.pop()
        assert rows == expected and seed.ranks == {"thought_patch": rank}
    assert not calls


def _forcing_vector(model, token: int) -> torch.Tensor:
    """A residual stream whose logits (final norm and unembedding) put ``token`` first: the
    token's unembedding direction, pushed away from the winner until the token wins."""
    W_U, w = model.W_U.detach(), model.ln_final.w.detach()
    y = W_U[:, token].clone()
    for _ in range(200):
        x = y / w
        winner = int(torch.nn.functional.linear(model.ln_final(x[None, None])[0, 0], W_U.T, model.b_U).argmax())
        if winner == token:
            return x
        step = W_U[:, token] - W_U[:, winner]
        y = y + 0.5 * step * y.norm() / step.norm()
    raise AssertionError(f"could not force token {token}")


def _forcing_hooks(model, paths):
    """Hooks making greedy decoding, without the chunk, produce ``paths[i]`` token by token after
    example i's prompt (the residual after the last block is replaced by a vector whose logits put
    the wanted token first), whatever the tokens already there."""
    last = model.cfg.n_layers - 1
    vectors = {t: _forcing_vector(model, t) for path in paths for t in path}

    def make(batch, with_chunk):
        def hook(act, hook):
            act = act.clone()
            for i, e in enumerate(batch):
                start = e.last_prompt_reduced
                for k, token in enumerate(paths[i]):
                    if start + k < act.shape[1]:
                        act[i, start + k] = vectors[token].to(act.dtype)
            return act

        return [(f"blocks.{last}.hook_resid_post", hook)]

    return make


@pytest.mark.slow
@pytest.mark.real_model
def test_an_answer_spelled_with_other_tokens_is_right(smollm2):
    """Greedy decoding that spells the answer with other tokens than the tokenizer's is right (the
    protocol compares text); the teacher-forced check alone would call it wrong."""
    task = load_task(next(p for p in shipped_tasks() if p.stem == "uppercase"))
    i = next(i for i, (q, a) in enumerate(task.examples) if a == "FARMER")
    example = E.encode_task_examples(smollm2, task, [i])[0]
    tok = smollm2.tokenizer
    canonical = example.enc.full[example.enc.answer_start :].tolist()
    newline = canonical[-1]
    other = tok.convert_tokens_to_ids(["ĠF", "AR", "MER"])  # " F" "AR" "MER": the same text
    assert tok.decode(other) == " FARMER" and other != canonical[:-1]
    wrong = tok.convert_tokens_to_ids(["ĠF", "AR", "MS"])  # " FARMS": fits the answer, then leaves it
    for path, verdict in [(other + [newline], True), (canonical, True), (wrong + [newline], False),
                          (other[:2] + [newline], False)]:  # " FAR" then a line break: stops early
        hooks = _forcing_hooks(smollm2, [path])
        # real greedy decoding, token by token, under the same hooks
        seq = example.enc.reduced[: example.last_prompt_reduced + 1]
        out = []
        for _ in range(len(path)):
            with _tl.hooked(smollm2, hooks([example], False)):
                nxt = int(smollm2(seq[None])[0, -1].argmax())
            if nxt == newline:
                break
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt])])
        assert out == [t for t in path if t != newline], "the forcing hook should drive greedy decoding"
        right, _ = E.greedy_match(smollm2, [example], with_chunk=False, hooks=hooks)
        assert bool(right[0]) is verdict, tok.decode(path)
        tokens, _ = E.greedy_match(smollm2, [example], with_chunk=False, hooks=hooks, compare="tokens")
        assert bool(tokens[0]) is (path == canonical), tok.decode(path)
    with pytest.raises(ValueError, match="compare"):
        E.greedy_match(smollm2, [example], with_chunk=False, compare="string")


@pytest.mark.slow
@pytest.mark.real_model
def test_cached_greedy_decoding_equals_the_uncached_loop_on_the_real_model(smollm2, slice_task):
    """On the default model, the key-value-cached decoding of ``query_answers`` gives the same
    tokens as decoding every step from the start, for prompts of several lengths."""
    from tl_thoughts.templates import encode_example

    prompts = [encode_example(smollm2, slice_task.template, slice_task.chunk, q).full.cpu()
               for q in slice_task.queries[:24]]
    assert len({p.shape[0] for p in prompts}) > 1  # several length groups
    stops, unembed = E.stop_tokens(smollm2), smollm2.W_U.T.contiguous()
    keep = lambda i, g: len(g) <= 16  # noqa: E731
    expected = S.greedy_decode(smollm2, prompts, [[] for _ in prompts], keep, stops, unembed)
    assert S.greedy_decode_cached(smollm2, prompts, keep, stops, unembed) == expected
    assert S.greedy_decode_cached(smollm2, prompts, keep, stops, unembed, batch_size=3) == expected  # groups split
    assert all(expected[1])  # every query's generation ends on a stop token


@pytest.mark.slow
@pytest.mark.real_model
def test_query_answers_are_the_models_greedy_answers_with_the_chunk(smollm2, slice_task):
    """``query_answers`` gives the first queries in order whose greedy generation WITH the chunk
    (recomputed here one prompt at a time) is a usable answer, skipping the others; too few
    usable queries is a clear error."""
    pairs = E.query_answers(smollm2, slice_task, 10, batch_size=4)  # several batches
    assert len(pairs) == 10
    used = {q for q, _ in pairs}
    last = slice_task.queries.index(pairs[-1][0])
    for query in slice_task.queries[: last + 1]:
        text = E.greedy_generate(smollm2, slice_task.prompt(query, True, smollm2), max_new_tokens=16)
        usable = text.startswith(" ") and text[1:] == text[1:].strip() != ""
        assert (query in used) == usable, (query, text)
        if usable:
            assert (query, text[1:]) in pairs
    assert [q for q, _ in pairs] == [q for q in slice_task.queries[: last + 1] if q in used]  # in order
    assert E.query_answers(smollm2, slice_task, 0) == []
    # a query whose answer and itself are an example the other way round is skipped
    query, answer = pairs[0]
    reverse = dataclasses.replace(slice_task, examples=slice_task.examples + ((answer, query),))
    assert E.query_answers(smollm2, reverse, 9, batch_size=4) == pairs[1:]
    few = dataclasses.replace(slice_task, queries=slice_task.queries[:3])
    with pytest.raises(tt.InputError, match="3 unlabelled queries"):
        E.query_answers(smollm2, few, 5)
    with pytest.raises(tt.InputError, match="n_queries is"):
        E.evaluate_seed(smollm2, slice_task, E.EvalConfig(n_fit=8, n_queries=2), 0,
                        E.TaskInputs(E.example_verdicts(smollm2, slice_task), pairs))


@pytest.mark.slow
@pytest.mark.real_model
def test_query_rows_from_the_decoding_equal_the_streamed_ones(smollm2_f64, slice_task, monkeypatch):
    """``query_answers_with_rows`` (the rows read from the decoding's own runs) gives the queries
    of ``query_answers`` and the rows of ``query_full_rows`` (streamed), to float64 rounding, on the
    default model; a query whose run is not its prompt (another tokenization of its answer) is
    streamed; the runs' records are what is read; a config that fits nothing keeps no rows."""
    model = smollm2_f64
    config = E.EvalConfig(n_fit=8, n_queries=10, batch_size=4)
    queries, rows = E.query_answers_with_rows(model, slice_task, config)
    assert queries == E.query_answers(model, slice_task, 10, batch_size=4)
    streamed = E.query_full_rows(model, slice_task, queries, config)
    assert rows.index == streamed.index and torch.equal(rows.positions, streamed.positions)
    assert (rows.pool, rows.query_weight) == (streamed.pool, streamed.query_weight)
    assert_close(rows.pre, streamed.pre, 1e-10, "resid_pre rows")
    assert_close(rows.attn, streamed.attn, 1e-10, "attn_out rows")
    # tampered runs: the first query's run spells its answer otherwise (its record zeroed), the
    # second's record doubled
    answer_queries = E.query_answers_with_runs

    def tampered(*args, **kwargs):
        out, runs = answer_queries(*args, **kwargs)
        (ex0, run0, (pre0, attn0), f0), (ex1, run1, (pre1, attn1), f1) = runs[:2]
        other = run0.clone()
        other[ex0.enc.answer_start] += 1
        runs[0] = (ex0, other, (0 * pre0, 0 * attn0), f0)
        runs[1] = (ex1, run1, (2 * pre1, 2 * attn1), f1)
        return out, runs

    monkeypatch.setattr(decoding, "query_answers_with_runs", tampered)
    _, read = E.query_answers_with_rows(model, slice_task, config)
    first, second = (read.rows_of(E.encode_task_example(model, slice_task, q, a).enc.full) for q, a in queries[:2])
    alone = tt.prompt_rows(model, slice_task.chunk, [(queries[0][0], slice_task.continuation(queries[0][1]))],
                             template=slice_task.template, pool=config.pool, query_weight=config.query_weight)
    assert_close(read.pre[:, first], alone.pre, 1e-10, "the streamed query's rows")
    assert_close(read.pre[:, second], 2 * streamed.pre[:, second], 1e-9, "the doubled record's rows")
    assert_close(read.pre[:, len(first) + len(second):], streamed.pre[:, len(first) + len(second):], 1e-10, "others")
    monkeypatch.undo()
    vector_free = E.EvalConfig(n_fit=8, n_queries=3, methods=("with_chunk", "without_chunk", "task_vector"))
    assert E.query_answers_with_rows(model, slice_task, vector_free) == (queries[:3], None)


@pytest.mark.slow
@pytest.mark.real_model
def test_the_steering_baselines_are_fitted_on_the_queries_too(smollm2, slice_task):
    """The mean differences of the steering baselines average over the fit examples AND the
    answered queries: the all-layer steering verdicts equal hooks built from those rows by hand
    (and differ from the fit examples' alone, so the check is not vacuous)."""
    method = "steering_all_layers"
    config = E.EvalConfig(n_fit=8, n_queries=N_QUERIES, methods=("with_chunk", "without_chunk", method))
    seed = E.evaluate_seed(smollm2, slice_task, config, 0)
    queries = E.query_answers(smollm2, slice_task, N_QUERIES)
    fit_set = E.encode_task_examples(smollm2, slice_task, seed.fit_indices)
    query_set = [E.encode_task_example(smollm2, slice_task, q, a) for q, a in queries]
    filtered = E.encode_task_examples(smollm2, slice_task, seed.filtered_indices)
    start = E.region_start(fit_set)
    rights = {}
    for label, rows in (("with queries", (fit_set, query_set)), ("without", (fit_set, []))):
        # the fit examples' sums plus the queries' (the protocol computes the second once a task)
        deltas, _ = (E.difference_sums(smollm2, rows[0], config.pool, 64)
                     + E.difference_sums(smollm2, rows[1], config.pool, 64)).means()
        right, logprob = E.greedy_match(smollm2, filtered, with_chunk=False,
                                        hooks=E.all_layer_steering_hooks(deltas, start))
        rights[label] = (right.tolist(), logprob.tolist())
    assert rights["with queries"][0] == seed.right[method]
    assert rights["with queries"][1] != rights["without"][1]


@pytest.mark.slow
@pytest.mark.real_model
def test_any_subset_of_the_baselines_runs(smollm2, slice_task):
    """Each baseline alone (the layer search then runs for one edit, or for none)."""
    for method in ("steering_all_layers", "task_vector", "steering_best_layer"):
        config = E.EvalConfig(n_fit=8, n_queries=N_QUERIES, methods=("with_chunk", "without_chunk", method))
        seed = E.evaluate_seed(smollm2, slice_task, config, 0)
        assert len(seed.right[method]) == len(seed.filtered_indices) > 0
        assert set(seed.layers) == ({method} - {"steering_all_layers"})


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_search_equals_whole_hooked_runs(text_models, arch):
    """``best_layers`` (the candidates staggered, each running only from its edit's first position,
    the earlier ones' keys and values read from the unedited run's key-value cache) gives every
    layer's accuracy and mean log-probability that ``greedy_match`` gives under the same edit as
    hooks on whole runs, float64: a steering vector from the chunk's place on and task vectors at
    each prompt's last position, prompts of several lengths in batches of 2."""
    from tl_thoughts.templates import encode_example

    model = text_models(arch)
    template = tt.PromptTemplate("<eos>{chunk}{query}", separator="")
    pairs = [(" the dog", " ran ."), (" a big red hat", " sat ."), (" the red cat", " ran on ."), (" a dog", " sat on .")]
    examples = []
    for pair in pairs:
        enc = encode_example(model, template, "the cat sat on the mat and", pair)
        examples.append(E.TaskExample(enc, enc.full.shape[0] - enc.answer_start))
    stops = torch.zeros(model.cfg.d_vocab, dtype=torch.bool)
    stops[model.to_single_token(".")] = True
    g = torch.Generator().manual_seed(0)
    d, n_layers = model.cfg.d_model, model.cfg.n_layers
    deltas = torch.randn(n_layers + 1, d, generator=g, dtype=torch.float64)
    vectors = 3 * torch.randn(n_layers, d, generator=g, dtype=torch.float64)
    start = E.region_start(examples)
    edits = {"steering": E.steering_edit(deltas, start), "task_vector": E.task_vector_edit(vectors)}
    groups = [[examples[i] for i in g] for g in E.search_groups(examples, edits, 2)]
    assert len(groups) == 2 and 0 < start < min(edits["task_vector"].first(g) for g in groups)  # both read a cache
    best = E.best_layers(model, examples, edits, stops, 4)  # batches of 2
    hooks = {"steering": lambda layer: E.steering_hooks(deltas, [layer], start),
             "task_vector": lambda layer: E.task_vector_hooks(vectors, layer)}
    for name, (layer, accuracy, logprob) in best.items():
        for candidate in range(n_layers):
            right, lp = E.greedy_match(model, examples, with_chunk=False, hooks=hooks[name](candidate), stops=stops,
                                       batch_size=4, compare="tokens")
            assert accuracy[candidate] == float(right.double().mean()), (name, candidate)
            assert abs(logprob[candidate] - float(lp.mean())) < 1e-10, (name, candidate)
        assert max(logprob) - min(logprob) > 1e-3  # the layers' edits differ
        assert layer == max(range(n_layers), key=lambda k: (accuracy[k], logprob[k], -k))
    assert best["steering"][2] != best["task_vector"][2]
    liar = E.ResidEdit(edits["steering"].apply, lambda batch: start + 1)  # it changes position start
    with pytest.raises(RuntimeError, match="changes positions before its first one"):
        E.best_layers(model, examples, {"liar": liar}, stops, 4)
    # other groups (every example alone; all four together): the same values, to float64 rounding
    for most in (2, 8):
        for cost in (0, 10**6):
            assert len(E.search_groups(examples, edits, most // 2, group_cost=cost)) == (4 if cost == 0 or most == 2 else 1)
            other = E.best_layers(model, examples, edits, stops, most, group_cost=cost)
            for name in best:
                assert other[name][0] == best[name][0] and other[name][1] == best[name][1]
                assert max(abs(a - b) for a, b in zip(other[name][2], best[name][2])) < 1e-10


def test_layer_search_groups_are_the_cheapest_cuts():
    """``search_groups`` sorts the examples by the positions the verdicts read and cuts them where
    the positions run (padding included) plus a fixed cost a group are fewest: the cheapest of
    every contiguous cut (brute force), with groups of at most ``most``, each example once."""
    import itertools

    from tl_thoughts.templates import EncodedExample

    def example(n):  # n tokens without the chunk (3 tokens), the last 3 the continuation
        full = torch.zeros(n + 3, dtype=torch.long)
        return E.TaskExample(EncodedExample(full, full[:n], 1, 4, n), 3)

    examples = [example(n) for n in (9, 5, 6, 5, 12, 5, 7)]
    edits = {"from 1": E.ResidEdit(lambda *a: None, lambda batch: 1),
             "last prompt": E.ResidEdit(lambda *a: None, lambda batch: min(e.last_prompt_reduced for e in batch))}

    def cost(indices):
        batch = [examples[i] for i in indices]
        end = max(E.n_positions_read(e, e.enc.reduced) for e in batch)
        first_read = min(e.last_prompt_reduced for e in batch)
        return E.SEARCH_GROUP_COST + sum(len(batch) * (end - min(edit.first(batch), first_read)) for edit in edits.values())

    order = sorted(range(len(examples)), key=lambda i: examples[i].enc.reduced.shape[0])
    for most in (1, 3, 7):
        groups = E.search_groups(examples, edits, most)
        assert sorted(i for g in groups for i in g) == list(range(len(examples))) and max(map(len, groups)) <= most
        assert [i for g in groups for i in g] == order  # sorted, cut into runs
        best = min(
            sum(cost(order[a:b]) for a, b in zip((0,) + cuts, cuts + (len(order),)))
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
            if all(b - a <= most for a, b in zip((0,) + cuts, cuts + (len(order),)))
        )
        assert sum(cost(g) for g in groups) == best
    assert len(E.search_groups(examples, edits, 7)) not in (1, 7)  # neither extreme here


@pytest.mark.slow
@pytest.mark.real_model
def test_staggered_layer_search_equals_hooked_runs(smollm2, slice_task):
    fit_set = E.encode_task_examples(smollm2, slice_task, range(6))
    deltas, vectors = E.mean_differences(smollm2, fit_set, "answer", 4)
    start = E.region_start(fit_set)
    stops = E.stop_tokens(smollm2)
    edits = {"steering": E.steering_edit(deltas, start), "task_vector": E.task_vector_edit(vectors)}
    # a group of 2 examples: three staggered runs, the last one shorter
    best = E.best_layers(smollm2, fit_set[:5], edits, stops, 4)
    hooks = {"steering": lambda layer: E.steering_hooks(deltas, [layer], start),
             "task_vector": lambda layer: E.task_vector_hooks(vectors, layer)}
    for name, (layer, accuracy, logprob) in best.items():
        assert len(accuracy) == len(logprob) == smollm2.cfg.n_layers and accuracy[layer] == max(accuracy)
        for candidate in sorted({0, 11, 29, layer}):
            right, lp = E.greedy_match(smollm2, fit_set[:5], with_chunk=False, hooks=hooks[name](candidate))
            assert accuracy[candidate] == float(right.double().mean()), (name, candidate)
            assert abs(logprob[candidate] - float(lp.mean())) < 1e-3, (name, candidate)  # float32 shapes differ
    assert len({tuple(accuracy) for _, accuracy, _ in best.values()}) == 2  # the edits were not mixed up


@pytest.mark.slow
@pytest.mark.real_model
def test_eval_command_writes_results(tmp_path, slice_task):
    from tl_thoughts.cli import main

    path = tmp_path / "task.json"
    data = slice_task.to_json()
    path.write_text(json.dumps(data))
    # the format asks for 60 examples: a 24-example slice is refused by the command
    assert main(["eval", "--task", str(path), "--out", str(tmp_path / "out")]) == 2
    full = load_task(next(p for p in shipped_tasks() if p.stem == "past_tense"))
    path.write_text(json.dumps(full.to_json()))
    argv = ["eval", "--task", str(path), "--out", str(tmp_path / "out"), "--seeds", "0",
            "--n-fit", "8", "--queries", "3", "--methods", "with_chunk", "without_chunk", "thought_vector",
            "--also", "thought_patch_refined",
            "--refine-steps", "2", "--rank-on-queries", "--ridge", "0.25", "--quiet"]
    code = main(argv)
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    # the same command again: the task's stored result read back (no model), the same files
    md = (tmp_path / "out" / "results.md").read_text()
    assert main(argv) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    assert (tmp_path / "out" / "results.md").read_text() == md
    assert {"with_chunk", "without_chunk", "thought_vector", "thought_patch_refined", "meta"} == set(results)
    assert results["meta"]["command"].startswith(f"tl-thoughts eval --task {path} --out ")
    assert results["meta"]["config"]["refine_steps"] == 2
    assert results["meta"]["config"]["rank_on_queries"] is True and results["meta"]["config"]["ridge"] == 0.25
    assert results["meta"]["config"]["n_queries"] == 3 and len(results["meta"]["tasks"]["past_tense"]["queries"]) == 3
    assert results["with_chunk"]["per_task"]["past_tense"]["accuracy"] == 1.0
    n = results["thought_vector"]["n_filtered"]["past_tense"][0]
    assert n > 0 and 0 <= results["thought_vector"]["accuracy"] <= 1
    assert (tmp_path / "out" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "| past_tense |" in (tmp_path / "out" / "results.md").read_text()


def test_eval_command_refuses_bad_arguments(tmp_path, capsys):
    from tl_thoughts.cli import main

    assert main(["eval", "--out", str(tmp_path)]) == 2
    assert "--task" in capsys.readouterr().err
    # a task without enough unlabelled queries for --queries: refused before any model is loaded
    path = tmp_path / "task.json"
    path.write_text(json.dumps(_task_dict(queries=["x", "y"])))
    assert main(["eval", "--task", str(path), "--out", str(tmp_path / "out"), "--queries", "3"]) == 2
    assert "t (2)" in capsys.readouterr().err
    assert main(["eval", "--task", str(path), "--out", str(tmp_path / "out"), "--queries", "-1"]) == 2
    assert "n_queries" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.real_model
def test_worker_processes_give_the_same_results(smollm2, slice_task):
    """``evaluate_in_processes`` (the command's ``--jobs``: one seed of one task per worker at a
    time) gives what ``evaluate_task`` gives in this process at the same thread count: splits,
    filter, chosen rank and layer, and every verdict, seeds in order."""
    config = E.EvalConfig(n_fit=8, n_queries=N_QUERIES, seeds=(1, 0), methods=("with_chunk", "without_chunk", "thought_patch", "task_vector"))
    done = []
    results = E.evaluate_in_processes([slice_task], config, jobs=2, on_result=lambda r: done.append(r.task))
    assert [r.task for r in results] == done == [slice_task.name]
    assert [s.seed for s in results[0].seeds] == [1, 0]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = E.evaluate_task(smollm2, slice_task, config, progress=False)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(here.seeds, results[0].seeds):
        assert (a.fit_indices, a.test_indices, a.filtered_indices) == (b.fit_indices, b.test_indices, b.filtered_indices)
        assert a.right == b.right and a.ranks == b.ranks and a.layers == b.layers
    with pytest.raises(ValueError, match="jobs"):
        E.evaluate_in_processes([slice_task], config, jobs=0)


def test_compare_results_finds_every_changed_value():
    """``compare_results`` on the stored suite: nothing against itself, nor against itself with a
    new method's row; a changed per-seed value, filtered example, chosen layer or a lost method is
    named; the seconds are not values."""
    import copy
    import json
    from pathlib import Path

    stored = json.loads((Path(__file__).resolve().parents[1] / "docs" / "benchmark" / "results.json").read_text())
    assert E.compare_results(stored, stored) == []
    new = copy.deepcopy(stored)
    new["a_new_method"] = {"accuracy": 0.5, "per_seed": {}, "n_filtered": {}}
    new["meta"]["tasks"]["plural"]["seconds"] += 10
    assert E.compare_results(stored, new) == []
    new["thought_patch"]["per_seed"]["plural"][1] += 0.01
    new["meta"]["tasks"]["antonyms"]["filtered_indices"][0] = new["meta"]["tasks"]["antonyms"]["filtered_indices"][0][1:]
    new["meta"]["tasks"]["successor"]["layers"][2]["task_vector"] += 1
    del new["steering_all_layers"]
    diffs = E.compare_results(stored, new)
    assert any(d.startswith("thought_patch.per_seed") for d in diffs)
    assert "meta.tasks.antonyms.filtered_indices: differs" in diffs
    assert "meta.tasks.successor.layers: differs" in diffs
    assert "steering_all_layers: missing" in diffs and len(diffs) == 4
