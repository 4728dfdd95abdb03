#!/usr/bin/env python3
"""Build the Anyway wheel on the controller, reproducibly, without touching the source tree.

    anyway_wheel.py SRC OUTDIR VERSION [PIP ARGS...]

Copies SRC (minus virtualenvs, VCS and build debris) to a scratch directory, runs
`pip wheel --no-deps` there with SOURCE_DATE_EPOCH fixed (same source, same bytes), checks
the version and puts the wheel in OUTDIR only if it differs from the one already there.
Prints one JSON object: {"changed", "wheel", "version", "sha256"}.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", ".tox", ".nox", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
    ".pytest_cache", ".mypy_cache", ".ruff_cache", ".cache", ".anyway", "node_modules",
)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fail(msg: str) -> int:
    print(msg, file=sys.stderr)
    return 1


def main() -> int:
    if len(sys.argv) < 4:
        return fail("usage: anyway_wheel.py SRC OUTDIR VERSION [PIP ARGS...]")
    src, outdir, version, pip_args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    try:
        import pip  # noqa: F401
    except ImportError:
        return fail(
            f"{sys.executable} has no pip: set anyway_common_controller_python to a Python with pip, "
            "or build the wheel yourself and set anyway_common_product_wheel"
        )
    os.makedirs(outdir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="anyway-wheel-") as tmp:
        tree = os.path.join(tmp, "src")
        shutil.copytree(src, tree, ignore=IGNORE, symlinks=True)
        env = dict(os.environ, SOURCE_DATE_EPOCH="315532800", PIP_DISABLE_PIP_VERSION_CHECK="1")
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-input", "-q", "-w", os.path.join(tmp, "dist"), *pip_args, tree]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return fail(f"building the Anyway wheel from {src} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        built = [f for f in os.listdir(os.path.join(tmp, "dist")) if f.endswith(".whl")]
        if len(built) != 1:
            return fail(f"expected one wheel from {src}, got {built}")
        name = built[0]
        got = name.split("-")[1]
        if got != version:
            return fail(
                f"the source at {src} is Anyway {got}, but anyway_common_version pins {version}: "
                "set anyway_common_version to the version you deploy"
            )
        new = os.path.join(tmp, "dist", name)
        dest = os.path.join(outdir, name)
        digest = sha256(new)
        changed = not os.path.exists(dest) or sha256(dest) != digest
        if changed:
            shutil.copyfile(new, dest + ".tmp")
            os.replace(dest + ".tmp", dest)
        for other in os.listdir(outdir):
            if other.startswith("anyway-") and other.endswith(".whl") and other != name:
                os.unlink(os.path.join(outdir, other))
                changed = True
    print(json.dumps({"changed": changed, "wheel": dest, "version": got, "sha256": digest}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
