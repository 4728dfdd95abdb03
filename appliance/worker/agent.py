"""The worker agent: joins the head over ZeroMQ and runs this box's ggml RPC server.

Paranoid-Pirate style liveness on the worker side: it announces itself (HELLO) over a
DEALER socket, heartbeats every HEARTBEAT_INTERVAL_S with its load and memory, and
expects the head's heartbeats back. When the head is silent for HEAD_SILENCE_S it
closes the socket, waits (exponential backoff) and connects afresh with a new HELLO,
which is also how a restarted head learns the cluster again. The RPC server (a child
process, `appliance.worker.rpc_server`, supervised by `RpcChild`) is started only once
the head has accepted the node, bound to the address the head reaches it on; it keeps
running across head reconnects so a head restart does not cost the workers their
cached tensors. With the node's keys (the default) what listens there is the TLS front of
the data plane, and the C server itself only on loopback (docs/SECURITY.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import signal
import socket
import time
import uuid
from typing import Any

import psutil
import zmq
import zmq.asyncio

from appliance import __version__

from appliance.common import logs, protocol
from appliance.common.keys import WorkerKeys
from appliance.common.process import die_with_parent
from appliance.worker.cache import TensorCache, Wanted
from appliance.worker.config import WorkerConfig
from appliance.worker.rpc_child import RpcChild

log = logs.get("worker")

STAGING_WINDOW = 4  # pieces of a tensor asked for at once


def local_addresses() -> set[str]:
    out = {"127.0.0.1", "::1", "0.0.0.0", "::"}
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.add(a.address.split("%")[0])
    return out


class WorkerAgent:
    def __init__(self, cfg: WorkerConfig, *, keys: WorkerKeys | None) -> None:
        self.cfg = cfg
        self.keys = keys
        self.node_id = uuid.uuid4().hex
        self.ctx = zmq.asyncio.Context.instance()
        self.rpc = RpcChild(
            cache_dir=cfg.cache_dir,
            threads=cfg.threads,
            timing=cfg.timing.worker,
            device=cfg.device,
            tls_keys_dir=cfg.keys_dir if cfg.data_plane == "tls" else "",
        )
        self.devices: list[dict[str, Any]] = []
        self.rpc_protocol = "unknown"
        self.llama_version = ""
        self.llamafile = False
        self.speed = cfg.speed or 1.0
        self.speed_source = "configured"
        self.welcomed = False
        self.stopping = asyncio.Event()
        self.refusal = ""
        self._rpc_task: asyncio.Task[None] | None = None
        self.cache = TensorCache(cfg.cache_dir, quota_bytes=cfg.cache_quota_bytes) if cfg.cache_dir else None
        self._sock: zmq.asyncio.Socket | None = None  # the session's socket, while there is one
        self._chunks: dict[tuple[str, int], asyncio.Future[bytes]] = {}
        self._stage_wake = asyncio.Event()
        self._staging_task: asyncio.Task[None] | None = None
        self._last_cache_check = 0.0
        psutil.cpu_percent(interval=None)

    def _probe_devices(self) -> None:
        from appliance.common import ggml

        self.rpc_protocol = ggml.rpc_protocol_version()
        self.llama_version = ggml.llama_cpp_version()
        self.llamafile = ggml.uses_llamafile_sgemm()
        devices = ggml.local_devices()
        self.devices = [d.to_dict() for d in devices]
        if not self.cfg.speed:
            # Once, at start-up: what this box's RPC device delivers, under its thread
            # count and CPU quota. The head's speed-aware planner compares these.
            idx = ggml.serving_device_indices(devices, self.cfg.device)[0]
            threads = self.cfg.threads or (os.cpu_count() or 1)
            self.speed = round(ggml.measure_speed(device_index=idx, n_threads=threads), 2)
            self.speed_source = "measured"
            log.info("speed_measured", gflops=self.speed, device=devices[idx].name, threads=threads)

    def memory(self) -> dict[str, int]:
        vm = psutil.virtual_memory()
        gpus = [d for d in self.devices if d.get("type") in ("gpu", "igpu")] if self.cfg.device != "cpu" else []
        if gpus:
            from appliance.common import ggml

            free, total = ggml.device_memory(int(gpus[0]["index"]))
            gpus[0]["free_bytes"] = free
            plannable = free  # the RPC server frees a client's buffers when it disconnects
        else:
            total, free = int(vm.total), int(vm.available)
            plannable = free + self.rpc.rss()  # what our own server holds is ours to re-plan
        if self.cfg.max_memory_bytes:
            plannable = min(plannable, self.cfg.max_memory_bytes)
        return {"total": total, "free": free, "plannable": plannable}

    def load(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        out: dict[str, Any] = {"cpu_percent": psutil.cpu_percent(interval=None), "ram_percent": vm.percent}
        try:
            out["loadavg_1m"] = os.getloadavg()[0]
        except OSError:
            pass
        if self.rpc.proc is not None and self.rpc.proc.returncode is None:
            out["rpc_rss_bytes"] = self.rpc.rss()
            busy = self.rpc.busy.sample(
                cpu_s=self.rpc.cpu_seconds(), now_s=time.monotonic(), threads=self.rpc.compute_threads
            )
            if busy is not None:
                out["rpc_busy"] = busy  # fraction of wall time its server computed since the last report
            read = self.rpc.read_bytes()
            if read is not None:
                out["rpc_read_bytes"] = read  # what its server received and read from its cache
        gpus = [d for d in self.devices if d.get("type") in ("gpu", "igpu")]
        if gpus and gpus[0].get("total_bytes"):
            out["gpu_mem_percent"] = round(100 * (1 - gpus[0]["free_bytes"] / gpus[0]["total_bytes"]), 1)
        return out

    def hello_body(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name,
            "node_id": self.node_id,
            "hostname": socket.gethostname(),
            "protocol": protocol.PROTOCOL_MAJOR,
            "rpc_protocol": self.rpc_protocol,
            "version": __version__,
            "llama_cpp": self.llama_version,
            "llamafile": self.llamafile,
            "rpc_port": self.cfg.rpc_port,
            "rpc_host": self.cfg.rpc_host,
            "rpc_ready": self.rpc.ready,
            "devices": self.devices,
            "memory": self.memory(),
            "speed": self.speed,
            "speed_source": self.speed_source,
            "rpc_advertise": self.cfg.rpc_advertise,
            "data_plane": self.cfg.data_plane,
            "load": self.load(),
        }

    def _socket(self) -> zmq.asyncio.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, self.node_id.encode())
        s.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        if self.keys is not None:
            s.curve_secretkey = self.keys.secret
            s.curve_publickey = self.keys.public
            s.curve_serverkey = self.keys.server_public
        s.connect(self.cfg.head)
        return s

    async def run(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._probe_devices)
        if self.cache is not None:
            self._staging_task = asyncio.create_task(self._staging_loop(), name="staging")
        t = self.cfg.timing.heartbeat
        backoff = t.RECONNECT_BACKOFF_MIN_S
        log.info("worker_starting", name=self.cfg.name, head=self.cfg.head, rpc_port=self.cfg.rpc_port)
        while not self.stopping.is_set():
            sock = self._socket()
            try:
                heard = await self._session(sock)
            finally:
                sock.close(linger=0)
            if self.stopping.is_set():
                break
            backoff = t.RECONNECT_BACKOFF_MIN_S if heard else min(backoff * 2, t.RECONNECT_BACKOFF_MAX_S)
            if self.refusal:
                backoff = t.RECONNECT_BACKOFF_MAX_S
            log.info("head_reconnect", head=self.cfg.head, in_s=round(backoff, 2))
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=backoff)
            except asyncio.TimeoutError:
                pass

    async def _session(self, sock: zmq.asyncio.Socket) -> bool:
        """One connection to the head; returns when the head goes silent. True if it ever answered."""
        await sock.send_multipart(protocol.encode(protocol.HELLO, self.hello_body()))
        self._sock = sock
        try:
            return await self._converse(sock)
        finally:
            self._sock = None
            for fut in self._chunks.values():
                fut.cancel()
            self._chunks.clear()

    async def _converse(self, sock: zmq.asyncio.Socket) -> bool:
        t = self.cfg.timing.heartbeat
        last_heard = time.monotonic()
        heard_any = False
        next_hb = time.monotonic()
        self.welcomed = False
        self.refusal = ""
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        while not self.stopping.is_set():
            timeout = max(0.0, next_hb - time.monotonic())
            events = dict(await poller.poll(timeout=int(timeout * 1000)))
            if sock in events:
                frames = await sock.recv_multipart()
                try:
                    msg = protocol.decode(frames, allowed=protocol.HEAD_TYPES)
                except protocol.BadFrame as exc:
                    log.warning("bad_frame_from_head", reason=str(exc))
                    continue
                last_heard = time.monotonic()
                heard_any = True
                await self._handle(sock, msg)
                if self.refusal:
                    return True
            now = time.monotonic()
            if now >= next_hb:
                next_hb = now + t.HEARTBEAT_INTERVAL_S
                rpc_ok = self.rpc.check()
                if self.welcomed and not rpc_ok and self.rpc.endpoint and self.rpc.proc is None:
                    self._start_rpc(sock, self.rpc.endpoint)
                if self.welcomed:
                    body = {
                        "rpc_ready": rpc_ok,
                        "rpc_state": self.rpc.state,
                        "memory": self.memory(),
                        "load": self.load(),
                    }
                    if self.cache is not None:
                        body["cache"] = await self._cache_report(now)
                    await sock.send_multipart(protocol.encode(protocol.HEARTBEAT, body))
            if now - last_heard > t.HEAD_SILENCE_S:
                if heard_any:
                    log.warning("head_silent", head=self.cfg.head, silent_s=round(now - last_heard, 1))
                else:
                    log.warning(
                        "head_not_answering",
                        head=self.cfg.head,
                        hint="is the head running, and do this node's cluster keys match the head's?",
                    )
                return heard_any
        try:
            await sock.send_multipart(protocol.encode(protocol.BYE, {}), zmq.NOBLOCK)
            await asyncio.sleep(0.05)
        except zmq.ZMQError:
            pass
        return heard_any

    def _start_rpc(self, sock: zmq.asyncio.Socket, endpoint: str) -> None:
        """Start (or check) the RPC server in the background: heartbeats must go on meanwhile."""
        if self._rpc_task is not None and not self._rpc_task.done():
            return

        async def go() -> None:
            if await self.rpc.ensure(endpoint):
                try:
                    await sock.send_multipart(protocol.encode(protocol.RPC_READY, {"endpoint": endpoint}))
                except zmq.ZMQError:
                    pass  # socket replaced meanwhile; the next HELLO carries rpc_ready

        self._rpc_task = asyncio.create_task(go(), name="rpc-start")

    async def _handle(self, sock: zmq.asyncio.Socket, msg: protocol.Message) -> None:
        if msg.type == protocol.WELCOME:
            # Bind where the head reaches us (or where we were told to); the port is ours.
            # Behind NAT / a port forward (--rpc-advertise) the address the head sees is
            # not ours: bind all addresses then (the firewall keeps the port to the head).
            host = self.cfg.rpc_host or ("0.0.0.0" if self.cfg.rpc_advertise else str(msg.body.get("rpc_host") or ""))
            port = self.cfg.rpc_port
            try:
                ipaddress.ip_address(host)
            except ValueError:
                log.error("bad_rpc_host", host=host)
                return
            if host not in local_addresses():
                log.error(
                    "rpc_host_not_local",
                    host=host,
                    hint="the head reaches this node through NAT; pass --rpc-host with this box's address",
                )
                return
            if self.cfg.data_plane == "plain" and self.keys is not None and not ipaddress.ip_address(host).is_loopback:
                # Never the unauthenticated C server on a network address while the cluster has keys.
                log.error("plain_rpc_refused", host=host, hint="--data-plane plain is for loopback only; drop it")
                return
            self.welcomed = True
            endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            log.info("accepted_by_head", name=msg.body.get("name"), rpc_endpoint=endpoint)
            self._start_rpc(sock, endpoint)
        elif msg.type == protocol.REFUSE:
            self.refusal = str(msg.body.get("reason", "refused"))
            log.error("refused_by_head", reason=self.refusal)
        elif msg.type == protocol.REANNOUNCE:
            log.info("head_asks_reannounce")
            await sock.send_multipart(protocol.encode(protocol.HELLO, self.hello_body()))
        elif msg.type == protocol.STAGE:
            self._on_stage(msg.body)
        elif msg.type == protocol.CHUNK:
            key = (str(msg.body.get("hash")), msg.body.get("offset"))
            fut = self._chunks.get(key)  # type: ignore[arg-type]
            if fut is not None and not fut.done() and msg.payload is not None:
                fut.set_result(msg.payload)

    # ------------------------------------------------------------ staging
    def _on_stage(self, body: dict[str, Any]) -> None:
        """The head's lists: tensors to keep (`need`) and to pre-stage (`want`)."""
        if self.cache is None:
            return
        version, need, want = body.get("version"), body.get("need"), body.get("want")
        ok_hash = re.compile(r"^[0-9a-f]{16}$").match
        if (
            not isinstance(version, int)
            or not isinstance(need, list)
            or not isinstance(want, list)
            or not all(isinstance(h, str) and ok_hash(h) for h in need)
            or not all(
                isinstance(w, list) and len(w) == 2 and isinstance(w[0], str) and ok_hash(w[0])
                and isinstance(w[1], int) and 0 < w[1] < 1 << 40
                for w in want
            )
        ):
            log.warning("bad_stage_list_dropped")
            return
        self.cache.set_lists(version=version, need=frozenset(need), want=tuple(Wanted(h, s) for h, s in want))
        log.info("stage_list", version=version, need=len(need), want=len(want))
        self._stage_wake.set()

    async def _cache_report(self, now: float) -> dict[str, Any]:
        assert self.cache is not None
        loop = asyncio.get_running_loop()
        if now - self._last_cache_check > self.cfg.timing.worker.CACHE_CHECK_INTERVAL_S:
            self._last_cache_check = now
            await loop.run_in_executor(None, self.cache.make_room)
        report = await loop.run_in_executor(None, self.cache.report)
        return dict(report.__dict__)

    async def _staging_loop(self) -> None:
        """Fetch, one tensor at a time and at the configured pace, what the head wants staged."""
        assert self.cache is not None
        cache = self.cache
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self._stage_wake.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            self._stage_wake.clear()
            while self.welcomed and self._sock is not None and self.cfg.staging_rate_bytes_s > 0:
                missing = await loop.run_in_executor(None, cache.missing)
                if not missing:
                    break
                w = missing[0]
                if not await loop.run_in_executor(None, cache.make_room, w.size):
                    cache.blocked = "the cache quota is full of tensors this node needs or wants"
                    break
                if not await self._fetch(w):
                    break  # the head went away or did not answer: try again later

    async def _fetch(self, w: Wanted) -> bool:
        assert self.cache is not None
        sock, loop = self._sock, asyncio.get_running_loop()
        if sock is None:
            return False
        piece, window = protocol.MAX_PAYLOAD_BYTES, STAGING_WINDOW
        part = self.cache.begin(w)
        t0, done = time.monotonic(), 0
        try:
            with open(part, "wb") as fh:
                for first in range(0, w.size, piece * window):
                    offsets = list(range(first, min(first + piece * window, w.size), piece))
                    futs = []
                    for off in offsets:
                        fut: asyncio.Future[bytes] = loop.create_future()
                        self._chunks[(w.hash, off)] = fut
                        futs.append(fut)
                        body = {"hash": w.hash, "offset": off, "length": min(piece, w.size - off)}
                        await sock.send_multipart(protocol.encode(protocol.FETCH, body))
                    try:
                        pieces = await asyncio.wait_for(
                            asyncio.gather(*futs), timeout=self.cfg.timing.worker.STAGE_CHUNK_TIMEOUT_S
                        )
                    except (asyncio.TimeoutError, asyncio.CancelledError):
                        return False
                    finally:
                        for off in offsets:
                            self._chunks.pop((w.hash, off), None)
                    for off, data in zip(offsets, pieces):
                        if len(data) != min(piece, w.size - off):
                            return False
                        fh.seek(off)
                        fh.write(data)
                    done += sum(len(d) for d in pieces)
                    if self._sock is not sock or w.hash not in self.cache.pinned:
                        return False  # reconnected, or the head no longer wants it
                    ahead = t0 + done / self.cfg.staging_rate_bytes_s - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)  # low priority: at most the configured rate
            ok = await loop.run_in_executor(None, self.cache.commit, w, part)
            if ok:
                log.info("tensor_staged", hash=w.hash, bytes=w.size, s=round(time.monotonic() - t0, 2))
            return ok
        finally:
            part.unlink(missing_ok=True)

    async def shutdown(self) -> None:
        self.stopping.set()
        if self._staging_task is not None:
            self._staging_task.cancel()
        await self.rpc.stop()


def run_worker(cfg: WorkerConfig, *, keys: WorkerKeys | None) -> int:
    if os.environ.get("ANYWAY_DIE_WITH_PARENT"):
        die_with_parent(signal.SIGTERM)
    agent = WorkerAgent(cfg, keys=keys)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(agent.run(), name="agent")
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stopper = asyncio.create_task(stop.wait(), name="signals")
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        await agent.shutdown()
        try:
            await asyncio.wait_for(task, timeout=2)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            task.cancel()
        for t in done:
            if t is task and t.exception():
                raise t.exception()  # type: ignore[misc]

    asyncio.run(main())
    log.info("worker_stopped", name=cfg.name)
    return 0
