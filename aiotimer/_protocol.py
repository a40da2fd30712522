"""Wire codecs: aiotimer's binary frames and torch's JSON lines.  No I/O here.

aiotimer frame (native byte order; both ends are on one host)::

    magic u8 | op u8 | length u16 | pid i32 | value f64 | crc u32 | scope utf-8 ...

``length`` counts the whole frame; ``crc`` is the CRC-32 of the 16 bytes before
it.  A frame never exceeds ``PIPE_BUF`` so one ``write`` of it is atomic, even
when a worker and its children share the pipe.  ``value`` is:

- ``ACQUIRE_STAMPED``: a deadline on the client's monotonic clock; the payload
  starts with the client's clock reading when it sent the frame (f64), then the
  scope.  What pipe clients send: the server learns each process's clock
  offset (the smallest ``receipt - sent`` it has seen, never below the true
  offset), so a worker in another time namespace is timed right, and
  deadlines that the workers of one job set together stay together;
- ``ACQUIRE_AFTER``: seconds from receipt (for clients with no clock to share);
- ``ACQUIRE``: a deadline on the server's own monotonic clock (in-process callers);
- ``ACQUIRE_WALL``: a wall-clock deadline (torch's clients);
- ``HELLO``: the signal number the client dumps its stacks on (0: none).

On a socket the server answers each connection once, before the client sends
anything: a reply frame, in the same format with a reply op that no request
uses (so a reply sent back to a server is a rejected unknown op)::

    WELCOME: pid = the pid the server knows the client by, value = the signal it
             should dump its stacks on (0: none), payload = the directory to dump
             them into (empty: stderr)
    REFUSED: pid = the client's pid as the server saw it, payload = the reason

The header checksum makes the framing self-synchronising: after garbage, the
decoder tries the next byte, and a header is believed only when its checksum
holds, so garbage interleaved with valid frames never swallows one (a made-up
header with a plausible length would otherwise hold back the frames after it).
Garbage is reported once per run of skipped bytes, never once per byte.

torch's ``FileTimerClient`` line::

    {"version": 1, "pid": int, "scope_id": str, "expiration_time": float, "signal": int}

Signal numbers are validated here, where requests are decoded: a request
asking for a signal that does not exist is rejected with its reason.
"""

from __future__ import annotations

import contextlib
import enum
import math
import signal as _signal
import struct
import types
import zlib
from collections.abc import Sequence
from typing import NamedTuple

from ._exceptions import ProtocolError

__all__ = [
    "ENV_DUMP_DIR",
    "ENV_DISABLE",
    "ENV_DUMP_SIGNAL",
    "ENV_FD",
    "ENV_FD_INODE",
    "ENV_SOCKET",
    "FRAME_MAX",
    "HEADER_SIZE",
    "JSON_LINE_MAX",
    "SCOPE_MAX",
    "SIGNAL_DEFAULT",
    "SIGNAL_LOG_ONLY",
    "FrameDecoder",
    "Op",
    "Reply",
    "Request",
    "JsonLineDecoder",
    "decode_json_line",
    "decode_json_lines",
    "decode_reply",
    "dump_file_name",
    "encode_acquire",
    "encode_acquire_after",
    "encode_acquire_stamped",
    "encode_frame",
    "encode_hello",
    "encode_json_request",
    "encode_release",
    "encode_reply",
    "valid_signal",
]

#: Environment variable naming the inherited fd a spawned worker writes requests to.
ENV_FD = "AIOTIMER_FD"
#: Environment variable naming the inode of that pipe: a process that inherited the
#: environment but not the fd (torchrun's workers) may hold another pipe at that number.
ENV_FD_INODE = "AIOTIMER_FD_INODE"
#: Environment variable naming the signal a spawned worker should dump stacks on.
ENV_DUMP_SIGNAL = "AIOTIMER_DUMP_SIGNAL"
#: Environment variable naming the directory a spawned worker writes its stack dumps into.
ENV_DUMP_DIR = "AIOTIMER_DUMP_DIR"
#: Environment variable naming the Unix socket any process of the job may connect to.
ENV_SOCKET = "AIOTIMER_SOCKET"
#: Environment variable that, set to 1, makes every timer block a no-op (no watchdog).
ENV_DISABLE = "AIOTIMER_DISABLE"


