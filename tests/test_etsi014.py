"""ETSI GS QKD 014 key delivery over real HTTPS with mutual TLS on localhost.

Alice's node serves the master SAE (sae-a), Bob's the slave SAE (sae-b); both
stores hold the same block, so the slave gets the master's bytes by key ID.
Also: the key store's all-or-nothing takes that the API is built on.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pki import Pki, make_pki
from structlog.testing import capture_logs

from qnoded.config import Etsi014Section, Role
from qnoded.etsi014 import Etsi014Server
from qnoded.keystore import KeyStore, KeyStoreError, KeysUnavailableError

KEY_BYTES = 32  # 256-bit keys, the default key_size_bits
MAX_PER_REQUEST = 8
STATUS_FIELDS = {
    "source_KME_ID",
    "target_KME_ID",
    "master_SAE_ID",
    "slave_SAE_ID",
    "key_size",
    "stored_key_count",
    "max_key_count",
    "max_key_per_request",
    "max_key_size",
    "min_key_size",
    "max_SAE_ID_count",
}
T = aiohttp.ClientTimeout(total=5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["sae-a", "sae-b", "intruder"])


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA issuing a certificate with the right CN: it must not get in."""
    return make_pki(tmp_path_factory.mktemp("foreign"), ["sae-a"], ca_name="foreign CA")


@pytest.fixture
def material() -> list[bytes]:
    return [os.urandom(KEY_BYTES) for _ in range(6)]


@pytest.fixture
def stores(tmp_path: Path, material: list[bytes]) -> Iterator[tuple[KeyStore, KeyStore]]:
    """Alice's and Bob's stores holding the same ready block (same key IDs)."""
    block = uuid.uuid4()
    with KeyStore(tmp_path / "alice.db") as alice, KeyStore(tmp_path / "bob.db") as bob:
        alice.add_block(block, "bob", material, "ready", {})
        bob.add_block(block, "alice", material, "ready", {})
        yield alice, bob


@asynccontextmanager
async def kme(pki: Pki, store: KeyStore, role: Role) -> AsyncIterator[Etsi014Server]:
    local, remote = ("sae-a", "sae-b") if role == "alice" else ("sae-b", "sae-a")
    section = Etsi014Section(
        listen="127.0.0.1:0",
        cert_file=str(pki.server.cert),
        key_file=str(pki.server.key),
        ca_file=str(pki.ca_cert),
        local_sae=local,
        remote_sae=remote,
    )
    async with Etsi014Server(
        section,
        store,
        node_id=f"kme-{role}",
        peer_node_id="kme-bob" if role == "alice" else "kme-alice",
        key_size_bits=8 * KEY_BYTES,
        role=role,
        max_key_per_request=MAX_PER_REQUEST,
    ) as server:
        yield server


@asynccontextmanager
async def sae(
    trust: Pki, issuer: Pki | None = None, name: str | None = None
) -> AsyncIterator[aiohttp.ClientSession]:
    """An SAE's HTTPS client: trusts ``trust``'s CA, shows ``issuer``'s certificate for ``name``."""
    ctx = ssl.create_default_context(cafile=str(trust.ca_cert))
    if name is not None:
        pair = (issuer or trust).client(name)
        ctx.load_cert_chain(pair.cert, pair.key)
    connector = aiohttp.TCPConnector(ssl=ctx)
    async with aiohttp.ClientSession(connector=connector, timeout=T) as session:
        yield session


