"""Wire codecs: frames round-trip, resynchronise after garbage, and reject bad input."""

import json
import math
import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiotimer import ProtocolError
from aiotimer._protocol import (
    FRAME_MAX,
    HEADER_SIZE,
    JSON_LINE_MAX,
    MAGIC,
    SCOPE_MAX,
    SIGNAL_LOG_ONLY,
    FrameDecoder,
    JsonLineDecoder,
    Op,
    Request,
    _checked_request_from_json,
    _request_from_json,
    decode_json_line,
    decode_json_lines,
    encode_acquire,
    encode_acquire_after,
    encode_frame,
    encode_hello,
    encode_json_request,
    encode_release,
)


def test_frames_round_trip() -> None:
    data = (
        encode_acquire_after(10, "step", 12.5)
        + encode_acquire(10, "abs", 3.0)
        + encode_acquire(11, "ünïcode/scope", 1.7e9, wall=True)
        + encode_release(10, "step")
        + encode_hello(10, 12)
    )
    requests, errors = FrameDecoder().feed(data)
    assert errors == []
    assert requests == [
        Request(Op.ACQUIRE_AFTER, 10, "step", 12.5),
        Request(Op.ACQUIRE, 10, "abs", 3.0),
        Request(Op.ACQUIRE_WALL, 11, "ünïcode/scope", 1.7e9),
        Request(Op.RELEASE, 10, "step", 0.0),
        Request(Op.HELLO, 10, "", 0.0, 12),
    ]


def test_frames_split_across_reads_are_reassembled() -> None:
    data = b"".join(encode_acquire_after(5, f"s{i}", float(i)) for i in range(50))
    decoder = FrameDecoder()
    got: list[Request] = []
    for i in range(0, len(data), 7):
        requests, errors = decoder.feed(data[i : i + 7])
        assert errors == []
        got += requests
    assert [r.scope for r in got] == [f"s{i}" for i in range(50)]
    assert decoder.pending == 0


def test_a_run_of_garbage_is_one_rejection_and_later_frames_survive() -> None:
    good = encode_acquire_after(5, "a", 1.0)
    data = good + b"\x00garbage that is long enough\xff" + encode_release(5, "a") + good
    requests, errors = FrameDecoder().feed(data)
    assert [r.op for r in requests] == [Op.ACQUIRE_AFTER, Op.RELEASE, Op.ACQUIRE_AFTER]
    assert errors == ["skipped 29 bytes that are not frames"]


def test_megabytes_of_garbage_cost_one_rejection_per_read() -> None:
    decoder = FrameDecoder()
    rng = random.Random(7)
    reasons = 0
    for _ in range(64):
        _, errors = decoder.feed(rng.randbytes(65536))
        reasons += len(errors)
    requests, errors = decoder.feed(encode_release(5, "after the flood"))
    assert [r.scope for r in requests] == ["after the flood"]
    assert reasons + len(errors) <= 65


def _header(op: int, length: int, pid: int, value: float) -> bytes:
    head = struct.pack("=BBHid", MAGIC, op, length, pid, value)
    return head + struct.pack("=I", zlib.crc32(head))


def test_a_made_up_header_with_a_plausible_length_swallows_nothing() -> None:
    # Magic byte and an in-range length, but no valid checksum: the decoder must
    # not wait for (or skip) 4000 bytes of what follows.
    fake = struct.pack("=BBHid", MAGIC, Op.ACQUIRE_AFTER, 4000, 5, 1.0) + b"\0\0\0\0"
    requests, errors = FrameDecoder().feed(fake + encode_release(5, "kept"))
    assert [r.scope for r in requests] == ["kept"]
    assert errors == [f"skipped {len(fake)} bytes that are not frames"]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (_header(99, HEADER_SIZE, 5, 1.0), "unknown op 99"),
        (_header(5, HEADER_SIZE + 2, 5, 1.0) + b"\xff\xfe", "UTF-8"),
        (_header(5, HEADER_SIZE, 0, 1.0), "pid must be > 0"),
        (_header(5, HEADER_SIZE, 5, math.nan), "must be finite"),
        (_header(1, HEADER_SIZE, 5, math.inf), "must be finite"),
        (_header(5, HEADER_SIZE, 5, -1.0), "must be >= 0"),
        (_header(4, HEADER_SIZE, 5, 100.0), "not a signal number"),
        (_header(4, HEADER_SIZE, 5, 1e12), "not a signal number"),
        (_header(4, HEADER_SIZE, 5, math.inf), "not a signal number"),
        (_header(4, HEADER_SIZE, 5, 2.5), "not a signal number"),
    ],
)
def test_malformed_frames_are_rejected_without_losing_neighbours(frame: bytes, reason: str) -> None:
    data = encode_acquire_after(5, "before", 1.0) + frame + encode_release(5, "after")
    requests, errors = FrameDecoder().feed(data)
    assert [r.scope for r in requests] == ["before", "after"]
    assert len(errors) == 1 and reason in errors[0]


