"""Tests run offline: no hub, a private cache, and the shared benchmark copies when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


@pytest.fixture(scope="session", autouse=True)
def gazal_cache(tmp_path_factory):
    """A cache per test session (the tiny model is rebuilt in seconds); the user's cache is untouched."""
    if "GAZAL_TEST_CACHE" in os.environ:  # reuse across local runs to save a few seconds
        os.environ["GAZAL_CACHE"] = os.environ["GAZAL_TEST_CACHE"]
    else:
        os.environ["GAZAL_CACHE"] = str(tmp_path_factory.mktemp("gazal-cache"))
    yield


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    if not (SHARED_BENCHMARKS / "medqa_test.jsonl").is_file():
        pytest.skip("../shared/benchmarks is not beside this checkout")
    return SHARED_BENCHMARKS
