"""The key store: SQLite in WAL mode, one file in the state directory.

A block's keys are written in one transaction, so after any crash a block is
either whole or absent.  Two states make a block commit on both nodes or on
neither (the peer protocol drives them): Bob stores a block ``pending``, Alice
stores it ``ready`` once Bob has it (her commit is the decision), then Bob
marks it ``ready``.  After a restart Bob asks Alice about each of his pending
blocks: ``ready`` at Alice means commit, unknown means discard.

Delivery is at most once: keys are marked ``delivering`` in one transaction
before they leave, and deleted (bytes overwritten first) once the consumer
has them.  Keys found ``delivering`` at start-up belong to a delivery a crash
interrupted; they may have reached the consumer, so they are destroyed, never
sent again.

Key bytes never leave this module except to a caller that delivers them; the
:class:`Key` record hides them from ``repr`` so a log line or a traceback that
shows one does not show its bytes.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from qnoded import durable

BlockState = Literal["pending", "ready"]

audit = structlog.get_logger("qnoded.audit")

# Keys go out in the order they were stored: by rowid (SQLite gives a new row one
# more than the largest; qnoded never runs VACUUM, which may renumber them), not by
# ``created``.
# ``created`` is the wall clock, which can step back (NTP, an operator): keys made
# after such a step would overtake older ones.  tests/test_clock_jump.py steps it.
SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    block_id TEXT PRIMARY KEY,
    peer TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'ready')),
    created REAL NOT NULL,
    n_keys INTEGER NOT NULL,
    stats TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    block_id TEXT NOT NULL REFERENCES blocks (block_id),
    idx INTEGER NOT NULL,
    material BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'ready', 'delivering'))
);
CREATE INDEX IF NOT EXISTS keys_by_state ON keys (state, block_id, idx);
CREATE INDEX IF NOT EXISTS keys_in_order ON keys (state);
"""


# Under a cap ([state] key_store_max_bytes), room kept for delivery, and what
# a key's rows take beside its bytes (two UUIDs as text, indexes, page slack:
# measured about 150 bytes; rounded up so the estimate errs on the safe side).
DELIVERY_HEADROOM_BYTES = 64 * 1024
KEY_ROW_BYTES = 256


class KeyStoreError(Exception):
    """The store refused an operation; the message names the block or key, never bytes."""


@dataclass(frozen=True, slots=True)
class Key:
    key_id: uuid.UUID
    material: bytes = field(repr=False)
    block_id: uuid.UUID

    @property
    def bits(self) -> int:
        return 8 * len(self.material)


def key_ids(block_id: uuid.UUID, count: int) -> list[uuid.UUID]:
    """The IDs of a block's keys: both nodes derive the same ones from the block ID."""
    return [uuid.uuid5(block_id, str(i)) for i in range(count)]


