"""Built-in prompts with an instruction or few-shot chunk, for the default chat model, and
their plain-text form for base models (Gemma 3 270M).

Each case is a user turn whose chunk (an instruction or demonstrations) is removed; the rest is
the query. ``chat_prompt`` wraps it in the model's chat template, so the chunk sits after a
chat-template prefix (system turn and ``<|im_start|>user``) and before the query. A base model
without a chat template reads ``case.user_message`` as plain text ([`suite_prompts`][]), after
the BOS its tokenizer prepends; ``BASE_SUITE`` adds completions a base model continues
naturally (a known fact, a story, a question-answer pair, code).
"""

from dataclasses import dataclass

import torch

from tl_thoughts.errors import InputError


@dataclass(frozen=True)
class PromptCase:
    """A user message ``chunk + separator + query``; the chunk is what gets removed."""

    name: str
    chunk: str
    query: str
    separator: str = "\n"

    @property
    def user_message(self) -> str:
        return self.chunk + self.separator + self.query


DEFAULT_CASE = PromptCase(
    name="french",
    chunk="Translate the following English word into French. Answer with one word.",
    query="cat",
)

SUITE: tuple[PromptCase, ...] = (
    DEFAULT_CASE,
    PromptCase("antonym", "Give the opposite of the word. Answer with one word.", "hot"),
    PromptCase("capital", "Name the capital city of the country. Answer with one word.", "Japan"),
    PromptCase("past_tense", "Write the past tense of the verb. Answer with one word.", "run"),
    PromptCase("plural", "Write the plural of the noun. Answer with one word.", "mouse"),
    PromptCase("uppercase", "Repeat the word in capital letters.", "banana"),
    PromptCase("sum", "Add the two numbers and answer with the number only.", "3 + 4"),
    PromptCase("spanish", "Translate into Spanish. Answer with one word.", "dog"),
    PromptCase("color", "Name the usual color of the object. Answer with one word.", "grass"),
    PromptCase("rhyme", "Give a word that rhymes with the word.", "cat"),
    PromptCase("synonym", "Give a synonym of the word. Answer with one word.", "big"),
    PromptCase("yes_no", "Answer only yes or no.", "Is the sun hot?"),
    PromptCase("pirate", "Answer like a pirate.", "How are you today?"),
    PromptCase("haiku", "Reply with a haiku.", "Describe the sea."),
    PromptCase("json", "Answer in JSON with a key named answer.", "What is 2 + 2?"),
    PromptCase(
        "fewshot_antonym",
        "hot -> cold\nbig -> small\nfast -> slow\nhappy -> sad",
        "tall ->",
    ),
    PromptCase(
        "fewshot_capital",
        "France -> Paris\nItaly -> Rome\nSpain -> Madrid\nGermany -> Berlin",
        "Japan ->",
    ),
    PromptCase(
        "fewshot_french",
        "dog -> chien\nhouse -> maison\nwater -> eau\nbread -> pain",
        "cat ->",
    ),
    PromptCase(
        "fewshot_plural",
        "cat -> cats\nbox -> boxes\nchild -> children\nfoot -> feet",
        "mouse ->",
    ),
    PromptCase(
        "fewshot_sum",
        "2 + 3 = 5\n4 + 1 = 5\n6 + 2 = 8\n3 + 3 = 6",
        "5 + 2 =",
    ),
    PromptCase(
        "fewshot_past",
        "walk -> walked\ngo -> went\neat -> ate\nsee -> saw",
        "run ->",
    ),
    PromptCase(
        "fewshot_upper",
        "apple -> APPLE\nsun -> SUN\nriver -> RIVER\nbook -> BOOK",
        "moon ->",
    ),
)


def chat_prompt(model: torch.nn.Module, case: PromptCase) -> str:
    """The full prompt text of ``case`` in the model's chat template, ready for the assistant turn.

    Args:
        model: A model whose tokenizer has a chat template.
        case: The prompt case.

    Returns:
        The prompt text; ``case.chunk`` occurs in it exactly once.
    """
    if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
        raise InputError("chat_prompt needs a model whose tokenizer has a chat template")
    return model.tokenizer.apply_chat_template(
        [{"role": "user", "content": case.user_message}],
        tokenize=False,
        add_generation_prompt=True,
    )


BASE_CASES: tuple[PromptCase, ...] = (
    PromptCase(
        "fact_everest",
        "Mount Everest, in the Himalayas, is the highest mountain on Earth.",
        "The highest mountain on Earth is Mount",
        separator=" ",
    ),
    PromptCase(
        "story_fox",
        "Once upon a time, a small red fox named Pip lived in a forest by the river.",
        "Every morning, the fox named",
        separator=" ",
    ),
    PromptCase(
        "qa_capital",
        "Q: What is the capital of France?\nA: Paris",
        "Q: What is the capital of Italy?\nA:",
    ),
    PromptCase(
        "code_add",
        "def add(a, b):\n    return a + b\n",
        "def subtract(a, b):\n    return",
    ),
    PromptCase(
        "list_days",
        "Monday, Tuesday, Wednesday,",
        "Thursday,",
        separator=" ",
    ),
    PromptCase(
        "definition",
        "A glarb is a small blue bird that sings at night.",
        "What sings at night? A",
        separator=" ",
    ),
)
"""Plain-text completions for base models: each chunk holds what the query's continuation uses."""

BASE_SUITE: tuple[PromptCase, ...] = SUITE + BASE_CASES
"""The suite a base model (no chat template) is checked on: [`SUITE`][] as plain text, then
[`BASE_CASES`][]."""


def suite_prompts(model: torch.nn.Module) -> list[tuple[PromptCase, str]]:
    """The built-in suite as ``(case, prompt text)`` pairs for ``model``: [`SUITE`][] in the chat
    template when the tokenizer has one ([`chat_prompt`][]); otherwise (a base model) every case
    of [`BASE_SUITE`][] as the plain text ``case.user_message``.

    Args:
        model: A model with a tokenizer.

    Returns:
        The pairs, in suite order; ``case.chunk`` occurs once in each prompt.

    Example:
        >>> [case.name for case, _ in suite_prompts(model)][:2]  # doctest: +SKIP
        ['french', 'antonym']
    """
    if model.tokenizer is None:
        raise InputError("suite_prompts needs a model with a tokenizer")
    if getattr(model.tokenizer, "chat_template", None):
        return [(case, chat_prompt(model, case)) for case in SUITE]
    return [(case, case.user_message) for case in BASE_SUITE]