async def call(
    session: aiohttp.ClientSession,
    server: Etsi014Server,
    method: str,
    path: str,
    **kwargs: Any,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with session.request(method, server.url + "/api/v1/keys/" + path, **kwargs) as r:
        body = await r.json(content_type=None)
        return r.status, body, r


def b64(material: bytes) -> str:
    return base64.b64encode(material).decode()


def assert_no_key_bytes(text: str, material: list[bytes]) -> None:
    for m in material:
        for form in (b64(m), m.hex(), repr(m)):
            assert form not in text


def assert_error(body: Any, *words: str) -> None:
    """The spec's Error container, its message naming the problem."""
    assert isinstance(body, dict) and set(body) <= {"message", "details"}
    assert isinstance(body["message"], str)
    for word in words:
        assert word in body["message"], body
    if "details" in body:
        assert isinstance(body["details"], list)
        assert all(isinstance(d, dict) for d in body["details"])


# -- the key store's all-or-nothing takes ---------------------------------------------
def test_take_ids_is_all_or_nothing(tmp_path: Path) -> None:
    material = [os.urandom(KEY_BYTES) for _ in range(4)]
    with KeyStore(tmp_path / "keys.db") as store:
        ready = store.add_block(uuid.uuid4(), "alice", material, "ready", {})
        pending = store.add_block(uuid.uuid4(), "alice", [os.urandom(KEY_BYTES)], "pending", {})
        unknown = uuid.uuid4()

        with pytest.raises(KeysUnavailableError) as caught:
            store.take_ids([ready[0], unknown, pending[0]])
        err = caught.value
        assert err.missing == (unknown,) and err.pending == (pending[0],)
        assert str(unknown) in str(err) and str(pending[0]) in str(err)
        assert_no_key_bytes(str(err), material)
        assert store.ready_count() == (4, 4 * 8 * KEY_BYTES)  # nothing changed

        with pytest.raises(KeyStoreError, match="twice"):
            store.take_ids([ready[1], ready[1]])

        got = store.take_ids([ready[2], ready[0]])  # the order asked for
        assert [k.key_id for k in got] == [ready[2], ready[0]]
        assert [k.material for k in got] == [material[2], material[0]]
        assert store.ready_count()[0] == 2
        # Being delivered counts as gone: a second take of the same ID fails.
        with pytest.raises(KeysUnavailableError) as again:
            store.take_ids([ready[0], ready[1]])
        assert again.value.missing == (ready[0],)
        store.delivered([ready[0], ready[2]])
        assert store.ready_ids() == sorted([ready[1], ready[3]])


def test_take_exactly_is_all_or_nothing(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "keys.db") as store:
        ids = store.add_block(uuid.uuid4(), "bob", [os.urandom(8) for _ in range(3)], "ready", {})
        with pytest.raises(KeysUnavailableError, match="4 keys asked for, 3 ready") as caught:
            store.take_exactly(4)
        assert caught.value.ready == 3
        assert store.ready_count()[0] == 3
        assert [k.key_id for k in store.take_exactly(2)] == ids[:2]  # oldest first
        with pytest.raises(ValueError, match="at least 1"):
            store.take_exactly(0)


# -- the API ---------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_status_has_the_spec_fields(
    pki: Pki, stores: tuple[KeyStore, KeyStore], material: list[bytes]
) -> None:
    alice, _bob = stores
    async with kme(pki, alice, "alice") as server, sae(pki, name="sae-a") as master:
        status, body, _ = await call(master, server, "GET", "sae-b/status")
    assert status == 200
    assert set(body) == STATUS_FIELDS
    assert body == {
        "source_KME_ID": "kme-alice",
        "target_KME_ID": "kme-bob",
        "master_SAE_ID": "sae-a",
        "slave_SAE_ID": "sae-b",
        "key_size": 256,
        "stored_key_count": len(material),
        "max_key_count": body["max_key_count"],
        "max_key_per_request": MAX_PER_REQUEST,
        "max_key_size": 256,
        "min_key_size": 256,
        "max_SAE_ID_count": 0,
    }
    assert body["max_key_count"] >= body["stored_key_count"]


