"""The data plane's secure channel: TLS 1.3 with mutual authentication in front of ggml RPC.

Why: llama.cpp's RPC server has no authentication and a history of remote memory-corruption
bugs, and what crosses it (weights at load time, every activation at each decode step) is the
organisation's data. So the C server listens on the worker's loopback only, and the only
thing on the LAN is a TLS 1.3 listener that requires the head's certificate; the head's
engine reaches it through a local relay that requires the node's certificate. Both sides pin
the peer's exact self-signed certificate from the cluster's keys (`appliance.common.keys`):
OpenSSL verifies it (the pinned certificate is the only trust anchor), and the relay checks
the presented certificate's bytes once more before it forwards a single byte. A peer without
the key gets a failed handshake and never a byte of the RPC protocol.

Why TLS from Python's `ssl` (OpenSSL) rather than something home-made or a system tunnel:
OpenSSL's TLS 1.3 is kept, reviewed and fast (AES-GCM with AES-NI: hundreds of MB/s in one
thread, far above 1 Gbit/s), needs no root and no extra package on the boxes, and lives in
the processes that already exist (see docs/ARCHITECTURE.md, "Data plane").

Two ends, each an event loop (uvloop) in a daemon thread of an existing process:

* `serve_tls` (worker, in the RPC server child next to the C server): accepts TLS on the LAN
  address, connects each authenticated connection to the C server on 127.0.0.1. Being in the
  same process as the C server keeps the head's failure detection exact: when the server
  dies its listener dies with it and the port refuses connections.
* `serve_plain` (head, in the engine process): a listener on 127.0.0.1 that ggml's RPC
  client connects to; each connection is relayed over TLS to the worker. It dies with the
  engine, so the worker's server sees the engine's connections close as before.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable

from appliance.common import logs
from appliance.common.keys import Identity, SecretIdentity

log = logs.get("dataplane")

READ_CHUNK_BYTES = 256 * 1024
"""Largest piece read at once: weights stream through in big records."""
HIGH_WATER_BYTES = 4 * 1024 * 1024
"""A relay stops reading from one side while more than this waits to be written to the other."""
HANDSHAKE_TIMEOUT_S = 10.0
"""A TLS handshake that takes longer is abandoned (a silent or hostile peer)."""


class DataPlaneError(RuntimeError):
    """The secure channel cannot be set up (bad keys, address in use); the message says why."""


# ----------------------------------------------------------------------- TLS contexts
def _load_identity(ctx: ssl.SSLContext, me: SecretIdentity) -> None:
    """Load our certificate and key from memory: `ssl` only reads files, so hand it an
    anonymous in-memory file (memfd) — the secret key never touches a disk."""
    pem = me.public.tls_cert_pem + me.tls_key_pem
    try:
        fd = os.memfd_create("anyway-tls", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            os.write(fd, pem.encode())
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile("w", prefix="anyway-tls-", suffix=".pem") as f:  # mode 0600
        f.write(pem)
        f.flush()
        ctx.load_cert_chain(f.name)


def _harden(ctx: ssl.SSLContext, peer: Identity) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=peer.tls_cert_der)  # the pinned certificate is the only trust anchor
    ctx.options |= ssl.OP_NO_TICKET  # no session resumption: every connection authenticates afresh
    return ctx


def server_context(*, me: SecretIdentity, head: Identity) -> ssl.SSLContext:
    """The worker's side: present the node's certificate, require the head's exact one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_identity(ctx, me)
    return _harden(ctx, head)


