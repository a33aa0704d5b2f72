"""Fuzzing the node configuration parser (``qnoded.config``): TOML text in, a NodeConfig or
a :class:`ConfigError` naming the file and the key out, whatever the text.

Inputs: arbitrary text and bytes; the shipped example (``systemd/node.example.toml``) and
the demo's generated configs (``qnoded.demo.node_config``) with their bytes mutated; and
the same documents as TOML trees with one change: a value of the wrong type, a number out
of range (negative, zero, huge, NaN, infinity), a key or section removed, an unknown key or
section, a malformed HOST:PORT.  What is accepted must hold what the checks promise; a
valid document round-trips (written as TOML, parsed back to the values written).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
from fuzzing import bounded, budget, mutated, refused
from hypothesis import example, given
from hypothesis import strategies as st

from qnoded import config as config_mod
from qnoded import demo
from qnoded.config import ConfigError, NodeConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = (ROOT / "systemd" / "node.example.toml").read_text(encoding="utf-8")
SECTIONS: dict[str, type[Any]] = config_mod._SECTIONS
SOURCE = "fuzz.toml"


def _demo_configs() -> list[str]:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for protocol in ("bb84", "bbm92"):
            args = parser.parse_args(["--protocol", protocol])
            sim = demo.link_parameters(args)
            for role in ("alice", "bob"):
                out.append(demo.node_config(role, args, "127.0.0.1:1883", 7001, Path(tmp), sim))
    return out


BASES = [EXAMPLE, *_demo_configs()]


# -- a TOML writer (tests only: the project reads TOML, it never writes a config) ----------


def toml_key(key: str) -> str:
    return toml_value(key)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        out = []
        for ch in v:
            if ch in '"\\' or not ch.isprintable() or ord(ch) == 0x7F:
                out.append(f"\\U{ord(ch):08X}" if ch not in '"\\' else "\\" + ch)
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(v, float):
        return {math.inf: "inf", -math.inf: "-inf"}.get(v, "nan" if math.isnan(v) else repr(v))
    if isinstance(v, int | dt.datetime | dt.date | dt.time):
        return str(v) if isinstance(v, int) else v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {v!r}")


def toml_doc(doc: dict[str, Any]) -> str:
    """Top-level non-tables first, then one [table] per table (nested tables inline)."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, body in doc.items():
        if isinstance(body, dict):
            lines.append(f"[{toml_key(name)}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


# -- strategies ---------------------------------------------------------------------------

scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, math.inf, -math.inf, math.nan]),
    st.text(max_size=20),
    st.sampled_from(["", ":", "h:0", "h:65536", "h:²", "h:٣", ":80", "[::1]:443", "h: 80"]),
    st.datetimes(timezones=st.none() | st.just(dt.UTC)),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 0.0, -0.0, 1e-400, math.nan, math.inf, -math.inf]),
)


def _base_docs() -> list[dict[str, Any]]:
    import tomllib

    return [tomllib.loads(text) for text in BASES]


BASE_DOCS = _base_docs()


@st.composite
def changed_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config's TOML tree with one to three changes that reach the deep checks."""
    doc = json.loads(json.dumps(draw(st.sampled_from(BASE_DOCS))))  # a deep copy
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                [
                    "value",
                    "number",
                    "drop-key",
                    "drop-section",
                    "unknown-key",
                    "unknown-section",
                    "not-a-table",
                    "device",
                    "section",
                ]
            )
        )
        name = draw(st.sampled_from(sorted(SECTIONS)))
        fields = [f.name for f in dataclasses.fields(SECTIONS[name])]
        body = doc.setdefault(name, {})
        if not isinstance(body, dict):
            continue
        if kind == "value":
            body[draw(st.sampled_from(fields))] = draw(values)
        elif kind == "number":
            hints = typing.get_type_hints(SECTIONS[name])
            numeric = [f for f in fields if hints[f] in (int, float)] or fields
            body[draw(st.sampled_from(numeric))] = draw(NUMBERS)
        elif kind == "drop-key" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif kind == "drop-section":
            doc.pop(draw(st.sampled_from(sorted(doc))))
        elif kind == "unknown-key":
            body[draw(st.text(min_size=1, max_size=12))] = draw(values)
        elif kind == "unknown-section":
            doc[draw(st.text(min_size=1, max_size=12))] = draw(values)
        elif kind == "not-a-table":
            doc[draw(st.sampled_from([*SECTIONS, "devices", "simulation"]))] = draw(scalars)
        elif kind == "device":
            devices = doc.setdefault("devices", {})
            if isinstance(devices, dict):
                devices[draw(st.text(max_size=8))] = draw(values)
        else:  # a whole section of arbitrary keys and values
            doc[name] = draw(st.dictionaries(st.sampled_from(fields), values, max_size=4))
    return doc


# -- the properties -------------------------------------------------------------------------


def check_accepted(cfg: NodeConfig) -> None:
    """What an accepted config promises, whatever text it came from."""
    for name in SECTIONS:
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                assert math.isfinite(value), f"[{name}] {f.name} = {value} accepted"
                assert value >= 0, f"[{name}] {f.name} = {value} accepted"
    assert cfg.node.role in ("alice", "bob")
    assert cfg.node.protocol in ("bb84", "bbm92")
    for hostport in (cfg.peer.listen, cfg.peer.connect, cfg.mqtt.broker):
        if hostport:
            host, _, port = hostport.rpartition(":")
            assert host and port.isascii() and port.isdigit() and 0 < int(port) < 65536
    assert 0 < cfg.mqtt.telemetry_interval_s <= 60
    assert 0 < cfg.sifting.qber_alarm_threshold <= 0.5
    pp = cfg.postprocessing
    assert 10_000 <= pp.block_bits <= 100_000_000
    assert 0 < pp.eps_sec < 1e-3 and 0 < pp.eps_cor < 1e-3
    assert pp.key_size_bits % 8 == 0 and 64 <= pp.key_size_bits <= 8192
    for spec in cfg.devices:
        assert isinstance(spec.driver, str) and spec.driver


