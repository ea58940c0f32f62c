"""Shared fixtures: the tiny pretrained BLIP-2 (built once, cached) and demo data on disk.

The tiny model is built by production's own `fada-batch make-tiny-model` code and cached in
`.cache/` of the repository (or $FADA_TEST_CACHE), so repeated local runs reuse it; a fresh CI
checkout builds it once. Fixture paths carry spaces and quotes, like the real data folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cache_root() -> Path:
    return Path(os.environ.get("FADA_TEST_CACHE", REPO / ".cache"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A saved tiny pretrained BLIP-2 (model + processor) folder."""
    from fada_batch.tiny import make_tiny_model

    return make_tiny_model(_cache_root() / "tiny-blip2")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo data in the real layout, under a folder whose name has spaces and a quote."""
    from fada_batch.demo import make_demo_data

    root = tmp_path_factory.mktemp("demo data") / "it's data"
    make_demo_data(root)
    return root


@pytest.fixture()
def job_factory(tiny_model_dir: Path, demo_root: Path, tmp_path: Path):
    """Build a JobConfig on the tiny model and demo data with overrides (dotted keys)."""
    from fada_batch.config import config_from_dict, load_job

    def make(overrides: dict | None = None, *, data_root: Path | None = None, out: Path | None = None):
        base = load_job(REPO / "job" / "demo.yaml").to_dict()
        base["data"]["root"] = str(data_root or demo_root)
        base["model"]["name_or_path"] = str(tiny_model_dir)
        base["output"]["root"] = str(out or (tmp_path / "out puts"))
        base["train"]["log_every_s"] = 0.0
        flat = dict(overrides or {})
        raw = {**base}
        for k, v in flat.items():
            section, key = k.split(".", 1)
            raw[section] = {**raw[section], key: v}
        return config_from_dict(raw)

    return make
