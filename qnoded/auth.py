"""Wegman-Carter authentication of the classical peer channel.

QKD is only as secure as the classical channel's authentication: a man in the
middle who can forge frames makes one key with Alice and another with Bob.
The MAC here is information-theoretically secure, so it needs secret key
material that is used up: a pre-shared key (PSK) to start, then key reserved
from committed QKD blocks.

**The pool.**  :class:`AuthPool` keeps, in ``<state_dir>/auth.db``, an
append-only stream of secret bytes identical at both nodes: the PSK, then
block material in activation order.  The PSK's first ``HASH_REGION_BYTES``
are the hash key; everything after them is cut into 16-byte one-time pads
numbered 0, 1, 2, ...  Block material is added in two phases (the key store is
another SQLite file, so no transaction spans both): :meth:`AuthPool.stage`
stores it unusable, :meth:`AuthPool.activate` appends it to the stream,
:meth:`AuthPool.drop` wipes it.  Both nodes must activate the same bytes in
the same order (block commit order), or every MAC fails from then on.

**The MAC.**  A tagged frame's authenticated data is the transcript since the
sender's previous tag (header + payload of each frame sent without a MAC, in
order), then its own header + payload, then the pad index (u64 big-endian).
For each of ``POINTS`` secret points ``k_j`` (one set per direction, drawn
from the hash key) and the pad's j-th 8 bytes ``r_j``::

    t_j = (poly61(data, k_j) + r_j) mod 2^64

and the frame's trailer is ``pad index || t_0 || t_1`` (``TAG_LEN`` = 24 bytes).
Frames are self-delimiting (their headers carry length and seq), so distinct
transcripts are distinct byte strings.

**Which frames wait for a tag.**  Only the types in :data:`DEFERRABLE` (bulk
frames whose effect dies with the session: time tags, sifting, QBER samples,
Cascade queries and answers), at most :data:`MAX_DEFERRED_FRAMES` in a row and
:data:`MAX_DEFERRED_BYTES` of transcript; every other frame (handshake, block
start, verification, prepare, commit, abort, recovery, errors, keepalives)
carries a tag.  A node stores, commits or activates key only on a tagged frame,
and by then every frame of the peer's direction before it has been
authenticated; a frame that fails, or an untagged frame the rule does not
allow, ends the session and drops the block in flight.  Tagging per frame
would spend 128 pad bits per Cascade message, more secret key per block than
the block makes; with the transcript a 1e6-bit block spends a few kbit.
``poly61`` (:func:`qnoded.amplify.poly61`) is a polynomial of degree L + 1 in
``k`` for L 7-byte chunks, with the length as a coefficient, so it is
epsilon-almost-Delta-universal with epsilon = (L + 1)/(p - 1), p = 2^61 - 1, per
uniform point in [1, p - 1].  The pad is added mod 2^64 (as Poly1305 adds its
pad mod 2^128; Bernstein, FSE 2005): a uniform 64-bit ``r_j`` hides the hash
value perfectly, so tags say nothing about ``k`` and the hash key is reused
while each pad is used once (Wegman and Carter, JCSS 22, 1981; Shoup, CRYPTO
1996).  A forgery must hit ``poly61(m') - poly61(m) = delta`` as integers
(|delta| < p < 2^63, so mod 2^64 fixes it), which bounds it by epsilon per
point and by the product over independent points:
:func:`forgery_probability`.

**Pads, without reuse.**  In a connection (a *session*) the pads are
``base + 2*n + d``: n counts the sender's frames, d = 0 for the listener
(Alice) and 1 for the connector (Bob), ``base`` is even and chosen by Bob for
his first frame.  A node persists a *floor* above every pad it has used or
accepted, and raises it a chunk ahead (one fsync per ``chunk_pads / 2`` frames
per direction) *before* it uses or accepts a pad at or above it; a new session
starts at or above both floors (Bob chooses ``base`` = his floor, Alice
refuses a first pad below hers), and a node runs one session at a time (a new
one ends the old one).  So after any crash no pad is used twice, and an old
frame replayed after a restart is refused.  On a clean close the floor comes
back down to just above the pads actually used, so reconnects do not burn a
chunk.  Should Bob's floor be behind Alice's (she persisted further before a
crash), Alice answers his HELLO with an ERROR carrying ``auth_floor``,
authenticated with a pad of her own at her floor, and Bob skips ahead; that
hint pad is reused only to resend the identical ERROR, and a session still
running at Alice ends before it reaches the hint pad.

Pad and floor numbers are not secret and are logged; key material never is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import math
import os
import secrets
import sqlite3
import stat
import struct
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import structlog

from qnoded import durable
from qnoded.amplify import CHUNK_BYTES, P61, poly61
from qnoded.config import AuthSection
from qnoded.peer import (
    HEADER,
    AuthUnavailableError,
    FrameAuthError,
    MsgType,
    PeerClosedError,
    Role,
)

log = structlog.get_logger("qnoded.auth")

U64 = npt.NDArray[np.uint64]

MIN_PSK_BYTES = 4096
# 512 KiB: systemd passes at most 1 MiB of credentials to a unit, names and
# TLS keys included, and the PSK only has to last until blocks refill the pool.
DEFAULT_PSK_BYTES = 1 << 19
# The hash key comes from the PSK's first bytes; the rest is spare for re-draws.
HASH_REGION_BYTES = 1024
POINTS = 2  # independent hash points per direction
PAD_BYTES = 8 * POINTS
TAG_LEN = 8 + 8 * POINTS  # pad index + one 64-bit tag per point
# Frames that may travel without a MAC, covered by the sender's next tag (see
# the module docstring): their effect dies with the session.
DEFERRABLE = frozenset(
    {
        MsgType.TAGS,
        MsgType.SIFT,
        MsgType.QBER_SAMPLE,
        MsgType.QBER_RESULT,
        MsgType.EC_QUERY,
        MsgType.EC_ANSWER,
    }
)
# Bounds on what a receiver acts on before it is authenticated, and on the
# transcript held in memory: ~9 tags per direction for a 1e6-bit block's Cascade.
MAX_DEFERRED_FRAMES = 256
MAX_DEFERRED_BYTES = 16 * 1024 * 1024
# Persisting the floor this many pads ahead costs one fsync per chunk_pads / 2
# frames per direction; a crash wastes at most this many pads (16 KiB).
DEFAULT_CHUNK_PADS = 1024
PAGE_BYTES = 4096  # the pad stream is stored in pages, so used pages can be wiped
MAX_PAD_INDEX = 1 << 62
AUTH_DB = "auth.db"
MASK64 = (1 << 64) - 1
_INDEX = struct.Struct(">Q")
_SEQ = struct.Struct(">I")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS pads (page INTEGER PRIMARY KEY, material BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS staged (
    block_id TEXT PRIMARY KEY,
    material BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS activated (
    block_id TEXT PRIMARY KEY,
    start INTEGER NOT NULL,
    length INTEGER NOT NULL,
    activated REAL NOT NULL
);
"""


