"""Where the test suite gets MovieLens-100k and MNIST, and whether going without them may skip tests.

The copy beside the checkout (../shared/data/ml-100k, the RecBole files; ../shared/data/mnist, the
gzipped IDX files) comes first, then a copy in mntool's data cache that verifies, then, only where
the data is required, the product's own fetch (`fetch_movielens_100k` / `fetch_mnist`, what
`mntool data fetch movielens-100k|mnist` runs) into that cache.
Required means `make test` (it sets MNTOOL_REQUIRE_DATA=1) or CI (`CI` set): there a data set
that can be neither found nor fetched fails the tests that need it; elsewhere it skips them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from device_runtime.errors import MntoolError
from mntool.data import mnist
from mntool.data.fetch import default_dest, fetch_movielens_100k, is_cached

REQUIRE_ENV = "MNTOOL_REQUIRE_DATA"
SHARED_ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
UNSET = ("", "0", "false", "no")


def data_required(env: Mapping[str, str]) -> str | None:
    """Why missing data must fail here (e.g. 'CI=true'), or None where skipping is fine."""
    for name in (REQUIRE_ENV, "CI"):
        if env.get(name, "").strip().lower() not in UNSET:
            return f"{name}={env[name]}"
    return None


def ml100k_copy(
    env: Mapping[str, str],
    shared: Path = SHARED_ML100K,
    cache: Path | None = None,
    *,
    present: Callable[[Path], bool] = is_cached,
    fetch: Callable[[Path], Path] = fetch_movielens_100k,
) -> Path:
    """A verified MovieLens-100k directory: `shared`, else `cache` (default: mntool's data cache),
    else what `fetch` puts in `cache` where `env` requires the data; pytest.skip or pytest.fail
    (by `data_required`) when there is none."""
    cache = default_dest() if cache is None else cache
    return _copy("MovieLens-100k", "movielens-100k", env, shared, cache, present, fetch)


def mnist_copy(
    env: Mapping[str, str],
    shared: Path = SHARED_MNIST,
    cache: Path | None = None,
    *,
    present: Callable[[Path], bool] = mnist.is_cached,
    fetch: Callable[[Path], Path] = mnist.fetch_mnist,
) -> Path:
    """A verified MNIST directory, by the same rules as `ml100k_copy`."""
    cache = mnist.default_dest() if cache is None else cache
    return _copy("MNIST", "mnist", env, shared, cache, present, fetch)


def _copy(
    title: str,
    name: str,
    env: Mapping[str, str],
    shared: Path,
    cache: Path,
    present: Callable[[Path], bool],
    fetch: Callable[[Path], Path],
) -> Path:
    for candidate in (shared, cache):
        if present(candidate):
            return candidate
    required = data_required(env)
    if required is None:
        pytest.skip(f"{title} is neither at {shared} nor in {cache} (get it: mntool data fetch {name})")
    try:
        return fetch(cache)
    except MntoolError as err:
        pytest.fail(
            f"{title} is required here ({required}) but is neither at {shared} nor in {cache}, "
            f"and fetching it failed: {err}",
            pytrace=False,
        )
