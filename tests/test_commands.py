"""Operator commands: parsing and validation (pure), the desk's queue and audit trail,
the publisher's command subscription against a real Mosquitto, and the commands'
effects on two running nodes (``qnoded run`` processes, BBM92 on simulated hardware).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from structlog.testing import capture_logs
from test_node_faults import Nodes, _args

from qnoded import commands
from qnoded.broker import MosquittoBroker
from qnoded.commands import (
    MAX_PAYLOAD_BYTES,
    QUEUE_SIZE,
    CommandDesk,
    CommandError,
    Incoming,
    Request,
    RequestError,
    parse,
    result_doc,
    rotate_log_level,
)
from qnoded.logs import SECRET_KEYS
from qnoded.mqtt import MqttSettings, TelemetryPublisher

T = 5.0  # s, bound on one command's round trip


def incoming(name: str, payload: bytes | str | dict[str, Any] = b"{}", **kw: Any) -> Incoming:
    if isinstance(payload, dict):
        payload = json.dumps(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return Incoming(topic=f"qkd/v1/alice/cmd/{name}", payload=payload, **kw)


def refused(name: str, payload: bytes | str | dict[str, Any], **kw: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(incoming(name, payload, **kw))
    return info.value


@pytest.fixture
def restore_levels() -> Iterator[None]:
    """rotate-log-level changes process-wide levels: put them back."""
    root, audit_logger = logging.getLogger(), logging.getLogger("qnoded.audit")
    levels = root.level, audit_logger.level
    yield
    root.setLevel(levels[0])
    audit_logger.setLevel(levels[1])


# -- parsing and validation ------------------------------------------------------
def test_an_empty_object_is_a_request_without_id_or_args() -> None:
    for payload in (b"{}", b'{"id": null, "args": null}'):
        assert parse(incoming("status", payload)) == Request("status", None, {})


def test_an_empty_payload_is_refused_not_run() -> None:
    # Clearing a retained command is an empty publish, which the broker forwards live.
    for payload in (b"", b"  \n"):
        assert "an empty payload is not a command" in str(refused("pause", payload))


def test_id_is_echoed_and_args_are_checked_against_the_spec() -> None:
    req = parse(incoming("rotate-log-level", {"id": "op-7", "args": {"level": "debug"}}))
    assert req == Request("rotate-log-level", "op-7", {"level": "debug"})
    req = parse(incoming("pause", {"args": {"reason": "fibre work"}}))
    assert req.args == {"reason": "fibre work"}
    assert parse(incoming("pause", {})).args == {}  # reason is optional


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"\xff\xfe", "not UTF-8 text (byte 0)"),
        (b"{not json", "not valid JSON"),
        (b'{"id": NaN}', "NaN is not JSON"),
        (b'{"id": "a", "id": "b"}', "field 'id' given twice"),
        (b"[1, 2]", "must be a JSON object such as"),
        (b'"pause"', "not a JSON string"),
        (b'{"id": 5}', "field 'id' must be a string, not a JSON number"),
        (b'{"id": "' + b"x" * 129 + b'"}', "'id' is 129 characters; at most 128"),
        (b"{" + b" " * MAX_PAYLOAD_BYTES + b"}", f"at most {MAX_PAYLOAD_BYTES}"),
    ],
)
def test_malformed_payloads_are_refused_with_what_is_wrong(payload: bytes, words: str) -> None:
    err = refused("status", payload)
    assert words in str(err)
    assert err.request_id is None  # no id could be read


@pytest.mark.parametrize(
    ("name", "body", "words"),
    [
        ("reboot", {}, "unknown command 'reboot'; commands: clear-alarm, pause, recalibrate"),
        ("status", {"cmd": "x"}, "unknown field(s) ['cmd'] in the request; it may have: id, args"),
        ("status", {"args": [1]}, "field 'args' must be a JSON object, not a JSON array"),
        ("status", {"args": {"x": "1"}}, "unknown argument(s) ['x']: status takes no arguments"),
        (
            "rotate-log-level",
            {"args": {"lvl": "debug"}},
            "unknown argument(s) ['lvl']: rotate-log-level takes: "
            "level (required, one of debug|info|warning|error)",
        ),
        ("rotate-log-level", {}, "missing argument 'level'"),
        (
            "rotate-log-level",
            {"args": {"level": 10}},
            "argument 'level' of rotate-log-level must be a string, not a JSON number",
        ),
        (
            "rotate-log-level",
            {"args": {"level": "verbose"}},
            "'verbose'; use one of debug, info, warning, error",
        ),
        ("clear-alarm", {"args": {"code": None}}, "must be a string, not a JSON null"),
        ("clear-alarm", {"args": {"code": "x" * 65}}, "is 65 characters; at most 64"),
        ("pause", {"args": {"reason": True}}, "must be a string, not a JSON boolean"),
    ],
)
def test_invalid_requests_name_the_problem_and_keep_the_id(
    name: str, body: dict[str, Any], words: str
) -> None:
    err = refused(name, {"id": "req-1"} | body)
    assert words in str(err)
    assert err.request_id == "req-1"


def test_a_retained_command_is_refused() -> None:
    err = refused("pause", b'{"id": "old"}', retained=True)
    assert "retained message" in str(err)
    assert "retain=false" in str(err)
    assert err.request_id == "old"


def test_result_documents() -> None:
    ok = result_doc("alice", "status", "i", result={"a": 1}, now=12.5)
    assert ok == {
        "id": "i",
        "node_id": "alice",
        "command": "status",
        "ok": True,
        "result": {"a": 1},
        "time": 12.5,
    }
    bad = result_doc("bob", "reboot", None, error="unknown command")
    assert bad["ok"] is False and bad["error"] == "unknown command" and "result" not in bad
    assert bad["time"] > 0
    with pytest.raises(ValueError, match="either a result or an error"):
        result_doc("a", "b", None)
    with pytest.raises(ValueError, match="either a result or an error"):
        result_doc("a", "b", None, result={}, error="x")


def test_client_identity_is_the_topic_and_bounded_user_properties() -> None:
    props = tuple((f"k{i}", "v" * 200) for i in range(20))
    client = incoming("status", user_properties=props).client()
    assert client["topic"] == "qkd/v1/alice/cmd/status"
    assert len(client["user_properties"]) == commands.MAX_USER_PROPERTIES
    assert client["user_properties"][0] == ["k0", "v" * commands.MAX_USER_PROPERTY_CHARS]
    assert incoming("status").client() == {"topic": "qkd/v1/alice/cmd/status"}


@pytest.mark.asyncio
async def test_rotate_log_level_reports_old_and_new_and_keeps_the_audit_trail(
    restore_levels: None,
) -> None:
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("qnoded.audit").setLevel(logging.NOTSET)
    result = await rotate_log_level(Request("rotate-log-level", None, {"level": "error"}))
    assert result == {"old": "info", "new": "error"}
    assert logging.getLogger().level == logging.ERROR
    assert logging.getLogger("qnoded.audit").isEnabledFor(logging.INFO)
    result = await rotate_log_level(Request("rotate-log-level", None, {"level": "debug"}))
    assert result == {"old": "error", "new": "debug"}
    with pytest.raises(CommandError, match="use one of debug, info, warning, error"):
        commands.set_log_level("trace")


# -- the desk: one at a time, bounded, audited, never crashing ----------------------
class Outbox:
    """What a desk published, in order (the publisher's publish_result)."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict[str, Any]]] = []
        self._new = asyncio.Event()

    def __call__(self, command: str, doc: dict[str, Any]) -> None:
        self.docs.append((command, doc))
        self._new.set()

    async def wait_for(self, n: int) -> None:
        """Until ``n`` documents were published."""
        while len(self.docs) < n:
            self._new.clear()
            await self._new.wait()


@pytest.mark.asyncio
async def test_desk_answers_every_message_and_audits_it() -> None:
    out = Outbox()
    calls: list[Request] = []

    async def status(request: Request) -> Mapping[str, Any]:
        calls.append(request)
        return {"state": "running"}

    async def pause(request: Request) -> Mapping[str, Any]:
        raise CommandError("pause acts at alice")

    async def resume(request: Request) -> Mapping[str, Any]:
        raise RuntimeError("laser did not answer")

    desk = CommandDesk("alice", {"status": status, "pause": pause, "resume": resume}, out)
    props = (("operator", "jdoe"),)
    with capture_logs() as logs:
        ok = await desk.execute(incoming("status", {"id": "1"}, user_properties=props))
        refused_cmd = await desk.execute(incoming("pause", {"id": "2"}))
        failed = await desk.execute(incoming("resume", {"id": "3"}))
        garbage = await desk.execute(incoming("status", b'{"id": "4", "args": {"psk": "s3cr3t"'))
        unknown = await desk.execute(incoming("recalibrate", {"id": "5"}))
    assert [d for _, d in out.docs] == [ok, refused_cmd, failed, garbage, unknown]
    assert [c for c, _ in out.docs] == ["status", "pause", "resume", "status", "recalibrate"]
    assert ok["ok"] and ok["result"] == {"state": "running"} and ok["id"] == "1"
    assert refused_cmd == refused_cmd | {"ok": False, "error": "pause acts at alice", "id": "2"}
    assert failed["error"] == "resume failed at alice: RuntimeError: laser did not answer"
    assert "not valid JSON" in garbage["error"] and garbage["id"] is None
    # Commands the node has no handler for are unknown, and the answer says which exist.
    assert unknown["error"] == "unknown command 'recalibrate'; commands: pause, resume, status"
    assert len(calls) == 1
    events = [e for e in logs if e["event"] == "operator command"]
    assert [e["outcome"] for e in events] == ["ok", "error", "error", "error", "error"]
    first = events[0]
    assert first["log_level"] == "info"
    assert first["command"] == "status" and first["id"] == "1" and first["args"] == {}
    assert first["client"] == {
        "topic": "qkd/v1/alice/cmd/status",
        "user_properties": [["operator", "jdoe"]],
    }
    # A refused payload is logged by its size, never by its content.
    assert events[3]["args"] is None and events[3]["payload_bytes"] > 0
    assert "s3cr3t" not in repr(events)
    assert desk.executed == 3  # handlers run; refused and unknown requests never reach one


@pytest.mark.asyncio
async def test_desk_bounds_time_and_rejects_a_bad_handler_result() -> None:
    out = Outbox()

    async def status(request: Request) -> Mapping[str, Any]:
        await asyncio.Event().wait()  # a handler that never finishes
        return {}

    async def pause(request: Request) -> Mapping[str, Any]:
        return None  # type: ignore[return-value]  # the mistake this test is about

    desk = CommandDesk("bob", {"status": status, "pause": pause}, out, timeout_s=0.05)
    slow = await desk.execute(incoming("status", {"id": "s"}))
    assert slow["error"] == "status did not finish within 0.05 s"
    bad = await desk.execute(incoming("pause"))
    assert bad["error"] == "pause at bob returned no result document"
    with pytest.raises(ValueError, match=r"without a spec: \['reboot'\]"):
        CommandDesk("bob", {"reboot": status}, out)


@pytest.mark.asyncio
async def test_desk_runs_one_at_a_time_and_refuses_overflow_at_once() -> None:
    out = Outbox()
    release = asyncio.Event()
    running: list[str] = []
    finished: list[str] = []
    entered = asyncio.Event()

    async def status(request: Request) -> Mapping[str, Any]:
        assert request.request_id is not None
        running.append(request.request_id)
        entered.set()
        assert len(running) - len(finished) == 1  # never two at once
        await release.wait()
        finished.append(request.request_id)
        return {}

    desk = CommandDesk("alice", {"status": status}, out)
    async with asyncio.TaskGroup() as tg:
        worker = tg.create_task(desk.run(), name="commands")
        desk.offer(incoming("status", {"id": "0"}))
        await entered.wait()  # the worker took the first one
        for i in range(1, QUEUE_SIZE + 3):
            desk.offer(incoming("status", {"id": str(i)}))
        # The queue holds QUEUE_SIZE; the two beyond were answered at once.
        busy = [d for _, d in out.docs]
        assert [d["id"] for d in busy] == [str(QUEUE_SIZE + 1), str(QUEUE_SIZE + 2)]
        assert all("already waiting" in d["error"] for d in busy)
        assert desk.refused_busy == 2
        release.set()
        await out.wait_for(QUEUE_SIZE + 3)
        assert finished == [str(i) for i in range(QUEUE_SIZE + 1)]  # in order
        # Stopping: the running command, the queued ones and later ones are
        # all answered, none dropped.
        release.clear()
        entered.clear()
        desk.offer(incoming("status", {"id": "last-run"}))
        desk.offer(incoming("status", {"id": "queued"}))
        await entered.wait()
        assert running[-1] == "last-run"
        worker.cancel()
    desk.offer(incoming("status", {"id": "late"}))
    tail = {d["id"]: d["error"] for _, d in out.docs[-3:]}
    assert tail == {
        "last-run": "status interrupted: the node is stopping",
        "queued": "command not run: the node is stopping",
        "late": "command not run: the node is stopping",
    }


# -- the publisher's command path against a real broker -----------------------------
class Console:
    """An operator on the broker: sends commands and keeps every live status,
    telemetry, alarm and command result of the nodes, by node and kind."""

    def __init__(self, broker: tuple[str, int]) -> None:
        self.settings = MqttSettings(*broker)
        self.seen: dict[tuple[str, str], list[Any]] = defaultdict(list)
        self._changed = asyncio.Condition()
        self._stack = contextlib.AsyncExitStack()
        self._client: aiomqtt.Client | None = None

    async def __aenter__(self) -> Self:
        client = await self._stack.enter_async_context(self.settings.client())
        for leaf in ("status", "telemetry", "alarms", "cmd/+/result"):
            await client.subscribe(f"qkd/v1/+/{leaf}", qos=1)
        tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        reader = tg.create_task(self._read(client), name="console-read")
        self._stack.callback(reader.cancel)  # runs before the group is awaited
        self._client = client
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if message.retain:
                continue  # history from before this console: not what a test waits for
            _, _, node, leaf = str(message.topic).split("/", 3)
            assert isinstance(message.payload, bytes)
            async with self._changed:
                self.seen[node, leaf].append(json.loads(message.payload))
                self._changed.notify_all()

    async def wait(self, until: Callable[[], bool], timeout: float = T) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(until)

    async def publish(
        self,
        node: str,
        command: str,
        payload: bytes | dict[str, Any] = b"{}",
        *,
        properties: Properties | None = None,
        retain: bool = False,
    ) -> None:
        assert self._client is not None
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        await self._client.publish(
            f"qkd/v1/{node}/cmd/{command}", payload, qos=1, retain=retain, properties=properties
        )

    async def send(
        self,
        node: str,
        command: str,
        payload: bytes | dict[str, Any] = b"{}",
        *,
        properties: Properties | None = None,
        retain: bool = False,
        timeout: float = T,
    ) -> dict[str, Any]:
        """Publish a command; the node's next answer on its result topic."""
        answers = self.seen[node, f"cmd/{command}/result"]
        before = len(answers)
        await self.publish(node, command, payload, properties=properties, retain=retain)
        await self.wait(lambda: len(answers) > before, timeout)
        doc: dict[str, Any] = answers[before]
        return doc

    async def ask(self, node: str, command: str, timeout: float = T, **args: str) -> dict[str, Any]:
        """A well-formed command with a fresh id: its answer (matched by id), envelope checked."""
        rid = uuid.uuid4().hex
        answers = self.seen[node, f"cmd/{command}/result"]
        await self.publish(node, command, {"id": rid, "args": args})
        await self.wait(lambda: any(d["id"] == rid for d in answers), timeout)
        doc: dict[str, Any] = next(d for d in answers if d["id"] == rid)
        assert doc["node_id"] == node and doc["command"] == command
        assert ("result" in doc) == doc["ok"] and ("error" in doc) != doc["ok"]
        return doc

    def latest(self, node: str, leaf: str) -> Any:
        seen = self.seen[node, leaf]
        return seen[-1] if seen else None


@pytest.mark.asyncio
async def test_publisher_subscribes_answers_and_resubscribes_after_a_broker_restart(
    fresh_broker: MosquittoBroker, restore_levels: None
) -> None:
    node = f"t-cmd-{uuid.uuid4().hex[:8]}"
    out_of_band: list[Incoming] = []
    logging.getLogger().setLevel(logging.INFO)
    async with TelemetryPublisher(MqttSettings(*fresh_broker.address), node) as pub:
        desk = CommandDesk(node, {"rotate-log-level": rotate_log_level}, pub.publish_result)

        def offer(message: Incoming) -> None:
            out_of_band.append(message)
            desk.offer(message)

        async with asyncio.TaskGroup() as tg:
            worker = tg.create_task(desk.run(), name="commands")
            await asyncio.wait_for(pub.idle.wait(), T)
            async with Console(fresh_broker.address) as con:
                # Retained before the node subscribes: the broker hands it over
                # with the retain flag, and the node refuses to run it.
                results = con.seen[node, "cmd/rotate-log-level/result"]
                await con.publish(
                    node,
                    "rotate-log-level",
                    {"id": "stale", "args": {"level": "debug"}},
                    retain=True,
                )
                pub.attach_commands(offer)
                await con.wait(lambda: bool(results))
                assert results[0]["id"] == "stale" and "retained message" in results[0]["error"]
                assert logging.getLogger().level == logging.INFO  # it did not run
                # Clearing it is an empty retained publish, which the broker also
                # forwards live: refused, never run as a command without arguments.
                cleared = await con.send(node, "rotate-log-level", b"", retain=True)
                assert "an empty payload is not a command" in cleared["error"]

                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho
                props.UserProperty = ("operator", "jdoe")
                doc = await con.send(
                    node,
                    "rotate-log-level",
                    {"id": "a", "args": {"level": "warning"}},
                    properties=props,
                )
                assert doc["ok"] and doc["result"] == {"old": "info", "new": "warning"}
                assert out_of_band[-1].user_properties == (("operator", "jdoe"),)
                bad = await con.send(node, "rotate-log-level", b'{"args": {"level": 1}}')
                assert "must be a string, not a JSON number" in bad["error"]
                unknown = await con.send(node, "reboot", b"{}")
                assert unknown["error"].startswith("unknown command 'reboot'")

            # The subscription is renewed on every connection.
            await asyncio.to_thread(fresh_broker.kill)
            await asyncio.wait_for(pub.wait_connected(False), T)
            await asyncio.to_thread(fresh_broker.start)
            await asyncio.wait_for(pub.wait_connected(), 8)
            await asyncio.wait_for(pub.idle.wait(), T)
            async with Console(fresh_broker.address) as con:
                again = await con.ask(node, "rotate-log-level", level="info")
                assert again["ok"] and again["result"] == {"old": "warning", "new": "info"}
            worker.cancel()
    assert pub.dropped_results == 0


# -- two running nodes ----------------------------------------------------------------
@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory, mqtt_broker: tuple[str, int]) -> Iterator[Nodes]:
    """Alice and Bob (BBM92, real time, 20 kbit blocks: about one block a second),
    shared by the tests below; each test starts from a running link."""
    nodes = Nodes(tmp_path_factory.mktemp("link"), mqtt_broker, _args(block_bits=20_000))
    try:
        nodes.start("alice")
        nodes.start("bob")
        asyncio.run(_until_running(mqtt_broker, timeout=30))
        yield nodes
        for role in ("bob", "alice"):
            assert nodes.stop(role) < 5
            assert nodes.procs[role].returncode == 0
    finally:
        nodes.kill_all()


