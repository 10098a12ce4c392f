"""The IPC frame codec (portdaddy.ipc.frame): pure bytes-in/events-out, no daemon."""

from __future__ import annotations

import pickle
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portdaddy.ipc import frame as fr
from portdaddy.ipc.frame import (
    HEADER,
    HEADER_SIZE,
    MAX_CONV_ID,
    MAX_PAYLOAD,
    Decoder,
    Encoder,
    Frame,
    FrameTooLarge,
    Malformed,
    Parts,
    Performative,
    encode,
    next_conv_id,
)

CONV_IDS = [0, 1, MAX_CONV_ID, 0xFFFFFFFF]


def raw_frame(ftype: int, conv_id: int, body: bytes) -> bytes:
    """A frame with an arbitrary body, bypassing the encoder (which would refuse nothing but size anyway)."""
    return HEADER.pack(ftype, conv_id, len(body)) + body


def decode_all(data: bytes) -> list[Frame | Malformed]:
    dec = Decoder()
    dec.feed(data)
    out = dec.events()
    assert dec.buffered == 0
    return out


def drain(dec: Decoder) -> list[Frame | Malformed]:
    out = []
    while (ev := dec.next_event()) is not None:
        out.append(ev)
    return out


def nested_list_payload(levels: int) -> bytes:
    """{"action": "x", "d": [[[...nil...]]]} with ``levels`` nested lists under "d" (the map is level 1)."""
    return b"\x82\xa6action\xa1x\xa1d" + b"\x91" * levels + b"\xc0"


# -- constants and round trips ---------------------------------------------------------------------------


def test_constants() -> None:
    assert HEADER.format == ">BIH"
    assert HEADER_SIZE == HEADER.size == 7
    assert MAX_PAYLOAD == 65535
    assert MAX_CONV_ID == 0x7FFFFFFF
    assert {p.name: int(p) for p in Performative} == {
        "INFORM": 0x01,
        "INFORM_DONE": 0x02,
        "INFORM_REF": 0x03,
        "INFORM_PART": 0x04,
        "REQUEST": 0x10,
        "QUERY_IF": 0x11,
        "QUERY_REF": 0x12,
        "CANCEL": 0x13,
        "AGREE": 0x20,
        "REFUSE": 0x21,
        "FAILURE": 0x22,
        "NOT_UNDERSTOOD": 0x23,
        "SUBSCRIBE": 0x30,
        "UNSUBSCRIBE": 0x31,
    }


def test_wire_layout() -> None:
    data = encode(Performative.REQUEST, 0x01020304, {"action": "a"})
    body = msgpack.packb({"action": "a"}, use_bin_type=True)
    assert data == b"\x10\x01\x02\x03\x04" + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize("perf", list(Performative))
@pytest.mark.parametrize("conv_id", CONV_IDS)
def test_round_trip_every_performative_and_conv_id(perf: Performative, conv_id: int) -> None:
    payload = {"action": "svc.claim", "n": -1, "f": 1.5, "b": b"\x00\xff", "l": [1, "x", None, True], "m": {}}
    (ev,) = decode_all(encode(perf, conv_id, payload))
    assert ev == Frame(int(perf), conv_id, payload)
    assert isinstance(ev, Frame)
    assert ev.type == perf and ev.conv_id == conv_id and ev.payload == payload


def test_module_encode_matches_encoder_instance() -> None:
    p = {"action": "x", "k": [1, 2, 3]}
    assert encode(0x10, 7, p) == Encoder().encode(0x10, 7, p)


def test_smallest_payload() -> None:
    data = encode(Performative.INFORM, 0, {"action": ""})
    assert len(data) == HEADER_SIZE + 9  # fixmap, "action", ""
    assert decode_all(data) == [Frame(1, 0, {"action": ""})]


def _payload_of_size(size: int) -> dict:
    def make(n: int) -> dict:
        return {"action": "blob", "data": "a" * n}

    overhead = len(msgpack.packb(make(1000))) - 1000  # constant while the str needs a str16 header
    p = make(size - overhead)
    assert len(msgpack.packb(p)) == size
    return p


