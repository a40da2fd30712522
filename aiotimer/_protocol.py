"""Wire codecs: aiotimer's binary frames and torch's JSON lines.  No I/O here.

aiotimer frame (native byte order; both ends are on one host)::

    magic u8 | op u8 | length u16 | pid i32 | value f64 | scope utf-8 ...

``length`` counts the whole frame.  A frame never exceeds ``PIPE_BUF`` so one
``write`` of it is atomic, even when a worker and its children share the pipe.
``value`` is the deadline (CLOCK_MONOTONIC seconds for ``ACQUIRE``, wall-clock
seconds for ``ACQUIRE_WALL``) or, for ``HELLO``, the signal number on which the
client dumps its stacks (0 for none).  The magic byte lets the decoder find the
next frame after a corrupt one, so one bad frame never costs the ones after it.

torch's ``FileTimerClient`` line::

    {"version": 1, "pid": int, "scope_id": str, "expiration_time": float, "signal": int}
"""

from __future__ import annotations

import enum
import json
import math
import struct
from typing import NamedTuple

from ._exceptions import ProtocolError

__all__ = [
    "ENV_DUMP_SIGNAL",
    "ENV_FD",
    "SIGNAL_DEFAULT",
    "SIGNAL_LOG_ONLY",
    "FRAME_MAX",
    "JSON_LINE_MAX",
    "FrameDecoder",
    "Op",
    "Request",
    "decode_json_line",
    "encode_acquire",
    "encode_hello",
    "encode_json_request",
    "encode_release",
]

#: Environment variable naming the inherited fd a spawned worker writes requests to.
ENV_FD = "AIOTIMER_FD"
#: Environment variable naming the signal a spawned worker should dump stacks on.
ENV_DUMP_SIGNAL = "AIOTIMER_DUMP_SIGNAL"

MAGIC = 0xA7
_HEADER = struct.Struct("=BBHid")
HEADER_SIZE = _HEADER.size
#: Largest frame: PIPE_BUF on Linux, the size the kernel writes atomically.
FRAME_MAX = 4096
#: Longest scope, in UTF-8 bytes, that fits in one frame.
SCOPE_MAX = FRAME_MAX - HEADER_SIZE
#: Longest torch JSON line, as torch's client enforces.
JSON_LINE_MAX = 4096

_MAGIC_BYTE = bytes([MAGIC])
_PID_MAX = 2**31 - 1


class Op(enum.IntEnum):
    """What a request asks of the server."""

    ACQUIRE = 1  #: arm a timer; deadline on CLOCK_MONOTONIC
    ACQUIRE_WALL = 2  #: arm a timer; deadline on the wall clock (torch clients)
    RELEASE = 3  #: disarm a timer
    HELLO = 4  #: a client announces itself and its stack-dump signal


_OPS = {op.value: op for op in Op}


#: ``Request.signal``: the client leaves the choice of signal to the server's reaper.
SIGNAL_DEFAULT = 0
#: ``Request.signal``: the client asks for its expiry to be reported, never signalled
#: (torch's clients send a signal <= 0 for that).
SIGNAL_LOG_ONLY = -1


class Request(NamedTuple):
    """One decoded request.

    ``signal`` is what the client asked to be killed with: a signal number, or
    ``SIGNAL_DEFAULT`` (0: the server's reaper chooses) or ``SIGNAL_LOG_ONLY``
    (-1: report the expiry, send nothing).  For ``HELLO``, ``signal`` is the
    signal the client dumps its stacks on (0: none).
    """

    op: Op
    pid: int
    scope: str
    deadline: float
    signal: int = SIGNAL_DEFAULT


def _encode(op: Op, pid: int, scope: str, value: float) -> bytes:
    raw = scope.encode()
    if len(raw) > SCOPE_MAX:
        raise ValueError(
            f"`scope` must encode to at most {SCOPE_MAX} UTF-8 bytes, got {len(raw)} bytes"
        )
    return _HEADER.pack(MAGIC, op, HEADER_SIZE + len(raw), pid, value) + raw


def encode_acquire(pid: int, scope: str, deadline: float, *, wall: bool = False) -> bytes:
    """Encode an acquire of ``scope`` by ``pid`` expiring at ``deadline``."""
    return _encode(Op.ACQUIRE_WALL if wall else Op.ACQUIRE, pid, scope, deadline)


