"""Write an OCI image (image-spec v1.1 layout) from the appliance root file system, without a daemon.

    python3 images/oci.py --rootfs build/images/rootfs --out build/images/oci \
        --archive build/images/anyway-oci.tar --version 0.1.0 --created 1783728000

One layer: the root file system (sorted entries, numeric owners, time stamps clamped to
--created) minus what only a booted machine uses (kernel, modules, initramfs, boot loaders).
The image config runs `anyway worker` (Entrypoint ["anyway"], Cmd ["worker"]); give `head ...`
as the command to run the head instead. `--archive` also writes the layout as one tar file
(`oci-archive:` for skopeo and podman). `verify(DIR)` checks a layout: digests, sizes, config.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import IO, Any

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
ENTRYPOINT = ["/opt/anyway/venv/bin/anyway"]
CMD = ["worker"]

# Paths (relative to the root fs) left out of the container image: they only matter to a booted
# machine. Their directories stay (empty) so the file system layout is the same.
EXCLUDE_CONTENTS = (
    "boot",
    "usr/lib/modules",
    "usr/lib/firmware",
    "usr/lib/systemd/boot",
    "dev",
    "proc",
    "sys",
    "run",
    "tmp",
    "var/tmp",
    "var/cache/apt/archives",
)


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class _HashingWriter(io.RawIOBase):
    """Hashes and counts what passes through to `out` (the uncompressed layer)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.h, self.n = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        self.h.update(mv)
        self.n += len(mv)
        self.out.write(mv)
        return len(mv)


def _excluded_inside(rel: str) -> bool:
    return any(rel.startswith(p + "/") for p in EXCLUDE_CONTENTS)


