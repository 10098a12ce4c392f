"""Sans-IO codec for IPC frames: bytes in, events out (modelled on h11; no sockets, no trio).

Every message on the IPC socket is one frame::

    offset 0  type         uint8              performative code (see ``Performative``)
    offset 1  conv_id      uint32 big-endian  conversation id; 0 = fire-and-forget
    offset 5  payload_len  uint16 big-endian  length of the payload in bytes
    offset 7  payload      MessagePack map    exactly ``payload_len`` bytes (<= 65,535)

A well-formed payload is a map with ``str`` keys only (at every level), a ``str`` under ``"action"``, and
containers nested at most ``MAX_DEPTH`` (32) levels, the payload map itself being level 1. MessagePack ext
types are refused (timestamps, which msgpack decodes itself, come through as ``msgpack.Timestamp``).

``Decoder`` turns a byte stream into ``Frame`` and ``Malformed`` events. A malformed frame never stops the
stream: the header says how long the frame is, so its bytes are skipped and decoding continues with the next
frame. ``Encoder`` turns ``(type, conv_id, payload)`` into one ``bytes`` object and raises ``FrameTooLarge``
when the payload does not fit. A payload too large for one frame travels in parts, either way: ``INFORM_PART``
frames, each with the next slice of the packed payload, then a frame of its own performative with the last
slice. ``Parts`` puts replies together; the daemon's ``Decoder(max_request=...)`` puts requests together.
See spec/ipc.md, "Frames".
"""

from __future__ import annotations

import struct
from collections import namedtuple
from enum import IntEnum

import msgpack

# Not imported at run time: ``pd`` never loads typing (see portdaddy/errors.py), hence also collections'
# namedtuple below rather than typing.NamedTuple.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAX_CONV_ID",
    "MAX_DEPTH",
    "MAX_PAYLOAD",
    "MAX_REQUEST",
    "DecodeEvent",
    "Decoder",
    "Encoder",
    "Frame",
    "FrameTooLarge",
    "Malformed",
    "Parts",
    "Performative",
    "encode",
    "next_conv_id",
]

HEADER = struct.Struct(">BIH")
HEADER_SIZE = 7
MAX_PAYLOAD = 65535
# How much either end reads at once. Readers recv_into one reused buffer of this size: a fresh bytes object
# this large is over glibc's mmap threshold, an mmap, an mremap and a munmap per read (~20 µs a request).
RECV_SIZE = 256 * 1024
MAX_CONV_ID = 0x7FFFFFFF
MAX_DEPTH = 32
# A payload too large for one frame goes as slices of its packed payload this large (room left for the map
# around each slice): a reply up to MAX_REPLY bytes in all, a request up to MAX_REQUEST, what HTTP takes in a body.
PART_SIZE = MAX_PAYLOAD - 1024
MAX_REPLY = 16 * 1024 * 1024
MAX_REQUEST = 1024 * 1024

assert HEADER.size == HEADER_SIZE


class Performative(IntEnum):
    INFORM = 0x01
    INFORM_DONE = 0x02
    INFORM_REF = 0x03
    INFORM_PART = 0x04
    REQUEST = 0x10
    QUERY_IF = 0x11
    QUERY_REF = 0x12
    CANCEL = 0x13
    AGREE = 0x20
    REFUSE = 0x21
    FAILURE = 0x22
    NOT_UNDERSTOOD = 0x23
    SUBSCRIBE = 0x30
    UNSUBSCRIBE = 0x31


class Frame(namedtuple("Frame", "type conv_id payload")):
    """A decoded, well-formed frame: ``type`` (int; compares equal to ``Performative`` members), ``conv_id``
    (int) and ``payload`` (dict[str, Any])."""

    __slots__ = ()


class Malformed(namedtuple("Malformed", "reason conv_id")):
    """A frame that was skipped: ``reason`` (str) and the header's ``conv_id`` (int), so the peer can be told
    NOT_UNDERSTOOD."""

    __slots__ = ()


DecodeEvent = Frame | Malformed


class FrameTooLarge(ValueError):
    """The packed payload is larger than one frame can carry."""

    def __init__(self, size: int, limit: int = MAX_PAYLOAD) -> None:
        # args = (size, limit) so the exception pickles and re-raises across process boundaries.
        super().__init__(size, limit)
        self.size = size
        self.limit = limit

    def __str__(self) -> str:
        if self.limit == MAX_REPLY:
            return f"the reply is {self.size} bytes, over the {self.limit}-byte limit of one reply; ask for less"
        if self.limit == MAX_REQUEST:
            return f"the request is {self.size} bytes, over the {self.limit}-byte limit of one request; send less"
        return f"payload is {self.size} bytes, over the {self.limit}-byte limit of one IPC frame; send less or split it"


