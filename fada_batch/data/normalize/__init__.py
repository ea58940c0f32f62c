"""Answer normalisation, a data step in layers: `data.normalize: none | clean | spelling | canonical`.

Each layer includes the ones before it:

- ``clean``: whitespace collapsed, one trailing period dropped (`fada_batch.text.clean_answer`;
  the clean-up the per-category sheets always had).
- ``spelling``: whole-word spelling fixes, case-insensitive, from ``spelling.json`` (the
  misspellings seen in the FADA team's master workbook: probablity, symphsis, montoring, ...).
  The correction takes the case of the word it replaces (``Veiw`` -> ``View``).
- ``canonical``: per question, the variants of an answer that mean the same become one form,
  from ``canonical.json`` (``cephalic`` and ``cephalic position`` -> ``Cephalic presentation``
  in Q2; ``20 -25weeks`` -> ``20-25 weeks`` in Q5 by pattern).

The tables are data files of this package, not code: a new misspelling or variant is one
line of JSON. Every change is counted (`Normalization`): per layer, per (from, to) pair, and
the unique answers per question before and after.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from fada_batch.data.categories import NUM_QUESTIONS
from fada_batch.text import clean_answer

LEVELS: tuple[str, ...] = ("none", "clean", "spelling", "canonical")
TABLES = Path(__file__).parent
_WS = re.compile(r"\s+")
_KEY_TRAIL = re.compile(r"[\s.,;:!]+$")


@dataclass(frozen=True)
class Tables:
    """The normalisation tables as loaded from the package's JSON files."""

    spelling: dict[str, str]  # lower-case misspelling -> correction
    forms: list[dict[str, str]]  # per question: match key of a variant -> canonical form
    patterns: list[list[tuple[re.Pattern[str], str]]]  # per question, tried in order


def match_key(text: str) -> str:
    """How variants are compared: case-folded, whitespace collapsed, trailing punctuation dropped."""
    return _KEY_TRAIL.sub("", _WS.sub(" ", text).strip()).casefold()