def test_payload_exactly_at_limit_round_trips() -> None:
    p = _payload_of_size(MAX_PAYLOAD)
    data = encode(Performative.INFORM, 5, p)
    assert len(data) == HEADER_SIZE + MAX_PAYLOAD
    assert data[5:7] == b"\xff\xff"
    assert decode_all(data) == [Frame(1, 5, p)]


def test_payload_one_over_limit_raises() -> None:
    p = _payload_of_size(MAX_PAYLOAD + 1)
    enc = Encoder()
    with pytest.raises(FrameTooLarge) as info:
        enc.encode(Performative.INFORM, 5, p)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.size, err.limit) == (65536, 65535)
    assert "65536 bytes" in str(err) and "65535" in str(err) and "split it" in str(err)
    # picklable, and the encoder is still usable afterwards
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)
    assert decode_all(enc.encode(1, 1, {"action": "ok"})) == [Frame(1, 1, {"action": "ok"})]


def test_encoder_recovers_after_unpackable_payload() -> None:
    enc = Encoder()
    with pytest.raises(TypeError):
        enc.encode(1, 1, {"action": "x", "bad": [1, 2, object()]})
    # a half-packed payload must not leak into the next frame
    assert enc.encode(1, 1, {"action": "y"}) == raw_frame(1, 1, msgpack.packb({"action": "y"}))