async def _until_running(
    broker: tuple[str, int],
    timeout: float,
    nodes: tuple[str, ...] = ("alice", "bob"),
    states: frozenset[str] = frozenset({"running"}),
) -> None:
    """The nodes answer ``status`` with one of ``states``; asks until then (a
    node subscribes to its commands only once it has connected)."""
    async with Console(broker) as con, asyncio.timeout(timeout):
        for node in nodes:
            while True:
                try:
                    doc = await con.ask(node, "status", timeout=1.0)
                except TimeoutError:
                    continue
                if doc["result"]["status"]["state"] in states:
                    break
                await asyncio.sleep(0.2)


def secret_fields(doc: Any) -> list[str]:
    """Field names anywhere in a JSON document that the logs treat as secrets."""
    if isinstance(doc, dict):
        own = [k for k in doc if k in SECRET_KEYS]
        return own + [f for v in doc.values() for f in secret_fields(v)]
    if isinstance(doc, list):
        return [f for v in doc for f in secret_fields(v)]
    return []


def figures(doc: dict[str, Any]) -> tuple[int, int]:
    return doc["sifted_bits"], doc["secret_bits"]


def audit_events(nodes: Nodes, role: str) -> list[dict[str, Any]]:
    return [e for e in nodes.log(role) if e.get("event") == "operator command"]


