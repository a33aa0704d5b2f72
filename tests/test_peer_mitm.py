"""A man in the middle changes one bit on the wire between two running nodes.

Two `qnoded run` processes make key through :class:`mitm.FrameProxy`, which
flips one bit of one frame: a Cascade answer (bulk, sent without a MAC and
covered by Alice's next tag) or Bob's PREPARED (tagged; Bob already holds
the block pending).  What must hold: the receiver rejects the session at the
first tag that covers the change, counts it and raises the
``authentication-failure`` alarm; no key from that block is delivered at
either node; the link comes back by itself and later blocks make key again,
identical at both nodes, ID by ID.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from mitm import Direction, FrameProxy, WireFrame
from test_node_faults import Nodes, _args

from qnoded.auth import TAG_LEN
from qnoded.demo import KeyLedger
from qnoded.mqtt import Subscriber
from qnoded.peer import MsgType, decode_arrays

pytestmark = pytest.mark.slow

# The 40th Cascade answer falls well inside a 3e5-bit block's first passes.
AT = {MsgType.EC_ANSWER: 40, MsgType.PREPARED: 1}
WATCH = ("state", "blocks_accepted", "blocks_rejected", "block_reject_reasons", "auth_failures")


class OneBitFlip:
    """The hook: flip the last payload bit of the ``at``-th frame of one type, once."""

    def __init__(self, target: MsgType) -> None:
        self.target = target
        self.count = 0
        self.block: str | None = None
        self.mac_len = -1

    def __call__(self, _direction: Direction, frame: WireFrame) -> list[bytes]:
        if frame.msg_type is self.target and self.block is None:
            self.count += 1
            if self.count == AT[self.target]:
                self.block = str(
                    uuid.UUID(bytes=decode_arrays(frame.payload)["block_id"].tobytes())
                )
                self.mac_len = frame.mac_len
                return [frame.flipped(-1)]
        return [frame.raw]


@pytest.mark.parametrize(
    ("target", "receiver"), [(MsgType.EC_ANSWER, "bob"), (MsgType.PREPARED, "alice")]
)
@pytest.mark.asyncio
async def test_one_flipped_bit_drops_its_block_and_the_link_recovers(
    tmp_path: Path, mqtt_broker: tuple[str, int], target: MsgType, receiver: str
) -> None:
    nodes = Nodes(
        tmp_path,
        mqtt_broker,
        _args(protocol="bb84", distance_km=25.0, fast=True, block_bits=300_000),
    )
    flip = OneBitFlip(target)
    ledger = KeyLedger()
    blocks_seen: dict[str, set[str]] = {"alice": set(), "bob": set()}
    telemetry: dict[str, dict[str, Any]] = {}
    accepted_at_flip: dict[str, int] = {}

    def recovered() -> bool:
        if flip.block is None or "authentication-failure" not in ledger.alarms[receiver]:
            return False
        if not accepted_at_flip:
            accepted_at_flip.update({n: telemetry[n]["blocks_accepted"] for n in telemetry})
        later = all(
            telemetry[n]["blocks_accepted"] > accepted_at_flip.get(n, 0) for n in ("alice", "bob")
        )
        a, b = set(ledger.seen["alice"]), set(ledger.seen["bob"])
        return later and bool(a) and a == b  # between blocks both have delivered the same

    async with FrameProxy(nodes.peer_port, flip) as proxy:
        bob_toml = tmp_path / "bob.toml"
        bob_toml.write_text(
            bob_toml.read_text().replace(
                f'connect = "127.0.0.1:{nodes.peer_port}"', f'connect = "127.0.0.1:{proxy.port}"'
            )
        )
        topics = ("qkd/v1/+/keys/+", "qkd/v1/+/alarms", "qkd/v1/+/telemetry")
        async with Subscriber(mqtt_broker, *topics) as sub:
            nodes.start("alice")
            nodes.start("bob")
            try:
                async with asyncio.timeout(90):
                    async for msg in sub:
                        node, leaf = msg.topic.split("/")[2], msg.topic.split("/")[3]
                        if leaf == "keys":
                            ledger.add(node, msg.payload)
                            blocks_seen[node].add(msg.payload["block_id"])
                        elif leaf == "alarms":
                            ledger.alarms[node].append(msg.payload["code"])
                        else:
                            telemetry[node] = msg.payload
                        if recovered():
                            break
            except TimeoutError:
                state = {n: {k: telemetry.get(n, {}).get(k) for k in WATCH} for n in telemetry}
                pytest.fail(
                    f"no recovery: flips {flip.count}, block {flip.block}, alarms "
                    f"{ledger.alarms}, keys {len(ledger.seen['alice'])}/"
                    f"{len(ledger.seen['bob'])}, at flip {accepted_at_flip}, nodes {state}"
                )
            finally:
                for role in ("bob", "alice"):
                    nodes.stop(role)
                nodes.kill_all()
        assert proxy.connections >= 2  # Bob reconnected after the rejected session

    # The flipped frame was the kind the parametrisation names: untagged bulk or tagged.
    assert flip.mac_len == (0 if target is MsgType.EC_ANSWER else TAG_LEN)
    compared = ledger.compare()
    assert compared["keys_mismatched"] == 0 and compared["keys_compared"] > 0
    assert compared["malformed_key_messages"] == 0
    # No key from the tampered block, at either node.
    assert flip.block not in blocks_seen["alice"] | blocks_seen["bob"]
    # One rejection, at the receiver, of the kind a wrong tag is; named in its log.
    failures = [
        e
        for e in nodes.log(receiver)
        if e.get("event") == "peer frame failed authentication, closing"
    ]
    assert [e["kind"] for e in failures] == ["mac"]
    if target is MsgType.EC_ANSWER:
        assert "untagged frames before it" in failures[0]["error"]  # caught by the covering tag
    other = "alice" if receiver == "bob" else "bob"
    assert not [
        e for e in nodes.log(other) if e.get("event") == "peer frame failed authentication, closing"
    ]
    summary = {n: telemetry[n] for n in ("alice", "bob")}
    assert summary[receiver]["auth_failures"] == {"mac": 1}
    assert not summary[other]["auth_failures"]
    # The block in flight was given up at both nodes, never half-kept.
    for n in ("alice", "bob"):
        assert summary[n]["blocks_rejected"] >= 1, summary[n]