@pytest.mark.parametrize(("ftype", "conv_id"), [(256, 1), (-1, 1), (1, 2**32), (1, -1)])
def test_encoder_header_out_of_range(ftype: int, conv_id: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        encode(ftype, conv_id, {"action": "x"})


# -- streaming -------------------------------------------------------------------------------------------


def _sample_stream() -> tuple[bytes, list[Frame | Malformed]]:
    parts = [
        encode(Performative.REQUEST, 1, {"action": "lock.acquire", "name": "db", "ttl": 30000}),
        raw_frame(0x7F, 9, b"\x81\xa6action\xa1x"),  # unknown type: skipped
        encode(Performative.INFORM, 0, {"action": "ev", "data": {"nested": [1, 2, {"k": "v"}]}}),
        raw_frame(Performative.QUERY_REF, 3, b"\xc1"),  # undecodable
        encode(Performative.AGREE, MAX_CONV_ID, {"action": "ok", "bin": b"\x00" * 300}),
        encode(Performative.UNSUBSCRIBE, 0xFFFFFFFF, {"action": ""}),
    ]
    expected = [
        Frame(0x10, 1, {"action": "lock.acquire", "name": "db", "ttl": 30000}),
        Malformed(f"{fr.R_UNKNOWN_TYPE} 0x7f", 9),
        Frame(0x01, 0, {"action": "ev", "data": {"nested": [1, 2, {"k": "v"}]}}),
        Malformed(fr.R_BAD_MSGPACK, 3),
        Frame(0x20, MAX_CONV_ID, {"action": "ok", "bin": b"\x00" * 300}),
        Frame(0x31, 0xFFFFFFFF, {"action": ""}),
    ]
    return b"".join(parts), expected


def test_stream_whole() -> None:
    data, expected = _sample_stream()
    assert decode_all(data) == expected


def test_stream_split_at_every_byte_boundary() -> None:
    data, expected = _sample_stream()
    for i in range(len(data) + 1):
        dec = Decoder()
        dec.feed(data[:i])
        got = dec.events()
        dec.feed(data[i:])
        got += dec.events()
        assert got == expected, i
        assert dec.buffered == 0
        # the same with next_event
        dec = Decoder()
        dec.feed(data[:i])
        got = drain(dec)
        dec.feed(data[i:])
        got += drain(dec)
        assert got == expected, i


def test_stream_one_byte_at_a_time() -> None:
    data, expected = _sample_stream()
    dec = Decoder()
    got: list[Frame | Malformed] = []
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
        got += dec.events()
    assert got == expected
    dec = Decoder()
    got = []
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
        got += drain(dec)
    assert got == expected
    assert dec.buffered == 0


def test_partial_frame_is_buffered() -> None:
    data = encode(1, 1, {"action": "x"})
    dec = Decoder()
    assert dec.next_event() is None and dec.events() == []
    dec.feed(data[:3])
    assert dec.buffered == 3 and dec.next_event() is None
    dec.feed(data[3:-1])
    assert dec.events() == [] and dec.buffered == len(data) - 1
    dec.feed(data[-1:] + data[:HEADER_SIZE])
    assert dec.next_event() == Frame(1, 1, {"action": "x"})
    assert dec.buffered == HEADER_SIZE and dec.next_event() is None


def test_feed_accepts_bytearray_and_memoryview() -> None:
    data = encode(1, 1, {"action": "x"})
    dec = Decoder()
    dec.feed(bytearray(data))
    dec.feed(memoryview(data))
    dec.feed(b"")
    assert dec.events() == [Frame(1, 1, {"action": "x"})] * 2


def test_buffer_stays_compact_when_reading_one_event_at_a_time() -> None:
    data = encode(1, 1, {"action": "x"})
    dec = Decoder()
    for _ in range(20_000):
        dec.feed(data)
        dec.feed(data)
        assert dec.next_event() is not None
    # half the frames are still queued; the consumed prefix was dropped along the way
    assert dec.buffered == 20_000 * len(data)
    assert len(dec._buf) <= 2 * dec.buffered + len(data)
    assert len(drain(dec)) == 20_000


def test_many_small_frames_are_linear() -> None:
    data = encode(1, 1, {"action": "x"}) * 50_000
    dec = Decoder()
    t = time.perf_counter()
    for i in range(0, len(data), 1000):
        dec.feed(data[i : i + 1000])
        drain(dec)
    assert dec.buffered == 0
    assert time.perf_counter() - t < 10  # O(n^2) over 700 kB would take far longer


# -- repeated fire-and-forget frames ---------------------------------------------------------------------

BEAT = {"action": "agent.heartbeat", "agentId": "a1", "pid": 42}


def test_repeated_flat_fire_and_forget_frame_is_decoded_once() -> None:
    dec = Decoder(reuse_repeats=True)
    dec.feed(encode(Performative.INFORM, 0, BEAT) * 3)
    first, second, third = drain(dec)
    assert first == Frame(Performative.INFORM, 0, BEAT)
    assert second is first and third is first
    assert dec.repeatable is first


def test_repeats_are_not_reused_by_default() -> None:
    dec = Decoder()
    dec.feed(encode(Performative.INFORM, 0, BEAT) * 2)
    first, second = drain(dec)
    assert first == second and first is not second and first.payload is not second.payload


@pytest.mark.parametrize(
    "a, b",
    [
        pytest.param((Performative.REQUEST, 7, BEAT), (Performative.REQUEST, 7, BEAT), id="request-conv-id"),
        pytest.param((Performative.INFORM, 0, BEAT), (Performative.CANCEL, 0, BEAT), id="other-type-same-body"),
        pytest.param((Performative.INFORM, 0, BEAT), (Performative.INFORM, 0, {**BEAT, "pid": 43}), id="other-body"),
        pytest.param((Performative.INFORM, 0, {"action": "m", "p": {"k": 1}}),
                     (Performative.INFORM, 0, {"action": "m", "p": {"k": 1}}), id="nested-payload"),
    ],
)  # fmt: skip
def test_what_is_decoded_afresh(a: tuple, b: tuple) -> None:
    dec = Decoder(reuse_repeats=True)
    dec.feed(encode(*a) + encode(*b))
    first, second = drain(dec)
    assert first == Frame(*a) and second == Frame(*b)
    assert second is not first
    if a[2] == b[2]:
        assert second.payload is not first.payload  # nested values are never shared: a reader may change them


def test_a_malformed_repeat_stays_malformed() -> None:
    dec = Decoder(reuse_repeats=True)
    dec.feed(raw_frame(Performative.INFORM, 0, msgpack.packb({"name": "x"})) * 2)
    assert drain(dec) == [Malformed(fr.R_NO_ACTION, 0)] * 2


# -- malformed frames ------------------------------------------------------------------------------------

VALID_AFTER = encode(Performative.REQUEST, 42, {"action": "after"})
FRAME_AFTER = Frame(0x10, 42, {"action": "after"})


def _bytes_key_nested() -> bytes:
    return msgpack.packb({"action": "x", "m": {"ok": 1, b"k": 2}}, use_bin_type=True)


MALFORMED_CASES = [
    pytest.param(0x00, msgpack.packb({"action": "x"}), f"{fr.R_UNKNOWN_TYPE} 0x00", id="unknown-type-0"),
    pytest.param(0xFF, b"\x01\x02\x03", f"{fr.R_UNKNOWN_TYPE} 0xff", id="unknown-type-ff"),
    pytest.param(0x10, b"", fr.R_BAD_MSGPACK, id="empty-payload"),
    pytest.param(0x10, b"\xc1", fr.R_BAD_MSGPACK, id="reserved-byte"),
    pytest.param(0x10, b"\x81\xa6action", fr.R_BAD_MSGPACK, id="truncated-map"),
    pytest.param(0x10, b"\x81\xa6action\xa2\xff\xfe", fr.R_BAD_MSGPACK, id="bad-utf8"),
    pytest.param(0x10, msgpack.packb([1, 2]), fr.R_NOT_A_MAP, id="list"),
    pytest.param(0x10, msgpack.packb("action"), fr.R_NOT_A_MAP, id="str"),
    pytest.param(0x10, msgpack.packb(None), fr.R_NOT_A_MAP, id="nil"),
    pytest.param(0x10, msgpack.packb({"name": "x"}), fr.R_NO_ACTION, id="no-action"),
    pytest.param(0x10, msgpack.packb({"action": 1}), fr.R_NO_ACTION, id="action-int"),
    pytest.param(0x10, msgpack.packb({"action": None}), fr.R_NO_ACTION, id="action-nil"),
    pytest.param(0x10, msgpack.packb({"action": b"x"}, use_bin_type=True), fr.R_NO_ACTION, id="action-bin"),
    pytest.param(0x10, msgpack.packb({"action": "x", 1: 2}), fr.R_KEY_NOT_STR, id="int-key"),
    pytest.param(0x10, msgpack.packb({"action": "x", None: 2}), fr.R_KEY_NOT_STR, id="nil-key"),
    pytest.param(0x10, msgpack.packb({"action": "x", b"k": 2}, use_bin_type=True), fr.R_KEY_NOT_STR, id="bin-key"),
    pytest.param(0x10, _bytes_key_nested(), fr.R_KEY_NOT_STR, id="nested-bin-key"),
    pytest.param(0x10, msgpack.packb({"action": "x", "l": [{2: 3}]}), fr.R_KEY_NOT_STR, id="nested-int-key"),
    pytest.param(0x10, nested_list_payload(32), fr.R_TOO_DEEP, id="depth-33"),
    pytest.param(0x10, nested_list_payload(1000), fr.R_TOO_DEEP, id="depth-1001"),
    pytest.param(0x10, nested_list_payload(10_000), fr.R_TOO_DEEP, id="depth-10001"),
    pytest.param(0x10, msgpack.packb({"action": "x"}) + b"\x00", fr.R_TRAILING, id="trailing-byte"),
    pytest.param(0x10, msgpack.packb({"action": "x"}) * 2, fr.R_TRAILING, id="trailing-map"),
    pytest.param(0x10, msgpack.packb({"action": "x", "e": msgpack.ExtType(5, b"z")}), fr.R_EXT_TYPE, id="ext-type"),
]


@pytest.mark.parametrize(("ftype", "body", "reason"), MALFORMED_CASES)
def test_malformed_reason_and_recovery(ftype: int, body: bytes, reason: str) -> None:
    data = raw_frame(ftype, 77, body) + VALID_AFTER
    assert decode_all(data) == [Malformed(reason, 77), FRAME_AFTER]
    # and byte by byte through next_event
    dec = Decoder()
    got = []
    for i in range(0, len(data), 97):
        dec.feed(data[i : i + 97])
        got += drain(dec)
    assert got == [Malformed(reason, 77), FRAME_AFTER]


# What only the nesting walk catches: a client's decoder (``from_daemon``) lets these through.
NESTING_ONLY = {"bin-key", "nested-bin-key", "depth-33", "depth-1001"}


@pytest.mark.parametrize(("ftype", "body", "reason"), MALFORMED_CASES)
def test_a_clients_decoder_skips_only_the_nesting_walk(
    ftype: int, body: bytes, reason: str, request: pytest.FixtureRequest
) -> None:
    dec = Decoder(from_daemon=True)
    dec.feed(raw_frame(ftype, 77, body) + VALID_AFTER)
    first, after = dec.events()
    assert after == FRAME_AFTER
    if request.node.callspec.id in NESTING_ONLY:
        assert first.__class__ is Frame and first.payload["action"] == "x"
    else:
        assert first == Malformed(reason, 77)  # msgpack's own checks and ours outside the walk still apply


def test_depth_limit_is_exactly_32_levels() -> None:
    (ev,) = decode_all(raw_frame(0x10, 1, nested_list_payload(31)))
    assert isinstance(ev, Frame)
    deep: object = None
    for _ in range(31):
        deep = [deep]
    assert ev.payload == {"action": "x", "d": deep}
    # maps count as levels too
    deep_map: dict = {}
    for _ in range(31):
        deep_map = {"k": deep_map}
    ok = {"action": "x", **deep_map}  # 32 levels including the payload map itself
    assert decode_all(encode(1, 1, ok)) == [Frame(1, 1, ok)]
    too_deep = {"action": "x", "k": deep_map}
    assert decode_all(encode(1, 1, too_deep)) == [Malformed(fr.R_TOO_DEEP, 1)]


@pytest.mark.parametrize("levels", [1000, 10_000, 65_000])
def test_very_deep_nesting_is_fast(levels: int) -> None:
    data = raw_frame(0x10, 3, nested_list_payload(levels)) + VALID_AFTER
    t = time.perf_counter()
    events = decode_all(data)
    elapsed = time.perf_counter() - t
    assert events == [Malformed(fr.R_TOO_DEEP, 3), FRAME_AFTER]
    assert elapsed < 0.5


def test_wide_nested_payload_is_checked_everywhere() -> None:
    good = {"action": "x", "items": [{"id": i, "tags": ["a", "b"], "m": {"k": [i]}} for i in range(500)]}
    assert decode_all(encode(1, 1, good)) == [Frame(1, 1, good)]
    bad = {"action": "x", "items": [*good["items"], {"m": {3: 1}}]}
    assert decode_all(encode(1, 1, bad)) == [Malformed(fr.R_KEY_NOT_STR, 1)]


def test_timestamp_ext_decodes() -> None:
    ts = msgpack.Timestamp(1, 0)
    assert decode_all(encode(1, 1, {"action": "x", "t": ts})) == [Frame(1, 1, {"action": "x", "t": ts})]


# -- conversation ids ------------------------------------------------------------------------------------


def test_next_conv_id() -> None:
    assert next_conv_id(0) == 1
    assert next_conv_id(1) == 2
    assert next_conv_id(MAX_CONV_ID - 1) == MAX_CONV_ID
    assert next_conv_id(MAX_CONV_ID) == 1
    assert next_conv_id(0xFFFFFFFF) == 1
    c = MAX_CONV_ID - 3
    seen = []
    for _ in range(6):
        c = next_conv_id(c)
        seen.append(c)
    assert seen == [MAX_CONV_ID - 2, MAX_CONV_ID - 1, MAX_CONV_ID, 1, 2, 3]


@given(st.integers(min_value=0, max_value=2**40))
def test_next_conv_id_range(prev: int) -> None:
    n = next_conv_id(prev)
    assert 1 <= n <= MAX_CONV_ID


# -- properties ------------------------------------------------------------------------------------------

keys = st.text(max_size=8)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=8
)
payloads = st.builds(
    lambda a, rest: {**rest, "action": a}, st.text(max_size=12), st.dictionaries(keys, values, max_size=5)
)
frames = st.builds(
    Frame,
    st.sampled_from([int(p) for p in Performative]),
    st.integers(min_value=0, max_value=0xFFFFFFFF),
    payloads,
)


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)] if sizes else len(data)
        out.append(data[i : i + n])
        i += n
        k += 1
    return out


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(frames, max_size=6), st.lists(st.integers(min_value=1, max_value=64), max_size=10), st.booleans())
def test_property_frames_survive_any_chunking(fs: list[Frame], sizes: list[int], one_by_one: bool) -> None:
    fs = fs + fs[-1:] * 2  # repeats, to exercise reuse_repeats
    data = b"".join(encode(*f) for f in fs)
    dec = Decoder(reuse_repeats=one_by_one)
    got: list[Frame | Malformed] = []
    for chunk in _chunks(data, sizes):
        dec.feed(chunk)
        got += drain(dec) if one_by_one else dec.events()
    assert got == fs
    assert dec.buffered == 0


