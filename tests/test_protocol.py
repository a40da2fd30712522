"""Wire codecs: frames round-trip, resynchronise after garbage, and reject bad input."""

import json
import math
import struct

import pytest

from aiotimer import ProtocolError
from aiotimer._protocol import (
    FRAME_MAX,
    HEADER_SIZE,
    SCOPE_MAX,
    FrameDecoder,
    Op,
    Request,
    decode_json_line,
    encode_acquire,
    encode_hello,
    encode_json_request,
    encode_release,
)


def test_frames_round_trip() -> None:
    data = (
        encode_acquire(10, "step", 12.5)
        + encode_acquire(11, "ünïcode/scope", 1.7e9, wall=True)
        + encode_release(10, "step")
        + encode_hello(10, 12)
    )
    requests, errors = FrameDecoder().feed(data)
    assert errors == []
    assert requests == [
        Request(Op.ACQUIRE, 10, "step", 12.5),
        Request(Op.ACQUIRE_WALL, 11, "ünïcode/scope", 1.7e9),
        Request(Op.RELEASE, 10, "step", 0.0),
        Request(Op.HELLO, 10, "", 0.0, 12),
    ]


def test_frames_split_across_reads_are_reassembled() -> None:
    data = b"".join(encode_acquire(5, f"s{i}", float(i)) for i in range(50))
    decoder = FrameDecoder()
    got: list[Request] = []
    for i in range(0, len(data), 7):
        requests, errors = decoder.feed(data[i : i + 7])
        assert errors == []
        got += requests
    assert [r.scope for r in got] == [f"s{i}" for i in range(50)]
    assert decoder.pending == 0


def test_garbage_between_frames_is_reported_and_later_frames_survive() -> None:
    good = encode_acquire(5, "a", 1.0)
    data = good + b"\x00garbage that is long enough\xff" + encode_release(5, "a") + good
    requests, errors = FrameDecoder().feed(data)
    assert [r.op for r in requests] == [Op.ACQUIRE, Op.RELEASE, Op.ACQUIRE]
    assert errors and all("corrupt frame header" in e for e in errors)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (struct.pack("=BBHid", 0xA7, 99, HEADER_SIZE, 5, 1.0), "unknown op 99"),
        (struct.pack("=BBHid", 0xA7, 1, HEADER_SIZE + 2, 5, 1.0) + b"\xff\xfe", "UTF-8"),
        (struct.pack("=BBHid", 0xA7, 1, HEADER_SIZE, 0, 1.0), "pid must be > 0"),
        (struct.pack("=BBHid", 0xA7, 1, HEADER_SIZE, 5, math.nan), "must be finite"),
        (struct.pack("=BBHid", 0xA7, 1, HEADER_SIZE, 5, math.inf), "must be finite"),
    ],
)
def test_malformed_frames_are_rejected_without_losing_neighbours(frame: bytes, reason: str) -> None:
    data = encode_acquire(5, "before", 1.0) + frame + encode_acquire(5, "after", 2.0)
    requests, errors = FrameDecoder().feed(data)
    assert [r.scope for r in requests] == ["before", "after"]
    assert len(errors) == 1 and reason in errors[0]


def test_oversized_length_field_resynchronises() -> None:
    bad = struct.pack("=BBHid", 0xA7, 1, FRAME_MAX + 1, 5, 1.0)
    requests, errors = FrameDecoder().feed(bad + encode_release(5, "x"))
    assert [r.scope for r in requests] == ["x"]
    assert errors


def test_scope_too_long_for_one_atomic_write_is_refused_by_the_encoder() -> None:
    assert len(encode_acquire(1, "x" * SCOPE_MAX, 1.0)) == FRAME_MAX
    with pytest.raises(ValueError, match="`scope` must encode to at most"):
        encode_acquire(1, "x" * (SCOPE_MAX + 1), 1.0)


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
    assert release.op is Op.RELEASE and release.signal == 0


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
    ],
)
def test_bad_json_lines_raise_protocol_error_naming_the_problem(line: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_json_line(line)
