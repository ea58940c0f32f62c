"""Text helpers: answer clean-up shared by training, evaluation and metrics, and counted
nouns for messages.

The same function normalises training targets and, in evaluation, both references and
predictions, so exact match compares like with like.
"""

from __future__ import annotations

import re

_WS = re.compile(r"\s+")


def clean_answer(text: str) -> str:
    """Collapse runs of whitespace (newlines, double spaces) and strip one trailing period.

    >>> clean_answer("  Fetus lies  on the left side.\\n")
    'Fetus lies on the left side'
    """
    text = _WS.sub(" ", text).strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    return text


def normalize_for_match(text: str) -> str:
    """The comparison form used by exact match: cleaned and case-folded."""
    return clean_answer(text).casefold()


def plural(n: int | float, noun: str, plural_form: str | None = None) -> str:
    """`n` and `noun`, in the singular for exactly one (for messages and reports).

    >>> plural(1, "epoch"), plural(3, "epoch"), plural(0, "category", "categories")
    ('1 epoch', '3 epochs', '0 categories')
    """
    return f"{n} {noun if n == 1 else plural_form or noun + 's'}"
