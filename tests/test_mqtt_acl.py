"""The production broker config and ACL against a real Mosquitto: who gets what.

The broker runs ``qnoded/data/mosquitto-prod.conf`` with
``qnoded/data/mosquitto-acl.conf`` as deployed; :class:`MosquittoBroker`
changes only the listener, the TLS and ACL paths and the log destination.
Certificates come from ``pki.py``; the CN is the identity.  Every client speaks
MQTT v5, so a refused PUBLISH at QoS 1 shows as PUBACK reason code 135.

Mosquitto 2.0.11 behaviours these tests pin down (the ACL file explains them):

- its acl_file plugin grants every SUBSCRIBE (the SUBACK carries the granted
  QoS, never 135) and applies the read rules to each message at delivery, so
  "refused" for a reader means "receives nothing";
- PUBACK 0 means accepted *and some subscription matched*, even one whose
  reader the ACL then refuses; PUBACK 16 (no matching subscribers) is
  success too.

"Receives nothing" is shown without sleeping: see :meth:`Peer.drain`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import aiomqtt
import pki as pki_mod
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pki import CertPair, Pki, make_pki

from qnoded.broker import (
    BrokerError,
    MosquittoBroker,
    TlsFiles,
    render_prod_config,
    set_directives,
)
from qnoded.commands import CommandDesk, rotate_log_level
from qnoded.mqtt import MqttSettings, TelemetryPublisher

T = 5.0  # s, bound on every round trip of a client that should succeed
OK = 0
NO_SUBSCRIBERS = 16
NOT_AUTHORISED = 135
GRANTED_QOS1 = 1
ACCEPTED = {OK, NO_SUBSCRIBERS}
NAMES = ["alice", "bob", "keys-alice", "keys-bob", "monitor", "operator", "mallory"]
SLASH_CN = "bob/keys"  # a CN that, substituted into a %u pattern, lands in bob's key topics
ALICE_KEY = "qkd/v1/alice/keys/bob"
BOB_KEY = "qkd/v1/bob/keys/alice"
# MQTT 3.1.1 CONNECT (clean session, keepalive 60 s, empty client id).
MQTT_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
DUMMY_PASSWORD = "ignored"  # noqa: S105  # not a secret: the broker checks certificates only


def secret() -> bytes:
    """A payload of the test's own, so a message cannot be mistaken for another."""
    return os.urandom(16).hex().encode()


class Got(NamedTuple):
    topic: str
    payload: bytes
    retain: bool


class Peer:
    """An MQTT v5 client holding one certificate, which returns reason codes.

    aiomqtt 2.x returns the SUBACK's reason codes from ``subscribe`` but drops
    the PUBACK's; paho 2.x hands it to ``on_publish``, which we wrap.
    """

    def __init__(
        self,
        broker: MosquittoBroker,
        pki: Pki,
        name: str | None,
        *,
        cert: CertPair | None = None,
        timeout: float = T,
        **kwargs: Any,
    ) -> None:
        pair = cert or (pki.client(name) if name else None)
        tls = aiomqtt.TLSParameters(
            ca_certs=str(pki.ca_cert),
            certfile=str(pair.cert) if pair else None,
            keyfile=str(pair.key) if pair else None,
        )
        self.mqtt = aiomqtt.Client(
            broker.host,
            broker.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_params=tls,
            timeout=timeout,
            **kwargs,
        )
        self._acks: list[int] = []
        self._fences = 0

    async def __aenter__(self) -> Self:
        await self.mqtt.__aenter__()
        paho = self.mqtt._client
        forward: Callable[..., None] | None = paho.on_publish

        def on_publish(
            client: Any, userdata: Any, mid: int, reason: ReasonCode, props: Properties
        ) -> None:
            self._acks.append(reason.value)
            if forward is not None:
                forward(client, userdata, mid, reason, props)

        paho.on_publish = on_publish
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.mqtt.__aexit__(exc_type, exc, tb)

    async def subscribe(self, *filters: str) -> list[int]:
        """Subscribe at QoS 1; the SUBACK's reason code for each filter."""
        codes: list[int] = []
        for topic_filter in filters:
            result = await self.mqtt.subscribe(topic_filter, qos=1)
            codes += [rc.value if isinstance(rc, ReasonCode) else rc for rc in result]
        return codes

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1 (as keys are); the PUBACK's reason code."""
        self._acks.clear()
        await self.mqtt.publish(topic, payload, qos=1, retain=retain)
        (code,) = self._acks
        return code

    async def drain(self) -> list[Got]:
        """Every message the broker had sent us when this was called.

        The fence is a SUBSCRIBE round trip: Mosquitto writes its SUBACK to
        this connection after anything it routed to us before, and paho queues
        those messages before it sees the SUBACK.  A publisher has had its
        PUBACK, which Mosquitto sends only once it has routed the message, so
        what has not arrived now never will.  (Mosquitto sends at most 20 QoS 1
        messages in flight and queues the rest; these tests stay far below.)
        """
        self._fences += 1
        await self.mqtt.subscribe(f"fence/{id(self)}/{self._fences}", qos=1)
        got = []
        for _ in range(len(self.mqtt.messages)):
            message = await anext(self.mqtt.messages)
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            got.append(Got(str(message.topic), bytes(payload), bool(message.retain)))
        return got


