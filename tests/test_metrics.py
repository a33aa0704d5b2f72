"""The Prometheus endpoint: the telemetry's figures, named and typed by Prometheus
conventions, served at GET /metrics, and equal to the MQTT telemetry of a running node.

The exposition text is always parsed back with prometheus_client's own parser,
as a Prometheus server would read it, rather than matched as strings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from qnoded.blocks import BlockOutcome
from qnoded.broker import free_port
from qnoded.config import ConfigError, parse_config
from qnoded.demo import add_arguments, link_parameters, node_config, spawn_node, stop_node
from qnoded.etsi014 import Etsi014Counters
from qnoded.metrics import (
    FAMILIES,
    MetricsError,
    MetricsExporter,
    TelemetryCollector,
    unmapped,
)
from qnoded.mqtt import Subscriber

NOW = 1_750_000_000.25


def alice_payload() -> dict[str, Any]:
    """One telemetry message of a BB84 Alice with the ETSI 014 API on, shaped as
    ``Node._telemetry_loop`` builds it (the nested parts from the real classes)."""
    counters = Etsi014Counters(requests=12, keys_delivered=40, keys_destroyed=1, replies_lost=1)
    counters.responses.update({401: 2, 404: 3, 200: 7})
    last = BlockOutcome(
        block_id=str(uuid.UUID(int=7)),
        accepted=True,
        reason="",
        n=1_000_000,
        qber_x=0.0123,
        qber_z=0.0111,
        leak_ec_bits=98_765,
        ec_efficiency=1.07,
        ec_rounds=14,
        secret_bits=412_000,
        keys=1609,
        auth_bytes=4096,
        phi_z=0.031,
        key_length=416_000,
        seconds=2.5,
    )
    return {
        "node_id": "alice",
        "role": "alice",
        "protocol": "bb84",
        "state": "running",
        "tags_processed": 123_456_789,
        "batches": 4321,
        "coincidences": 2_345_678,
        "sifted_bits": 1_234_567,
        "raw_key_bits": 1_100_000,
        "qber_sample_bits": 134_567,
        "qber_sample_errors": 1_650,
        "qber": 1_650 / 134_567,
        "qber_alarm_threshold": 0.11,
        "locked": True,
        "offset_ps": 250_049_000,
        "drift_ppm": 2.5,
        "lock_offset_ps": 250_048_500,
        "lock_drift_ppm": 2.25,
        "dropped_batches": 3,
        "rejected_batches": 1,
        "multi_clicks": 17,
        "mqtt_dropped_telemetry": 2,
        "disclosed_bytes": {"SIFT": 1_000_000, "CASCADE": 250_000},
        "blocks_accepted": 5,
        "blocks_rejected": 2,
        "block_reject_reasons": {"estimation": 1, "peer: verification": 1},
        "secret_bits": 2_060_000,
        "secret_keys": 8046,
        "ec_leak_bits": 493_825,
        "ec_efficiency": 1.08,
        "auth_key_bits_reserved": 32_768,
        "last_block": last.public(),
        "stored_keys": 300,
        "stored_key_bits": 76_800,
        "keys_delivered": 7700,
        "keys_destroyed_undelivered": 46,
        "auth_key_bits_consumed": 500_000,
        "auth_key_bits_available": 7_888_608,
        "auth_failures": {"mac": 2, "replay": 1},
        "net_secret_bits": 2_060_000 - 32_768,
        **counters.telemetry(),
        "signal_gain": 0.0121,
        "decoy_gain": 0.0042,
        "vacuum_gain": 0.00002,
        "pulses": {"signal": 50_000_000, "decoy": 35_000_000, "vacuum": 15_000_000},
        "rss_bytes": 81_000_000,
        "open_fds": 23,
        "asyncio_tasks": 17,
        "tags_per_s": 250_000.5,
        "coincidences_per_s": 4_800.25,
        "sifted_bits_per_s": 2_400.0,
        "raw_key_bits_per_s": 2_100.0,
        "secret_key_bits_per_s": 410.5,
        "time": NOW,
        "interval_s": 1.002,
        "qber_interval": 0.0125,
        "channel_rates_hz": {"0": 60_000.0, "1": 61_000.0},
        "detectors": [
            {
                "name": "det0",
                "channel": 0,
                "latched": False,
                "temperature_k": 223.15,
                "bias_v": 54.5,
                "count_rate_hz": 60_000.0,
            },
            {"name": "det1", "error": "serial timeout on /dev/ttyUSB1"},
        ],
    }


def bob_payload() -> dict[str, Any]:
    """Bob before his first block: no clock model, no QBER, no block figures."""
    p = alice_payload()
    for key in ("signal_gain", "decoy_gain", "vacuum_gain", "pulses"):
        del p[key]
    for key in list(p):
        if key.startswith("etsi014_"):
            del p[key]
    return p | {
        "node_id": "bob",
        "role": "bob",
        "state": "locking",
        "offset_ps": None,
        "drift_ppm": None,
        "lock_offset_ps": None,
        "lock_drift_ppm": None,
        "qber": None,
        "qber_interval": None,
        "ec_efficiency": None,
        "last_block": None,
        "auth_failures": {},
    }


def collector(node_id: str = "alice", **kw: Any) -> TelemetryCollector:
    return TelemetryCollector(
        node_id=node_id, peer_id="bob", role="alice", protocol="bb84", version="9.9.9", **kw
    )


def parse(text: str) -> dict[str, Metric]:
    """Families by their exposition name (counters keep the ``_total`` of their samples)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = fam
    return out


