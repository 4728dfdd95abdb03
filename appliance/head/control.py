"""The head's control-plane endpoint: a CurveZMQ ROUTER that workers' DEALERs connect to.

It authenticates nodes (ZAP: only keys on the allow-list may connect, and each connection
is bound to the node its key names: a node may only speak as itself), decodes protocol
frames (anything malformed, any value no box sends, a flood past CONTROL_MESSAGES_PER_S,
or a message from a key revoked since it connected is dropped, counted, and reported as a
rate-limited `bad_frame` event), feeds the membership state machine, and sends heartbeats
to every live node so workers can tell a dead head from a quiet one. Heartbeats from an
identity it does not know (e.g. after a head restart) get REANNOUNCE, and the worker says
HELLO again. Nothing a peer sends stops the receive loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from appliance.common import logs, protocol
from appliance.common.config import HeartbeatTiming, RecoveryTiming
from appliance.common.kinds import EventKind
from appliance.common.keys import HeadKeys
from appliance.core.membership import BadValue, Event, Membership, Refusal
from appliance.head.keyring import KeyRing

log = logs.get("head.control")

MAX_FETCHES_IN_FLIGHT = 32  # across all workers; each asks for a few pieces at a time


class _Auth(AsyncioAuthenticator):
    """ZAP handler: a key on the allow-list is let in as its node's name (the connection's
    User-Id); any other key is refused and reported to the head's event log."""

    def __init__(self, ctx: zmq.asyncio.Context, keyring: KeyRing, on_refuse: Callable[[str, str], None]) -> None:
        super().__init__(ctx)
        self.keyring = keyring
        self.on_refuse = on_refuse
        self._address = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:  # type: ignore[override]
        z85 = zmq.utils.z85.encode(client_key)
        if self.keyring.name_of(z85) is not None:
            return True, b"OK"
        self.on_refuse(self._address, z85.decode()[:8])
        return False, b"Unknown key"

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.keyring.name_of(zmq.utils.z85.encode(client_public_key)) or ""


