"""ETSI GS QKD 014 key delivery end to end: two running nodes, two SAEs, mutual TLS.

Encryptors and key managers that already speak 014 can use a qnoded link
unchanged: the master SAE gets keys from Alice's node (``enc_keys``) and the
slave SAE the same keys by ID from Bob's (``dec_keys``).  Two ``qnoded run``
processes make key (BB84, simulated at full speed); a throw-away CA issues
each node its server certificate and each SAE its client certificate, whose
CN is the SAE ID.  The SAEs are plain aiohttp clients with no qnoded code:
what a third-party 014 client sends.

Bob reaches Alice through a proxy that holds Alice's first COMMIT: Alice has
stored that block ready (her commit point) while Bob still holds it pending.
That is the window in which a slave can ask for a key its master already
has, and the test opens it for as long as it needs, without sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sqlite3
import ssl
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mitm import Direction, FrameProxy, WireFrame
from pki import CertPair, Pki, _issue, make_pki
from test_etsi014 import STATUS_FIELDS  # spec 6.1, every field of the Status format
from test_node_faults import Nodes, _args

from qnoded.broker import free_port
from qnoded.config import ConfigError, parse_config
from qnoded.peer import MsgType

pytestmark = pytest.mark.slow

MASTER, SLAVE, INTRUDER = "sae-master-enc", "sae-slave-dec", "sae-intruder"
KEY_BITS = 256  # the nodes' default [postprocessing] key_size_bits
API = "/api/v1/keys"
# The whole run: start, first block, every request, stop.
RUN_TIMEOUT_S = 35.0
HTTP = aiohttp.ClientTimeout(total=5)


# -- the peer link: hold Alice's first COMMIT --------------------------------------------
class FirstCommitHold(FrameProxy):
    """A frame proxy that stops the Alice-to-Bob direction at Alice's first COMMIT.

    Frames are forwarded in order, so holding one holds everything after it
    on the way to Bob; the other direction keeps flowing.  The test holds it
    for a fraction of a second, far below the peer link's receive timeout.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def hold(self, direction: Direction, frame: WireFrame) -> None:
        first_commit = direction == "to_bob" and frame.msg_type is MsgType.COMMIT
        if first_commit and not self.held.is_set():
            self.held.set()
            await self.release.wait()


# -- certificates and configs ------------------------------------------------------------
def kme_certificate(pki: Pki, node: str) -> CertPair:
    """A server certificate for one node's 014 endpoint (127.0.0.1), from the SAEs' CA."""
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    return _issue(pki.ca_cert.parent, f"kme-{node}", f"kme-{node}", ca.subject, ca_key, server=True)


def configure(nodes: Nodes, pki: Pki, ports: dict[str, int], proxy_port: int) -> None:
    """Give each node of ``nodes`` its [etsi014] section, keys off MQTT, Bob via the proxy."""
    for node, local, remote in (("alice", MASTER, SLAVE), ("bob", SLAVE, MASTER)):
        path = nodes.tmp / f"{node}.toml"
        text = path.read_text()
        # A key leaves a node once: the config refuses MQTT and 014 delivery together.
        assert text.count("[mqtt]\n") == 1
        text = text.replace("[mqtt]\n", "[mqtt]\npublish_keys = false\n")
        if node == "bob":
            connect = f'connect = "127.0.0.1:{nodes.peer_port}"'
            assert connect in text
            text = text.replace(connect, f'connect = "127.0.0.1:{proxy_port}"')
        cert = kme_certificate(pki, node)
        section = {
            "listen": f"127.0.0.1:{ports[node]}",
            "cert_file": str(cert.cert),
            "key_file": str(cert.key),
            "ca_file": str(pki.ca_cert),
            "local_sae": local,
            "remote_sae": remote,
        }
        # JSON strings are TOML basic strings for these (paths, IDs).
        text += "[etsi014]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in section.items())
        path.write_text(text)


# -- a third-party 014 client --------------------------------------------------------------
@dataclass
class Kme:
    """One node's 014 endpoint and every HTTP status it answered in this test."""

    node: str
    port: int
    replies: Counter[int] = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{API}/{path}"


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    retry_after: str | None


