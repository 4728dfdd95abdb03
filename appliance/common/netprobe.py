"""TCP reachability probes: is anything listening on host:port, and how do we know?

The head probes its workers' RPC ports to tell a dead RPC server (the connection is
refused: nothing listens, the process is gone) from a hung or unplugged box (no answer
in time); the worker agent waits for its own RPC server's port to open. Both use this.
"""

from __future__ import annotations

import asyncio
from enum import Enum


class Reach(str, Enum):
    OPEN = "open"
    REFUSED = "refused"  # nothing listens: the server process is gone
    UNREACHABLE = "unreachable"  # no answer in time: hung, overloaded, unplugged, or a network problem


async def probe_tcp(host: str, port: int, timeout_s: float) -> Reach:
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        return Reach.REFUSED
    except (OSError, asyncio.TimeoutError, ValueError):
        return Reach.UNREACHABLE
    w.close()
    try:
        await w.wait_closed()
    except OSError:
        pass
    return Reach.OPEN


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ValueError if malformed."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a host:port endpoint: {endpoint!r}")
    return host.strip("[]"), int(port)