def write_layer(rootfs: Path, blob_tmp: Path, created: int) -> tuple[str, str, int]:
    """tar+gzip of rootfs into blob_tmp; returns (diff_id, digest, size)."""
    gz_bin = shutil.which("pigz") or shutil.which("gzip")
    with open(blob_tmp, "wb") as out:
        if gz_bin:  # gzip in its own process: compression runs beside the tar writer
            proc = subprocess.Popen([gz_bin, "-n", "-6", "-c"], stdin=subprocess.PIPE, stdout=out)
            sink: IO[bytes] = proc.stdin  # type: ignore[assignment]
        else:
            proc = None
            sink = gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6)  # type: ignore[assignment]
        hw = _HashingWriter(sink)
        buffered = io.BufferedWriter(hw, buffer_size=1 << 20)
        with tarfile.open(fileobj=buffered, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[arg-type]
            for dirpath, dirnames, filenames in os.walk(rootfs):
                dirnames.sort()
                rel_dir = os.path.relpath(dirpath, rootfs)
                for name in sorted(set(dirnames) | set(filenames)):
                    full = os.path.join(dirpath, name)
                    rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if _excluded_inside(rel):
                        continue
                    ti = tar.gettarinfo(full, arcname=rel)
                    if ti is None:  # sockets
                        continue
                    if ti.ischr() or ti.isblk() or ti.isfifo():
                        continue
                    ti.uname = ti.gname = ""
                    ti.mtime = min(int(ti.mtime), created)
                    ti.pax_headers = {}
                    if ti.isreg():
                        with open(full, "rb") as f:
                            tar.addfile(ti, f)
                    else:
                        tar.addfile(ti)
                # descend in sorted order, but not into excluded contents / symlinked dirs
                dirnames[:] = [
                    d
                    for d in sorted(dirnames)
                    if not os.path.islink(os.path.join(dirpath, d))
                    and not _excluded_inside((d if rel_dir == "." else f"{rel_dir}/{d}") + "/x")
                ]
        buffered.flush()
        if proc is not None:
            sink.close()
            if proc.wait() != 0:
                raise RuntimeError(f"{gz_bin} failed")
        else:
            sink.close()
    digest = hashlib.sha256()
    with open(blob_tmp, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + hw.h.hexdigest(), "sha256:" + digest.hexdigest(), blob_tmp.stat().st_size


def _put_blob(blobs: Path, data: bytes) -> dict[str, Any]:
    d = hashlib.sha256(data).hexdigest()
    (blobs / d).write_bytes(data)
    return {"digest": f"sha256:{d}", "size": len(data)}


def build(rootfs: Path, out: Path, *, version: str, revision: str, created: int) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tmp = blobs / "layer.tmp"
    diff_id, digest, size = write_layer(rootfs, tmp, created)
    tmp.rename(blobs / digest.split(":", 1)[1])
    created_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    labels = {
        "org.opencontainers.image.title": "anyway",
        "org.opencontainers.image.description": "Anyway appliance: one LLM split across machines (llama.cpp RPC). "
        "Default command: the worker; give 'head ...' to run the head.",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.created": created_iso,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    config = {
        "created": created_iso,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": "900:900",
            "Env": [
                "PATH=/opt/anyway/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ANYWAY_CACHE_DIR=/var/lib/anyway/cache",
                "PYTHONUNBUFFERED=1",
                "LANG=C.UTF-8",
            ],
            "Entrypoint": ENTRYPOINT,
            "Cmd": CMD,
            "WorkingDir": "/var/lib/anyway",
            "ExposedPorts": {"5555/tcp": {}, "8080/tcp": {}, "50052/tcp": {}},
            "Volumes": {"/var/lib/anyway": {}},
            "StopSignal": "SIGTERM",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created_iso, "created_by": "images/build.sh (debootstrap root fs, images/oci.py)"}],
    }
    cdesc = _put_blob(blobs, canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, **cdesc},
        "layers": [{"mediaType": MT_LAYER_GZ, "digest": digest, "size": size}],
        "annotations": {k: v for k, v in labels.items() if k != "org.opencontainers.image.description"},
    }
    mdesc = _put_blob(blobs, canonical(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            {
                "mediaType": MT_MANIFEST,
                **mdesc,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": version},
            }
        ],
    }
    (out / "index.json").write_bytes(canonical(index))
    (out / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
    for p in sorted(out.rglob("*")):
        os.utime(p, (created, created), follow_symlinks=False)
    os.utime(out, (created, created))
    return {"manifest": mdesc["digest"], "config": cdesc["digest"], "layer": digest, "diff_id": diff_id, "layer_size": size}


def archive(layout: Path, dest: Path, created: int) -> None:
    """The layout as one tar (oci-archive), sorted, numeric owners, fixed times."""
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for p in [layout, *sorted(layout.rglob("*"))]:
            rel = os.path.relpath(p, layout)
            ti = tar.gettarinfo(str(p), arcname=rel)
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            ti.mtime = created
            ti.mode = 0o755 if ti.isdir() else 0o644
            if ti.isreg():
                with open(p, "rb") as f:
                    tar.addfile(ti, f)
            else:
                tar.addfile(ti)
    tmp.rename(dest)


def _file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def verify(layout: Path, *, check_diff_ids: bool = True) -> dict[str, Any]:
    """Check an OCI layout: every descriptor's blob exists with that digest and size; the
    config's diff_ids match the uncompressed layers. Returns {"index", "manifest", "config"}."""
    problems: list[str] = []
    if json.loads((layout / "oci-layout").read_text()).get("imageLayoutVersion") != "1.0.0":
        problems.append("oci-layout: imageLayoutVersion is not 1.0.0")

    def blob(desc: dict[str, Any], what: str) -> bytes | None:
        algo, _, hexd = desc["digest"].partition(":")
        p = layout / "blobs" / algo / hexd
        if not p.is_file():
            problems.append(f"{what}: blob {desc['digest']} missing")
            return None
        if p.stat().st_size != desc["size"]:
            problems.append(f"{what}: size {p.stat().st_size} != descriptor {desc['size']}")
        if _file_digest(p) != desc["digest"]:
            problems.append(f"{what}: digest mismatch for {desc['digest']}")
        return p.read_bytes() if desc["size"] < (64 << 20) else b""

    index = json.loads((layout / "index.json").read_text())
    if index.get("schemaVersion") != 2:
        problems.append("index.json: schemaVersion is not 2")
    mdesc = index["manifests"][0]
    manifest = json.loads(blob(mdesc, "manifest") or b"{}")
    if manifest.get("mediaType") != MT_MANIFEST:
        problems.append("manifest: wrong mediaType")
    config = json.loads(blob(manifest["config"], "config") or b"{}")
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if len(diff_ids) != len(manifest.get("layers", [])):
        problems.append("config: diff_ids and layers differ in number")
    for i, ldesc in enumerate(manifest.get("layers", [])):
        blob(ldesc, f"layer {i}")
        if check_diff_ids and i < len(diff_ids):
            algo, _, hexd = ldesc["digest"].partition(":")
            h = hashlib.sha256()
            with gzip.open(layout / "blobs" / algo / hexd, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if "sha256:" + h.hexdigest() != diff_ids[i]:
                problems.append(f"layer {i}: uncompressed digest != config diff_id")
    if problems:
        raise ValueError("; ".join(problems))
    return {"index": index, "manifest": manifest, "config": config}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rootfs", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--archive", type=Path)
    p.add_argument("--version", required=True)
    p.add_argument("--revision", default="")
    p.add_argument("--created", type=int, default=int(os.environ.get("SOURCE_DATE_EPOCH", "0")))
    p.add_argument("--verify", action="store_true", help="only verify the layout in --out")
    a = p.parse_args(argv)
    if a.verify:
        verify(a.out)
        print(f"{a.out}: valid OCI layout")
        return 0
    info = build(a.rootfs, a.out, version=a.version, revision=a.revision, created=a.created)
    if a.archive:
        archive(a.out, a.archive, a.created)
    print(
        f"OCI image {a.out}: manifest {info['manifest']}, layer {info['layer_size'] >> 20} MiB gzip",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
