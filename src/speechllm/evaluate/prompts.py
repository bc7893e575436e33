"""Zero-shot prompts of the reference (promptsource templates inlined in its `mms_glue.py`).

A prompt is a list of pieces: plain text, or `Field(name)` where that field's speech (or text) goes.
Answer options are listed in label order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Field:
    name: str


Piece = str | Field


@dataclass(frozen=True)
class TaskPrompt:
    pieces: tuple[Piece, ...]
    options: tuple[str, ...]  # index = label id


MNLI_PROMPT = TaskPrompt(
    (Field("premise"), ' \n\nQuestion: Does this imply that "', Field("hypothesis"), '"? Yes, no, or maybe?'),
    ("Yes", "Maybe", "No"),
)

TASK_PROMPTS: dict[str, TaskPrompt] = {
    "cola": TaskPrompt(
        (Field("sentence"), "\nIs this example grammatically correct and sensible?"), ("No", "Yes")
    ),
    "sst2": TaskPrompt(
        ("Does the following sentence have a positive or negative sentiment?\n", Field("sentence")),
        ("negative", "positive"),
    ),
    "mrpc": TaskPrompt(
        (
            "Does the sentence\n",
            Field("sentence1"),
            "\nparaphrase (that is, mean the same thing as) this sentence?\n",
            Field("sentence2"),
        ),
        ("no", "yes"),
    ),
    "qqp": TaskPrompt(
        (
            "I'm an administrator on the website Quora. There are two posts, one that asks \"",
            Field("question1"),
            '" and another that asks "',
            Field("question2"),
            '". I can merge questions if they are asking the same thing. Can I merge these two questions?',
        ),
        ("no", "yes"),
    ),
    "mnli_matched": MNLI_PROMPT,
    "mnli_mismatched": MNLI_PROMPT,
    "qnli": TaskPrompt(
        (
            'Does knowing that "',
            Field("sentence"),
            '" imply that I know the answer to "',
            Field("question"),
            '"',
        ),
        ("yes", "no"),
    ),
    "rte": TaskPrompt(
        (
            'Does the claim "',
            Field("sentence2"),
            '" follow from the fact that "',
            Field("sentence1"),
            '"? Please answer either yes or no.',
        ),
        ("yes", "no"),
    ),
    "wnli": TaskPrompt(
        (
            "If it's true that\n",
            Field("sentence1"),
            "\nhow confident should I be that\n",
            Field("sentence2"),
            "\nvery confident or not confident?",
        ),
        ("not confident", "very confident"),
    ),
    "stsb": TaskPrompt(
        (
            "I need to know how similar these two passages are:\n- ",
            Field("sentence1"),
            "\n- ",
            Field("sentence2"),
            "\n\n"
            "Question: Can you give me a number from 0.0 to 5.0 that denotes how similar they are, where "
            "0.0 means totally dissimilar and 5.0 means extremely similar?\n"
            "Answer:",
        ),
        (),
    ),
    "xnli": MNLI_PROMPT,
}


def render_text(prompt: TaskPrompt, texts: dict[str, str]) -> str:
    """The prompt with every field filled by its text (the text upper bound and the LLM's own training)."""
    return "".join(p if isinstance(p, str) else texts[p.name] for p in prompt.pieces)