def test_oversized_length_field_resynchronises() -> None:
    bad = _header(5, FRAME_MAX + 1, 5, 1.0)
    requests, errors = FrameDecoder().feed(bad + encode_release(5, "x"))
    assert [r.scope for r in requests] == ["x"]
    assert errors


def test_scope_too_long_for_one_atomic_write_is_refused_by_the_encoder() -> None:
    assert len(encode_acquire_after(1, "x" * SCOPE_MAX, 1.0)) == FRAME_MAX
    with pytest.raises(ValueError, match="`scope` must encode to at most"):
        encode_acquire_after(1, "x" * (SCOPE_MAX + 1), 1.0)


_frames = st.builds(
    lambda op, pid, scope, value: (op, pid, scope, value),
    st.sampled_from([Op.ACQUIRE_AFTER, Op.RELEASE, Op.ACQUIRE_WALL]),
    st.integers(1, 2**31 - 1),
    st.text(max_size=40),
    st.floats(0, 1e10),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_frames, st.binary(max_size=300)), max_size=30),
    st.lists(st.integers(1, 500), max_size=20),
)
def test_garbage_interleaved_with_frames_loses_no_frame(
    items: list[tuple[tuple[Op, int, str, float], bytes]], cuts: list[int]
) -> None:
    stream = b""
    expected = []
    for (op, pid, scope, value), garbage in items:
        stream += garbage + encode_frame(op, pid, scope, 0.0 if op is Op.RELEASE else value)
        expected.append((op, pid, scope))
    decoder = FrameDecoder()
    got = []
    pos = 0
    for cut in [*cuts, len(stream)]:  # delivered in arbitrary reads
        requests, _ = decoder.feed(stream[pos : pos + cut])
        got += [(r.op, r.pid, r.scope) for r in requests]
        pos += cut
    requests, _ = decoder.feed(stream[pos:])
    got += [(r.op, r.pid, r.scope) for r in requests]
    assert got == expected


def test_json_lines_round_trip_like_torch() -> None:
    line = encode_json_request(42, "scope", 1.7e9, 9)
    assert json.loads(line) == {
        "version": 1,
        "pid": 42,
        "scope_id": "scope",
        "expiration_time": 1.7e9,
        "signal": 9,
    }
    assert decode_json_line(line) == Request(Op.ACQUIRE_WALL, 42, "scope", 1.7e9, 9)
    release = decode_json_line(encode_json_request(42, "scope", -1, 0))
    assert release.op is Op.RELEASE
    log_only = decode_json_line(encode_json_request(42, "scope", 1.7e9, 0))
    assert log_only.signal == SIGNAL_LOG_ONLY


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"pid": 1, "scope_id": "s", "expiration_time": 1.0}', "missing field 'signal'"),
        (b'{"pid": "1", "scope_id": "s", "expiration_time": 1.0, "signal": 9}', "'pid'"),
        (b'{"pid": true, "scope_id": "s", "expiration_time": 1.0, "signal": 9}', "'pid'"),
        (b'{"pid": 1, "scope_id": 3, "expiration_time": 1.0, "signal": 9}', "'scope_id'"),
        (b'{"pid": 1, "scope_id": "s", "expiration_time": NaN, "signal": 9}', "finite"),
        (b'{"pid": 1, "scope_id": "s", "expiration_time": Infinity, "signal": 9}', "finite"),
        (b'{"pid": -4, "scope_id": "s", "expiration_time": 1.0, "signal": 9}', "pid must be"),
        (
            b'{"version": 2, "pid": 1, "scope_id": "s", "expiration_time": 1, "signal": 9}',
            "unsupported version",
        ),
        (b"\xff\xfe", "not JSON"),
        (b'{"pid": 1, "scope_id": "' + b"x" * 5000 + b'"}', "exceeds"),
        (b'{"pid": 1, "scope_id": "s", "expiration_time": 1.0, "signal": 100}', "not a signal"),
        (b'{"pid": 1, "scope_id": "s", "expiration_time": 1.0, "signal": 1e12}', "'signal'"),
    ],
)
def test_bad_json_lines_raise_protocol_error_naming_the_problem(line: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_json_line(line)


def test_many_json_lines_decode_in_one_pass_and_a_bad_one_is_rejected_alone() -> None:
    good = [encode_json_request(40 + i, f"s{i}", 1.7e9, 9).strip() for i in range(20)]
    requests, errors = decode_json_lines(good)
    assert errors == [] and [r.pid for r in requests] == list(range(40, 60))
    mixed = [*good[:5], b"{not json", b'{"a": 1}, {"b": 2}', b"[1]", *good[5:]]
    requests, errors = decode_json_lines(mixed)
    assert [r.pid for r in requests] == list(range(40, 60))
    assert len(errors) == 3


@pytest.mark.parametrize(
    "prefix",
    [b'{"not": ', b"\x00\xff junk", b'{"version": 1, "pid": 7', b'{"version"{"version"'],
)
def test_a_request_glued_to_a_partial_line_is_kept_and_the_junk_rejected(prefix: bytes) -> None:
    # A FIFO is one stream for all writers: junk (or a writer that died mid-line)
    # leaves a partial line, and the next client's whole request is glued to it.
    request = encode_json_request(42, "s", 1.7e9, 9).strip()
    requests, errors = decode_json_lines([prefix + request])
    assert requests == [Request(Op.ACQUIRE_WALL, 42, "s", 1.7e9, 9)]
    assert len(errors) == 1
    requests, errors = decode_json_lines([prefix, b"junk only"])
    assert requests == [] and len(errors) == 2


_json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["version", "pid", "scope_id", "expiration_time", "signal", "x"]),
        st.one_of(_json_values, st.sampled_from([1, 9, 15, 100, -1, 0, 1.5e9, -1.0, "s"])),
    )
)
def test_the_fast_path_decodes_exactly_as_the_checked_one(obj: dict[str, object]) -> None:
    def outcome(decode: object) -> object:
        try:
            return decode(obj)  # type: ignore[operator]
        except ProtocolError:
            return "rejected"

    assert outcome(_request_from_json) == outcome(_checked_request_from_json)