def sae_context(trust: Pki, client: CertPair | None) -> ssl.SSLContext:
    """What an SAE's TLS stack does: verify the KME (CA and host), show its own certificate."""
    ctx = ssl.create_default_context(cafile=str(trust.ca_cert))
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    return ctx


@contextlib.asynccontextmanager
async def sae_client(ctx: ssl.SSLContext) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx), timeout=HTTP
    ) as session:
        yield session


async def call(
    sae: aiohttp.ClientSession, kme: Kme, method: str, path: str, **kwargs: Any
) -> Reply:
    async with sae.request(method, kme.url(path), **kwargs) as r:
        # Every reply, keys or error, is JSON (spec 6).
        assert r.content_type == "application/json", (r.status, await r.text())
        body = await r.json()
        kme.replies[r.status] += 1
        return Reply(r.status, body, r.headers.get("Retry-After"))


async def server_cn(ctx: ssl.SSLContext, kme: Kme) -> str | None:
    """The CN of the certificate a KME shows in the TLS handshake (verified by ``ctx``)."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", kme.port, ssl=ctx)
    try:
        cert = writer.get_extra_info("peercert")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    names = [v for rdn in cert["subject"] for k, v in rdn if k == "commonName"]
    return names[0] if names else None


def key_container(reply: Reply, number: int) -> dict[str, bytes]:
    """The spec's Key container (6.3) holding ``number`` keys: key ID -> key bytes, in order."""
    assert reply.status == 200, reply
    assert set(reply.body) == {"keys"}, reply.body
    entries = reply.body["keys"]
    assert isinstance(entries, list) and len(entries) == number, reply.body
    keys: dict[str, bytes] = {}
    for entry in entries:
        assert set(entry) == {"key_ID", "key"}, entry
        kid = entry["key_ID"]
        assert str(uuid.UUID(kid)) == kid  # a UUID in its canonical text form
        material = base64.b64decode(entry["key"], validate=True)
        assert len(material) == KEY_BITS // 8
        keys[kid] = material
    assert len(keys) == number  # no ID twice in one container
    return keys


def error_container(reply: Reply, status: int, *words: str) -> list[dict[str, Any]]:
    """The spec's Error container (6.5) with ``status``, its message naming the problem."""
    assert reply.status == status, reply
    assert isinstance(reply.body, dict) and set(reply.body) <= {"message", "details"}, reply
    assert isinstance(reply.body["message"], str)
    for word in words:
        assert word in reply.body["message"], reply.body
    details = reply.body.get("details", [])
    assert isinstance(details, list) and all(isinstance(d, dict) for d in details)
    return details


def key_ids(ids: list[str]) -> dict[str, Any]:
    """The spec's Key IDs container (6.4)."""
    return {"key_IDs": [{"key_ID": i} for i in ids]}


async def until(what: str, probe: Callable[[], Awaitable[Reply | None]], nodes: Nodes) -> Reply:
    """Poll ``probe`` until it returns a reply; fail with the nodes' log tails if one exits."""
    while True:
        for role, proc in nodes.procs.items():
            if proc.poll() is not None:
                tail = (nodes.tmp / f"{role}.log").read_text()[-3000:]
                pytest.fail(f"{role} exited ({proc.returncode}) waiting for {what}:\n{tail}")
        reply = await probe()
        if reply is not None:
            return reply
        await asyncio.sleep(0.2)


async def dec_keys(slave: aiohttp.ClientSession, bob: Kme, ids: list[str], nodes: Nodes) -> Reply:
    """The slave's dec_keys as a client should make it: retry a 503 after its Retry-After.

    Alice commits a block before Bob does, so for a moment a key the master
    already holds may still be pending at Bob; the server says so with 503.
    """

    async def probe() -> Reply | None:
        reply = await call(slave, bob, "POST", f"{MASTER}/dec_keys", json=key_ids(ids))
        if reply.status != 503:
            return reply
        error_container(reply, 503, "not yet committed")
        await asyncio.sleep(float(reply.retry_after or 1))
        return None

    return await until("Bob to commit", probe, nodes)


