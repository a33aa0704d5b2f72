"""The optional Prometheus endpoint: the MQTT telemetry's figures at ``GET /metrics``.

One source: the payload :meth:`Node._telemetry_loop <qnoded.node.Node._telemetry_loop>`
publishes on ``qkd/v1/<node>/telemetry`` is also handed to
:meth:`MetricsExporter.update`, and :class:`TelemetryCollector` builds metric
families from that latest snapshot at scrape time.  Nothing is counted twice
and nothing is counted here, so a scrape shows exactly the figures of one
telemetry message (``qnoded_telemetry_timestamp_seconds`` is that message's
``time``).  Before the first telemetry message only ``qnoded_info`` is served.
The telemetry carries no key material and neither does this endpoint.

Every series has a ``node`` label (``[node] id``), so a dashboard can join
them with the MQTT topics; ``qnoded_info{node,peer,role,protocol,version} 1``
names the link.  Values are converted to base units (picoseconds to seconds,
ppm to a ratio, bytes of authentication key to bits); a field that is ``None``
(Bob has no clock model, no block yet, ...) has no sample.  Counters are the
node's cumulative figures since it started; the telemetry's own per-interval
rates are exported as gauges too, though ``rate()`` over the counters is what
alerts should use.

====================================  =======  ====================================================
telemetry field                       type     metric
====================================  =======  ====================================================
node_id, role, protocol               gauge    qnoded_info{peer,role,protocol,version}
state                                 gauge    qnoded_state{state} (1 current, 0 other)
tags_processed                        counter  qnoded_tags_total
batches                               counter  qnoded_batches_total
dropped_batches                       counter  qnoded_batches_dropped_total
rejected_batches                      counter  qnoded_batches_rejected_total
coincidences                          counter  qnoded_coincidences_total
multi_clicks                          counter  qnoded_multi_clicks_total
sifted_bits                           counter  qnoded_sifted_bits_total
raw_key_bits                          counter  qnoded_raw_key_bits_total
qber_sample_bits                      counter  qnoded_qber_sample_bits_total
qber_sample_errors                    counter  qnoded_qber_sample_errors_total
qber                                  gauge    qnoded_qber{basis="x",scope="run"}
qber_interval                         gauge    qnoded_qber{basis="x",scope="interval"}
last_block.qber_x, last_block.qber_z  gauge    qnoded_qber{basis="x|z",scope="last_block"}
locked                                gauge    qnoded_locked (0 or 1)
offset_ps                             gauge    qnoded_clock_offset_seconds
drift_ppm                             gauge    qnoded_clock_drift_ratio
lock_offset_ps                        gauge    qnoded_clock_lock_offset_seconds
lock_drift_ppm                        gauge    qnoded_clock_lock_drift_ratio
mqtt_dropped_telemetry                counter  qnoded_mqtt_telemetry_dropped_total
disclosed_bytes.<message>             counter  qnoded_disclosed_bytes_total{message}
blocks_accepted, blocks_rejected      counter  qnoded_blocks_total{outcome="accepted|rejected"}
block_reject_reasons.<reason>         counter  qnoded_blocks_rejected_by_reason_total{reason}
secret_bits                           counter  qnoded_secret_key_bits_total
net_secret_bits                       counter  qnoded_net_secret_key_bits_total
secret_keys                           counter  qnoded_secret_keys_total
ec_leak_bits                          counter  qnoded_ec_leaked_bits_total
ec_efficiency                         gauge    qnoded_ec_efficiency
auth_key_bits_reserved                counter  qnoded_auth_key_bits_reserved_total
auth_key_bits_consumed                counter  qnoded_auth_key_bits_consumed_total
auth_key_bits_available               gauge    qnoded_auth_key_bits_available
auth_failures (sum over kinds)        counter  qnoded_auth_failures_total
auth_failures.<kind>                  counter  qnoded_auth_failures_by_kind_total{kind}
stored_keys                           gauge    qnoded_stored_keys
stored_key_bits                       gauge    qnoded_stored_key_bits
keys_delivered                        counter  qnoded_keys_delivered_total
keys_destroyed_undelivered            counter  qnoded_keys_destroyed_undelivered_total
etsi014_requests                      counter  qnoded_etsi014_requests_total
etsi014_keys_delivered                counter  qnoded_etsi014_keys_delivered_total
etsi014_keys_destroyed                counter  qnoded_etsi014_keys_destroyed_total
etsi014_replies_lost                  counter  qnoded_etsi014_replies_lost_total
etsi014_rejected_{400,401,503,other}  counter  qnoded_etsi014_rejected_requests_total{status}
signal_gain, decoy_gain, vacuum_gain  gauge    qnoded_gain_ratio{intensity}
pulses.<intensity>                    counter  qnoded_pulses_total{intensity}
last_block.accepted                   gauge    qnoded_last_block_accepted (0 or 1)
last_block.n                          gauge    qnoded_last_block_bits
last_block.leak_ec_bits               gauge    qnoded_last_block_ec_leaked_bits
last_block.ec_efficiency              gauge    qnoded_last_block_ec_efficiency
last_block.ec_rounds                  gauge    qnoded_last_block_ec_rounds
last_block.secret_bits                gauge    qnoded_last_block_secret_key_bits
last_block.keys                       gauge    qnoded_last_block_keys
last_block.auth_bytes (x 8)           gauge    qnoded_last_block_auth_key_bits
last_block.phi_z                      gauge    qnoded_last_block_phase_error_ratio
last_block.key_length                 gauge    qnoded_last_block_key_length_bits
last_block.seconds                    gauge    qnoded_last_block_duration_seconds
tags_per_s                            gauge    qnoded_interval_tags_per_second
coincidences_per_s                    gauge    qnoded_interval_coincidences_per_second
rss_bytes                             gauge    qnoded_process_resident_memory_bytes
open_fds                              gauge    qnoded_process_open_fds
asyncio_tasks                         gauge    qnoded_process_asyncio_tasks
sifted_bits_per_s                     gauge    qnoded_interval_sifted_bits_per_second
raw_key_bits_per_s                    gauge    qnoded_interval_raw_key_bits_per_second
secret_key_bits_per_s                 gauge    qnoded_interval_secret_key_bits_per_second
channel_rates_hz.<channel>            gauge    qnoded_channel_count_rate_hertz{channel}
detectors[] (``error`` or not)        gauge    qnoded_detector_up{detector} (0 or 1)
detectors[].count_rate_hz             gauge    qnoded_detector_count_rate_hertz{detector,channel}
detectors[].temperature_k             gauge    qnoded_detector_temperature_kelvin{detector,channel}
detectors[].bias_v                    gauge    qnoded_detector_bias_volts{detector,channel}
detectors[].latched                   gauge    qnoded_detector_latched{detector,channel}
detectors[].photocurrent_a            gauge    qnoded_detector_photocurrent_amperes{detector,...}
time                                  gauge    qnoded_telemetry_timestamp_seconds
time (scrape time minus it)           gauge    qnoded_telemetry_age_seconds
interval_s                            gauge    qnoded_telemetry_interval_seconds
qber_alarm_threshold                  gauge    qnoded_qber_alarm_threshold_ratio
====================================  =======  ====================================================

Not exported: the strings ``last_block.block_id`` and ``last_block.reason`` (a
new label value per block would be a new series per block; the reasons are
counted by kind above) and the ``final`` marker of the last message.
:func:`unmapped` lists any numeric field of a payload this table does not
cover, so a field added to the telemetry without a metric fails a test.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

import qnoded
from qnoded.config import NodeConfig
from qnoded.mqtt import STATES

log = structlog.get_logger("qnoded.metrics")

Kind = Literal["counter", "gauge"]

# The states a node reports (mqtt.STATES, the one list); each gets a 0/1 series
# so an alert can match on ``qnoded_state{state="degraded"} == 1``.

PS = 1e-12  # seconds per picosecond
PPM = 1e-6


@dataclass(frozen=True, slots=True)
class Source:
    """Where one sample comes from: a payload path (``field`` or ``field.sub``),
    the sample's labels after ``node``, and the factor to base units."""

    path: str
    labels: tuple[str, ...] = ()
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class Family:
    """A metric family whose samples each come from one fixed payload path."""

    name: str
    kind: Kind
    help: str
    sources: tuple[Source, ...]
    label_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Keyed:
    """A metric family from a payload dict: one sample per key, the key as a label."""

    field: str
    name: str
    kind: Kind
    help: str
    label: str