class _Bucket:
    """A token bucket per sender: `CONTROL_MESSAGES_PER_S` sustained, `CONTROL_BURST_MESSAGES` at once."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate, self.burst = rate_per_s, float(burst)
        self.tokens: dict[bytes, tuple[float, float]] = {}

    def allow(self, who: bytes, now: float) -> bool:
        tokens, last = self.tokens.get(who, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self.tokens) > 4096:  # senders come and go (reconnects): forget the idle ones
            self.tokens = {k: v for k, v in self.tokens.items() if now - v[1] < 60}
            if len(self.tokens) > 4096:  # a storm of fresh identities (only without keys): start over
                self.tokens.clear()
        if tokens < 1.0:
            self.tokens[who] = (tokens, now)
            return False
        self.tokens[who] = (tokens - 1.0, now)
        return True


class ControlServer:
    def __init__(
        self,
        *,
        bind: str,
        keys: HeadKeys | None,
        keyring: KeyRing | None = None,
        membership: Membership,
        heartbeat: HeartbeatTiming,
        recovery: RecoveryTiming,
        on_events: Callable[[list[Event]], None],
        on_bad_frame: Callable[[str], None],
        on_disconnect: Callable[[], None] | None = None,
        on_fetch: Callable[[str, dict[str, Any]], Awaitable[tuple[dict[str, Any], bytes] | None]] | None = None,
    ) -> None:
        self.bind = bind
        self.keys = keys
        self.keyring = keyring
        self.membership = membership
        self.hb = heartbeat
        self.t = recovery
        self.on_events = on_events
        self.on_bad_frame = on_bad_frame
        self.on_disconnect = on_disconnect
        self.on_fetch = on_fetch
        self._fetches: set[asyncio.Task[None]] = set()
        self.ctx = zmq.asyncio.Context.instance()
        self.auth: _Auth | None = None
        self.sock: zmq.asyncio.Socket | None = None
        self._last_bad_log = 0.0
        self._bad_since_report = 0
        self.bad_frames = 0
        self._bucket = _Bucket(recovery.CONTROL_MESSAGES_PER_S, recovery.CONTROL_BURST_MESSAGES)
        # FETCH (pre-staging's bulk requests) draws on its own bucket: a worker staging at its
        # rate sends more of them per second than any control message, and they must neither
        # starve its heartbeats nor be taken for a flood (and a flood of them is still bounded).
        self._fetch_bucket = _Bucket(recovery.STAGING_SERVE_BYTES_PER_S / protocol.MAX_PAYLOAD_BYTES,
                                     recovery.STAGING_BURST_MESSAGES)
        self._refused_at: dict[str, float] = {}

    def start(self) -> None:
        if self.keys is not None:
            assert self.keyring is not None, "a head with keys needs its allow-list"
            self.auth = _Auth(self.ctx, self.keyring, self._refused_key)
            self.auth.start()
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)
        s.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        s.setsockopt(zmq.RCVHWM, 1000)  # a flood queues at most this many messages
        if self.keys is not None:
            s.curve_secretkey = self.keys.secret
            s.curve_publickey = self.keys.public
            s.curve_server = True
        s.bind(self.bind)
        self.sock = s
        log.info("control_listening", bind=self.bind, curve=self.keys is not None)

    async def monitor_loop(self) -> None:
        """Watch the control socket's connections.

        A dropped connection (a worker process died: its kernel closed the TCP connection)
        calls `on_disconnect`, so the head checks its workers' RPC ports at once instead of
        waiting for heartbeats to go silent. Failed CurveZMQ handshakes (a node holding
        another cluster's keys) become `refused` events.
        """
        assert self.sock is not None
        from zmq.utils.monitor import parse_monitor_message

        mask = zmq.EVENT_DISCONNECTED
        if self.keys is not None:
            mask |= zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        mon = self.sock.get_monitor_socket(mask)
        last: dict[str, float] = {}
        try:
            while True:
                try:
                    ev = parse_monitor_message(await mon.recv_multipart())
                except (ValueError, KeyError, IndexError) as exc:
                    log.warning("monitor_message_dropped", error=str(exc))
                    continue
                log.debug("control_monitor_event", kind=int(ev["event"]))
                if ev["event"] == zmq.EVENT_DISCONNECTED:
                    if self.on_disconnect is not None:
                        self.on_disconnect()
                    continue
                if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    continue  # the ZAP handler already reported it, with the key
                where = ev.get("endpoint", b"")
                where = where.decode(errors="replace") if isinstance(where, bytes) else str(where)
                now = time.monotonic()
                if now - last.get(where, -1e9) < self.t.REFUSED_EVENT_INTERVAL_S:
                    continue  # a refused node retries; one event per interval is enough
                last[where] = now
                self.on_events(
                    [Event(EventKind.REFUSED, "", f"a connection on {where} was refused: CURVE handshake failed "
                                         "(a node with another cluster's keys?)")]
                )
        except (zmq.ZMQError, asyncio.CancelledError):
            pass
        finally:
            mon.close(linger=0)

    def _refused_key(self, address: str, key_prefix: str) -> None:
        """One `refused` event per address per REFUSED_EVENT_INTERVAL_S: a peer retrying (or
        flooding) with unknown keys must not fill the event log."""
        now = time.monotonic()
        where = address or "?"
        if now - self._refused_at.get(where, -1e9) < self.t.REFUSED_EVENT_INTERVAL_S:
            return
        if len(self._refused_at) > 1024:
            self._refused_at = {a: t for a, t in self._refused_at.items() if now - t < self.t.REFUSED_EVENT_INTERVAL_S}
        self._refused_at[where] = now
        self.on_events([Event(EventKind.REFUSED, "", f"connection from {where} refused: unknown cluster key {key_prefix}…")])

    def _bad(self, why: str, ident: bytes) -> None:
        """Count a dropped frame; log it and make a `bad_frame` event at most once per
        BAD_FRAME_LOG_INTERVAL_S (garbage must not flood the log or the event ring)."""
        self.bad_frames += 1
        self._bad_since_report += 1
        self.on_bad_frame(why)
        now = time.monotonic()
        if now - self._last_bad_log > self.t.BAD_FRAME_LOG_INTERVAL_S:
            self._last_bad_log = now
            n, self._bad_since_report = self._bad_since_report, 0
            log.warning("bad_frame_dropped", peer=ident[:16].hex(), reason=why, count=n)
            self.on_events([Event(EventKind.BAD_FRAME, "", f"dropped {n} malformed control frame(s); last: {why[:200]}")])

    async def send(
        self, identity: bytes, msg_type: bytes, body: dict[str, Any] | None = None, *, payload: bytes | None = None
    ) -> None:
        assert self.sock is not None
        try:
            await self.sock.send_multipart([identity, *protocol.encode(msg_type, body, payload=payload)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("send_failed", error=str(exc))

    async def recv_loop(self) -> None:
        assert self.sock is not None
        while True:
            try:
                frames = await self.sock.recv_multipart(copy=False)
            except zmq.ZMQError:
                return
            except asyncio.CancelledError:
                raise
            if len(frames) < 2:
                continue
            ident = frames[0].bytes
            try:
                peer = frames[1].get("Peer-Address") or ""
                user = frames[1].get("User-Id") if self.keys is not None else ""
            except (zmq.ZMQError, Exception):  # noqa: BLE001 - metadata is best effort
                peer, user = "", ""
            sender = user.encode() if user else ident
            if len(frames) >= 3 and frames[2].bytes == protocol.FETCH:
                if not self._fetch_bucket.allow(sender, time.monotonic()):
                    self._bad(f"flood: more than {self.t.STAGING_SERVE_BYTES_PER_S / 2**20:g} MiB/s of staging "
                              f"requests from {user or 'one peer'}", ident)
                    continue
            elif not self._bucket.allow(sender, time.monotonic()):
                self._bad(f"flood: more than {self.t.CONTROL_MESSAGES_PER_S:g} messages/s from {user or 'one peer'}", ident)
                continue
            if self.keys is not None and (not user or self.keyring is None or user not in self.keyring.nodes):
                self._bad(f"message from a key no longer on the allow-list ({user or '?'})", ident)
                continue
            try:
                msg = protocol.decode([f.bytes for f in frames[1:]], allowed=protocol.WORKER_TYPES)
            except protocol.BadFrame as exc:
                self._bad(str(exc), ident)
                if exc.version_mismatch:
                    await self.send(ident, protocol.REFUSE, {"reason": str(exc)})
                continue
            try:
                await self._handle(ident, peer, user or None, msg)
            except BadValue as exc:
                self._bad(f"{user or 'a node'}: {exc.reason}", ident)
            except Exception as exc:  # noqa: BLE001 - one bad message never stops the head
                self._bad(f"handler error: {exc}", ident)

    async def _handle(self, ident: bytes, peer: str, key_name: str | None, msg: protocol.Message) -> None:
        now = time.monotonic()
        m = self.membership
        if msg.type == protocol.HELLO:
            try:
                node, events = m.hello(identity=ident, body=msg.body, peer_address=peer, now=now, key_name=key_name)
            except Refusal as r:
                name = key_name or str(msg.body.get("name", "?"))[:64]
                if isinstance(r, BadValue):
                    self._bad(f"{name}: {r.reason}", ident)
                self.on_events([Event(EventKind.REFUSED, name, f"{name} refused: {r.reason}")])
                await self.send(ident, protocol.REFUSE, {"reason": r.reason})
                return
            self.on_events(events)
            await self.send(
                ident,
                protocol.WELCOME,
                {
                    "name": node.name,
                    "rpc_host": node.address,
                    "rpc_port": node.rpc_port,
                    "data_plane": node.data_plane,
                    "heartbeat_interval_s": self.hb.HEARTBEAT_INTERVAL_S,
                },
            )
        elif msg.type == protocol.HEARTBEAT:
            node, events = m.heartbeat(identity=ident, body=msg.body, now=now)
            if node is None:
                await self.send(ident, protocol.REANNOUNCE, {"reason": "unknown node"})
                return
            self.on_events(events)
        elif msg.type == protocol.RPC_READY:
            node = m.rpc_ready(identity=ident, now=now)
            if node is None:
                await self.send(ident, protocol.REANNOUNCE, {"reason": "unknown node"})
        elif msg.type == protocol.BYE:
            self.on_events(m.bye(identity=ident, now=now))
        elif msg.type == protocol.FETCH:
            name = m.by_identity.get(ident)
            if name is None or self.on_fetch is None:
                self._bad("FETCH from a node that is not a member", ident)
            elif len(self._fetches) >= MAX_FETCHES_IN_FLIGHT:
                self._bad("too many FETCH requests in flight", ident)
            else:  # read the model file off the receive loop; the worker paces its requests
                task = asyncio.create_task(self._serve_fetch(ident, name, msg.body))
                self._fetches.add(task)
                task.add_done_callback(self._fetches.discard)

    async def _serve_fetch(self, ident: bytes, name: str, body: dict[str, Any]) -> None:
        assert self.on_fetch is not None
        try:
            answer = await self.on_fetch(name, body)
        except OSError as exc:
            log.warning("fetch_failed", node=name, error=str(exc))
            return
        if answer is None:
            self._bad(f"FETCH of a tensor {name} is not to stage: {str(body)[:100]}", ident)
            return
        head, payload = answer
        await self.send(ident, protocol.CHUNK, head, payload=payload)

    async def heartbeat_loop(self) -> None:
        while True:
            for ident in self.membership.identities():
                await self.send(ident, protocol.HEARTBEAT, {})
            await asyncio.sleep(self.hb.HEARTBEAT_INTERVAL_S)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
