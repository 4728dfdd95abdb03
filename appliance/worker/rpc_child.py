"""The worker's ggml RPC server child: desired one server on an endpoint, actual whatever runs.

With the node's keys the endpoint is a TLS listener in the child, in front of the C server
on loopback (appliance.worker.rpc_server); either way, the endpoint accepting connections
means the server is up, and the child exiting takes the endpoint with it.

`ggml_backend_rpc_start_server` never returns and can crash, so it runs in its own
process (appliance.worker.rpc_server). `RpcChild` starts it, waits until its port
accepts connections, notices when it died or was stopped (SIGSTOP: a hung server), and
restarts it through a crash-loop guard; SIGTERM then SIGKILL after a grace to stop it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import psutil

from appliance.common import logs
from appliance.common.config import WorkerTiming
from appliance.common.netprobe import Reach, probe_tcp, split_endpoint
from appliance.common.process import aterminate
from appliance.core.crashloop import CrashLoopGuard

log = logs.get("worker.rpc")


class BusyMeter:
    """The fraction of wall time the RPC server spent computing, between two reports.

    Measured as the server process's CPU time over wall time times its compute threads:
    ggml's CPU backend keeps all its threads working during a graph and the server waits
    in a blocking read between requests, so CPU time is compute time (plus the small cost
    of reading requests). On a GPU box this counts the host side only."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None  # (monotonic wall, cpu seconds)

    def sample(self, *, cpu_s: float | None, now_s: float, threads: int) -> float | None:
        if cpu_s is None:
            self._last = None
            return None
        last, self._last = self._last, (now_s, cpu_s)
        if last is None or now_s <= last[0] or cpu_s < last[1]:
            return None  # first sample, or a new server process: no interval yet
        return busy_fraction(cpu_s=cpu_s - last[1], wall_s=now_s - last[0], threads=threads)


def busy_fraction(*, cpu_s: float, wall_s: float, threads: int) -> float:
    """CPU seconds over wall seconds times threads, within [0, 1]."""
    if wall_s <= 0 or threads <= 0:
        return 0.0
    return round(min(1.0, max(0.0, cpu_s / (wall_s * threads))), 3)


class RpcChild:
    """Desired: one RPC server on `endpoint`. Restarts it (with a crash-loop guard) if it dies."""

    def __init__(
        self, *, cache_dir: str, threads: int, timing: WorkerTiming, device: str = "auto", tls_keys_dir: str = ""
    ) -> None:
        """`tls_keys_dir`: serve the endpoint over TLS (the C server on loopback); "" for plain TCP."""
        self.device = device
        self.tls_keys_dir = tls_keys_dir
        self.cache_dir = cache_dir
        self.threads = threads
        self.t = timing
        self.endpoint = ""
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        self.state = "stopped"
        self.guard = CrashLoopGuard(
            window_s=timing.RPC_RESTART_WINDOW_S,
            max_starts=timing.RPC_RESTARTS_PER_WINDOW,
            backoff_min_s=timing.RPC_BACKOFF_MIN_S,
            backoff_max_s=timing.RPC_BACKOFF_MAX_S,
        )
        self._pump_task: asyncio.Task[None] | None = None
        self.last_lines: list[str] = []
        self.busy = BusyMeter()

    def rss(self) -> int:
        if self.proc is None or self.proc.returncode is not None:
            return 0
        try:
            return int(psutil.Process(self.proc.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def read_bytes(self) -> int | None:
        """Bytes the server process has read (sockets and files: weights from the network or
        from its cache) since it started; the head derives load progress and speed from it."""
        if self.proc is None or self.proc.returncode is not None:
            return None
        try:
            return int(psutil.Process(self.proc.pid).io_counters().read_chars)
        except (psutil.Error, AttributeError):
            return None

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used (user + system, all its threads)."""
        if self.proc is None or self.proc.returncode is not None:
            return None
        try:
            t = psutil.Process(self.proc.pid).cpu_times()
        except psutil.Error:
            return None
        return float(t.user + t.system)

    @property
    def compute_threads(self) -> int:
        """Threads its ggml CPU backend computes with (0 in the config: one per core)."""
        return self.threads or max(os.cpu_count() or 1, 1)

    async def ensure(self, endpoint: str) -> bool:
        """Make the server run on `endpoint`; True once it accepts connections."""
        if self.endpoint != endpoint and self.proc is not None:
            await self.stop()
        self.endpoint = endpoint
        if self.proc is not None and self.proc.returncode is None:
            return self.ready
        now = time.monotonic()
        if not self.guard.allow(now):
            self.state = "backoff"
            return False
        self.guard.record_start(now)
        self.ready = False
        self.state = "starting"
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "appliance.worker.rpc_server",
            "--endpoint",
            endpoint,
            "--cache-dir",
            self.cache_dir,
            "--threads",
            str(self.threads),
            "--device",
            self.device,
            *(["--keys", self.tls_keys_dir] if self.tls_keys_dir else []),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._pump_task = asyncio.create_task(self._pump(self.proc), name="rpc-output")
        host, port = split_endpoint(endpoint)
        deadline = time.monotonic() + self.t.RPC_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                break
            if await probe_tcp(host, port, max(self.t.RPC_READY_POLL_S, 0.5)) == Reach.OPEN:
                self.ready = True
                self.state = "ready"
                log.info("rpc_server_ready", endpoint=endpoint, pid=self.proc.pid)
                return True
            await asyncio.sleep(self.t.RPC_READY_POLL_S)
        self.state = "failed"
        self.guard.record_failure(time.monotonic())
        log.error("rpc_server_failed", endpoint=endpoint, output=" | ".join(self.last_lines[-3:])[:400])
        if self.proc.returncode is None:
            await aterminate(self.proc, grace_s=self.t.RPC_STOP_GRACE_S)
        self.proc = None
        return False

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.last_lines = (self.last_lines + [line])[-20:]
                log.debug("rpc_server_output", line=line[:300])

    def check(self) -> bool:
        """False (and state 'died' / 'stopped') if the child exited or was stopped since it was ready."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                status = psutil.Process(self.proc.pid).status()
            except psutil.Error:
                status = ""
            if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                self.state = "hung (process stopped)"
                return False
            if self.state.startswith("hung"):
                self.state = "ready" if self.ready else self.state
        if self.proc is not None and self.proc.returncode is not None:
            code = self.proc.returncode
            self.proc = None
            self.ready = False
            self.state = f"died (exit {code})"
            self.guard.record_failure(time.monotonic())
            log.warning("rpc_server_died", code=code, output=" | ".join(self.last_lines[-3:])[:400])
            return False
        return self.ready

    async def stop(self) -> None:
        if self.proc is not None:
            await aterminate(self.proc, grace_s=self.t.RPC_STOP_GRACE_S)
        self.proc = None
        self.ready = False
        self.state = "stopped"