@pytest.mark.slow
@pytest.mark.asyncio
async def test_status_and_malformed_commands_on_a_running_link(
    link: Nodes, mqtt_broker: tuple[str, int]
) -> None:
    async with Console(mqtt_broker) as con:
        doc = await con.ask("alice", "status")
        result = doc["result"]
        assert result["status"]["state"] == "running" and result["paused"] is False
        assert result["summary"]["node_id"] == "alice" and result["summary"]["locked"]
        assert result["active_alarms"] == {}
        assert not secret_fields(result)

        answers = {
            "not json": await con.send("bob", "status", b"{not json"),
            "wrong type": await con.send("bob", "rotate-log-level", {"args": {"level": 3}}),
            "unknown arg": await con.send("bob", "clear-alarm", {"args": {"kode": "peer"}}),
            "unknown": await con.send("bob", "reboot", {"id": "r"}),
            "too big": await con.send("bob", "status", b" " * (MAX_PAYLOAD_BYTES + 1)),
            "pause at bob": await con.ask("bob", "pause"),
            "recalibrate at bob": await con.ask("bob", "recalibrate"),
        }
    for name, answer in answers.items():
        assert answer["ok"] is False, name
    assert "payload is not valid JSON" in answers["not json"]["error"]
    assert "must be a string, not a JSON number" in answers["wrong type"]["error"]
    assert "unknown argument(s) ['kode']" in answers["unknown arg"]["error"]
    assert (
        answers["unknown"]["id"] == "r"
        and "unknown command 'reboot'" in answers["unknown"]["error"]
    )
    assert f"at most {MAX_PAYLOAD_BYTES}" in answers["too big"]["error"]
    for command in ("pause", "recalibrate"):
        error = answers[f"{command} at bob"]["error"]
        assert f"{command} acts at alice, not at bob" in error
        assert f"qkd/v1/alice/cmd/{command}" in error
    assert all(p.poll() is None for p in link.procs.values())  # nothing a client sends stops it