def _one(name: str, kind: Kind, help_: str, path: str, scale: float = 1.0) -> Family:
    return Family(name, kind, help_, (Source(path, (), scale),))


FAMILIES: tuple[Family, ...] = (
    _one("qnoded_tags_total", "counter", "Time tags processed.", "tags_processed"),
    _one("qnoded_batches_total", "counter", "Tag batches processed.", "batches"),
    _one(
        "qnoded_batches_dropped_total",
        "counter",
        "Tag batches lost: gaps in the tagger's sequence, a failed peer link, "
        "batches the engines gave up on.",
        "dropped_batches",
    ),
    _one(
        "qnoded_batches_rejected_total",
        "counter",
        "Tag batches refused by the input checks.",
        "rejected_batches",
    ),
    _one("qnoded_coincidences_total", "counter", "Coincidences found.", "coincidences"),
    _one("qnoded_multi_clicks_total", "counter", "Multi-click events.", "multi_clicks"),
    _one("qnoded_sifted_bits_total", "counter", "Sifted bits, both bases.", "sifted_bits"),
    _one(
        "qnoded_raw_key_bits_total",
        "counter",
        "Z-basis sifted bits, the raw key blocks are cut from.",
        "raw_key_bits",
    ),
    _one(
        "qnoded_qber_sample_bits_total",
        "counter",
        "X-basis signal bits disclosed to estimate the QBER.",
        "qber_sample_bits",
    ),
    _one(
        "qnoded_qber_sample_errors_total",
        "counter",
        "Errors among the disclosed X-basis bits.",
        "qber_sample_errors",
    ),
    Family(
        "qnoded_qber",
        "gauge",
        "Quantum bit error rate: over the run, over the last telemetry interval, "
        "and of the last block.",
        (
            Source("qber", ("x", "run")),
            Source("qber_interval", ("x", "interval")),
            Source("last_block.qber_x", ("x", "last_block")),
            Source("last_block.qber_z", ("z", "last_block")),
        ),
        ("basis", "scope"),
    ),
    _one(
        "qnoded_qber_alarm_threshold_ratio",
        "gauge",
        "The QBER above which the node raises its qber-high alarm (its config).",
        "qber_alarm_threshold",
    ),
    _one("qnoded_locked", "gauge", "1 while the peer clock is locked.", "locked"),
    _one(
        "qnoded_clock_offset_seconds",
        "gauge",
        "Tracked clock offset of the peer (Alice only).",
        "offset_ps",
        PS,
    ),
    _one(
        "qnoded_clock_drift_ratio",
        "gauge",
        "Tracked clock drift of the peer (Alice only).",
        "drift_ppm",
        PPM,
    ),
    _one(
        "qnoded_clock_lock_offset_seconds",
        "gauge",
        "Clock offset as first found by the lock (Alice only).",
        "lock_offset_ps",
        PS,
    ),
    _one(
        "qnoded_clock_lock_drift_ratio",
        "gauge",
        "Clock drift as first found by the lock (Alice only).",
        "lock_drift_ppm",
        PPM,
    ),
    _one(
        "qnoded_mqtt_telemetry_dropped_total",
        "counter",
        "Telemetry messages dropped while the broker was away.",
        "mqtt_dropped_telemetry",
    ),
    Family(
        "qnoded_blocks_total",
        "counter",
        "Post-processing blocks finished, by outcome.",
        (
            Source("blocks_accepted", ("accepted",)),
            Source("blocks_rejected", ("rejected",)),
        ),
        ("outcome",),
    ),
    _one("qnoded_secret_key_bits_total", "counter", "Secret key bits made.", "secret_bits"),
    _one(
        "qnoded_net_secret_key_bits_total",
        "counter",
        "Secret key bits made, net of the authentication-key reserve.",
        "net_secret_bits",
    ),
    _one("qnoded_secret_keys_total", "counter", "Keys cut from secret key.", "secret_keys"),
    _one(
        "qnoded_ec_leaked_bits_total",
        "counter",
        "Bits disclosed by error correction.",
        "ec_leak_bits",
    ),
    _one(
        "qnoded_ec_efficiency",
        "gauge",
        "Mean error-correction efficiency f of recent blocks (1 is the Shannon limit).",
        "ec_efficiency",
    ),
    _one(
        "qnoded_auth_key_bits_reserved_total",
        "counter",
        "Secret key bits reserved for authentication.",
        "auth_key_bits_reserved",
    ),
    _one(
        "qnoded_auth_key_bits_consumed_total",
        "counter",
        "Authentication key bits used up by the MAC's one-time pads.",
        "auth_key_bits_consumed",
    ),
    _one(
        "qnoded_auth_key_bits_available",
        "gauge",
        "Authentication key bits left in the pool.",
        "auth_key_bits_available",
    ),
    _one("qnoded_stored_keys", "gauge", "Keys in the store, ready to deliver.", "stored_keys"),
    _one(
        "qnoded_process_resident_memory_bytes",
        "gauge",
        "Resident memory of the daemon.",
        "rss_bytes",
    ),
    _one("qnoded_process_open_fds", "gauge", "Open file descriptors.", "open_fds"),
    _one("qnoded_process_asyncio_tasks", "gauge", "Running asyncio tasks.", "asyncio_tasks"),
    _one(
        "qnoded_stored_key_bits",
        "gauge",
        "Key bits in the store, ready to deliver.",
        "stored_key_bits",
    ),
    _one("qnoded_keys_delivered_total", "counter", "Keys delivered over MQTT.", "keys_delivered"),
    _one(
        "qnoded_keys_destroyed_undelivered_total",
        "counter",
        "Keys destroyed because their delivery was interrupted.",
        "keys_destroyed_undelivered",
    ),
    _one(
        "qnoded_etsi014_requests_total",
        "counter",
        "ETSI 014 requests served.",
        "etsi014_requests",
    ),
    _one(
        "qnoded_etsi014_keys_delivered_total",
        "counter",
        "Keys delivered over ETSI 014.",
        "etsi014_keys_delivered",
    ),
    _one(
        "qnoded_etsi014_keys_destroyed_total",
        "counter",
        "Keys destroyed because their ETSI 014 reply could not be written.",
        "etsi014_keys_destroyed",
    ),
    _one(
        "qnoded_etsi014_replies_lost_total",
        "counter",
        "ETSI 014 replies that could not be written.",
        "etsi014_replies_lost",
    ),
    Family(
        "qnoded_etsi014_rejected_requests_total",
        "counter",
        "ETSI 014 requests refused, by HTTP status.",
        tuple(Source(f"etsi014_rejected_{s}", (s,)) for s in ("400", "401", "503", "other")),
        ("status",),
    ),
    Family(
        "qnoded_gain_ratio",
        "gauge",
        "Detections per pulse sent, by intensity class (BB84 Alice).",
        tuple(Source(f"{c}_gain", (c,)) for c in ("signal", "decoy", "vacuum")),
        ("intensity",),
    ),
    _one(
        "qnoded_last_block_accepted",
        "gauge",
        "1 if the last block was accepted.",
        "last_block.accepted",
    ),
    _one("qnoded_last_block_bits", "gauge", "Size of the last block.", "last_block.n"),
    _one(
        "qnoded_last_block_ec_leaked_bits",
        "gauge",
        "Bits the last block's error correction disclosed.",
        "last_block.leak_ec_bits",
    ),
    _one(
        "qnoded_last_block_ec_efficiency",
        "gauge",
        "Error-correction efficiency f of the last block.",
        "last_block.ec_efficiency",
    ),
    _one(
        "qnoded_last_block_ec_rounds",
        "gauge",
        "Cascade rounds of the last block.",
        "last_block.ec_rounds",
    ),
    _one(
        "qnoded_last_block_secret_key_bits",
        "gauge",
        "Secret key bits of the last block.",
        "last_block.secret_bits",
    ),
    _one("qnoded_last_block_keys", "gauge", "Keys cut from the last block.", "last_block.keys"),
    _one(
        "qnoded_last_block_auth_key_bits",
        "gauge",
        "Bits of the last block reserved for authentication.",
        "last_block.auth_bytes",
        8.0,
    ),
    _one(
        "qnoded_last_block_phase_error_ratio",
        "gauge",
        "Upper bound on the phase error rate of the last block (finite-key estimate).",
        "last_block.phi_z",
    ),
    _one(
        "qnoded_last_block_key_length_bits",
        "gauge",
        "Finite-key length of the last block (negative: no key possible), Alice only.",
        "last_block.key_length",
    ),
    _one(
        "qnoded_last_block_duration_seconds",
        "gauge",
        "How long the last block took.",
        "last_block.seconds",
    ),
    _one(
        "qnoded_interval_tags_per_second",
        "gauge",
        "Tag rate over the last telemetry interval.",
        "tags_per_s",
    ),
    _one(
        "qnoded_interval_coincidences_per_second",
        "gauge",
        "Coincidence rate over the last telemetry interval.",
        "coincidences_per_s",
    ),
    _one(
        "qnoded_interval_sifted_bits_per_second",
        "gauge",
        "Sifted-bit rate over the last telemetry interval.",
        "sifted_bits_per_s",
    ),
    _one(
        "qnoded_interval_raw_key_bits_per_second",
        "gauge",
        "Raw-key rate over the last telemetry interval.",
        "raw_key_bits_per_s",
    ),
    _one(
        "qnoded_interval_secret_key_bits_per_second",
        "gauge",
        "Secret-key rate over the last telemetry interval.",
        "secret_key_bits_per_s",
    ),
    _one(
        "qnoded_telemetry_timestamp_seconds",
        "gauge",
        "Unix time of the telemetry snapshot these figures come from.",
        "time",
    ),
    _one(
        "qnoded_telemetry_interval_seconds",
        "gauge",
        "Length of the last telemetry interval.",
        "interval_s",
    ),
)

