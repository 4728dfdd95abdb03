#!/usr/bin/env python3
"""Pack the controller's wheelhouse into one archive the boxes copy and unpack.

    anyway_bundle.py WHEELHOUSE OUT.tar LLAMA_VERSION

One file instead of dozens keeps the copy fast and its idempotence check cheap. The manifest
(MANIFEST.sha256: every wheel's sha256) goes in the archive, and its own sha256 is printed:
the play hands it to the box, which checks the manifest and every wheel against it
(anyway_verify_wheelhouse.py) before pip reads the wheelhouse. The archive
is reproducible (sorted members, fixed owner and times): the same wheels give the same bytes,
so an unchanged wheelhouse is not copied again. Anyway's own wheels are left out (the boxes
get the product wheel separately). Prints one JSON object: {"changed", "bundle", "wheels",
"llama_wheel", "llama_sha256", "manifest_sha256"}.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    if len(sys.argv) != 4:
        print("usage: anyway_bundle.py WHEELHOUSE OUT.tar LLAMA_VERSION", file=sys.stderr)
        return 2
    house, out, llama_version = sys.argv[1:]
    wheels = sorted(f for f in os.listdir(house) if f.endswith(".whl") and not f.startswith("anyway-"))
    llama = [f for f in wheels if f.startswith(f"llama_cpp_python-{llama_version}-")]
    if not llama:
        print(f"{house} has no llama_cpp_python-{llama_version}-*.whl", file=sys.stderr)
        return 1
    digests = {f: sha256(os.path.join(house, f)) for f in wheels}
    manifest = "".join(f"{digests[f]}  {f}\n" for f in wheels).encode()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, data: io.BufferedIOBase, size: int) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, 315532800, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, data)

        for f in wheels:
            path = os.path.join(house, f)
            with open(path, "rb") as data:
                add(f, data, os.path.getsize(path))
        add("MANIFEST.sha256", io.BytesIO(manifest), len(manifest))  # last: its presence means "complete"
    changed = not os.path.exists(out) or sha256(out) != sha256(tmp)
    if changed:
        os.replace(tmp, out)
    else:
        os.unlink(tmp)
    print(json.dumps({"changed": changed, "bundle": out, "wheels": len(wheels), "llama_wheel": llama[0],
                      "llama_sha256": digests[llama[0]], "manifest_sha256": hashlib.sha256(manifest).hexdigest()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