def dump_file_name(pid: int) -> str:
    """The file (in ``AIOTIMER_DUMP_DIR``) that process ``pid`` writes its stack dump to."""
    return f"stacks-{pid}.txt"


# 0xA8: the second frame format (the first, 0xA7, had no checksum).
MAGIC = 0xA8
_HEAD = struct.Struct("=BBHid")
_CRC = struct.Struct("=I")
_HEAD_CRC = struct.Struct("=BBHidI")  # both, read in one call when decoding
#: Bytes before a frame's scope: the fields and their checksum.
HEADER_SIZE = _HEAD.size + _CRC.size
#: Largest frame: PIPE_BUF on Linux, the size the kernel writes atomically.
FRAME_MAX = 4096
#: Longest scope, in UTF-8 bytes, that fits in one frame.
SCOPE_MAX = FRAME_MAX - HEADER_SIZE
#: Longest torch JSON line, as torch's client enforces.
JSON_LINE_MAX = 4096

_MAGIC_BYTE = bytes([MAGIC])
_PID_MAX = 2**31 - 1
_VALID_SIGNALS = frozenset(int(s) for s in _signal.valid_signals())


class Op(enum.IntEnum):
    """What a request asks of the server."""

    ACQUIRE = 1  #: arm a timer; deadline on the server's monotonic clock
    ACQUIRE_WALL = 2  #: arm a timer; deadline on the wall clock (torch clients)
    RELEASE = 3  #: disarm a timer
    HELLO = 4  #: a (new) process announces itself and its stack-dump signal
    ACQUIRE_AFTER = 5  #: arm a timer; ``value`` seconds from receipt
    ACQUIRE_STAMPED = 6  #: arm a timer; deadline on the client's clock, sent at ``sent``


_OPS = {op.value: op for op in Op}
# For comparisons on the request path (a global is quicker to load than an enum member).
_STAMPED, _AFTER, _RELEASE, _HELLO, _WALL = (
    Op.ACQUIRE_STAMPED,
    Op.ACQUIRE_AFTER,
    Op.RELEASE,
    Op.HELLO,
    Op.ACQUIRE_WALL,
)

#: ``Request.signal``: the client leaves the choice of signal to the server's reaper.
SIGNAL_DEFAULT = 0
#: ``Request.signal``: the client asks for its expiry to be reported, never signalled
#: (torch's clients send a signal <= 0 for that).
SIGNAL_LOG_ONLY = -1


class Request(NamedTuple):
    """One decoded request.

    ``deadline`` is the frame's value (see the module docstring: a deadline or,
    for ``ACQUIRE_AFTER``, a duration).  ``signal`` is what the client asked to
    be killed with: a signal number, or ``SIGNAL_DEFAULT`` (0: the server's
    reaper chooses) or ``SIGNAL_LOG_ONLY`` (-1: report the expiry, send
    nothing).  For ``HELLO``, ``signal`` is the signal the client dumps its
    stacks on (0: none).
    """

    op: Op
    pid: int
    scope: str
    deadline: float
    signal: int = SIGNAL_DEFAULT
    #: ``ACQUIRE_STAMPED``: the client's clock when it sent the request
    sent: float = 0.0


_new_request = tuple.__new__  # a Request without NamedTuple's keyword handling


def valid_signal(number: int) -> bool:
    """Whether ``number`` is a signal this host can send."""
    return number in _VALID_SIGNALS


# -- frames ----------------------------------------------------------------------


