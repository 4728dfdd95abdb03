"""The head's supervisor: membership, the stabilization loop, the engine and the API.

One asyncio process. The control server feeds membership from worker messages; every
RECONCILE_INTERVAL_S the loop ticks the failure detector, computes the desired plan
(pure: reconciler.desired_state), compares it with the engine's actual state (pure:
reconciler.reconcile) and executes the returned actions. Nothing is persisted: a
restarted head learns the cluster again from the workers' announcements.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import __version__, logs
from .config import HeadConfig
from .control import ControlServer
from .engine_manager import EngineManager
from .events import EventLog
from .keys import HeadKeys
from .membership import Event, Membership, NodeState
from .planner import fmt_bytes
from .profile import ModelProfile, load_profile
from .reconciler import Desired, NodeView, StartEngine, StopEngine, Wait, desired_state, reconcile
from .tokenizer import Tokenizer
from .worker import probe_rpc

log = logs.get("head")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.nodes = Gauge("anyway_nodes", "Nodes by state", ["state"], registry=r)
        self.replans = Counter("anyway_replans_total", "Re-plans (layout changes loaded)", registry=r)
        self.engine_starts = Counter("anyway_engine_starts_total", "Engine process starts", registry=r)
        self.engine_crashes = Counter("anyway_engine_crashes_total", "Engine processes lost unexpectedly", registry=r)
        self.engine_state = Gauge("anyway_engine_state", "1 for the engine's current state", ["state"], registry=r)
        self.recovery = Histogram(
            "anyway_recovery_seconds",
            "From losing a serving engine to serving again",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
            registry=r,
        )
        self.tokens = Counter("anyway_tokens_generated_total", "Tokens sent to clients", registry=r)
        self.prompt_tokens = Counter("anyway_prompt_tokens_total", "Prompt tokens received", registry=r)
        self.requests = Counter("anyway_requests_total", "HTTP API requests", ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("anyway_requests_in_flight", "Generation requests in flight", registry=r)
        self.ttft = Histogram(
            "anyway_time_to_first_token_seconds",
            "Time to first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.bad_frames = Counter("anyway_control_bad_frames_total", "Malformed control messages dropped", registry=r)
        self.resumed = Counter("anyway_requests_resumed_total", "Requests resumed on a new engine", registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class Head:
    def __init__(self, cfg: HeadConfig, *, keys: HeadKeys | None) -> None:
        self.cfg = cfg
        self.keys = keys
        self.timing = cfg.timing
        self.profile: ModelProfile = load_profile(cfg.model_path)
        self.model_id = cfg.model_name or Path(cfg.model_path).stem
        self.run_dir = Path(cfg.run_dir or tempfile.mkdtemp(prefix="anyway-head-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog()
        self.metrics = Metrics()
        from . import ggml

        self.membership = Membership(
            timing=self.timing, rpc_protocol=ggml.rpc_protocol_version(), package_version=__version__
        )
        self.tokenizer = Tokenizer(cfg.model_path)
        self.engine: EngineManager | None = None
        self.control: ControlServer | None = None
        self.desired: Desired = Desired(plan=None, degraded="starting")
        self.status_reason = "starting"
        self._force_replan = False
        self._last_wait = ""
        self._tok_window: deque[tuple[float, int]] = deque()
        self.started_at = time.time()
        self.stop_event = asyncio.Event()
        self._probe_now = asyncio.Event()  # set when a worker may just have died

    # ------------------------------------------------------------ wiring
    def _on_events(self, events: list[Event]) -> None:
        for e in events:
            self.events.add(e.kind, e.message, node=e.node)

    def _on_engine_event(self, kind: str, message: str) -> None:
        self.events.add(kind, message)
        if kind == "engine_start":
            self.metrics.engine_starts.inc()
        elif kind in ("engine_crash", "engine_failed"):
            self.metrics.engine_crashes.inc()
            self._probe_now.set()  # usually a worker vanished under the engine: find which, now
        elif kind == "engine_ready" and self.engine and self.engine.last_recovery_s is not None:
            self.metrics.recovery.observe(self.engine.last_recovery_s)

    def _on_tokens(self, n: int) -> None:
        self._tok_window.append((time.monotonic(), n))

    def tokens_per_s(self, window_s: float = 5.0) -> float:
        now = time.monotonic()
        while self._tok_window and now - self._tok_window[0][0] > window_s:
            self._tok_window.popleft()
        return sum(n for _, n in self._tok_window) / window_s

    async def run(self) -> None:
        from .api import build_app, serve

        self.engine = EngineManager(
            model_path=self.cfg.model_path,
            run_dir=self.run_dir,
            n_ctx_seq=self.cfg.n_ctx,
            max_batch=self.cfg.max_batch,
            threads=self.cfg.engine_threads,
            timing=self.timing,
            on_event=self._on_engine_event,
            on_tokens=self._on_tokens,
        )
        self.control = ControlServer(
            bind=self.cfg.control_bind,
            keys=self.keys,
            membership=self.membership,
            timing=self.timing,
            on_events=self._on_events,
            on_bad_frame=lambda why: self.metrics.bad_frames.inc(),
            on_disconnect=self._probe_now.set,
        )
        self.control.start()
        self.events.add(
            "head_start",
            f"head {__version__} serving {self.model_id} ({self.profile.n_layers} layers, "
            f"{fmt_bytes(self.profile.total_weight_bytes)}); control on {self.cfg.control_bind}",
        )
        app = build_app(self)
        tasks = [
            asyncio.create_task(self.control.recv_loop(), name="control-recv"),
            asyncio.create_task(self.control.heartbeat_loop(), name="control-hb"),
            asyncio.create_task(self.control.monitor_loop(), name="control-monitor"),
            asyncio.create_task(self.engine.recv_loop(), name="engine-recv"),
            asyncio.create_task(self.reconcile_loop(), name="reconcile"),
            asyncio.create_task(self.probe_loop(), name="rpc-probe"),
            asyncio.create_task(serve(app, host=self.cfg.api_host, port=self.cfg.api_port), name="api"),
        ]
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop_event.set)
            except (NotImplementedError, RuntimeError):
                pass
        stopper = asyncio.create_task(self.stop_event.wait())
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper and t.exception() is not None:
                log.error("task_failed", task=t.get_name(), error=repr(t.exception()))
        log.info("head_stopping")
        await self.engine.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.control.close()
        failed = [t for t in done if t is not stopper and t.exception() is not None]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]

    # ------------------------------------------------------ stabilization
    def node_views(self) -> list[NodeView]:
        now = time.monotonic()
        return [
            NodeView(
                name=n.name,
                endpoint=n.rpc_endpoint,
                state=n.state.value,
                rpc_ready=n.rpc_ready,
                cordoned=n.cordoned,
                plannable_bytes=n.plannable_bytes,
                speed=n.speed,
                state_age_s=now - n.state_since,
                rpc_down_s=now - n.rpc_down_since if n.rpc_down_since is not None and not n.rpc_ready else 0.0,
                rpc_refused=n.rpc_refused,
                stalled_engine=n.stalled_engine,
            )
            for n in self.membership.nodes.values()
        ]

    def compute_desired(self, *, force: bool = False, views: list[NodeView] | None = None) -> Desired:
        assert self.engine is not None
        eng = self.engine
        return desired_state(
            nodes=views if views is not None else self.node_views(),
            profile=self.profile,
            n_ctx=self.cfg.n_ctx * self.cfg.max_batch,
            head_memory=self.cfg.head_memory_bytes,
            strategy=self.cfg.strategy,  # type: ignore[arg-type]
            current=eng.plan,
            current_considered=eng.considered,
            force_replan=force,
            rpc_grace_s=self.timing.DEAD_AFTER_S,
        )

    async def reconcile_once(self) -> None:
        assert self.engine is not None
        now = time.monotonic()
        self._on_events(self.membership.tick(now))
        if self.engine.stalled(now) and self.engine.plan is not None:
            for a in self.engine.plan.rpc_assignments:
                self._on_events(self.membership.blame_stall(a.node))
        force = self._force_replan
        self.desired = self.compute_desired(force=force)
        eng_plan, want = self.engine.plan, self.desired.plan
        new_layout = want is not None and (eng_plan is None or want.key() != eng_plan.key())
        actions = reconcile(
            desired=self.desired,
            engine=self.engine.view(),
            restart_allowed=self.engine.restart_allowed(now, new_layout=new_layout),
            timing=self.timing,
            now=now,
        )
        for action in actions:
            if isinstance(action, StopEngine):
                await self.engine.stop(action.reason)
            elif isinstance(action, StartEngine):
                self._force_replan = False
                if not await self._probe(action):
                    continue
                previous = self.engine.plan
                if previous is None or previous.key() != action.plan.key():
                    self.metrics.replans.inc()
                    layout = ", ".join(f"{a.node}:{a.start}-{a.end - 1}" for a in action.plan.assignments if a.n_layers)
                    self.events.add("replan", f"plan over {len(action.plan.rpc_assignments)} worker(s): {layout}")
                await self.engine.start(action.plan, action.considered)
            elif isinstance(action, Wait):
                if action.reason != self._last_wait:
                    kind = "degraded" if action.reason.startswith("degraded") else "waiting"
                    if kind == "degraded" and self.engine.gen == 0 and "no worker is ready" in action.reason:
                        kind = "waiting"  # start-up: no worker has joined yet
                    if kind == "degraded" or "suspect" in action.reason or "joining" in action.reason:
                        self.events.add(kind, action.reason)
                self._last_wait = action.reason
        if not any(isinstance(a, Wait) for a in actions):
            self._last_wait = ""
        self._update_gauges()

    async def _probe_one(self, name: str, endpoint: str, *, mark_unanswered: bool) -> str:
        host, _, port = (endpoint or "").rpartition(":")
        result = await probe_rpc(host.strip("[]"), int(port or 0), self.timing.RPC_PROBE_TIMEOUT_S)
        log.debug("rpc_probe", node=name, endpoint=endpoint, result=result)
        now = time.monotonic()
        if result == "refused":
            self._on_events(self.membership.mark_unreachable(
                name, now=now, reason=f"RPC port {endpoint} refused the connection (server gone)", refused=True))
        elif result == "unreachable" and mark_unanswered:
            self._on_events(self.membership.mark_unreachable(name, now=now, reason=f"RPC port {endpoint} did not answer"))
        elif result == "open":
            self._on_events(self.membership.rpc_reachable(name, now=now))
        return result

    async def _probe(self, action: StartEngine) -> bool:
        """Before loading, check each worker's RPC port answers; suspect those that don't."""
        results = await asyncio.gather(
            *(self._probe_one(a.node, a.endpoint or "", mark_unanswered=True) for a in action.plan.rpc_assignments)
        )
        return all(r == "open" for r in results)

    async def probe_loop(self) -> None:
        """Find a vanished worker in milliseconds, not heartbeat timeouts.

        When the engine dies or a control connection drops, probe the RPC port of every node
        in the plan, a few times (RPC_PROBE_AFTER_S): a refused connection means that RPC
        server process is gone (killed, crashed, box rebooting) and the node leaves the plan
        at once. A port that merely does not answer is left to the heartbeat failure detector
        (it may be a busy box). Nodes found refused are probed again each heartbeat interval
        until they answer.
        """
        rounds: list[float] = []  # when the next urgent probe rounds are due (monotonic)
        while True:
            now = time.monotonic()
            wait_s = min([self.timing.HEARTBEAT_INTERVAL_S, *(t - now for t in rounds)])
            try:
                await asyncio.wait_for(self._probe_now.wait(), timeout=max(wait_s, 0.0))
                self._probe_now.clear()
                now = time.monotonic()
                rounds = sorted({*rounds, *(now + d for d in self.timing.RPC_PROBE_AFTER_S)})
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            urgent = bool(rounds) and rounds[0] <= now + 0.001
            rounds = [t for t in rounds if t > now + 0.001]
            targets: dict[str, str] = {}
            if urgent and self.engine is not None:
                for plan in (self.engine.plan, self.desired.plan):
                    for a in plan.rpc_assignments if plan else []:
                        targets[a.node] = a.endpoint or ""
            elif not urgent:
                for n in self.membership.nodes.values():
                    if n.rpc_refused and n.state.value in ("alive", "suspect", "joining"):
                        targets[n.name] = n.rpc_endpoint
            if targets:
                try:
                    await asyncio.gather(*(self._probe_one(k, v, mark_unanswered=False) for k, v in targets.items()))
                except Exception as exc:  # noqa: BLE001 - a probe bug must not stop probing
                    log.error("probe_error", exc=True, error=str(exc))

    async def reconcile_loop(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one bug
                log.error("reconcile_error", exc=True, error=str(exc))
            await asyncio.sleep(self.timing.RECONCILE_INTERVAL_S)

    def _update_gauges(self) -> None:
        counts = {s.value: 0 for s in NodeState}
        for n in self.membership.nodes.values():
            counts[n.state.value] += 1
        counts["refused"] = len(self.membership.refused)
        for state, c in counts.items():
            self.metrics.nodes.labels(state=state).set(c)
        assert self.engine is not None
        for s in ("stopped", "starting", "loading", "serving", "stopping", "failed"):
            self.metrics.engine_state.labels(state=s).set(1 if self.engine.state == s else 0)
        self.metrics.in_flight.set(len(self.engine.requests))

    # ----------------------------------------------------------- status
    def health(self) -> tuple[str, str]:
        assert self.engine is not None
        if self.engine.state == "serving":
            return "ok", ""
        if self.desired.plan is None:
            if not self.desired.degraded:
                return "starting", self.desired.hold
            return "degraded", self.desired.degraded
        if self.degraded_reason():
            return "degraded", self.degraded_reason()
        if self.desired.hold:
            return "recovering", self.desired.hold
        if self.engine.state in ("starting", "loading"):
            what = "recovering" if self.engine.gen > 1 or self.engine.lost_at else "starting"
            return what, f"engine loading the model ({self.engine.progress:.0%})"
        if self.engine.state == "failed":
            return "recovering", f"engine failed: {self.engine.last_error}"
        return "starting", self._last_wait or self.engine.state

    ENGINE_FAILURES_DEGRADED = 3

    def degraded_reason(self) -> str:
        """Why new requests get 503 now ("" when they should wait or be served)."""
        if self.desired.plan is None:
            return self.desired.degraded
        eng = self.engine
        if eng is not None and eng.state == "failed" and eng.guard.failures >= self.ENGINE_FAILURES_DEGRADED:
            return f"the engine failed {eng.guard.failures} times in a row (last: {eng.last_error or 'no detail'})"
        return ""

    def node_display_state(self, name: str) -> str:
        n = self.membership.nodes[name]
        if n.cordoned and n.state not in (NodeState.DEAD, NodeState.LEFT):
            eng = self.engine
            loaded = eng is not None and eng.plan is not None and any(a.node == name for a in eng.plan.rpc_assignments)
            return "draining" if loaded else "cordoned"
        return n.state.value

    def cluster(self) -> dict[str, Any]:
        assert self.engine is not None
        now = time.monotonic()
        plan = self.engine.plan if self.engine.plan is not None else self.desired.plan
        nodes = []
        for n in self.membership.nodes.values():
            a = next((x for x in plan.assignments if x.node == n.name), None) if plan else None
            nodes.append(
                {
                    "name": n.name,
                    "address": n.address,
                    "hostname": n.hostname,
                    "rpc_endpoint": n.rpc_endpoint,
                    "state": self.node_display_state(n.name),
                    "liveness": n.state.value,
                    "cordoned": n.cordoned,
                    "rpc_ready": n.rpc_ready,
                    "heartbeat_age_s": round(now - n.last_seen, 3),
                    "layers": [a.start, a.end] if a and a.n_layers else None,
                    "n_layers": a.n_layers if a else 0,
                    "memory": {
                        "total_bytes": n.memory_total,
                        "free_bytes": n.memory_free,
                        "plannable_bytes": n.plannable_bytes,
                        "planned_bytes": a.total_bytes if a else 0,
                    },
                    "memory_history": [[round(t, 1), f] for t, f in n.memory_history[-60:]],
                    "devices": n.devices,
                    "versions": n.versions,
                    "load": n.load,
                    "speed": n.speed,
                    "joined_at": n.wall_joined_at,
                    "reason": n.reason,
                }
            )
        for r in self.membership.refused.values():
            nodes.append(
                {
                    "name": r.name,
                    "address": r.address,
                    "hostname": r.hostname,
                    "rpc_endpoint": None,
                    "state": "refused",
                    "liveness": "refused",
                    "cordoned": False,
                    "rpc_ready": False,
                    "heartbeat_age_s": round(now - r.last_seen, 3),
                    "layers": None,
                    "n_layers": 0,
                    "memory": {},
                    "memory_history": [],
                    "devices": [],
                    "versions": r.versions,
                    "load": {},
                    "speed": 0,
                    "joined_at": r.wall_joined_at,
                    "reason": r.reason,
                }
            )
        status, reason = self.health()
        prof = self.profile.summary()
        prof.pop("layer_bytes", None)
        return {
            "version": __version__,
            "health": {"status": status, "reason": reason},
            "model": {"id": self.model_id, **prof},
            "nodes": nodes,
            "plan": plan.to_dict() if plan else None,
            "desired_plan": self.desired.plan.to_dict() if self.desired.plan else None,
            "engine": self.engine.status(),
            "throughput": {
                "tokens_per_s": round(self.tokens_per_s(), 2),
                "requests_in_flight": len(self.engine.requests),
            },
            "events_last_id": self.events.last_id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "now": time.time(),  # the head's clock: ages of events and joins are relative to it
        }

    # ----------------------------------------------------------- actions
    def drain(self, name: str, *, force: bool = False) -> tuple[int, dict[str, Any]]:
        if name not in self.membership.nodes:
            return 404, {"message": f"no node named {name!r}", "code": "node_not_found"}
        if not force:
            views = [v if v.name != name else NodeView(**{**v.__dict__, "cordoned": True}) for v in self.node_views()]
            d = desired_state(
                nodes=views,
                profile=self.profile,
                n_ctx=self.cfg.n_ctx * self.cfg.max_batch,
                head_memory=self.cfg.head_memory_bytes,
                strategy=self.cfg.strategy,  # type: ignore[arg-type]
            )
            if d.plan is None:
                return 409, {
                    "message": f"draining {name} would leave the model without room: {d.degraded} "
                    "(pass force to drain anyway)",
                    "code": "would_degrade",
                }
        self.membership.cordon(name)
        self.events.add("drain", f"{name} drained by the operator: its layers move to the other nodes", node=name)
        return 202, {"node": name, "state": self.node_display_state(name)}

    def uncordon(self, name: str) -> tuple[int, dict[str, Any]]:
        if not self.membership.uncordon(name):
            return 404, {"message": f"no node named {name!r}", "code": "node_not_found"}
        self.events.add("uncordon", f"{name} uncordoned: it can hold layers again", node=name)
        return 200, {"node": name, "state": self.node_display_state(name)}

    def reload(self) -> dict[str, Any]:
        self._force_replan = True
        assert self.engine is not None
        self.events.add("reload", "model reload requested by the operator")
        asyncio.get_running_loop().create_task(self.engine.stop("reload requested"))
        return {"status": "reloading"}

