"""ctypes access to the ggml backend and RPC functions inside llama-cpp-python's libraries.

llama-cpp-python binds llama.h but not ggml-backend.h / ggml-rpc.h. The symbols are
resolved through libllama's own handle (`llama_cpp.llama_cpp._lib`): a separate
`ctypes.CDLL("libggml.so")` registers RPC devices that llama.cpp then never uses
(verified, see docs/ARCHITECTURE.md). Importing this module imports llama_cpp, so
only processes that need ggml import it (the RPC server, the engine, the worker's
device probe), never the API server's hot path.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


class LlamaLibError(RuntimeError):
    """llama-cpp-python is missing or was built without what the appliance needs."""


@lru_cache(maxsize=1)
def lib() -> Any:
    try:
        import llama_cpp
        from llama_cpp import llama_cpp as _ll
    except ImportError as exc:  # pragma: no cover - bootstrap installs it
        raise LlamaLibError(f"llama-cpp-python is not installed: {exc}") from None
    if not llama_cpp.llama_supports_rpc():
        raise LlamaLibError(
            "llama-cpp-python was built without the RPC backend; rebuild it with "
            "CMAKE_ARGS=-DGGML_RPC=ON (make does this: delete .venv and run make again)"
        )
    L = _ll._lib
    vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    sigs: dict[str, tuple[list[Any], Any]] = {
        "ggml_backend_load_all": ([], None),
        "ggml_backend_dev_count": ([], sz),
        "ggml_backend_dev_get": ([sz], vp),
        "ggml_backend_dev_by_type": ([ctypes.c_int], vp),
        "ggml_backend_dev_name": ([vp], cp),
        "ggml_backend_dev_description": ([vp], cp),
        "ggml_backend_dev_memory": ([vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
        "ggml_backend_dev_type": ([vp], ctypes.c_int),
        "ggml_backend_register": ([vp], None),
        "ggml_backend_reg_dev_count": ([vp], sz),
        "ggml_backend_reg_dev_get": ([vp, sz], vp),
        "ggml_backend_rpc_add_server": ([cp], vp),
        "ggml_backend_rpc_start_server": ([cp, cp, sz, sz, ctypes.POINTER(vp)], None),
        "ggml_backend_rpc_get_device_memory": ([cp, ctypes.c_uint32, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(L, name)
        fn.argtypes = args
        fn.restype = res
    return L


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    description: str
    type: str
    free_bytes: int
    total_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "description": self.description,
            "type": self.type,
            "free_bytes": self.free_bytes,
            "total_bytes": self.total_bytes,
        }


def _memory(L: Any, dev: int) -> tuple[int, int]:
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    L.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return int(free.value), int(total.value)


def local_devices() -> list[Device]:
    """The devices this process's ggml sees (CPU, and GPUs when built with a GPU backend)."""
    L = lib()
    L.ggml_backend_load_all()
    out = []
    for i in range(L.ggml_backend_dev_count()):
        d = L.ggml_backend_dev_get(i)
        free, total = _memory(L, d)
        out.append(
            Device(
                index=i,
                name=(L.ggml_backend_dev_name(d) or b"").decode(errors="replace"),
                description=(L.ggml_backend_dev_description(d) or b"").decode(errors="replace"),
                type=DEVICE_TYPES.get(L.ggml_backend_dev_type(d), "unknown"),
                free_bytes=free,
                total_bytes=total,
            )
        )
    return out


def device_memory(index: int) -> tuple[int, int]:
    """(free, total) bytes of device `index` now (for heartbeats; cheap)."""
    L = lib()
    return _memory(L, L.ggml_backend_dev_get(index))


def serving_device_indices(devices: list[Device], choice: str = "auto") -> list[int]:
    """What a worker exposes over RPC: `auto` = its first GPU if it has one, else its CPU;
    `cpu`; `gpu`; or a device index / name as listed by ggml (e.g. `1`, `CUDA0`)."""
    gpus = [d.index for d in devices if d.type in ("gpu", "igpu")]
    cpus = [d.index for d in devices if d.type == "cpu"]
    if choice == "auto":
        return gpus[:1] or cpus[:1]
    if choice == "cpu":
        return cpus[:1]
    if choice == "gpu":
        if not gpus:
            raise LlamaLibError("no GPU device found (this llama-cpp-python build sees: "
                                + ", ".join(d.name for d in devices) + ")")
        return gpus[:1]
    for d in devices:
        if choice == str(d.index) or choice == d.name:
            return [d.index]
    raise LlamaLibError(f"no device {choice!r}; this box has: " + ", ".join(f"{d.index}={d.name}" for d in devices))


def start_rpc_server(*, endpoint: str, cache_dir: str | None, n_threads: int, device_indices: list[int]) -> None:
    """Serve ggml RPC on `endpoint` forever (this call never returns)."""
    L = lib()
    L.ggml_backend_load_all()
    devs = [L.ggml_backend_dev_get(i) for i in device_indices]
    arr = (ctypes.c_void_p * len(devs))(*devs)
    L.ggml_backend_rpc_start_server(
        endpoint.encode(),
        cache_dir.encode() if cache_dir else None,
        max(n_threads, 1),
        len(devs),
        arr,
    )