# Malformed reasons. Stable strings: the server puts them in its NOT_UNDERSTOOD reply and tests match them.
R_UNKNOWN_TYPE = "unknown performative"
R_BAD_MSGPACK = "payload is not valid MessagePack"
R_TRAILING = "trailing bytes after the payload"
R_NOT_A_MAP = "payload is not a map"
R_NO_ACTION = "payload has no str 'action'"
R_KEY_NOT_STR = "map keys must be str"
R_TOO_DEEP = f"payload nests deeper than {MAX_DEPTH} levels"
R_EXT_TYPE = "MessagePack ext types are not allowed"
R_PARTS_CUT = "a request's parts were cut short by another frame"
R_PART_NOT_BIN = "a request part carries no bin 'part'"
R_PART_SIZE = f"a request part other than the last must carry {PART_SIZE} bytes"
R_PARTS_TOO_LARGE = "a request in parts is over its limit of"

_KNOWN_TYPES = frozenset(int(p) for p in Performative)
_PART = int(Performative.INFORM_PART)

# Bound methods looked up once: attribute lookups are a measurable share of a ~2 µs decode.
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack
_unpackb = msgpack.unpackb
_tuple_new = tuple.__new__  # builds Frame/Malformed without namedtuple's Python-level __new__


class _ExtRefused(Exception):
    pass


def _refuse_ext(code: int, data: bytes) -> Any:
    raise _ExtRefused


def _check_nested(payload: dict[str, Any]) -> str | None:
    """Return a Malformed reason if any key is not str or nesting exceeds MAX_DEPTH, else None.

    The top-level loop is the only cost for the common flat map; nested containers are walked with an
    explicit stack (msgpack itself caps nesting at 1024, so the walk is bounded by the payload size and
    never recurses).
    """
    stack: list[tuple[Any, int]] | None = None
    for k, v in payload.items():
        if k.__class__ is not str:
            return R_KEY_NOT_STR
        c = v.__class__
        if c is dict or c is list:
            if stack is None:
                stack = []
            stack.append((v, 2))
    if stack is None:
        return None
    pop = stack.pop
    push = stack.append
    while stack:
        obj, depth = pop()
        if depth > MAX_DEPTH:
            return R_TOO_DEEP
        child = depth + 1
        if obj.__class__ is dict:
            for k, v in obj.items():
                if k.__class__ is not str:
                    return R_KEY_NOT_STR
                c = v.__class__
                if c is dict or c is list:
                    push((v, child))
        else:
            for v in obj:
                c = v.__class__
                if c is dict or c is list:
                    push((v, child))
    return None


# Repeats are looked for only among small frames: a heartbeat is ~40 bytes, a pheromone spray ~100.
_MAX_REPEAT = 256


def _is_flat(payload: dict[str, Any]) -> bool:
    """No containers among the values: every value is immutable, so one payload can serve repeated frames."""
    for v in payload.values():
        c = v.__class__
        if c is dict or c is list:
            return False
    return True


def _decode(ftype: int, conv_id: int, body: bytes | bytearray, check_nested: bool = True) -> Frame | Malformed:
    """Decode one complete frame whose header is already parsed. Never raises."""
    if ftype not in _KNOWN_TYPES:
        return _tuple_new(Malformed, (f"{R_UNKNOWN_TYPE} 0x{ftype:02x}", conv_id))
    try:
        # msgpack bounds every length by len(body) itself, so no max_*_len is needed; strict_map_key leaves
        # only str and bytes keys, and bytes keys are caught by _check_nested.
        payload = _unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except msgpack.ExtraData:
        return _tuple_new(Malformed, (R_TRAILING, conv_id))
    except msgpack.StackError:  # deeper than msgpack's own 1024-level stack
        return _tuple_new(Malformed, (R_TOO_DEEP, conv_id))
    except _ExtRefused:
        return _tuple_new(Malformed, (R_EXT_TYPE, conv_id))
    except Exception as e:  # any decode failure is the peer's fault, never ours to raise
        if e.__class__ is ValueError and "map key" in str(e):
            return _tuple_new(Malformed, (R_KEY_NOT_STR, conv_id))
        return _tuple_new(Malformed, (R_BAD_MSGPACK, conv_id))
    if payload.__class__ is not dict:
        return _tuple_new(Malformed, (R_NOT_A_MAP, conv_id))
    if payload.get("action").__class__ is not str:
        return _tuple_new(Malformed, (R_NO_ACTION, conv_id))
    if check_nested:
        reason = _check_nested(payload)
        if reason is not None:
            return _tuple_new(Malformed, (reason, conv_id))
    return _tuple_new(Frame, (ftype, conv_id, payload))