class AuthError(Exception):
    """Authentication cannot go on: no or bad PSK, the pool is exhausted or inconsistent.

    Messages name files, blocks and pad numbers, never key bytes.
    """


class PoolExhaustedError(AuthError, AuthUnavailableError):
    """No pad left to authenticate a frame: the node can make no more key.

    Also a ``ConnectionError``, so the peer link keeps running (and retrying)
    rather than crashing, and reports it in ``last_error``.
    """


# -- the pre-shared key ------------------------------------------------------------
def psk_path(cfg: AuthSection, environ: Mapping[str, str] | None = None) -> Path:
    """Where the PSK is: ``psk_file``, else ``$CREDENTIALS_DIRECTORY/<psk_credential>``."""
    if cfg.psk_file:
        return Path(cfg.psk_file)
    env = os.environ if environ is None else environ
    creds = env.get("CREDENTIALS_DIRECTORY", "")
    if not creds:
        raise AuthError(
            "no pre-shared key: set [auth] psk_file, or run under systemd with "
            f"LoadCredential={cfg.psk_credential}:/etc/qnoded/credentials/{cfg.psk_credential}"
        )
    return Path(creds) / cfg.psk_credential


def load_psk(cfg: AuthSection, environ: Mapping[str, str] | None = None) -> bytes:
    """The PSK's bytes; :class:`AuthError` naming the file if it is missing,
    unreadable, accessible to group/other or shorter than ``MIN_PSK_BYTES``."""
    return read_psk(psk_path(cfg, environ), credential=not cfg.psk_file)