@pytest.mark.slow
@pytest.mark.asyncio
async def test_rotate_log_level_at_runtime(link: Nodes, mqtt_broker: tuple[str, int]) -> None:
    async with Console(mqtt_broker) as con:
        assert (await con.ask("bob", "status"))["result"]["log_level"] == "info"
        debug = await con.ask("bob", "rotate-log-level", level="debug")
        assert debug["result"] == {"old": "info", "new": "debug"}
        assert (await con.ask("bob", "status"))["result"]["log_level"] == "debug"

        warning = await con.ask("bob", "rotate-log-level", level="warning")
        assert warning["result"] == {"old": "debug", "new": "warning"}
        mark = len(link.log("bob"))
        await con.wait(lambda: bool(con.seen["bob", "telemetry"]))
        start = con.latest("bob", "telemetry")["blocks_accepted"]
        # Two more blocks accepted: each would log an info line at level info.
        await con.wait(
            lambda: con.latest("bob", "telemetry")["blocks_accepted"] >= start + 2, timeout=15
        )
        probe = await con.ask("bob", "status")
        quiet = link.log("bob")[mark:]
        assert not [
            e
            for e in quiet
            if e.get("level") in {"debug", "info"} and e.get("logger") != "qnoded.audit"
        ]
        # The audit trail is not silenced by the log level.
        assert [e["id"] for e in quiet if e.get("event") == "operator command"] == [probe["id"]]

        info = await con.ask("bob", "rotate-log-level", level="info")
        assert info["result"] == {"old": "warning", "new": "info"}
        mark = len(link.log("bob"))
        start = con.latest("bob", "telemetry")["blocks_accepted"]
        await con.wait(
            lambda: con.latest("bob", "telemetry")["blocks_accepted"] >= start + 1, timeout=15
        )
        assert any(e.get("event") == "block accepted" for e in link.log("bob")[mark:])