class Decoder:
    """Incremental frame decoder: ``feed`` bytes, then take events with ``events()`` or ``next_event()``.

    Bytes are kept in one bytearray with a read offset; consumed bytes are dropped when they are at least half
    the buffer, so feeding many small frames stays linear. A frame is only looked at once all of it has
    arrived, so a truncated frame at EOF shows up as ``buffered > 0`` rather than as an event.
    """

    __slots__ = ("_buf", "_check_nested", "_last_body", "_last_frame", "_max_request", "_parts", "_parts_conv", "_pos",
                 "_repeats")  # fmt: skip

    def __init__(self, *, reuse_repeats: bool = False, from_daemon: bool = False, max_request: int = 0) -> None:
        """``reuse_repeats``: a fire-and-forget frame byte-identical to the previous one, with a flat payload,
        comes back as the same ``Frame`` object, payload dict included, without being decoded again. A flood of
        fire-and-forget frames is mostly one frame repeated (the SDK sends its heartbeat pre-encoded), and the
        decode is a third of handling one. Only for a reader that never mutates payloads (the daemon).

        ``from_daemon``: a client's decoder skips the walk over nested keys and depth. That walk guards the
        daemon against hostile clients; what the daemon sends it built itself, or checked on the way in. Under
        load the walk was ~4 µs of a client's ~40 µs of CPU per request (msgpack still refuses keys that are
        neither str nor bytes, and nesting past its own 1,024 levels).

        ``max_request`` (the daemon's): put a request sent in parts together, up to this many packed bytes, and
        hand it on as one frame. Its frames come back to back: ``INFORM_PART`` frames carrying ``PART_SIZE``
        bytes each, then one of the request's own performative with the rest, all of one conversation. Anything
        else is ``Malformed`` and drops the request: a frame of another conversation between them (which is
        itself decoded next), a part of the wrong size, a request over ``max_request``. So one connection holds
        at most one request in parts, and never more than ``max_request`` bytes of it."""
        self._buf = bytearray()
        self._pos = 0
        self._repeats = reuse_repeats
        self._check_nested = not from_daemon
        self._last_body: bytes | bytearray = b""
        self._last_frame: Frame | None = None
        self._max_request = max_request
        self._parts: bytearray | None = None  # the request in parts so far
        self._parts_conv = 0

    @property
    def repeatable(self) -> Frame | None:
        """The frame a byte-identical repeat would be handed back as (``reuse_repeats`` only)."""
        return self._last_frame

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events (a request's parts so far included)."""
        parts = self._parts
        return len(self._buf) - self._pos + (0 if parts is None else len(parts))

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        buf = self._buf
        pos = self._pos
        if pos:
            # Compacting when the dead prefix is >= the live tail makes every byte move O(1) times overall.
            if pos >= len(buf):
                buf.clear()
                self._pos = 0
            elif pos << 1 >= len(buf):
                del buf[:pos]
                self._pos = 0
        buf += data

    def next_event(self) -> Frame | Malformed | None:
        """The next complete event, or None if a whole frame has not arrived yet."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        ftype, conv_id, plen = _unpack_header(buf, pos)
        start = pos + HEADER_SIZE
        stop = start + plen
        if stop > len(buf):
            return None
        if self._parts is not None or (ftype == _PART and self._max_request):
            return self._request_in_parts()
        self._pos = stop
        body = buf[start:stop]
        if conv_id or not self._repeats:
            return _decode(ftype, conv_id, body, self._check_nested)
        last = self._last_frame
        if last is not None and last[0] == ftype and body == self._last_body:
            return last
        event = _decode(ftype, conv_id, body)
        if event.__class__ is Frame and plen <= _MAX_REPEAT and _is_flat(event.payload):
            self._last_body, self._last_frame = body, event
        return event

    def _request_in_parts(self) -> Frame | Malformed | None:
        """The frames of a request in parts from the read offset on, as far as they have arrived: the request
        whole (decoded and checked as a frame's payload is), None while parts are still to come, or Malformed.
        Every part but the last is PART_SIZE bytes, so a request is at most max_request / PART_SIZE + 1 frames."""
        buf = self._buf
        while len(buf) - self._pos >= HEADER_SIZE:
            pos = self._pos
            ftype, conv_id, plen = _unpack_header(buf, pos)
            stop = pos + HEADER_SIZE + plen
            if stop > len(buf):
                return None
            parts = self._parts
            if parts is not None and conv_id != self._parts_conv:
                # Not consumed: the next call decodes this frame on its own.
                self._parts = None
                return _tuple_new(Malformed, (R_PARTS_CUT, self._parts_conv))
            self._pos = stop
            self._parts = None  # put back below while the request goes on
            event = _decode(ftype, conv_id, buf[pos + HEADER_SIZE : stop])
            if event.__class__ is Malformed:
                return event
            part = event.payload.get("part")
            if part.__class__ is not bytes:
                return _tuple_new(Malformed, (R_PART_NOT_BIN, conv_id))
            if parts is None:
                parts = bytearray()
            if len(parts) + len(part) > self._max_request:
                return _tuple_new(Malformed, (f"{R_PARTS_TOO_LARGE} {self._max_request} bytes", conv_id))
            parts += part
            if ftype != _PART:
                return _decode(ftype, conv_id, parts)
            if len(part) != PART_SIZE:
                return _tuple_new(Malformed, (R_PART_SIZE, conv_id))
            self._parts, self._parts_conv = parts, conv_id
        return None

    def events(self) -> list[Frame | Malformed]:
        """Every complete event in the buffer, in order."""
        return list(iter(self.next_event, None))


class Encoder:
    """Frame encoder holding one reused msgpack Packer.

    Not thread-safe: give each thread (or each connection) its own Encoder. The payload is not validated
    (missing ``action``, non-str keys, depth): that is the decoder's job, and tests need to build bad frames.
    """

    __slots__ = ("_pack",)

    def __init__(self) -> None:
        # autoreset=True: pack() returns the bytes and empties the buffer, and the C Packer also empties it
        # when pack() raises, so an unpackable payload cannot leave half a frame behind for the next call.
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack

    def encode(self, type: int, conv_id: int, payload: dict[str, Any]) -> bytes:
        """Header + packed payload as one bytes object. Raises FrameTooLarge, TypeError, ValueError."""
        body = self._pack(payload)
        size = len(body)
        if size > MAX_PAYLOAD:
            raise FrameTooLarge(size)
        try:
            return _pack_header(type, conv_id, size) + body
        except struct.error:
            raise ValueError(
                f"frame header out of range: type={type!r} (uint8), conv_id={conv_id!r} (uint32)"
            ) from None

    def encode_in_parts(self, type: int, conv_id: int, payload: dict[str, Any], limit: int = MAX_REPLY) -> bytes:
        """A payload too large for one frame: ``INFORM_PART`` frames, then one of ``type``, each ``{action, part}``
        with the next slice of the packed payload (``Parts`` puts a reply together, the daemon's ``Decoder`` a
        request). Raises FrameTooLarge over ``limit`` bytes (MAX_REQUEST for a request)."""
        body = self._pack(payload)
        if len(body) > limit:
            raise FrameTooLarge(len(body), limit)
        action = payload.get("action") or ""
        starts = range(0, len(body), PART_SIZE)
        return b"".join(
            self.encode(type if start == starts[-1] else Performative.INFORM_PART, conv_id,
                        {"action": action, "part": body[start:start + PART_SIZE]})
            for start in starts
        )  # fmt: skip


class Parts:
    """Puts replies sent in parts back together, per conversation: ``feed`` each reply frame; it returns the
    frame whole (at once for a reply in one frame), or None while parts are still coming."""

    __slots__ = ("_slices",)

    def __init__(self) -> None:
        self._slices: dict[int, list[bytes]] = {}

    def feed(self, frame: Frame) -> Frame | None:
        part = frame.payload.get("part")
        if part.__class__ is not bytes:
            return frame
        slices = self._slices.setdefault(frame.conv_id, [])
        slices.append(part)
        if frame.type == Performative.INFORM_PART:
            return None
        del self._slices[frame.conv_id]
        return _tuple_new(Frame, (frame.type, frame.conv_id, _unpackb(b"".join(slices), raw=False)))


_default_encoder = Encoder()


def encode(type: int, conv_id: int, payload: dict[str, Any]) -> bytes:
    """Encode one frame with a shared module-level Encoder.

    Meant for the (single-threaded) trio side. Sharing is safe under the GIL because the C Packer packs
    plain dict/list/str/int payloads without running Python code or releasing the GIL; code on a free-threaded
    build, or packing objects with custom hooks from several threads, should use its own ``Encoder``.
    """
    return _default_encoder.encode(type, conv_id, payload)


def next_conv_id(prev: int) -> int:
    """The conversation id after ``prev``: 31-bit counter that skips 0 (0 means fire-and-forget)."""
    return ((prev + 1) & MAX_CONV_ID) or 1
