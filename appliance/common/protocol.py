"""Control-plane wire protocol between worker agents (DEALER) and the head (ROUTER).

Every message is three frames: [PROTOCOL, TYPE, JSON body]. The ROUTER side sees the
sender's routing id as an extra first frame. Anything else (wrong frame count, unknown
protocol or type, a body that is not a JSON object or is too large, nested too deeply, or
holding NaN, Infinity, a float beyond range or an integer of absurd length) is rejected by
`decode` with `BadFrame`; callers log it and drop it, never crash.

Worker -> head: HELLO (announce), HEARTBEAT (liveness + load), RPC_READY, BYE.
Head -> worker: WELCOME (accepted: where to bind the RPC server), REFUSE (with reason),
HEARTBEAT, REANNOUNCE (head does not know you: say HELLO again, e.g. after a head restart).
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

WORKER_TYPES = frozenset({HELLO, HEARTBEAT, RPC_READY, BYE})
HEAD_TYPES = frozenset({WELCOME, REFUSE, HEARTBEAT, REANNOUNCE})
MAX_BODY_BYTES = 64 * 1024
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


def encode(msg_type: bytes, body: dict[str, Any] | None = None) -> list[bytes]:
    return [PROTOCOL, msg_type, json.dumps(body or {}, separators=(",", ":"), allow_nan=False).encode()]


def decode(frames: list[bytes], *, allowed: frozenset[bytes]) -> Message:
    if len(frames) != 3:
        raise BadFrame(f"expected 3 frames, got {len(frames)}")
    proto, msg_type, raw = frames
    if proto != PROTOCOL:
        shown = proto[:32]
        if proto.startswith(b"ANYWAY/"):
            raise BadFrame(f"protocol version mismatch: peer speaks {shown!r}, this node {PROTOCOL!r}", version_mismatch=True)
        raise BadFrame(f"unknown protocol {shown!r}")
    if msg_type not in allowed:
        raise BadFrame(f"unknown message type {msg_type[:32]!r}")
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
    return Message(msg_type, body)
