#!/usr/bin/env python3
"""Split the hash-pinned lock (requirements.lock, made by pip-compile) for what is built here.

    anyway_lock.py LOCK OUT_DIR LLAMA_VERSION

Writes OUT_DIR/deps.txt (every locked requirement but llama-cpp-python, with its hashes) and
OUT_DIR/llama.txt (llama-cpp-python alone, with the hashes of its source distribution): the
dependencies come from the index exactly as locked, while llama-cpp-python is compiled (with
RPC and the box's accelerator) from a source archive whose hash the lock pins. Prints one
JSON object: {"changed", "deps", "llama", "llama_sdist_hashes"}.
"""

from __future__ import annotations

import json
import os
import re
import sys


def blocks(text: str) -> list[list[str]]:
    """The lock's requirements, each as its lines (the requirement and its --hash lines)."""
    out: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and out:
            out[-1].append(line)
        else:
            out.append([line])
    return out


def write(path: str, text: str) -> bool:
    if os.path.exists(path) and open(path, encoding="utf-8").read() == text:
        return False
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return True


def main() -> int:
    if len(sys.argv) != 4:
        print("usage: anyway_lock.py LOCK OUT_DIR LLAMA_VERSION", file=sys.stderr)
        return 2
    lock, out, version = sys.argv[1:]
    reqs = blocks(open(lock, encoding="utf-8").read())
    llama = [b for b in reqs if re.match(r"llama-cpp-python==", b[0])]
    deps = [b for b in reqs if b not in llama]
    if len(llama) != 1 or not llama[0][0].startswith(f"llama-cpp-python=={version} "):
        print(f"{lock} does not pin llama-cpp-python=={version}: regenerate it (make lock) for the version you deploy",
              file=sys.stderr)
        return 1
    unhashed = [b[0].split()[0] for b in reqs if not any("--hash=sha256:" in line for line in b)]
    if unhashed:
        print(f"{lock}: no hashes for {', '.join(unhashed)}", file=sys.stderr)
        return 1
    os.makedirs(out, mode=0o700, exist_ok=True)
    header = f"# From {os.path.basename(lock)} by anyway_lock.py: install with pip --require-hashes.\n"
    changed = write(os.path.join(out, "deps.txt"), header + "".join("\n".join(b) + "\n" for b in deps))
    changed = write(os.path.join(out, "llama.txt"), header + "\n".join(llama[0]) + "\n") or changed
    hashes = re.findall(r"--hash=(sha256:[0-9a-f]{64})", "\n".join(llama[0]))
    print(json.dumps({"changed": changed, "deps": os.path.join(out, "deps.txt"), "llama": os.path.join(out, "llama.txt"),
                      "llama_sdist_hashes": hashes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