def tls_files(pki: Pki) -> TlsFiles:
    return TlsFiles(pki.ca_cert, pki.server.cert, pki.server.key)


def issue(pki: Pki, directory: Path, stem: str, cn: str) -> CertPair:
    """A client certificate for a CN that make_pki cannot name a file after."""
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    return pki_mod._issue(directory, stem, cn, ca.subject, ca_key, server=False)


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki")


@pytest.fixture(scope="module")
def pki(pki_dir: Path) -> Pki:
    return make_pki(pki_dir, NAMES)


@pytest.fixture(scope="module")
def slash_cert(pki: Pki, pki_dir: Path) -> CertPair:
    return issue(pki, pki_dir, "client-slash", SLASH_CN)


@pytest.fixture(scope="module")
def broker(pki: Pki) -> Iterator[MosquittoBroker]:
    """One production broker for the module; no test leaves a retained message."""
    with MosquittoBroker(tls=tls_files(pki)) as b:
        yield b


# -- the rendered config -------------------------------------------------------
def test_prod_config_changes_only_host_specific_lines(pki: Pki, tmp_path: Path) -> None:
    template = resources.files("qnoded").joinpath("data/mosquitto-prod.conf").read_text()
    acl = tmp_path / "acl.conf"
    text = render_prod_config(
        "127.0.0.1", 8883, tmp_path, tls=tls_files(pki), acl_file=acl, as_root=True
    )

    def active(conf: str) -> set[str]:
        return {line for line in conf.splitlines() if line and not line.startswith("#")}

    assert active(template) - active(text) == {
        "listener 8883",
        "cafile /etc/mosquitto/certs/qnoded-ca.crt",
        "certfile /etc/mosquitto/certs/server.crt",
        "keyfile /etc/mosquitto/certs/server.key",
        "acl_file /etc/mosquitto/qnoded-acl.conf",
        "log_dest file /var/log/mosquitto/mosquitto.log",
    }
    assert active(text) - active(template) == {
        "listener 8883 127.0.0.1",
        f"cafile {pki.ca_cert.resolve()}",
        f"certfile {pki.server.cert.resolve()}",
        f"keyfile {pki.server.key.resolve()}",
        f"acl_file {acl.resolve()}",
        f"log_dest file {tmp_path.resolve() / 'mosquitto.log'}",
        "user root",  # FACTS.md: as root, Mosquitto would drop to `mosquitto`
    }
    for line in (
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "persistence false",
    ):
        assert line in active(text)
    with pytest.raises(BrokerError, match="cafile"):
        set_directives("listener 1883\n", {"cafile": "/x"})
    with pytest.raises(ValueError, match="acl_file needs tls"):
        MosquittoBroker(acl_file=acl)


# -- who connects --------------------------------------------------------------
def tls_refusal(broker: MosquittoBroker, pki: Pki, cert: CertPair | None) -> str:
    """The TLS alert with which the broker refuses a client holding ``cert``.

    Under TLS 1.3 the client's handshake completes before the broker has
    checked the client's certificate; the verdict is the first thing to read.
    (Sending first would race: data arriving after the broker closed draws a
    reset, which can overtake the alert.)
    """
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    with (
        socket.create_connection(broker.address, timeout=T) as raw,
        ctx.wrap_socket(raw, server_hostname=broker.host) as tls,
    ):
        try:
            reply = tls.recv(4)
        except ssl.SSLError as exc:
            return str(exc.reason)
    return f"no alert but {reply!r}"