def encode_frame(op: Op, pid: int, scope: str, value: float) -> bytes:
    """Encode one frame (checksummed, at most ``FRAME_MAX`` bytes)."""
    raw = scope.encode()
    if len(raw) > SCOPE_MAX:
        raise ValueError(
            f"`scope` must encode to at most {SCOPE_MAX} UTF-8 bytes, got {len(raw)} bytes"
        )
    head = _HEAD.pack(MAGIC, op, HEADER_SIZE + len(raw), pid, value)
    return head + _CRC.pack(zlib.crc32(head)) + raw


_SENT = struct.Struct("=d")


def encode_acquire_stamped(pid: int, scope: str, deadline: float, sent: float) -> bytes:
    """Encode an acquire until ``deadline`` on the client's clock, which read ``sent`` now."""
    raw = scope.encode()
    if len(raw) > SCOPE_MAX - _SENT.size:
        raise ValueError(
            f"`scope` must encode to at most {SCOPE_MAX - _SENT.size} UTF-8 bytes, "
            f"got {len(raw)} bytes"
        )
    head = _HEAD.pack(MAGIC, Op.ACQUIRE_STAMPED, HEADER_SIZE + _SENT.size + len(raw), pid, deadline)
    return head + _CRC.pack(zlib.crc32(head)) + _SENT.pack(sent) + raw


def encode_acquire_after(pid: int, scope: str, seconds: float) -> bytes:
    """Encode an acquire of ``scope`` by ``pid`` expiring ``seconds`` after the server reads it."""
    return encode_frame(Op.ACQUIRE_AFTER, pid, scope, seconds)


def encode_acquire(pid: int, scope: str, deadline: float, *, wall: bool = False) -> bytes:
    """Encode an acquire at an absolute ``deadline`` (the server's clock, or wall-clock)."""
    return encode_frame(Op.ACQUIRE_WALL if wall else Op.ACQUIRE, pid, scope, deadline)


def encode_release(pid: int, scope: str) -> bytes:
    """Encode a release of ``scope`` by ``pid``."""
    return encode_frame(Op.RELEASE, pid, scope, 0.0)


def encode_hello(pid: int, dump_signal: int = 0) -> bytes:
    """Encode a process's greeting, naming the signal it dumps stacks on (0: none)."""
    return encode_frame(Op.HELLO, pid, "", float(dump_signal))


# -- replies (server -> client, once per socket connection) -------------------------

#: Reply ops: outside ``Op``, so the server's decoder rejects them as unknown.
REPLY_WELCOME = 0x80
REPLY_REFUSED = 0x81


class Reply(NamedTuple):
    """The server's answer to a new socket connection (see the module docstring)."""

    #: whether the server will arm timers for this connection's process
    welcome: bool
    #: the pid the server knows the client by (its own pid, unless in another pid namespace)
    pid: int
    #: WELCOME: the signal to dump stacks on (0: none)
    dump_signal: int
    #: WELCOME: the directory to dump stacks into ("": stderr); REFUSED: the reason
    text: str


def encode_reply(reply: Reply) -> bytes:
    """Encode ``reply``; a text too long for one frame is cut (at a character boundary)."""
    raw = reply.text.encode()[:SCOPE_MAX].decode(errors="ignore").encode()
    op = REPLY_WELCOME if reply.welcome else REPLY_REFUSED
    head = _HEAD.pack(MAGIC, op, HEADER_SIZE + len(raw), reply.pid, float(reply.dump_signal))
    return head + _CRC.pack(zlib.crc32(head)) + raw


