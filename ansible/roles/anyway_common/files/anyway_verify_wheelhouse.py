#!/usr/bin/env python3
"""Check an unpacked wheelhouse on a box against its manifest, before pip reads any of it.

    anyway_verify_wheelhouse.py HOUSE MANIFEST_SHA256

The manifest (MANIFEST.sha256, written by anyway_bundle.py on the controller) lists every
wheel with its sha256; the manifest's own sha256 comes from the controller, not from the box.
A wheel that is missing, changed, or not in the manifest stops the play with its name.
Only the standard library: it runs with the box's own python3. Exit 0, or 1 with the problems.
"""

from __future__ import annotations

import hashlib
import os
import sys


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: anyway_verify_wheelhouse.py HOUSE MANIFEST_SHA256", file=sys.stderr)
        return 2
    house, expected = sys.argv[1], sys.argv[2].lower()
    manifest = os.path.join(house, "MANIFEST.sha256")
    problems = []
    if not os.path.isfile(manifest):
        problems.append("MANIFEST.sha256 is missing")
    elif sha256(manifest) != expected:
        problems.append("MANIFEST.sha256 is not the manifest the controller packed (changed on the way or on the box)")
    else:
        listed = {}
        for line in open(manifest, encoding="utf-8"):
            digest, _, name = line.strip().partition("  ")
            if name:
                listed[name] = digest
        present = {f for f in os.listdir(house) if f != "MANIFEST.sha256"}
        for name in sorted(present - set(listed)):
            problems.append(f"{name} is not in the manifest")
        for name, digest in sorted(listed.items()):
            if name not in present:
                problems.append(f"{name} is missing")
            elif sha256(os.path.join(house, name)) != digest:
                problems.append(f"{name} does not match its sha256 in the manifest")
    if problems:
        print(f"the wheelhouse {house} failed verification: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"{house}: every wheel matches the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