class KeyStore:
    """One node's keys for one peer link."""

    def __init__(self, path: str | Path, *, max_bytes: int = 0) -> None:
        """``max_bytes`` > 0 caps the file: past it a block fails to store as on a full disk."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Each block is exactly one transaction.
        self._db = durable.connect(self.path, SCHEMA, max_bytes=max_bytes)
        self.destroyed_at_start = self._destroy_interrupted()

    def close(self) -> None:
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self, statements: Iterable[durable.Statement]) -> None:
        durable.execute_all(self._db, statements)

    def _destroy_interrupted(self) -> int:
        """Keys a crash caught in delivery may have reached their consumer: destroy
        them (at most once), naming their IDs in the audit log."""
        ids = [r[0] for r in self._db.execute("SELECT key_id FROM keys WHERE state = 'delivering'")]
        if ids:
            self._wipe("state = 'delivering'", ())
            audit.info(
                "key destroyed undelivered", reason="delivery interrupted by a crash", key_ids=ids
            )
        return len(ids)

    @staticmethod
    def _wipe_rows(where: str, args: Sequence[Any]) -> list[tuple[str, Sequence[Any]]]:
        """Statements that overwrite, then delete, the keys ``where`` selects."""
        return [
            (f"UPDATE keys SET material = zeroblob(length(material)) WHERE {where}", args),  # noqa: S608 - fixed fragments
            (f"DELETE FROM keys WHERE {where}", args),  # noqa: S608
        ]

    def _wipe(self, where: str, args: Sequence[Any]) -> None:
        self._tx(self._wipe_rows(where, args))

    # -- blocks ---------------------------------------------------------------
    def add_block(
        self,
        block_id: uuid.UUID,
        peer: str,
        keys: Sequence[bytes],
        state: BlockState,
        stats: dict[str, Any],
    ) -> list[uuid.UUID]:
        """Store a block's keys in one transaction; returns their IDs.

        Under a cap, a block that would leave less than the delivery headroom
        is refused before anything is written: handing out and deleting keys
        needs pages too, and a store too full to deliver could never drain.
        """
        used, cap = durable.used_bytes(self._db)
        if cap:
            headroom = max(DELIVERY_HEADROOM_BYTES, cap // 8)
            need = sum(len(k) + KEY_ROW_BYTES for k in keys) + 4096
            if used + need > cap - headroom:
                raise durable.StorageError(
                    f"{self.path}: key store full: {used} of {cap} bytes in use, a block of "
                    f"{len(keys)} keys needs about {need} more and {headroom} stay free for "
                    "delivery ([state] key_store_max_bytes)"
                )
        ids = key_ids(block_id, len(keys))
        rows: list[tuple[str, Sequence[Any]]] = [
            (
                "INSERT INTO blocks (block_id, peer, state, created, n_keys, stats)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (str(block_id), peer, state, time.time(), len(keys), json.dumps(stats)),
            )
        ]
        rows += [
            (
                "INSERT INTO keys (key_id, block_id, idx, material, state) VALUES (?, ?, ?, ?, ?)",
                (str(kid), str(block_id), i, bytes(k), state),
            )
            for i, (kid, k) in enumerate(zip(ids, keys, strict=True))
        ]
        try:
            self._tx(rows)
        except sqlite3.IntegrityError as exc:
            raise KeyStoreError(f"block {block_id} is already stored") from exc
        return ids

    def block_state(self, block_id: uuid.UUID) -> BlockState | None:
        row = self._db.execute(
            "SELECT state FROM blocks WHERE block_id = ?", (str(block_id),)
        ).fetchone()
        return None if row is None else row[0]

    def pending_block(self, block_id: uuid.UUID) -> tuple[int, dict[str, Any]] | None:
        """A pending block's key count and public statistics (None unless pending here)."""
        row = self._db.execute(
            "SELECT n_keys, stats FROM blocks WHERE block_id = ? AND state = 'pending'",
            (str(block_id),),
        ).fetchone()
        return None if row is None else (int(row[0]), dict(json.loads(row[1])))

    def commit_block(self, block_id: uuid.UUID) -> None:
        """A pending block becomes deliverable (Bob, once Alice has committed)."""
        if self.block_state(block_id) != "pending":
            raise KeyStoreError(f"block {block_id} is not pending here")
        self._tx(
            [
                ("UPDATE blocks SET state = 'ready' WHERE block_id = ?", (str(block_id),)),
                (
                    "UPDATE keys SET state = 'ready' WHERE block_id = ? AND state = 'pending'",
                    (str(block_id),),
                ),
            ]
        )

    def discard_block(self, block_id: uuid.UUID) -> None:
        """Destroy a pending block (the peer never committed it)."""
        if self.block_state(block_id) != "pending":
            raise KeyStoreError(f"block {block_id} is not pending here; only pending ones go")
        self._tx(
            [
                *self._wipe_rows("block_id = ?", (str(block_id),)),
                ("DELETE FROM blocks WHERE block_id = ?", (str(block_id),)),
            ]
        )

    def pending_blocks(self) -> list[uuid.UUID]:
        rows = self._db.execute(
            "SELECT block_id FROM blocks WHERE state = 'pending' ORDER BY rowid"
        ).fetchall()
        return [uuid.UUID(r[0]) for r in rows]

    # -- delivery ---------------------------------------------------------------
    def ready_count(self) -> tuple[int, int]:
        """(keys, bits) waiting for delivery."""
        n, nbytes = self._db.execute(
            "SELECT count(*), coalesce(sum(length(material)), 0) FROM keys WHERE state = 'ready'"
        ).fetchone()
        return int(n), 8 * int(nbytes)

    def take(self, limit: int) -> list[Key]:
        """Up to ``limit`` ready keys, oldest first, marked as being delivered."""
        return self._take_oldest(limit, exactly=False)

    def _take_oldest(self, count: int, *, exactly: bool) -> list[Key]:
        with durable.transaction(self._db) as cur:
            # Keys are stored a block at a time, in index order, so their rowids
            # are the delivery order.  keys_in_order holds (state, rowid): the
            # oldest ready keys are read straight off it.  (Ordering by the block
            # sorted every ready key on every take: with a backlog of 7e4 keys a
            # fifth of Alice's CPU in the soak, and the backlog grew.)
            rows = cur.execute(
                "SELECT key_id, material, block_id FROM keys"
                " WHERE state = 'ready' ORDER BY rowid LIMIT ?",
                (count,),
            ).fetchall()
            if exactly and len(rows) < count:
                raise KeysUnavailableError(
                    f"{count} keys asked for, {len(rows)} ready", ready=len(rows)
                )
            cur.executemany(
                "UPDATE keys SET state = 'delivering' WHERE key_id = ?", [(r[0],) for r in rows]
            )
        return [Key(uuid.UUID(r[0]), bytes(r[1]), uuid.UUID(r[2])) for r in rows]

    def delivered(self, keys: Iterable[uuid.UUID]) -> None:
        """The consumer has these keys: overwrite and delete them, in one transaction."""
        self._tx(
            row
            for kid in keys
            for row in self._wipe_rows("key_id = ? AND state = 'delivering'", (str(kid),))
        )

    def release(self, keys: Iterable[uuid.UUID]) -> None:
        """Taken keys that never left (their delivery did not begin): ready again."""
        self._tx(
            ("UPDATE keys SET state = 'ready' WHERE key_id = ? AND state = 'delivering'", (str(k),))
            for k in keys
        )

    def ready_ids(self) -> list[uuid.UUID]:
        """IDs of the deliverable keys (for comparing two nodes' stores)."""
        rows = self._db.execute("SELECT key_id FROM keys WHERE state = 'ready'").fetchall()
        return sorted(uuid.UUID(r[0]) for r in rows)

    def take_exactly(self, count: int) -> list[Key]:
        """``count`` ready keys, oldest first, marked as being delivered; all of them or none.

        :class:`KeysUnavailableError` (naming how many are ready) when fewer are ready;
        then nothing changes.  A consumer that asked for n keys gets n or an error,
        never a partial set it would have to give back.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        return self._take_oldest(count, exactly=True)

    def take_ids(self, ids: Sequence[uuid.UUID]) -> list[Key]:
        """Exactly these ready keys, in the order given, marked as being delivered.

        All or nothing: if any ID is unknown, already delivered or being delivered,
        or still pending (its block not yet committed here), nothing changes and
        :class:`KeysUnavailableError` names those IDs (``missing`` and ``pending``).
        """
        wanted = [str(kid) for kid in ids]
        if len(set(wanted)) != len(wanted):
            dupes = sorted({w for w in wanted if wanted.count(w) > 1})
            raise KeyStoreError(f"key IDs asked for twice: {', '.join(dupes)}")
        found: dict[str, tuple[bytes, str, str]] = {}
        with durable.transaction(self._db) as cur:
            # Chunks stay below SQLite's limit on bound variables (999 in old builds).
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                for kid, material, block, state in cur.execute(
                    f"SELECT key_id, material, block_id, state FROM keys WHERE key_id IN ({marks})",  # noqa: S608 - only placeholders
                    chunk,
                ):
                    found[kid] = (bytes(material), block, state)
            pending = [uuid.UUID(w) for w in wanted if w in found and found[w][2] == "pending"]
            missing = [
                uuid.UUID(w) for w in wanted if w not in found or found[w][2] == "delivering"
            ]
            if missing or pending:
                raise KeysUnavailableError(
                    _unavailable_message(missing, pending), missing=missing, pending=pending
                )
            cur.executemany(
                "UPDATE keys SET state = 'delivering' WHERE key_id = ?", [(w,) for w in wanted]
            )
        return [Key(uuid.UUID(w), found[w][0], uuid.UUID(found[w][1])) for w in wanted]


class KeysUnavailableError(KeyStoreError):
    """Not every key asked for could be taken, so none was.

    ``missing``: unknown here, already delivered or being delivered (asking again
    will not help); ``pending``: stored but their block is not committed yet (it
    may be shortly); ``ready``: how many keys were ready, for a count request.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: Sequence[uuid.UUID] = (),
        pending: Sequence[uuid.UUID] = (),
        ready: int | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = tuple(missing)
        self.pending = tuple(pending)
        self.ready = ready


def _unavailable_message(missing: Sequence[uuid.UUID], pending: Sequence[uuid.UUID]) -> str:
    """Name the IDs (the first few of each kind, so a message stays one line)."""

    def some(ids: Sequence[uuid.UUID]) -> str:
        shown = ", ".join(str(i) for i in ids[:5])
        return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} not found (unknown or already delivered): {some(missing)}")
    if pending:
        parts.append(f"{len(pending)} not committed yet: {some(pending)}")
    return "; ".join(parts)
