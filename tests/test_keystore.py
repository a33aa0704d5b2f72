"""Key store: whole blocks or none, after SIGKILL; delivery at most once; bytes wiped."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from qnoded.durable import StorageError
from qnoded.keystore import KeyStore, KeyStoreError, key_ids

ROOT = Path(__file__).resolve().parent.parent

WRITER = r"""
import os, sys, uuid
from qnoded.keystore import KeyStore
store = KeyStore(sys.argv[1])
i = 0
while True:
    n = 1 + i % 50
    keys = [os.urandom(32) for _ in range(n)]
    store.add_block(uuid.uuid4(), "bob", keys, "pending" if i % 2 else "ready", {"i": i})
    if i % 3 == 0:
        for k in store.take(5):
            store.delivered([k.key_id])
    i += 1
    if i == 20:
        print("writing", flush=True)
"""


def test_block_roundtrip_and_states(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "keys.db") as store:
        block = uuid.uuid4()
        ids = store.add_block(block, "bob", [b"\x01" * 32, b"\x02" * 32], "pending", {"qber": 0.02})
        assert ids == key_ids(block, 2)
        assert store.pending_blocks() == [block]
        assert store.ready_count() == (0, 0)
        assert store.take(10) == []  # pending keys are not deliverable
        store.commit_block(block)
        assert store.block_state(block) == "ready"
        assert store.ready_count() == (2, 512)
        with pytest.raises(KeyStoreError, match="already stored"):
            store.add_block(block, "bob", [b"x"], "ready", {})
        with pytest.raises(KeyStoreError, match="not pending"):
            store.discard_block(block)


def test_discard_leaves_nothing(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "keys.db") as store:
        block = uuid.uuid4()
        store.add_block(block, "bob", [b"\xaa" * 32], "pending", {})
        store.discard_block(block)
        assert store.block_state(block) is None
        assert store.pending_blocks() == []


def test_delivery_is_at_most_once(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    store = KeyStore(path)
    store.add_block(uuid.uuid4(), "bob", [bytes([i]) * 32 for i in range(6)], "ready", {})
    first = store.take(2)
    assert len(first) == 2
    assert "material" not in repr(first[0])  # bytes never shown by repr
    store.delivered([first[0].key_id])
    # first[1] is "in flight" when the process dies: never delivered again.
    store._db.close()
    again = KeyStore(path)
    assert again.destroyed_at_start == 1
    rest = again.take(10)
    assert {k.key_id for k in rest}.isdisjoint({k.key_id for k in first})
    assert len(rest) == 4
    again.delivered(k.key_id for k in rest)
    assert again.ready_count() == (0, 0)
    again.close()


def test_blocks_go_out_in_the_order_stored_when_the_wall_clock_steps_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An NTP step or an operator sets the clock back an hour between two blocks: the
    older block's keys still go out first, and a pending block is recovered first."""
    import qnoded.keystore

    clock = iter([1_800_000_000.0, 1_800_000_000.0 - 3600, 1_800_000_000.0 - 7200])
    monkeypatch.setattr(qnoded.keystore.time, "time", lambda: next(clock))
    with KeyStore(tmp_path / "keys.db") as store:
        old, new = uuid.uuid4(), uuid.uuid4()
        store.add_block(old, "bob", [b"\x01" * 32] * 3, "ready", {})
        store.add_block(new, "bob", [b"\x02" * 32] * 3, "ready", {})
        assert [k.block_id for k in store.take(4)] == [old] * 3 + [new]
        p1, p2 = uuid.uuid4(), uuid.uuid4()
        store.add_block(p1, "bob", [b"\x03" * 32], "pending", {})
        monkeypatch.setattr(qnoded.keystore.time, "time", lambda: 1_700_000_000.0)
        store.add_block(p2, "bob", [b"\x04" * 32], "pending", {})
        assert store.pending_blocks() == [p1, p2]


def test_taking_the_oldest_keys_reads_an_index_not_a_sort_of_the_backlog(tmp_path: Path) -> None:
    """The soak found Alice's key delivery falling behind: every take sorted all ready
    keys (30 ms at 1e5), a fifth of her CPU, and the backlog grew.  The take now reads
    the oldest keys off an index; a full sort in its plan would bring that back."""
    with KeyStore(tmp_path / "keys.db") as store:
        blocks = [uuid.uuid4() for _ in range(3)]
        for i, block in enumerate(blocks):
            store.add_block(block, "bob", [bytes([i]) * 32] * 5, "ready", {})
        traced: list[str] = []
        store._db.set_trace_callback(traced.append)
        assert [k.block_id for k in store.take(7)] == [blocks[0]] * 5 + [blocks[1]] * 2
        store._db.set_trace_callback(None)
        (select,) = [q for q in traced if q.lstrip().upper().startswith("SELECT")]
        plan = " ".join(str(row) for row in store._db.execute(f"EXPLAIN QUERY PLAN {select}"))
        assert "keys_in_order" in plan and "TEMP B-TREE" not in plan, plan


def test_deleted_key_bytes_are_not_in_the_files(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    secret = b"\x5a\xc3" * 16
    with KeyStore(path) as store:
        store.add_block(uuid.uuid4(), "bob", [secret], "ready", {})
        (key,) = store.take(1)
        store.delivered([key.key_id])
    for f in tmp_path.iterdir():
        assert secret not in f.read_bytes(), f.name


def test_sigkill_leaves_whole_blocks(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for attempt in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"writing"
        time.sleep(0.05 * (attempt + 1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        with KeyStore(path):  # opens, recovers the WAL, destroys interrupted deliveries
            pass
        db = sqlite3.connect(path)
        blocks = db.execute("SELECT block_id, n_keys FROM blocks").fetchall()
        assert blocks, "the writer stored nothing before it was killed"
        for block_id, n_keys in blocks:
            stored = db.execute(
                "SELECT idx, state FROM keys WHERE block_id = ?", (block_id,)
            ).fetchall()
            # Keys go only by delivery (ready ones); a block never lacks keys otherwise.
            states = {s for _, s in stored}
            assert "delivering" not in states
            if "pending" in states:
                assert len(stored) == n_keys, block_id
        orphans = db.execute(
            "SELECT count(*) FROM keys WHERE block_id NOT IN (SELECT block_id FROM blocks)"
        ).fetchone()[0]
        assert orphans == 0
        db.close()


def test_a_full_store_refuses_whole_blocks_and_takes_again_once_keys_go(tmp_path: Path) -> None:
    # The cap behaves as a full disk: the block that does not fit is refused
    # whole (a StorageError, an OSError, naming the file), nothing of it is
    # left, and the store takes blocks again once delivered keys free space.
    store = KeyStore(tmp_path / "k.db", max_bytes=256 * 1024)
    stored: list[uuid.UUID] = []
    with pytest.raises(StorageError, match=r"k\.db.*full") as refused:
        for _ in range(100):
            block = uuid.uuid4()
            store.add_block(block, "bob", [os.urandom(32)] * 300, "ready", {})
            stored.append(block)
    assert isinstance(refused.value, OSError)
    assert store.block_state(block) is None
    assert [store.block_state(b) for b in stored] == ["ready"] * len(stored)
    assert store.ready_count()[0] == 300 * len(stored)
    assert len(stored) >= 2
    keys = store.take(600)
    store.delivered(k.key_id for k in keys)
    store.add_block(block, "bob", [os.urandom(32)] * 300, "ready", {})
    assert store.block_state(block) == "ready"
    store.close()