# -- torch's JSON lines, as a stream (JsonLineDecoder) -----------------------------------


def test_a_deeply_nested_line_is_one_rejection_and_the_rest_of_the_read_survives() -> None:
    # 3,000 "[" fit in the 4 KiB line limit and once raised RecursionError out of
    # the reader, losing every request of that read (a release lost: a false kill).
    good = encode_json_request(42, "s", 1.7e9, 9)
    release = encode_json_request(42, "s", -1, 0)
    for poison in (b"[" * 3000, b'{"a":' * 600 + b"1" + b"}" * 600, b"[" * 2000 + b"]" * 2000):
        requests, errors = JsonLineDecoder().feed(good + poison + b"\n" + release)
        assert requests == [
            Request(Op.ACQUIRE_WALL, 42, "s", 1.7e9, 9),
            Request(Op.RELEASE, 42, "s", 0.0),
        ], poison[:10]
        assert len(errors) == 1  # the poison line alone


def test_a_release_glued_after_junk_is_kept_whichever_path_decodes_it() -> None:
    release = encode_json_request(42, "s", -1, 0).strip()
    for junk in (b'"x", ', b"1, ", b"[], ", b"{}, "):
        lines = [encode_json_request(7, "a", 1.7e9, 9).strip(), junk + release]
        requests, _ = decode_json_lines(lines)
        assert Request(Op.RELEASE, 42, "s", 0.0) in requests, junk


def test_an_oversize_line_is_one_rejection_and_a_request_glued_to_its_tail_survives() -> None:
    decoder = JsonLineDecoder()
    request = encode_json_request(42, "s", 1.7e9, 9)
    requests, errors = decoder.feed(b"x" * (JSON_LINE_MAX + 10))
    assert requests == [] and len(errors) == 1 and decoder.pending == 0
    requests, errors = decoder.feed(b"y" * 100 + request)
    assert requests == [Request(Op.ACQUIRE_WALL, 42, "s", 1.7e9, 9)] and errors == []


_chunks = st.lists(
    st.one_of(
        st.builds(
            lambda pid, scope, t, sig: encode_json_request(pid, scope, t, sig),
            st.integers(1, 2**22),
            st.text(max_size=20),
            st.one_of(st.floats(-10, 2e9), st.just(-1.0)),
            st.sampled_from([0, 9, 15]),
        ),
        st.binary(max_size=64),
        st.sampled_from([b"[" * 3000, b"{" * 2000, b"\n", b'{"version"', b"x" * 5000]),
        st.builds(lambda n: b"[" * n + b"]" * n, st.integers(0, 3000)),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(_chunks, st.lists(st.integers(1, 8192), min_size=1, max_size=6))
def test_the_line_decoder_never_raises_and_loses_no_whole_request(
    chunks: list[bytes], cuts: list[int]
) -> None:
    """Fuzz: nested, glued, truncated and oversize input, split across reads anywhere."""
    stream = b"".join(chunks)
    decoder = JsonLineDecoder()
    got: list[Request] = []
    at = 0
    for cut in [*cuts, len(stream)]:
        requests, errors = decoder.feed(stream[at : at + cut])
        assert all(isinstance(e, str) for e in errors)
        got += requests
        at += cut
    got += decoder.feed(b"\n")[0]
    # Every request written whole on a line of its own, after a newline, is decoded.
    whole = [line for line in stream.split(b"\n") if line.startswith(b'{"version"')]
    for line in whole:
        try:
            wanted = decode_json_line(line)
        except ProtocolError:
            continue
        if len(line) <= JSON_LINE_MAX and stream.split(b"\n").index(line) > 0:
            assert wanted in got
