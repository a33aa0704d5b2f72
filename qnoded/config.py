"""Node configuration: one TOML file, validated completely before anything starts.

Every mistake is reported as a :class:`ConfigError` that names the file, the
key and how to fix it, so an operator reading ``journalctl`` knows what to
change.  Units live in key names (``_ps``, ``_hz``, ``_s``, ``_km``); a key
with the wrong unit suffix is an unknown key, and the error suggests the
right one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

Role = Literal["alice", "bob"]
Protocol = Literal["bb84", "bbm92"]


class ConfigError(Exception):
    """A configuration mistake: where it is, what is wrong and how to fix it."""

    def __init__(self, source: str, key: str, problem: str, fix: str = "") -> None:
        self.source = source
        self.key = key
        self.problem = problem
        self.fix = fix
        text = f"{source}: {key}: {problem}"
        if fix:
            text += f" (fix: {fix})"
        super().__init__(text)


@dataclass(frozen=True, slots=True)
class NodeSection:
    id: str
    role: Role
    protocol: Protocol = "bb84"


@dataclass(frozen=True, slots=True)
class PeerSection:
    """The classical channel: Alice listens, Bob connects."""

    peer_id: str
    listen: str = ""
    connect: str = ""
    timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class MqttSection:
    broker: str = "127.0.0.1:1883"
    telemetry_interval_s: float = 1.0
    username: str = ""
    password_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # Deliver keys on qkd/v1/<node>/keys/<peer> (QoS 1, never retained).
    publish_keys: bool = True


@dataclass(frozen=True, slots=True)
class TimingSection:
    """Offset lock and tracking between the two nodes' clocks."""

    max_offset_ps: int = 2_000_000_000
    resolution_ps: int = 50
    coincidence_window_ps: int = 2_000
    lock_min_snr: float = 6.0
    lock_min_events: int = 400
    # The lock's cost grows with Bob's tags times Alice's tag density; beyond
    # this many Bob tags a uniform subsample carries enough true pairs.
    lock_max_events: int = 4000
    lock_max_duration_ps: int = 5_000_000_000_000
    track_gain: float = 0.02


@dataclass(frozen=True, slots=True)
class SiftingSection:
    qber_alarm_threshold: float = 0.11
    max_batches_in_flight: int = 64


@dataclass(frozen=True, slots=True)
class PostprocessingSection:
    """From sifted bits to secret key, one block at a time."""

    # Z-basis sifted bits per block (all intensity classes): Lim's n_Z.
    block_bits: int = 1_000_000
    eps_sec: float = 1e-10
    eps_cor: float = 1e-15
    # Keys are cut from a block's secret bits in this size and stored under UUIDs.
    key_size_bits: int = 256


@dataclass(frozen=True, slots=True)
class AuthSection:
    """Wegman-Carter authentication of the classical channel.

    The pre-shared secret is never in the config text: it is read from
    ``psk_file`` or, under systemd, from ``$CREDENTIALS_DIRECTORY/<psk_credential>``
    (``LoadCredential=``).
    """

    psk_file: str = ""
    psk_credential: str = "qnoded-psk"
    # Below this many pool bytes left, key is reserved from the next committed block.
    reserve_bytes: int = 65_536


@dataclass(frozen=True, slots=True)
class Etsi014Section:
    """ETSI GS QKD 014 key delivery over HTTPS with mutual TLS; off unless ``listen`` is set."""

    listen: str = ""
    cert_file: str = ""
    key_file: str = ""
    # CA that signs the SAEs' client certificates; the certificate CN is the SAE ID.
    ca_file: str = ""
    # The SAE attached to this node, and the one attached to the peer node.
    local_sae: str = ""
    remote_sae: str = ""


@dataclass(frozen=True, slots=True)
class MetricsSection:
    """The Prometheus endpoint (GET /metrics, plain HTTP); off unless the section is there."""

    listen: str = ""