def test_only_certificates_from_our_ca_get_through_tls(
    broker: MosquittoBroker, pki: Pki, tmp_path: Path
) -> None:
    rogue = make_pki(tmp_path, ["alice"], ca_name="rogue CA")
    assert tls_refusal(broker, pki, rogue.client("alice")) == "TLSV1_ALERT_UNKNOWN_CA"
    assert tls_refusal(broker, pki, None) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    with socket.create_connection(broker.address, timeout=T) as plain:
        plain.sendall(MQTT_CONNECT)  # MQTT without TLS
        try:
            reply = plain.recv(4)
        except ConnectionResetError:
            reply = b""
        assert reply[:1] != b"\x20", reply  # whatever comes back, no CONNACK


@pytest.mark.asyncio
async def test_aiomqtt_clients_without_our_certificate_cannot_connect(
    broker: MosquittoBroker, pki: Pki, tmp_path: Path
) -> None:
    rogue = make_pki(tmp_path, ["alice"], ca_name="rogue CA")

    # aiomqtt 2.5 logs the TLS alert and then waits out its timeout instead of
    # failing at once: keep it short and try all three together.
    async def refused(**kwargs: Any) -> None:
        with pytest.raises(aiomqtt.MqttError):
            async with Peer(broker, pki, None, timeout=1.0, **kwargs) as peer:
                await peer.publish("qkd/v1/alice/status", b"{}")

    async with asyncio.TaskGroup() as tg:
        tg.create_task(refused(cert=rogue.client("alice")))  # CN alice, wrong CA
        tg.create_task(refused())  # no certificate at all
        # A username and password do not replace the certificate.
        tg.create_task(refused(username="alice", password=DUMMY_PASSWORD))


@pytest.mark.asyncio
async def test_the_certificate_not_the_connect_username_is_the_identity(
    broker: MosquittoBroker, pki: Pki
) -> None:
    async with Peer(broker, pki, "alice", username="operator", password=DUMMY_PASSWORD) as alice:
        assert await alice.publish("qkd/v1/alice/cmd/reboot", b"{}") == NOT_AUTHORISED
        assert await alice.publish("qkd/v1/alice/status", b"{}") in ACCEPTED


# -- keys ----------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_key_reaches_its_own_consumer_and_no_other(
    broker: MosquittoBroker, pki: Pki
) -> None:
    key, fence = secret(), secret()
    async with (
        Peer(broker, pki, "alice") as alice,
        Peer(broker, pki, "bob") as bob,
        Peer(broker, pki, "keys-alice") as consumer,
        Peer(broker, pki, "keys-bob") as thief,
    ):
        assert await consumer.subscribe("qkd/v1/alice/keys/#") == [GRANTED_QOS1]
        # Mosquitto 2.0 grants the subscription; the ACL bites at delivery.
        assert await thief.subscribe("qkd/v1/alice/keys/#", "#") == [GRANTED_QOS1] * 2
        assert await alice.publish(ALICE_KEY, key) == OK
        assert await bob.publish(BOB_KEY, fence) == OK  # keys-bob may read this one

        assert await consumer.drain() == [Got(ALICE_KEY, key, retain=False)]
        assert await thief.drain() == [Got(BOB_KEY, fence, retain=False)]


@pytest.mark.asyncio
async def test_a_node_publishes_only_its_own_topics_and_never_commands(
    broker: MosquittoBroker, pki: Pki
) -> None:
    async with Peer(broker, pki, "alice") as alice:
        for leaf in ("status", "telemetry", "alarms", "keys/bob", "cmd/reboot/result"):
            assert await alice.publish(f"qkd/v1/alice/{leaf}", b"{}") in ACCEPTED, leaf
        for topic in (
            "qkd/v1/alice/cmd/reboot",  # commands come from the operator only
            "qkd/v1/alice/keys/bob/x",  # key topics are keys/<peer_id>, one level
            "qkd/v1/alice/other",  # no topic the ACL does not list
            "qkd/v1/bob/keys/alice",  # nor anything of another node
            "qkd/v1/bob/status",
            "qkd/v1/bob/cmd/reboot/result",
            "qkd/v1/alice",
            "alice/anything",
        ):
            assert await alice.publish(topic, b"{}") == NOT_AUTHORISED, topic