def client_context(*, me: SecretIdentity, node: Identity) -> ssl.SSLContext:
    """The head's side: present the head's certificate, require the node's exact one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # identity is the pinned certificate, not a host name
    _load_identity(ctx, me)
    return _harden(ctx, node)


def _peer_is(transport: asyncio.BaseTransport, expected: Identity) -> bool:
    obj = transport.get_extra_info("ssl_object")
    der = obj.getpeercert(binary_form=True) if obj is not None else None
    return der == expected.tls_cert_der


# ----------------------------------------------------------------------- relaying
def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (a pinned dependency): its TLS transport is compiled, and a relay
    spends about half the CPU of asyncio's pure-Python one on each small message."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the product pins uvloop
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _Half(asyncio.Protocol):
    """One side of a relayed connection; forwards what it receives to its peer, with flow control."""

    def __init__(self, on_close: Callable[[], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending: list[bytes] = []
        self.on_close = on_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # asyncio's or uvloop's
        self.transport.set_write_buffer_limits(high=HIGH_WATER_BYTES)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)  # the other side is still connecting / handshaking

    def eof_received(self) -> bool | None:
        # ggml never half-closes: the end of one side is the end of the connection (the peer's
        # transport still sends what it has buffered before it closes).
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.peer is not None:
            self.peer.close()
        if self.on_close is not None:
            self.on_close()
            self.on_close = None

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def join(self, peer: _Half) -> None:
        self.peer, peer.peer = peer, self
        for half, other in ((self, peer), (peer, self)):
            if half.pending and other.transport is not None:
                for chunk in half.pending:
                    other.transport.write(chunk)
            half.pending = []

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Stats:
    """Counters an operator (or a test) can read: what the channel let in and what it refused."""

    accepted: int = 0
    refused: int = 0
    relayed: int = 0
    open: int = 0


class Relay:
    """An event loop (uvloop) in a daemon thread that runs the relays of one process."""

    def __init__(self, *, name: str) -> None:
        self.name = name
        self.loop = _new_loop()
        self.stats = Stats()
        self._thread = threading.Thread(target=self._run, name=f"dataplane-{name}", daemon=True)
        self._started = threading.Event()
        self._thread.start()
        self._started.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()

    def call(self, coro: Any, timeout_s: float = 30.0) -> Any:
        """Run `coro` on the relay's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    # ------------------------------------------------------------- the worker's end
    def serve_tls(self, *, host: str, port: int, backend: tuple[str, int], ctx: ssl.SSLContext, head: Identity) -> None:
        """Listen for TLS on host:port; relay each connection that presents `head`'s certificate
        to `backend` (the C server on loopback). Raises DataPlaneError if it cannot listen."""
        try:
            self.call(self._serve_tls(host, port, backend, ctx, head))
        except OSError as exc:
            raise DataPlaneError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    async def _serve_tls(self, host: str, port: int, backend: tuple[str, int], ctx: ssl.SSLContext, head: Identity) -> None:
        loop = asyncio.get_running_loop()

        def on_close() -> None:
            self.stats.open -= 1

        def factory() -> asyncio.Protocol:
            front = _Half(on_close)
            real_made = front.connection_made

            def made(transport: asyncio.BaseTransport) -> None:
                real_made(transport)
                self.stats.open += 1
                if not _peer_is(transport, head):  # OpenSSL verified it already; belt and braces
                    self.stats.refused += 1
                    log.warning("dataplane_peer_refused", reason="certificate is not the head's")
                    front.close()
                    return
                self.stats.accepted += 1
                loop.create_task(self._connect_backend(front, backend))

            front.connection_made = made  # type: ignore[method-assign]
            return front

        server = await loop.create_server(
            factory, host, port, ssl=ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S, reuse_address=True, backlog=16
        )
        loop.set_exception_handler(self._quiet_handshake_errors)
        log.info("dataplane_listening", endpoint=f"{host}:{port}", backend=f"{backend[0]}:{backend[1]}",
                 sockets=len(server.sockets))

    async def _connect_backend(self, front: _Half, backend: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, back = await loop.create_connection(_Half, *backend)
        except OSError as exc:
            log.warning("dataplane_backend_unreachable", backend=f"{backend[0]}:{backend[1]}", error=str(exc))
            front.close()
            return
        if front.transport is None:  # the head went away meanwhile
            back.close()
            return
        self.stats.relayed += 1
        front.join(back)

    def _quiet_handshake_errors(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A failed handshake (a peer without the key, a port probe) is counted, not a stack trace."""
        exc = context.get("exception")
        if isinstance(exc, (ssl.SSLError, ConnectionError, asyncio.TimeoutError, TimeoutError, OSError)):
            self.stats.refused += 1
            log.debug("dataplane_handshake_failed", error=str(exc)[:200])
            return
        loop.default_exception_handler(context)

    # ------------------------------------------------------------- the head's end
    def serve_plain(self, *, target: tuple[str, int], ctx: ssl.SSLContext, node: Identity) -> int:
        """A listener on 127.0.0.1 (a free port, returned) whose connections are relayed over TLS
        to `target`, which must present `node`'s certificate."""
        port: int = self.call(self._serve_plain(target, ctx, node))
        return port

    async def _serve_plain(self, target: tuple[str, int], ctx: ssl.SSLContext, node: Identity) -> int:
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.Protocol:
            front = _Half()
            real_made = front.connection_made

            def made(transport: asyncio.BaseTransport) -> None:
                real_made(transport)
                loop.create_task(self._connect_tls(front, target, ctx, node))

            front.connection_made = made  # type: ignore[method-assign]
            return front

        server = await loop.create_server(factory, "127.0.0.1", 0, backlog=16)
        return int(server.sockets[0].getsockname()[1])

    async def _connect_tls(self, front: _Half, target: tuple[str, int], ctx: ssl.SSLContext, node: Identity) -> None:
        loop = asyncio.get_running_loop()
        where = f"{target[0]}:{target[1]}"
        try:
            transport, back = await loop.create_connection(
                _Half, target[0], target[1], ssl=ctx, server_hostname=None, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            self.stats.refused += 1
            log.error("dataplane_connect_failed", node=node.name, endpoint=where, error=str(exc)[:200])
            front.close()
            return
        if not _peer_is(transport, node):
            self.stats.refused += 1
            log.error("dataplane_peer_refused", node=node.name, endpoint=where, reason="certificate is not the node's")
            transport.close()
            front.close()
            return
        if front.transport is None:  # ggml gave up meanwhile
            transport.close()
            return
        self.stats.accepted += 1
        self.stats.relayed += 1
        front.join(back)


def loopback_backend_port(pid: int | None = None) -> int | None:
    """The TCP port this process listens on at 127.0.0.1 other than the data plane's (the C
    server's, bound to port 0 so no other process can take it first), or None yet."""
    import psutil

    try:
        conns = psutil.Process(pid or os.getpid()).net_connections("tcp")
    except psutil.Error:
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.ip == "127.0.0.1":
            return int(c.laddr.port)
    return None


def set_nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


# ----------------------------------------------------------------------- the engine's tunnels
@dataclass(frozen=True, kw_only=True)
class TunnelSpec:
    """What the head tells its engine: which plan endpoints are TLS, and whose certificate each
    must present. Public material only; the head's secret key is read from its own file."""

    head_key_file: str
    peers: dict[str, Identity]
    """endpoint ("host:port") -> the node's public identity, pinned."""

    def to_json(self) -> str:
        import json

        from appliance.common.keys import render

        return json.dumps({"head_key_file": self.head_key_file,
                           "peers": {ep: render(i, what="pinned node identity") for ep, i in self.peers.items()}})

    @staticmethod
    def from_json(text: str) -> TunnelSpec:
        import json

        from appliance.common.keys import read_public_text

        data = json.loads(text)
        return TunnelSpec(head_key_file=str(data["head_key_file"]),
                          peers={str(ep): read_public_text(t, where=f"tunnel {ep}") for ep, t in data["peers"].items()})


def open_tunnels(spec: TunnelSpec, endpoints: list[str]) -> list[str]:
    """The endpoints ggml should register: each TLS one replaced by a local relay into it."""
    from appliance.common.keys import read_secret
    from appliance.common.netprobe import split_endpoint
    from pathlib import Path

    if not any(ep in spec.peers for ep in endpoints):
        return list(endpoints)
    me = read_secret(Path(spec.head_key_file))
    relay = Relay(name="engine")
    out = []
    for ep in endpoints:
        node = spec.peers.get(ep)
        if node is None:
            out.append(ep)
            continue
        port = relay.serve_plain(target=split_endpoint(ep), ctx=client_context(me=me, node=node), node=node)
        log.info("dataplane_tunnel", node=node.name, endpoint=ep, local=f"127.0.0.1:{port}")
        out.append(f"127.0.0.1:{port}")
    return out