KEYED: tuple[Keyed, ...] = (
    Keyed(
        "disclosed_bytes",
        "qnoded_disclosed_bytes_total",
        "counter",
        "Bytes sent to the peer, by message type.",
        "message",
    ),
    Keyed(
        "block_reject_reasons",
        "qnoded_blocks_rejected_by_reason_total",
        "counter",
        "Rejected blocks, by kind of reason.",
        "reason",
    ),
    Keyed(
        "auth_failures",
        "qnoded_auth_failures_by_kind_total",
        "counter",
        "Peer frames that failed authentication, by kind.",
        "kind",
    ),
    Keyed(
        "pulses",
        "qnoded_pulses_total",
        "counter",
        "Pulses sent, by intensity class (BB84 Alice).",
        "intensity",
    ),
    Keyed(
        "channel_rates_hz",
        "qnoded_channel_count_rate_hertz",
        "gauge",
        "Detector count rate, by channel.",
        "channel",
    ),
)

# detectors[] entries: field, metric, help.
DETECTOR_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("count_rate_hz", "qnoded_detector_count_rate_hertz", "Detector count rate."),
    (
        "photocurrent_a",
        "qnoded_detector_photocurrent_amperes",
        "DC through the detector; rising while the count rate collapses is blinding.",
    ),
    ("temperature_k", "qnoded_detector_temperature_kelvin", "Detector temperature."),
    ("bias_v", "qnoded_detector_bias_volts", "Detector bias voltage."),
    ("latched", "qnoded_detector_latched", "1 while the detector is latched (blinded)."),
)
DETECTOR_LABELS = ("detector", "channel")