@pytest.mark.asyncio
async def test_a_key_consumer_cannot_publish_anything(broker: MosquittoBroker, pki: Pki) -> None:
    forged = secret()
    async with (
        Peer(broker, pki, "keys-alice") as consumer,
        Peer(broker, pki, "keys-alice") as other_consumer,
    ):
        assert await other_consumer.subscribe("qkd/v1/alice/keys/#") == [GRANTED_QOS1]
        assert await consumer.publish(ALICE_KEY, forged) == NOT_AUTHORISED
        assert await consumer.publish("qkd/v1/alice/status", b"{}") == NOT_AUTHORISED
        assert await consumer.publish("qkd/v1/keys-alice/status", b"{}") == NOT_AUTHORISED
        assert await other_consumer.drain() == []


@pytest.mark.asyncio
async def test_a_late_subscriber_gets_no_earlier_key(broker: MosquittoBroker, pki: Pki) -> None:
    early, late = secret(), secret()
    async with Peer(broker, pki, "alice") as alice:
        assert await alice.publish(ALICE_KEY, early) == NO_SUBSCRIBERS
        async with Peer(broker, pki, "keys-alice") as consumer:
            await consumer.subscribe("qkd/v1/alice/keys/#")
            assert await alice.publish(ALICE_KEY, late) == OK
            assert await consumer.drain() == [Got(ALICE_KEY, late, retain=False)]


# -- dashboards and commands ---------------------------------------------------
@pytest.mark.parametrize("name", ["monitor", "operator"])
@pytest.mark.asyncio
async def test_dashboards_read_health_never_keys(
    broker: MosquittoBroker, pki: Pki, name: str
) -> None:
    key, telemetry, alarm = secret(), secret(), secret()
    async with Peer(broker, pki, "alice") as alice, Peer(broker, pki, name) as dashboard:
        codes = await dashboard.subscribe(
            "qkd/v1/+/telemetry", "qkd/v1/+/alarms", "qkd/v1/+/keys/#", "#"
        )
        assert codes == [GRANTED_QOS1] * 4  # granted, and yet...
        # PUBACK 0: the dashboard's `#` matched, although it may not read keys.
        assert await alice.publish(ALICE_KEY, key) == OK
        assert await alice.publish("qkd/v1/alice/telemetry", telemetry) == OK
        assert await alice.publish("qkd/v1/alice/alarms", alarm) == OK
        # Health messages (once per matching subscription), never the key.
        assert {g.payload for g in await dashboard.drain()} == {telemetry, alarm}
        assert await dashboard.publish("qkd/v1/alice/keys/bob", secret()) == NOT_AUTHORISED
        assert await dashboard.publish("qkd/v1/alice/status", b"{}") == NOT_AUTHORISED


@pytest.mark.asyncio
async def test_only_the_operator_commands_and_reads_results(
    broker: MosquittoBroker, pki: Pki
) -> None:
    command, result = b'{"cmd": "reboot", "n": 1}', secret()
    async with (
        Peer(broker, pki, "alice") as alice,
        Peer(broker, pki, "bob") as bob,
        Peer(broker, pki, "operator") as operator,
        Peer(broker, pki, "monitor") as monitor,
    ):
        await alice.subscribe("qkd/v1/alice/cmd/#")
        await operator.subscribe("qkd/v1/+/cmd/+/result")
        await monitor.subscribe("qkd/v1/+/cmd/#")
        assert await monitor.publish("qkd/v1/alice/cmd/reboot", b"{}") == NOT_AUTHORISED
        assert await bob.publish("qkd/v1/alice/cmd/reboot", b"{}") == NOT_AUTHORISED
        assert await operator.publish("qkd/v1/alice/cmd/reboot", command) == OK
        assert await alice.drain() == [Got("qkd/v1/alice/cmd/reboot", command, retain=False)]

        assert await alice.publish("qkd/v1/alice/cmd/reboot/result", result) == OK
        assert await operator.drain() == [
            Got("qkd/v1/alice/cmd/reboot/result", result, retain=False)
        ]
        assert await monitor.drain() == []  # neither commands nor results
        assert await alice.drain() == []  # a node does not read its own results


