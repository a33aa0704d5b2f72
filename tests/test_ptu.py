"""PicoQuant PTU replay: header, T2 decoding, encoder round trip, real data, the replay tagger.

The decoder is checked three ways: against a tiny per-record reference decoder
written here straight from PicoQuant's demo reader (``ptudemo.cc``), on a
recording made by a real TimeHarp 260 N that no one here wrote
(``tests/data/th260n_t2_head.ptu``, see ``tests/data/README.md``), and by
hypothesis round trips through the encoder over every T2 record type,
including gaps long enough to need many overflow records.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import struct
import sys
import tempfile
import tracemalloc
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qnoded_drivers.ptu import (
    FORMATS,
    HT2_V1_PERIOD,
    PT2_PERIOD,
    RT_HYDRAHARP2_T2,
    RT_HYDRAHARP_T2,
    RT_MULTIHARP_T2,
    RT_PICOHARP_T2,
    RT_TIMEHARP260N_T2,
    RT_TIMEHARP260P_T2,
    PTUError,
    PTUReader,
    TagType,
    encode_header,
    read_events,
    read_header,
    write_ptu,
)
from qnoded_drivers.replay import ReplayTagger

from qnoded.contracts import DeviceError, DriverContext, TagBatch
from qnoded.ingest import BatchValidator

DATA = Path(__file__).parent / "data"
REAL = DATA / "th260n_t2_head.ptu"
CTX = DriverContext(node_id="t", role="bob", protocol="bbm92")


# -- a reference decoder, one record at a time, as PicoQuant's ptudemo.cc reads ----------


@dataclass
class Reference:
    times_ps: list[int]  # photon and sync events, in file order
    inputs: list[int]  # 0 = sync; HydraHarp-family channel + 1; PicoHarp channel as is
    markers: int
    overflow_records: int
    overflow_ticks: int
    tags: dict[str, Any]

    def event(self, timetag: int, res_ps: int, inp: int) -> None:
        self.times_ps.append((self.overflow_ticks + timetag) * res_ps)
        self.inputs.append(inp)

    def pt2(self, rec: int, res_ps: int) -> None:
        """ProcessPHT2: channel 4 | time 28; channel 15 special, low 4 bits 0 = overflow."""
        channel, time = rec >> 28, rec & 0x0FFFFFFF
        if channel != 0xF:
            self.event(time, res_ps, channel)
        elif rec & 0xF == 0:
            self.overflow_records += 1
            self.overflow_ticks += 210698240
        else:
            self.markers += 1

    def ht2(self, rec: int, res_ps: int, version: int) -> None:
        """ProcessHHT2: special 1 | channel 6 | timetag 25."""
        special, channel, timetag = rec >> 31, (rec >> 25) & 0x3F, rec & 0x1FFFFFF
        if special == 0:
            self.event(timetag, res_ps, channel + 1)
        elif channel == 0x3F:
            self.overflow_records += 1
            if version == 1:  # HydraHarp V1: always one overflow
                self.overflow_ticks += 33552000
            else:
                self.overflow_ticks += 33554432 * (timetag if timetag else 1)
        elif 1 <= channel <= 15:
            self.markers += 1
        elif channel == 0:  # sync
            self.event(timetag, res_ps, 0)


def reference_decode(path: Path) -> Reference:
    """Written from ptudemo.cc (the header loop, ProcessHHT2, ProcessPHT2), not from ptu.py."""
    with path.open("rb") as f:
        assert f.read(8) == b"PQTTTR\0\0"
        f.read(8)
        tags: dict[str, Any] = {}
        while True:
            ident, _idx, typ, value = struct.unpack("<32siIq", f.read(48))
            name = ident.split(b"\0")[0].decode()
            if typ in (0x2001FFFF, 0x4001FFFF, 0x4002FFFF, 0xFFFFFFFF):
                f.seek(value, 1)  # data follows; the value is its length
            elif typ == 0x20000008:
                tags[name] = struct.unpack("<d", struct.pack("<q", value))[0]
            else:
                tags[name] = value
            if name == "Header_End":
                break
        data = f.read()
    rtype = tags["TTResultFormat_TTTRRecType"]
    res_ps = round(tags["MeasDesc_GlobalResolution"] * 1e12)
    ref = Reference([], [], 0, 0, 0, tags)
    for (rec,) in struct.iter_unpack("<I", data):
        if rtype == 0x00010203:
            ref.pt2(rec, res_ps)
        else:
            ref.ht2(rec, res_ps, 1 if rtype == 0x00010204 else 2)
    return ref


def all_inputs(record_type: int) -> dict[int, int]:
    return {i: i for i in range(FORMATS[record_type].max_input + 1)}


# -- real data: a TimeHarp 260 N T2 recording --------------------------------------------


def test_real_recording_header() -> None:
    hdr = read_header(REAL)
    assert hdr.record_format.code == RT_TIMEHARP260N_T2
    assert hdr.record_format.counted_overflows
    assert hdr.resolution_ps == 250
    assert hdr.n_records == hdr.tags["TTResult_NumberOfRecords"] == 32768
    assert hdr.tags["HW_Type"] == "TimeHarp 260 N"
    assert hdr.tags["File_Comment"] == "T2 Mode"
    assert hdr.tags["HWInpChan_Enabled(0)"] is True
    assert isinstance(hdr.tags["File_CreatingTime"], datetime)
    assert hdr.tags["File_CreatingTime"].year == 2019
    assert hdr.data_offset == REAL.stat().st_size - 4 * 32768


def test_real_recording_matches_reference_decoder() -> None:
    """Counts, first and last time, overflows: the streaming reader (small chunks, so
    overflow sums cross many chunk ends) against the per-record reference."""
    ref = reference_decode(REAL)
    with PTUReader(REAL, {0: 3, 1: 0}, chunk_records=1000) as reader:
        t, c = (np.concatenate(x) for x in zip(*reader, strict=True))
        counts = reader.counts
    assert t.shape[0] == len(ref.times_ps) > 30000
    np.testing.assert_array_equal(t, np.array(ref.times_ps, dtype=np.int64))
    np.testing.assert_array_equal(c, np.where(np.array(ref.inputs) == 0, 3, 0))
    assert int(t[0]) == ref.times_ps[0] and int(t[-1]) == ref.times_ps[-1]
    assert counts.records == 32768
    assert counts.overflow_records == ref.overflow_records > 300
    assert counts.overflow_periods * 2**25 == ref.overflow_ticks
    assert counts.markers == ref.markers == 0
    assert bool(np.all(np.diff(t) >= 0))


def test_real_recording_through_the_replay_tagger() -> None:
    ref = reference_decode(REAL)
    opts = {"file": str(REAL), "batch_duration_ps": 50_000_000_000, "chunk_records": 4096}

    async def run() -> list[TagBatch]:
        tagger = ReplayTagger("th260", opts, CTX)
        validator = BatchValidator("th260")
        out: list[TagBatch] = []
        async with tagger:
            assert tagger.channels == (0, 1, 2, 3)
            async for batch in tagger.stream():
                out.append(validator.check(batch))
                if tagger.describe()["finished"]:
                    break
        assert validator.missed_batches == 0
        return out

    batches = asyncio.run(run())
    t = np.concatenate([b.timestamps_ps for b in batches])
    assert t.shape[0] == len(ref.times_ps)
    assert int(t[0]) == ref.times_ps[0] and int(t[-1]) == ref.times_ps[-1]
    assert batches[0].start_ps == ref.times_ps[0] // 50_000_000_000 * 50_000_000_000
    assert all(int(b.channels.max(initial=0)) == 0 for b in batches)


@pytest.mark.skipif(
    not os.environ.get("QNODED_PTU_SAMPLE"),
    reason="set QNODED_PTU_SAMPLE to the whole default_007.ptu (tests/data/README.md)",
)
def test_whole_real_recording_against_its_header() -> None:
    """The whole 6.8 M-record file, streamed, against what the instrument wrote in its
    header: the number of records, the stop time and the input count rate."""
    path = Path(os.environ["QNODED_PTU_SAMPLE"])
    hdr = read_header(path)
    n, last = 0, 0
    with PTUReader(path, {1: 0}) as reader:
        for t, _ in reader:
            n += t.shape[0]
            last = int(t[-1]) if t.shape[0] else last
    assert reader.counts.records == hdr.tags["TTResult_NumberOfRecords"] == 6812114
    assert last <= hdr.tags["TTResult_StopAfter"] * 10**9  # ms -> ps
    assert n / (last * 1e-12) == pytest.approx(hdr.tags["TTResult_InputRate(0)"], rel=0.05)


# -- encoder round trips -------------------------------------------------------------------

_T2_CASES = [
    (RT_HYDRAHARP_T2, False),
    (RT_HYDRAHARP2_T2, False),
    (RT_HYDRAHARP2_T2, True),  # old-style overflows: one record per period, count 0
    (RT_TIMEHARP260N_T2, False),
    (RT_TIMEHARP260P_T2, False),
    (RT_MULTIHARP_T2, False),
    (RT_PICOHARP_T2, False),
]


@st.composite
def _streams(draw: st.DrawFn, record_type: int, old_style: bool) -> dict[str, Any]:
    fmt = FORMATS[record_type]
    res = draw(st.sampled_from([1, 4, 5, 25, 250]))
    n = draw(st.integers(0, 40))
    if fmt.counted_overflows and not old_style:
        # Up to ~2**62 ps in all: a gap can need thousands of max-count records.
        long_gap = (2**62 // res) // 41
    else:
        long_gap = fmt.overflow_period * 3000  # one record per period: keep files small
    gap = st.one_of(
        st.integers(0, 3), st.integers(0, fmt.overflow_period * 2), st.integers(0, long_gap)
    )
    ticks = np.cumsum(np.array(draw(st.lists(gap, min_size=n, max_size=n)), dtype=np.int64))
    inputs = draw(st.lists(st.integers(0, fmt.max_input), min_size=n, max_size=n))
    n_mark = draw(st.integers(0, 5)) if n else 0
    mark_at = draw(st.lists(st.integers(0, max(n - 1, 0)), min_size=n_mark, max_size=n_mark))
    bits = draw(st.lists(st.integers(1, 15), min_size=n_mark, max_size=n_mark))
    # PicoHarp markers overwrite the time's low 4 bits: place them at multiples of 16.
    mark_ticks = np.array([int(ticks[i]) // 16 * 16 for i in mark_at], dtype=np.int64)
    return {
        "times": ticks * res,
        "inputs": np.array(inputs, dtype=np.int64),
        "res": res,
        "markers": (mark_ticks * res, np.array(bits, dtype=np.int64)),
        "chunk": draw(st.sampled_from([1, 2, 3, 17, 1 << 18])),
    }


@pytest.mark.parametrize(("record_type", "old_style"), _T2_CASES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip(record_type: int, old_style: bool, data: st.DataObject) -> None:
    s = data.draw(_streams(record_type, old_style))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rt.ptu"
        n_records = write_ptu(
            path,
            s["times"],
            s["inputs"],
            record_type=record_type,
            resolution_ps=s["res"],
            markers=s["markers"],
            old_style_overflows=old_style,
        )
        with PTUReader(path, all_inputs(record_type), chunk_records=s["chunk"]) as reader:
            runs = list(reader)
            counts = reader.counts
        t = np.concatenate([r[0] for r in runs]) if runs else np.empty(0, np.int64)
        c = np.concatenate([r[1] for r in runs]) if runs else np.empty(0, np.uint8)
        np.testing.assert_array_equal(t, s["times"])
        np.testing.assert_array_equal(c, s["inputs"])
        assert counts.records == n_records
        assert counts.markers == s["markers"][0].shape[0]
        if n_records <= 20_000:  # the encoder, checked against the spec's reading
            ref = reference_decode(path)
            assert ref.times_ps == s["times"].tolist()
            assert ref.inputs == s["inputs"].tolist()
            assert ref.markers == counts.markers
            assert ref.overflow_records == counts.overflow_records


def test_overflow_records_follow_the_format() -> None:
    """The encoder writes what the documentation says: v2 records carry the count (up
    to 2**25 - 1), V1 and PicoHarp one period per record."""
    gap = (2**25 - 1) * 2**25 + 5 * 2**25 + 7  # 2**25 - 1 + 5 periods, then 7 ticks
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v2.ptu"
        write_ptu(path, [gap], [1], record_type=RT_MULTIHARP_T2)
        hdr = read_header(path)
        raw = np.fromfile(path, dtype="<u4", offset=hdr.data_offset)
        assert [hex(int(w)) for w in raw] == [hex(0xFE000000 | (2**25 - 1)), "0xfe000005", "0x7"]
        path = Path(tmp) / "v1.ptu"
        write_ptu(path, [2 * HT2_V1_PERIOD + 3], [2], record_type=RT_HYDRAHARP_T2)
        raw = np.fromfile(path, dtype="<u4", offset=read_header(path).data_offset)
        assert [hex(int(w)) for w in raw] == ["0xfe000000", "0xfe000000", hex((1 << 25) | 3)]
        path = Path(tmp) / "pt2.ptu"
        write_ptu(path, [(PT2_PERIOD + 9) * 4], [1], record_type=RT_PICOHARP_T2, resolution_ps=4)
        raw = np.fromfile(path, dtype="<u4", offset=read_header(path).data_offset)
        assert [hex(int(w)) for w in raw] == ["0xf0000000", hex((1 << 28) | 9)]
        assert read_events(path, {1: 2})[0].tolist() == [(PT2_PERIOD + 9) * 4]


def test_every_tag_type_round_trips(tmp_path: Path) -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    extra = [
        ("T_Empty", -1, TagType.EMPTY8, None),
        ("T_Bool", -1, TagType.BOOL8, True),
        ("T_Bool", 3, TagType.BOOL8, False),
        ("T_Int", -1, TagType.INT8, -(2**40)),
        ("T_Bits", -1, TagType.BITSET64, 0x0F0F),
        ("T_Color", -1, TagType.COLOR8, 0xFF00FF),
        ("T_Float", -1, TagType.FLOAT8, 1.5e-3),
        ("T_When", -1, TagType.TDATETIME, when),
        ("T_Array", -1, TagType.FLOAT8_ARRAY, (1.0, -2.5, 3e9)),
        ("T_Ansi", -1, TagType.ANSI_STRING, "straße"),
        ("T_Wide", -1, TagType.WIDE_STRING, "Δt = 5 ps"),
        ("T_Blob", -1, TagType.BINARY_BLOB, bytes(range(13))),
    ]
    path = tmp_path / "tags.ptu"
    write_ptu(path, [10, 20], [1, 2], extra_tags=extra)
    tags = read_header(path).tags
    assert tags["T_Empty"] is None
    assert tags["T_Bool"] is True
    assert tags["T_Bool(3)"] is False
    assert tags["T_Int"] == -(2**40)
    assert tags["T_Bits"] == 0x0F0F
    assert tags["T_Color"] == 0xFF00FF
    assert tags["T_Float"] == 1.5e-3
    assert isinstance(tags["T_When"], datetime)
    assert abs((tags["T_When"] - when).total_seconds()) < 1e-3
    assert tags["T_Array"] == (1.0, -2.5, 3e9)
    assert tags["T_Ansi"] == "straße"
    assert tags["T_Wide"] == "Δt = 5 ps"
    assert tags["T_Blob"] == bytes(range(13))
    assert read_events(path)[0].tolist() == [10, 20]


def test_bounded_memory_on_a_long_file(tmp_path: Path) -> None:
    """A 12 MB file streams with a few hundred kB of memory: the chunk, not the file."""
    rng = np.random.default_rng(3)
    n = 3_000_000
    times = np.cumsum(rng.integers(0, 2_000_000, n))
    path = tmp_path / "long.ptu"
    write_ptu(path, times, rng.integers(1, 5, n))
    size = path.stat().st_size
    total, last = 0, -1
    tracemalloc.start()
    try:
        with PTUReader(path, chunk_records=8192) as reader:
            for t, _ in reader:
                assert t.shape[0] <= 8192
                if t.shape[0]:
                    assert int(t[0]) >= last
                    last = int(t[-1])
                total += t.shape[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == n and last == int(times[-1])
    assert size > 12_000_000
    assert peak < 2_000_000, peak


# -- bad input -----------------------------------------------------------------------------


def _header(rtype: int = RT_HYDRAHARP2_T2, res_s: float = 1e-12, n: int | None = None) -> bytes:
    tags = [
        ("TTResultFormat_TTTRRecType", -1, TagType.INT8, rtype),
        ("MeasDesc_GlobalResolution", -1, TagType.FLOAT8, res_s),
    ]
    if n is not None:
        tags.append(("TTResult_NumberOfRecords", -1, TagType.INT8, n))
    return encode_header(tags)


def _words(*words: int) -> bytes:
    return np.array(words, dtype="<u4").tobytes()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"not a PTU file: the first 8 bytes are b''"),
        (b"PK\x03\x04 an npz is a zip", r"not a PTU file"),
        (b"PQTTTR\0\0" + b"1.0", r"byte 11: header truncated inside the version string"),
        (_header()[:100], r"byte 64: header truncated: tag entry 1 needs 48 bytes, 36 left"),
        (
            encode_header([("S", -1, TagType.ANSI_STRING, "x" * 40)])[:80],
            r"byte 16: tag 'S' declares 48 bytes of data, but 16 bytes remain",
        ),
        (
            encode_header([]).replace(struct.pack("<I", TagType.EMPTY8), b"\x78\x56\x34\x12"),
            r"byte 16: tag 'Header_End' has unknown type 0x12345678",
        ),
        (encode_header([]), r"no TTResultFormat_TTTRRecType"),
        (_header(rtype=0x00010299), r"unknown record type 0x00010299; supported T2 types: "),
        (_header(rtype=0x00010304), r"0x00010304 \(HydraHarp V1 T3\) is a T3 file"),
        (_header(rtype=0x01010304), r"0x01010304 \(HydraHarp V2 T3\) is a T3 file"),
        (_header(rtype=0x00010307), r"\(MultiHarp T3\) is a T3 file"),
        (_header(res_s=2.5e-13), r"2.5e-13 s is not a whole number of picoseconds"),
        (_header(res_s=-1.0), r"MeasDesc_GlobalResolution \(Float8, seconds\) missing or -1.0"),
        (_header(n=2) + _words(5) + b"\x01\x02", r"byte \d+: truncated record 1: 2 of 4 bytes"),
        (_header(n=5) + _words(5, 6), r"file truncated: it ends after record 1 but the header"),
        (_header(n=1) + _words(5, 6, 7), r"2 records after the 1 that the header"),
    ],
)
def test_bad_files_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.ptu"
    path.write_bytes(content)
    with pytest.raises(PTUError, match=message) as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_truncated_record_offset_is_exact(tmp_path: Path) -> None:
    head = _header(n=3)
    path = tmp_path / "cut.ptu"
    path.write_bytes(head + _words(1, 2) + b"\x07")
    with pytest.raises(PTUError, match=rf"byte {len(head) + 8}: truncated record 2: 1 of 4"):
        read_header(path)


@pytest.mark.parametrize(
    ("rtype", "words", "message"),
    [
        (
            RT_HYDRAHARP2_T2,
            (5, 6, 0x80000000 | (40 << 25)),
            r"record 2 \(0xD0000000\) is a special",
        ),
        (RT_PICOHARP_T2, (5, 7 << 28), r"record 1 \(0x70000000\) is a record with undefined"),
    ],
)
def test_undefined_records_are_named(
    tmp_path: Path, rtype: int, words: tuple[int, ...], message: str
) -> None:
    head = _header(rtype=rtype, n=len(words))
    path = tmp_path / "undef.ptu"
    path.write_bytes(head + _words(*words))
    with pytest.raises(PTUError, match=message) as err:
        read_events(path, all_inputs(rtype))
    bad = len(words) - 1
    assert f"byte {len(head) + 4 * bad}" in str(err.value)


def test_time_beyond_int64_is_refused(tmp_path: Path) -> None:
    """Max-count overflow records pile up 2**50 ticks each: a corrupt file must not wrap."""
    ofl = 0xFE000000 | (2**25 - 1)
    head = _header(res_s=250e-12, n=200)
    path = tmp_path / "wrap.ptu"
    path.write_bytes(head + _words(*([ofl] * 199 + [1])))
    with pytest.raises(PTUError, match=r"past the int64 picosecond range") as err:
        read_events(path)
    # 33 records of (2**25 - 1) * 2**25 ticks at 250 ps pass 2**63 ps: record 32 is named.
    assert f"byte {len(head) + 4 * 32}: record 32:" in str(err.value)


def test_out_of_order_events(tmp_path: Path) -> None:
    # Sync (input 0) 300 ticks after the photon it precedes in the file.
    words = (1000, 0x80000000 | 700, 1200, 900)
    path = tmp_path / "order.ptu"
    head = _header(n=4)
    path.write_bytes(head + _words(*words))
    cmap = {0: 1, 1: 0}
    with pytest.raises(PTUError, match=r"record 1 is 300 ps earlier .* at least 300 sorts it"):
        read_events(path, cmap)
    with pytest.raises(PTUError, match=rf"byte {len(head) + 4}: record 1"):
        read_events(path, cmap, reorder_window_ps=299)
    for chunk in (1, 2, 4):
        t, c = read_events(path, cmap, reorder_window_ps=300, chunk_records=chunk)
        assert t.tolist() == [700, 900, 1000, 1200]
        assert c.tolist() == [1, 0, 0, 0]
    # Unmapped, the sync record is dropped (and counted) before any order check.
    with PTUReader(path, {1: 0}) as reader, pytest.raises(PTUError, match=r"record 3 is 300"):
        list(reader)
    path.write_bytes(head + _words(1000, 0x80000000 | 700, 1200, 1300))
    with PTUReader(path, {1: 0}) as reader:
        assert [t.tolist() for t, _ in reader] == [[1000, 1200, 1300]]
        assert reader.counts.unmapped == 1
        assert reader.counts.per_input[:2].tolist() == [1, 3]


def test_channel_map_must_fit_the_format(tmp_path: Path) -> None:
    path = tmp_path / "pt2.ptu"
    write_ptu(path, [4], [1], record_type=RT_PICOHARP_T2, resolution_ps=4)
    with pytest.raises(PTUError, match=r"input 5 does not exist in PicoHarp T2 \(inputs 0..4"):
        PTUReader(path, {5: 0})


# -- the replay tagger -----------------------------------------------------------------------


def _replay(
    opts: dict[str, Any], delays: dict[int, int] | None = None
) -> tuple[list[TagBatch], dict[str, Any]]:
    """Stream through BatchValidator until every tag of the recording has been sent."""

    async def run() -> tuple[list[TagBatch], dict[str, Any]]:
        tagger = ReplayTagger("rp", opts, CTX)
        validator = BatchValidator("rp")
        out: list[TagBatch] = []
        async with tagger:
            for ch, d in (delays or {}).items():
                await tagger.set_delay(ch, d)
            async for batch in tagger.stream():
                out.append(validator.check(batch))
                if tagger.describe()["finished"]:
                    break
            info = dict(tagger.describe())
        assert validator.missed_batches == 0
        return out, info

    return asyncio.run(run())


def _joined(batches: list[TagBatch]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    return (
        np.concatenate([b.timestamps_ps for b in batches]),
        np.concatenate([b.channels for b in batches]),
    )


@pytest.mark.parametrize("chunk", [1, 7, 1 << 18])
def test_replay_tagger_cuts_every_event_into_contiguous_batches(tmp_path: Path, chunk: int) -> None:
    rng = np.random.default_rng(11)
    n = 4000
    times = np.sort(rng.integers(3 * 10**9, 4 * 10**11, n)) // 5 * 5
    inputs = rng.integers(0, 5, n)  # 0: sync, mapped below
    path = tmp_path / "mh.ptu"
    write_ptu(
        path,
        times,
        inputs,
        record_type=RT_MULTIHARP_T2,
        resolution_ps=5,
        markers=(times[::500], np.full(8, 3)),
    )
    dur = 7_000_000_000
    cmap = {"0": 3, "1": 0, "2": 1, "4": 2}  # TOML keys are strings; input 3 left out
    batches, info = _replay(
        {"file": str(path), "channel_map": cmap, "batch_duration_ps": dur, "chunk_records": chunk}
    )
    keep = inputs != 3
    assert batches[0].start_ps == int(times[keep][0]) // dur * dur
    assert all(b.stop_ps - b.start_ps == dur for b in batches)
    assert all(a.stop_ps == b.start_ps for a, b in itertools.pairwise(batches))
    lut = np.array([3, 0, 1, 255, 2])
    t, c = _joined(batches)
    np.testing.assert_array_equal(t, times[keep])
    np.testing.assert_array_equal(c, lut[inputs[keep]])
    assert info["markers_dropped"] == 8
    assert info["unmapped_dropped"] == int(np.count_nonzero(~keep))
    assert info["record_type"] == "0x00010207 (MultiHarp T2)"
    assert info["resolution_ps"] == 5
    assert info["late_dropped"] == 0


def test_replay_tagger_applies_delays(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    n = 3000
    times = np.sort(rng.integers(10**10, 2 * 10**11, n))
    inputs = rng.integers(1, 5, n)
    path = tmp_path / "hh.ptu"
    write_ptu(path, times, inputs)
    delays = {0: 2_500_000_000, 2: -40_000}  # channel 0 (input 1) late, 2 (input 3) early
    dur = 10**10
    batches, info = _replay(
        {"file": str(path), "batch_duration_ps": dur, "chunk_records": 64}, delays
    )
    ch = inputs - 1
    shifted = times + np.array([delays.get(k, 0) for k in range(4)])[ch]
    order = np.argsort(shifted, kind="stable")
    first = int(times[0]) // dur * dur
    keep = shifted[order] >= first
    t, c = _joined(batches)
    np.testing.assert_array_equal(t, shifted[order][keep])
    np.testing.assert_array_equal(c, ch[order][keep])
    assert info["late_dropped"] == int(np.count_nonzero(~keep))


def test_replay_tagger_delay_changed_mid_stream(tmp_path: Path) -> None:
    """Lowering a delay mid-stream drops the tags it moves into batches already sent
    (counted); raising it again loses and repeats nothing."""
    times = np.arange(1, 201) * 10**9  # one tag a millisecond on input 1
    path = tmp_path / "mid.ptu"
    write_ptu(path, times, np.ones(200, dtype=np.int64))

    async def run() -> tuple[list[TagBatch], dict[str, Any]]:
        tagger = ReplayTagger("rp", {"file": str(path), "chunk_records": 16}, CTX)
        validator = BatchValidator("rp")
        out: list[TagBatch] = []
        async with tagger:
            async for batch in tagger.stream():
                out.append(validator.check(batch))
                if len(out) == 3:
                    await tagger.set_delay(0, -25 * 10**9)
                if len(out) == 6:
                    await tagger.set_delay(0, 0)
                if tagger.describe()["finished"]:
                    break
            return out, dict(tagger.describe())

    batches, info = asyncio.run(run())
    t = _joined(batches)[0]
    # Batch 3 is [30, 40) ms: tags recorded at 30..54 ms now fall before it.
    assert info["late_dropped"] == 25
    assert t.shape[0] == 200 - 25
    assert bool(np.all(np.diff(t) > 0))
    assert t[:29].tolist() == times[:29].tolist()
    assert t[29:39].tolist() == (times[54:64] - 25 * 10**9).tolist()


def test_replay_tagger_options_and_open_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.ptu"
    write_ptu(path, [1, 2], [1, 2])
    for opts, message in [
        ({"file": str(path), "channel_map": {"a": 0}}, r"key 'a' is not an input number"),
        ({"file": str(path), "channel_map": {"1": 64}}, r"input 1 maps to 64, not a channel"),
        ({"file": str(path), "channel_map": {}}, r"must be a non-empty table"),
        ({"file": str(path), "batch_duration_ps": 10}, r"'batch_duration_ps' must be an integer"),
        ({"file": str(path), "reorder_window_ps": -1}, r"'reorder_window_ps' must be an integer"),
        ({"file": str(tmp_path / "r.npz"), "channel_map": {}}, r"apply to .ptu files only"),
        ({"file": str(path), "speed": 2}, r"unknown option\(s\) \['speed'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            ReplayTagger("rp", opts, CTX)
    bad = tmp_path / "bad.ptu"
    bad.write_bytes(_header(rtype=0x00010304, n=0))

    async def open_bad() -> None:
        async with ReplayTagger("rp", {"file": str(bad)}, CTX):
            pass

    with pytest.raises(ValueError, match=rf"rp: {bad}: record type 0x00010304"):
        asyncio.run(open_bad())


def test_bad_record_mid_stream_is_a_device_error(tmp_path: Path) -> None:
    """A record the format does not define, deep in the file: the stream fails with the
    contract's DeviceError, naming the device, the file, the record and its byte."""
    path = tmp_path / "deep.ptu"
    times = np.arange(1, 101) * 10**9
    write_ptu(path, times, np.ones(100, dtype=np.int64))
    hdr = read_header(path)
    with path.open("r+b") as f:
        f.seek(hdr.data_offset + 4 * 80)
        f.write(_words(0x80000000 | (20 << 25)))

    async def run() -> int:
        seen = 0
        async with ReplayTagger("rp", {"file": str(path), "chunk_records": 10}, CTX) as tagger:
            async for batch in tagger.stream():
                seen += len(batch)
        return seen

    with pytest.raises(DeviceError, match=rf"rp: {path}: byte {hdr.data_offset + 320}: record 80 "):
        asyncio.run(run())


