"""Crash-safe SQLite for key material: the key store and the authentication pool.

Both hold secrets that must survive a crash whole or not at all, and must not
linger once deleted, so both open their file the same way and change it only
in explicit transactions.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

Statement = tuple[str, Sequence[Any]]


class StorageError(OSError):
    """A write to a key-material database failed (disk full, quota, I/O error).

    The transaction was rolled back: the file holds what it held before.  An
    OSError, because to every caller it is one: the disk refused.
    """


def connect(path: Path, schema: str, *, max_bytes: int = 0) -> sqlite3.Connection:
    """Open (or create) ``path`` for key material and apply ``schema``.

    ``max_bytes`` > 0 caps the database file (SQLite's max_page_count): past it
    a write fails as on a full disk, with :class:`StorageError`.
    """
    # Owner-only before SQLite writes to it (SQLite gives the -wal and -shm
    # files the database file's mode).
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    os.chmod(path, 0o600)
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns; only then may the peer hear of it,
    # or a pad it covers be used.
    db.execute("PRAGMA synchronous=FULL")
    # Freed pages are zeroed, so deleted key bytes do not linger in the file.
    db.execute("PRAGMA secure_delete=ON")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(schema)
    if max_bytes > 0:
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
        db.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page)}")
    return db


def file_of(db: sqlite3.Connection) -> str:
    """The path of the connection's main database, for messages."""
    return next((row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main"), "")


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    """One write transaction: committed when the block ends, rolled back on any
    exception; :class:`StorageError` when the disk refuses (SQLITE_FULL,
    SQLITE_IOERR and kin), with nothing half-written."""
    cur = db.cursor()
    try:
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                cur.execute("ROLLBACK")
            raise
    except sqlite3.OperationalError as exc:
        raise StorageError(f"{file_of(db) or 'database'}: {exc}") from exc


def used_bytes(db: sqlite3.Connection) -> tuple[int, int]:
    """Bytes the database's live pages take, and its cap (0: none)."""
    page = int(db.execute("PRAGMA page_size").fetchone()[0])
    pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    cap = int(db.execute("PRAGMA max_page_count").fetchone()[0])
    # SQLite reports its own ceiling (about 2^32 pages) when no cap was set.
    return (pages - free) * page, (cap * page if cap < 2**31 else 0)


def execute_all(db: sqlite3.Connection, statements: Iterable[Statement]) -> None:
    """Run ``statements`` as one transaction."""
    with transaction(db) as cur:
        for sql, args in statements:
            cur.execute(sql, args)