@dataclass(frozen=True, slots=True)
class StateSection:
    directory: str = "/var/lib/qnoded"
    # Cap on the key store's file, in bytes (0: none).  Keys nobody fetches pile
    # up; past the cap blocks are refused with a key-store alarm instead of
    # filling the disk the node's other state lives on.
    key_store_max_bytes: int = 0


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One row of the device table: a name, a driver and its options."""

    name: str
    driver: str
    options: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class NodeConfig:
    source: str
    node: NodeSection
    peer: PeerSection
    mqtt: MqttSection = field(default_factory=MqttSection)
    timing: TimingSection = field(default_factory=TimingSection)
    sifting: SiftingSection = field(default_factory=SiftingSection)
    state: StateSection = field(default_factory=StateSection)
    postprocessing: PostprocessingSection = field(default_factory=PostprocessingSection)
    auth: AuthSection = field(default_factory=AuthSection)
    etsi014: Etsi014Section = field(default_factory=Etsi014Section)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    devices: tuple[DeviceSpec, ...] = ()
    simulation: Mapping[str, Any] | None = None


_SECTIONS: dict[str, type[Any]] = {
    "node": NodeSection,
    "peer": PeerSection,
    "mqtt": MqttSection,
    "timing": TimingSection,
    "sifting": SiftingSection,
    "state": StateSection,
    "postprocessing": PostprocessingSection,
    "auth": AuthSection,
    "etsi014": Etsi014Section,
    "metrics": MetricsSection,
}
_FREE_TABLES = ("devices", "simulation")


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid keys: " + ", ".join(sorted(options))


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def _coerce(source: str, key: str, tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(source, key, f"{value!r} is not allowed", "use " + _type_name(tp))
        return value
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"union fields are not supported in config ({key})")
    # bool is an int in Python; TOML keeps them apart and so do we.
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(
            source,
            key,
            f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}",
            f"write {key.rsplit('.', 1)[-1]} as {_type_name(tp)}",
        )
    if tp is float:
        return float(value)
    return value


def _section(source: str, name: str, cls: type[Any], table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(source, f"[{name}]", "must be a table", f"write it as [{name}]")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(source, f"[{name}] {key}", "unknown key", _suggest(key, list(fields)))
        values[key] = _coerce(source, f"[{name}] {key}", hints[key], value)
    for fname, f in fields.items():
        missing_default = (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if missing_default and fname not in values:
            raise ConfigError(
                source, f"[{name}] {fname}", "is required", f"add {fname} = ... under [{name}]"
            )
    for key, value in values.items():
        # TOML has nan and inf; every number here is a size, a time or a fraction.
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(source, f"[{name}] {key}", f"must be a finite number, got {value}")
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ConfigError(source, f"[{name}] {key}", f"must not be negative, got {value}")
    return cls(**values)


def _hostport(source: str, key: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    # isdigit() alone also takes digits int() refuses ("²") or other scripts ("٣").
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(source, key, f"{value!r} is not HOST:PORT", "e.g. 127.0.0.1:7001")


def parse_config(text: str, source: str = "<config>") -> NodeConfig:  # noqa: PLR0912 - one check per rule reads best flat
    """Parse and validate a node configuration from TOML text."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "TOML", str(exc), "check the syntax at that line") from exc
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError(source, "TOML", "arrays or inline tables nest too deeply") from None
    known = list(_SECTIONS) + list(_FREE_TABLES)
    for key in raw:
        if key not in known:
            raise ConfigError(source, f"[{key}]", "unknown section", _suggest(key, known))
    for required in ("node", "peer"):
        if required not in raw:
            raise ConfigError(source, f"[{required}]", "section is missing", f"add [{required}]")
    sections = {
        name: _section(source, name, cls, raw[name])
        for name, cls in _SECTIONS.items()
        if name in raw
    }
    node: NodeSection = sections["node"]
    peer: PeerSection = sections["peer"]
    if node.role == "alice" and not peer.listen:
        raise ConfigError(
            source, "[peer] listen", "Alice listens for Bob", "add listen = HOST:PORT"
        )
    if node.role == "bob" and not peer.connect:
        raise ConfigError(
            source, "[peer] connect", "Bob connects to Alice", "add connect = HOST:PORT"
        )
    for key in ("listen", "connect"):
        if getattr(peer, key):
            _hostport(source, f"[peer] {key}", getattr(peer, key))
    mqtt: MqttSection = sections.get("mqtt", MqttSection())
    _hostport(source, "[mqtt] broker", mqtt.broker)
    if mqtt.telemetry_interval_s <= 0 or mqtt.telemetry_interval_s > 60:
        raise ConfigError(
            source,
            "[mqtt] telemetry_interval_s",
            "must be in (0, 60]",
            "telemetry is at least 1/min",
        )
    sifting: SiftingSection = sections.get("sifting", SiftingSection())
    if not 0.0 < sifting.qber_alarm_threshold <= 0.5:
        raise ConfigError(source, "[sifting] qber_alarm_threshold", "must be in (0, 0.5]")
    _check_postprocessing(source, sections.get("postprocessing", PostprocessingSection()))
    etsi: Etsi014Section = sections.get("etsi014", Etsi014Section())
    if etsi.listen:
        _hostport(source, "[etsi014] listen", etsi.listen)
        for key in ("cert_file", "key_file", "ca_file", "local_sae", "remote_sae"):
            if not getattr(etsi, key):
                raise ConfigError(
                    source, f"[etsi014] {key}", "is required when listen is set", f"add {key}"
                )
        if etsi.local_sae == etsi.remote_sae:
            # The two ends of the key link; the server refuses to start with one
            # SAE at both, so say it here rather than after the peer link is up.
            raise ConfigError(
                source,
                "[etsi014] remote_sae",
                f"is the same SAE as local_sae ({etsi.local_sae!r})",
                "remote_sae is the SAE attached to the peer node",
            )
        if mqtt.publish_keys:
            # A key leaves a node once: two delivery paths would split the keys between them.
            raise ConfigError(
                source,
                "[mqtt] publish_keys",
                "keys are delivered either over MQTT or over ETSI 014, not both",
                "set publish_keys = false to deliver over ETSI 014",
            )
    state: StateSection = sections.get("state", StateSection())
    if state.key_store_max_bytes and state.key_store_max_bytes < 65_536:
        raise ConfigError(
            source,
            "[state] key_store_max_bytes",
            f"{state.key_store_max_bytes} is below the store's own tables",
            "use 0 (no cap) or at least 65536",
        )
    if "metrics" in sections:
        # A [metrics] section means "serve": an empty or missing listen is a mistake.
        _hostport(source, "[metrics] listen", sections["metrics"].listen)
    devices = _devices(source, raw.get("devices", {}))
    simulation = raw.get("simulation")
    if simulation is not None and not isinstance(simulation, dict):
        raise ConfigError(source, "[simulation]", "must be a table")
    return NodeConfig(
        source=source,
        devices=devices,
        simulation=simulation,
        **sections,
    )


