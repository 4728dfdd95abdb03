#!/usr/bin/env python3
"""Issue the cluster's identities on the controller: the head's, and one per worker.

    anyway_keys.py DIR --nodes w1,w2,... [--revoke w3,...]

Writes what `anyway keys init DIR` and `anyway keys add DIR NODE` write (same file format,
appliance/common/keys.py), without needing Anyway or pyzmq on the controller: a Curve key is
an X25519 key, Z85-encoded, and `cryptography` comes with ansible-core.

    DIR/server.key_secret  DIR/server.key     the head's identity (secret / public)
    DIR/nodes/NODE.key                        NODE's public identity: the head's allow-list
    DIR/issued/NODE/node.key_secret           NODE's own identity (goes to that box only)
    DIR/revoked/NODE.<time>.key               identities taken off the allow-list

Every node gets its own keys; existing ones are never replaced. A node named in --revoke is
taken off the allow-list and its issued secret deleted (it is issued a fresh identity only
once it is no longer named there). Prints one JSON object: {"changed", "dir", "issued",
"revoked"}.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import re
import shutil
import sys
import time

Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


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


def identity(name: str) -> dict[str, str]:
    """A Curve25519 pair and an Ed25519 key with its self-signed certificate (appliance.common.keys.generate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.x509.oid import NameOID

    raw = serialization.Encoding.Raw
    curve = X25519PrivateKey.generate()
    key = Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "anyway"), x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc))
        .not_valid_after(datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)
    )
    return {
        "name": name,
        "curve_public": z85_encode(curve.public_key().public_bytes(raw, serialization.PublicFormat.Raw)),
        "curve_secret": z85_encode(curve.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())),
        "tls_cert": base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode(),
        "tls_key": base64.b64encode(
            key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        ).decode(),
    }


def render(ident: dict[str, str], *, what: str, secret: bool) -> str:
    lines = [
        f"#   Anyway {what}: {ident['name']}",
        "#   **SECRET**: keep this file on its own box only (mode 0600)." if secret
        else "#   Public: a peer pins these keys; hand it over by a channel you trust.",
        "",
        "metadata",
        f'    name = "{ident["name"]}"',
        f'    tls-certificate = "{ident["tls_cert"]}"',
    ]
    if secret:
        lines.append(f'    tls-private-key = "{ident["tls_key"]}"')
    lines += ["curve", f'    public-key = "{ident["curve_public"]}"']
    if secret:
        lines.append(f'    secret-key = "{ident["curve_secret"]}"')
    return "\n".join(lines) + "\n"


def write(path: str, text: str, mode: int) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path + ".tmp", mode)
    os.replace(path + ".tmp", path)


def names(text: str) -> list[str]:
    out = [n for n in (x.strip() for x in text.split(",")) if n]
    bad = [n for n in out if not NAME_RE.match(n)]
    if bad:
        raise SystemExit(f"not node names: {', '.join(bad)} (letters, digits, '.', '_', '-')")
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="anyway_keys.py")
    p.add_argument("dir")
    p.add_argument("--nodes", default="", help="comma-separated node names that must have an identity")
    p.add_argument("--revoke", default="", help="comma-separated node names to take off the allow-list")
    args = p.parse_args()
    d = args.dir
    nodes, revoke = names(args.nodes), set(names(args.revoke))
    server_files = [os.path.join(d, "server.key"), os.path.join(d, "server.key_secret")]
    present = [f for f in server_files if os.path.exists(f)]
    if os.path.exists(os.path.join(d, "client.key_secret")) or (present and len(present) != len(server_files)):
        print(
            f"{d} holds an old (shared worker key) or partial key set: move it away to issue every box its own "
            "identity (every box then gets new keys on the next run)",
            file=sys.stderr,
        )
        return 1
    changed = False
    os.makedirs(d, mode=0o700, exist_ok=True)
    if not present:
        head = identity("head")
        write(os.path.join(d, "server.key_secret"), render(head, what="head identity", secret=True), 0o600)
        write(os.path.join(d, "server.key"), render(head, what="head public identity", secret=False), 0o644)
        changed = True
    with open(os.path.join(d, "server.key"), encoding="utf-8") as f:
        head_public = f.read()
    issued, revoked = [], []
    for name in sorted(revoke):
        entry = os.path.join(d, "nodes", f"{name}.key")
        if os.path.exists(entry):
            dest = os.path.join(d, "revoked", f"{name}.{time.strftime('%Y%m%dT%H%M%S')}.key")
            os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
            os.replace(entry, dest)
            shutil.rmtree(os.path.join(d, "issued", name), ignore_errors=True)
            revoked.append(name)
            changed = True
    for name in nodes:
        if name in revoke:
            continue
        entry = os.path.join(d, "nodes", f"{name}.key")
        bundle = os.path.join(d, "issued", name)
        if os.path.exists(entry) and os.path.exists(os.path.join(bundle, "node.key_secret")):
            continue
        ident = identity(name)
        write(os.path.join(bundle, "node.key_secret"), render(ident, what="node identity", secret=True), 0o600)
        write(os.path.join(bundle, "server.key"), head_public, 0o644)
        write(entry, render(ident, what="node public identity (allow-list)", secret=False), 0o644)
        issued.append(name)
        changed = True
    print(json.dumps({"changed": changed, "dir": d, "issued": issued, "revoked": revoked}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
