"""Key store: taking the oldest keys from a backlog, as the MQTT and ETSI 014 deliveries do.

    python bench/bench_keystore.py [--keys 100000] [--takes 200]

A node whose consumers fall behind holds a backlog of ready keys; every take must
stay cheap however long it is, or delivery slows as the backlog grows and the
backlog grows faster (the soak saw that: bench/soak.py, docs/reliability.md).
Prints the time per take of 16 keys, with the store's own query (the index
``keys_in_order``) beside the query it replaced (order by block, then index: a
sort of every ready key), on the same store, and checks they return the same keys.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from qnoded.keystore import KeyStore

BLOCK_KEYS = 1000
BY_BLOCK = (
    "SELECT k.key_id, k.material, k.block_id FROM keys k JOIN blocks b ON b.block_id = k.block_id"
    " WHERE k.state = 'ready' ORDER BY b.rowid, k.idx LIMIT 16"
)
IN_ORDER = (
    "SELECT key_id, material, block_id FROM keys WHERE state = 'ready' ORDER BY rowid LIMIT 16"
)


def per_call_ms(run: Callable[[], object], calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - t) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--takes", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, KeyStore(Path(tmp) / "keys.db") as store:
        for _ in range(max(1, args.keys // BLOCK_KEYS)):
            keys = [os.urandom(32) for _ in range(BLOCK_KEYS)]
            store.add_block(uuid.uuid4(), "bob", keys, "ready", {})
        db = store._db
        assert db.execute(BY_BLOCK).fetchall() == db.execute(IN_ORDER).fetchall()
        ready = store.ready_count()[0]
        calls = max(1, args.takes // 4)
        old = per_call_ms(lambda: db.execute(BY_BLOCK).fetchall(), calls)
        new = per_call_ms(lambda: db.execute(IN_ORDER).fetchall(), args.takes)
        print(f"{ready:,} ready keys; a take of 16, oldest first:")
        print(f"  ordered by block (the query replaced): {old:8.3f} ms")
        print(f"  off the index keys_in_order (qnoded):  {new:8.3f} ms   ({old / new:,.0f}x)")

        def cycle() -> None:
            store.delivered(k.key_id for k in store.take(16))

        print(f"  take + delivered (overwrite, delete):  {per_call_ms(cycle, args.takes):8.3f} ms")


if __name__ == "__main__":
    main()
