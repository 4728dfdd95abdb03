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
    """A worker's tensor-cache report, keeping only well-typed, bounded fields."""
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


def _device(d: Any) -> dict[str, Any] | None:
    """A device as the worker reported it, keeping only well-typed fields."""
    if not isinstance(d, dict):
        return None
    return {
        "index": _count(d.get("index")) or 0,
        "name": str(d.get("name", ""))[:64],
        "description": str(d.get("description", ""))[:128],
        "type": str(d.get("type", "unknown"))[:16],
        "free_bytes": _count(d.get("free_bytes")) or 0,
        "total_bytes": _count(d.get("total_bytes")) or 0,
    }


class Refusal(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _req(body: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    v = body.get(key)
    if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
        raise Refusal(f"HELLO field {key!r} missing or not {getattr(typ, '__name__', typ)}")
    return v


class Membership:
    MEMORY_HISTORY_LEN = 120

    def __init__(
        self, *, timing: HeartbeatTiming, rpc_protocol: str, package_version: str, control_protocol: int = 1
    ) -> None:
        self.timing = timing
        self.control_protocol = control_protocol
        self.rpc_protocol = rpc_protocol
        self.package_version = package_version
        self.nodes: dict[str, Node] = {}
        self.refused: dict[str, Node] = {}
        self.by_identity: dict[bytes, str] = {}

    # ------------------------------------------------------------- messages
    def hello(self, *, identity: bytes, body: dict[str, Any], peer_address: str, now: float) -> tuple[Node, list[Event]]:
        """Accept or refuse an announcement. Raises `Refusal` with the reason."""
        name = str(body.get("name") or "")[:64] or "?"
        try:
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
            address = str(body.get("rpc_host") or peer_address or "")
            advertise = body.get("rpc_advertise")
            if isinstance(advertise, str) and advertise:
                host, sep, port_s = advertise.rpartition(":")
                if not sep or not port_s.isdigit() or not host or not 0 < int(port_s) < 65536:
                    raise Refusal(f"bad rpc_advertise {advertise!r} (want HOST:PORT)")
                address, rpc_port = host.strip("[]"), int(port_s)
            if not address:
                raise Refusal("no address to reach the node's RPC server")
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
            if rejoin:
                node.state, node.state_since, node.joined_at = NodeState.JOINING, now, now
                node.wall_joined_at = time.time()
                node.rpc_ready = bool(body.get("rpc_ready"))
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
                rpc_ready=bool(body.get("rpc_ready")),
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
        self._update_resources(node, body, now)
        node.last_seen = now
        self.by_identity[identity] = name
        return node, events

    def _update_resources(self, node: Node, body: dict[str, Any], now: float) -> None:
        devs = body.get("devices")
        if isinstance(devs, list):
            node.devices = [d for d in (_device(x) for x in devs[:MAX_DEVICES]) if d is not None]
        mem = body.get("memory")
        if isinstance(mem, dict):
            for attr, key in (("memory_total", "total"), ("memory_free", "free"), ("plannable_bytes", "plannable")):
                v = _count(mem.get(key))
                if v is not None:
                    setattr(node, attr, v)
            node.memory_history.append((time.time(), node.memory_free))
            del node.memory_history[: -self.MEMORY_HISTORY_LEN]
        speed = body.get("speed")
        if _finite(speed) and speed > 0:
            node.speed = float(speed)
        load = body.get("load")
        if isinstance(load, dict):
            node.load = {k: float(v) for k in LOAD_FIELDS if _finite(v := load.get(k)) and v >= 0}
            if "rpc_busy" in node.load:
                node.load["rpc_busy"] = min(node.load["rpc_busy"], 1.0)  # a fraction, whatever was sent
        cache = body.get("cache")
        if isinstance(cache, dict):
            node.cache = _cache_report(cache)

    def heartbeat(self, *, identity: bytes, body: dict[str, Any], now: float) -> tuple[Node | None, list[Event]]:
        name = self.by_identity.get(identity)
        node = self.nodes.get(name) if name else None
        if node is None:
            return None, []
        events: list[Event] = []
        node.last_seen = now
        self._update_resources(node, body, now)
        rpc_ready = body.get("rpc_ready")
        if isinstance(rpc_ready, bool) and rpc_ready != node.rpc_ready:
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

    def identities(self) -> list[bytes]:
        return [
            n.identity
            for n in self.nodes.values()
            if n.state in (NodeState.JOINING, NodeState.ALIVE, NodeState.SUSPECT)
        ]
