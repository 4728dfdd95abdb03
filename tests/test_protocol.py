"""Control-plane frames: well-formed messages round-trip, anything else is rejected cleanly."""

from __future__ import annotations

import pytest

from appliance.common import protocol as P


def test_roundtrip() -> None:
    msg = P.decode(P.encode(P.HELLO, {"name": "w1"}), allowed=P.WORKER_TYPES)
    assert msg.type == P.HELLO and msg.body == {"name": "w1"}


@pytest.mark.parametrize(
    "frames, why",
    [
        pytest.param([b"garbage"], "expected 3 frames", id="one-frame"),
        pytest.param([P.PROTOCOL, P.HELLO, b"{}", b"extra"], "HELLO with 4 frames", id="four-frames"),
        pytest.param([P.PROTOCOL, P.HELLO, b"{}", b"a", b"b"], "expected 3 frames", id="five-frames"),
        pytest.param([b"HTTP/1.1", P.HELLO, b"{}"], "unknown protocol", id="wrong-protocol"),
        pytest.param([b"ANYWAY/0", P.HELLO, b"{}"], "version mismatch", id="old-protocol"),
        pytest.param([P.PROTOCOL, b"LAUNCH_MISSILES", b"{}"], "unknown message type", id="unknown-type"),
        pytest.param([P.PROTOCOL, P.WELCOME, b"{}"], "unknown message type", id="head-type-from-worker"),
        pytest.param([P.PROTOCOL, P.HELLO, b"\xff\xfe"], "not JSON", id="not-utf8"),
        pytest.param([P.PROTOCOL, P.HELLO, b"{bad json"], "not JSON", id="bad-json"),
        pytest.param([P.PROTOCOL, P.HELLO, b"[1,2]"], "not a JSON object", id="json-array"),
        pytest.param([P.PROTOCOL, P.HELLO, b"{" + b" " * P.MAX_BODY_BYTES + b"}"], "too large", id="too-large"),
        pytest.param([P.PROTOCOL, P.HEARTBEAT, b"[" * 30_000 + b"]" * 30_000], "nested too deeply", id="deeply-nested"),
        pytest.param([P.PROTOCOL, P.HEARTBEAT, b'{"speed": NaN}'], "NaN", id="nan"),
        pytest.param([P.PROTOCOL, P.HEARTBEAT, b'{"speed": -Infinity}'], "Infinity", id="infinity"),
        pytest.param([P.PROTOCOL, P.HEARTBEAT, b'{"memory": {"total": 1e400}}'], "beyond the range", id="float-overflow"),
        pytest.param([P.PROTOCOL, P.HEARTBEAT, b'{"memory": {"total": ' + b"9" * 5000 + b"}}"], "integer of", id="huge-int"),
        pytest.param([P.PROTOCOL, P.HEARTBEAT, b'{"x": ' + b"9" * 30 + b"}"], "integer of", id="long-int"),
    ],
)
def test_bad_frames(frames: list[bytes], why: str) -> None:
    with pytest.raises(P.BadFrame, match=why):
        P.decode(frames, allowed=P.WORKER_TYPES)


def test_a_chunk_carries_its_bytes_and_nothing_else_may() -> None:
    frames = P.encode(P.CHUNK, {"hash": "00ff", "offset": 0}, payload=b"\x00" * 1000)
    msg = P.decode(frames, allowed=P.HEAD_TYPES)
    assert msg.type == P.CHUNK and msg.payload == b"\x00" * 1000
    with pytest.raises(P.BadFrame, match="CHUNK with 3 frames"):
        P.decode(frames[:3], allowed=P.HEAD_TYPES)
    with pytest.raises(P.BadFrame, match="payload too large"):
        P.decode([*frames[:3], b"x" * (P.MAX_PAYLOAD_BYTES + 1)], allowed=P.HEAD_TYPES)
    with pytest.raises(P.BadFrame, match="unknown message type"):
        P.decode(frames, allowed=P.WORKER_TYPES)  # a worker never sends chunks
def test_numbers_a_box_sends_still_parse() -> None:
    body = {"memory": {"total": 64 << 40}, "speed": 1234.5, "load": {"loadavg_1m": 0.0}, "rpc_port": 65535}
    assert P.decode(P.encode(P.HEARTBEAT, body), allowed=P.WORKER_TYPES).body == body


def test_nan_is_never_sent() -> None:
    with pytest.raises(ValueError):
        P.encode(P.HEARTBEAT, {"speed": float("nan")})