def _check_garbage(chunks: list[bytes], one_by_one: bool) -> None:
    total = sum(len(c) for c in chunks)
    dec = Decoder()
    events: list[Frame | Malformed] = []
    for chunk in chunks:
        dec.feed(chunk)
        # every event consumes at least a header, so draining is bounded by the bytes fed so far
        batch = drain(dec) if one_by_one else dec.events()
        events += batch
        assert len(events) * HEADER_SIZE + dec.buffered <= total
    assert dec.next_event() is None and dec.events() == []
    for ev in events:
        assert isinstance(ev, Frame | Malformed)
        if isinstance(ev, Malformed):
            assert isinstance(ev.reason, str) and 0 <= ev.conv_id <= 0xFFFFFFFF
    # whatever is left is less than one whole frame
    if dec.buffered >= HEADER_SIZE:
        tail = b"".join(chunks)[total - dec.buffered :]
        assert dec.buffered < HEADER_SIZE + HEADER.unpack_from(tail)[2]


@settings(deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=1, max_value=300), max_size=10), st.booleans())
def test_property_random_garbage_never_raises(data: bytes, sizes: list[int], one_by_one: bool) -> None:
    _check_garbage(_chunks(data, sizes), one_by_one)


# Random bytes rarely form a whole frame; these do, with a garbage (or half-valid) payload inside.
garbage_frames = st.builds(
    raw_frame,
    st.sampled_from([int(p) for p in Performative]) | st.integers(min_value=0, max_value=255),
    st.integers(min_value=0, max_value=0xFFFFFFFF),
    st.binary(max_size=64) | payloads.map(lambda p: msgpack.packb(p, use_bin_type=True)[:-1]),
)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.lists(garbage_frames | frames.map(lambda f: encode(*f)), max_size=6),
    st.lists(st.integers(min_value=1, max_value=100), max_size=10),
    st.booleans(),
)
def test_property_garbage_frames_never_raise(parts: list[bytes], sizes: list[int], one_by_one: bool) -> None:
    data = b"".join(parts)
    _check_garbage(_chunks(data, sizes), one_by_one)
    # and framing is never lost: one event per frame, in order
    assert len(decode_all(data)) == len(parts)


