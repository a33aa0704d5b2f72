"""Key accounting at the end of a run, both nodes stopped: nothing lost, nothing twice.

What a key consumer saw each node deliver (key ID -> how often, key ID -> SHA-256 of
the key), what each node destroyed undelivered (its log) and what each still holds
(its key store) must add up to the same keys, ID by ID, at both ends:

- no key ID was delivered twice by a node, and every key ID seen anywhere (delivered
  by either node, or still in either key store) has the same bytes there;
- a key still in a node's store was never also delivered by that node;
- the key stores agree block by block: every block ready at Bob is ready at Alice,
  and every block ready at Alice is ready at Bob or pending there (the next session's
  RECOVER commits it), with the same number of keys;
- what each node delivered, destroyed or still holds is the same set of key IDs;
- optionally, not one key (Base64 or hex) is in either node's log.

A node's files follow the demo's layout: ``<workdir>/<node>.log`` (JSON lines) and
``<workdir>/<node>/keys.db``.  Used by tests/test_kill_blocks.py (SIGKILL at random
moments) and bench/soak.py (hours at full rate; tests/test_soak.py is its CI run).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

NODES = ("alice", "bob")
# The log events that name keys a node destroyed without delivering them (at most
# once): after a crash or an unconfirmed MQTT publication (the audit line), or a 014
# reply that could not be written.
DESTROYED_EVENTS = frozenset({"key destroyed undelivered", "etsi014 keys destroyed undelivered"})
_B64_RUN = re.compile(r"[A-Za-z0-9+/=]+")


@dataclass(frozen=True)
class Store:
    """A key store read after the run: its blocks and the keys it still holds."""

    blocks: dict[str, tuple[str, int]]  # block ID -> (state, key count)
    digests: dict[str, str]  # key ID -> SHA-256 (hex) of a key still held
    block_of: dict[str, str]  # key ID -> block ID, for the keys still held

    def in_state(self, state: str) -> set[str]:
        return {b for b, (s, _) in self.blocks.items() if s == state}


def read_store(path: Path) -> Store:
    db = sqlite3.connect(path)
    try:
        blocks = {
            r[0]: (r[1], int(r[2]))
            for r in db.execute("SELECT block_id, state, n_keys FROM blocks")
        }
        rows = db.execute("SELECT key_id, material, block_id FROM keys").fetchall()
    finally:
        db.close()
    digests = {r[0]: hashlib.sha256(bytes(r[1])).hexdigest() for r in rows}
    return Store(blocks, digests, {r[0]: r[2] for r in rows})


def destroyed(log: Path) -> set[str]:
    """Key IDs a node destroyed undelivered, from its JSON log lines."""
    out: set[str] = set()
    for line in log.read_text(encoding="utf-8").splitlines():
        if "destroyed undelivered" not in line:
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue  # not one of the node's JSON lines (a traceback, say)
        if doc.get("event") in DESTROYED_EVENTS:
            out.update(str(k) for k in doc["key_ids"])
    return out


@dataclass(frozen=True)
class Accounting:
    """Both nodes' keys after the run, and every way they fail to add up."""

    delivered: dict[str, Counter[str]]
    stores: dict[str, Store]
    gone: dict[str, set[str]]  # destroyed undelivered, per node
    problems: list[str]

    def figures(self) -> str:
        a, b = self.stores["alice"], self.stores["bob"]
        return (
            f"blocks ready alice {len(a.in_state('ready'))}, bob {len(b.in_state('ready'))}, "
            f"pending bob {len(b.in_state('pending'))}; keys delivered alice "
            f"{len(self.delivered['alice'])}, bob {len(self.delivered['bob'])}; destroyed "
            f"undelivered alice {len(self.gone['alice'])}, bob {len(self.gone['bob'])}; left "
            f"alice {len(a.digests)}, bob {len(b.digests)}"
        )


