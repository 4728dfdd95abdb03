"""The worker's tensor cache: ggml's RPC cache directory, kept within a disk quota, plus staging.

ggml's RPC server writes every weight tensor over 10 MiB that it receives to
`CACHE_DIR/<FNV-1a hash>` and, on a later load, reads it from there instead of the
network. Left alone that directory only grows. `TensorCache` owns it:

* the head says which hashes this node `need`s (its own layers) and `want`s (the layers
  it would take over if one other node died); those are pinned;
* everything else is evicted least-recently-written first whenever the directory is over
  its quota (`--cache-quota`), before a staged tensor is added, and periodically (the RPC
  server writes files on its own during loads);
* a staged tensor is written to a temporary file, its hash checked, then renamed into
  place, so the RPC server never reads half a file.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.common import logs
from appliance.common.fnv import fnv1a64_file

log = logs.get("worker.cache")

_NAME = re.compile(r"^[0-9a-f]{16}$")
STAGING_SUBDIR = ".staging"


@dataclass(frozen=True)
class Wanted:
    hash: str
    size: int


@dataclass
class CacheReport:
    """What the heartbeat tells the head (bounded: at most MISSING_SHOWN hashes)."""

    used_bytes: int
    quota_bytes: int
    version: int
    missing: list[str] = field(default_factory=list)
    missing_count: int = 0
    missing_bytes: int = 0
    blocked: str = ""  # why staging cannot go on (e.g. the quota is full of pinned tensors)


MISSING_SHOWN = 256


class TensorCache:
    def __init__(self, directory: str | os.PathLike[str], *, quota_bytes: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dir / STAGING_SUBDIR
        shutil.rmtree(self.tmp, ignore_errors=True)  # half-written pieces of a previous life
        self.tmp.mkdir(exist_ok=True)
        self.quota_bytes = quota_bytes if quota_bytes > 0 else self._default_quota()
        self.need: frozenset[str] = frozenset()
        self.want: tuple[Wanted, ...] = ()
        self.version = 0
        self.blocked = ""

    def _default_quota(self) -> int:
        """No quota given: what the file system has free now, minus a tenth, plus what is cached."""
        usage = shutil.disk_usage(self.dir)
        return int(usage.free * 0.9) + self.used_bytes()

    # ------------------------------------------------------------ contents
    def files(self) -> dict[str, os.stat_result]:
        out = {}
        with os.scandir(self.dir) as it:
            for e in it:
                if _NAME.match(e.name) and e.is_file(follow_symlinks=False):
                    try:
                        out[e.name] = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
        return out

    def used_bytes(self) -> int:
        return sum(st.st_size for st in self.files().values())

    def has(self, h: str, size: int) -> bool:
        try:
            return (self.dir / h).stat().st_size == size
        except FileNotFoundError:
            return False

    def set_lists(self, *, version: int, need: frozenset[str], want: tuple[Wanted, ...]) -> None:
        self.version, self.need, self.want = version, need, want
        self.blocked = ""

    @property
    def pinned(self) -> frozenset[str]:
        return self.need | {w.hash for w in self.want}

    def missing(self) -> list[Wanted]:
        return [w for w in self.want if not self.has(w.hash, w.size)]

    def report(self) -> CacheReport:
        missing = self.missing()
        return CacheReport(
            used_bytes=self.used_bytes(),
            quota_bytes=self.quota_bytes,
            version=self.version,
            missing=[w.hash for w in missing[:MISSING_SHOWN]],
            missing_count=len(missing),
            missing_bytes=sum(w.size for w in missing),
            blocked=self.blocked,
        )

    # ------------------------------------------------------------ quota
    def make_room(self, extra: int = 0) -> bool:
        """Evict unpinned tensors, least recently written first, until `extra` more bytes fit
        under the quota; False if the pinned ones alone leave no room."""
        files = self.files()
        used = sum(st.st_size for st in files.values())
        if used + extra <= self.quota_bytes:
            return True
        pinned = self.pinned
        for name, st in sorted(files.items(), key=lambda kv: kv[1].st_mtime):
            if name in pinned:
                continue
            try:
                (self.dir / name).unlink()
            except FileNotFoundError:
                continue
            used -= st.st_size
            log.info("cache_evicted", hash=name, bytes=st.st_size)
            if used + extra <= self.quota_bytes:
                return True
        return used + extra <= self.quota_bytes

    # ------------------------------------------------------------ staging
    def begin(self, w: Wanted) -> Path:
        part = self.tmp / f"{w.hash}.part"
        part.unlink(missing_ok=True)
        return part

    def commit(self, w: Wanted, part: Path) -> bool:
        """Move a fully received tensor into place if its size and hash are right."""
        size = part.stat().st_size
        if size != w.size or f"{fnv1a64_file(part, 0, size):016x}" != w.hash:
            log.warning("staged_tensor_rejected", hash=w.hash, size=size, expected=w.size)
            part.unlink(missing_ok=True)
            return False
        os.replace(part, self.dir / w.hash)
        os.utime(self.dir / w.hash, (time.time(), time.time()))
        return True