def test_a_reply_too_large_for_a_frame_goes_in_parts_and_comes_back_whole() -> None:
    result = {"services": [{"id": f"big:{i}", "metadata": {"blob": "x" * 9000}} for i in range(20)]}
    payload = {"action": "port.find", "result": result}
    wire = Encoder().encode_in_parts(Performative.INFORM_DONE, 7, payload)
    frames = decode_all(wire)
    assert [f.type for f in frames] == [Performative.INFORM_PART] * 2 + [Performative.INFORM_DONE]
    assert all(isinstance(f, Frame) and f.conv_id == 7 for f in frames)
    for cut in range(0, len(wire), 997):  # the bytes split anywhere
        dec, parts = Decoder(from_daemon=True), Parts()
        got = []
        for chunk in (wire[:cut], wire[cut:]):
            dec.feed(chunk)
            got += [whole for f in drain(dec) if (whole := parts.feed(f)) is not None]
        assert got == [Frame(Performative.INFORM_DONE, 7, payload)]
    other = Frame(Performative.INFORM_DONE, 8, {"action": "port.claim", "result": {"port": 3100}})
    parts = Parts()  # another conversation's reply between the parts
    got = [whole for f in (frames[0], other, *frames[1:]) if (whole := parts.feed(f)) is not None]
    assert got == [other, Frame(Performative.INFORM_DONE, 7, payload)]
    small = Frame(Performative.REFUSE, 9, {"action": "lock.acquire", "error": "LOCK_HELD"})
    assert Parts().feed(small) is small  # a reply in one frame passes straight through


