"""Behavioural tasks: one JSON file a task (a chunk, a prompt template, (query, answer) examples).

The format (all keys but ``description``, ``template``, ``answer_prefix``, ``answer_suffix`` and
``queries`` required)::

    {
      "name": "past_tense",
      "description": "An English verb to its simple past tense.",
      "chunk": "walk -> walked\\nsee -> saw\\n",
      "template": {"text": "{bos}{chunk}{query} ->", "separator": ""},
      "answer_prefix": " ",
      "answer_suffix": "\\n",
      "examples": [{"query": "go", "answer": "went"}, ...],
      "queries": ["run", "sing", ...]
    }

The prompt WITH the chunk is ``template.render(query, chunk)``, WITHOUT it
``template.render(query)``; the expected continuation is ``answer_prefix + answer`` and then a
line break (``answer_suffix``, which must hold a line break: it is where greedy decoding stops).
The default template is ``{"text": "{chunk}{query} ->", "separator": ""}`` and the default
answer prefix a space, as in the demonstrations ``"x -> y\\n"``. A template's text may start
with ``{bos}``: the model's BOS token (the shipped tasks' templates do), rendered for each model
when prompts are tokenised ([`tl_thoughts.templates.PromptTemplate.for_model`][]).

``queries`` are unlabelled queries: more inputs of the task, without answers, none of them an
example's query. The benchmark answers them with the model itself, WITH the chunk, and fits every
method on them too (``EvalConfig.n_queries``; see [`tl_thoughts.evaluation.query_answers`][]).
"""

import json
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from tl_thoughts.errors import ArgumentTypeError, InputError, check_int
from tl_thoughts.templates import PromptTemplate

if TYPE_CHECKING:
    from tl_thoughts._tl import Model

DATA = Path(__file__).parent / "data"
REQUIRED = ("name", "chunk", "examples")
OPTIONAL = ("description", "template", "answer_prefix", "answer_suffix", "queries")
MIN_EXAMPLES = 60


class TaskFormatError(InputError):
    """A task file does not follow the task format; the message says where."""


@dataclass(frozen=True)
class Task:
    """A behavioural task: a chunk and the (query, answer) examples it should make the model do.

    Attributes:
        name: Short identifier.
        description: What the task asks.
        chunk: The text removed from the prompt (an instruction and/or demonstrations).
        template: Where chunk and query go.
        answer_prefix: Text before each answer (e.g. the space after ``"->"``).
        answer_suffix: Text after each answer, holding the line break that ends it.
        examples: ``(query, answer)`` pairs.
        queries: Unlabelled queries (no answers), none of them an example's query.
    """

    name: str
    description: str
    chunk: str
    template: PromptTemplate
    answer_prefix: str
    answer_suffix: str
    examples: tuple[tuple[str, str], ...]
    queries: tuple[str, ...] = ()

    def prompt(self, query: str, with_chunk: bool, model: "Model | None" = None) -> str:
        """The prompt for ``query`` with or without the chunk, for ``model``: its text tokenises
        (``model.to_tokens``) as the benchmark's tokens. A template starting with ``{bos}`` (the
        shipped tasks') needs the model ([`tl_thoughts.templates.PromptTemplate.for_model`][]).

        Raises:
            InputError: The template starts with ``{bos}`` and no model is given, or the model has
                no BOS token its tokenization gives.

        Example:
            >>> task = load_task(shipped_tasks()[0])
            >>> task.prompt("tall", False, smollm2)  # doctest: +SKIP
            '<|im_start|>tall ->'
        """
        template = self.template if model is None else self.template.for_model(model)
        return template.render(query, self.chunk if with_chunk else None)

    def continuation(self, answer: str) -> str:
        """The expected continuation: prefix, answer, and the line break that ends it."""
        return self.answer_prefix + answer + self.answer_suffix

    def fit_examples(self, indices) -> list[tuple[str, str]]:
        """``(query, continuation)`` pairs for [`tl_thoughts.fit_thought`][]."""
        return [(self.examples[i][0], self.continuation(self.examples[i][1])) for i in indices]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "chunk": self.chunk,
            "template": {"text": self.template.text, "separator": self.template.separator},
            "answer_prefix": self.answer_prefix,
            "answer_suffix": self.answer_suffix,
            "examples": [{"query": q, "answer": a} for q, a in self.examples],
            **({"queries": list(self.queries)} if self.queries else {}),
        }


