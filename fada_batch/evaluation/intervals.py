"""How sure a figure is: a bootstrap interval over held-out images, and McNemar's exact test.

Bootstrap (Efron & Tibshirani, 1993, ch. 13, percentile interval): the held-out images are
resampled with replacement, `n_boot` times, each resample keeping all the answers of each
drawn image (answers about one image are not independent, so the image is the unit). A
figure is a ratio of sums, sum(numerator) / sum(denominator) over the drawn images' answers
(`question_scores`), so a mean, a sensitivity or an error in weeks all resample alike. The
95% interval is the 2.5th and 97.5th percentile of the resampled figures; resamples where the
denominator is 0 (no abnormal reference drawn, say) are left out. Seeded: the same answers
give the same interval.

McNemar's exact test (McNemar, 1947; the exact binomial form, Fagerland et al., 2013) compares
two models on the same items: b = items only the first gets right, c = items only the second
gets right; under "equally good", b ~ Binomial(b + c, 1/2). The two-sided p is
min(1, 2 * P(X <= min(b, c))). p >= 0.05 means the test set cannot tell the two apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from fada_batch.text import plural

N_BOOT = 2000
ALPHA = 0.05  # 95% intervals; a McNemar p at or above it: "cannot tell apart"


class ImageBootstrap:
    """Resampling weights over images, drawn once and shared by every figure of an evaluation,
    so that intervals of different models and questions come from the same resamples."""

    def __init__(self, images: Sequence[str], *, n_boot: int = N_BOOT, seed: int = 0) -> None:
        """Args: images: the image of each held-out answer (answers of one image resample together)."""
        names = sorted(set(images))
        self.index = {name: i for i, name in enumerate(names)}
        rng = np.random.default_rng(seed)
        n = len(names)
        # (B, G): how often each image is drawn in each resample
        self.weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64) if n else None

    def interval(
        self, images: Sequence[str], num: Sequence[float], den: Sequence[float], *, alpha: float = ALPHA
    ) -> list[float] | None:
        """[low, high] of sum(num) / sum(den) over resampled images; None when no resample counts.

        Args:
            images: the image of each item; num, den: each item's numerator and denominator.
        """
        if self.weights is None or not len(images):
            return None
        groups = np.array([self.index[i] for i in images])
        g = self.weights.shape[1]
        num_g = np.bincount(groups, weights=np.asarray(num, dtype=np.float64), minlength=g)  # (G,)
        den_g = np.bincount(groups, weights=np.asarray(den, dtype=np.float64), minlength=g)  # (G,)
        top, bottom = self.weights @ num_g, self.weights @ den_g  # (B,), (B,)
        ok = bottom > 0
        if not ok.any():
            return None
        figures = top[ok] / bottom[ok]
        low, high = np.percentile(figures, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        return [float(low), float(high)]


def mcnemar_exact(first: Sequence[bool], second: Sequence[bool]) -> dict[str, float | int]:
    """McNemar's exact test on paired outcomes (True = right) of two models on the same items.

    Returns:
        {"b": right only by the first, "c": right only by the second, "p": two-sided p}.

    Raises:
        ValueError: the two lists differ in length (they must be the same items).

    >>> mcnemar_exact([True] * 6, [False] * 6)["p"]  # 2 * 0.5**6
    0.03125
    """
    if len(first) != len(second):
        raise ValueError(
            f"McNemar needs paired outcomes: {plural(len(first), 'item')} against {plural(len(second), 'item')}"
        )
    b = sum(1 for x, y in zip(first, second, strict=True) if x and not y)
    c = sum(1 for x, y in zip(first, second, strict=True) if y and not x)
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "p": 1.0}
    tail = Fraction(sum(math.comb(n, k) for k in range(min(b, c) + 1)), 2**n)  # exact, any n
    return {"b": b, "c": c, "p": float(min(Fraction(1), 2 * tail))}


def distinguishable(test: dict[str, float | int], alpha: float = ALPHA) -> bool:
    """Whether a McNemar result tells the two models apart at level `alpha`."""
    return float(test["p"]) < alpha