def test_a_reply_over_max_reply_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(FrameTooLarge) as info:
        Encoder().encode_in_parts(Performative.INFORM_DONE, 1, {"action": "x", "blob": b"x" * (fr.MAX_REPLY + 1)})
    assert info.value.limit == fr.MAX_REPLY


# -- requests in parts (the daemon's Decoder(max_request=...)) ------------------------------------------------


def part_frame(conv: int, part: bytes, ftype: int = Performative.INFORM_PART) -> bytes:
    return encode(ftype, conv, {"action": "x", "part": part})


def sliced(conv: int, body: bytes, kind: int = Performative.REQUEST) -> bytes:
    """Any bytes sent as a request's parts, as a client sends a packed payload."""
    starts = range(0, len(body), fr.PART_SIZE)
    return b"".join(part_frame(conv, body[i : i + fr.PART_SIZE], kind if i == starts[-1] else Performative.INFORM_PART)
                    for i in starts)  # fmt: skip


def daemon_decoder(max_request: int = fr.MAX_REQUEST) -> Decoder:
    return Decoder(reuse_repeats=True, max_request=max_request)


def test_a_request_too_large_for_a_frame_goes_in_parts_and_the_daemon_gets_it_whole() -> None:
    payload = {"action": "spawn.start", "task": "é" * 100_000 + "x" * 40_000, "env": {"A": [1.5] * 5000}}
    for kind, conv in ((Performative.REQUEST, 3), (Performative.INFORM, 0)):  # fire-and-forget too
        wire = Encoder().encode_in_parts(kind, conv, payload, fr.MAX_REQUEST)
        assert [f.type for f in decode_all(wire)] == [Performative.INFORM_PART] * 4 + [kind]  # as a client sees it
        for cut in range(0, len(wire), 9973):  # the bytes split anywhere
            dec = daemon_decoder()
            dec.feed(wire[:cut])
            assert drain(dec) == [] and dec.buffered <= cut and (dec.buffered > 0) == (cut > 0)
            dec.feed(wire[cut:])
            assert drain(dec) == [Frame(kind, conv, payload)] and dec.buffered == 0
    dec = daemon_decoder()  # the frames before and after are their own
    dec.feed(encode(Performative.REQUEST, 1, {"action": "a"}) + wire + encode(Performative.REQUEST, 2, {"action": "b"}))
    assert [(e.conv_id, e.payload["action"]) for e in drain(dec)] == [(1, "a"), (0, "spawn.start"), (2, "b")]