def _string(data: dict, key: str, where: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise TaskFormatError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _one_line(text: str) -> bool:
    return bool(text) and text == text.strip() and "\n" not in text


def _queries(data: dict, where: str, examples: set[str]) -> tuple[str, ...]:
    raw = data.get("queries", [])
    if not isinstance(raw, list):
        raise TaskFormatError(f"{where}: 'queries' must be a list of strings")
    seen: set[str] = set()
    for i, q in enumerate(raw):
        if not isinstance(q, str) or not _one_line(q):
            raise TaskFormatError(
                f"{where}: query {i} ({q!r}) of 'queries' must be a non-empty one-line string without "
                "surrounding whitespace"
            )
        if q in seen:
            raise TaskFormatError(f"{where}: query {q!r} appears twice in 'queries'")
        if q in examples:
            raise TaskFormatError(f"{where}: query {q!r} of 'queries' is also an example's query")
        seen.add(q)
    return tuple(raw)


def task_from_dict(data: dict, where: str = "task", min_examples: int = MIN_EXAMPLES) -> Task:
    """Validate and build a [`Task`][] from its JSON object.

    Raises:
        TaskFormatError: A missing or unknown key, a wrong type, an empty chunk, fewer than
            ``min_examples`` examples, a repeated query, an answer with a line break or surrounding
            whitespace, a suffix without a line break, a bad template, or an unlabelled query that
            is repeated, not one line, or an example's query.

    Example:
        >>> task = task_from_dict({"name": "t", "chunk": "a -> b\\n",
        ...     "examples": [{"query": f"q{i}", "answer": f"a{i}"} for i in range(60)]})
        >>> task.prompt("q0", with_chunk=True), task.continuation("a0")
        ('a -> b\\nq0 ->', ' a0\\n')
    """
    check_int(min_examples, "min_examples")
    if not isinstance(data, dict):
        raise TaskFormatError(f"{where}: a task is a JSON object")
    missing = [k for k in REQUIRED if k not in data]
    unknown = [k for k in data if k not in REQUIRED + OPTIONAL]
    if missing or unknown:
        raise TaskFormatError(f"{where}: missing keys {missing}, unknown keys {unknown}")
    name = _string(data, "name", where)
    chunk = _string(data, "chunk", where)
    if not name or not chunk:
        raise TaskFormatError(f"{where}: 'name' and 'chunk' must not be empty")
    template_data = data.get("template", {"text": "{chunk}{query} ->", "separator": ""})
    if not isinstance(template_data, dict) or set(template_data) - {"text", "separator"}:
        raise TaskFormatError(f"{where}: 'template' is an object with 'text' and 'separator'")
    try:
        template = PromptTemplate(
            text=_string(template_data, "text", where + ".template"),
            separator=_string(template_data, "separator", where + ".template", ""),
        )
    except ValueError as e:
        raise TaskFormatError(f"{where}: {e}") from None
    prefix = _string(data, "answer_prefix", where, " ")
    suffix = _string(data, "answer_suffix", where, "\n")
    if "\n" not in suffix:
        raise TaskFormatError(f"{where}: 'answer_suffix' must hold the line break that ends an answer")
    raw = data["examples"]
    if not isinstance(raw, list) or len(raw) < min_examples:
        raise TaskFormatError(f"{where}: 'examples' must be a list of at least {min_examples} examples")
    examples, seen = [], set()
    for i, ex in enumerate(raw):
        if not isinstance(ex, dict) or set(ex) != {"query", "answer"}:
            raise TaskFormatError(f"{where}: example {i} must be an object with 'query' and 'answer'")
        q, a = _string(ex, "query", f"{where} example {i}"), _string(ex, "answer", f"{where} example {i}")
        if not _one_line(q) or not _one_line(a):
            raise TaskFormatError(
                f"{where}: example {i} ({q!r} -> {a!r}): query and answer must be non-empty, one line, "
                "without surrounding whitespace"
            )
        if q in seen:
            raise TaskFormatError(f"{where}: query {q!r} appears twice")
        seen.add(q)
        examples.append((q, a))
    return Task(
        name=name,
        description=_string(data, "description", where, ""),
        chunk=chunk,
        template=template,
        answer_prefix=prefix,
        answer_suffix=suffix,
        examples=tuple(examples),
        queries=_queries(data, where, seen),
    )


def load_task(path: str | Path, min_examples: int = MIN_EXAMPLES) -> Task:
    """Load and validate one task file.

    Raises:
        TaskFormatError: No such file, a directory, an unreadable file, invalid JSON or a file that
            breaks the format (the message names the path and says where).
        ArgumentTypeError: ``path`` not a string or a path, ``min_examples`` not an integer.

    Example:
        >>> task = load_task(shipped_tasks()[0])
        >>> len(task.examples) >= 60
        True
    """
    if not isinstance(path, (str, Path)):
        raise ArgumentTypeError(f"path must be a str or a pathlib.Path, got {type(path).__name__}")
    check_int(min_examples, "min_examples")
    path = Path(path)
    if path.is_dir():
        raise TaskFormatError(f"{path}: a directory, not a task file (its task files: {path}/*.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskFormatError(f"{path}: no such task file") from None
    except OSError as e:
        raise TaskFormatError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskFormatError(f"{path}: not valid JSON ({e})") from None
    return task_from_dict(data, where=str(path), min_examples=min_examples)


def shipped_tasks() -> list[Path]:
    """Paths of the task files shipped with the library, sorted by name.

    Example:
        >>> " ".join(p.stem for p in shipped_tasks())
        'antonyms comparative country_capital number_word past_tense plural successor uppercase'
    """
    return sorted(DATA.glob("*.json"))