@pytest.mark.asyncio
async def test_a_node_runs_the_operators_command_and_never_sees_the_monitors(
    pki: Pki, restore_logging: None
) -> None:
    """The node's own command path (TelemetryPublisher + CommandDesk) behind the
    production broker, as the certificate ``alice``."""
    alice = pki.client("alice")
    audit_logger = logging.getLogger("qnoded.audit")
    audit_level = audit_logger.level
    # A broker of its own: the node leaves a retained status, which the module's
    # broker must not carry into other tests.
    async with MosquittoBroker(tls=tls_files(pki)) as broker:
        settings = MqttSettings(
            broker.host,
            broker.port,
            tls_ca=str(pki.ca_cert),
            tls_cert=str(alice.cert),
            tls_key=str(alice.key),
        )
        try:
            async with (
                TelemetryPublisher(settings, "alice") as pub,
                asyncio.TaskGroup() as tg,
                Peer(broker, pki, "operator") as operator,
                Peer(broker, pki, "monitor") as monitor,
            ):
                desk = CommandDesk(
                    "alice", {"rotate-log-level": rotate_log_level}, pub.publish_result
                )
                worker = tg.create_task(desk.run(), name="commands")
                pub.attach_commands(desk.offer)
                await asyncio.wait_for(pub.idle.wait(), T)  # subscribed to cmd/+
                await operator.subscribe("qkd/v1/alice/cmd/+/result")
                await monitor.subscribe("qkd/v1/+/cmd/#")
                command = "qkd/v1/alice/cmd/rotate-log-level"
                forged = b'{"id": "m", "args": {"level": "debug"}}'
                assert await monitor.publish(command, forged) == NOT_AUTHORISED
                asked = b'{"id": "o", "args": {"level": "warning"}}'
                assert await operator.publish(command, asked) == OK
                async with asyncio.timeout(T):
                    message = await anext(operator.mqtt.messages)
                assert str(message.topic) == "qkd/v1/alice/cmd/rotate-log-level/result"
                assert not message.retain
                assert isinstance(message.payload, bytes)
                result = json.loads(message.payload)
                assert result["ok"] and result["id"] == "o"
                assert result["result"]["new"] == "warning"
                # The broker routed the monitor's publish (refused) before it
                # answered it, and the operator published only after that: had
                # it reached the node, the node would have answered it first.
                assert desk.received == 1
                assert await monitor.drain() == []  # neither the command nor the result
                worker.cancel()
        finally:
            audit_logger.setLevel(audit_level)


# -- everyone else ---------------------------------------------------------------
@pytest.mark.parametrize("who", ["mallory", SLASH_CN])
@pytest.mark.asyncio
async def test_an_identity_the_acl_does_not_name_gets_nothing(
    broker: MosquittoBroker, pki: Pki, slash_cert: CertPair, who: str
) -> None:
    """A certificate from our CA connects, but may neither publish nor receive."""
    cert = slash_cert if who == SLASH_CN else pki.client(who)
    async with (
        Peer(broker, pki, None, cert=cert) as stranger,
        Peer(broker, pki, "alice") as alice,
        Peer(broker, pki, "monitor") as monitor,
        Peer(broker, pki, "keys-bob") as keys_bob,
    ):
        assert await stranger.subscribe("#") == [GRANTED_QOS1]
        await monitor.subscribe("qkd/v1/+/status")
        await keys_bob.subscribe("qkd/v1/bob/keys/#")
        for topic in (
            f"qkd/v1/{who}/status",  # no phantom node named after the CN
            f"qkd/v1/{who}/keys/bob",
            "qkd/v1/bob/keys/status",  # what a %u pattern would give "bob/keys"
            ALICE_KEY,
        ):
            assert await stranger.publish(topic, secret()) == NOT_AUTHORISED, topic
        assert await alice.publish(ALICE_KEY, secret()) == OK
        assert await alice.publish("qkd/v1/alice/status", b"{}") == OK
        assert await stranger.drain() == []
        assert [g.topic for g in await monitor.drain()] == ["qkd/v1/alice/status"]
        assert await keys_bob.drain() == []


