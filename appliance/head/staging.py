"""Pre-staging: the weights a failover would move are on the survivors' disks before it.

For the plan the engine runs, the head works out (appliance.core.staging) what each worker
would receive if any one other node died, tells each worker its lists (STAGE: `need`,
its own cacheable tensors, and `want`, the ones to fetch), and serves the pieces the
workers ask for (FETCH -> CHUNK) from the model file, over the authenticated control
plane, at the pace each worker sets (low priority, within its disk quota). A worker
reports what it still lacks in its heartbeats; `/v1/cluster` shows, per node, the bytes its
loss would move and whether they are staged.

The tensor table with each cacheable tensor's FNV-1a hash (ggml's cache file name) is
computed once per model file in a background thread and kept next to the other caches.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from appliance.common import logs, protocol
from appliance.common.config import cache_dir
from appliance.common.fnv import fnv1a64_file
from appliance.core.membership import Membership
from appliance.core.planner import Plan
from appliance.core.profile import ModelProfile
from appliance.core.reconciler import NodeView, failover_plan
from appliance.core.staging import Failover, ModelTensors, NodeStaging, TensorInfo, failovers, staged_failovers, staging

log = logs.get("head.staging")

HASHES_VERSION = 1


def _index_path(model_path: str) -> Path:
    st = os.stat(model_path)
    key = hashlib.sha256(f"{os.path.realpath(model_path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:24]
    return cache_dir() / "tensor-hashes" / f"{key}.json"


def tensor_table(model_path: str) -> list[TensorInfo]:
    """Every tensor's offset and size, and for those ggml caches, their FNV-1a hash (slow
    the first time for a large model: about a second per GB; then read from disk)."""
    from gguf import GGUFReader

    index = _index_path(model_path)
    try:
        data = json.loads(index.read_text())
        if data.get("version") == HASHES_VERSION:
            return [TensorInfo(**t) for t in data["tensors"]]
    except (OSError, ValueError, TypeError, KeyError):
        pass
    reader = GGUFReader(model_path, "r")
    out = []
    for t in reader.tensors:
        info = TensorInfo(name=t.name, offset=int(t.data_offset), size=int(t.n_bytes))
        if info.cacheable:
            info = TensorInfo(name=info.name, offset=info.offset, size=info.size,
                              hash=f"{fnv1a64_file(model_path, info.offset, info.size):016x}")
        out.append(info)
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_suffix(".part")
    tmp.write_text(json.dumps({"version": HASHES_VERSION, "tensors": [t.__dict__ for t in out]}))
    os.replace(tmp, index)
    return out


class StagingService:
    def __init__(
        self,
        *,
        model_path: str,
        profile: ModelProfile,
        membership: Membership,
        n_ctx: int,
        head_memory: int,
        serving: Callable[[], bool] = lambda: False,
        busy_chunk_interval_s: float = 0.0,
    ) -> None:
        """`serving()`: requests are in flight; then each node's FETCHes are answered one at a
        time, `busy_chunk_interval_s` apart (staging yields to the answers being written)."""
        self.model_path = model_path
        self.serving = serving
        self.busy_chunk_interval_s = busy_chunk_interval_s
        self._pace: dict[str, asyncio.Lock] = {}
        self.profile = profile
        self.membership = membership
        self.n_ctx = n_ctx
        self.head_memory = head_memory
        self.tensors: ModelTensors | None = None
        self.by_hash: dict[str, TensorInfo] = {}
        self.plan_key: tuple[Any, ...] | None = None
        self.failover: dict[str, Failover] = {}
        self.lists: dict[str, NodeStaging] = {}
        self.version = 0
        self._sent: dict[str, tuple[int, str]] = {}  # node -> (version, node_id) it was told
        self._fd: int | None = None

    async def prepare(self) -> None:
        """Read (or compute once) the tensor table with hashes, off the event loop."""
        table = await asyncio.get_running_loop().run_in_executor(None, tensor_table, self.model_path)
        self.tensors = ModelTensors.from_table(table, n_layers=self.profile.n_layers)
        self.by_hash = {t.hash: t for t in table if t.hash}
        self._fd = os.open(self.model_path, os.O_RDONLY)
        log.info("tensor_table_ready", tensors=len(table), cacheable=len(self.by_hash))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------ plans
    def update(self, plan: Plan | None, views: Sequence[NodeView]) -> list[tuple[bytes, dict[str, Any]]]:
        """Recompute the lists when the plan changed; the STAGE messages to send now
        (to nodes that have not been told this version, e.g. after they restarted)."""
        if self.tensors is None:
            return []
        if plan is None:
            self.plan_key, self.failover, self.lists = None, {}, {}
            return []
        if plan.key() != self.plan_key:
            after = {
                a.node: failover_plan(plan, lost=a.node, nodes=views, profile=self.profile, n_ctx=self.n_ctx,
                                      head_memory=self.head_memory)
                for a in plan.rpc_assignments
            }
            self.failover = failovers(plan, tensors=self.tensors, failover_plans=after)
            self.lists = staging(plan, tensors=self.tensors, failover=self.failover)
            self.plan_key = plan.key()
            self.version += 1
        out = []
        for name, lists in self.lists.items():
            node = self.membership.nodes.get(name)
            if node is None or not node.identity:
                continue
            if self._sent.get(name) == (self.version, node.node_id):
                continue
            self._sent[name] = (self.version, node.node_id)
            body = {
                "version": self.version,
                "need": [t.hash for t in lists.need],
                "want": [[t.hash, t.size] for t in lists.want],
            }
            out.append((node.identity, body))
        return out

    # ------------------------------------------------------------ transfers
    async def fetch(self, node_name: str, body: dict[str, Any]) -> tuple[dict[str, Any], bytes] | None:
        """The CHUNK answering a worker's FETCH, or None if it asked for something it may not have."""
        lists = self.lists.get(node_name)
        h, offset, length = body.get("hash"), body.get("offset"), body.get("length")
        if (
            lists is None
            or self._fd is None
            or not isinstance(h, str)
            or h not in lists.hashes
            or not isinstance(offset, int)
            or not isinstance(length, int)
            or isinstance(offset, bool)
            or isinstance(length, bool)
        ):
            return None
        t = self.by_hash.get(h)
        if t is None or not 0 <= offset < t.size or not 0 < length <= protocol.MAX_PAYLOAD_BYTES:
            return None
        n = min(length, t.size - offset)
        if self.serving() and self.busy_chunk_interval_s > 0:
            async with self._pace.setdefault(node_name, asyncio.Lock()):
                await asyncio.sleep(self.busy_chunk_interval_s)
                return await self._read(h, offset, n, t.offset + offset)
        return await self._read(h, offset, n, t.offset + offset)

    async def _read(self, h: str, offset: int, n: int, file_offset: int) -> tuple[dict[str, Any], bytes] | None:
        fd = self._fd
        if fd is None:
            return None
        data = await asyncio.get_running_loop().run_in_executor(None, os.pread, fd, n, file_offset)
        return {"hash": h, "offset": offset}, data

    # ------------------------------------------------------------ status
    def node_status(self, name: str) -> dict[str, Any] | None:
        """For /v1/cluster: what losing `name` would move, and whether the survivors have it."""
        f = self.failover.get(name)
        if f is None:
            return None
        missing = {
            n.name: list(n.cache.get("missing", ())) for n in self.membership.nodes.values()
            if n.cache and n.cache.get("version") == self.version and not n.cache.get("missing_count", 0) > len(n.cache.get("missing", ()))
        }
        staged = staged_failovers({name: f}, missing).get(name, False)
        pending = sum(
            t.size for node, ts in f.receivers.items() for t in ts
            if t.cacheable and (node not in missing or t.hash in set(missing[node]))
        )
        return {
            "possible": f.possible,
            "bytes": f.bytes,
            "cacheable_bytes": f.cacheable_bytes,
            "staged_bytes": f.cacheable_bytes - pending if f.possible else 0,
            "staged": staged,
        }
