#!/usr/bin/env python3
"""Preflight probe of the anyway_common role, run on each box by the Python that the
virtualenv will be made from. Prints one JSON object; the role's assertions turn it into
clear messages. Changes nothing.

  --path PATH          report the free space of the file system PATH is (or will be) on
  --connect HOST:PORT  report whether this box reaches HOST:PORT over TCP; a refused
                       connection counts as reachable (the host answered)
  --accelerator DIR    report the accelerators and toolkits (DIR: the CUDA toolkit's home)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys


def free_mb(path: str) -> dict:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return {"path": path, "existing": p, "free_mb": shutil.disk_usage(p).free // (1024 * 1024)}


def probe(target: str, timeout: float) -> dict:
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    out = {"host": host, "port": int(port), "reachable": False, "detail": ""}
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            out.update(reachable=True, detail="connected")
    except ConnectionRefusedError:
        out.update(reachable=True, detail="connection refused: the host answered, nothing listens there yet")
    except socket.timeout:
        out["detail"] = f"no answer within {timeout:g} s"
    except OSError as exc:
        out["detail"] = exc.strerror or str(exc)
    return out


def accelerator(cuda_home: str) -> dict:
    gpus = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
            gpus = [line.strip() for line in out.splitlines() if line.startswith("GPU ")]
        except (OSError, subprocess.SubprocessError):
            pass
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    return {
        "nvidia_gpus": gpus,
        "nvcc": nvcc if os.access(nvcc, os.X_OK) else (shutil.which("nvcc") or ""),
        "glslc": shutil.which("glslc") or "",
        "vulkan_headers": os.path.exists("/usr/include/vulkan/vulkan.h"),
        "dri": os.path.isdir("/dev/dri"),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", action="append", default=[])
    ap.add_argument("--connect", default="")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--accelerator", metavar="CUDA_HOME", default="")
    args = ap.parse_args()
    try:
        import ensurepip  # noqa: F401  (Debian ships it in python3-venv)
        import venv  # noqa: F401

        has_venv = True
    except ImportError:
        has_venv = False
    result = {
        "python": ".".join(str(v) for v in sys.version_info[:3]),
        "python_executable": sys.executable,
        "has_venv": has_venv,
        "disk": [free_mb(p) for p in args.path],
        "head": probe(args.connect, args.timeout) if args.connect else None,
        "accelerator": accelerator(args.accelerator) if args.accelerator else None,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