def test_a_request_over_max_request_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(FrameTooLarge) as info:
        Encoder().encode_in_parts(
            Performative.REQUEST, 1, {"action": "x", "blob": b"x" * fr.MAX_REQUEST}, fr.MAX_REQUEST
        )
    assert info.value.limit == fr.MAX_REQUEST
    assert (
        str(info.value)
        == f"the request is {info.value.size} bytes, over the 1048576-byte limit of one request; send less"
    )


def test_hostile_parts_are_malformed_and_bounded() -> None:
    full = b"\0" * fr.PART_SIZE
    whole = encode(Performative.REQUEST, 9, {"action": "daemon.health"})
    too_large = f"{fr.R_PARTS_TOO_LARGE} {{}} bytes".format

    def events(*frames: bytes, max_request: int = fr.MAX_REQUEST) -> list[tuple[str, int] | int]:
        dec = daemon_decoder(max_request)
        dec.feed(b"".join(frames))
        got = [(e.reason, e.conv_id) if isinstance(e, Malformed) else e.conv_id for e in drain(dec)]
        assert dec.buffered <= max_request
        return got

    # a frame of another conversation between the parts drops the request, and is served itself
    assert events(part_frame(1, full), whole) == [(fr.R_PARTS_CUT, 1), 9]
    assert events(part_frame(1, full), sliced(2, msgpack.packb({"action": "a", "pad": "x" * 70_000}))) == [
        (fr.R_PARTS_CUT, 1), 2]  # fmt: skip
    # a short part, a part that is no bin, a bad frame among the parts: each drops the request
    assert events(part_frame(1, b"\0" * 10), whole) == [(fr.R_PART_SIZE, 1), 9]
    assert events(part_frame(1, full), encode(Performative.INFORM_PART, 1, {"action": "x", "part": "text"})) == [
        (fr.R_PART_NOT_BIN, 1)]  # fmt: skip
    assert events(part_frame(1, full), encode(Performative.REQUEST, 1, {"action": "x"}), whole) == [
        (fr.R_PART_NOT_BIN, 1), 9]  # fmt: skip
    assert events(part_frame(1, full), raw_frame(Performative.REQUEST, 1, b"\xc1"), whole) == [
        (fr.R_BAD_MSGPACK, 1), 9]  # fmt: skip
    # parts without end: refused once over max_request (nothing more kept), then the next parts start afresh
    assert events(*[part_frame(4, full)] * 8, max_request=3 * fr.PART_SIZE) == [(too_large(3 * fr.PART_SIZE), 4)] * 2
    assert events(part_frame(4, full), part_frame(4, b"\0", Performative.REQUEST), max_request=fr.PART_SIZE) == [
        (too_large(fr.PART_SIZE), 4)]  # fmt: skip
    # the request put together is checked as any frame's payload is
    deep: list = []
    for _ in range(40):
        deep = [deep]
    assert events(sliced(6, msgpack.packb({"action": "x", "pad": "x" * 70_000, "d": deep}))) == [(fr.R_TOO_DEEP, 6)]
    assert events(sliced(6, msgpack.packb(["x" * 70_000]))) == [(fr.R_NOT_A_MAP, 6)]
    assert events(sliced(6, msgpack.packb({"action": "x", "pad": "x" * 70_000}) + b"\0")) == [(fr.R_TRAILING, 6)]