def test_replay_resumes_after_reopen(tmp_path: Path) -> None:
    """A stream taken up again after a close goes on from the next batch, nothing lost."""
    times = np.arange(1, 201) * 10**9
    path = tmp_path / "re.ptu"
    write_ptu(path, times, np.ones(200, dtype=np.int64))

    async def run() -> list[TagBatch]:
        tagger = ReplayTagger("rp", {"file": str(path), "chunk_records": 16}, CTX)
        out: list[TagBatch] = []
        for _ in range(3):
            async with tagger:
                async for batch in tagger.stream():
                    out.append(batch)
                    if len(out) % 7 == 0:
                        break
        return out

    batches = asyncio.run(run())
    validator = BatchValidator("rp")
    for b in batches:
        validator.check(b)
    assert [b.seq for b in batches] == list(range(21))
    assert _joined(batches)[0].tolist() == times[times < batches[-1].stop_ps].tolist()


# -- a recorded BBM92 link, replayed from PTU files through lock, coincidences and sifting ----


def test_ptu_recordings_run_through_sifting(tmp_path: Path) -> None:
    """Alice's and Bob's tag streams (offset, drift, jitter, singles), written as PTU files
    of two instruments, replayed and run through the daemon's per-batch pipeline."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_pipeline import make_streams, run

    alice_b, bob_b = make_streams(1.0, 2e5)
    dur = alice_b[0].stop_ps - alice_b[0].start_ps
    replayed = []
    for role, batches, rtype, res in (
        ("alice", alice_b, RT_HYDRAHARP_T2, 1),
        ("bob", bob_b, RT_MULTIHARP_T2, 5),
    ):
        t = np.concatenate([b.timestamps_ps for b in batches]) // res * res
        c = np.concatenate([b.channels for b in batches]).astype(np.int64)
        path = tmp_path / f"{role}.ptu"
        write_ptu(path, t, c + 1, record_type=rtype, resolution_ps=res)
        got, _ = _replay({"file": str(path), "batch_duration_ps": dur})
        np.testing.assert_array_equal(_joined(got)[0], t)
        replayed.append(got)
    result = run(replayed[0], replayed[1])
    direct = run(alice_b, bob_b)  # the same streams, never written to a file
    assert result["locked"] == 1.0
    assert result["drift_ppm"] == pytest.approx(7.0, abs=0.01)  # make_streams' clock drift
    assert result["sifted"] > 10_000
    assert result["coincidences"] == pytest.approx(direct["coincidences"], rel=0.01)
    assert result["sifted"] == pytest.approx(direct["sifted"], rel=0.01)
    assert result["dropped"] == 0
