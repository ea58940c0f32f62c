"""Bootstrap intervals over images and McNemar's exact test, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fada_batch.evaluation.intervals import ImageBootstrap, distinguishable, mcnemar_exact


def test_mcnemar_exact_against_the_binomial():
    assert mcnemar_exact([True, False], [True, False]) == {"b": 0, "c": 0, "p": 1.0}
    # b = 1, c = 5: p = 2 * (C(6,0) + C(6,1)) / 2**6 = 14 / 64
    first = [True] + [False] * 5 + [True] * 4
    second = [False] + [True] * 5 + [True] * 4
    got = mcnemar_exact(first, second)
    assert (got["b"], got["c"]) == (1, 5) and got["p"] == pytest.approx(14 / 64)
    assert not distinguishable(got)
    big = mcnemar_exact([True] * 3000 + [False] * 10, [False] * 3000 + [True] * 10)  # exact with big n
    assert 0 <= big["p"] < 1e-300 or big["p"] == 0.0
    assert distinguishable(big)
    assert mcnemar_exact([True] * 5, [True] * 4 + [False])["p"] == 1.0  # b=1, c=0: min(1, 2 * 0.5)
    with pytest.raises(ValueError, match="paired"):
        mcnemar_exact([True], [True, False])


def test_bootstrap_resamples_images_not_answers():
    """Two answers per image, both right or both wrong: the interval is that of 10 images, not 20 answers."""
    images = [f"i{k}" for k in range(10) for _ in range(2)]
    right = [1.0 if k < 5 else 0.0 for k in range(10) for _ in range(2)]
    boot = ImageBootstrap(images, n_boot=4000, seed=0)
    low, high = boot.interval(images, right, [1.0] * 20)
    se = math.sqrt(0.25 / 10)  # binomial over 10 images
    assert low < 0.5 < high
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert boot.interval(images, right, [1.0] * 20) == [low, high]  # same draws, same interval
    assert not np.array_equal(ImageBootstrap(images, n_boot=4000, seed=1).weights, boot.weights)
    # the same answers taken as 20 independent images give a narrower interval
    alone = [f"j{k}" for k in range(20)]
    low20, high20 = ImageBootstrap(alone, n_boot=4000, seed=0).interval(alone, right, [1.0] * 20)
    assert high20 - low20 < high - low


def test_bootstrap_ratio_skips_empty_resamples():
    images = ["a", "b", "c", "d"]
    boot = ImageBootstrap(images, n_boot=300, seed=0)
    # sensitivity: only image "a" has an abnormal reference, detected
    assert boot.interval(images, [1.0, 0, 0, 0], [1.0, 0, 0, 0]) == [1.0, 1.0]
    assert boot.interval(images, [0.0] * 4, [0.0] * 4) is None
    assert ImageBootstrap([]).interval([], [], []) is None
    assert boot.weights.sum(axis=1).tolist() == [4.0] * 300  # each resample draws 4 images
    assert np.all(boot.weights >= 0)