def _check_postprocessing(source: str, pp: PostprocessingSection) -> None:
    if not 10_000 <= pp.block_bits <= 100_000_000:
        raise ConfigError(
            source,
            "[postprocessing] block_bits",
            f"{pp.block_bits} is outside 10000..100000000",
            "finite-key bounds need blocks of 1e6 bits or more for a useful rate",
        )
    for key in ("eps_sec", "eps_cor"):
        value = getattr(pp, key)
        if not 0.0 < value < 1e-3:
            raise ConfigError(source, f"[postprocessing] {key}", f"{value} is not in (0, 1e-3)")
    if pp.key_size_bits % 8 or not 64 <= pp.key_size_bits <= 8192:
        raise ConfigError(
            source,
            "[postprocessing] key_size_bits",
            f"{pp.key_size_bits} must be a multiple of 8 in 64..8192",
            "256 suits AES-256",
        )


def _devices(source: str, table: Any) -> tuple[DeviceSpec, ...]:
    if not isinstance(table, dict):
        raise ConfigError(source, "[devices]", "must be a table of tables", "[devices.NAME]")
    specs = []
    for name, body in table.items():
        if not isinstance(body, dict):
            raise ConfigError(
                source, f"[devices.{name}]", "must be a table", f"write [devices.{name}]"
            )
        driver = body.get("driver")
        if not isinstance(driver, str) or not driver:
            raise ConfigError(
                source,
                f"[devices.{name}] driver",
                "is required",
                "name a driver listed by 'qnoded drivers'",
            )
        options = {k: v for k, v in body.items() if k != "driver"}
        specs.append(DeviceSpec(name=name, driver=driver, options=options))
    return tuple(specs)


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate a config file; :class:`ConfigError` on any mistake."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), "file", f"cannot be read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(p), "file", f"is not UTF-8 text (byte {exc.start})", "save it as UTF-8"
        ) from None
    return parse_config(text, source=str(p))
