"""FNV-1a 64: the hash ggml's RPC backend names its tensor cache files by.

ggml's RPC client hashes every weight tensor over 10 MiB before sending it and asks the
server whether `CACHE_DIR/<hash as 16 hex digits>` holds those bytes; if so nothing is
sent. To pre-stage tensors on a worker (appliance.head.staging, appliance.worker.cache)
the head must name them the same way, and the worker checks what it received.

FNV-1a is a byte-at-a-time recurrence: nothing in Python or numpy computes it at the
speed of a disk, so a ten-line C function is compiled once with the system's C compiler
(present wherever llama-cpp-python was built) into the cache directory and called
through ctypes (which releases the GIL). Without a compiler a pure-Python fallback gives
the same answers, slowly, and says so in the log.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from appliance.common import logs
from appliance.common.config import cache_dir

log = logs.get("fnv")

OFFSET_BASIS = 0xCBF29CE484222325
PRIME = 0x100000001B3
MASK = (1 << 64) - 1

# The same function as ggml-rpc.cpp's fnv_hash (with a running hash, to hash in pieces).
_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
uint64_t anyway_fnv1a64(const uint8_t *data, size_t len, uint64_t hash) {
    for (size_t i = 0; i < len; i++) {
        hash ^= data[i];
        hash *= 0x100000001b3ULL;
    }
    return hash;
}
"""


def _py(data: Any, h: int) -> int:
    for b in bytes(data):
        h = ((h ^ b) * PRIME) & MASK
    return h


@lru_cache(maxsize=1)
def _native() -> Any:
    """The compiled function, or None when no C compiler is available."""
    tag = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    lib = cache_dir() / "native" / f"fnv1a64-{tag}-{platform.machine()}.so"
    if not lib.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            log.warning("fnv_slow", reason="no C compiler: tensor hashes are computed in Python (slow)")
            return None
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "fnv.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / lib.name
            res = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(src)], capture_output=True, text=True)
            if res.returncode != 0:
                log.warning("fnv_slow", reason=f"compiling the hash failed: {res.stderr.strip()[:200]}")
                return None
            os.replace(out, lib)
    fn = ctypes.CDLL(str(lib)).anyway_fnv1a64
    fn.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]
    fn.restype = ctypes.c_uint64
    return fn


def fnv1a64(data: bytes | bytearray | memoryview, *, hash: int = OFFSET_BASIS) -> int:  # noqa: A002
    """FNV-1a 64 of `data`, continuing from `hash` (so pieces can be hashed in order)."""
    fn = _native()
    if fn is None:
        return _py(data, hash)
    if isinstance(data, bytes):
        return int(fn(data, len(data), hash))
    view = memoryview(data).cast("B")
    if view.nbytes == 0:
        return hash
    if view.readonly:
        return int(fn(view.tobytes(), view.nbytes, hash))
    return int(fn((ctypes.c_char * view.nbytes).from_buffer(view), view.nbytes, hash))


def fnv1a64_file(path: str | os.PathLike[str], offset: int, size: int) -> int:
    """FNV-1a 64 of `size` bytes of a file from `offset`, without reading it into Python."""
    fn = _native()
    if size == 0:
        return OFFSET_BASIS
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if fn is None:
            return _py(mm[offset : offset + size], OFFSET_BASIS)
        h = OFFSET_BASIS  # in large pieces: a slice of a read-only mmap is a copy
        step = 64 << 20
        for start in range(offset, offset + size, step):
            h = fnv1a64(mm[start : min(start + step, offset + size)], hash=h)
        return h


def cache_name(h: int) -> str:
    """The file name ggml's RPC server gives a cached tensor with hash `h`."""
    return f"{h:016x}"