def read_psk(path: Path, *, credential: bool = False) -> bytes:
    """``credential``: the file is a systemd credential, in the unit's private
    credentials directory, which newer systemd (256 on) shows as mode 0440 with
    an ACL for the service user: group read is allowed there, nothing else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AuthError(
            f"pre-shared key file {path} does not exist; create one with "
            f"`qnoded psk generate {path}` and install the same file at both nodes"
        ) from None
    except PermissionError:
        raise AuthError(f"pre-shared key file {path} is not readable by this user") from None
    except OSError as exc:
        raise AuthError(f"cannot open pre-shared key file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # of the file opened, not of whatever the path is now
        if not stat.S_ISREG(st.st_mode):
            raise AuthError(f"pre-shared key file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & (0o037 if credential else 0o077):
            raise AuthError(
                f"pre-shared key file {path} is accessible to group/other (mode {mode:04o}); "
                f"run chmod 600 {path}"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    except OSError as exc:
        raise AuthError(f"cannot read pre-shared key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) < MIN_PSK_BYTES:
        raise AuthError(
            f"pre-shared key file {path} holds {len(data)} bytes; at least {MIN_PSK_BYTES} "
            "are needed (qnoded psk generate writes 512 KiB)"
        )
    return data


def write_psk(path: Path, nbytes: int = DEFAULT_PSK_BYTES) -> None:
    """A new PSK of ``nbytes`` random bytes at ``path``, mode 0600; never overwrites."""
    if nbytes < MIN_PSK_BYTES:
        raise AuthError(f"a PSK needs at least {MIN_PSK_BYTES} bytes, asked for {nbytes}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise AuthError(f"{path} exists; refusing to overwrite a pre-shared key") from None
    except OSError as exc:
        raise AuthError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(secrets.token_bytes(nbytes))
        f.flush()
        os.fsync(f.fileno())


# -- the MAC ------------------------------------------------------------------------
def forgery_probability(
    payload_bytes: int, points: int = POINTS, transcript_bytes: int = 0
) -> float:
    """Upper bound on the chance that one forged tag is accepted (for one
    verification attempt) over a frame with a payload of at most ``payload_bytes``
    bytes after ``transcript_bytes`` of untagged frames.

    The authenticated data is transcript + header + payload + 8 index bytes, L
    7-byte chunks; per uniform point in [1, p - 1] the polynomial difference
    (degree <= L + 1, not zero for different data) minus any delta has at most
    L + 1 roots.  The worst case is ``forgery_probability(MAX_FRAME,
    transcript_bytes=MAX_DEFERRED_BYTES)``, about 2^-75.
    """
    nbytes = transcript_bytes + HEADER.size + payload_bytes + _INDEX.size
    chunks = math.ceil(nbytes / CHUNK_BYTES)
    return float(((chunks + 1) / (P61 - 1)) ** points)


def hash_points(region: bytes) -> tuple[U64, U64]:
    """The secret points (listener's frames, connector's frames), from the hash region.

    Each 8-byte little-endian word's low 61 bits are uniform on [0, p]; 0 and p
    are skipped so the points are uniform on [1, p - 1] (rejection sampling,
    deterministic, so both nodes draw the same).
    """
    found: list[int] = []
    for (word,) in struct.iter_unpack("<Q", region[: len(region) - len(region) % 8]):
        v = word & P61
        if 0 < v < P61:
            found.append(v)
            if len(found) == 2 * POINTS:
                break
    else:  # 2 * POINTS rejections among 128 words: probability ~ 2^-7000
        raise AuthError("the hash key region holds too few usable points")
    return (
        np.array(found[:POINTS], dtype=np.uint64),
        np.array(found[POINTS:], dtype=np.uint64),
    )


def mac(points: U64, data: bytes, pad: bytes) -> bytes:
    """``t_j = (poly61(data, k_j) + r_j) mod 2^64`` for each point, big-endian."""
    h = poly61(data, points)
    return b"".join(
        ((int(h[j]) + int.from_bytes(pad[8 * j : 8 * j + 8], "big")) & MASK64).to_bytes(8, "big")
        for j in range(len(points))
    )


def _describe(data: bytes) -> str:
    """ "TYPE seq N" of a frame's header bytes, for messages."""
    try:
        return f"{MsgType(data[5]).name} seq {_SEQ.unpack_from(data, 8)[0]}"
    except (ValueError, IndexError, struct.error):
        return "frame"


def _even(n: int) -> int:
    return n + (n & 1)


# -- the pool -------------------------------------------------------------------------
@dataclass(slots=True)
class _Hint:
    """A floor announcement: its pad, the floor it announced and the frame it tagged."""

    pad_index: int
    floor: int
    pad: bytes = field(repr=False)
    digest: bytes = b""
    trailer: bytes = b""