def register_rpc_servers(endpoints: list[str]) -> int:
    """Register each endpoint's devices with ggml, in order; returns the device count added."""
    L = lib()
    L.ggml_backend_load_all()
    added = 0
    for ep in endpoints:
        reg = L.ggml_backend_rpc_add_server(ep.encode())
        if not reg:
            raise LlamaLibError(f"could not add RPC server {ep}")
        L.ggml_backend_register(reg)
        added += int(L.ggml_backend_reg_dev_count(reg))
    return added


@lru_cache(maxsize=1)
def rpc_protocol_version() -> str:
    """The ggml RPC protocol version this build speaks (from the installed ggml-rpc.h)."""
    import llama_cpp

    base = Path(llama_cpp.__file__).resolve().parent
    for candidate in (base.parent / "include" / "ggml-rpc.h", base / "include" / "ggml-rpc.h"):
        if candidate.is_file():
            text = candidate.read_text(errors="replace")
            parts = [
                re.search(rf"#define\s+RPC_PROTO_{p}_VERSION\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")
            ]
            if all(parts):
                return ".".join(m.group(1) for m in parts if m)
    return "unknown"


def llama_cpp_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


def uses_llamafile_sgemm() -> bool:
    """Whether this ggml computes batches with llamafile's sgemm: then a batch of tokens is
    computed with other kernels than one token at a time, and an answer resumed in one
    batched pass after a failure may drift from the text it would have written."""
    import llama_cpp

    return "LLAMAFILE = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


GGML_TYPE_F32 = 0
GGML_TYPE_Q8_0 = 8


def measure_speed(*, device_index: int, n_threads: int, window_s: float = 0.25, windows: int = 4) -> float:
    """A short fixed workload on one device through ggml's backend API: GFLOP/s.

    A Q8_0 [4096 x 4096] weight times 8 activation columns is what a batched decode step
    does to one quantized projection: it measures what the device (and the thread count or
    CPU quota it runs under) actually delivers to the RPC server, not a synthetic peak.
    The best of `windows` windows of `window_s` is kept: a box that is briefly busy at
    start-up is not mistaken for a slow one, while each window spans more than one CFS
    period (100 ms), so a CPU quota still shows.
    """
    L = lib()
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for name, args, res in (
        ("ggml_tensor_overhead", [], sz),
        ("ggml_graph_overhead", [], sz),
        ("ggml_init", [_InitParams], vp),
        ("ggml_free", [vp], None),
        ("ggml_new_tensor_2d", [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], vp),
        ("ggml_mul_mat", [vp, vp, vp], vp),
        ("ggml_new_graph", [vp], vp),
        ("ggml_build_forward_expand", [vp, vp], None),
        ("ggml_backend_dev_init", [vp, ctypes.c_char_p], vp),
        ("ggml_backend_free", [vp], None),
        ("ggml_backend_alloc_ctx_tensors", [vp, vp], vp),
        ("ggml_backend_buffer_clear", [vp, ctypes.c_uint8], None),
        ("ggml_backend_buffer_free", [vp], None),
        ("ggml_backend_graph_compute", [vp, vp], ctypes.c_int),
    ):
        fn = getattr(L, name)
        fn.argtypes, fn.restype = args, res
    L.ggml_backend_load_all()
    dev = L.ggml_backend_dev_get(device_index)
    backend = L.ggml_backend_dev_init(dev, None)
    if not backend:
        raise LlamaLibError(f"cannot initialise device {device_index}")
    if DEVICE_TYPES.get(L.ggml_backend_dev_type(dev)) == "cpu":
        set_threads = getattr(L, "ggml_backend_cpu_set_n_threads")
        set_threads.argtypes, set_threads.restype = [vp, ctypes.c_int], None
        set_threads(backend, max(n_threads, 1))
    k, n, cols = 4096, 4096, 8
    ctx = L.ggml_init(_InitParams(L.ggml_tensor_overhead() * 8 + L.ggml_graph_overhead(), None, True))
    buf = None
    try:
        w = L.ggml_new_tensor_2d(ctx, GGML_TYPE_Q8_0, k, n)
        x = L.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, cols)
        y = L.ggml_mul_mat(ctx, w, x)
        graph = L.ggml_new_graph(ctx)
        L.ggml_build_forward_expand(graph, y)
        buf = L.ggml_backend_alloc_ctx_tensors(ctx, backend)
        L.ggml_backend_buffer_clear(buf, 0)
        import time

        L.ggml_backend_graph_compute(backend, graph)  # warm-up
        best = 0.0
        for _ in range(max(windows, 1)):
            runs, t0 = 0, time.perf_counter()
            while True:
                L.ggml_backend_graph_compute(backend, graph)
                runs += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= window_s and runs >= 2:
                    break
            best = max(best, 2.0 * k * n * cols * runs / elapsed / 1e9)
        return best
    finally:
        if buf:
            L.ggml_backend_buffer_free(buf)
        L.ggml_free(ctx)
        L.ggml_backend_free(backend)