def encode_release(pid: int, scope: str) -> bytes:
    """Encode a release of ``scope`` by ``pid``."""
    return _encode(Op.RELEASE, pid, scope, 0.0)


def encode_hello(pid: int, dump_signal: int = 0) -> bytes:
    """Encode a client's greeting, naming the signal it dumps stacks on (0: none)."""
    return _encode(Op.HELLO, pid, "", float(dump_signal))


class FrameDecoder:
    """Incremental decoder of aiotimer frames from a byte stream.

    ``feed`` returns the requests it completed and a reason for each corrupt
    frame it skipped; an incomplete frame is kept for the next ``feed``.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def pending(self) -> int:
        """Bytes held back, waiting for the rest of their frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> tuple[list[Request], list[str]]:
        """Decode what ``data`` completes; return ``(requests, errors)``."""
        buf = self._buffer + data if self._buffer else data
        requests: list[Request] = []
        errors: list[str] = []
        append = requests.append
        unpack = _HEADER.unpack_from
        ops = _OPS
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            magic, op, length, pid, value = unpack(buf, pos)
            if magic != MAGIC or length < HEADER_SIZE or length > FRAME_MAX:
                errors.append(
                    f"corrupt frame header at byte {pos} "
                    f"(magic={magic:#x}, length={length}); resynchronising"
                )
                nxt = buf.find(_MAGIC_BYTE, pos + 1)
                pos = end if nxt < 0 else nxt
                continue
            if end - pos < length:
                break
            kind = ops.get(op)
            try:
                scope = buf[pos + HEADER_SIZE : pos + length].decode()
            except UnicodeDecodeError:
                scope = None
            pos += length
            if kind is None:
                errors.append(f"unknown op {op} from pid {pid}")
            elif scope is None:
                errors.append(f"scope from pid {pid} is not valid UTF-8")
            elif pid <= 0:
                errors.append(f"pid must be > 0, got {pid}")
            elif kind is Op.ACQUIRE or kind is Op.ACQUIRE_WALL:
                if value != value or value in (math.inf, -math.inf):
                    errors.append(f"deadline from pid {pid} must be finite, got {value}")
                else:
                    append(Request(kind, pid, scope, value))
            elif kind is Op.RELEASE:
                append(Request(kind, pid, scope, 0.0))
            else:
                append(Request(kind, pid, scope, 0.0, int(value) if value >= 0 else 0))
        self._buffer = buf[pos:] if pos < end else b""
        return requests, errors


def encode_json_request(pid: int, scope: str, expiration_time: float, signal: int) -> bytes:
    """Encode a request as torch's ``FileTimerClient`` writes it (one line)."""
    return (
        json.dumps(
            {
                "version": 1,
                "pid": pid,
                "scope_id": scope,
                "expiration_time": expiration_time,
                "signal": signal,
            }
        ).encode()
        + b"\n"
    )


def _field(obj: dict[str, object], name: str, kind: type | tuple[type, ...]) -> object:
    if name not in obj:
        raise ProtocolError(f"missing field {name!r}")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ProtocolError(f"field {name!r} has the wrong type: {value!r}")
    return value


def decode_json_line(line: bytes) -> Request:
    """Decode one torch ``FileTimerClient`` line (without or with its newline).

    A negative ``expiration_time`` is a release, as in torch.  Raises
    ``ProtocolError`` naming what was wrong.
    """
    if len(line) > JSON_LINE_MAX + 1:
        raise ProtocolError(f"line of {len(line)} bytes exceeds {JSON_LINE_MAX}")
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("version", 1)
    if version != 1:
        raise ProtocolError(f"unsupported version {version!r}, expected 1")
    pid = _field(obj, "pid", int)
    scope = _field(obj, "scope_id", str)
    expiration = _field(obj, "expiration_time", (int, float))
    signal = _field(obj, "signal", int)
    assert isinstance(pid, int) and isinstance(scope, str)
    assert isinstance(expiration, (int, float)) and isinstance(signal, int)
    if not 0 < pid <= _PID_MAX:
        raise ProtocolError(f"pid must be in 1..{_PID_MAX}, got {pid}")
    if not math.isfinite(expiration):
        raise ProtocolError(f"expiration_time must be finite, got {expiration}")
    if expiration < 0:
        return Request(Op.RELEASE, pid, scope, 0.0)
    return Request(
        Op.ACQUIRE_WALL, pid, scope, float(expiration), signal if signal > 0 else SIGNAL_LOG_ONLY
    )