@lru_cache(maxsize=1)
def load_tables(folder: Path = TABLES) -> Tables:
    """Read ``spelling.json`` and ``canonical.json``.

    Raises:
        ValueError: a table that is not valid JSON or not of the documented shape, naming the file.
    """
    spelling_file, canonical_file = folder / "spelling.json", folder / "canonical.json"
    try:
        spelling = {k.casefold(): v for k, v in json.loads(spelling_file.read_text("utf-8"))["fixes"].items()}
        canonical = json.loads(canonical_file.read_text("utf-8"))
        forms: list[dict[str, str]] = [{} for _ in range(NUM_QUESTIONS)]
        patterns: list[list[tuple[re.Pattern[str], str]]] = [[] for _ in range(NUM_QUESTIONS)]
        for q in range(NUM_QUESTIONS):
            entry = canonical.get(f"Q{q + 1}", {})
            for form, variants in entry.get("forms", {}).items():
                for v in [form, *variants]:
                    forms[q][match_key(v)] = form
            patterns[q] = [(re.compile(rx, re.I), rep) for rx, rep in entry.get("patterns", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, re.error) as exc:
        raise ValueError(
            f"The answer normalisation tables in {folder} cannot be read ({type(exc).__name__}: {exc}). "
            "Fix: restore spelling.json ({'fixes': {misspelling: correction}}) and canonical.json "
            "({'Qn': {'forms': {canonical: [variants]}, 'patterns': [[regex, replacement]]}})."
        ) from exc
    return Tables(spelling=spelling, forms=forms, patterns=patterns)


def _same_case(word: str, fix: str) -> str:
    if word.isupper() and len(word) > 1:
        return fix.upper()
    return fix[:1].upper() + fix[1:] if word[:1].isupper() else fix


@dataclass
class Normalization:
    """What normalisation did to a set of answers: the counts `validate` and the summary show."""

    level: str = "clean"
    before: list[Counter[str]] = field(default_factory=lambda: [Counter() for _ in range(NUM_QUESTIONS)])
    after: list[Counter[str]] = field(default_factory=lambda: [Counter() for _ in range(NUM_QUESTIONS)])
    fixes: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (layer, from, to) -> cells
    cells_changed: Counter[str] = field(default_factory=Counter)  # layer -> cells it changed

    def merge(self, other: Normalization) -> None:
        """Add another category's counts to these."""
        for q in range(NUM_QUESTIONS):
            self.before[q].update(other.before[q])
            self.after[q].update(other.after[q])
        self.fixes.update(other.fixes)
        self.cells_changed.update(other.cells_changed)

    def unique_before(self) -> list[int]:
        return [len(c) for c in self.before]

    def unique_after(self) -> list[int]:
        return [len(c) for c in self.after]

    def top_fixes(self, n: int = 10) -> list[tuple[str, str, str, int]]:
        """The `n` most frequent fixes: (layer, from, to, cells)."""
        return [(layer, a, b, c) for (layer, a, b), c in self.fixes.most_common(n)]

    def to_dict(self, top: int = 20) -> dict[str, object]:
        return {
            "level": self.level,
            "unique_answers_before": self.unique_before(),
            "unique_answers_after": self.unique_after(),
            "cells_changed": dict(self.cells_changed),
            "top_fixes": [
                {"layer": la, "from": a, "to": b, "cells": c} for la, a, b, c in self.top_fixes(top)
            ],
        }


class Normalizer:
    """Applies the layers up to `level` to answers and counts what it does."""

    def __init__(self, level: str, tables: Tables | None = None) -> None:
        if level not in LEVELS:
            raise ValueError(f"data.normalize must be one of {', '.join(LEVELS)}, got {level!r}")
        self.level = level
        self.rank = LEVELS.index(level)
        self.tables = tables or load_tables()
        words = sorted(self.tables.spelling, key=len, reverse=True)
        self._spelling = (
            re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.I) if words else None
        )
        self.report = Normalization(level=level)
        # (question, raw answer) -> (answer, layers that changed it, fixes): see __call__
        self._memo: dict[
            tuple[int, str], tuple[str | None, tuple[str, ...], tuple[tuple[str, str, str], ...]]
        ] = {}

    def __call__(self, q: int, raw: str | None) -> str | None:
        """The answer to question `q` (0-based) normalised; None stays None (empty answer).

        Each distinct (question, answer) is worked out once (`_normalise`); a repeat replays
        its counts, so every cell is still counted (a 19,000-row workbook holds a few
        thousand distinct answers, and the regular expressions were most of its reading)."""
        if raw is None:
            return None
        done = self._memo.get((q, raw))
        if done is None:
            done = self._memo[(q, raw)] = self._normalise(q, raw)
        text, layers, fixes = done
        report = self.report
        report.before[q][raw] += 1
        for layer in layers:
            report.cells_changed[layer] += 1
        for fix in fixes:
            report.fixes[fix] += 1
        if text is not None:
            report.after[q][text] += 1
        return text

    def _normalise(
        self, q: int, raw: str
    ) -> tuple[str | None, tuple[str, ...], tuple[tuple[str, str, str], ...]]:
        """(the normalised answer, the layers that changed it, the fixes it took), uncounted."""
        layers: list[str] = []
        fixes: list[tuple[str, str, str]] = []
        text: str | None = raw
        if self.rank >= 1:
            new = clean_answer(raw)
            if new != raw:
                layers.append("clean")
            text = new or None
        if text is not None and self.rank >= 2:
            new, found = self._spell(text)
            fixes += [
                ("spelling", a, b) for a, b in sorted(found)
            ]  # counted per cell, as the team counts them
            if new != text:
                layers.append("spelling")
            text = new
        if text is not None and self.rank >= 3:
            new = self._canonical(q, text)
            if new != text:
                layers.append("canonical")
                fixes.append(("canonical", text, new))
            text = new
        return text, tuple(layers), tuple(fixes)

    def _spell(self, text: str) -> tuple[str, set[tuple[str, str]]]:
        """The text with whole-word spelling fixes, and the (from, to) pairs applied."""
        if self._spelling is None:
            return text, set()
        seen: set[tuple[str, str]] = set()

        def fix(m: re.Match[str]) -> str:
            word = m.group(0)
            seen.add((word.casefold(), self.tables.spelling[word.casefold()]))
            return _same_case(word, self.tables.spelling[word.casefold()])

        return self._spelling.sub(fix, text), seen

    def _canonical(self, q: int, text: str) -> str:
        key = match_key(text)
        form = self.tables.forms[q].get(key)
        if form is not None:
            return form
        for rx, rep in self.tables.patterns[q]:
            m = rx.fullmatch(key)
            if m:
                return m.expand(rep)
        return text
