"""The head's supervisor: membership, the stabilization loop, the engine, and the API.

One asyncio process. The control server feeds membership from worker messages; every
RECONCILE_INTERVAL_S the loop ticks the failure detector, computes the desired plan
(pure: reconciler.desired_state), compares it with the engine's actual state (pure:
reconciler.reconcile) and executes the returned actions. Nothing is persisted: a
restarted head learns the cluster again from the workers' announcements. Every loop
runs under a `TaskSupervisor`: a loop that dies is restarted, or the head exits.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from appliance import __version__
from appliance.common import ggml, logs, protocol
from appliance.common.keys import HeadKeys
from appliance.common.kinds import EngineState, EventKind, HealthState, Liveness, NodeState
from appliance.common.modelfile import load_profile
from appliance.common.status import ClusterStatus
from appliance.core.membership import Event, Membership
from appliance.common.dataplane import TunnelSpec
from appliance.common.netprobe import split_endpoint
from appliance.core.planner import Plan, fmt_bytes
from appliance.core.profile import ModelProfile
from appliance.core.reconciler import (
    Adopt,
    Desired,
    NodeView,
    StartEngine,
    StopEngine,
    Wait,
    WaitKind,
    desired_state,
    reconcile,
)
from appliance.head import status as status_view
from appliance.head.config import HeadConfig
from appliance.head.control import ControlServer
from appliance.head.engine_process import EngineProcess
from appliance.head.events import EventLog
from appliance.head.loadmeter import LoadMeter
from appliance.head.keyring import KeyRing
from appliance.head.metrics import Metrics
from appliance.head.probe import RpcProber
from appliance.head.requests import Admission, RequestRouter
from appliance.head.staging import StagingService
from appliance.head.tasks import TaskSpec, TaskSupervisor
from appliance.head.text import Tokenizer

log = logs.get("head")


class NodeNotFound(LookupError):
    """An operator action named a node the head does not know."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no node named {name!r}")
        self.name = name


class WouldDegrade(RuntimeError):
    """Draining this node would leave the model without room (force to drain anyway)."""