async def stored_at_alice(
    master: aiohttp.ClientSession, alice: Kme, at_least: int, nodes: Nodes
) -> Reply:
    """Poll the master's status at Alice until ``at_least`` keys are stored."""

    async def probe() -> Reply | None:
        try:
            reply = await call(master, alice, "GET", f"{SLAVE}/status")
        except aiohttp.ClientConnectorError:
            return None  # not listening yet: the node is still starting
        assert reply.status == 200, reply
        return reply if reply.body["stored_key_count"] >= at_least else None

    return await until(f"{at_least} keys at Alice", probe, nodes)


# -- the test -------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_014_saes_get_the_same_keys_from_the_two_nodes(
    tmp_path: Path, mqtt_broker: tuple[str, int]
) -> None:
    pki = make_pki(tmp_path / "pki", [MASTER, SLAVE, INTRUDER])
    # The master's CN from a CA the nodes do not trust.
    foreign = make_pki(tmp_path / "foreign", [MASTER], ca_name="foreign CA")
    nodes = Nodes(
        tmp_path,
        mqtt_broker,
        _args(protocol="bb84", distance_km=25.0, fast=True, block_bits=300_000),
    )
    alice, bob = Kme("alice", free_port()), Kme("bob", free_port())
    delivered: dict[str, dict[str, bytes]] = {"alice": {}, "bob": {}}

    def record(node: str, keys: dict[str, bytes]) -> dict[str, bytes]:
        # A KME never hands out the same key ID twice, across all its replies.
        assert not set(keys) & set(delivered[node]), "a key ID delivered twice"
        delivered[node].update(keys)
        return keys

    async with FirstCommitHold(nodes.peer_port) as proxy:
        configure(nodes, pki, {"alice": alice.port, "bob": bob.port}, proxy.port)
        async with (
            sae_client(sae_context(pki, pki.client(MASTER))) as master,
            sae_client(sae_context(pki, pki.client(SLAVE))) as slave,
            sae_client(sae_context(pki, pki.client(INTRUDER))) as intruder,
        ):
            nodes.start("alice")
            nodes.start("bob")
            try:
                async with asyncio.timeout(RUN_TIMEOUT_S):
                    # 1. Status, once Alice has committed her first block.
                    status = await stored_at_alice(master, alice, 1, nodes)
                    ctx = sae_context(pki, pki.client(MASTER))
                    # Each node shows its own cert_file.
                    assert await server_cn(ctx, alice) == "kme-alice"
                    assert await server_cn(ctx, bob) == "kme-bob"
                    check_status(status.body)

                    # 2. The window: the block is ready at Alice, pending at Bob.
                    await asyncio.wait_for(proxy.held.wait(), 5)
                    await pending_at_bob(master, slave, alice, bob, status, record)

                    # 3. Bob commits once the COMMIT is through; the slave retries.
                    proxy.release.set()
                    first = list(delivered["alice"])
                    got = key_container(await dec_keys(slave, bob, first, nodes), len(first))
                    assert got == {k: delivered["alice"][k] for k in first}
                    record("bob", got)

                    # 4. More keys (a 3e5-bit block makes dozens): both forms of each call.
                    await stored_at_alice(master, alice, 9, nodes)
                    await same_keys_once(master, slave, alice, bob, nodes, record)

                    # 5. Who may do what, and malformed requests.
                    await refusals(master, slave, intruder, alice, bob)
                    await bad_requests(master, slave, alice, bob)
                    await tls_refusals(pki, foreign, alice, bob)
            except TimeoutError:
                tails = {r: (tmp_path / f"{r}.log").read_text()[-2000:] for r in nodes.procs}
                pytest.fail(f"not done in {RUN_TIMEOUT_S} s; held {proxy.held.is_set()}: {tails}")
            finally:
                proxy.release.set()
                # In threads: the proxy must keep forwarding BYE while the nodes stop.
                stopped = [await asyncio.to_thread(nodes.stop, role) for role in ("bob", "alice")]
                nodes.kill_all()
    assert [nodes.procs[r].returncode for r in ("bob", "alice")] == [0, 0], stopped

    check_counters_and_logs(nodes, alice, bob, delivered)


