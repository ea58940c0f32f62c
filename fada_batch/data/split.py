"""Image-level train/val/test split, kept in `split.json` in the category's output folder.

The split is by IMAGE, never by question/answer pair: the eight questions of one scan all land
in the same part, so no held-out image was seen in training under another question (the
seed split its QA pairs, which leaks every test image into training).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from fada_batch.fsutil import atomic_write_json

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class Split:
    """Image names per part, plus what produced them."""

    train: list[str]
    val: list[str]
    test: list[str]
    seed: int
    fractions: tuple[float, float, float]
    source: str | None = None  # the split file it was taken from (data.split_file); None: ours

    def to_dict(self) -> dict:
        extra = {"source": self.source} if self.source else {}
        return {
            **extra,
            "seed": self.seed,
            "fractions": {"train": self.fractions[0], "val": self.fractions[1], "test": self.fractions[2]},
            "counts": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "train": self.train,
            "val": self.val,
            "test": self.test,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Split:
        fr = d["fractions"]
        return cls(
            train=list(d["train"]),
            val=list(d["val"]),
            test=list(d["test"]),
            seed=int(d["seed"]),
            fractions=(float(fr["train"]), float(fr["val"]), float(fr["test"])),
            source=d.get("source"),
        )

    def images(self) -> set[str]:
        return set(self.train) | set(self.val) | set(self.test)


def make_split(image_names: list[str], *, seed: int, fractions: tuple[float, float, float]) -> Split:
    """Shuffle image names with `seed` and cut them by `fractions` (train, val, test).

    Val and test get at least one image each when their fraction is > 0 and there are at
    least three images, so a 5-image validation run still has a held-out image.
    """
    names = sorted(set(image_names))
    random.Random(seed).shuffle(names)
    n = len(names)
    _, f_val, f_test = fractions
    n_val = round(n * f_val)
    n_test = round(n * f_test)
    if n >= 3:
        n_val = max(n_val, 1 if f_val > 0 else 0)
        n_test = max(n_test, 1 if f_test > 0 else 0)
    while n - n_val - n_test < 1 and (n_val or n_test):  # keep at least one training image
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    test = sorted(names[:n_test])
    val = sorted(names[n_test : n_test + n_val])
    train = sorted(names[n_test + n_val :])
    return Split(train=train, val=val, test=test, seed=seed, fractions=tuple(fractions))


def read_split(folder: Path) -> Split | None:
    """The split saved in `folder`, or None when there is none."""
    path = folder / SPLIT_FILE
    if not path.is_file():
        return None
    return Split.from_dict(json.loads(path.read_text()))


def write_split(folder: Path, split: Split) -> Path:
    path = folder / SPLIT_FILE
    atomic_write_json(path, split.to_dict())
    return path
