"""Fuzzing MQTT operator commands (``qnoded.commands``) and the strict JSON they are read
with (``qnoded.strictjson``).

Inputs: arbitrary payload bytes; valid requests with their bytes mutated; request
documents of the right shape with wrong field values, unknown fields and deep nesting; any
command name on the topic, retained or not.  A refusal is a :class:`RequestError` (the
desk answers it ``ok: false``); the desk answers every message with one JSON-serialisable
result and never raises.  Strict JSON round-trips every JSON value and refuses duplicate
fields and the non-JSON constants by name.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from fuzzing import bounded, budget, mutated, refused
from hypothesis import example, given
from hypothesis import strategies as st

from qnoded import commands, strictjson
from qnoded.commands import (
    MAX_PAYLOAD_BYTES,
    SPECS,
    CommandDesk,
    Incoming,
    Request,
    RequestError,
    decode,
    parse,
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# A topic level: no "/" (the desk answers under the topic's last level).
names = st.one_of(
    st.sampled_from(sorted(SPECS)), st.text(max_size=20).filter(lambda s: "/" not in s)
)
arg_names = st.sampled_from(sorted({a.name for s in SPECS.values() for a in s.args} | {"x"}))
arg_values = st.one_of(
    st.sampled_from([*commands.LOG_LEVELS, "", "INFO", "x" * 65, "x" * 201]),
    json_values,
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """Request documents, mostly of the right shape, with some field wrong."""
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["id"] = draw(st.one_of(st.text(max_size=140), json_values))
    if draw(st.booleans()):
        doc["args"] = draw(
            st.one_of(st.dictionaries(arg_names, arg_values, max_size=3), json_values)
        )
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(max_size=8))] = draw(json_values)
    return doc


VALID = [
    b"{}",
    b'{"id": "42", "args": {}}',
    b'{"id": "7", "args": {"reason": "maintenance"}}',
    b'{"args": {"level": "debug"}}',
    b'{"id": "x", "args": {"code": "qber-high"}}',
]
payloads = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(VALID).flatmap(mutated),
    requests().map(lambda d: json.dumps(d).encode()),
    st.sampled_from([b"[" * 3000, b'{"a":' * 3000, b"\xef\xbb\xbf{}", b" \t\n", b"NaN"]),
)
DEEP = b"[" * 2000  # fits in MAX_PAYLOAD_BYTES: RecursionError inside json


def check_request(req: Request, payload: bytes) -> None:
    spec = SPECS[req.command]
    assert set(req.args) <= {a.name for a in spec.args}
    for arg in spec.args:
        if arg.required:
            assert arg.name in req.args
        if arg.name in req.args:
            value = req.args[arg.name]
            assert isinstance(value, str) and len(value) <= arg.max_chars
            assert not arg.choices or value in arg.choices
    assert req.request_id is None or (
        isinstance(req.request_id, str) and len(req.request_id) <= commands.MAX_ID_CHARS
    )
    assert len(payload) <= MAX_PAYLOAD_BYTES


@budget(150)
@given(payloads)
@example(DEEP)
def test_decode_any_payload(payload: bytes) -> None:
    try:
        with bounded("decode"):
            doc = decode(payload)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        text = refused(exc, RequestError)
        assert any(w in text for w in ("payload", "command")), text
        return
    assert isinstance(doc, dict)


@budget(150)
@given(names, payloads, st.booleans())
@example("status", DEEP, False)
def test_parse_any_message(name: str, payload: bytes, retained: bool) -> None:
    message = Incoming(topic=f"qkd/v1/alice/cmd/{name}", payload=payload, retained=retained)
    try:
        with bounded("parse"):
            req = parse(message)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        refused(exc, RequestError)
        assert isinstance(exc, RequestError)
        assert exc.request_id is None or len(exc.request_id) <= commands.MAX_ID_CHARS
        return
    assert not retained and req.command == name
    check_request(req, payload)


async def _ok(_request: Request) -> Mapping[str, Any]:
    return {"done": True}


@budget(50)
@given(st.lists(st.tuples(names, payloads, st.booleans()), min_size=1, max_size=4))
@example([("status", DEEP, False)])
def test_desk_answers_everything(messages: list[tuple[str, bytes, bool]]) -> None:
    published: list[tuple[str, dict[str, Any]]] = []
    desk = CommandDesk(
        "alice",
        dict.fromkeys(SPECS, _ok),
        lambda command, doc: published.append((command, doc)),
    )

    async def run() -> list[dict[str, Any]]:
        async with asyncio.timeout(5.0):
            return [
                await desk.execute(Incoming(f"qkd/v1/alice/cmd/{n}", p, retained=r))
                for n, p, r in messages
            ]

    results = asyncio.run(run())
    assert len(published) == len(messages) == len(results)
    for (name, _, _), (command, doc) in zip(messages, published, strict=True):
        assert command == name == doc["command"]
        assert doc["ok"] is ("error" not in doc)
        assert doc["ok"] or doc["error"].strip()
        json.dumps(doc)  # it is published as JSON


# -- strict JSON ----------------------------------------------------------------------------


@budget(150)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode), payloads))
@example(b'{"a": 1, "a": 2}')
@example(b"[NaN, Infinity, -Infinity]")
def test_strictjson_refuses_only_with_value_errors(data: bytes) -> None:
    try:
        with bounded("strictjson.loads"):
            strictjson.loads(data)
    except RecursionError:
        pass  # documented: callers turn it into their own error
    except ValueError as exc:
        assert str(exc).strip()


@budget(100)
@given(json_values)
def test_strictjson_round_trips(value: Any) -> None:
    for text in (json.dumps(value), json.dumps(value, indent=1, ensure_ascii=False)):
        assert strictjson.loads(text) == value
        assert strictjson.loads(text.encode()) == value
    assert strictjson.type_name(value) in ("null", "boolean", "number", "string", "array", "object")


@budget(60)
@given(st.text(max_size=300), json_values, json_values)
@example("0" * 30 + "\x1f" * 7 + "\U000100fb" * 40, None, None)  # a long repr, still bounded
def test_strictjson_names_a_duplicate_field(name: str, a: Any, b: Any) -> None:
    text = (
        "{"
        + json.dumps(name)
        + ": "
        + json.dumps(a)
        + ", "
        + json.dumps(name)
        + ": "
        + json.dumps(b)
        + "}"
    )
    try:
        strictjson.loads(text)
    except ValueError as exc:
        assert repr(strictjson.clip(name)) in str(exc)
        # The caller's text is clipped to ECHO_LIMIT characters; repr() may spell each
        # in up to 10 (\U0001f600).
        assert len(str(exc)) <= 10 * strictjson.ECHO_LIMIT + 30
    else:
        raise AssertionError("a field given twice was accepted")


@budget(30)
@given(st.sampled_from(["NaN", "Infinity", "-Infinity"]), json_values)
def test_strictjson_names_non_json_constants(constant: str, value: Any) -> None:
    for text in (constant, f"[{json.dumps(value)}, {constant}]", f'{{"x": {constant}}}'):
        try:
            strictjson.loads(text)
        except ValueError as exc:
            assert constant.lstrip("-") in str(exc)
        else:
            raise AssertionError(f"{text!r} accepted")