def check_status(body: dict[str, Any]) -> None:
    """Status (spec 6.1) at Alice for the master SAE: this link, one key size, no multicast."""
    assert set(body) == STATUS_FIELDS
    assert body["source_KME_ID"] == "alice" and body["target_KME_ID"] == "bob"
    assert body["master_SAE_ID"] == MASTER and body["slave_SAE_ID"] == SLAVE
    assert body["key_size"] == body["min_key_size"] == body["max_key_size"] == KEY_BITS
    assert 1 <= body["stored_key_count"] <= body["max_key_count"]
    assert body["max_key_per_request"] >= 1
    assert body["max_SAE_ID_count"] == 0


async def pending_at_bob(
    master: aiohttp.ClientSession,
    slave: aiohttp.ClientSession,
    alice: Kme,
    bob: Kme,
    status: Reply,
    record: Callable[[str, dict[str, bytes]], dict[str, bytes]],
) -> None:
    """The master has keys of a block Bob holds pending: the slave is told to retry."""
    # Only the held block is ready at Alice (the next cannot finish without Bob),
    # so every key the master gets now is one Bob holds pending.
    number = min(2, status.body["stored_key_count"])
    keys = record(
        "alice",
        key_container(
            await call(
                master, alice, "POST", f"{SLAVE}/enc_keys", json={"number": number, "size": 256}
            ),
            number,
        ),
    )
    ids = list(keys)
    reply = await call(slave, bob, "POST", f"{MASTER}/dec_keys", json=key_ids(ids))
    details = error_container(reply, 503, "not yet committed at this KME, retry shortly", ids[0])
    assert details == [{"key_ID": i} for i in ids]
    assert reply.retry_after == "1"
    reply = await call(slave, bob, "GET", f"{MASTER}/dec_keys?key_ID={ids[-1]}")
    error_container(reply, 503, "not yet committed", ids[-1])
    # 503 took nothing: the same IDs are delivered once Bob commits (the caller checks).


async def same_keys_once(
    master: aiohttp.ClientSession,
    slave: aiohttp.ClientSession,
    alice: Kme,
    bob: Kme,
    nodes: Nodes,
    record: Callable[[str, dict[str, bytes]], dict[str, bytes]],
) -> None:
    """enc_keys at Alice, dec_keys at Bob: same bytes under the same IDs, each once."""
    post = record(
        "alice",
        key_container(
            await call(master, alice, "POST", f"{SLAVE}/enc_keys", json={"number": 4, "size": 256}),
            4,
        ),
    )
    get = record(
        "alice",
        key_container(await call(master, alice, "GET", f"{SLAVE}/enc_keys?number=3&size=256"), 3),
    )
    default = record(
        "alice", key_container(await call(master, alice, "GET", f"{SLAVE}/enc_keys"), 1)
    )  # number defaults to 1 (spec 6.2)

    # The slave asks in an order of its own; the reply follows it.
    wanted = list(reversed(post)) + list(default)
    got = record("bob", key_container(await dec_keys(slave, bob, wanted, nodes), len(wanted)))
    assert list(got) == wanted
    assert got == {k: delivered_by(k, post, default) for k in wanted}

    # GET dec_keys carries one key_ID.
    one, *rest = list(get)
    reply = await call(slave, bob, "GET", f"{MASTER}/dec_keys?key_ID={one}")
    assert record("bob", key_container(reply, 1)) == {one: get[one]}

    # Delivered once: asking again is refused, by ID, and so is an ID nobody made.
    again = await call(slave, bob, "GET", f"{MASTER}/dec_keys?key_ID={wanted[0]}")
    details = error_container(again, 400, "not found (unknown or already delivered)", wanted[0])
    assert details == [{"key_ID": wanted[0]}]
    stranger = str(uuid.uuid4())
    reply = await call(slave, bob, "POST", f"{MASTER}/dec_keys", json=key_ids([stranger]))
    error_container(reply, 400, "not found", stranger)
    # All or nothing: one spent ID fails the request and takes no other key with it.
    reply = await call(slave, bob, "POST", f"{MASTER}/dec_keys", json=key_ids([rest[0], one]))
    assert error_container(reply, 400, "not found", one) == [{"key_ID": one}]
    got = record("bob", key_container(await dec_keys(slave, bob, rest, nodes), len(rest)))
    assert got == {k: get[k] for k in rest}