def test_parts_so_far_count_as_buffered_so_the_daemon_times_them_out() -> None:
    dec = daemon_decoder()
    dec.feed(part_frame(5, b"\0" * fr.PART_SIZE))
    assert dec.next_event() is None and dec.buffered == fr.PART_SIZE


def test_a_client_decoder_passes_inform_part_through() -> None:
    """Only the daemon puts requests together: what a client reads in parts is a reply (``Parts``)."""
    assert decode_all(part_frame(1, b"abc")) == [Frame(Performative.INFORM_PART, 1, {"action": "x", "part": b"abc"})]


part_frames = st.builds(
    part_frame,
    st.sampled_from([1, 2]),
    st.sampled_from([b"\0" * fr.PART_SIZE, b"\x90", b"", b"abc"]),
    st.sampled_from([Performative.INFORM_PART] * 3 + [Performative.REQUEST]),
)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=60)
@given(st.lists(part_frames | garbage_frames, max_size=10),
       st.lists(st.integers(min_value=1, max_value=70_000), max_size=5))  # fmt: skip
def test_property_any_parts_never_raise_and_stay_bounded(fs: list[bytes], sizes: list[int]) -> None:
    limit = 2 * fr.PART_SIZE
    dec = daemon_decoder(limit)
    for chunk in _chunks(b"".join(fs), sizes):
        dec.feed(chunk)
        for ev in drain(dec):
            assert isinstance(ev, Frame | Malformed)
        assert dec._parts is None or len(dec._parts) <= limit