class AuthPool:
    """One node's authentication key material: the stream, the pads' floor, staged blocks.

    Owns ``auth.db`` exclusively (a second pool on the same file in any process
    would hand out the same pads).  Not thread-safe: use it from the event loop.
    """

    def __init__(
        self,
        path: str | Path,
        psk: bytes,
        *,
        psk_source: str = "<psk>",
        reserve_bytes: int = AuthSection().reserve_bytes,
        chunk_pads: int = DEFAULT_CHUNK_PADS,
    ) -> None:
        if chunk_pads < 2 or chunk_pads % 2:
            raise ValueError(f"chunk_pads must be even and >= 2, got {chunk_pads}")
        if len(psk) < MIN_PSK_BYTES:
            raise AuthError(
                f"pre-shared key {psk_source} holds {len(psk)} bytes, < {MIN_PSK_BYTES}"
            )
        self.path = Path(path)
        self.reserve_bytes = reserve_bytes
        self.chunk_pads = chunk_pads
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._lock(self.path)
        try:
            self._db = durable.connect(self.path, SCHEMA)
            try:
                self._import_or_check(psk, psk_source)
                self._load()
            except BaseException:
                self._db.close()
                raise
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._epoch = 0  # the session allowed to use pads; a new session ends older ones
        self._hint: _Hint | None = None
        self._cap: int | None = None  # the current session may not send at or beyond this pad

    @classmethod
    def open(
        cls,
        state_dir: str | Path,
        cfg: AuthSection,
        *,
        chunk_pads: int = DEFAULT_CHUNK_PADS,
        environ: Mapping[str, str] | None = None,
    ) -> AuthPool:
        """The node's pool, ``<state_dir>/auth.db``; imports the PSK from ``cfg`` on first run."""
        source = psk_path(cfg, environ)
        psk = read_psk(source)
        return cls(
            Path(state_dir) / AUTH_DB,
            psk,
            psk_source=str(source),
            reserve_bytes=cfg.reserve_bytes,
            chunk_pads=chunk_pads,
        )

    @staticmethod
    def _lock(path: Path) -> int:
        lock_path = path.with_name(path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AuthError(
                f"{path} is in use by another process: two pools on one file would reuse pads"
            ) from None
        return fd

    def _meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _import_or_check(self, psk: bytes, source: str) -> None:
        digest = hashlib.sha256(psk).hexdigest()
        stored = self._meta("psk_sha256")
        if stored is not None:
            if not hmac.compare_digest(str(stored), digest):
                imported = time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.localtime(float(self._meta("psk_imported")))
                )
                raise AuthError(
                    f"pre-shared key {source} differs from the one imported into {self.path} "
                    f"on {imported}: the two nodes would disagree on every MAC; restore the "
                    "original PSK, or give both nodes a new PSK and a fresh auth.db"
                )
            return
        region, stream = psk[:HASH_REGION_BYTES], psk[HASH_REGION_BYTES:]
        hash_points(region)  # fails now rather than at the first frame
        rows: list[tuple[str, Sequence[Any]]] = [
            ("INSERT INTO meta (key, value) VALUES (?, ?)", (k, v))
            for k, v in (
                ("version", 1),
                ("psk_sha256", digest),
                ("psk_bytes", len(psk)),
                ("psk_imported", time.time()),
                ("hash_region", region),
                ("floor", 0),
                ("stream_bytes", len(stream)),
            )
        ]
        rows += [
            ("INSERT INTO pads (page, material) VALUES (?, ?)", (i, stream[o : o + PAGE_BYTES]))
            for i, o in enumerate(range(0, len(stream), PAGE_BYTES))
        ]
        self._tx(rows)
        log.info(
            "pre-shared key imported into the authentication pool",
            path=str(self.path),
            psk_file=source,
            psk_bytes=len(psk),
            psk_fingerprint=digest[:16],  # to compare the nodes; a hash, not key bytes
        )

    def _load(self) -> None:
        self._points = hash_points(bytes(self._meta("hash_region")))
        self._floor = int(self._meta("floor"))
        self._stream = int(self._meta("stream_bytes"))
        # Pads below _low are used, accepted or skipped for good; the floor is
        # never lowered under it.  After a restart that is the persisted floor.
        self._low = self._floor
        # The next pad each direction (even: Alice's, odd: Bob's) may still use.
        # A page can be wiped only below both: one side may run far ahead of
        # the other (Bob's TAGS queue), and the slower direction's pads in
        # that page are still to be checked.
        self._need = [self._floor, self._floor]
        row = self._db.execute("SELECT min(page) FROM pads").fetchone()
        self._wiped_pages = 0 if row[0] is None else int(row[0])

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
        os.close(self._lock_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self, statements: Iterable[durable.Statement]) -> None:
        durable.execute_all(self._db, statements)

    # -- accounting -------------------------------------------------------------------
    @property
    def floor(self) -> int:
        """Persisted pad floor: every pad this node used or accepted is below it."""
        return self._floor

    @property
    def stream_bytes(self) -> int:
        """Activated pad stream (PSK after the hash region, then block material)."""
        return self._stream

    @property
    def available_bytes(self) -> int:
        """Pad stream above the floor: what sessions can still use."""
        return max(0, self._stream - PAD_BYTES * self._floor)

    @property
    def consumed_bytes(self) -> int:
        """Key material used up for good (hash key + pads used or skipped); never decreases."""
        return HASH_REGION_BYTES + PAD_BYTES * min(self._low, self._stream // PAD_BYTES)

    @property
    def staged_bytes(self) -> int:
        row = self._db.execute("SELECT coalesce(sum(length(material)), 0) FROM staged").fetchone()
        return int(row[0])

    def wanted_bytes(self) -> int:
        """Bytes to reserve from the next committed block: 0 while available +
        staged material covers ``reserve_bytes``, else enough to get a floor
        chunk (what one crash can burn) above it."""
        have = self.available_bytes + self.staged_bytes
        if have >= self.reserve_bytes:
            return 0
        want = self.reserve_bytes + PAD_BYTES * self.chunk_pads - have
        return -(-want // PAD_BYTES) * PAD_BYTES

    # -- block material (two-phase) ---------------------------------------------------
    def stage(self, block_id: uuid.UUID, material: bytes) -> None:
        """Store a block's reserved key, not yet usable (the key store commits next)."""
        if not material:
            raise AuthError(f"block {block_id}: no material to stage")
        bid = str(block_id)
        if self._db.execute("SELECT 1 FROM activated WHERE block_id = ?", (bid,)).fetchone():
            raise AuthError(f"block {block_id} is already in the authentication stream")
        row = self._db.execute(
            "SELECT material = ? FROM staged WHERE block_id = ?", (bytes(material), bid)
        ).fetchone()
        if row is not None:
            if not row[0]:
                raise AuthError(f"block {block_id} is already staged with other material")
            return
        self._tx(
            [
                (
                    "INSERT INTO staged (block_id, material, created) VALUES (?, ?, ?)",
                    (bid, bytes(material), time.time()),
                )
            ]
        )

    def activate(self, block_id: uuid.UUID) -> bool:
        """Append a staged block to the stream; False if it already is (idempotent).

        Both nodes must activate the same blocks in the same order.
        """
        bid = str(block_id)
        if self._db.execute("SELECT 1 FROM activated WHERE block_id = ?", (bid,)).fetchone():
            return False
        row = self._db.execute("SELECT material FROM staged WHERE block_id = ?", (bid,)).fetchone()
        if row is None:
            raise AuthError(f"block {block_id} is neither staged nor activated")
        material = bytes(row[0])
        start = self._stream
        rows = self._append_rows(start, material, self._last_page(start))
        rows += [
            *self._wipe_staged_rows(bid),
            (
                "INSERT INTO activated (block_id, start, length, activated) VALUES (?, ?, ?, ?)",
                (bid, start, len(material), time.time()),
            ),
            ("UPDATE meta SET value = ? WHERE key = 'stream_bytes'", (start + len(material),)),
        ]
        self._tx(rows)
        self._stream = start + len(material)
        log.info(
            "key material added to the authentication pool",
            block=bid,
            added_bytes=len(material),
            available_bytes=self.available_bytes,
        )
        return True

    def drop(self, block_id: uuid.UUID) -> bool:
        """Wipe a staged block (its commit failed); False if not staged (idempotent).

        An activated block is part of the stream and stays.
        """
        bid = str(block_id)
        if not self._db.execute("SELECT 1 FROM staged WHERE block_id = ?", (bid,)).fetchone():
            return False
        self._tx(self._wipe_staged_rows(bid))
        return True

    def staged(self) -> list[uuid.UUID]:
        """Blocks staged and neither activated nor dropped: reconcile them after a crash."""
        rows = self._db.execute("SELECT block_id FROM staged ORDER BY created").fetchall()
        return [uuid.UUID(r[0]) for r in rows]

    @staticmethod
    def _wipe_staged_rows(bid: str) -> list[tuple[str, Sequence[Any]]]:
        return [
            (
                "UPDATE staged SET material = zeroblob(length(material)) WHERE block_id = ?",
                (bid,),
            ),
            ("DELETE FROM staged WHERE block_id = ?", (bid,)),
        ]

    def _last_page(self, stream_bytes: int) -> bytes:
        """The stream's last page if it is partial (never wiped: only full pages are)."""
        page, off = divmod(stream_bytes, PAGE_BYTES)
        if not off:
            return b""
        row = self._db.execute("SELECT material FROM pads WHERE page = ?", (page,)).fetchone()
        if row is None or len(row[0]) != off:
            raise AuthError(f"{self.path}: pad page {page} is missing or damaged")
        return bytes(row[0])

    @staticmethod
    def _append_rows(start: int, material: bytes, last: bytes) -> list[tuple[str, Sequence[Any]]]:
        rows: list[tuple[str, Sequence[Any]]] = []
        page, off = divmod(start, PAGE_BYTES)
        pos = 0
        if off:  # fill the last, partial page; in Python: SQL's || would make it TEXT
            pos = min(PAGE_BYTES - off, len(material))
            rows.append(
                ("UPDATE pads SET material = ? WHERE page = ?", (last + material[:pos], page))
            )
            page += 1
        for o in range(pos, len(material), PAGE_BYTES):
            rows.append(
                (
                    "INSERT INTO pads (page, material) VALUES (?, ?)",
                    (page, material[o : o + PAGE_BYTES]),
                )
            )
            page += 1
        return rows

    # -- floors ----------------------------------------------------------------------
    def raise_floor(self, floor: int) -> None:
        """Skip every pad below ``floor`` (the peer's authenticated hint)."""
        if not 0 <= floor <= MAX_PAD_INDEX:
            raise AuthError(f"pad floor {floor} is out of range")
        floor = _even(floor)
        self._low = max(self._low, floor)
        self._need = [max(n, floor) for n in self._need]
        if floor > self._floor:
            log.warning(
                "authentication pad floor raised at the peer's request",
                old_floor=self._floor,
                floor=floor,
                skipped_bytes=PAD_BYTES * (floor - self._floor),
            )
            self._set_floor(floor)

    def _set_floor(self, floor: int) -> None:
        # Pages wholly below _low are never needed again: wipe them with the
        # floor, in one transaction (one fsync).
        wipe_to = min(PAD_BYTES * min(self._need), self._stream) // PAGE_BYTES
        rows: list[tuple[str, Sequence[Any]]] = [
            ("UPDATE meta SET value = ? WHERE key = 'floor'", (floor,))
        ]
        if wipe_to > self._wiped_pages:
            rows += [
                (
                    "UPDATE pads SET material = zeroblob(length(material)) WHERE page < ?",
                    (wipe_to,),
                ),
                ("DELETE FROM pads WHERE page < ?", (wipe_to,)),
            ]
        self._tx(rows)
        self._floor = floor
        self._wiped_pages = max(self._wiped_pages, wipe_to)

    def _reserve(self, pad_index: int) -> None:
        """Make sure the persisted floor is above ``pad_index`` before it is used or accepted."""
        self._low = max(self._low, pad_index + 1)
        d = pad_index % 2
        self._need[d] = max(self._need[d], pad_index + 1)
        if pad_index >= self._floor:
            self._set_floor(_even(pad_index + 1) + self.chunk_pads)

    def _release(self) -> None:
        """The current session ended cleanly: bring the floor down to the pads used."""
        target = _even(self._low)
        # No session: below _low neither direction will ever need a pad again.
        self._need = [max(n, self._low) for n in self._need]
        self._set_floor(min(target, self._floor))

    def _open_session(self, base: int | None) -> tuple[int, int]:
        """A new session at ``base`` (Bob: None, his floor); ends every older session."""
        if base is None:
            base = self._floor
        if base < self._floor or base % 2:
            raise AuthError(f"session base {base} is odd or below the floor {self._floor}")
        self._epoch += 1
        self._hint = None
        self._cap = None
        self._need = [max(n, base) for n in self._need]  # older sessions' pads are done
        self._reserve(base + 1)
        log.debug("authentication session opened", base=base, floor=self._floor)
        return base, self._epoch

    # -- pads ------------------------------------------------------------------------
    def _has(self, pad_index: int) -> bool:
        return 0 <= pad_index < MAX_PAD_INDEX and PAD_BYTES * (pad_index + 1) <= self._stream

    def _pad(self, pad_index: int) -> bytes | None:
        if not self._has(pad_index):
            return None
        page, off = divmod(PAD_BYTES * pad_index, PAGE_BYTES)
        row = self._db.execute(
            "SELECT substr(material, ?, ?) FROM pads WHERE page = ?", (off + 1, PAD_BYTES, page)
        ).fetchone()
        if row is None or len(row[0]) != PAD_BYTES:
            return None  # wiped: used long ago
        return bytes(row[0])

    def _pad_for_sending(self, pad_index: int) -> bytes:
        if self._cap is not None and pad_index >= self._cap:
            # A floor announcement took this pad (a HELLO came in below the floor).
            raise PeerClosedError(
                "authentication session ended: its next pad went to a floor announcement"
            )
        if not self._has(pad_index):
            raise PoolExhaustedError(
                f"authentication key pool exhausted: pad {pad_index} lies beyond the "
                f"{self._stream} bytes of activated key material; activate key from a "
                "committed block, or install a new PSK and a fresh auth.db at both nodes"
            )
        # Read before reserving: raising the floor may wipe the page this pad ends.
        pad = self._pad(pad_index)
        if pad is None:  # wiped pads are below _low, which sessions never start under
            raise AuthError(f"pad {pad_index} was already wiped")
        self._reserve(pad_index)
        return pad

    def _floor_hint(self) -> _Hint | None:
        """A pad at the floor to tag a floor announcement, and the new floor above it.

        Repeated announcements while the floor stays put reuse it, for the
        identical frame only (:meth:`_hint_trailer`), so replayed stale
        HELLOs cost no pads.
        """
        if self._hint is not None and self._hint.floor == self._floor:
            return self._hint
        h = self._floor
        pad = self._pad(h)
        if pad is None:
            return None
        self._low = max(self._low, h + 1)
        self._set_floor(h + 2)
        # A running session must not reach the pad given away (nor an earlier one's).
        self._cap = h if self._cap is None else min(self._cap, h)
        self._hint = _Hint(pad_index=h, floor=h + 2, pad=pad)
        log.info("announcing the authentication pad floor", pad=h, floor=h + 2)
        return self._hint

    def _hint_trailer(self, hint: _Hint, data: bytes) -> bytes:
        digest = hashlib.sha256(data).digest()
        if hint.trailer:
            if not hmac.compare_digest(digest, hint.digest):
                raise AuthError("refusing to reuse a floor-announcement pad for another frame")
            return hint.trailer
        index = _INDEX.pack(hint.pad_index)
        hint.trailer = index + mac(self._points[0], data + index, hint.pad)
        hint.digest, hint.pad = digest, b""
        return hint.trailer

    def channel_auth(self, role: Role) -> ChannelAuth:
        """A fresh authenticator for one connection: pass this method to ``PeerLink``."""
        return ChannelAuth(self, role)


# -- one connection ---------------------------------------------------------------
class ChannelAuth:
    """One connection's Wegman-Carter state; implements ``peer.SessionAuthenticator``."""

    def __init__(self, pool: AuthPool, role: Role) -> None:
        self._pool = pool
        self._d = 0 if role == "listen" else 1
        self._base: int | None = None
        self._epoch = -1
        self._sent = 0  # frames sent in this session, tagged or not
        self._tags_sent = 0  # pads used for them
        self._received = 0  # frames accepted in this session
        self._tags_received = 0
        # Untagged frames since the last tag, each way: the next tag covers them.
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._in: list[bytes] = []
        self._in_bytes = 0
        self._stale = False  # the peer's first frame was below our floor
        self._hint: _Hint | None = None  # armed: the next tag() announces our floor
        self._over = False  # no more tags or checks
        self._closed = False

    @property
    def tag_len(self) -> int:
        return TAG_LEN

    @property
    def base(self) -> int | None:
        """The session's first pad index (None before the first frame)."""
        return self._base

    def _require_live(self) -> None:
        if self._over:
            raise PeerClosedError("authentication session is over")
        if self._base is not None and self._epoch != self._pool._epoch:
            raise PeerClosedError("authentication session superseded by a newer connection")

    def _check_sent_seq(self, data: bytes) -> None:
        (seq,) = _SEQ.unpack_from(data, 8)
        if seq != self._sent & 0xFFFFFFFF:
            raise AuthError(f"frame seq {seq}, but this session has sent {self._sent} frames")

    def defers(self, msg_type: MsgType, payload_len: int) -> bool:
        """True if the next frame may go untagged (the receiver applies the same rule)."""
        return (
            self._base is not None
            and self._hint is None
            and msg_type in DEFERRABLE
            and len(self._out) < MAX_DEFERRED_FRAMES
            and self._out_bytes + HEADER.size + payload_len <= MAX_DEFERRED_BYTES
        )

    def defer(self, data: bytes) -> None:
        """``data`` (header + payload) goes without a MAC; the next :meth:`tag` covers it."""
        self._require_live()
        self._check_sent_seq(data)
        if not self.defers(MsgType(data[5]), len(data) - HEADER.size):
            raise AuthError(f"a {MsgType(data[5]).name} frame may not go without a MAC now")
        self._out.append(data)
        self._out_bytes += len(data)
        self._sent += 1

    def tag(self, data: bytes) -> bytes:
        """The trailer (pad index + tag) for the next frame this node sends; it
        covers the frames deferred since the previous tag."""
        self._require_live()
        if self._hint is not None:
            hint, self._hint, self._over = self._hint, None, True
            return self._pool._hint_trailer(hint, data)
        self._check_sent_seq(data)
        if self._base is None:
            if self._d == 0:
                raise AuthError("the listener cannot send before the connector's first frame")
            self._base, self._epoch = self._pool._open_session(None)
        index = self._base + 2 * self._tags_sent + self._d
        pad = self._pool._pad_for_sending(index)
        packed = _INDEX.pack(index)
        transcript = b"".join([*self._out, data, packed])
        self._out.clear()
        self._out_bytes = 0
        self._sent += 1
        self._tags_sent += 1
        return packed + mac(self._pool._points[self._d], transcript, pad)

    def accept_deferred(self, data: bytes) -> None:
        """Take the peer's next frame, sent without a MAC, into the transcript its
        next tag must cover; ``missing-mac`` if the rule does not let it wait."""
        self._require_live()
        what = _describe(data)
        if self._base is None:
            raise FrameAuthError("missing-mac", f"{what} without a MAC opened the session")
        if data[5] not in DEFERRABLE:
            raise FrameAuthError("missing-mac", f"{what} has no MAC; this kind must carry one")
        if len(self._in) >= MAX_DEFERRED_FRAMES or (
            self._in_bytes + len(data) > MAX_DEFERRED_BYTES
        ):
            raise FrameAuthError(
                "missing-mac",
                f"{what} has no MAC after {len(self._in)} untagged frames "
                f"({self._in_bytes} bytes); at most {MAX_DEFERRED_FRAMES} frames and "
                f"{MAX_DEFERRED_BYTES} bytes may wait for a tag",
            )
        self._in.append(data)
        self._in_bytes += len(data)
        self._received += 1

    def check(self, data: bytes, trailer: bytes) -> None:
        """Accept ``data`` (header + payload) as the peer's next frame or raise
        :class:`~qnoded.peer.FrameAuthError`; the floor is persisted before it returns."""
        self._require_live()
        if len(trailer) != TAG_LEN:
            raise FrameAuthError("mac-len", f"trailer of {len(trailer)} bytes, expected {TAG_LEN}")
        (index,) = _INDEX.unpack_from(trailer)
        peer_d = 1 - self._d
        if self._base is None:
            self._check_first(data, trailer, index)
            return
        expected = self._base + 2 * self._tags_received + peer_d
        if index != expected:
            if self._is_floor_hint(data, index, expected):
                self._verify(0, index, data, trailer)
                self._pool._reserve(index)
                self._over = True  # the handshake fails; the next dial starts above it
                return
            raise FrameAuthError(
                "pad",
                f"pad index {index}, expected {expected}: a replayed, reordered or injected frame",
            )
        try:
            self._verify(peer_d, index, data, trailer, self._in)
        except FrameAuthError:
            # The peer spent this pad on the frame it sent: put the floor above
            # it, as the peer's is, so the next session starts without a
            # floor announcement.  Only the expected index is reserved, never
            # one a forger picks.
            self._pool._reserve(index)
            raise
        self._pool._reserve(index)
        self._in.clear()
        self._in_bytes = 0
        self._received += 1
        self._tags_received += 1

    def _check_first(self, data: bytes, trailer: bytes, index: int) -> None:
        if self._d == 1:
            raise FrameAuthError("pad", f"a frame (pad {index}) arrived before this node's first")
        if index % 2 != 1 or index >= MAX_PAD_INDEX:
            raise FrameAuthError("pad", f"first pad index {index} is not a connector's pad")
        base = index - 1
        if base < self._pool.floor:
            self._stale = True
            raise FrameAuthError(
                "stale",
                f"first pad index {index} is below this node's pad floor {self._pool.floor}: "
                "a replayed frame, or the peer's floor is behind after a crash",
            )
        self._verify(1, index, data, trailer)
        self._base, self._epoch = self._pool._open_session(base)
        self._pool._reserve(index)
        self._received = self._tags_received = 1

    def _is_floor_hint(self, data: bytes, index: int, expected: int) -> bool:
        # Bob's first frame from Alice may be her floor announcement: an ERROR
        # tagged with one of her pads above this session's base.
        return (
            self._d == 1
            and self._received == 0
            and index % 2 == 0
            and expected < index < MAX_PAD_INDEX
            and len(data) > 5
            and data[5] == MsgType.ERROR
        )

    def _verify(
        self, d: int, index: int, data: bytes, trailer: bytes, transcript: Sequence[bytes] = ()
    ) -> None:
        pad = self._pool._pad(index)
        if pad is None:
            raise FrameAuthError(
                "pad",
                f"pad index {index} is not in this node's pool "
                f"({self._pool.stream_bytes // PAD_BYTES} pads activated)",
            )
        authenticated = b"".join([*transcript, data, trailer[: _INDEX.size]])
        expected = mac(self._pool._points[d], authenticated, pad)
        if not hmac.compare_digest(expected, trailer[_INDEX.size :]):
            covering = (
                f", covering {len(transcript)} untagged frames before it" if transcript else ""
            )
            raise FrameAuthError(
                "mac",
                f"MAC check failed on {_describe(data)} (pad {index}{covering}): a tampered "
                "or forged frame, or the nodes' key pools differ",
            )

    def verify(self, data: bytes, tag: bytes) -> bool:
        try:
            self.check(data, tag)
        except FrameAuthError:
            return False
        return True

    def hint(self) -> int | None:
        """After the peer's first frame was stale: the floor to announce (the next
        :meth:`tag` covers the ERROR that carries it), or None."""
        if not self._stale or self._over:
            return None
        self._hint = self._pool._floor_hint()
        return None if self._hint is None else self._hint.floor

    def raise_floor(self, floor: int) -> None:
        try:
            self._pool.raise_floor(floor)
        except AuthError as exc:  # authenticated, so a peer bug: do not crash the link on it
            log.error("peer announced an impossible pad floor", floor=floor, error=str(exc))

    def close(self) -> None:
        """The connection is over; the floor comes down to the pads actually used."""
        if self._closed:
            return
        self._closed = self._over = True
        if self._base is not None and self._epoch == self._pool._epoch:
            self._pool._release()
