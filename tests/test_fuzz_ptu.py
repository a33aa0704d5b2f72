"""Fuzzing the PTU reader (``qnoded_drivers.ptu``): headers and T2 records.

``tests/test_ptu.py`` round-trips valid streams through the encoder; this feeds the reader
what no encoder writes: valid files with bytes mutated, truncated or extended; headers of
arbitrary tags (any ident, index, type and value, a record type, resolution or record
count that is wrong or of the wrong type); and random record words.  Every refusal is a
:class:`PTUError` whose message starts with the file's path; what is read keeps the
reader's promises (events in time order, mapped channels only).  Tags of every type
round-trip through ``encode_header``/``read_header``.
"""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fuzzing import bounded, budget, mutated, refused
from hypothesis import example, given
from hypothesis import strategies as st
from qnoded_drivers.ptu import (
    FORMATS,
    MAGIC,
    RT_HYDRAHARP2_T2,
    RT_PICOHARP_T2,
    PTUError,
    PTUReader,
    TagType,
    encode_header,
    read_header,
    write_ptu,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-ptu")


def valid_file(record_type: int, n: int, seed: int) -> bytes:
    """A small valid file, as bytes."""
    rng = np.random.default_rng(seed)
    fmt = FORMATS[record_type]
    times = np.cumsum(rng.integers(0, 3 * fmt.overflow_period, n)).astype(np.int64)
    inputs = rng.integers(0, fmt.max_input + 1, n)
    path = Path(f"/tmp/qnoded-fuzz-ptu-{record_type}-{n}-{seed}.ptu")
    write_ptu(path, times, inputs, record_type=record_type)
    data = path.read_bytes()
    path.unlink()
    return data


VALID = [valid_file(rt, n, seed) for rt in FORMATS for n, seed in ((0, 0), (5, 1), (40, 2))]


def read_all(path: Path, *, reorder_window_ps: int = 0) -> None:
    """Read a file through; check what comes out or that the refusal is a PTUError."""
    try:
        with bounded("PTUReader"):
            reader = PTUReader(
                path,
                {i: i % 256 for i in range(5)},
                chunk_records=7,
                reorder_window_ps=reorder_window_ps,
            )
            with reader:
                last = None
                for t, c in reader:
                    assert t.dtype == np.int64 and c.dtype == np.uint8 and t.shape == c.shape
                    assert np.all(np.diff(t) >= 0)
                    if last is not None and t.shape[0]:
                        assert int(t[0]) >= last
                    if t.shape[0]:
                        last = int(t[-1])
                    assert set(c.tolist()) <= set(range(5))
                assert reader.counts.records == reader.header.n_records
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        text = refused(exc, PTUError)
        assert text.startswith(f"{path}: "), text


@budget(120)
@given(st.sampled_from(VALID).flatmap(lambda data: mutated(data, max_edits=4)))
def test_mutated_files(workdir: Path, data: bytes) -> None:
    path = workdir / "mutated.ptu"
    path.write_bytes(data)
    read_all(path)


@budget(60)
@given(st.sampled_from(VALID), st.data())
def test_truncated_files(workdir: Path, whole: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(whole) - 1))
    path = workdir / "truncated.ptu"
    path.write_bytes(whole[:cut])
    read_all(path)


# -- headers of arbitrary tags ---------------------------------------------------------------------