def parse_or_refuse(text: str) -> NodeConfig | None:
    """Parse; a refusal must be a ConfigError that names the file and a key."""
    try:
        with bounded("parse_config"):
            cfg = parse_config(text, SOURCE)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        message = refused(exc, ConfigError)
        assert isinstance(exc, ConfigError)
        assert message.startswith(f"{SOURCE}: "), message
        assert exc.key.strip() and exc.problem.strip(), message
        return None
    check_accepted(cfg)
    return cfg


@budget(150)
@given(st.text(max_size=300))
@example("a = [" * 2000)  # nesting deep enough for RecursionError inside tomllib
@example('[node]\nid = "a"\nrole = "bob"\n[peer]\npeer_id = "p"\nconnect = "h:\u00b2"\n')
def test_any_text(text: str) -> None:
    parse_or_refuse(text)


@budget(100)
@given(st.sampled_from(BASES).flatmap(lambda base: mutated(base.encode(), max_edits=6)))
def test_mutated_valid_configs(data: bytes) -> None:
    parse_or_refuse(data.decode("utf-8", "replace"))


@budget(120)
@given(changed_docs())
@example(
    {
        "node": {"id": "a", "role": "bob"},
        "peer": {"peer_id": "b", "connect": "h:1"},
        "mqtt": {"telemetry_interval_s": math.nan},
    }
)
@example(
    {
        "node": {"id": "a", "role": "bob"},
        "peer": {"peer_id": "b", "connect": "h:1", "timeout_s": math.inf},
    }
)
def test_changed_documents(doc: dict[str, Any]) -> None:
    parse_or_refuse(toml_doc(doc))


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config")


@budget(80)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.sampled_from(BASES).flatmap(lambda base: mutated(base.encode())),
    )
)
@example(b'[node]\nid = "\xff"\n')  # not UTF-8
def test_any_file(config_dir: Path, data: bytes) -> None:
    path = config_dir / "node.toml"
    path.write_bytes(data)
    try:
        with bounded("load_config"):
            cfg = load_config(path)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        message = refused(exc, ConfigError)
        assert message.startswith(f"{path}: "), message
        return
    check_accepted(cfg)


# -- round trip: a valid document written as TOML parses back to what was written -----------

names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=16)
hostports = st.builds(
    "{}:{}".format, st.from_regex(r"[a-z0-9.\-]{1,12}", fullmatch=True), st.integers(1, 65535)
)


@st.composite
def valid_docs(draw: st.DrawFn) -> dict[str, Any]:
    role = draw(st.sampled_from(["alice", "bob"]))
    small = st.floats(0.0, 1e6, allow_nan=False)
    doc: dict[str, Any] = {
        "node": {
            "id": draw(names),
            "role": role,
            "protocol": draw(st.sampled_from(["bb84", "bbm92"])),
        },
        "peer": {
            "peer_id": draw(names),
            "listen" if role == "alice" else "connect": draw(hostports),
            "timeout_s": draw(small),
        },
        "mqtt": {
            "broker": draw(hostports),
            "telemetry_interval_s": draw(st.floats(1e-3, 60.0)),
            "username": draw(st.text(max_size=8)),
            "publish_keys": draw(st.booleans()),
        },
        "timing": {
            "max_offset_ps": draw(st.integers(0, 2**62)),
            "lock_min_snr": draw(small),
            "track_gain": draw(st.floats(0.0, 1.0)),
        },
        "sifting": {"qber_alarm_threshold": draw(st.floats(1e-6, 0.5))},
        "postprocessing": {
            "block_bits": draw(st.integers(10_000, 100_000_000)),
            "eps_sec": draw(st.floats(1e-30, 1e-4)),
            "key_size_bits": 8 * draw(st.integers(8, 1024)),
        },
        "state": {"directory": draw(st.text(max_size=30))},
        "devices": draw(
            st.dictionaries(
                names,
                st.fixed_dictionaries({"driver": names, "channel": st.integers(0, 63)}),
                max_size=3,
            )
        ),
    }
    return doc


@budget(60)
@given(valid_docs())
def test_valid_documents_round_trip(doc: dict[str, Any]) -> None:
    with bounded("parse_config"):
        cfg = parse_config(toml_doc(doc), SOURCE)
    check_accepted(cfg)
    for name, body in doc.items():
        if name == "devices":
            assert {d.name: {"driver": d.driver, **d.options} for d in cfg.devices} == body
            continue
        for key, value in body.items():
            assert getattr(getattr(cfg, name), key) == value, f"[{name}] {key}"


# -- the demo writes its configs with its own small TOML encoder -----------------------------


@budget(60)
@given(
    st.dictionaries(
        st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
        st.one_of(st.text(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans()),
        max_size=5,
    )
)
@example({"directory": "/tmp/qnoded-demo-\U0001f600"})  # non-BMP: JSON's surrogate pair escapes
def test_demo_table_round_trips(body: dict[str, Any]) -> None:
    import tomllib

    parsed = tomllib.loads(demo._table("section", body))["section"]
    assert parsed.keys() == body.keys()
    for key, value in body.items():
        got = parsed[key]
        assert got == value or (math.isnan(value) and math.isnan(got)), key