# Payload paths read other than through the tables: strings become labels,
# ``auth_failures`` also gives the unlabelled total, ``time`` also the age.
_SPECIAL = ("node_id", "role", "protocol", "state", "detectors[].name", "detectors[].channel")
# Present in a payload, deliberately not exported (see the module docstring).
IGNORED = ("final", "last_block.block_id", "last_block.reason", "detectors[].error")


def covered_paths() -> frozenset[str]:
    """Every payload path the exporter reads (``field.*`` for keyed dicts)."""
    paths = {src.path for fam in FAMILIES for src in fam.sources}
    paths |= {k.field + ".*" for k in KEYED}
    paths |= {"detectors[]." + f for f, _, _ in DETECTOR_FIELDS}
    return frozenset(paths | set(_SPECIAL) | set(IGNORED))


def _leaf_paths(payload: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    keyed = {k.field for k in KEYED}
    for key, value in payload.items():
        if key in keyed and isinstance(value, Mapping):
            for v in value.values():
                yield key + ".*", v
        elif isinstance(value, Mapping):
            for sub, v in value.items():
                yield f"{key}.{sub}", v
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    for sub, v in item.items():
                        yield f"{key}[].{sub}", v
                else:
                    yield key + "[]", item
        else:
            yield key, value


def unmapped(payload: Mapping[str, Any]) -> list[str]:
    """The payload's paths that hold a number (or bool) but no metric reads, sorted.

    Empty for every telemetry field the table above covers; a field added to the
    telemetry without a metric shows up here (and in the test that calls this).
    """
    covered = covered_paths()
    return sorted(
        {
            path
            for path, value in _leaf_paths(payload)
            if isinstance(value, int | float) and path not in covered
        }
    )


def _get(payload: Mapping[str, Any], path: str) -> Any:
    head, _, sub = path.partition(".")
    value = payload.get(head)
    if sub:
        return value.get(sub) if isinstance(value, Mapping) else None
    return value


class TelemetryCollector:
    """A prometheus_client collector over the latest telemetry snapshot.

    :meth:`update` stores the payload (no copy of the nested figures is
    needed: the node builds a new payload for every message); :meth:`collect`
    builds the families from it at scrape time.  Both run in the event loop
    thread, so there is nothing to lock.
    """

    def __init__(
        self,
        *,
        node_id: str,
        peer_id: str,
        role: str,
        protocol: str,
        version: str = qnoded.__version__,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_id = node_id
        self._info = {"peer": peer_id, "role": role, "protocol": protocol, "version": version}
        self._clock = clock
        self._snapshot: Mapping[str, Any] | None = None
        # Paths already warned about: one log line per bad field, not one per scrape.
        self._warned: set[str] = set()

    def update(self, payload: Mapping[str, Any]) -> None:
        """Make ``payload`` (one telemetry message) the snapshot scrapes see."""
        self._snapshot = dict(payload)

    def collect(self) -> Iterable[Metric]:
        node = self.node_id
        info = GaugeMetricFamily(
            "qnoded_info",
            "The node and its link; always 1.",
            labels=("node", *self._info),
        )
        info.add_metric((node, *self._info.values()), 1.0)
        yield info
        p = self._snapshot
        if p is None:
            return
        yield self._state(p)
        for fam in FAMILIES:
            m = _family(fam.name, fam.kind, fam.help, ("node", *fam.label_names))
            for src in fam.sources:
                value = self._number(src.path, _get(p, src.path))
                if value is not None:
                    m.add_metric((node, *src.labels), value * src.scale)
            if m.samples:
                yield m
        for k in KEYED:
            m = _family(k.name, k.kind, k.help, ("node", k.label))
            table = p.get(k.field)
            if isinstance(table, Mapping):
                for key, raw in sorted(table.items(), key=lambda kv: str(kv[0])):
                    value = self._number(f"{k.field}.{key}", raw)
                    if value is not None:
                        m.add_metric((node, str(key)), value)
            if m.samples:
                yield m
        yield from self._auth_failures(p)
        yield from self._detectors(p)
        stamp = self._number("time", p.get("time"))
        if stamp is not None:
            age = GaugeMetricFamily(
                "qnoded_telemetry_age_seconds",
                "Seconds since the telemetry snapshot these figures come from.",
                labels=("node",),
            )
            age.add_metric((node,), self._clock() - stamp)
            yield age

    def _state(self, p: Mapping[str, Any]) -> Metric:
        m = GaugeMetricFamily(
            "qnoded_state",
            "1 for the node's current state, 0 for the others.",
            labels=("node", "state"),
        )
        current = p.get("state")
        # A state this table does not know still shows, rather than all zeros.
        extra = (current,) if isinstance(current, str) and current not in STATES else ()
        for state in (*STATES, *extra):
            m.add_metric((self.node_id, state), float(state == current))
        return m

    def _auth_failures(self, p: Mapping[str, Any]) -> Iterator[Metric]:
        # The sum is always there (0 before any failure), so an alert on its
        # increase sees the first failure; the per-kind series appear with it.
        failures = p.get("auth_failures")
        if not isinstance(failures, Mapping):
            return
        total = 0.0
        for kind, raw in failures.items():
            value = self._number(f"auth_failures.{kind}", raw)
            total += value or 0.0
        m = CounterMetricFamily(
            "qnoded_auth_failures_total",
            "Peer frames that failed authentication, all kinds.",
            labels=("node",),
        )
        m.add_metric((self.node_id,), total)
        yield m

    def _detectors(self, p: Mapping[str, Any]) -> Iterator[Metric]:
        detectors = p.get("detectors")
        if not isinstance(detectors, list):
            return
        node = self.node_id
        up = GaugeMetricFamily(
            "qnoded_detector_up",
            "1 if the detector answered its status query, 0 if it failed.",
            labels=("node", "detector"),
        )
        figures = {
            f: GaugeMetricFamily(name, help_, labels=("node", *DETECTOR_LABELS))
            for f, name, help_ in DETECTOR_FIELDS
        }
        for d in detectors:
            if not isinstance(d, Mapping):
                continue
            name = str(d.get("name", ""))
            up.add_metric((node, name), 0.0 if "error" in d else 1.0)
            if "error" in d:
                continue
            channel = str(d.get("channel", ""))
            for f, fam in figures.items():
                value = self._number(f"detectors[{name}].{f}", d.get(f))
                if value is not None:
                    fam.add_metric((node, name, channel), value)
        if up.samples:
            yield up
        yield from (fam for fam in figures.values() if fam.samples)

    def _number(self, path: str, value: Any) -> float | None:
        """A sample value, or None for no sample (a field that is None or absent).

        Anything else that is not a number is a bug in the telemetry: logged
        once, skipped, so one bad field does not take the endpoint down.
        """
        if value is None:
            return None
        if isinstance(value, bool | int | float):
            return float(value)
        if path not in self._warned:
            self._warned.add(path)
            log.warning(
                "telemetry field is not a number; not exported",
                field=path,
                type=type(value).__name__,
            )
        return None


def _family(
    name: str, kind: Kind, help_: str, labels: tuple[str, ...]
) -> CounterMetricFamily | GaugeMetricFamily:
    if kind == "counter":
        return CounterMetricFamily(name, help_, labels=labels)
    return GaugeMetricFamily(name, help_, labels=labels)


class MetricsError(Exception):
    """The metrics endpoint cannot start (a bad listen address, a port in use)."""


class MetricsExporter:
    """``GET /metrics`` over plain HTTP (aiohttp), from its own registry.

    ``async with MetricsExporter("127.0.0.1:9464", collector) as exporter:``
    serves until the block ends, in the caller's event loop; leaving the block
    (normally or by cancellation) closes the listener and open connections.
    Port 0 picks a free port (see :attr:`port`).  Every other path is 404.
    Reusable, not reentrant.

    The registry is private: never prometheus_client's global ``REGISTRY``,
    so no process or platform collector and no other module's metric leaks in,
    and two nodes in one process (tests) do not clash.
    """

    def __init__(
        self, listen: str, collector: TelemetryCollector, *, shutdown_timeout_s: float = 2.0
    ) -> None:
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise MetricsError(f"[metrics] listen {listen!r} is not HOST:PORT")
        self.listen = listen
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._host = host.strip("[]")  # "[::1]:9464" names an IPv6 address
        self._port = int(port)
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @classmethod
    def from_config(cls, cfg: NodeConfig) -> MetricsExporter:
        """The exporter a node configuration's ``[metrics]`` section describes."""
        return cls(
            cfg.metrics.listen,
            TelemetryCollector(
                node_id=cfg.node.id,
                peer_id=cfg.peer.peer_id,
                role=cfg.node.role,
                protocol=cfg.node.protocol,
            ),
        )

    def update(self, payload: Mapping[str, Any]) -> None:
        """Feed one telemetry message (the dict published on MQTT)."""
        self.collector.update(payload)

    @property
    def port(self) -> int:
        """The bound TCP port (useful after listening on port 0)."""
        addresses = self._runner.addresses if self._runner is not None else []
        if not addresses:
            raise RuntimeError("the metrics endpoint is not running")
        return int(addresses[0][1])

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/metrics"

    async def _metrics(self, _request: web.Request) -> web.Response:
        # Synchronous and short (a hundred samples from one dict): no need to
        # leave the event loop, and the snapshot cannot change under it.
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def __aenter__(self) -> MetricsExporter:
        if self._runner is not None:
            raise RuntimeError("the metrics endpoint is already running (not reentrant)")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        # No access log: a scrape every few seconds would drown the node's log.
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=self._shutdown_timeout_s
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise MetricsError(
                f"[metrics] listen {self.listen!r}: cannot listen: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._site = runner, site
        log.info("metrics listening", url=self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        runner = self._runner
        self._runner = self._site = None
        if runner is not None:
            await runner.cleanup()
            log.info("metrics stopped")