def scrape(c: TelemetryCollector) -> dict[str, Metric]:
    registry = CollectorRegistry()
    registry.register(c)
    return parse(generate_latest(registry).decode())


def value(fams: dict[str, Metric], name: str, **labels: str) -> float:
    matches = [
        s.value for s in fams[name].samples if all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (name, labels, fams[name].samples)
    return float(matches[0])


# -- the collector ----------------------------------------------------------------------


def test_collector_maps_every_figure_with_prometheus_names_types_and_units() -> None:
    payload = alice_payload()
    assert unmapped(payload) == []  # every number in the message has a metric
    fams = scrape(collector(clock=lambda: NOW + 2.5))

    assert set(fams) == {"qnoded_info"}  # nothing but identity before the first snapshot
    c = collector(clock=lambda: NOW + 2.5)
    c.update(payload)
    fams = scrape(c)

    # Every sample carries the node, and each family is the type its name says.
    for name, fam in fams.items():
        assert fam.samples, name
        assert all(s.labels["node"] == "alice" for s in fam.samples), name
        assert fam.type == ("counter" if name.endswith("_total") else "gauge"), name

    info = fams["qnoded_info"].samples[0]
    assert info.value == 1
    assert info.labels == {
        "node": "alice",
        "peer": "bob",
        "role": "alice",
        "protocol": "bb84",
        "version": "9.9.9",
    }
    assert {s.labels["state"]: s.value for s in fams["qnoded_state"].samples} == {
        "starting": 0,
        "locking": 0,
        "running": 1,
        "paused": 0,
        "degraded": 0,
        "stopped": 0,
    }
    # Counters: the telemetry's cumulative figures, unchanged.
    assert value(fams, "qnoded_tags_total") == 123_456_789
    assert value(fams, "qnoded_coincidences_total") == 2_345_678
    assert value(fams, "qnoded_sifted_bits_total") == 1_234_567
    assert value(fams, "qnoded_secret_key_bits_total") == 2_060_000
    assert value(fams, "qnoded_net_secret_key_bits_total") == 2_060_000 - 32_768
    assert value(fams, "qnoded_blocks_total", outcome="accepted") == 5
    assert value(fams, "qnoded_blocks_total", outcome="rejected") == 2
    assert value(fams, "qnoded_blocks_rejected_by_reason_total", reason="estimation") == 1
    assert value(fams, "qnoded_blocks_rejected_by_reason_total", reason="peer: verification") == 1
    assert value(fams, "qnoded_keys_delivered_total") == 7700
    assert value(fams, "qnoded_auth_key_bits_consumed_total") == 500_000
    assert value(fams, "qnoded_auth_failures_total") == 3
    assert value(fams, "qnoded_auth_failures_by_kind_total", kind="mac") == 2
    assert value(fams, "qnoded_disclosed_bytes_total", message="CASCADE") == 250_000
    assert value(fams, "qnoded_pulses_total", intensity="vacuum") == 15_000_000
    assert value(fams, "qnoded_etsi014_rejected_requests_total", status="401") == 2
    assert value(fams, "qnoded_etsi014_rejected_requests_total", status="other") == 3
    assert value(fams, "qnoded_etsi014_rejected_requests_total", status="400") == 0
    # Gauges, in base units.
    assert value(fams, "qnoded_qber", basis="x", scope="run") == pytest.approx(1_650 / 134_567)
    assert value(fams, "qnoded_qber", basis="x", scope="interval") == 0.0125
    assert value(fams, "qnoded_qber", basis="z", scope="last_block") == 0.0111
    assert value(fams, "qnoded_clock_offset_seconds") == pytest.approx(250.049e-6, rel=1e-12)
    assert value(fams, "qnoded_clock_drift_ratio") == pytest.approx(2.5e-6, rel=1e-12)
    assert value(fams, "qnoded_clock_lock_offset_seconds") == pytest.approx(250.0485e-6)
    assert value(fams, "qnoded_locked") == 1
    assert value(fams, "qnoded_qber_alarm_threshold_ratio") == 0.11
    assert value(fams, "qnoded_ec_efficiency") == 1.08
    assert value(fams, "qnoded_stored_keys") == 300
    assert value(fams, "qnoded_auth_key_bits_available") == 7_888_608
    assert value(fams, "qnoded_last_block_auth_key_bits") == 4096 * 8
    assert value(fams, "qnoded_last_block_duration_seconds") == 2.5
    assert value(fams, "qnoded_last_block_accepted") == 1
    assert value(fams, "qnoded_gain_ratio", intensity="signal") == 0.0121
    assert value(fams, "qnoded_interval_tags_per_second") == 250_000.5
    assert value(fams, "qnoded_channel_count_rate_hertz", channel="1") == 61_000
    assert value(fams, "qnoded_telemetry_timestamp_seconds") == NOW
    assert value(fams, "qnoded_telemetry_age_seconds") == pytest.approx(2.5)
    # Detectors: figures per detector and channel; one that failed its query is down.
    assert value(fams, "qnoded_detector_up", detector="det0") == 1
    assert value(fams, "qnoded_detector_up", detector="det1") == 0
    assert value(fams, "qnoded_detector_temperature_kelvin", detector="det0", channel="0") == (
        223.15
    )
    assert value(fams, "qnoded_detector_latched", detector="det0") == 0
    assert [s.labels["detector"] for s in fams["qnoded_detector_bias_volts"].samples] == ["det0"]
    # Every family the table declares shows up for a payload that has all fields.
    assert {f.name for f in FAMILIES} <= set(fams)


def test_collector_strings_from_telemetry_never_become_series() -> None:
    """Block IDs and free-text reasons would make a new series per block."""
    c = collector()
    payload = alice_payload()
    payload["last_block"] |= {"accepted": False, "reason": "verification: hash mismatch"}
    c.update(payload)
    registry = CollectorRegistry()
    registry.register(c)
    text = generate_latest(registry).decode()
    assert str(uuid.UUID(int=7)) not in text
    assert "hash mismatch" not in text
    assert value(parse(text), "qnoded_last_block_accepted") == 0


def test_collector_leaves_out_unknown_figures_of_bob() -> None:
    c = TelemetryCollector(node_id="bob", peer_id="alice", role="bob", protocol="bb84")
    c.update(bob_payload())
    fams = scrape(c)
    for absent in (
        "qnoded_clock_offset_seconds",
        "qnoded_clock_drift_ratio",
        "qnoded_ec_efficiency",
        "qnoded_qber",  # no sample anywhere yet: no family
        "qnoded_last_block_bits",
        "qnoded_gain_ratio",
        "qnoded_pulses_total",
        "qnoded_etsi014_requests_total",
        "qnoded_auth_failures_by_kind_total",
    ):
        assert absent not in fams, absent
    # The unlabelled total is there from the start, so the first failure is an increase.
    assert value(fams, "qnoded_auth_failures_total") == 0
    assert value(fams, "qnoded_state", state="locking") == 1
    assert value(fams, "qnoded_tags_total") == 123_456_789


def test_collector_skips_and_names_a_field_that_is_not_a_number() -> None:
    c = collector()
    c.update(alice_payload() | {"coincidences": "lots", "state": "calibrating"})
    with capture_logs() as logs:
        fams = scrape(c)
        scrape(c)  # warned once, not on every scrape
    assert "qnoded_coincidences_total" not in fams
    assert value(fams, "qnoded_tags_total") == 123_456_789
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [(e["field"], e["type"]) for e in warnings] == [("coincidences", "str")]
    # A state outside the known list still shows as the current one.
    assert value(fams, "qnoded_state", state="calibrating") == 1
    assert value(fams, "qnoded_state", state="running") == 0


def test_unmapped_names_a_new_numeric_field() -> None:
    payload = alice_payload() | {"photons_per_s": 3.0, "note": "text is not a figure"}
    payload["last_block"] = payload["last_block"] | {"new_bound": 0.1}
    payload["detectors"][0] = payload["detectors"][0] | {"dark_count_rate_hz": 100.0}
    assert unmapped(payload) == [
        "detectors[].dark_count_rate_hz",
        "last_block.new_bound",
        "photons_per_s",
    ]


# -- the HTTP endpoint ------------------------------------------------------------------


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with session.get(url) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


@pytest.mark.asyncio
async def test_http_serves_metrics_404s_elsewhere_and_closes() -> None:
    exporter = MetricsExporter("127.0.0.1:0", collector())
    async with exporter, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{exporter.port}"
        assert exporter.url == base + "/metrics"
        status, ctype, text = await _get(session, exporter.url)
        assert (status, ctype) == (200, CONTENT_TYPE_LATEST)
        assert set(parse(text)) == {"qnoded_info"}

        exporter.update(alice_payload())
        status, _, text = await _get(session, exporter.url)
        assert status == 200
        assert value(parse(text), "qnoded_tags_total", node="alice") == 123_456_789
        exporter.update(alice_payload() | {"tags_processed": 123_456_790})
        _, _, text = await _get(session, exporter.url)
        assert value(parse(text), "qnoded_tags_total") == 123_456_790

        for path in ("/", "/metric", "/metrics/", "/metrics/x", "/api/v1/keys/x/status"):
            status, _, _ = await _get(session, base + path)
            assert status == 404, path
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await _get(session, base + "/metrics")


@pytest.mark.asyncio
async def test_http_endpoint_in_a_task_group_stops_on_cancellation() -> None:
    exporter = MetricsExporter("127.0.0.1:0", collector())
    listening = asyncio.Event()

    async def serve() -> None:
        async with exporter:
            listening.set()
            await asyncio.Event().wait()  # until cancelled, as the node's loops are

    with contextlib.suppress(asyncio.CancelledError):
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(serve(), name="metrics")
            await listening.wait()
            url = exporter.url
            async with aiohttp.ClientSession() as session:
                assert (await _get(session, url))[0] == 200
            task.cancel()
    assert task.cancelled()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await _get(session, url)


@pytest.mark.asyncio
async def test_port_in_use_is_an_error_naming_the_key() -> None:
    async with MetricsExporter("127.0.0.1:0", collector()) as first:
        taken = f"127.0.0.1:{first.port}"
        with pytest.raises(MetricsError, match=r"\[metrics\] listen '127\.0\.0\.1:\d+'"):
            async with MetricsExporter(taken, collector()):
                pass


# -- configuration ----------------------------------------------------------------------

CONFIG = """
[node]
id = "alice"
role = "alice"

[peer]
peer_id = "bob"
listen = "127.0.0.1:7001"
"""


def test_config_metrics_off_unless_configured_and_listen_validated() -> None:
    assert parse_config(CONFIG, "a.toml").metrics.listen == ""
    cfg = parse_config(CONFIG + '[metrics]\nlisten = "127.0.0.1:9464"\n', "a.toml")
    assert cfg.metrics.listen == "127.0.0.1:9464"
    assert MetricsExporter.from_config(cfg).collector.node_id == "alice"
    for body, problem in (
        ('listen = "localhost"', "is not HOST:PORT"),
        ('listen = "127.0.0.1:70000"', "is not HOST:PORT"),
        ("", "is not HOST:PORT"),  # a [metrics] section means serve: listen is needed
        ("listen = 9464", "expected a string"),
    ):
        with pytest.raises(ConfigError) as err:
            parse_config(CONFIG + f"[metrics]\n{body}\n", "a.toml")
        assert err.value.key == "[metrics] listen", body
        assert problem in err.value.problem, body
        assert str(err.value).startswith("a.toml: [metrics] listen: ")
    with pytest.raises(ConfigError, match=r"\[metrics\] port: unknown key"):
        parse_config(CONFIG + "[metrics]\nport = 9464\n", "a.toml")


# -- a running node pair ----------------------------------------------------------------


@pytest.fixture
def node_pair(tmp_path: Path, mqtt_broker: tuple[str, int]) -> Iterator[dict[str, int]]:
    """``qnoded run`` Alice and Bob (BBM92, simulated, real time) with [metrics] on;
    yields each node's metrics port."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = argparse.Namespace(
        **vars(parser.parse_args([]))
        | {"protocol": "bbm92", "distance_km": 10.0, "seed": 5, "clock_offset_ps": 150_000_000}
    )
    sim = link_parameters(args)
    peer_port = free_port()
    ports = {role: free_port() for role in ("alice", "bob")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for role in ("alice", "bob"):
        text = node_config(
            role, args, f"{mqtt_broker[0]}:{mqtt_broker[1]}", peer_port, tmp_path, sim
        )
        text += f'[metrics]\nlisten = "127.0.0.1:{ports[role]}"\n'
        (tmp_path / f"{role}.toml").write_text(text)
        procs[role] = spawn_node(tmp_path / f"{role}.toml", tmp_path / f"{role}.log")
    try:
        yield ports
    finally:
        for p in procs.values():
            stop_node(p, timeout_s=10)


async def _scrape_and_watch(
    broker: tuple[str, int], ports: dict[str, int], timeout_s: float
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Metric]]]]:
    """Each node's telemetry messages and scrapes, until Alice is locked and each
    node has two scrapes of snapshots with tags whose telemetry message also arrived."""
    telemetry: dict[str, list[dict[str, Any]]] = {n: [] for n in ports}
    scrapes: dict[str, list[dict[str, Metric]]] = {n: [] for n in ports}

    def matched(node: str) -> int:
        stamps = {t["time"] for t in telemetry[node] if t["tags_processed"] > 0}
        seen = {
            value(s, "qnoded_telemetry_timestamp_seconds")
            for s in scrapes[node]
            if "qnoded_telemetry_timestamp_seconds" in s
        }
        return len(stamps & seen)

    async def watch(sub: Subscriber) -> None:
        async for msg in sub:
            telemetry[msg.topic.split("/")[2]].append(msg.payload)

    def done() -> bool:
        # Alice's clock model is part of what is checked: wait for her lock too.
        alice_locked = any("qnoded_clock_offset_seconds" in s for s in scrapes["alice"])
        return alice_locked and min(matched(n) for n in ports) >= 2

    async def scrape_loop(session: aiohttp.ClientSession) -> None:
        while not done():
            for node, port in ports.items():
                with contextlib.suppress(aiohttp.ClientConnectionError):  # not listening yet
                    status, _, text = await _get(session, f"http://127.0.0.1:{port}/metrics")
                    assert status == 200
                    scrapes[node].append(parse(text))
            await asyncio.sleep(0.4)

    topics = [f"qkd/v1/{n}/telemetry" for n in ports]
    # On timeout the caller's assertions say what was missing.
    with contextlib.suppress(TimeoutError):
        async with (
            asyncio.timeout(timeout_s),
            Subscriber(broker, *topics) as sub,
            aiohttp.ClientSession() as session,
            asyncio.TaskGroup() as tg,
        ):
            watcher = tg.create_task(watch(sub))
            await scrape_loop(session)
            watcher.cancel()
    return telemetry, scrapes


@pytest.mark.slow
def test_running_nodes_serve_the_telemetry_figures(
    node_pair: dict[str, int], mqtt_broker: tuple[str, int]
) -> None:
    telemetry, scrapes = asyncio.run(_scrape_and_watch(mqtt_broker, node_pair, timeout_s=20))
    for node in node_pair:
        # The real telemetry has no number the exporter leaves out.
        for message in telemetry[node]:
            assert unmapped(message) == [], (node, message)
        by_time = {t["time"]: t for t in telemetry[node]}
        pairs = [
            (s, by_time[value(s, "qnoded_telemetry_timestamp_seconds")])
            for s in scrapes[node]
            if "qnoded_telemetry_timestamp_seconds" in s
            and value(s, "qnoded_telemetry_timestamp_seconds") in by_time
        ]
        # The same snapshot gives the same figures, over HTTP and over MQTT.
        for scraped, message in pairs:
            assert value(scraped, "qnoded_tags_total", node=node) == message["tags_processed"]
            assert value(scraped, "qnoded_coincidences_total") == message["coincidences"]
            assert value(scraped, "qnoded_sifted_bits_total") == message["sifted_bits"]
            assert value(scraped, "qnoded_state", state=message["state"]) == 1
            assert value(scraped, "qnoded_locked") == float(message["locked"])
            if message["offset_ps"] is not None:  # Alice, once locked: seconds, not ps
                assert value(scraped, "qnoded_clock_offset_seconds") == pytest.approx(
                    message["offset_ps"] * 1e-12, rel=1e-12
                )
        assert len(pairs) >= 2, (
            f"{node}: {len(scrapes[node])} scrapes, {len(telemetry[node])} telemetry messages,"
            f" {len(pairs)} of the same snapshot (see {node}.log in the test's tmp_path)"
        )
        tags = [value(s, "qnoded_tags_total") for s, _ in pairs]
        assert tags == sorted(tags), (node, tags)
        assert tags[-1] > tags[0], (node, tags)
    # Bob has no clock model, so nothing to export; Alice has one once locked.
    assert all("qnoded_clock_offset_seconds" not in s for s in scrapes["bob"])
    assert any("qnoded_clock_offset_seconds" in s for s in scrapes["alice"])