def delivered_by(kid: str, *containers: dict[str, bytes]) -> bytes:
    return next(c[kid] for c in containers if kid in c)


async def refusals(
    master: aiohttp.ClientSession,
    slave: aiohttp.ClientSession,
    intruder: aiohttp.ClientSession,
    alice: Kme,
    bob: Kme,
) -> None:
    """401 (spec 5.x: Unauthorized) for an SAE a node does not serve or the wrong side."""
    cases = [
        # The slave at Alice: she serves the master only.
        (slave, alice, "POST", f"{MASTER}/enc_keys", f"SAE {SLAVE!r} is not served"),
        (slave, alice, "GET", f"{MASTER}/status", f"SAE {SLAVE!r} is not served"),
        # The slave at its own node: enc_keys and status are the master's.
        (slave, bob, "POST", f"{MASTER}/enc_keys", "is the slave at this KME"),
        (slave, bob, "GET", f"{MASTER}/enc_keys?number=1", "is the slave at this KME"),
        # The master asking for keys by ID, at either node.
        (master, alice, "POST", f"{SLAVE}/dec_keys", "is the master at this KME"),
        (master, bob, "POST", f"{SLAVE}/dec_keys", f"SAE {MASTER!r} is not served"),
        # The right CA, another CN.
        (intruder, alice, "GET", f"{SLAVE}/status", f"SAE {INTRUDER!r} is not served"),
        (intruder, alice, "POST", f"{SLAVE}/enc_keys", f"SAE {INTRUDER!r} is not served"),
        (intruder, bob, "POST", f"{MASTER}/dec_keys", f"SAE {INTRUDER!r} is not served"),
        # The master naming an SAE it has no link to.
        (master, alice, "POST", f"{INTRUDER}/enc_keys", f"no key link to SAE {INTRUDER!r}"),
    ]
    probe_id = str(uuid.uuid4())
    for session, kme, method, path, words in cases:
        body = key_ids([probe_id]) if path.endswith("dec_keys") else {"number": 1}
        kwargs = {"json": body} if method == "POST" else {}
        error_container(await call(session, kme, method, path, **kwargs), 401, words)


async def bad_requests(
    master: aiohttp.ClientSession, slave: aiohttp.ClientSession, alice: Kme, bob: Kme
) -> None:
    """400 with the Error container for what the status does not offer, or not the spec's form."""
    enc = f"{SLAVE}/enc_keys"
    status = (await call(master, alice, "GET", f"{SLAVE}/status")).body
    limit = status["max_key_per_request"]
    cases: list[tuple[aiohttp.ClientSession, Kme, str, str, Any, str]] = [
        (master, alice, "POST", enc, {"number": 0}, f"number: 0 is outside 1..{limit}"),
        (master, alice, "POST", enc, {"number": limit + 1}, "max_key_per_request"),
        (master, alice, "POST", enc, {"size": 128}, "size: 128 bits is not supported"),
        (master, alice, "POST", enc, {"number": 1, "size": 257}, "this KME delivers 256"),
        (master, alice, "POST", enc, {"number": "2"}, "number: must be an integer"),
        (master, alice, "GET", enc + f"?number={limit + 1}", None, "max_key_per_request"),
        (master, alice, "GET", enc + "?size=512", None, "size: 512 bits is not supported"),
        (master, alice, "GET", enc + "?number=two", None, "not a positive decimal integer"),
        (master, alice, "POST", enc, {"number": 1, "additional_slave_SAE_IDs": ["x"]}, "multicast"),
        (slave, bob, "POST", f"{MASTER}/dec_keys", {"key_IDs": []}, "must be a non-empty array"),
        (slave, bob, "POST", f"{MASTER}/dec_keys", key_ids(["key-1"]), "'key-1' is not a UUID"),
        (slave, bob, "GET", f"{MASTER}/dec_keys?key_ID=key-1", None, "is not a UUID"),
    ]
    for session, kme, method, path, body, words in cases:
        kwargs = {"json": body} if body is not None else {}
        error_container(await call(session, kme, method, path, **kwargs), 400, words)