@pytest.mark.slow
@pytest.mark.asyncio
async def test_recalibrate_relocks_alice(link: Nodes, mqtt_broker: tuple[str, int]) -> None:
    marks = {role: len(link.log(role)) for role in ("alice", "bob")}
    async with Console(mqtt_broker) as con:
        before = (await con.ask("alice", "status"))["result"]["summary"]
        asked_at = time.time()
        doc = await con.ask("alice", "recalibrate")
        result = doc["result"]
        assert result["relocking"] and result["was_locked"] and result["peer_connected"]
        assert isinstance(result["offset_ps"], int)
        # A fresh lock: the "as first found" figures are new (Bob's clock has
        # drifted since the last lock), and key comes again.
        await con.wait(
            lambda: (
                con.latest("alice", "telemetry") is not None
                and con.latest("alice", "telemetry")["lock_offset_ps"] != before["lock_offset_ps"]
            ),
            timeout=10,
        )
        sifted = con.latest("alice", "telemetry")["sifted_bits"]
        await con.wait(lambda: con.latest("alice", "telemetry")["sifted_bits"] > sifted)
        assert con.latest("alice", "telemetry")["locked"]
        # The retained status is the latest state: a lock made within one batch
        # may replace "locking" before the publisher sends it.
        status = con.latest("alice", "status")
        assert status["state"] == "running" and status["since"] > asked_at
    log = link.log("alice")[marks["alice"] :]
    states = [(e["state"], e["detail"]) for e in log if e.get("event") == "state"]
    assert states[:2] == [("locking", "re-locking the clock (operator request)"), ("running", "")]
    assert len([e for e in log if e.get("event") == "clock locked"]) == 1
    for role, mark in marks.items():  # no fault on either side, the session stayed up
        assert not [e for e in link.log(role)[mark:] if e.get("level") == "error"], role


