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


def connect(path: Path, schema: str) -> sqlite3.Connection:
    """Open (or create) ``path`` for key material and apply ``schema``."""
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
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    """One write transaction: committed when the block ends, rolled back on any exception."""
    cur = db.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        yield cur
        cur.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            cur.execute("ROLLBACK")
        raise


def execute_all(db: sqlite3.Connection, statements: Iterable[Statement]) -> None:
    """Run ``statements`` as one transaction."""
    with transaction(db) as cur:
        for sql, args in statements:
            cur.execute(sql, args)
