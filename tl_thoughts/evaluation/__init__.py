"""The behavioural benchmark (THEORY 5): does a patch fitted from a chunk make the model, run
WITHOUT the chunk, do what the chunk asked? Compared with the heuristics the theory explains.

Protocol ([`evaluate_task`][]), per seed:

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
   is reported; an example's verdicts do not depend on the split: [`example_verdicts`][]
   computes them once a task);
4. every method runs on the same filtered examples, without the chunk, after being fitted on the
   same fit rows: the fit examples plus the first ``EvalConfig.n_queries`` of the task's
   unlabelled queries that the model answers WITH the chunk, with those answers
   ([`query_answers`][]; the same queries for every seed, none of them an example, their
   prompts with the chunk run once a task for every seed's fit: their rows are read from the
   decoding's own runs, [`query_answers_with_rows`][], the rows [`query_full_rows`][]
   streams; the refined patch's gradient steps use the labelled fit examples only):

   - ``with_chunk`` / ``without_chunk``: the prompt with / without the chunk, no patch (1 and 0 on
     the filtered set by construction; their unfiltered accuracies are reported too);
   - ``thought_patch``: [`tl_thoughts.fit_thought`][] with [`EvalConfig.fit_config`][] (the
     ``"benchmark"`` preset of [`tl_thoughts.FitConfig`][], its ridge scaled by the rows), applied in its weight
     form, the positions it leaves unpatched (the fixed first token, at the defaults) read from a
     key-value cache of the unpatched model ([`match_under`][]: the values of
     [`tl_thoughts.ThoughtPatch.apply`][]'s activation form); its matrices are used as fitted,
     or, with several candidates in ``EvalConfig.ranks``, at the candidate rank (their best
     low-rank approximations, [`tl_thoughts.ThoughtPatch.truncations`][], or as fitted for
     ``None``) that does best on the fit examples (or on the fit examples and the answered queries
     with ``EvalConfig.rank_on_queries``);
   - ``thought_patch_paper``: the papers' method, [`tl_thoughts.fit_thought`][] with
     [`EvalConfig.paper_fit_config`][] (the ``"paper"`` preset: the mean virtual vector on
     ``b_out``, ridge matrices on ``W_in``/``W_gate``, every position patched) on the ``n_fit``
     labelled fit examples only (no answered query), applied in its weight form;
   - ``thought_vector``, ``thought_matrix``: that patch's thought vectors alone and its thought
     matrices alone, as fitted ([`tl_thoughts.ThoughtPatch.only`][]; not fitted again);
   - ``thought_vector_fitted_alone``, ``thought_matrix_fitted_alone`` (not in
     [`DEFAULT_METHODS`][]): ``fit_thought(fit="vector" | "matrix")``, patches fitted on their
     own (in one [`tl_thoughts.fit_thoughts`][] call with the thought patch), as fitted;
   - ``thought_patch_refined`` (not in [`DEFAULT_METHODS`][]: on request, [`ON_REQUEST`][]):
     that thought patch (at its chosen rank) refined by
     ``EvalConfig.refine_steps`` full-batch Adam steps on the fit examples' answers, without the
     chunk ([`tl_thoughts.refine_thought`][]): the same numbers, trained on the behaviour;
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
the same patch or hooks, and its text compared ([`greedy_match`][]).

Every run of prompts goes through the stream engine ([`tl_thoughts.stream`][]: padding, batches
by length, the shared prefix's key-value cache, runs to the last block, greedy decoding, the rows a
fit reads). The package's modules, each using only those above it:

- ``config``: [`EvalConfig`][], [`check_tasks`][], [`check_model`][], [`check_post_norm_methods`][], [`EvalOptionError`][], the method
  names, [`fit_kinds`][];
- ``examples``: [`TaskExample`][] (a task's example tokenised with and without the chunk),
  [`stop_tokens`][];
- ``decoding``: the queries' answers ([`query_answers`][], [`query_answers_with_rows`][]),
  [`greedy_generate`][];
- ``verdicts``: the teacher-forced check ([`teacher_forced_verdicts`][], [`greedy_match`][],
  [`match_under`][]) and the filter ([`chunk_filter`][], [`example_verdicts`][]);
- ``baselines``: the steering baselines' sums ([`difference_sums`][]), hooks, edits and layer
  search ([`best_layers`][]);
- ``protocol``: [`split`][], [`choose_rank`][], [`TaskInputs`][] / [`prepare_task`][],
  [`evaluate_seed`][], [`evaluate_task`][], [`evaluate_in_processes`][];
- ``report``: ``results.json`` ([`results_json`][]), [`markdown_table`][],
  [`plot_results`][], [`write_results`][]; each task's result stored as it finishes and read
  back by a rerun ([`run_options`][], [`save_task_result`][], [`stored_task_results`][]).

The names are imported on first use (reading ``tl_thoughts.evaluation.EvalConfig`` imports the
``config`` module), so that the command line's parser reads the options' defaults from ``config``
without importing torch or TransformerLens.
"""

import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING

# module -> the public names it defines (imported when one of them is first read)
_MODULES = MappingProxyType({
    "config": ("BASELINES", "DEFAULT_METHODS", "FIT_METHODS", "FITTED_ALONE", "METHODS", "ON_REQUEST",
        "PART_METHODS", "EvalConfig", "EvalOptionError", "check_model", "check_post_norm_methods", "check_tasks",
        "fit_kinds"),
    "examples": ("TaskExample", "encode_task_example", "encode_task_examples", "n_positions_read",
        "stop_tokens"),
    "decoding": ("QueryRun", "greedy_generate", "greedy_generate_all", "query_answers", "query_answers_with_rows",
        "query_answers_with_runs", "query_full_rows"),
    "verdicts": ("HookFactory", "chunk_filter", "example_verdicts", "greedy_match", "match_under",
        "teacher_forced_verdicts"),
    "baselines": ("SEARCH_GROUP_COST", "DifferenceSums", "ResidEdit", "all_layer_steering_hooks",
        "best_layers", "difference_sums", "mean_differences", "query_difference_sums", "region_start",
        "search_groups", "shared_full_length", "steering_edit", "steering_hooks", "task_vector_edit",
        "task_vector_hooks"),
    "protocol": ("SeedResult", "TaskInputs", "TaskResult", "choose_rank", "evaluate_in_processes",
        "evaluate_seed", "evaluate_task", "prepare_task", "split"),
    "report": ("checkout_commit", "compare_results", "markdown_table", "plot_results", "results_json",
        "write_results", "run_options", "task_result_path", "save_task_result", "stored_task_results"),
})

if TYPE_CHECKING:  # the same names, for static tools (type checkers, the API docs)
    from tl_thoughts.evaluation.config import (
        BASELINES,
        DEFAULT_METHODS,
        EvalConfig,
        EvalOptionError,
        FITTED_ALONE,
        FIT_METHODS,
        METHODS,
        ON_REQUEST,
        PART_METHODS,
        check_model,
        check_post_norm_methods,
        check_tasks,
        fit_kinds,
    )
    from tl_thoughts.evaluation.examples import (
        TaskExample,
        encode_task_example,
        encode_task_examples,
        n_positions_read,
        stop_tokens,
    )
    from tl_thoughts.evaluation.decoding import (
        QueryRun,
        greedy_generate,
        greedy_generate_all,
        query_answers,
        query_answers_with_rows,
        query_answers_with_runs,
        query_full_rows,
    )
    from tl_thoughts.evaluation.verdicts import (
        HookFactory,
        chunk_filter,
        example_verdicts,
        greedy_match,
        match_under,
        teacher_forced_verdicts,
    )
    from tl_thoughts.evaluation.baselines import (
        DifferenceSums,
        ResidEdit,
        SEARCH_GROUP_COST,
        all_layer_steering_hooks,
        best_layers,
        difference_sums,
        mean_differences,
        query_difference_sums,
        region_start,
        search_groups,
        shared_full_length,
        steering_edit,
        steering_hooks,
        task_vector_edit,
        task_vector_hooks,
    )
    from tl_thoughts.evaluation.protocol import (
        SeedResult,
        TaskInputs,
        TaskResult,
        choose_rank,
        evaluate_in_processes,
        evaluate_seed,
        evaluate_task,
        prepare_task,
        split,
    )
    from tl_thoughts.evaluation.report import (
        checkout_commit,
        compare_results,
        markdown_table,
        plot_results,
        results_json,
        run_options,
        save_task_result,
        stored_task_results,
        task_result_path,
        write_results,
    )

__all__ = [
    # config
    "BASELINES",
    "DEFAULT_METHODS",
    "FIT_METHODS",
    "FITTED_ALONE",
    "METHODS",
    "ON_REQUEST",
    "PART_METHODS",
    "EvalConfig",
    "EvalOptionError",
    "check_model",
    "check_post_norm_methods",
    "check_tasks",
    "fit_kinds",
    # examples
    "TaskExample",
    "encode_task_example",
    "encode_task_examples",
    "n_positions_read",
    "stop_tokens",
    # decoding
    "QueryRun",
    "greedy_generate",
    "greedy_generate_all",
    "query_answers",
    "query_answers_with_rows",
    "query_answers_with_runs",
    "query_full_rows",
    # verdicts
    "HookFactory",
    "chunk_filter",
    "example_verdicts",
    "greedy_match",
    "match_under",
    "teacher_forced_verdicts",
    # baselines
    "SEARCH_GROUP_COST",
    "DifferenceSums",
    "ResidEdit",
    "all_layer_steering_hooks",
    "best_layers",
    "difference_sums",
    "mean_differences",
    "query_difference_sums",
    "region_start",
    "search_groups",
    "shared_full_length",
    "steering_edit",
    "steering_hooks",
    "task_vector_edit",
    "task_vector_hooks",
    # protocol
    "SeedResult",
    "TaskInputs",
    "TaskResult",
    "choose_rank",
    "evaluate_in_processes",
    "evaluate_seed",
    "evaluate_task",
    "prepare_task",
    "split",
    # report
    "checkout_commit",
    "compare_results",
    "markdown_table",
    "plot_results",
    "results_json",
    "write_results",
    "run_options",
    "task_result_path",
    "save_task_result",
    "stored_task_results",
]


def __getattr__(name: str):
    """A public name, from its module (imported now)."""
    for module, names in _MODULES.items():
        if name in names:
            return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
