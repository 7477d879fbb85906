"""Readers for MovieLens-style interaction files, and the checks that a copy is intact.

Two formats: GroupLens `u.data` (tab separated `user item rating timestamp`, no header) and the
RecBole atomic `*.inter` (tab separated, a header of `name:type` fields). Files whose name is
known (the MovieLens-100k release files) are verified against recorded SHA-256 digests before
they are read; see docs/data-protocol.md ("Files and hashes").
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from device_runtime.errors import MntoolError
from mntool.data.interactions import Interactions, from_raw

# SHA-256 of the RecBole 1.2.1 copies (recbole/dataset_example/ml-100k/ in the wheel).
RECBOLE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
# GroupLens' u.data is checked by content, not bytes: `content_digest` of its rows must equal
# that of ml-100k.inter (the same 100,000 ratings), whatever the row order or line endings.
GROUPLENS_CONTENT_SHA256 = {
    "u.data": "ec862504a8c24b195f5194e51fb18bb2d59428d00d96d6d1c63433a3bd5f2f47",
}
RECBOLE_FIELDS = {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"}


class DataFileError(MntoolError):
    """A data file is missing, unreadable, malformed, or does not match its recorded digest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_digest(interactions: Interactions) -> str:
    """SHA-256 of the rows as little-endian int64 `[user, item, rating, timestamp]` (raw ids),
    sorted by (user, item, timestamp): equal for any two files holding the same ratings.
    Raises ValueError when an id is not an integer."""
    rows = np.stack(
        [
            interactions.user_ids.astype(np.int64)[interactions.user],
            interactions.item_ids[1:].astype(np.int64)[interactions.item - 1],
            interactions.rating.astype(np.int64),
            interactions.timestamp,
        ],
        axis=1,
    )
    rows = rows[np.lexsort((rows[:, 3], rows[:, 1], rows[:, 0]))]
    return hashlib.sha256(rows.astype("<i8").tobytes()).hexdigest()


def verify_file(path: Path) -> str | None:
    """Check a file with a known name against its recorded digest; return the digest, or None
    when the name is not a known release file."""
    path = Path(path)
    if path.name in RECBOLE_SHA256:
        digest = sha256_file(path)
        if digest != RECBOLE_SHA256[path.name]:
            raise DataFileError(
                f"{path} is corrupt: SHA-256 {digest[:12]}... != expected {RECBOLE_SHA256[path.name][:12]}..."
            )
        return digest
    if path.name in GROUPLENS_CONTENT_SHA256:
        try:
            digest = content_digest(read_grouplens(path))
        except ValueError:
            digest = "ids are not integers"
        if digest != GROUPLENS_CONTENT_SHA256[path.name]:
            raise DataFileError(f"{path} is corrupt: its ratings differ from the MovieLens-100k release")
        return digest
    return None


def verify_dir(path: Path) -> dict[str, str]:
    """Verify every known release file present in a directory; return {name: digest}."""
    names = sorted(n for n in (*RECBOLE_SHA256, *GROUPLENS_CONTENT_SHA256) if (Path(path) / n).is_file())
    return {n: verify_file(Path(path) / n) for n in names}


def load_interactions(path: Path | str, *, verify: bool = True) -> Interactions:
    """Read interactions from a file, or from a directory holding one `*.inter` file or `u.data`.

    With `verify`, known MovieLens-100k files are checked against their digests first (pass
    `verify=False` to read a deliberately modified copy).
    """
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path} does not exist (fetch it with `mntool data fetch movielens-100k`)")
    if path.is_dir():
        if verify:
            verify_dir(path)
        path = _interaction_file(path)
    elif verify:
        verify_file(path)
    if path.suffix == ".inter":
        return read_recbole(path)
    if path.name == "u.data" or path.suffix == ".data":
        return read_grouplens(path)
    raise DataFileError(f"{path}: unknown interaction format (expected a RecBole *.inter file or GroupLens u.data)")


def _interaction_file(directory: Path) -> Path:
    inter = sorted(directory.glob("*.inter"))
    if len(inter) > 1:
        raise DataFileError(f"{directory} holds several .inter files ({', '.join(p.name for p in inter)}); pass one")
    if inter:
        return inter[0]
    if (directory / "u.data").is_file():
        return directory / "u.data"
    raise DataFileError(f"{directory} holds no interaction file (expected *.inter or u.data)")


def _read_rows(path: Path, skip_header: bool) -> tuple[list[str], list[list[str]]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataFileError(f"{path} is not a UTF-8 text file") from None
    header = lines[0].split("\t") if skip_header and lines else []
    rows = [line.split("\t") for line in lines[1 if skip_header else 0 :] if line]
    return header, rows


def _columns(path: Path, rows: list[list[str]], width: int, first_line: int) -> list[tuple[str, ...]]:
    if not rows:
        raise DataFileError(f"{path} holds no interactions")
    for n, row in enumerate(rows):
        if len(row) != width:
            raise DataFileError(f"{path}:{n + first_line}: expected {width} tab-separated fields, got {len(row)}")
    return list(zip(*rows))


def _numbers(path: Path, column: tuple[str, ...], name: str) -> np.ndarray:
    try:
        return np.array(column, dtype=np.float64)
    except ValueError:
        raise DataFileError(f"{path}: the {name} column holds a value that is not a number") from None


def read_grouplens(path: Path) -> Interactions:
    """GroupLens `u.data`: `user item rating timestamp`, tab separated, no header."""
    _, rows = _read_rows(path, skip_header=False)
    user, item, rating, ts = _columns(path, rows, width=4, first_line=1)
    return from_raw(
        np.array(user), np.array(item), _numbers(path, ts, "timestamp"), _numbers(path, rating, "rating"), str(path)
    )


def read_recbole(path: Path) -> Interactions:
    """RecBole atomic `.inter`: header `user_id:token item_id:token [rating:float] timestamp:float`."""
    header, rows = _read_rows(path, skip_header=True)
    names = [field.split(":")[0] for field in header]
    index = {}
    for key, field in RECBOLE_FIELDS.items():
        if field in names:
            index[key] = names.index(field)
        elif key != "rating":
            raise DataFileError(f"{path}: header has no {field!r} field (found {', '.join(names) or 'nothing'})")
    columns = _columns(path, rows, width=len(names), first_line=2)
    ratings = _numbers(path, columns[index["rating"]], "rating") if "rating" in index else np.ones(len(rows))
    return from_raw(
        np.array(columns[index["user"]]),
        np.array(columns[index["item"]]),
        _numbers(path, columns[index["timestamp"]], "timestamp"),
        ratings,
        str(path),
    )