@pytest.mark.slow
@pytest.mark.asyncio
async def test_pause_stops_key_generation_and_resume_restarts_it(
    link: Nodes, mqtt_broker: tuple[str, int]
) -> None:
    marks = {role: len(link.log(role)) for role in ("alice", "bob")}
    async with Console(mqtt_broker) as con:
        pause = await con.ask("alice", "pause", reason="fibre maintenance")
        assert pause["result"]["paused"] and pause["result"]["changed"]
        await con.wait(lambda: con.latest("alice", "status") is not None)
        status = con.latest("alice", "status")
        assert status["state"] == "paused"
        assert status["detail"] == (
            "key generation paused by operator (fibre maintenance); peer link and telemetry stay up"
        )
        # Bob follows Alice: no longer locked to her, and says so.
        await con.wait(lambda: con.latest("bob", "status") is not None)
        assert con.latest("bob", "status")["state"] == "locking"

        # A block in flight may still complete: wait until both figures stand still.
        def settled(node: str) -> bool:
            tele = con.seen[node, "telemetry"]
            return len(tele) >= 2 and figures(tele[-1]) == figures(tele[-2])

        await con.wait(lambda: settled("alice") and settled("bob"), timeout=10)
        frozen = {n: con.latest(n, "telemetry") for n in ("alice", "bob")}
        count = {n: len(con.seen[n, "telemetry"]) for n in ("alice", "bob")}
        await con.wait(lambda: all(len(con.seen[n, "telemetry"]) >= count[n] + 3 for n in count))
        for node in ("alice", "bob"):
            for tele in con.seen[node, "telemetry"][count[node] :]:
                assert figures(tele) == figures(frozen[node]), node
                assert tele["state"] == ("paused" if node == "alice" else "locking")
        later = {n: con.latest(n, "telemetry") for n in ("alice", "bob")}
        # ...while the link stays up: Bob's batches still go to Alice, who answers each.
        assert later["bob"]["tags_processed"] > frozen["bob"]["tags_processed"]
        assert (
            later["alice"]["disclosed_bytes"]["SIFT"] > frozen["alice"]["disclosed_bytes"]["SIFT"]
        )
        assert not [a for n in ("alice", "bob") for a in con.seen[n, "alarms"]]

        again = await con.ask("alice", "pause")
        assert again["result"] == {"paused": True, "changed": False, "state": "paused"}
        refused_relock = await con.ask("alice", "recalibrate")
        assert "alice is paused" in refused_relock["error"]

        resume = await con.ask("alice", "resume")
        assert resume["result"]["changed"] and resume["result"]["state"] == "locking"
        await con.wait(lambda: con.latest("alice", "status")["state"] == "running", timeout=10)
        await con.wait(
            lambda: all(
                figures(con.latest(n, "telemetry"))[0] > figures(frozen[n])[0]
                and figures(con.latest(n, "telemetry"))[1] > figures(frozen[n])[1]
                for n in ("alice", "bob")
            ),
            timeout=15,
        )
        assert con.latest("bob", "status")["state"] == "running"

    audit = {e["id"]: e for e in audit_events(link, "alice")}
    entry = audit[pause["id"]]
    assert entry["command"] == "pause" and entry["outcome"] == "ok"
    assert entry["args"] == {"reason": "fibre maintenance"}
    assert entry["client"] == {"topic": "qkd/v1/alice/cmd/pause"}
    assert audit[refused_relock["id"]]["outcome"] == "error"
    for role, mark in marks.items():  # no fault on either side, the session stayed up
        assert not [e for e in link.log(role)[mark:] if e.get("level") == "error"], role


