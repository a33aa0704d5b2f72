"""Fuzzing ETSI GS QKD 014 request parsing (``qnoded.etsi014``).

The parsing functions are called directly with many examples: Key request bodies (6.2)
and Key IDs containers (6.4) of the right shape with wrong values, unknown fields and
wrong types; query strings with any names, values and repeats.  A refusal is an
:class:`ApiError` 400 whose message and details name each field that is wrong.  A few
examples go through the whole aiohttp application (``aiohttp.test_utils``): any method,
path, SAE, query and body gets one of the spec's status codes and Error container, never
the 503 "server error" that an unexpected exception becomes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import quote, urlencode

import pytest
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from fuzzing import bounded, budget, mutated, refused
from hypothesis import example, given
from hypothesis import strategies as st

from qnoded import etsi014
from qnoded.config import Etsi014Section
from qnoded.etsi014 import API_PREFIX, ApiError, Etsi014Server
from qnoded.keystore import KeyStore

MAX = 16  # max_key_per_request
KEY_BITS = 256
SECTION = Etsi014Section(
    listen="127.0.0.1:0",
    cert_file="unused.crt",
    key_file="unused.key",
    ca_file="unused-ca.crt",
    local_sae="sae-a",
    remote_sae="sae-b",
)


def server(store: Any = None, role: str = "alice") -> Etsi014Server:
    local, remote = ("sae-a", "sae-b") if role == "alice" else ("sae-b", "sae-a")
    section = dataclasses.replace(SECTION, local_sae=local, remote_sae=remote)
    return Etsi014Server(
        section,
        store,
        node_id="kme",
        peer_node_id="kme-peer",
        key_size_bits=KEY_BITS,
        role=role,  # type: ignore[arg-type]
        max_key_per_request=MAX,
    )


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
uuids = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: f"urn:uuid:{u}"),
    st.text(max_size=40),
)


def check_bad_request(exc: BaseException) -> None:
    text = refused(exc, ApiError)
    assert isinstance(exc, ApiError) and exc.status == 400, text
    assert exc.details, text
    for detail in exc.details:
        ((name, problem),) = detail.items()
        assert problem and name in text  # name: a field, or a query parameter (maybe "")
    json.dumps(exc.details)  # the Error container is JSON


@st.composite
def key_requests(draw: st.DrawFn) -> dict[str, Any]:
    fields = {
        "number": st.one_of(st.integers(-2, MAX + 2), json_values),
        "size": st.one_of(st.sampled_from([KEY_BITS, 128, 0, -8]), json_values),
        "additional_slave_SAE_IDs": st.one_of(
            st.lists(st.text(max_size=6), max_size=2), json_values
        ),
        "extension_mandatory": st.one_of(
            st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=2), max_size=2),
            json_values,
        ),
        "extension_optional": st.one_of(
            st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=2), max_size=2),
            json_values,
        ),
        "x": json_values,
    }
    chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=4))
    return {name: draw(fields[name]) for name in chosen}


@budget(120)
@given(key_requests())
@example({"number": 2**70})
@example({"extension_mandatory": [{"a": 1}, {}]})
def test_key_request(doc: dict[str, Any]) -> None:
    try:
        with bounded("_key_request"):
            number = server()._key_request(doc)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        check_bad_request(exc)
        return
    assert 1 <= number <= MAX
    assert doc.get("size") in (None, KEY_BITS)
    assert set(doc) <= set(etsi014.KEY_REQUEST_FIELDS)


@st.composite
def key_ids_containers(draw: st.DrawFn) -> dict[str, Any]:
    entry = st.one_of(
        st.fixed_dictionaries({"key_ID": uuids}),
        st.fixed_dictionaries({"key_ID": uuids, "key_ID_extension": json_values}),
        st.dictionaries(st.sampled_from(["key_ID", "x"]), json_values, max_size=2),
        json_values,
    )
    doc: dict[str, Any] = {}
    if draw(st.integers(0, 5)):
        doc["key_IDs"] = draw(st.one_of(st.lists(entry, max_size=MAX + 2), json_values))
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["key_IDs_extension", "x"]))] = draw(json_values)
    if draw(st.integers(0, 3)) == 0:  # the same ID twice
        same = str(draw(st.uuids()))
        doc["key_IDs"] = [{"key_ID": same}, {"key_ID": same}]
    return doc


@budget(100)
@given(key_ids_containers())
def test_key_ids(doc: dict[str, Any]) -> None:
    try:
        with bounded("_key_ids"):
            ids = server(role="bob")._key_ids(doc)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        check_bad_request(exc)
        return
    assert 1 <= len(ids) <= MAX and len(set(ids)) == len(ids)
    assert [str(i) for i in ids] == [str(uuid.UUID(e["key_ID"])) for e in doc["key_IDs"]]


query_names = st.sampled_from(["number", "size", "key_ID", "x", "", "Number", "number "])
query_values = st.one_of(
    st.integers(-5, 10**12).map(str),
    st.sampled_from(["", "0", "007", "1e3", "0x10", " 5", "5 ", "٣", "²", "1_000", "9" * 10]),
    st.text(max_size=12),
)
queries = st.lists(st.tuples(query_names, query_values), max_size=4)


@budget(100)
@given(queries, st.sampled_from([(), ("number", "size"), ("key_ID",)]))
def test_query_parameters(pairs: list[tuple[str, str]], allowed: tuple[str, ...]) -> None:
    request = make_mocked_request("GET", "/x?" + urlencode(pairs))
    try:
        with bounded("_check_query"):
            query = etsi014._check_query(request, allowed=allowed)
            numbers = {n: etsi014._query_int(query, n) for n in ("number", "size") if n in allowed}
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        check_bad_request(exc)
        return
    assert set(query) <= set(allowed)
    for name, value in numbers.items():
        if value is None:
            assert name not in query
        else:
            assert 0 <= value < 10**9 and query[name] == str(value).zfill(len(query[name]))


@budget(100)
@given(uuids)
def test_uuid_text(text: str) -> None:
    got = etsi014._uuid_or_none(text)
    assert got is None or str(got) == text.lower()


# -- whole requests through the aiohttp application -------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyStore]:
    """An empty store: no request is ever delivered keys, so any may be repeated."""
    with KeyStore(Path(tmp_path_factory.mktemp("fuzz-etsi")) / "keys.db") as s:
        yield s


VALID_BODIES = [
    b'{"number": 2, "size": 256}',
    b"{}",
    b'{"key_IDs": [{"key_ID": "' + str(uuid.UUID(int=7)).encode() + b'"}]}',
    b'{"number": 1, "additional_slave_SAE_IDs": [], "extension_optional": [{"a": 1}]}',
]
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    st.sampled_from(VALID_BODIES).flatmap(mutated),
    key_requests().map(lambda d: json.dumps(d).encode()),
    key_ids_containers().map(lambda d: json.dumps(d).encode()),
    st.just(b"[" * 5000),
)


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[str, str, bytes, str]:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    sae = draw(st.one_of(st.sampled_from(["sae-a", "sae-b"]), st.text(min_size=1, max_size=10)))
    op = draw(st.sampled_from(["status", "enc_keys", "dec_keys", "x", "status/extra"]))
    path = f"{API_PREFIX}/{quote(sae, safe='')}/{op}"
    pairs = draw(queries)
    if pairs:
        path += "?" + urlencode(pairs)
    content_type = draw(st.sampled_from(["application/json", "text/plain", ""]))
    return method, path, draw(bodies), content_type


async def call(
    srv: Etsi014Server, method: str, path: str, body: bytes, ctype: str
) -> tuple[int, Any]:
    headers = {"Content-Type": ctype} if ctype else {}
    with mock.patch.object(etsi014, "_client_cn", lambda _request: srv.section.local_sae):
        async with TestClient(TestServer(srv._app())) as client:
            response = await client.request(method, path, data=body, headers=headers)
            text = await response.text()
    return response.status, json.loads(text) if text else None


@budget(30)
@given(http_requests(), st.sampled_from(["alice", "bob"]))
@example(("POST", f"{API_PREFIX}/sae-b/enc_keys", b"[" * 5000, "application/json"), "alice")
def test_any_request(store: KeyStore, req: tuple[str, str, bytes, str], role: str) -> None:
    srv = server(store, role)

    async def run() -> tuple[int, Any]:
        async with asyncio.timeout(10.0):
            return await call(srv, *req)

    status, body = asyncio.run(run())
    assert status in (200, 400, 401, 404, 405, 503), (status, body)
    if status == 200:
        assert req[0] == "GET" and req[1].split("?")[0].endswith("/status")
        return
    assert isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]
    assert body["message"] not in ("server error", "key store unavailable"), body
    assert srv.counters.responses[status] == 1
