"""The split is by image, deterministic, and round-trips through split.json."""

from __future__ import annotations

from pathlib import Path

from fada_batch.data.split import make_split, read_split, write_split


def test_split_by_image_is_disjoint_and_complete():
    names = [f"img_{i:03d}.png" for i in range(100)]
    s = make_split(names, seed=1, fractions=(0.8, 0.1, 0.1))
    assert (len(s.train), len(s.val), len(s.test)) == (80, 10, 10)
    assert set(s.train) | set(s.val) | set(s.test) == set(names)
    assert not (set(s.train) & set(s.val)) and not (set(s.train) & set(s.test))


def test_split_is_deterministic_and_seeded():
    names = [f"n{i}" for i in range(50)]
    a = make_split(names, seed=7, fractions=(0.8, 0.1, 0.1))
    b = make_split(list(reversed(names)), seed=7, fractions=(0.8, 0.1, 0.1))
    c = make_split(names, seed=8, fractions=(0.8, 0.1, 0.1))
    assert a == b
    assert a.test != c.test


def test_tiny_split_keeps_a_held_out_image():
    s = make_split([f"n{i}" for i in range(5)], seed=0, fractions=(0.8, 0.1, 0.1))
    assert len(s.test) == 1 and len(s.val) == 1 and len(s.train) == 3
    s1 = make_split(["only"], seed=0, fractions=(0.8, 0.1, 0.1))
    assert s1.train == ["only"]


def test_split_json_round_trip(tmp_path: Path):
    s = make_split([f"n{i}" for i in range(20)], seed=3, fractions=(0.7, 0.15, 0.15))
    write_split(tmp_path, s)
    assert read_split(tmp_path) == s
    assert read_split(tmp_path / "none") is None