def decode_reply(data: bytes) -> Reply | None:
    """The reply ``data`` starts with; ``None`` if more bytes are needed.

    Raises ``ProtocolError`` if ``data`` does not start with a reply frame
    (not an aiotimer server, or a server of another version).
    """
    if len(data) < HEADER_SIZE:
        return None
    magic, op, length, pid, value, crc = _HEAD_CRC.unpack_from(data)
    if magic != MAGIC or crc != zlib.crc32(data[:16]) or not HEADER_SIZE <= length <= FRAME_MAX:
        raise ProtocolError(f"the server's reply is not an aiotimer frame: {data[:HEADER_SIZE]!r}")
    if op not in (REPLY_WELCOME, REPLY_REFUSED):
        raise ProtocolError(f"the server's reply has op {op}, not a reply op")
    if len(data) < length:
        return None
    text = data[HEADER_SIZE:length].decode(errors="replace")
    welcome = op == REPLY_WELCOME
    signal = int(value) if welcome and math.isfinite(value) and value == int(value) else 0
    if signal and not valid_signal(signal):
        raise ProtocolError(f"the server's reply names dump signal {value}, not a signal")
    return Reply(welcome, pid, signal, text)


class FrameDecoder:
    """Incremental decoder of aiotimer frames from a byte stream.

    ``feed`` returns the requests it completed and a reason for each thing it
    rejected: a frame with a valid header but a bad field, or a run of bytes
    that are not frames (one reason per run).  An incomplete frame is kept for
    the next ``feed``.
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
        # On the request path: names are bound to locals once per read, and
        # requests are built as plain tuples (no NamedTuple keyword handling).
        append = requests.append
        new_request = _new_request
        unpack = _HEAD_CRC.unpack_from
        unpack_sent = _SENT.unpack_from
        crc32 = zlib.crc32
        isfinite = math.isfinite
        ops = _OPS
        stamped, after, release, hello = _STAMPED, _AFTER, _RELEASE, _HELLO
        pos = 0
        end = len(buf)
        skipped = 0
        while end - pos >= HEADER_SIZE:
            if buf[pos] != MAGIC:
                nxt = buf.find(_MAGIC_BYTE, pos + 1)
                nxt = end if nxt < 0 else nxt
                skipped += nxt - pos
                pos = nxt
                continue
            _, op, length, pid, value, crc = unpack(buf, pos)
            if length < HEADER_SIZE or length > FRAME_MAX or crc != crc32(buf[pos : pos + 16]):
                skipped += 1  # not a header after all: try the next byte
                pos += 1
                continue
            if skipped:
                errors.append(f"skipped {skipped} bytes that are not frames")
                skipped = 0
            if end - pos < length:
                break
            kind = ops.get(op)
            start = pos + HEADER_SIZE
            sent = 0.0
            if kind is stamped:
                if length < HEADER_SIZE + 8:
                    pos += length
                    errors.append(f"stamped acquire from pid {pid} is too short")
                    continue
                (sent,) = unpack_sent(buf, start)
                start += 8
            try:
                scope = buf[start : pos + length].decode()
            except UnicodeDecodeError:
                scope = None
            pos += length
            if kind is None:
                errors.append(f"unknown op {op} from pid {pid}")
            elif scope is None:
                errors.append(f"scope from pid {pid} is not valid UTF-8")
            elif pid <= 0:
                errors.append(f"pid must be > 0, got {pid}")
            elif kind is release:
                append(new_request(Request, (kind, pid, scope, 0.0, SIGNAL_DEFAULT, 0.0)))
            elif kind is hello:
                if value == 0 or (
                    isfinite(value) and value == int(value) and valid_signal(int(value))
                ):
                    append(new_request(Request, (kind, pid, scope, 0.0, int(value), 0.0)))
                else:
                    errors.append(f"dump signal from pid {pid} is not a signal number: {value}")
            elif not isfinite(value):
                errors.append(f"deadline from pid {pid} must be finite, got {value}")
            elif kind is after and value < 0:
                errors.append(f"seconds from pid {pid} must be >= 0, got {value}")
            elif kind is stamped and not isfinite(sent):
                errors.append(f"send time from pid {pid} must be finite, got {sent}")
            else:
                append(new_request(Request, (kind, pid, scope, value, SIGNAL_DEFAULT, sent)))
        if skipped:
            errors.append(f"skipped {skipped} bytes that are not frames")
        self._buffer = buf[pos:] if pos < end else b""
        return requests, errors


# -- torch's JSON lines -------------------------------------------------------------


def _json() -> types.ModuleType:
    """The json module, imported on first use: a worker that never speaks torch's JSON
    lines does not pay 1.4 ms for it at start."""
    import json

    return json


def encode_json_request(pid: int, scope: str, expiration_time: float, signal: int) -> bytes:
    """Encode a request as torch's ``FileTimerClient`` writes it (one line)."""
    line: str = _json().dumps(
        {
            "version": 1,
            "pid": pid,
            "scope_id": scope,
            "expiration_time": expiration_time,
            "signal": signal,
        }
    )
    return line.encode() + b"\n"