def _few(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")


def account(
    workdir: Path,
    delivered: Mapping[str, Counter[str]],
    digests: Mapping[str, Mapping[str, str]],
    material: Iterable[str] | None = None,
) -> Accounting:
    """Check the run in ``workdir``: ``delivered[node]`` counts each key ID a consumer
    got from ``node``, ``digests[node]`` maps it to the key's SHA-256 (hex);
    ``material``, the keys as delivered (Base64), to look for in the logs."""
    stores = {n: read_store(workdir / n / "keys.db") for n in NODES}
    gone = {n: destroyed(workdir / f"{n}.log") for n in NODES}
    sent = {n: Counter(delivered.get(n, Counter())) for n in NODES}
    problems = _nothing_twice(sent, digests, stores)
    problems += _stores_agree(stores["alice"], stores["bob"])
    problems += _same_keys(sent, gone, stores["alice"], stores["bob"])
    if material is not None:
        problems += _no_key_in_logs(workdir, material)
    return Accounting(sent, stores, gone, problems)


def _nothing_twice(
    sent: Mapping[str, Counter[str]],
    digests: Mapping[str, Mapping[str, str]],
    stores: Mapping[str, Store],
) -> list[str]:
    problems: list[str] = []
    for n in NODES:
        twice = [k for k, c in sent[n].items() if c > 1]
        if twice:
            problems.append(f"{n} delivered {len(twice)} key IDs twice: {_few(twice)}")
        held = set(sent[n]) & set(stores[n].digests)
        if held:
            problems.append(f"{n} still holds {len(held)} keys it delivered: {_few(held)}")
    # One key per ID, wherever it was seen.
    seen: dict[str, set[str]] = {}
    for source in (*(digests.get(n, {}) for n in NODES), *(stores[n].digests for n in NODES)):
        for kid, digest in source.items():
            seen.setdefault(kid, set()).add(digest)
    two = [k for k, d in seen.items() if len(d) > 1]
    if two:
        problems.append(f"{len(two)} key IDs with two different keys: {_few(two)}")
    return problems


def _stores_agree(a: Store, b: Store) -> list[str]:
    """Block by block; a block pending at Bob waits for the next session's RECOVER."""
    problems: list[str] = []
    ready_a, ready_b = a.in_state("ready"), b.in_state("ready")
    if ready_b - ready_a:
        problems.append(f"blocks ready at bob, not at alice: {_few(ready_b - ready_a)}")
    unknown = ready_a - ready_b - b.in_state("pending")
    if unknown:
        problems.append(f"blocks ready at alice, neither ready nor pending at bob: {_few(unknown)}")
    counts = [k for k in ready_a if k in b.blocks and a.blocks[k][1] != b.blocks[k][1]]
    if counts:
        problems.append(f"blocks with another key count at each end: {_few(counts)}")
    return problems


def _same_keys(
    sent: Mapping[str, Counter[str]], gone: Mapping[str, set[str]], a: Store, b: Store
) -> list[str]:
    """Key by key: what each node delivered, destroyed or still holds is the same set of
    IDs (less a block pending at Bob that Alice never committed: RECOVER discards it)."""
    problems: list[str] = []
    held_b = {k for k, blk in b.block_of.items() if blk in a.in_state("ready")}
    everything_a = set(sent["alice"]) | gone["alice"] | set(a.digests)
    everything_b = set(sent["bob"]) | gone["bob"] | held_b
    if everything_a != everything_b:
        problems.append(
            f"key IDs accounted for at alice only: {_few(everything_a - everything_b) or 'none'}; "
            f"at bob only: {_few(everything_b - everything_a) or 'none'}"
        )
    kept = (gone["alice"] | gone["bob"]) & (set(a.digests) | set(b.digests))
    if kept:
        problems.append(f"keys destroyed undelivered yet still stored: {_few(kept)}")
    return problems


def _no_key_in_logs(workdir: Path, material: Iterable[str]) -> list[str]:
    """Not one key, in Base64 or hex, in either node's log (crashes included).

    A key written into a log lies inside one run of Base64 characters (hex digits
    are among them), so only the windows of such runs are looked up: linear in the
    logs' size, where ``key in text`` for every key is keys x size (hours of keys)."""
    keys = set(material)
    keys |= {base64.b64decode(k).hex() for k in keys}
    lengths = sorted({len(k) for k in keys})
    leaked: set[str] = set()
    for n in NODES:
        text = (workdir / f"{n}.log").read_text(encoding="utf-8")
        for run in _B64_RUN.finditer(text):
            token = run.group()
            for size in lengths:
                leaked.update(
                    w for i in range(len(token) - size + 1) if (w := token[i : i + size]) in keys
                )
    return [f"{len(leaked)} keys appear in the nodes' logs"] if leaked else []