@pytest.mark.asyncio
async def test_master_and_slave_get_the_same_keys_once(
    pki: Pki,
    stores: tuple[KeyStore, KeyStore],
    material: list[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice, bob = stores
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        async with (
            kme(pki, alice, "alice") as a,
            kme(pki, bob, "bob") as b,
            sae(pki, name="sae-a") as master,
            sae(pki, name="sae-b") as slave,
        ):
            # Master: POST with a Key request, GET with parameters, GET with defaults.
            s1, c1, r1 = await call(master, a, "POST", "sae-b/enc_keys", json={"number": 3})
            s2, c2, _ = await call(master, a, "GET", "sae-b/enc_keys?number=2&size=256")
            s3, c3, _ = await call(master, a, "GET", "sae-b/enc_keys")
            assert (s1, s2, s3) == (200, 200, 200)
            assert r1.content_type == "application/json"
            got = c1["keys"] + c2["keys"] + c3["keys"]
            assert [len(c["keys"]) for c in (c1, c2, c3)] == [3, 2, 1]
            assert all(set(k) == {"key_ID", "key"} for k in got)
            assert {base64.b64decode(k["key"]) for k in got} == set(material)
            assert alice.ready_count()[0] == 0

            # Slave: the same bytes by ID, POST for several and GET for one.
            ids = [k["key_ID"] for k in got]
            body = {"key_IDs": [{"key_ID": i} for i in ids[:5]]}
            s4, c4, _ = await call(slave, b, "POST", "sae-a/dec_keys", json=body)
            s5, c5, _ = await call(slave, b, "GET", f"sae-a/dec_keys?key_ID={ids[5]}")
            assert (s4, s5) == (200, 200)
            assert c4["keys"] + c5["keys"] == got  # same IDs, same bytes, same order

            # Once only: asking again names the key and gives nothing.
            s6, c6, _ = await call(slave, b, "GET", f"sae-a/dec_keys?key_ID={ids[0]}")
            assert s6 == 400
            assert_error(c6, "not found", ids[0])
            assert bob.ready_count()[0] == 0
            with pytest.raises(KeysUnavailableError):
                bob.take_ids([uuid.UUID(ids[0])])

            assert a.counters.keys_delivered == 6 and b.counters.keys_delivered == 6
            assert b.counters.telemetry()["etsi014_rejected_400"] == 1

    delivered = [e for e in logs if e["event"] == "key delivered"]
    assert len(delivered) == 5  # one event a reply
    assert sorted(i for e in delivered for i in e["key_ids"]) == sorted(ids + ids)
    assert {e["interface"] for e in delivered} == {"etsi014"}
    assert [e["consumer"] for e in delivered] == ["sae-a"] * 3 + ["sae-b"] * 2
    assert_no_key_bytes(repr(logs) + caplog.text, material)


@pytest.mark.asyncio
async def test_delivered_bytes_are_overwritten_on_disk(pki: Pki, tmp_path: Path) -> None:
    material = [os.urandom(KEY_BYTES) for _ in range(4)]
    path = tmp_path / "alice.db"
    with KeyStore(path) as alice:
        alice.add_block(uuid.uuid4(), "bob", material, "ready", {})
        async with kme(pki, alice, "alice") as a, sae(pki, name="sae-a") as master:
            status, body, _ = await call(master, a, "POST", "sae-b/enc_keys", json={"number": 2})
        assert status == 200
    # After close: the store has checkpointed its WAL into the file.
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("alice.db*"))  # noqa: ASYNC240
    sent = {base64.b64decode(k["key"]) for k in body["keys"]}
    for m in material:
        assert (m in on_disk) is (m not in sent)  # the kept ones prove the scan works


@pytest.mark.asyncio
async def test_wrong_identity_or_link_is_401(
    pki: Pki, stores: tuple[KeyStore, KeyStore], caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = stores
    with capture_logs() as logs:
        async with (
            kme(pki, alice, "alice") as a,
            kme(pki, bob, "bob") as b,
            sae(pki, name="intruder") as intruder,
            sae(pki, name="sae-b") as slave,
            sae(pki, name="sae-a") as master,
        ):
            refused = [
                # A certificate from the right CA, but not this node's SAE.
                (intruder, a, "GET", "sae-b/status", "'intruder' is not served"),
                (intruder, a, "POST", "sae-b/enc_keys", "'intruder' is not served"),
                (intruder, a, "GET", "sae-b/nowhere", "'intruder' is not served"),
                (slave, a, "GET", "sae-b/enc_keys", "'sae-b' is not served"),
                # The right SAE, the wrong peer or the wrong side of the link.
                (master, a, "GET", "sae-x/enc_keys", "no key link to SAE 'sae-x'"),
                (master, a, "POST", "sae-b/dec_keys", "is the master at this KME"),
                (slave, b, "GET", "sae-a/enc_keys", "is the slave at this KME"),
                (slave, b, "GET", "sae-a/status", "is the slave at this KME"),
            ]
            for session, server, method, path, words in refused:
                status, body, _ = await call(session, server, method, path, json={})
                assert status == 401, (path, body)
                assert_error(body, words)
            # Outside the API, for the right SAE: the router's codes, still an Error container.
            status, body, _ = await call(master, a, "GET", "sae-b/nowhere")
            assert status == 404
            assert_error(body, "Not Found")
            status, body, resp = await call(master, a, "DELETE", "sae-b/enc_keys")
            assert status == 405 and "POST" in resp.headers["Allow"]

            assert alice.ready_count()[0] == bob.ready_count()[0] == 6  # nothing taken
            assert a.counters.rejected(401) == 6 and b.counters.rejected(401) == 2
            assert a.counters.telemetry()["etsi014_rejected_other"] == 2
    refusals = [e for e in logs if e["event"] == "etsi014 request refused"]
    assert len(refusals) == 8
    assert {e["log_level"] for e in refusals} == {"warning"}
    assert {e["client_sae"] for e in refusals} == {"intruder", "sae-a", "sae-b"}


@pytest.mark.asyncio
async def test_tls_needs_a_client_certificate_from_the_ca(
    pki: Pki, foreign_pki: Pki, stores: tuple[KeyStore, KeyStore]
) -> None:
    alice, _bob = stores
    async with kme(pki, alice, "alice") as a:
        # Right CN, wrong CA; then no client certificate at all.
        for session_cm in (sae(pki, foreign_pki, "sae-a"), sae(pki)):
            async with session_cm as session:
                with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
                    await call(session, a, "GET", "sae-b/status")
        # Over TLS 1.2 the refusal is visibly the handshake itself (TLS 1.3 clients
        # finish first and learn of it on their first read, as above).
        for pair in (foreign_pki.client("sae-a"), None):
            ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            if pair is not None:
                ctx.load_cert_chain(pair.cert, pair.key)
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.open_connection("127.0.0.1", a.port, ssl=ctx)
        assert a.counters.requests == 0  # refused in the handshake, before HTTP
        async with sae(pki, name="sae-a") as master:  # the server still serves
            assert (await call(master, a, "GET", "sae-b/status"))[0] == 200


BAD_ENC: list[tuple[str, str, Any, str]] = [
    ("GET", "?number=0", None, "number: 0 is outside 1..8"),
    ("GET", "?number=9", None, "max_key_per_request"),
    ("GET", "?number=abc", None, "'abc' is not a positive decimal integer"),
    ("GET", "?number=-1", None, "number: '-1'"),
    ("GET", "?size=128", None, "size: 128 bits is not supported; this KME delivers 256"),
    ("GET", "?number=1&number=2", None, "number: given more than once"),
    ("GET", "?count=2", None, "count: unknown parameter"),
    ("POST", "", b"{not json", "not valid JSON"),
    ("POST", "", b"", "POST needs a JSON body"),
    ("POST", "", b"[1, 2]", "must be a JSON object, not an array"),
    ("POST", "", b'{"number": 1, "number": 2}', "'number' given twice"),
    ("POST", "", b'{"number": NaN}', "NaN is not JSON"),
    ("POST", "", b"[" * 5000 + b"]" * 5000, "nests too deeply"),
    ("POST", "", {"number": "2"}, "number: must be an integer, got a string"),
    ("POST", "", {"number": True}, "number: must be an integer, got a boolean"),
    ("POST", "", {"number": 2.5}, "number: must be an integer"),
    ("POST", "", {"number": 100}, "number: 100 is outside 1..8"),
    ("POST", "", {"size": 512}, "size: 512 bits is not supported"),
    ("POST", "", {"numbre": 2}, "numbre: unknown field"),
    ("POST", "", {"additional_slave_SAE_IDs": ["sae-c"]}, "multicast is not supported"),
    ("POST", "", {"additional_slave_SAE_IDs": "sae-c"}, "must be an array of strings"),
    ("POST", "", {"extension_mandatory": [{"route": "direct"}]}, "unsupported extensions: route"),
    ("POST", "", {"extension_optional": "x"}, "extension_optional: must be an array of objects"),
    ("POST", "?number=2", {}, "number: unknown parameter"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("method", "query", "body", "words"), BAD_ENC)
async def test_malformed_enc_keys_is_400(
    pki: Pki,
    stores: tuple[KeyStore, KeyStore],
    method: str,
    query: str,
    body: Any,
    words: str,
) -> None:
    alice, _bob = stores
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with kme(pki, alice, "alice") as a, sae(pki, name="sae-a") as master:
        status, reply, _ = await call(master, a, method, "sae-b/enc_keys" + query, **kwargs)
    assert status == 400
    assert_error(reply, words)
    assert alice.ready_count()[0] == 6  # nothing taken


KNOWN = "6f1c9c1e-4a57-4b5e-9a36-0c3f1b8f7d10"
BAD_DEC: list[tuple[str, str, Any, str]] = [
    ("GET", "", None, "key_ID: missing"),
    ("GET", "?key_ID=12345", None, "'12345' is not a UUID"),
    ("GET", f"?key_ID={KNOWN}&key_ID={KNOWN}", None, "given more than once"),
    ("GET", f"?key_ID={{{KNOWN}}}", None, "is not a UUID"),  # braces: not the canonical form
    ("POST", "", {}, "key_IDs: must be a non-empty array"),
    ("POST", "", {"key_IDs": []}, "key_IDs: must be a non-empty array"),
    ("POST", "", {"key_IDs": [KNOWN]}, "key_IDs[0]: must be an object with a key_ID string"),
    ("POST", "", {"key_IDs": [{"key_ID": "nope"}]}, "key_IDs[0]: 'nope' is not a UUID"),
    ("POST", "", {"key_IDs": [{"key_ID": KNOWN}] * 2}, f"key_IDs[1]: {KNOWN} is asked for twice"),
    ("POST", "", {"key_IDs": [{"key_ID": KNOWN, "x": 1}]}, "key_IDs[0]: unknown fields x"),
    ("POST", "", {"key_IDs": [{"key_ID": KNOWN}], "extra": 1}, "extra: unknown field"),
    (
        "POST",
        "",
        {"key_IDs": [{"key_ID": str(uuid.uuid4())} for _ in range(9)]},
        "9 IDs; at most 8 per request",
    ),
    (
        "POST",
        "",
        {"key_IDs": [{"key_ID": KNOWN}]},
        f"not found (unknown or already delivered): {KNOWN}",
    ),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("method", "query", "body", "words"), BAD_DEC)
async def test_malformed_dec_keys_is_400(
    pki: Pki,
    stores: tuple[KeyStore, KeyStore],
    method: str,
    query: str,
    body: Any,
    words: str,
) -> None:
    _alice, bob = stores
    async with kme(pki, bob, "bob") as b, sae(pki, name="sae-b") as slave:
        status, reply, _ = await call(slave, b, method, "sae-a/dec_keys" + query, json=body)
    assert status == 400
    assert_error(reply, words)
    assert bob.ready_count()[0] == 6


@pytest.mark.asyncio
async def test_an_oversized_body_is_400(pki: Pki, stores: tuple[KeyStore, KeyStore]) -> None:
    alice, _bob = stores
    padding = {"extension_optional": [{"pad": "x" * 100_000}]}
    async with kme(pki, alice, "alice") as a, sae(pki, name="sae-a") as master:
        status, reply, _ = await call(master, a, "POST", "sae-b/enc_keys", json=padding)
    assert status == 400
    assert_error(reply, "request body exceeds")


@pytest.mark.asyncio
async def test_too_few_keys_is_503_and_takes_nothing(
    pki: Pki, tmp_path: Path, material: list[bytes]
) -> None:
    block = uuid.uuid4()
    with KeyStore(tmp_path / "alice.db") as alice, KeyStore(tmp_path / "bob.db") as bob:
        async with (
            kme(pki, alice, "alice") as a,
            kme(pki, bob, "bob") as b,
            sae(pki, name="sae-a") as master,
            sae(pki, name="sae-b") as slave,
        ):
            status, body, resp = await call(master, a, "GET", "sae-b/enc_keys")
            assert status == 503
            assert_error(body, "1 keys requested, 0 stored")
            assert resp.headers["Retry-After"] == "1"

            alice.add_block(block, "bob", material, "ready", {})
            bob.add_block(block, "alice", material, "pending", {})  # Bob has not committed yet
            status, body, _ = await call(master, a, "POST", "sae-b/enc_keys", json={"number": 7})
            assert status == 503
            assert_error(body, "7 keys requested, 6 stored")
            assert alice.ready_count()[0] == 6  # a partial set is never handed out

            status, body, _ = await call(master, a, "POST", "sae-b/enc_keys", json={"number": 2})
            assert status == 200
            ids = [k["key_ID"] for k in body["keys"]]
            request = {"key_IDs": [{"key_ID": i} for i in ids]}
            status, pending, resp = await call(slave, b, "POST", "sae-a/dec_keys", json=request)
            assert status == 503  # committed at Alice, not yet at Bob: retry, not an error
            assert_error(pending, "not yet committed", ids[0])
            assert resp.headers["Retry-After"] == "1"

            bob.commit_block(block)
            status, got, _ = await call(slave, b, "POST", "sae-a/dec_keys", json=request)
            assert status == 200 and got == body
            assert a.counters.rejected(503) == 2 and b.counters.rejected(503) == 1


@pytest.mark.asyncio
async def test_a_lost_reply_destroys_its_keys(
    pki: Pki,
    stores: tuple[KeyStore, KeyStore],
    material: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice, _bob = stores

    async def broken_write_eof(self: web.StreamResponse, data: bytes = b"") -> None:
        raise ConnectionResetError("the SAE went away")

    with capture_logs() as logs:
        async with kme(pki, alice, "alice") as a, sae(pki, name="sae-a") as master:
            monkeypatch.setattr(web.Response, "write_eof", broken_write_eof)
            with pytest.raises(aiohttp.ClientError):
                await call(master, a, "POST", "sae-b/enc_keys", json={"number": 2})
            monkeypatch.undo()
            # At most once: the two keys are gone, never offered again.
            assert alice.ready_count()[0] == 4
            assert a.counters.keys_destroyed == 2 and a.counters.keys_delivered == 0
            assert a.counters.replies_lost == 1
            status, body, _ = await call(master, a, "POST", "sae-b/enc_keys", json={"number": 4})
            assert status == 200
    destroyed = [e for e in logs if e["event"] == "etsi014 keys destroyed undelivered"]
    assert len(destroyed) == 1 and len(destroyed[0]["key_ids"]) == 2
    assert not set(destroyed[0]["key_ids"]) & {k["key_ID"] for k in body["keys"]}
    assert [len(e["key_ids"]) for e in logs if e["event"] == "key delivered"] == [4]
    assert_no_key_bytes(repr(logs) + caplog.text, material)


@pytest.mark.asyncio
async def test_the_server_is_not_reentrant_and_restarts(
    pki: Pki, stores: tuple[KeyStore, KeyStore]
) -> None:
    alice, _bob = stores
    async with kme(pki, alice, "alice") as a:
        with pytest.raises(RuntimeError, match="not reentrant"):
            await a.__aenter__()
    with pytest.raises(RuntimeError, match="not running"):
        _ = a.port
    async with a, sae(pki, name="sae-a") as master:  # reusable after a clean exit
        assert (await call(master, a, "GET", "sae-b/status"))[0] == 200
