"""Shared fixtures: the real MovieLens-100k copy beside the checkout, and its built dataset."""
from __future__ import annotations

from pathlib import Path

import pytest

ML100K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The RecBole copy of MovieLens-100k at ../shared/data/ml-100k (see its SOURCE.md)."""
    if not (ML100K_DIR / "ml-100k.inter").is_file():
        pytest.skip(f"MovieLens-100k not found at {ML100K_DIR} (get it: mntool data fetch movielens-100k --dest {ML100K_DIR})")
    return ML100K_DIR


@pytest.fixture(scope="session")
def ml100k_interactions(ml100k_dir):
    from mntool.data import load_interactions

    return load_interactions(ml100k_dir)


@pytest.fixture(scope="session")
def ml100k_dataset(ml100k_interactions):
    """The time-shift protocol (default ProtocolConfig) on MovieLens-100k, built once per session."""
    from mntool.data import build_dataset

    return build_dataset(ml100k_interactions)
