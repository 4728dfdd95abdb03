"""Cluster membership and the failure detector, driven by control-plane messages and time.

The head keeps no durable state: everything here is rebuilt from the workers'
announcements (HELLO) after a head restart. Every method takes `now` (monotonic
seconds) so the state machine is tested without sleeping.

Liveness states (per node):

    HELLO accepted          rpc ready + settled          no heartbeat for SUSPECT_AFTER_S
  ----------------> JOINING -----------------> ALIVE -------------------------------> SUSPECT
                       ^                        ^  <------------- heartbeat -------------  |
                       |                        |                                          | no heartbeat for
                       +------ HELLO / heartbeat from a dead node (rejoin) ---- DEAD <-----+ DEAD_AFTER_S
  BYE -> LEFT.   REFUSED: wrong versions or name clash (never planned).

Administrative overlay: `cordoned` (set by drain, cleared by uncordon) keeps a live
node out of the plan; the API shows it as "draining" while the loaded plan still uses
it and "cordoned" after.

A node that dies repeatedly (flaps) must stay alive longer before it is planned
again: the settle time doubles per death in the last FLAP_WINDOW_S.

Every value here came from the network and may be hostile, even from a node holding a valid
key (a stolen box): names must match the key that authenticated the connection, the RPC
endpoint the head dials is the address the control connection comes from (unless the
head's own configuration gives that node another), and memory, speed and device figures
must be ones a real box can have. A message that breaks these rules changes nothing: a
HELLO is refused with the reason, a heartbeat raises `BadValue` (the control server drops it
and counts it as a bad frame).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from appliance.common.config import HeartbeatTiming
from appliance.common.kinds import EventKind
from appliance.common.kinds import Liveness as NodeState


@dataclass(frozen=True)
class Event:
    kind: EventKind
    node: str
    message: str


MAX_NODE_MEMORY_BYTES = 1 << 46
"""64 TiB: more memory (RAM or one device's) than any box has; a larger claim is a lie that
would draw every layer, and every activation, to the node that makes it."""
MAX_SPEED_GFLOPS = 1e7
"""10 PFLOP/s: above any single device today; the speed weight is measured, not chosen."""
MAX_LOAD_VALUE = 1e15
"""Load figures are shown, not planned on; anything above this is not a measurement."""
MAX_REFUSED = 256
"""Refused announcements kept for display (oldest forgotten first)."""
DATA_PLANES = ("tls", "plain")
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")


@dataclass
class Node:
    name: str
    node_id: str
    identity: bytes
    hostname: str
    address: str
    rpc_port: int
    state: NodeState
    state_since: float
    last_seen: float
    joined_at: float
    wall_joined_at: float
    versions: dict[str, str] = field(default_factory=dict)
    devices: list[dict[str, Any]] = field(default_factory=list)
    memory_total: int = 0
    memory_free: int = 0
    plannable_bytes: int = 0
    speed: float = 1.0
    rpc_ready: bool = False
    rpc_down_since: float | None = None  # when a live node's RPC server stopped answering
    rpc_refused: bool = False  # the head's own probe found nothing listening on the RPC port
    stalled_engine: bool = False  # silent while the engine stalled on it; cleared when it answers
    cordoned: bool = False
    load: dict[str, Any] = field(default_factory=dict)
    deaths: list[float] = field(default_factory=list)
    reason: str = ""
    memory_history: list[tuple[float, int]] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)  # its tensor cache, as last reported
    data_plane: str = "plain"
    """How the head reaches its RPC server: "tls" (the authenticated, encrypted channel) or
    "plain" TCP (only on loopback, or in a cluster without keys)."""

    @property
    def rpc_endpoint(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.rpc_port}"


MAX_DEVICES = 16
LOAD_FIELDS = (
    "cpu_percent", "ram_percent", "loadavg_1m", "rpc_rss_bytes", "rpc_read_bytes", "rpc_busy", "gpu_mem_percent"
)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v: Any) -> int | None:
    """A non-negative integer (bytes, an index) from the wire, or None."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


_HASH = re.compile(r"^[0-9a-f]{16}$")
MAX_MISSING_SHOWN = 256


def _cache_report(c: dict[str, Any]) -> dict[str, Any]:
    """A worker's tensor-cache report, keeping only well-typed, bounded fields (shown, not planned on)."""
    missing = c.get("missing")
    return {
        "used_bytes": _count(c.get("used_bytes")) or 0,
        "quota_bytes": _count(c.get("quota_bytes")) or 0,
        "version": _count(c.get("version")) or 0,
        "missing": [h for h in missing[:MAX_MISSING_SHOWN] if isinstance(h, str) and _HASH.match(h)]
        if isinstance(missing, list) else [],
        "missing_count": _count(c.get("missing_count")) or 0,
        "missing_bytes": _count(c.get("missing_bytes")) or 0,
        "blocked": str(c.get("blocked") or "")[:200],
    }


class Refusal(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadValue(Refusal):
    """A field no real box sends: the wrong type, or a figure beyond what a box can have.
    A HELLO carrying one is refused; a heartbeat carrying one is dropped whole."""


def _bytes(v: Any, what: str) -> int:
    n = _count(v)
    if n is None:
        raise BadValue(f"{what} is not a byte count")
    if n > MAX_NODE_MEMORY_BYTES:
        raise BadValue(f"{what} = {n} bytes is more than any box has (at most {MAX_NODE_MEMORY_BYTES})")
    return n


def _device(d: Any) -> dict[str, Any]:
    """A device as the worker reported it, checked."""
    if not isinstance(d, dict):
        raise BadValue("a device is not an object")
    index = d.get("index", 0)
    if _count(index) is None or index >= MAX_DEVICES * 16:
        raise BadValue("device index is not a small count")
    for key in ("name", "description", "type"):
        if not isinstance(d.get(key, ""), str):
            raise BadValue(f"device {key} is not text")
    return {
        "index": index,
        "name": d.get("name", "")[:64],
        "description": d.get("description", "")[:128],
        "type": d.get("type", "unknown")[:16],
        "free_bytes": _bytes(d.get("free_bytes", 0), "device free_bytes"),
        "total_bytes": _bytes(d.get("total_bytes", 0), "device total_bytes"),
    }


@dataclass(frozen=True)
class Resources:
    """The resource fields of a HELLO or heartbeat, checked; None where the message had none."""

    devices: list[dict[str, Any]] | None
    memory: dict[str, int] | None
    speed: float | None
    load: dict[str, float] | None
    rpc_ready: bool | None
    cache: dict[str, Any] | None = None


def parse_resources(body: dict[str, Any]) -> Resources:
    """Check what a node says about itself; `BadValue` for anything a real box cannot send."""
    devs = body.get("devices")
    devices = None
    if devs is not None:
        if not isinstance(devs, list) or len(devs) > MAX_DEVICES:
            raise BadValue(f"devices is not a list of at most {MAX_DEVICES}")
        devices = [_device(x) for x in devs]
    mem = body.get("memory")
    memory = None
    if mem is not None:
        if not isinstance(mem, dict):
            raise BadValue("memory is not an object")
        memory = {k: _bytes(mem[k], f"memory.{k}") for k in ("total", "free", "plannable") if k in mem}
        total = memory.get("total")
        if total is not None:
            # A box cannot offer more than it has (what it offers is free memory plus what its
            # own RPC server already holds): cap, so a rounding quirk never drops a heartbeat.
            for k in ("free", "plannable"):
                if k in memory:
                    memory[k] = min(memory[k], total)
    speed = body.get("speed")
    if speed is not None:
        if not _finite(speed) or not 0 < speed <= MAX_SPEED_GFLOPS:
            raise BadValue(f"speed {str(speed)[:32]} is not a finite measurement in (0, {MAX_SPEED_GFLOPS:g}]")
        speed = float(speed)
    raw_load = body.get("load")
    load = None
    if raw_load is not None:
        if not isinstance(raw_load, dict):
            raise BadValue("load is not an object")
        load = {k: float(v) for k in LOAD_FIELDS if _finite(v := raw_load.get(k)) and 0 <= v <= MAX_LOAD_VALUE}
        if "rpc_busy" in load:
            load["rpc_busy"] = min(load["rpc_busy"], 1.0)  # a fraction, whatever was sent
    ready = body.get("rpc_ready")
    if ready is not None and not isinstance(ready, bool):
        raise BadValue("rpc_ready is not true or false")
    cache = body.get("cache")
    return Resources(devices=devices, memory=memory, speed=speed, load=load, rpc_ready=ready,
                     cache=_cache_report(cache) if isinstance(cache, dict) else None)


def normalize_address(address: str) -> str:
    """The peer address as the head dials it (an IPv4-mapped IPv6 address as IPv4)."""
    a = address.strip().strip("[]")
    return a[7:] if a.lower().startswith("::ffff:") and "." in a else a


def _req(body: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    v = body.get(key)
    if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
        raise Refusal(f"HELLO field {key!r} missing or not {getattr(typ, '__name__', typ)}")
    return v


class Membership:
    MEMORY_HISTORY_LEN = 120

    def __init__(
        self,
        *,
        timing: HeartbeatTiming,
        rpc_protocol: str,
        package_version: str,
        control_protocol: int = 1,
        rpc_endpoints: dict[str, tuple[str, int]] | None = None,
        secure: bool = False,
    ) -> None:
        """`rpc_endpoints`: the head's own configuration of where to dial a node that is not
        reached at its control connection's address (NAT, port forward); no other node may
        advertise an endpoint. `secure`: the cluster has keys, so the data plane must be TLS
        for every node not on the head's own loopback."""
        self.rpc_endpoints = dict(rpc_endpoints or {})
        self.secure = secure
        self.timing = timing
        self.control_protocol = control_protocol
        self.rpc_protocol = rpc_protocol
        self.package_version = package_version
        self.nodes: dict[str, Node] = {}
        self.refused: dict[str, Node] = {}
        self.by_identity: dict[bytes, str] = {}

    # ------------------------------------------------------------- messages
    def hello(
        self, *, identity: bytes, body: dict[str, Any], peer_address: str, now: float, key_name: str | None = None
    ) -> tuple[Node, list[Event]]:
        """Accept or refuse an announcement. Raises `Refusal` with the reason.

        `peer_address`: where the control connection comes from (the RPC endpoint's host
        unless the head's configuration says otherwise). `key_name`: the node the connection's
        key belongs to (None in a cluster without keys); a node may only announce itself."""
        name = str(body.get("name") or "")[:64] or "?"
        if key_name is not None and name != key_name:
            name = key_name  # a refusal is recorded under the key's name, not the claim
        try:
            claimed = body.get("name")
            if key_name is not None and claimed != key_name:
                raise Refusal(f"the key of node {key_name!r} cannot announce a node named {str(claimed)[:64]!r}")
            name = _req(body, "name", str)[:64]
            if not name or any(c.isspace() for c in name):
                raise Refusal("node name must be a non-empty word")
            node_id = _req(body, "node_id", str)[:64]
            proto = _req(body, "protocol", int)
            rpc_proto = _req(body, "rpc_protocol", str)
            version = _req(body, "version", str)
            rpc_port = _req(body, "rpc_port", int)
            if not 0 < rpc_port < 65536:
                raise Refusal(f"bad rpc_port {rpc_port}")
            if proto != self.control_protocol:
                raise Refusal(f"control protocol {proto} != head's {self.control_protocol} (upgrade the node)")
            if rpc_proto != self.rpc_protocol:
                raise Refusal(
                    f"ggml RPC protocol {rpc_proto} != head's {self.rpc_protocol} "
                    f"(install the same llama-cpp-python on every node)"
                )
            resources = parse_resources(body)
            data_plane = body.get("data_plane", "plain")
            if data_plane not in DATA_PLANES:
                raise BadValue(f"data_plane {str(data_plane)[:16]!r} is not one of {', '.join(DATA_PLANES)}")
            address = normalize_address(peer_address or "")
            advertise = body.get("rpc_advertise")
            configured = self.rpc_endpoints.get(name)
            if configured is not None:
                address, rpc_port = configured  # the head's configuration decides, not the node
            elif advertise:
                raise Refusal(
                    f"advertises RPC endpoint {str(advertise)[:64]!r}, but the head dials a node at the address its "
                    f"control connection comes from ({address or '?'}) unless its own configuration names another "
                    f"(anyway head --node-rpc {name}=HOST:PORT)"
                )
            if not address:
                raise Refusal("no address to reach the node's RPC server")
            if self.secure and data_plane != "tls" and address not in LOOPBACK_ADDRESSES:
                raise Refusal(
                    f"offers a plain-TCP RPC server at {address}; off the head's own machine the data plane must be "
                    "TLS (start the worker with its keys, without --data-plane plain)"
                )
            existing = self.nodes.get(name)
            if (
                existing is not None
                and existing.node_id != node_id
                and existing.state in (NodeState.ALIVE, NodeState.JOINING, NodeState.SUSPECT)
                and existing.address != address
            ):
                raise Refusal(f"name {name!r} is already used by a live node at {existing.address}")
        except Refusal as r:
            self.refused[name] = Node(
                name=name,
                node_id=str(body.get("node_id", ""))[:64],
                identity=identity,
                hostname=str(body.get("hostname", ""))[:128],
                address=peer_address,
                rpc_port=0,
                state=NodeState.REFUSED,
                state_since=now,
                last_seen=now,
                joined_at=now,
                wall_joined_at=time.time(),
                versions={
                    "package": str(body.get("version", "?"))[:32],
                    "rpc_protocol": str(body.get("rpc_protocol", "?"))[:32],
                    "protocol": str(body.get("protocol", "?"))[:8],
                },
                reason=r.reason,
            )
            while len(self.refused) > MAX_REFUSED:  # a cluster without keys: anyone can try names
                del self.refused[min(self.refused, key=lambda k: self.refused[k].state_since)]
            raise
        self.refused.pop(name, None)
        events: list[Event] = []
        if existing is not None:
            self.by_identity.pop(existing.identity, None)
            rejoin = existing.node_id != node_id or existing.state in (NodeState.DEAD, NodeState.LEFT)
            kind = EventKind.REJOIN if rejoin else EventKind.REANNOUNCE
            if existing.state in (NodeState.ALIVE, NodeState.SUSPECT) and existing.node_id != node_id:
                existing.deaths.append(now)  # restarted before we noticed: it did die
            node = existing
            node.identity, node.node_id, node.address, node.rpc_port = identity, node_id, address, rpc_port
            node.data_plane = data_plane
            if rejoin:
                node.state, node.state_since, node.joined_at = NodeState.JOINING, now, now
                node.wall_joined_at = time.time()
                node.rpc_ready = bool(resources.rpc_ready)
                node.rpc_refused = False  # a new process: the probe before loading decides again
                node.stalled_engine = False
            elif node.state == NodeState.SUSPECT:
                self._set(node, NodeState.ALIVE, now)
            events.append(Event(kind, name, f"{name} {kind.value}ed from {address}" if rejoin else f"{name} re-announced"))
        else:
            node = Node(
                name=name,
                node_id=node_id,
                identity=identity,
                hostname=str(body.get("hostname", ""))[:128],
                address=address,
                rpc_port=rpc_port,
                state=NodeState.JOINING,
                state_since=now,
                last_seen=now,
                joined_at=now,
                wall_joined_at=time.time(),
                rpc_ready=bool(resources.rpc_ready),
                data_plane=data_plane,
            )
            self.nodes[name] = node
            events.append(Event(EventKind.JOIN, name, f"{name} joined from {address}"))
        node.hostname = str(body.get("hostname", node.hostname))[:128]
        node.versions = {
            "package": version[:32],
            "rpc_protocol": rpc_proto[:32],
            "protocol": str(proto),
            "llama_cpp": str(body.get("llama_cpp", ""))[:32],
        }
        if version != self.package_version:
            events.append(Event(EventKind.VERSION_SKEW, name, f"{name} runs anyway {version}, head runs {self.package_version}"))
        if body.get("llamafile") is True:
            node.versions["llamafile"] = "on"
            events.append(Event(EventKind.VERSION_SKEW, name, f"{name}'s llama.cpp is built with llamafile's sgemm: "
                                "an answer resumed after a failure may differ from the fault-free text "
                                "(rebuild with -DGGML_LLAMAFILE=OFF, as the appliance's installers do)"))
        self._update_resources(node, resources)
        node.last_seen = now
        self.by_identity[identity] = name
        return node, events

    def _update_resources(self, node: Node, r: Resources) -> None:
        if r.devices is not None:
            node.devices = r.devices
        if r.memory is not None:
            node.memory_total = r.memory.get("total", node.memory_total)
            node.memory_free = r.memory.get("free", node.memory_free)
            node.plannable_bytes = r.memory.get("plannable", node.plannable_bytes)
            node.memory_history.append((time.time(), node.memory_free))
            del node.memory_history[: -self.MEMORY_HISTORY_LEN]
        if r.speed is not None:
            node.speed = r.speed
        if r.load is not None:
            node.load = r.load
        if r.cache is not None:
            node.cache = r.cache

    def heartbeat(self, *, identity: bytes, body: dict[str, Any], now: float) -> tuple[Node | None, list[Event]]:
        """A node's heartbeat; `BadValue` (and no change at all) if it carries a value no box sends."""
        name = self.by_identity.get(identity)
        node = self.nodes.get(name) if name else None
        if node is None:
            return None, []
        resources = parse_resources(body)
        events: list[Event] = []
        node.last_seen = now
        self._update_resources(node, resources)
        rpc_ready = resources.rpc_ready
        if rpc_ready is not None and rpc_ready != node.rpc_ready:
            node.rpc_ready = rpc_ready
            node.rpc_down_since = None if rpc_ready else now
            if not rpc_ready:
                events.append(Event(EventKind.RPC_DOWN, node.name, f"{node.name}: RPC server is down ({body.get('rpc_state', '?')})"))
            elif node.state in (NodeState.ALIVE, NodeState.SUSPECT):
                events.append(Event(EventKind.RPC_UP, node.name, f"{node.name}: RPC server is back"))
        if node.state == NodeState.SUSPECT:
            self._set(node, NodeState.ALIVE, now)
            node.stalled_engine = False
            events.append(Event(EventKind.RECOVERED, node.name, f"{node.name} is answering again"))
        elif node.state in (NodeState.DEAD, NodeState.LEFT):
            self._set(node, NodeState.JOINING, now)
            node.joined_at = now
            events.append(Event(EventKind.REJOIN, node.name, f"{node.name} came back"))
        return node, events

    def rpc_ready(self, *, identity: bytes, now: float) -> Node | None:
        name = self.by_identity.get(identity)
        node = self.nodes.get(name) if name else None
        if node is not None:
            node.rpc_ready = True
            node.last_seen = now
        return node

    def bye(self, *, identity: bytes, now: float) -> list[Event]:
        name = self.by_identity.pop(identity, None)
        node = self.nodes.get(name) if name else None
        if node is None:
            return []
        self._set(node, NodeState.LEFT, now)
        node.rpc_ready = False
        return [Event(EventKind.LEFT, node.name, f"{node.name} left the cluster")]

    # ----------------------------------------------------------------- time
    def settle_s(self, node: Node, now: float) -> float:
        recent = [t for t in node.deaths if now - t < self.timing.FLAP_WINDOW_S]
        node.deaths = recent
        if not recent:
            return self.timing.JOIN_SETTLE_S
        return min(self.timing.JOIN_SETTLE_S * (2 ** len(recent)), self.timing.FLAP_SETTLE_MAX_S)

    def tick(self, now: float) -> list[Event]:
        t = self.timing
        events: list[Event] = []
        for node in self.nodes.values():
            silent = now - node.last_seen
            if node.state in (NodeState.JOINING, NodeState.ALIVE, NodeState.SUSPECT) and silent > t.DEAD_AFTER_S:
                self._set(node, NodeState.DEAD, now)
                node.rpc_ready = False
                node.deaths.append(now)
                events.append(Event(EventKind.DEAD, node.name, f"{node.name} is dead (silent {silent:.1f}s)"))
            elif node.state == NodeState.ALIVE and silent > t.SUSPECT_AFTER_S:
                self._set(node, NodeState.SUSPECT, now)
                events.append(Event(EventKind.SUSPECT, node.name, f"{node.name} is suspect (silent {silent:.1f}s)"))
            elif (
                node.state == NodeState.JOINING
                and node.rpc_ready
                and silent <= t.SUSPECT_AFTER_S  # a joining node that went quiet is not ready
                and now - node.joined_at >= self.settle_s(node, now)
            ):
                self._set(node, NodeState.ALIVE, now)
                events.append(Event(EventKind.ALIVE, node.name, f"{node.name} is alive and ready for layers"))
        for name, r in list(self.refused.items()):
            if now - r.state_since > t.REFUSED_FORGET_S:
                del self.refused[name]
        return events

    def mark_unreachable(self, name: str, *, now: float, reason: str, refused: bool = False) -> list[Event]:
        """The head could not reach a node's RPC server: suspect it at once.

        `refused` means the connection was actively refused (nothing listens on the port: the
        RPC server process is gone, whatever its agent's heartbeats say). Such a node leaves
        the plan at once instead of after DEAD_AFTER_S; `rpc_reachable` takes it back.
        """
        node = self.nodes.get(name)
        if node is None or node.state not in (NodeState.ALIVE, NodeState.JOINING, NodeState.SUSPECT):
            return []
        first = node.state != NodeState.SUSPECT or node.rpc_refused != refused
        self._set(node, NodeState.SUSPECT, now)
        node.rpc_ready = False
        node.rpc_refused = node.rpc_refused or refused
        node.reason = reason
        return [Event(EventKind.SUSPECT, name, f"{name} is suspect: {reason}")] if first else []

    def blame_stall(self, name: str) -> list[Event]:
        """The engine is stalled and this planned node is silent: it is what the engine waits
        on. It leaves the plan now rather than when declared dead; answering clears this."""
        node = self.nodes.get(name)
        if node is None or node.state != NodeState.SUSPECT or node.stalled_engine:
            return []
        node.stalled_engine = True
        node.reason = "silent while the engine waits on it"
        return [Event(EventKind.STALL, name, f"{name} is silent and the engine is stalled waiting on it: re-planning without it")]

    def rpc_reachable(self, name: str, *, now: float) -> list[Event]:
        """A probe reached the RPC port again after it had been refused."""
        node = self.nodes.get(name)
        if node is None or not node.rpc_refused:
            return []
        node.rpc_refused = False
        node.reason = ""
        return [Event(EventKind.RPC_UP, name, f"{name}: RPC port answers again")]

    def _set(self, node: Node, state: NodeState, now: float) -> None:
        if node.state != state:
            node.state = state
            node.state_since = now
            if state in (NodeState.ALIVE, NodeState.JOINING):
                node.reason = ""

    # ---------------------------------------------------------------- admin
    def cordon(self, name: str) -> bool:
        node = self.nodes.get(name)
        if node is None:
            return False
        node.cordoned = True
        return True

    def uncordon(self, name: str) -> bool:
        node = self.nodes.get(name)
        if node is None:
            return False
        node.cordoned = False
        return True

    def revoke(self, name: str, *, now: float) -> list[Event]:
        """The node's key was taken off the allow-list: it leaves the cluster at once (and the
        plan with it); whatever its connection still sends is ignored (no identity maps to it)."""
        node = self.nodes.pop(name, None)
        if node is None:
            return []
        self.by_identity.pop(node.identity, None)
        node.state, node.state_since, node.rpc_ready = NodeState.REFUSED, now, False
        node.reason = "its key was revoked"
        node.last_seen = now
        self.refused[name] = node
        return [Event(EventKind.REFUSED, name, f"{name} removed from the cluster: its key was revoked")]

    def identities(self) -> list[bytes]:
        return [
            n.identity
            for n in self.nodes.values()
            if n.state in (NodeState.JOINING, NodeState.ALIVE, NodeState.SUSPECT)
        ]