async def tls_refusals(trusted: Pki, foreign: Pki, alice: Kme, bob: Kme) -> None:
    """No client certificate, or the master's CN from another CA: no TLS session, no HTTP."""
    for client in (foreign.client(MASTER), None):
        async with sae_client(sae_context(trusted, client)) as session:
            for kme, path in ((alice, f"{SLAVE}/status"), (bob, f"{MASTER}/dec_keys")):
                with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                    await call(session, kme, "GET", path)


def check_counters_and_logs(
    nodes: Nodes, alice: Kme, bob: Kme, delivered: dict[str, dict[str, bytes]]
) -> None:
    """Each node's own account (summary.json, its log) of what the SAEs saw."""
    assert set(delivered["alice"]) == set(delivered["bob"])  # every key reached both SAEs
    for kme, consumer in ((alice, MASTER), (bob, SLAVE)):
        summary = json.loads((nodes.tmp / kme.node / "summary.json").read_text())
        # Only requests that got an HTTP reply were counted: the TLS refusals never got there.
        assert summary["etsi014_requests"] == sum(kme.replies.values()), (summary, kme.replies)
        assert summary["etsi014_keys_delivered"] == len(delivered[kme.node])
        assert summary["etsi014_keys_destroyed"] == summary["etsi014_replies_lost"] == 0
        for code in (400, 401, 503):
            assert summary[f"etsi014_rejected_{code}"] == kme.replies[code], (code, summary)

        log = nodes.log(kme.node)
        listening = [e for e in log if e.get("event") == "etsi014 listening"]
        assert [(e["local_sae"], e["role"]) for e in listening] == [(consumer, kme.node)]
        audited = [
            i for e in log if e.get("event") == "key delivered" for i in e.get("key_ids", [])
        ]
        assert sorted(audited) == sorted(delivered[kme.node])  # each key audited once
        assert all(
            e["consumer"] == consumer and e["interface"] == "etsi014"
            for e in log
            if e.get("event") == "key delivered"
        )
        text = (nodes.tmp / f"{kme.node}.log").read_text()
        for material in delivered[kme.node].values():
            assert base64.b64encode(material).decode() not in text
            assert material.hex() not in text

        # Delivered means destroyed: no row, and the bytes nowhere in the store's files
        # (the node has stopped, so its WAL is checkpointed into keys.db).
        state = nodes.tmp / kme.node
        with contextlib.closing(
            sqlite3.connect(f"file:{state / 'keys.db'}?mode=ro", uri=True)
        ) as db:
            rows = {kid for (kid,) in db.execute("SELECT key_id FROM keys")}
            assert not rows & set(delivered[kme.node])
            kept = [m for (m,) in db.execute("SELECT material FROM keys WHERE state = 'ready'")]
        on_disk = b"".join(p.read_bytes() for p in state.glob("keys.db*"))
        assert kept and all(m in on_disk for m in kept)  # the scan finds key bytes that are there
        assert not [m for m in delivered[kme.node].values() if m in on_disk]


def test_one_sae_at_both_ends_of_the_link_is_a_config_error() -> None:
    """Found writing the test above: check-config passed it, the node failed after start."""
    text = f"""
[node]
id = "alice"
role = "alice"
[peer]
peer_id = "bob"
listen = "127.0.0.1:7001"
[mqtt]
publish_keys = false
[etsi014]
listen = "127.0.0.1:8443"
cert_file = "kme.crt"
key_file = "kme.key"
ca_file = "sae-ca.crt"
local_sae = "{MASTER}"
remote_sae = "{SLAVE}"
"""
    assert parse_config(text, "node.toml").etsi014.remote_sae == SLAVE
    with pytest.raises(ConfigError, match=r"\[etsi014\] remote_sae: is the same SAE as local_sae"):
        parse_config(text.replace(SLAVE, MASTER), "node.toml")