class Head:
    def __init__(self, cfg: HeadConfig, *, keys: HeadKeys | None) -> None:
        self.cfg = cfg
        self.timing = cfg.timing
        self.profile: ModelProfile = load_profile(cfg.model_path)
        self.model_id = cfg.model_name or Path(cfg.model_path).stem
        self.run_dir = Path(cfg.run_dir or tempfile.mkdtemp(prefix="anyway-head-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog()
        self.metrics = Metrics()
        self.membership = Membership(
            timing=self.timing.heartbeat,
            rpc_protocol=ggml.rpc_protocol_version(),
            control_protocol=protocol.PROTOCOL_MAJOR,
            package_version=__version__,
            rpc_endpoints={name: split_endpoint(ep) for name, ep in cfg.node_rpc_endpoints.items()},
            secure=keys is not None,
        )
        self.keys = keys
        self.keyring = KeyRing(keys_dir=keys.keys_dir, on_change=self._keys_changed) if keys is not None else None
        self.tokenizer = Tokenizer(cfg.model_path)
        self.engine = EngineProcess(
            model_path=cfg.model_path,
            run_dir=self.run_dir,
            n_ctx_seq=cfg.n_ctx,
            max_batch=cfg.max_batch,
            threads=cfg.engine_threads,
            timing=self.timing.engine,
            on_event=self._on_engine_event,
            draft_max=cfg.draft_max,
            draft_min=cfg.draft_min,
            draft_model_path=cfg.draft_model_path,
            on_drafts=self._on_drafts,
        )
        self.drafted = 0  # drafted tokens the engines checked since the head started
        self.accepted = 0  # of those, accepted
        self.admission = Admission(limit=cfg.max_batch + cfg.max_queued)
        self.text_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self.router = RequestRouter(
            engine=self.engine,
            recovery_timeout_s=self.timing.recovery.REQUEST_RECOVERY_TIMEOUT_S,
            on_tokens=self._on_tokens,
        )
        self.prober = RpcProber(
            membership=self.membership,
            heartbeat=self.timing.heartbeat,
            recovery=self.timing.recovery,
            on_events=self._on_events,
            plans=lambda: (self.engine.plan, self.desired.plan),
        )
        self.staging = StagingService(
            model_path=cfg.model_path,
            profile=self.profile,
            membership=self.membership,
            n_ctx=cfg.n_ctx * cfg.max_batch,
            head_memory=cfg.head_memory_bytes,
            serving=lambda: bool(self.router.requests),
            busy_chunk_interval_s=self.timing.recovery.STAGING_BUSY_CHUNK_INTERVAL_S,
        )
        self.control = ControlServer(
            bind=cfg.control_bind,
            keys=keys,
            keyring=self.keyring,
            membership=self.membership,
            heartbeat=self.timing.heartbeat,
            recovery=self.timing.recovery,
            on_events=self._on_events,
            on_bad_frame=lambda why: self.metrics.bad_frames.inc(),
            on_disconnect=self.prober.trigger,
            on_fetch=self.staging.fetch,
        )
        self.model_status = status_view.model_status(self.profile, model_id=self.model_id)
        self.desired: Desired = Desired(plan=None, hold="starting")
        self._force_replan = False
        self._last_wait = ""
        self._growth_since: float | None = None
        self._tok_window: deque[tuple[float, int]] = deque()
        self.load_meter = LoadMeter()
        self.started_at = time.time()
        self.stop_event = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ wiring
    def _on_events(self, events: list[Event]) -> None:
        for e in events:
            self.events.add(e.kind, e.message, node=e.node)

    def _keys_changed(self, added: set[str], revoked: set[str], errors: list[str]) -> None:
        """The allow-list changed on disk: a revoked node leaves the cluster (and so the plan) now;
        its open control connection is ignored from here on and refused when it reconnects."""
        now = time.monotonic()
        for name in sorted(revoked):
            self._on_events(self.membership.revoke(name, now=now))
        del added  # a new key is news only when its node joins
        for err in errors:
            self.events.add(EventKind.REFUSED, f"allow-list entry ignored: {err[:300]}")

    def tunnels(self, plan: Plan) -> TunnelSpec | None:
        """The engine's data-plane spec for `plan`: every TLS node's endpoint and the exact
        certificate it must present (from the allow-list as it is now)."""
        if self.keys is None or self.keyring is None:
            return None
        peers = {}
        for a in plan.rpc_assignments:
            node = self.membership.nodes.get(a.node)
            ident = self.keyring.nodes.get(a.node)
            if node is not None and node.data_plane == "tls" and ident is not None and a.endpoint:
                peers[a.endpoint] = ident
        return TunnelSpec(head_key_file=str(self.keys.keys_dir / "server.key_secret"), peers=peers)

    def _on_engine_event(self, kind: EventKind, message: str) -> None:
        self.events.add(kind, message)
        if kind == EventKind.ENGINE_START:
            self.metrics.engine_starts.inc()
        elif kind in (EventKind.ENGINE_CRASH, EventKind.ENGINE_FAILED):
            self.metrics.engine_crashes.inc()
            self.prober.trigger()  # usually a worker vanished under the engine: find which, now
        elif kind == EventKind.ENGINE_READY and self.engine.last_recovery_s is not None:
            self.metrics.recovery.observe(self.engine.last_recovery_s)

    def _on_drafts(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.metrics.drafted.inc(drafted)
        self.metrics.accepted.inc(accepted)
        self.metrics.acceptance.set(self.accepted / self.drafted)

    def _on_tokens(self, n: int) -> None:
        self._tok_window.append((time.monotonic(), n))

    def tokens_per_s(self) -> float:
        window_s = self.timing.recovery.THROUGHPUT_WINDOW_S
        now = time.monotonic()
        while self._tok_window and now - self._tok_window[0][0] > window_s:
            self._tok_window.popleft()
        return sum(n for _, n in self._tok_window) / window_s

    def _spawn(self, coro: object, name: str) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        from appliance.head.api.app import ApiServer

        self.control.start()
        self.events.add(
            EventKind.HEAD_START,
            f"head {__version__} serving {self.model_id} ({self.profile.n_layers} layers, "
            f"{fmt_bytes(self.profile.total_weight_bytes)}); control on {self.cfg.control_bind}",
        )
        api = ApiServer(self, host=self.cfg.api_host, port=self.cfg.api_port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop_event.set)
            except (NotImplementedError, RuntimeError):
                pass
        supervisor = TaskSupervisor(
            timing=self.timing.recovery, on_restart=lambda name: self.metrics.task_restarts.labels(task=name).inc()
        )
        try:
            await supervisor.run(
                [
                    TaskSpec("control-recv", self.control.recv_loop),
                    TaskSpec("control-hb", self.control.heartbeat_loop),
                    TaskSpec("control-monitor", self.control.monitor_loop),
                    TaskSpec("engine-recv", self.engine.recv_loop),
                    TaskSpec("reconcile", self.reconcile_loop),
                    TaskSpec("rpc-probe", self.prober.loop),
                    TaskSpec("staging", self.staging_loop),
                    *([TaskSpec("keys", lambda: self.keyring.loop(self.timing.recovery.KEYS_RELOAD_INTERVAL_S))]
                      if self.keyring is not None else []),
                    TaskSpec("api", api.serve, restart=False),
                ],
                stop=self.stop_event,
            )
        finally:
            log.info("head_stopping")
            await api.shutdown()
            await self.engine.close()
            for t in list(self._tasks):
                t.cancel()
            self.control.close()
            self.staging.close()
            self.text_pool.shutdown(wait=False, cancel_futures=True)

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

    def _desired(self, views: list[NodeView], *, use_current: bool = True, force: bool = False,
                 defer_growth: bool = False) -> Desired:
        eng = self.engine
        return desired_state(
            nodes=views,
            profile=self.profile,
            n_ctx=self.cfg.n_ctx * self.cfg.max_batch,
            head_memory=self.cfg.head_memory_bytes,
            strategy=self.cfg.strategy,  # type: ignore[arg-type]
            lanes=self.cfg.engine_lanes,
            max_lanes=self.cfg.max_batch,
            current=eng.plan if use_current else None,
            current_considered=eng.considered if use_current else frozenset(),
            force_replan=force,
            defer_growth=defer_growth,
            join_wait_s=self.timing.recovery.JOIN_WAIT_S,
            rpc_grace_s=self.timing.heartbeat.DEAD_AFTER_S,
        )

    def _defer_growth(self, now: float) -> bool:
        """New nodes wait while the engine loads or resumes requests, and (bounded) while it
        serves requests: a re-plan interrupts every answer in flight."""
        eng = self.engine
        if eng.state in (EngineState.STARTING, EngineState.LOADING):
            return True
        if eng.state != EngineState.SERVING:
            return False  # nothing runs that a re-plan would interrupt: start with every node
        if self.router.resuming:
            return True
        if not self.router.busy:
            return False
        return self._growth_since is None or now - self._growth_since < self.timing.recovery.GROWTH_DEFER_MAX_S

    def _stalled(self, now: float) -> bool:
        return self.engine.stalled(now, busy=self.router.busy, after_s=self.timing.heartbeat.SUSPECT_AFTER_S)

    async def reconcile_once(self) -> None:
        now = time.monotonic()
        self._on_events(self.membership.tick(now))
        stalled = self._stalled(now)
        if stalled and self.engine.plan is not None:
            for a in self.engine.plan.rpc_assignments:
                self._on_events(self.membership.blame_stall(a.node))
        force = self._force_replan
        self.desired = self._desired(self.node_views(), force=force, defer_growth=self._defer_growth(now))
        if self.desired.deferred:
            self._growth_since = self._growth_since or now
        else:
            self._growth_since = None
        eng_plan, want = self.engine.plan, self.desired.plan
        new_layout = want is not None and (eng_plan is None or want.key() != eng_plan.key())
        actions = reconcile(
            desired=self.desired,
            engine=self.engine.view(busy=self.router.busy),
            restart_allowed=self.engine.restart_allowed(now, new_layout=new_layout),
            timing=self.timing.engine,
            now=now,
            stalled=stalled,
        )
        for action in actions:
            if isinstance(action, StopEngine):
                await self.engine.stop(action.reason, stalled=action.stalled)
            elif isinstance(action, StartEngine):
                self._force_replan = False
                if not await self.prober.before_start(action.plan):
                    continue
                previous = self.engine.plan
                if previous is None or previous.key() != action.plan.key():
                    self.metrics.replans.inc()
                    layout = ", ".join(f"{a.node}:{a.start}-{a.end - 1}" for a in action.plan.assignments if a.n_layers)
                    self.events.add(EventKind.REPLAN, f"plan over {len(action.plan.rpc_assignments)} worker(s): {layout}")
                self.load_meter.start(action.plan, self.membership.nodes, now)
                await self.engine.start(action.plan, action.considered, tunnels=self.tunnels(action.plan))
            elif isinstance(action, Adopt):
                self.engine.considered = action.considered
            elif isinstance(action, Wait):
                self._note_wait(action)
        if not any(isinstance(a, Wait) for a in actions):
            self._last_wait = ""
        if self.engine.state in (EngineState.STARTING, EngineState.LOADING):
            self.load_meter.sample(self.membership.nodes, now)
        self._update_gauges()

    def _note_wait(self, wait: Wait) -> None:
        """A new reason to wait becomes an event when an operator should see it."""
        if wait.reason != self._last_wait:
            kind: EventKind | None = {
                WaitKind.DEGRADED: EventKind.DEGRADED,
                WaitKind.HOLD: EventKind.WAITING,
                WaitKind.GATHERING: EventKind.WAITING,
            }.get(wait.kind)
            if wait.kind == WaitKind.NO_WORKERS:
                # At start-up no worker has joined yet: that is waiting, not a degradation.
                kind = EventKind.WAITING if self.engine.gen == 0 else EventKind.DEGRADED
            if kind is not None:
                self.events.add(kind, wait.reason)
        self._last_wait = wait.reason

    async def staging_loop(self) -> None:
        """Keep every worker told what to hold and pre-stage for the plan the engine runs."""
        if self.staging.tensors is None:
            await self.staging.prepare()
        while True:
            # Only while serving: a load needs the head's link to itself.
            running = self.engine.plan if self.engine.state == EngineState.SERVING else None
            for ident, body in self.staging.update(running, self.node_views()):
                await self.control.send(ident, protocol.STAGE, body)
            await asyncio.sleep(self.timing.recovery.RECONCILE_INTERVAL_S)

    async def reconcile_loop(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one bug
                log.error("reconcile_error", exc=exc)
            await asyncio.sleep(self.timing.recovery.RECONCILE_INTERVAL_S)

    def _update_gauges(self) -> None:
        counts = {s.value: 0 for s in Liveness}
        for n in self.membership.nodes.values():
            counts[n.state.value] += 1
        counts[Liveness.REFUSED.value] = len(self.membership.refused)
        for state, c in counts.items():
            self.metrics.nodes.labels(state=state).set(c)
        self.metrics.worker_busy.clear()
        for n in self.membership.nodes.values():
            if (busy := n.load.get("rpc_busy")) is not None:
                self.metrics.worker_busy.labels(node=n.name).set(busy)
        for s in EngineState:
            self.metrics.engine_state.labels(state=s.value).set(1 if self.engine.state == s else 0)
        self.metrics.in_flight.set(len(self.router.requests))

    # ----------------------------------------------------------- status
    def health(self) -> tuple[HealthState, str]:
        eng = self.engine
        if eng.state == EngineState.SERVING:
            return HealthState.OK, ""
        if self.desired.plan is None:
            if not self.desired.degraded:
                return HealthState.STARTING, self.desired.hold
            return HealthState.DEGRADED, self.desired.degraded
        why = self.degraded_reason()
        if why:
            return HealthState.DEGRADED, why
        if self.desired.hold:
            return HealthState.RECOVERING, self.desired.hold
        if eng.state in (EngineState.STARTING, EngineState.LOADING):
            recovering = eng.gen > 1 or eng.lost_at is not None
            return (HealthState.RECOVERING if recovering else HealthState.STARTING), (
                f"engine loading the model ({eng.progress:.0%})"
            )
        if eng.state == EngineState.FAILED:
            return HealthState.RECOVERING, f"engine failed: {eng.last_error}"
        return HealthState.STARTING, self._last_wait or eng.state.value

    def degraded_reason(self) -> str:
        """Why new requests get 503 now ("" when they should wait or be served)."""
        if self.desired.plan is None:
            return self.desired.degraded
        eng = self.engine
        if eng.state == EngineState.FAILED and eng.guard.failures >= self.timing.recovery.ENGINE_FAILURES_DEGRADED:
            return f"the engine failed {eng.guard.failures} times in a row (last: {eng.last_error or 'no detail'})"
        return ""

    def cluster(self) -> ClusterStatus:
        return status_view.cluster_status(
            membership=self.membership,
            engine=self.engine,
            desired_plan=self.desired.plan,
            health=self.health(),
            model=self.model_status,
            tokens_per_s=self.tokens_per_s(),
            requests_in_flight=len(self.router.requests),
            events_last_id=self.events.last_id,
            started_at=self.started_at,
            failover=self.staging.node_status,
            load=self.load_meter.progress(),
            speculation=status_view.speculation_status(
                engine=self.engine, default=self.cfg.speculative, drafted=self.drafted, accepted=self.accepted
            ),
        )

    def node_state(self, name: str) -> NodeState:
        node = self.membership.nodes.get(name)
        if node is None:
            raise NodeNotFound(name)
        return status_view.display_state(node, loaded=self.engine.plan)

    # ----------------------------------------------------------- actions
    def drain(self, name: str, *, force: bool = False) -> NodeState:
        """Cordon `name` so its layers move to the others; `WouldDegrade` if they cannot."""
        if name not in self.membership.nodes:
            raise NodeNotFound(name)
        if not force:
            views = [v if v.name != name else NodeView(**{**v.__dict__, "cordoned": True}) for v in self.node_views()]
            d = self._desired(views, use_current=False)
            if d.plan is None:
                raise WouldDegrade(
                    f"draining {name} would leave the model without room: {d.degraded} (pass force to drain anyway)"
                )
        self.membership.cordon(name)
        self.events.add(EventKind.DRAIN, f"{name} drained by the operator: its layers move to the other nodes", node=name)
        return self.node_state(name)

    def uncordon(self, name: str) -> NodeState:
        if not self.membership.uncordon(name):
            raise NodeNotFound(name)
        self.events.add(EventKind.UNCORDON, f"{name} uncordoned: it can hold layers again", node=name)
        return self.node_state(name)

    def reload(self, *, replan: bool = False) -> None:
        """Restart the engine: with the same layout (its workers' caches make that quick), or
        with `replan`, a fresh plan from the nodes' free memory now."""
        self._force_replan = replan
        what = "with a fresh plan" if replan else "with the same layout"
        self.events.add(EventKind.RELOAD, f"model reload requested by the operator ({what})")
        self._spawn(self.engine.stop("reload requested"), name="reload")
