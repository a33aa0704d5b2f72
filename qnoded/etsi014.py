"""ETSI GS QKD 014 V1.1.1 key delivery: a REST API over HTTPS with mutual TLS.

A node is a KME (key management entity) with one SAE (secure application
entity) attached; the peer node's SAE is the other end of the link.  Keys flow
one way, as the spec's master/slave pair does:

- at Alice's node the local SAE is the *master*: ``GET
  /api/v1/keys/{slave_SAE_ID}/status`` and ``GET|POST
  /api/v1/keys/{slave_SAE_ID}/enc_keys`` (spec 5.2, 5.3), with the peer's SAE
  as ``slave_SAE_ID``;
- at Bob's node the local SAE is the *slave*: ``GET|POST
  /api/v1/keys/{master_SAE_ID}/dec_keys`` (spec 5.4) with the key IDs its
  master got from Alice, and the peer's SAE as ``master_SAE_ID``.

Both stores hold the same keys under the same UUIDs, so the slave gets the
master's bytes by ID.  Replies are the spec's JSON containers (section 6) and
status codes: 200; 400 for a request that is malformed or outside what the
status advertises; 401 when the client certificate's CN (its SAE ID), the SAE
in the path or the operation does not match this node's link; 503 when the
keys are not there (yet) or the server fails.  Every error carries the
spec's Error container ``{"message": ..., "details": [...]}``.

Delivery is at most once: the keys of a reply are marked ``delivering`` in the
store before the reply is written and destroyed (overwritten, deleted) after
it, whether the write succeeded or not.  A key is audited once, as "key
delivered" on the ``qnoded.audit`` logger with its ID and the consuming SAE;
key bytes never reach a log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sqlite3
import ssl
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from aiohttp import web

from qnoded import strictjson
from qnoded.config import Etsi014Section, NodeConfig, Role
from qnoded.durable import StorageError
from qnoded.keystore import Key, KeyStore, KeyStoreError, KeysUnavailableError

log = structlog.get_logger("qnoded.etsi014")
audit = structlog.get_logger("qnoded.audit")

API_PREFIX = "/api/v1/keys"
INTERFACE = "etsi014"

# The spec's key_ID is a UUID in its canonical text form (6.3, 6.4); uuid.UUID
# alone would also take braces, URNs and bare hex, which no SAE should send.
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
# Query parameters are decimal integers; nine digits bound them without int()
# ever seeing a huge string.
_DECIMAL_RE = re.compile(r"[0-9]{1,9}")

KEY_REQUEST_FIELDS = (
    "number",
    "size",
    "additional_slave_SAE_IDs",
    "extension_mandatory",
    "extension_optional",
)
KEY_IDS_FIELDS = ("key_IDs", "key_IDs_extension")
KEY_ID_FIELDS = ("key_ID", "key_ID_extension")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Operation = Literal["status", "enc_keys", "dec_keys"]


class Etsi014Error(Exception):
    """The server cannot start: the message names the setting and the problem."""


class ApiError(Exception):
    """A refused request: its HTTP status and the spec's Error container (6.5)."""

    def __init__(
        self,
        status: int,
        message: str,
        details: Sequence[Mapping[str, Any]] = (),
        *,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = list(details)
        self.retry_after_s = retry_after_s

    def response(self) -> web.Response:
        body: dict[str, Any] = {"message": self.message}
        if self.details:
            body["details"] = self.details
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        return web.json_response(body, status=self.status, headers=headers)


def _bad_request(problems: Sequence[tuple[str, str]]) -> ApiError:
    """400 naming every problem: in the message, and one detail object per problem."""
    return ApiError(
        400,
        "; ".join(f"{name}: {text}" for name, text in problems),
        [{name: text} for name, text in problems],
    )


class _ResponseLostError(Exception):
    """A key container could not be written; its keys are already destroyed."""


@dataclass
class Etsi014Counters:
    """What the server did since it started; cumulative, for telemetry."""

    requests: int = 0
    keys_delivered: int = 0
    # Taken for a reply that could not be written: destroyed, never sent again.
    keys_destroyed: int = 0
    replies_lost: int = 0
    responses: Counter[int] = field(default_factory=Counter)

    def rejected(self, status: int) -> int:
        return self.responses[status]

    def telemetry(self) -> dict[str, int]:
        """Flat counters for the node's telemetry message (``etsi014_`` prefix)."""
        spec = (400, 401, 503)
        return {
            "etsi014_requests": self.requests,
            "etsi014_keys_delivered": self.keys_delivered,
            "etsi014_keys_destroyed": self.keys_destroyed,
            "etsi014_replies_lost": self.replies_lost,
            **{f"etsi014_rejected_{s}": self.responses[s] for s in spec},
            # 404/405/500 and the like: requests outside the API.
            "etsi014_rejected_other": sum(
                n for s, n in self.responses.items() if s >= 400 and s not in spec
            ),
        }


class Etsi014Server:
    """The node's ETSI GS QKD 014 endpoint: an async context manager serving HTTPS.

    ``async with Etsi014Server(...) as server:`` listens on ``section.listen``
    (port 0 picks a free one; see :attr:`port`) until the block ends.  It runs
    in the caller's event loop; the store is used from that loop only.
    Reusable, not reentrant.

    ``max_key_per_request`` bounds ``number`` and the key IDs of one request;
    ``max_key_count`` is what the status reports as the store's capacity (the
    store does not enforce one; the report is never below the stored count).
    """

    def __init__(
        self,
        section: Etsi014Section,
        store: KeyStore,
        *,
        node_id: str,
        peer_node_id: str,
        key_size_bits: int,
        role: Role,
        max_key_per_request: int = 128,
        max_key_count: int = 1_000_000,
        handshake_timeout_s: float = 10.0,
        keepalive_timeout_s: float = 30.0,
        shutdown_timeout_s: float = 5.0,
    ) -> None:
        for key in ("listen", "cert_file", "key_file", "ca_file", "local_sae", "remote_sae"):
            if not getattr(section, key):
                raise Etsi014Error(f"[etsi014] {key} is required")
        if section.local_sae == section.remote_sae:
            raise Etsi014Error("[etsi014] local_sae and remote_sae must differ")
        if key_size_bits <= 0 or key_size_bits % 8:
            raise Etsi014Error(f"key_size_bits must be a positive multiple of 8: {key_size_bits}")
        if max_key_per_request < 1 or max_key_count < 1:
            raise Etsi014Error("max_key_per_request and max_key_count must be at least 1")
        if role not in ("alice", "bob"):
            raise Etsi014Error(f"role must be 'alice' or 'bob', got {role!r}")
        host, sep, port = section.listen.rpartition(":")
        if not sep or not port.isdigit():
            raise Etsi014Error(f"[etsi014] listen {section.listen!r} is not HOST:PORT")
        self.section = section
        self.node_id = node_id
        self.peer_node_id = peer_node_id
        self.key_size_bits = key_size_bits
        self.role: Role = role
        self.max_key_per_request = max_key_per_request
        self.max_key_count = max_key_count
        self.counters = Etsi014Counters()
        self._store = store
        self._host = host.strip("[]")  # "[::1]:443" names an IPv6 address
        self._port = int(port)
        self._handshake_timeout_s = handshake_timeout_s
        self._keepalive_timeout_s = keepalive_timeout_s
        self._shutdown_timeout_s = shutdown_timeout_s
        # A Key IDs container costs about 60 bytes a key; anything far bigger is
        # not a request this server would accept, so it is not read.
        self._max_body_bytes = max(16_384, 256 * max_key_per_request)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    @classmethod
    def from_config(cls, cfg: NodeConfig, store: KeyStore) -> Etsi014Server:
        """The server a node configuration describes, delivering from ``store``."""
        return cls(
            cfg.etsi014,
            store,
            node_id=cfg.node.id,
            peer_node_id=cfg.peer.peer_id,
            key_size_bits=cfg.postprocessing.key_size_bits,
            role=cfg.node.role,
        )

    # -- lifecycle ----------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound TCP port (useful after listening on port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the ETSI 014 server is not running")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"https://{host}:{self.port}"

    def _ssl_context(self) -> ssl.SSLContext:
        s = self.section
        try:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=s.ca_file)
            ctx.load_cert_chain(s.cert_file, s.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise Etsi014Error(
                f"[etsi014] cannot load TLS files (cert_file {s.cert_file}, key_file"
                f" {s.key_file}, ca_file {s.ca_file}): {exc}"
            ) from exc
        # The spec asks for HTTPS with TLS 1.2 or later and mutual authentication.
        # A server context checks each client certificate against ca_file and
        # for the TLS-client purpose (its extended key usage); no certificate,
        # or one from another CA, fails the handshake before any HTTP is read.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[self._guard])
        sae = API_PREFIX + "/{sae_id}"
        app.router.add_get(sae + "/status", self._status, allow_head=False)
        app.router.add_get(sae + "/enc_keys", self._enc_keys, allow_head=False)
        app.router.add_post(sae + "/enc_keys", self._enc_keys)
        app.router.add_get(sae + "/dec_keys", self._dec_keys, allow_head=False)
        app.router.add_post(sae + "/dec_keys", self._dec_keys)
        return app

    async def __aenter__(self) -> Etsi014Server:
        if self._runner is not None:
            raise RuntimeError("the ETSI 014 server is already running (not reentrant)")
        ctx = self._ssl_context()
        # access_log=None: requests are counted and refusals logged here; a
        # generic access log would only repeat them.
        runner = web.AppRunner(
            self._app(),
            handle_signals=False,
            access_log=None,
            keepalive_timeout=self._keepalive_timeout_s,
            shutdown_timeout=self._shutdown_timeout_s,
        )
        await runner.setup()
        assert runner.server is not None  # setup() made it
        try:
            # The server is created here rather than through a TCPSite so the TLS
            # handshake gets a bound: an unauthenticated peer holds a socket for
            # at most handshake_timeout_s and never reaches the HTTP layer.
            self._server = await asyncio.get_running_loop().create_server(
                runner.server,
                self._host,
                self._port,
                ssl=ctx,
                ssl_handshake_timeout=self._handshake_timeout_s,
                ssl_shutdown_timeout=self._shutdown_timeout_s,
                reuse_address=True,
            )
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info(
            "etsi014 listening",
            url=self.url,
            role=self.role,
            local_sae=self.section.local_sae,
            remote_sae=self.section.remote_sae,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        server, runner = self._server, self._runner
        self._server = self._runner = None
        if server is not None:
            server.close()  # no new connections
        if runner is not None:
            await runner.cleanup()  # lets requests in flight finish, then closes
        if server is not None:
            await server.wait_closed()
        log.info("etsi014 stopped", **self.counters.telemetry())

    # -- the request path -----------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Authenticate every request, turn every refusal into the spec's Error container."""
        self.counters.requests += 1
        client = _client_cn(request)
        try:
            self._authenticate(client)
            response = await handler(request)
        except ApiError as exc:
            response = self._refuse(request, exc, client)
        except web.HTTPRequestEntityTooLarge:
            # The spec knows 400, not 413, for a request it will not take.
            too_big = ApiError(400, f"request body exceeds {self._max_body_bytes} bytes")
            response = self._refuse(request, too_big, client)
        except web.HTTPException as exc:  # the router's 404 and 405
            refused = ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}")
            response = self._refuse(request, refused, client)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
        except _ResponseLostError:
            # Part of a reply may be on the wire: only closing the connection is left.
            self.counters.replies_lost += 1
            raise
        except (KeyStoreError, sqlite3.Error, StorageError):
            log.exception("etsi014 key store failed", path=request.path)
            response = self._refuse(request, ApiError(503, "key store unavailable"), client)
        except Exception:  # any other failure is the spec's 503, logged with its traceback
            log.exception("etsi014 request failed", path=request.path)
            response = self._refuse(request, ApiError(503, "server error"), client)
        self.counters.responses[response.status] += 1
        return response

    def _refuse(self, request: web.Request, exc: ApiError, client: str | None) -> web.Response:
        # Refusals are security events (warning); bad requests and 503s are not.
        event = "etsi014 request refused" if exc.status == 401 else "etsi014 request rejected"
        (log.warning if exc.status == 401 else log.info)(
            event,
            status=exc.status,
            reason=exc.message,
            client_sae=client,
            method=request.method,
            path=strictjson.clip(request.path, 200),
            peer=request.remote,
        )
        return exc.response()

    def _authenticate(self, client: str | None) -> None:
        """Only the local SAE is served; the client certificate's CN is its SAE ID."""
        if client is None:
            raise ApiError(401, "the client certificate must carry one CN, the SAE ID")
        if client != self.section.local_sae:
            # The configured SAE is not named: a stranger learns nothing from a refusal.
            raise ApiError(401, f"SAE {client!r} is not served by this KME")

    def _authorise(self, request: web.Request, operation: Operation) -> None:
        """The path's SAE must be the peer's, and the operation this node's side of the link."""
        local, remote = self.section.local_sae, self.section.remote_sae
        named = request.match_info["sae_id"]
        if named != remote:
            raise ApiError(
                401, f"SAE {local!r} has no key link to SAE {strictjson.clip(named)!r} at this KME"
            )
        master_here = self.role == "alice"
        if operation == "dec_keys" and master_here:
            raise ApiError(
                401,
                f"SAE {local!r} is the master at this KME: it gets keys with enc_keys;"
                " dec_keys is for the slave SAE at the peer KME",
            )
        if operation != "dec_keys" and not master_here:
            raise ApiError(
                401,
                f"SAE {local!r} is the slave at this KME: it gets keys with dec_keys;"
                f" {operation} is for the master SAE at the peer KME",
            )

    # -- endpoints ------------------------------------------------------------------
    async def _status(self, request: web.Request) -> web.StreamResponse:
        """Get status (spec 5.2; Status data format 6.1)."""
        self._authorise(request, "status")
        _check_query(request, allowed=())
        stored, _bits = self._store.ready_count()
        return web.json_response(
            {
                "source_KME_ID": self.node_id,
                "target_KME_ID": self.peer_node_id,
                "master_SAE_ID": self.section.local_sae,
                "slave_SAE_ID": self.section.remote_sae,
                "key_size": self.key_size_bits,
                "stored_key_count": stored,
                "max_key_count": max(self.max_key_count, stored),
                "max_key_per_request": self.max_key_per_request,
                "max_key_size": self.key_size_bits,
                "min_key_size": self.key_size_bits,
                # Key multicast (additional_slave_SAE_IDs) is not offered.
                "max_SAE_ID_count": 0,
            }
        )

    async def _enc_keys(self, request: web.Request) -> web.StreamResponse:
        """Get key (spec 5.3): the master SAE takes ``number`` new keys."""
        self._authorise(request, "enc_keys")
        if request.method == "GET":
            # GET carries only number and size, as query parameters.
            query = _check_query(request, allowed=("number", "size"))
            number = self._number(_query_int(query, "number"), "number")
            self._size(_query_int(query, "size"))
        else:
            _check_query(request, allowed=())
            doc = await self._json_object(request)
            number = self._key_request(doc)
        try:
            keys = self._store.take_exactly(number)
        except KeysUnavailableError as exc:
            raise ApiError(
                503,
                f"{number} keys requested, {exc.ready} stored for SAE"
                f" {self.section.remote_sae!r}; retry when stored_key_count allows",
                [{"stored_key_count": exc.ready}],
                retry_after_s=1,
            ) from None
        return await self._deliver(request, keys, "enc_keys")

    async def _dec_keys(self, request: web.Request) -> web.StreamResponse:
        """Get key with key IDs (spec 5.4): the slave SAE takes the master's keys by ID."""
        self._authorise(request, "dec_keys")
        if request.method == "GET":
            # GET carries one key_ID as a query parameter.
            query = _check_query(request, allowed=("key_ID",))
            if "key_ID" not in query:
                raise _bad_request([("key_ID", "missing; GET dec_keys?key_ID=UUID")])
            kid = _uuid_or_none(query["key_ID"])
            if kid is None:
                raise _bad_request(
                    [("key_ID", f"{strictjson.clip(query['key_ID'])!r} is not a UUID")]
                )
            wanted = [kid]
        else:
            _check_query(request, allowed=())
            wanted = self._key_ids(await self._json_object(request))
        try:
            keys = self._store.take_ids(wanted)
        except KeysUnavailableError as exc:
            if exc.missing:
                # Unknown, or delivered already: asking again cannot succeed.
                raise ApiError(
                    400,
                    f"key_IDs not found (unknown or already delivered): {_some(exc.missing)}",
                    [{"key_ID": str(i)} for i in exc.missing],
                ) from None
            # The master's KME has committed these; this one will in a moment.
            raise ApiError(
                503,
                f"key_IDs not yet committed at this KME, retry shortly: {_some(exc.pending)}",
                [{"key_ID": str(i)} for i in exc.pending],
                retry_after_s=1,
            ) from None
        return await self._deliver(request, keys, "dec_keys")

    async def _deliver(
        self, request: web.Request, keys: Sequence[Key], operation: Operation
    ) -> web.StreamResponse:
        """Write the Key container (6.3), then destroy the keys whether or not it arrived."""
        ids = [k.key_id for k in keys]
        written = False
        try:
            body = json.dumps(
                {
                    "keys": [
                        {"key_ID": str(k.key_id), "key": base64.b64encode(k.material).decode()}
                        for k in keys
                    ]
                }
            ).encode()
            response = web.Response(body=body, content_type="application/json")
            await response.prepare(request)
            await response.write_eof()
            written = True
        except Exception as exc:
            raise _ResponseLostError(
                f"{operation} reply not written: {type(exc).__name__}"
            ) from exc
        finally:
            self._destroy(ids, request, operation, written=written)
        return response

    def _destroy(
        self, ids: Sequence[uuid.UUID], request: web.Request, operation: Operation, *, written: bool
    ) -> None:
        fields = {
            "key_ids": [str(i) for i in ids],
            "count": len(ids),
            "key_size_bits": self.key_size_bits,
            "consumer": self.section.local_sae,
            "peer_sae": self.section.remote_sae,
            "interface": INTERFACE,
            "operation": operation,
        }
        try:
            self._store.delivered(ids)
        except (KeyStoreError, sqlite3.Error, StorageError):
            # They stay 'delivering', and the store destroys those when it next opens.
            log.exception("etsi014 could not destroy delivered keys", **fields)
        if written:
            self.counters.keys_delivered += len(ids)
            audit.info("key delivered", **fields)
        else:
            self.counters.keys_destroyed += len(ids)
            log.warning("etsi014 keys destroyed undelivered", peer=request.remote, **fields)

    # -- request parsing ------------------------------------------------------------
    async def _json_object(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()  # bounded by client_max_size
        if not raw:
            raise ApiError(400, "POST needs a JSON body")
        try:
            doc = strictjson.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        except RecursionError:  # a few thousand nested brackets fit in a small body
            raise ApiError(400, "request body nests too deeply") from None
        if not isinstance(doc, dict):
            raise ApiError(400, f"request body must be a JSON object, not {_json_type(doc)}")
        return doc

    def _number(self, value: int | None, name: str) -> int:
        if value is None:
            return 1  # spec 6.2: number defaults to 1
        if not 1 <= value <= self.max_key_per_request:
            raise _bad_request(
                [(name, f"{value} is outside 1..{self.max_key_per_request} (max_key_per_request)")]
            )
        return value

    def _size(self, value: int | None) -> None:
        # Keys are stored in one size and each ID names one stored key, so only
        # that size can be delivered (min_key_size = max_key_size = key_size).
        if value is not None and value != self.key_size_bits:
            raise _bad_request(
                [("size", f"{value} bits is not supported; this KME delivers {self.key_size_bits}")]
            )

    def _key_request(self, doc: Mapping[str, Any]) -> int:
        """Validate a Key request (6.2); returns the number of keys asked for."""
        problems = [
            (name, "unknown field; a Key request has " + ", ".join(KEY_REQUEST_FIELDS))
            for name in doc
            if name not in KEY_REQUEST_FIELDS
        ]
        number = doc.get("number")
        size = doc.get("size")
        for name, value in (("number", number), ("size", size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                problems.append((name, f"must be an integer, got {_json_type(value)}"))
        slaves = doc.get("additional_slave_SAE_IDs")
        if slaves is not None:
            if not isinstance(slaves, list) or not all(isinstance(s, str) for s in slaves):
                problems.append(("additional_slave_SAE_IDs", "must be an array of strings"))
            elif slaves:
                problems.append(
                    (
                        "additional_slave_SAE_IDs",
                        "key multicast is not supported (max_SAE_ID_count 0)",
                    )
                )
        for name in ("extension_mandatory", "extension_optional"):
            value = doc.get(name)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
                problems.append((name, "must be an array of objects"))
            elif name == "extension_mandatory" and value:
                # The KME shall handle these or return an error (6.2); it handles none.
                names = ", ".join(sorted({str(k) for e in value for k in e}))
                problems.append((name, f"unsupported extensions: {strictjson.clip(names)}"))
            # extension_optional: the KME may ignore it (6.2), and does.
        if problems:
            raise _bad_request(problems)
        self._size(size)
        return self._number(number, "number")

    def _key_ids(self, doc: Mapping[str, Any]) -> list[uuid.UUID]:
        """Validate a Key IDs container (6.4); returns the UUIDs in the order given."""
        problems = [
            (name, "unknown field; a Key IDs container has " + ", ".join(KEY_IDS_FIELDS))
            for name in doc
            if name not in KEY_IDS_FIELDS
        ]
        entries = doc.get("key_IDs")
        if not isinstance(entries, list) or not entries:
            problems.append(("key_IDs", 'must be a non-empty array of {"key_ID": UUID}'))
            raise _bad_request(problems)
        if len(entries) > self.max_key_per_request:
            problems.append(
                (
                    "key_IDs",
                    f"{len(entries)} IDs; at most {self.max_key_per_request} per request"
                    " (max_key_per_request)",
                )
            )
            raise _bad_request(problems)
        ids: list[uuid.UUID] = []
        for i, entry in enumerate(entries):
            where = f"key_IDs[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("key_ID"), str):
                problems.append((where, "must be an object with a key_ID string"))
                continue
            extra = [k for k in entry if k not in KEY_ID_FIELDS]
            if extra:
                problems.append(
                    (where, f"unknown fields {strictjson.clip(', '.join(map(str, extra)))}")
                )
            kid = _uuid_or_none(entry["key_ID"])
            if kid is None:
                problems.append((where, f"{strictjson.clip(entry['key_ID'])!r} is not a UUID"))
            elif kid in ids:
                problems.append((where, f"{kid} is asked for twice"))
            else:
                ids.append(kid)
        if problems:
            raise _bad_request(problems)
        return ids


# -- helpers ------------------------------------------------------------------------
def _client_cn(request: web.Request) -> str | None:
    """The CN of the verified client certificate, or None unless there is exactly one."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    names = [
        value
        for rdn in (cert or {}).get("subject", ())
        for name, value in rdn
        if name == "commonName"
    ]
    return names[0] if len(names) == 1 and isinstance(names[0], str) else None


def _check_query(request: web.Request, *, allowed: Sequence[str]) -> dict[str, str]:
    """The query parameters as a dict; 400 for an unknown or repeated one."""
    problems = []
    for name in set(request.query):
        if name not in allowed:
            hint = "takes " + ", ".join(allowed) if allowed else "takes no parameters"
            problems.append(
                (strictjson.clip(name), f"unknown parameter; {request.method} here {hint}")
            )
        elif len(request.query.getall(name)) > 1:
            problems.append((name, "given more than once"))
    if problems:
        raise _bad_request(sorted(problems))
    return dict(request.query)


def _query_int(query: Mapping[str, str], name: str) -> int | None:
    if name not in query:
        return None
    text = query[name]
    if not _DECIMAL_RE.fullmatch(text):
        raise _bad_request([(name, f"{strictjson.clip(text)!r} is not a positive decimal integer")])
    return int(text)


def _uuid_or_none(text: str) -> uuid.UUID | None:
    """The UUID for canonical UUID text, else None."""
    return uuid.UUID(text) if _UUID_RE.fullmatch(text) else None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    return names.get(type(value), type(value).__name__)


def _some(ids: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in ids[:5])
    return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