# -- operations: restarts and reloads -------------------------------------------
@pytest.mark.asyncio
async def test_no_key_is_left_on_disk_or_redelivered_after_a_restart(pki: Pki) -> None:
    key = secret()
    durable = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: no hints
    durable.SessionExpiryInterval = 3600

    def consumer(broker: MosquittoBroker) -> Peer:
        return Peer(
            broker,
            pki,
            "keys-alice",
            identifier="keys-alice-durable",
            clean_start=False,
            properties=durable,
        )

    async with MosquittoBroker(tls=tls_files(pki)) as broker:
        async with consumer(broker) as offline:
            await offline.subscribe("qkd/v1/alice/keys/#")
        async with Peer(broker, pki, "alice") as alice:
            # OK, not NO_SUBSCRIBERS: queued for the offline session.
            assert await alice.publish(ALICE_KEY, key) == OK
        await asyncio.to_thread(broker.restart)
        assert broker.workdir is not None
        for path in broker.workdir.rglob("*"):
            assert not path.is_file() or key not in path.read_bytes(), path
        async with consumer(broker) as back:
            assert await back.drain() == []


@pytest.mark.asyncio
async def test_reloading_the_acl_revokes_a_connected_consumer(pki: Pki, tmp_path: Path) -> None:
    acl = tmp_path / "acl.conf"
    text = resources.files("qnoded").joinpath("data/mosquitto-acl.conf").read_text()
    acl.write_text(text)
    before, after = secret(), secret()
    async with (
        MosquittoBroker(tls=tls_files(pki), acl_file=acl) as broker,
        Peer(broker, pki, "alice") as alice,
        Peer(broker, pki, "keys-alice") as consumer,
    ):
        await consumer.subscribe("qkd/v1/alice/keys/#")
        assert await alice.publish(ALICE_KEY, before) == OK
        assert await consumer.drain() == [Got(ALICE_KEY, before, retain=False)]

        grant = "user keys-alice\ntopic read qkd/v1/alice/keys/+\n"
        assert grant in text
        acl.write_text(text.replace(grant, ""))
        await asyncio.to_thread(broker.reload)
        assert await alice.publish(ALICE_KEY, after) == OK  # the subscription is still there
        assert await consumer.drain() == []


# -- why the ACL has no %u patterns ----------------------------------------------
PATTERN_ACL = """\
pattern write qkd/v1/%u/status
user keys-bob
topic read qkd/v1/bob/keys/+
user monitor
topic read qkd/v1/+/status
"""


@pytest.mark.asyncio
async def test_a_node_pattern_would_open_the_broker_to_every_certificate(
    pki: Pki, slash_cert: CertPair, tmp_path: Path
) -> None:
    """Mosquitto 2.0.11 behaviour behind the ACL's explicit user blocks.

    If this test starts failing after a Mosquitto upgrade, patterns may have
    become safe: revisit the ACL's header.
    """
    acl = tmp_path / "pattern-acl.conf"
    acl.write_text(PATTERN_ACL)
    phantom, forged = secret(), secret()
    async with (
        MosquittoBroker(tls=tls_files(pki), acl_file=acl) as broker,
        Peer(broker, pki, "mallory") as mallory,
        Peer(broker, pki, None, cert=slash_cert) as slash,
        Peer(broker, pki, "monitor") as monitor,
        Peer(broker, pki, "keys-bob") as keys_bob,
    ):
        await monitor.subscribe("qkd/v1/+/status")
        await keys_bob.subscribe("qkd/v1/bob/keys/#")
        # Any certificate the CA signed becomes a node named after its CN...
        assert await mallory.publish("qkd/v1/mallory/status", phantom) == OK
        # ...and %u is substituted as text: "bob/keys" writes into bob's keys.
        assert await slash.publish("qkd/v1/bob/keys/status", forged) == OK
        assert await monitor.drain() == [Got("qkd/v1/mallory/status", phantom, retain=False)]
        assert await keys_bob.drain() == [Got("qkd/v1/bob/keys/status", forged, retain=False)]