@pytest.mark.slow
@pytest.mark.asyncio
async def test_clear_alarm(link: Nodes, mqtt_broker: tuple[str, int]) -> None:
    async with Console(mqtt_broker) as con:
        none = await con.ask("alice", "clear-alarm", code="peer")
        assert none["error"] == "no active alarm 'peer' at alice; active: none"

        link.procs["bob"].send_signal(signal.SIGKILL)  # no goodbye: alice raises "peer"
        link.procs["bob"].wait()
        await con.wait(lambda: any(a["code"] == "peer" for a in con.seen["alice", "alarms"]))
        status = await con.ask("alice", "status")
        assert status["result"]["status"]["state"] == "degraded"
        assert set(status["result"]["active_alarms"]) == {"peer"}

        wrong = await con.ask("alice", "clear-alarm", code="qber-high")
        assert wrong["error"] == "no active alarm 'qber-high' at alice; active: peer"
        cleared = await con.ask("alice", "clear-alarm", code="peer")
        assert cleared["ok"] and cleared["result"]["cleared"] == "peer"
        assert "peer channel failed" in cleared["result"]["message"]
        assert cleared["result"]["active"] == []
        await con.wait(
            lambda: any(a["code"] == "peer-cleared" for a in con.seen["alice", "alarms"])
        )
        info = next(a for a in con.seen["alice", "alarms"] if a["code"] == "peer-cleared")
        assert info["severity"] == "info" and "cleared by operator" in info["message"]
        await con.wait(lambda: con.latest("alice", "status")["state"] == "locking")
        assert con.latest("alice", "status")["detail"] == "waiting for peer"

        link.start("bob")  # so that the module's teardown stops both cleanly
    # Up (its signal handlers set), whether or not it has locked yet.
    await _until_running(mqtt_broker, 20, ("bob",), frozenset({"locking", "running"}))
