"""Control-plane wire protocol between worker agents (DEALER) and the head (ROUTER).

Every message is three frames: [PROTOCOL, TYPE, JSON body], and CHUNK a fourth with its
bytes. The ROUTER side sees the sender's routing id as an extra first frame. Anything else
(wrong frame count, unknown protocol or type, a body that is not a JSON object or is too
large, nested too deeply, or holding NaN, Infinity, a float beyond range or an integer of
absurd length) is rejected by `decode` with `BadFrame`; callers log it and drop it, never crash.

Worker -> head: HELLO (announce), HEARTBEAT (liveness + load + tensor cache), RPC_READY,
BYE, FETCH (send me a piece of a tensor I am to pre-stage).
Head -> worker: WELCOME (accepted: where to bind the RPC server), REFUSE (with reason),
HEARTBEAT, REANNOUNCE (head does not know you: say HELLO again, e.g. after a head restart),
STAGE (the tensors to keep and to pre-stage in the RPC server's cache), CHUNK (a piece).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

PROTOCOL = b"ANYWAY/1"
PROTOCOL_MAJOR = 1

HELLO = b"HELLO"
HEARTBEAT = b"HB"
RPC_READY = b"RPC_READY"
BYE = b"BYE"
WELCOME = b"WELCOME"
REFUSE = b"REFUSE"
REANNOUNCE = b"REANNOUNCE"
STAGE = b"STAGE"
FETCH = b"FETCH"
CHUNK = b"CHUNK"

WORKER_TYPES = frozenset({HELLO, HEARTBEAT, RPC_READY, BYE, FETCH})
HEAD_TYPES = frozenset({WELCOME, REFUSE, HEARTBEAT, REANNOUNCE, STAGE, CHUNK})
PAYLOAD_TYPES = frozenset({CHUNK})  # carry a fourth frame of raw bytes
MAX_BODY_BYTES = 256 * 1024  # a STAGE list of a large model's tensors fits
MAX_PAYLOAD_BYTES = 512 * 1024  # one CHUNK
MAX_INT_DIGITS = 24
"""Integers longer than this are no byte count or port a box sends (and Python would happily
build a 64 KiB one that no float can hold)."""


class BadFrame(ValueError):
    """A message that does not follow the protocol; `version_mismatch` when the peer speaks
    another version of it (the head then answers REFUSE, so the node can say why)."""

    def __init__(self, message: str, *, version_mismatch: bool = False) -> None:
        super().__init__(message)
        self.version_mismatch = version_mismatch


@dataclass(frozen=True)
class Message:
    type: bytes
    body: dict[str, Any]
    payload: bytes | None = None


def _no_constant(name: str) -> Any:
    raise BadFrame(f"body holds {name}, which is not a number a box sends")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadFrame(f"body holds {text[:32]}, beyond the range of a float")
    return value


def _short_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadFrame(f"body holds an integer of {len(text)} digits")
    return int(text)


def encode(msg_type: bytes, body: dict[str, Any] | None = None, *, payload: bytes | None = None) -> list[bytes]:
    frames = [PROTOCOL, msg_type, json.dumps(body or {}, separators=(",", ":"), allow_nan=False).encode()]
    return frames + [payload] if payload is not None else frames


def decode(frames: list[bytes], *, allowed: frozenset[bytes]) -> Message:
    if len(frames) not in (3, 4):
        raise BadFrame(f"expected 3 frames, got {len(frames)}")
    proto, msg_type, raw = frames[:3]
    payload = frames[3] if len(frames) == 4 else None
    if proto != PROTOCOL:
        shown = proto[:32]
        if proto.startswith(b"ANYWAY/"):
            raise BadFrame(f"protocol version mismatch: peer speaks {shown!r}, this node {PROTOCOL!r}", version_mismatch=True)
        raise BadFrame(f"unknown protocol {shown!r}")
    if msg_type not in allowed:
        raise BadFrame(f"unknown message type {msg_type[:32]!r}")
    if (payload is not None) != (msg_type in PAYLOAD_TYPES):
        raise BadFrame(f"{msg_type.decode(errors='replace')} with {len(frames)} frames")
    if payload is not None and len(payload) > MAX_PAYLOAD_BYTES:
        raise BadFrame(f"payload too large ({len(payload)} bytes)")
    if len(raw) > MAX_BODY_BYTES:
        raise BadFrame(f"body too large ({len(raw)} bytes)")
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_short_int)
    except BadFrame:
        raise
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and int() beyond its digit limit
        raise BadFrame(f"body is not JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise BadFrame("body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadFrame("body is not a JSON object")
    return Message(msg_type, body, payload)