idents = st.one_of(
    st.sampled_from(
        [
            "TTResultFormat_TTTRRecType",
            "TTResultFormat_BitsPerRecord",
            "MeasDesc_GlobalResolution",
            "TTResult_NumberOfRecords",
            "Header_End",
            "File_Comment",
        ]
    ),
    st.text(st.characters(codec="ascii"), max_size=31),
)
tag_values: dict[TagType, st.SearchStrategy[Any]] = {
    TagType.EMPTY8: st.none(),
    TagType.BOOL8: st.booleans(),
    TagType.INT8: st.one_of(
        st.sampled_from([*FORMATS, 0x00010303, 32, 0, -1, 2**63 - 1]),
        st.integers(-(2**63), 2**63 - 1),
    ),
    TagType.BITSET64: st.integers(-(2**63), 2**63 - 1),
    TagType.COLOR8: st.integers(-(2**63), 2**63 - 1),
    TagType.FLOAT8: st.one_of(
        st.floats(), st.sampled_from([1e-12, 4e-12, 2.5e-12, 1e300, 1e-320, -1e-12, math.inf])
    ),
    TagType.TDATETIME: st.datetimes(
        min_value=datetime(1900, 1, 1), max_value=datetime(9000, 1, 1), timezones=st.just(UTC)
    ),
    TagType.FLOAT8_ARRAY: st.lists(st.floats(), max_size=4).map(tuple),
    TagType.ANSI_STRING: st.text(max_size=20).filter(lambda s: "\0" not in s),
    TagType.WIDE_STRING: st.text(max_size=20).filter(lambda s: "\0" not in s),
    TagType.BINARY_BLOB: st.binary(max_size=20),
}
tags = st.sampled_from(list(TagType)).flatmap(
    lambda tt: st.tuples(idents, st.integers(-1, 3), st.just(tt), tag_values[tt])
)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A header of arbitrary tags around the ones the reader needs, then some records."""
    record_type = draw(st.sampled_from([RT_HYDRAHARP2_T2, RT_PICOHARP_T2]))
    n = draw(st.integers(0, 6))
    required = [
        ("TTResultFormat_TTTRRecType", -1, TagType.INT8, record_type),
        ("MeasDesc_GlobalResolution", -1, TagType.FLOAT8, 1e-12),
        ("TTResult_NumberOfRecords", -1, TagType.INT8, n),
    ]
    extra = draw(st.lists(tags, max_size=5))
    chosen = [t for t in required if draw(st.integers(0, 5))] + extra
    chosen = draw(st.permutations(chosen))
    words = draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n))
    return encode_header(chosen) + struct.pack(f"<{n}I", *words)


@budget(100)
@given(headers())
@example(
    encode_header(
        [
            ("TTResultFormat_TTTRRecType", -1, TagType.INT8, RT_HYDRAHARP2_T2),
            ("MeasDesc_GlobalResolution", -1, TagType.FLOAT8, 1e300),
        ]
    )
)  # a finite resolution whose picoseconds overflow to inf: OverflowError in round()
def test_any_header(workdir: Path, data: bytes) -> None:
    path = workdir / "header.ptu"
    path.write_bytes(data)
    try:
        with bounded("read_header"):
            hdr = read_header(path)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        text = refused(exc, PTUError)
        assert text.startswith(f"{path}: "), text
        return
    assert hdr.record_format in FORMATS.values() and hdr.resolution_ps >= 1
    assert hdr.data_offset + 4 * hdr.n_records == len(data)
    read_all(path)


@budget(100)
@given(st.binary(max_size=120).map(lambda b: MAGIC + b), st.booleans())
def test_any_bytes_after_the_magic(workdir: Path, data: bytes, plain: bool) -> None:
    path = workdir / "bytes.ptu"
    path.write_bytes(data if plain else data[8:])
    read_all(path)


@budget(60)
@given(
    st.lists(
        st.tuples(st.from_regex(r"T_[A-Za-z0-9_]{0,20}", fullmatch=True), tags).map(
            lambda pair: (pair[0], *pair[1][1:])
        ),
        max_size=6,
    )
)
def test_tags_round_trip(workdir: Path, extra: list[Any]) -> None:
    path = workdir / "tags.ptu"
    write_ptu(path, [1, 2], [1, 1], extra_tags=extra)
    read = read_header(path).tags
    expected: dict[str, Any] = {}
    for ident, idx, _ttype, value in extra:
        expected[ident if idx < 0 else f"{ident}({idx})"] = value
    for key, value in expected.items():
        got = read[key]
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got)
        elif isinstance(value, tuple):
            assert len(got) == len(value)
            assert all(
                g == v or (math.isnan(g) and math.isnan(v)) for g, v in zip(got, value, strict=True)
            )
        elif isinstance(value, datetime):
            assert abs((got - value).total_seconds()) < 1e-3  # a double of days: ~us resolution
        else:
            assert got == value, key


def test_valid_files_read(workdir: Path) -> None:
    for i, data in enumerate(VALID):
        path = workdir / f"valid{i}.ptu"
        path.write_bytes(data)
        read_all(path)
        hdr = read_header(path)
        assert hdr.n_records == (len(data) - hdr.data_offset) // 4
