"""The data policy of the suite (data_sources.py): MovieLens-100k from beside the checkout, else
the cache, else fetched, and where it is required (`make test`, CI) never a silent skip."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from data_sources import REQUIRE_ENV, data_required, ml100k_copy

from mntool.data.fetch import FetchError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "env, reason",
    [
        ({}, None),
        ({"CI": ""}, None),
        ({"CI": "false"}, None),
        ({REQUIRE_ENV: "0"}, None),
        ({"CI": "true"}, "CI=true"),
        ({"CI": "1"}, "CI=1"),
        ({REQUIRE_ENV: "1"}, f"{REQUIRE_ENV}=1"),
        ({REQUIRE_ENV: "1", "CI": "true"}, f"{REQUIRE_ENV}=1"),
    ],
)
def test_data_is_required_under_make_test_and_ci(env, reason):
    assert data_required(env) == reason


def test_make_test_requires_the_data():
    dry_run = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    pytest_line = next(line for line in dry_run.splitlines() if "pytest" in line)
    assert pytest_line.startswith(f"{REQUIRE_ENV}=1 ")


class Sources:
    """Stand-ins for the directories and the fetch: which copies verify, what was fetched."""

    def __init__(self, tmp_path: Path, *present: str, fetch_error: str | None = None):
        self.shared, self.cache = tmp_path / "shared", tmp_path / "cache"
        self.present = {getattr(self, name) for name in present}
        self.fetch_error, self.fetched = fetch_error, []

    def fetch(self, dest: Path) -> Path:
        self.fetched.append(dest)
        if self.fetch_error:
            raise FetchError(self.fetch_error)
        return dest

    def copy(self, env: dict) -> Path:
        return ml100k_copy(env, self.shared, self.cache, present=self.present.__contains__, fetch=self.fetch)


@pytest.mark.parametrize("env", [{}, {"CI": "true"}])
def test_the_copy_beside_the_checkout_comes_first(tmp_path, env):
    sources = Sources(tmp_path, "shared", "cache")
    assert sources.copy(env) == sources.shared and sources.fetched == []


@pytest.mark.parametrize("env", [{}, {"CI": "true"}])
def test_then_the_cache(tmp_path, env):
    sources = Sources(tmp_path, "cache")
    assert sources.copy(env) == sources.cache and sources.fetched == []


def test_missing_data_skips_outside_ci(tmp_path):
    sources = Sources(tmp_path)
    with pytest.raises(pytest.skip.Exception, match="mntool data fetch movielens-100k"):
        sources.copy({})
    assert sources.fetched == []


def test_missing_data_is_fetched_into_the_cache_where_required(tmp_path):
    sources = Sources(tmp_path)
    assert sources.copy({REQUIRE_ENV: "1"}) == sources.cache and sources.fetched == [sources.cache]


def test_a_failed_fetch_fails_where_required_instead_of_skipping(tmp_path):
    sources = Sources(tmp_path, fetch_error="could not fetch movielens-100k (grouplens: no route)")
    with pytest.raises(pytest.fail.Exception) as failed:
        sources.copy({"CI": "true"})
    message = str(failed.value)
    assert "required here (CI=true)" in message and "no route" in message and "\n" not in message