def _field(obj: dict[str, object], name: str, kind: type | tuple[type, ...]) -> object:
    if name not in obj:
        raise ProtocolError(f"missing field {name!r}")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ProtocolError(f"field {name!r} has the wrong type: {value!r}")
    return value


_INF = math.inf


def _request_from_json(obj: object) -> Request:
    # The common case, checked with exact types (a bool is not an int here):
    # a third of the per-request cost of the checks below, which run when
    # anything is off and say what.
    if type(obj) is dict:
        pid = obj.get("pid")
        scope = obj.get("scope_id")
        expiration = obj.get("expiration_time")
        signal = obj.get("signal")
        if (
            type(pid) is int
            and 0 < pid <= _PID_MAX
            and type(scope) is str
            and type(signal) is int
            and (type(expiration) is float or type(expiration) is int)
            and -_INF < expiration < _INF
            and obj.get("version", 1) == 1
        ):
            if expiration < 0:
                return _new_request(Request, (_RELEASE, pid, scope, 0.0, SIGNAL_DEFAULT, 0.0))
            if signal <= 0:
                signal = SIGNAL_LOG_ONLY
            elif signal not in _VALID_SIGNALS:
                return _checked_request_from_json(obj)
            return _new_request(Request, (_WALL, pid, scope, float(expiration), signal, 0.0))
    return _checked_request_from_json(obj)


def _checked_request_from_json(obj: object) -> Request:
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
    if signal > 0 and not valid_signal(signal):
        raise ProtocolError(f"signal {signal} is not a signal number this host can send")
    return Request(
        Op.ACQUIRE_WALL, pid, scope, float(expiration), signal if signal > 0 else SIGNAL_LOG_ONLY
    )


def decode_json_line(line: bytes) -> Request:
    """Decode one torch ``FileTimerClient`` line (without or with its newline).

    A negative ``expiration_time`` is a release, as in torch.  Raises
    ``ProtocolError`` naming what was wrong.
    """
    if len(line) > JSON_LINE_MAX + 1:
        raise ProtocolError(f"line of {len(line)} bytes exceeds {JSON_LINE_MAX}")
    try:
        obj = _json().loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    except RecursionError:  # "[[[[..." within the size limit: nested past the parser's depth
        raise ProtocolError("not JSON: nested too deeply") from None
    return _request_from_json(obj)


def _rejected(line: bytes, exc: ProtocolError) -> str:
    return f"{exc}: {line[:200]!r}"


def _reject_line(
    line: bytes, exc: ProtocolError, requests: list[Request], errors: list[str]
) -> None:
    """Reject ``line``, keeping a request glued to its end (see ``glued_request``)."""
    errors.append(_rejected(line, exc))
    glued = glued_request(line)
    if 0 < len(glued) < len(line):
        with contextlib.suppress(ProtocolError):
            requests.append(decode_json_line(glued))


#: How every torch request line begins (``json.dumps`` of a dict whose first key
#: is "version").  Inside a JSON string a quote is escaped, so a valid request
#: holds this once, at its start.
_REQUEST_START = b'{"version"'


