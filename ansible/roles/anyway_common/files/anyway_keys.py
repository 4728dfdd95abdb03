#!/usr/bin/env python3
"""Generate the cluster's control-plane keys on the controller, once.

Writes the same four files as `anyway keys init DIR` (CurveZMQ certificates in pyzmq's
format), without needing Anyway or pyzmq on the controller: a Curve key pair is an X25519
key pair, Z85-encoded, and `cryptography` comes with ansible-core.

    DIR/server.key  DIR/server.key_secret   the head's pair
    DIR/client.key  DIR/client.key_secret   the workers' pair

Existing keys are never replaced (delete the directory to rotate them). Prints one JSON
object: {"changed": bool, "dir": DIR}.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
NAMES = ("server", "client")
BANNER = {
    "public": (
        "#   ****  Generated on {0} by Ansible (anyway_common)  ****\n"
        "#   ZeroMQ CURVE Public Certificate\n"
        "#   Exchange securely, or use a secure mechanism to verify the contents\n"
        "#   of this file after exchange.\n\n"
    ),
    "secret": (
        "#   ****  Generated on {0} by Ansible (anyway_common)  ****\n"
        "#   ZeroMQ CURVE **Secret** Certificate\n"
        "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n\n"
    ),
}


def z85_encode(data: bytes) -> str:
    assert len(data) % 4 == 0
    out = []
    for i in range(0, len(data), 4):
        value = int.from_bytes(data[i : i + 4], "big")
        chunk = []
        for _ in range(5):
            value, rem = divmod(value, 85)
            chunk.append(Z85[rem])
        out.extend(reversed(chunk))
    return "".join(out)


def keypair() -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    raw = serialization.Encoding.Raw
    secret = X25519PrivateKey.generate()
    sec = secret.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = secret.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    return z85_encode(pub), z85_encode(sec)


def write(path: str, banner: str, public: str, secret: str | None) -> None:
    body = banner.format(datetime.datetime.now()) + "metadata\ncurve\n" + f'    public-key = "{public}"\n'
    if secret:
        body += f'    secret-key = "{secret}"\n'
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(body)
    os.replace(path + ".tmp", path)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: anyway_keys.py DIR", file=sys.stderr)
        return 2
    d = sys.argv[1]
    files = [os.path.join(d, n + s) for n in NAMES for s in (".key", ".key_secret")]
    present = [f for f in files if os.path.exists(f)]
    if len(present) == len(files):
        print(json.dumps({"changed": False, "dir": d}))
        return 0
    if present:
        print(
            f"{d} holds only part of a key set ({', '.join(os.path.basename(p) for p in present)}): "
            "restore the missing files, or delete the directory to generate new keys "
            "(then every box gets the new keys on the next run)",
            file=sys.stderr,
        )
        return 1
    os.makedirs(d, mode=0o700, exist_ok=True)
    for name in NAMES:
        public, secret = keypair()
        write(os.path.join(d, name + ".key"), BANNER["public"], public, None)
        write(os.path.join(d, name + ".key_secret"), BANNER["secret"], public, secret)
    print(json.dumps({"changed": True, "dir": d}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