def glued_request(line: bytes) -> bytes:
    """The request at the end of ``line``, or ``b""``: what to salvage from a bad line.

    A FIFO is one byte stream for all writers.  A client writes each request
    whole (one write of at most ``PIPE_BUF`` bytes is atomic), but junk, or a
    writer that died mid-line, leaves a partial line that the next client's
    request is glued to.  Rejecting the whole line would lose that request: a
    hang unkilled, or a false kill if it was a release.
    """
    start = line.rfind(_REQUEST_START)
    return line[start:] if start >= 0 else b""


class JsonLineDecoder:
    """torch's JSON-line framing, sans I/O: bytes in, ``(requests, errors)`` out.

    Keeps the partial line a read ends with for the next ``feed``; a line
    longer than ``JSON_LINE_MAX`` is rejected once and discarded up to its
    newline, and a request glued to its tail (the next client's, written after
    junk with no newline) is still decoded.  ``feed`` never raises: whatever the
    bytes, a bad line is a counted rejection.
    """

    __slots__ = ("_discarding", "_partial")

    def __init__(self) -> None:
        self._partial = b""
        self._discarding = False

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held for the next ``feed``."""
        return len(self._partial)

    def feed(self, data: bytes) -> tuple[list[Request], list[str]]:
        """Decode every complete line of ``data`` (after what earlier feeds left)."""
        lines = data.split(b"\n")
        lines[0] = self._partial + lines[0]
        self._partial = lines.pop()
        if self._discarding and lines:
            # The tail of a line already rejected as oversize; a request glued
            # to its end is still a request.
            self._discarding = False
            lines[0] = glued_request(lines[0])
        try:
            requests, errors = decode_json_lines([line for line in lines if line.strip()])
        except Exception as exc:  # a bug of ours must cost this read, never the reader
            requests, errors = [], [f"undecodable input ({type(exc).__name__}: {exc})"]
        if len(self._partial) > JSON_LINE_MAX:
            if not self._discarding:
                errors.append(f"line longer than {JSON_LINE_MAX} bytes; discarded")
            self._partial = b""
            self._discarding = True
        return requests, errors


def decode_json_lines(lines: Sequence[bytes]) -> tuple[list[Request], list[str]]:
    """Decode many non-empty lines; return ``(requests, errors)``, each bad line rejected alone.

    The lines are parsed by one ``json.loads`` of them joined into an array
    (one pass in C, several times quicker than a call per line); when that
    fails, or does not give one value per line, each line is parsed on its own.
    """
    requests: list[Request] = []
    errors: list[str] = []
    values: list[object] | None = None
    # A request is a JSON object: a line that does not start as one is junk (with
    # perhaps a request glued to its end), rejected without parsing it as JSON, so
    # "[[[[..." costs a byte compare, not a recursion a thousand levels deep.
    if not all(line.lstrip()[:1] == b"{" for line in lines):
        objects = [line for line in lines if line.lstrip()[:1] == b"{"]
        for line in lines:
            if line.lstrip()[:1] != b"{":
                _reject_line(line, ProtocolError("not a JSON object"), requests, errors)
        more, bad = decode_json_lines(objects) if objects else ([], [])
        return requests + more, errors + bad
    if all(len(line) <= JSON_LINE_MAX + 1 for line in lines):
        try:
            parsed = _json().loads(b"[" + b",".join(lines) + b"]")
        except (ValueError, UnicodeDecodeError, RecursionError):
            parsed = None
        # One object per line, or each line on its own: a line holding junk and a
        # glued request ('"x", {...}') must go where its request is salvaged.
        if (
            isinstance(parsed, list)
            and len(parsed) == len(lines)
            and all(type(value) is dict for value in parsed)
        ):
            values = parsed
    if values is None:
        for line in lines:
            try:
                requests.append(decode_json_line(line))
            except ProtocolError as exc:
                _reject_line(line, exc, requests, errors)
        return requests, errors
    for line, value in zip(lines, values, strict=True):
        try:
            requests.append(_request_from_json(value))
        except ProtocolError as exc:
            errors.append(_rejected(line, exc))
    return requests, errors
