"""Cluster identities: one for the head and one per node, each used on both planes.

Why per node: a box (or a USB stick with its keys) can be stolen. With one key per node the
head's allow-list names every box, a node may only claim its own name, and one stolen box
is revoked without re-keying the others (`anyway keys revoke`).

An identity is two key pairs under one name:

* a Curve25519 pair for the control plane (CurveZMQ, Z85-encoded as pyzmq writes them), and
* an Ed25519 pair with a self-signed X.509 certificate for the data plane (TLS 1.3, mutual
  authentication, the peer's exact certificate pinned; see `appliance.common.dataplane`).

`anyway keys init DIR` and `anyway keys add DIR NODE` write (the head reads DIR itself):

    DIR/server.key_secret      the head's identity (secret)                -> head only
    DIR/server.key             the head's public identity                  -> every node
    DIR/nodes/NODE.key         NODE's public identity: the allow-list      -> head only
    DIR/revoked/NODE.*.key     revoked identities (kept for the record)
    DIR/issued/NODE/           what to copy onto box NODE: node.key_secret, server.key

A node's keys directory holds `node.key_secret` (its own identity, secret) and `server.key`.
The files are text in ZeroMQ's certificate format (ZPL), so pyzmq's `load_certificate` reads
their Curve keys; the name and the TLS material are metadata:

    metadata
        name = "w1"
        tls-certificate = "<base64 DER>"
        tls-private-key = "<base64 PKCS#8 DER>"      (secret files only)
    curve
        public-key = "<Z85>"
        secret-key = "<Z85>"                         (secret files only)

Only the standard library and `cryptography` (to generate keys) are needed here: the same
code serves the CLI, the head, the worker, and is mirrored by the Ansible controller script.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

SERVER = "server"
NODE_SECRET = "node.key_secret"
NODES_DIR = "nodes"
REVOKED_DIR = "revoked"
ISSUED_DIR = "issued"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
Z85_RE = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
MAX_KEY_FILE_BYTES = 16 * 1024


class KeyError_(Exception):
    """Missing, unreadable or inconsistent key files; the message says which and what to do."""


@dataclass(frozen=True, kw_only=True)
class Identity:
    """A public identity: what a peer pins."""

    name: str
    curve_public: bytes
    """Z85, 40 bytes (CurveZMQ)."""
    tls_cert_der: bytes
    """The self-signed Ed25519 certificate presented in TLS handshakes."""

    @property
    def tls_cert_pem(self) -> str:
        import ssl

        return ssl.DER_cert_to_PEM_cert(self.tls_cert_der)

    @property
    def fingerprint(self) -> str:
        """sha256 of the certificate, shortened: what `anyway keys list` shows."""
        return hashlib.sha256(self.tls_cert_der).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class SecretIdentity:
    """An identity with its secret keys: only ever on its own box."""

    public: Identity
    curve_secret: bytes
    tls_key_der: bytes
    """PKCS#8 DER of the Ed25519 private key."""

    @property
    def name(self) -> str:
        return self.public.name

    @property
    def tls_key_pem(self) -> str:
        b64 = base64.encodebytes(self.tls_key_der).decode()
        return f"-----BEGIN PRIVATE KEY-----\n{b64}-----END PRIVATE KEY-----\n"


@dataclass(frozen=True, kw_only=True)
class HeadKeys:
    """What `anyway head --keys DIR` holds: its own identity and the directory of the allow-list."""

    server: SecretIdentity
    keys_dir: Path

    @property
    def public(self) -> bytes:
        return self.server.public.curve_public

    @property
    def secret(self) -> bytes:
        return self.server.curve_secret


@dataclass(frozen=True, kw_only=True)
class WorkerKeys:
    """What `anyway worker --keys DIR` holds: its own identity and the head's public one."""

    node: SecretIdentity
    head: Identity

    @property
    def public(self) -> bytes:
        return self.node.public.curve_public

    @property
    def secret(self) -> bytes:
        return self.node.curve_secret

    @property
    def server_public(self) -> bytes:
        return self.head.curve_public


# ----------------------------------------------------------------------- generation
def _z85(data: bytes) -> bytes:
    alphabet = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
    out = bytearray()
    for i in range(0, len(data), 4):
        value = int.from_bytes(data[i : i + 4], "big")
        chunk = []
        for _ in range(5):
            value, rem = divmod(value, 85)
            chunk.append(alphabet[rem])
        out.extend(reversed(chunk))
    return bytes(out)


def generate(name: str) -> SecretIdentity:
    """A fresh identity: a Curve25519 pair and an Ed25519 key with its self-signed certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.x509.oid import NameOID

    check_name(name)
    raw = serialization.Encoding.Raw
    curve = X25519PrivateKey.generate()
    curve_secret = curve.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    curve_public = curve.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    key = Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "anyway"), x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Pinned, never chained: validity is not what protects it (revocation is the allow-list).
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc))
        .not_valid_after(datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)
    )
    return SecretIdentity(
        public=Identity(name=name, curve_public=_z85(curve_public), tls_cert_der=cert.public_bytes(serialization.Encoding.DER)),
        curve_secret=_z85(curve_secret),
        tls_key_der=key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise KeyError_(f"{name!r} is not a node name: 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


# ----------------------------------------------------------------------- file format
def render(identity: Identity | SecretIdentity, *, what: str) -> str:
    """The text of a key file (ZPL, readable by pyzmq's load_certificate)."""
    pub = identity.public if isinstance(identity, SecretIdentity) else identity
    secret = isinstance(identity, SecretIdentity)
    lines = [
        f"#   Anyway {what}: {pub.name}",
        "#   **SECRET**: keep this file on its own box only (mode 0600)." if secret
        else "#   Public: a peer pins these keys; hand it over by a channel you trust.",
        "",
        "metadata",
        f'    name = "{pub.name}"',
        f'    tls-certificate = "{base64.b64encode(pub.tls_cert_der).decode()}"',
    ]
    if isinstance(identity, SecretIdentity):
        lines.append(f'    tls-private-key = "{base64.b64encode(identity.tls_key_der).decode()}"')
    lines += ["curve", f'    public-key = "{pub.curve_public.decode()}"']
    if isinstance(identity, SecretIdentity):
        lines.append(f'    secret-key = "{identity.curve_secret.decode()}"')
    return "\n".join(lines) + "\n"


def parse(text: str, *, where: str, secret: bool) -> SecretIdentity | Identity:
    """Parse a key file's text; `KeyError_` names the file and the problem."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#") or s in ("metadata", "curve"):
            continue
        key, sep, value = s.partition("=")
        if not sep:
            raise KeyError_(f"{where}: not a key file (line {s[:40]!r})")
        fields[key.strip()] = value.strip().strip("\"'")
    name = fields.get("name", "")
    pub, cert = fields.get("public-key", ""), fields.get("tls-certificate", "")
    if "public-key" in fields and "tls-certificate" not in fields:
        raise KeyError_(
            f"{where}: a key file of the old format (one key pair shared by all workers); issue this box its own "
            "identity: 'anyway keys add DIR NAME' where the cluster's keys are, then copy DIR/issued/NAME/ here"
        )
    if not name or not Z85_RE.match(pub) or not cert:
        raise KeyError_(f"{where}: not an Anyway key file (needs name, public-key and tls-certificate)")
    try:
        der = base64.b64decode(cert, validate=True)
    except (binascii.Error, ValueError):
        raise KeyError_(f"{where}: tls-certificate is not base64") from None
    ident = Identity(name=check_name(name), curve_public=pub.encode(), tls_cert_der=der)
    if not secret:
        return ident
    sec, tls_key = fields.get("secret-key", ""), fields.get("tls-private-key", "")
    if not Z85_RE.match(sec) or not tls_key:
        raise KeyError_(f"{where}: has no secret keys (this is a public key file; the box needs its .key_secret file)")
    try:
        key_der = base64.b64decode(tls_key, validate=True)
    except (binascii.Error, ValueError):
        raise KeyError_(f"{where}: tls-private-key is not base64") from None
    return SecretIdentity(public=ident, curve_secret=sec.encode(), tls_key_der=key_der)


def _read(path: Path) -> str:
    if not path.is_file():
        raise KeyError_(f"{path}: missing")
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise KeyError_(f"{path}: too large for a key file")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyError_(f"{path}: cannot read it ({exc})") from None


def read_public(path: Path) -> Identity:
    ident = parse(_read(path), where=str(path), secret=False)
    assert isinstance(ident, Identity)
    return ident


def read_public_text(text: str, *, where: str) -> Identity:
    ident = parse(text, where=where, secret=False)
    assert isinstance(ident, Identity)
    return ident


def read_secret(path: Path) -> SecretIdentity:
    ident = parse(_read(path), where=str(path), secret=True)
    assert isinstance(ident, SecretIdentity)
    return ident


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# ----------------------------------------------------------------------- the cluster directory
def init_keys(directory: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Make the head's identity in DIR (with empty nodes/, revoked/, issued/)."""
    d = Path(directory)
    old = [p.name for p in (d / "client.key_secret", d / f"{SERVER}.key_secret") if p.exists()]
    if old and not force:
        raise KeyError_(f"{d}: keys already exist ({', '.join(old)}); use --force to replace them (every node must then be re-issued)")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    if force:
        for sub in (NODES_DIR, ISSUED_DIR):
            shutil.rmtree(d / sub, ignore_errors=True)
        for p in ("client.key", "client.key_secret"):
            (d / p).unlink(missing_ok=True)
    head = generate("head")
    _write(d / f"{SERVER}.key_secret", render(head, what="head identity"), 0o600)
    _write(d / f"{SERVER}.key", render(head.public, what="head public identity"), 0o644)
    for sub in (NODES_DIR, REVOKED_DIR, ISSUED_DIR):
        (d / sub).mkdir(mode=0o700, exist_ok=True)
    return d


def add_node(directory: str | os.PathLike[str], name: str, *, force: bool = False) -> Path:
    """Issue NAME its own identity: allow-list entry in DIR/nodes, bundle in DIR/issued/NAME."""
    d = Path(directory)
    check_name(name)
    head = read_public(d / f"{SERVER}.key")
    entry = d / NODES_DIR / f"{name}.key"
    if entry.exists():
        if not force:
            raise KeyError_(f"{name} already has a key ({entry}); 'anyway keys revoke' it first, or use --force to replace it")
        revoke_node(d, name)
    ident = generate(name)
    bundle = d / ISSUED_DIR / name
    bundle.mkdir(parents=True, exist_ok=True)
    os.chmod(bundle, 0o700)
    _write(bundle / NODE_SECRET, render(ident, what="node identity"), 0o600)
    _write(bundle / f"{SERVER}.key", render(head, what="head public identity"), 0o644)
    # Last: once the allow-list names it, the head accepts it.
    _write(entry, render(ident.public, what="node public identity (allow-list)"), 0o644)
    return bundle


def revoke_node(directory: str | os.PathLike[str], name: str) -> Path:
    """Take NAME off the allow-list (the head refuses it within KEYS_RELOAD_INTERVAL_S) and
    delete its issued bundle; the revoked entry is kept under DIR/revoked for the record."""
    d = Path(directory)
    entry = d / NODES_DIR / f"{check_name(name)}.key"
    if not entry.exists():
        raise KeyError_(f"{name} has no key in {d / NODES_DIR}")
    dest = d / REVOKED_DIR / f"{name}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}.key"
    dest.parent.mkdir(mode=0o700, exist_ok=True)
    os.replace(entry, dest)
    shutil.rmtree(d / ISSUED_DIR / name, ignore_errors=True)
    return dest


def list_nodes(directory: str | os.PathLike[str]) -> tuple[list[Identity], list[tuple[str, Identity]]]:
    """(allowed identities, [(file name, revoked identity)])."""
    d = Path(directory)
    allowed = load_allow_list(d).values()
    revoked = []
    for p in sorted((d / REVOKED_DIR).glob("*.key")):
        try:
            revoked.append((p.name, read_public(p)))
        except KeyError_:
            continue
    return sorted(allowed, key=lambda i: i.name), revoked


def load_allow_list(directory: str | os.PathLike[str], *, errors: list[str] | None = None) -> dict[str, Identity]:
    """NODE -> its public identity, from DIR/nodes/*.key. A file whose name does not match the
    identity's name, or a key used twice, is an error (a node may only be who its key says).
    With `errors`, a bad file is left out (fail closed) and described there instead of raising."""
    d = Path(directory) / NODES_DIR
    out: dict[str, Identity] = {}
    seen: dict[bytes, str] = {}
    for p in sorted(d.glob("*.key")) if d.is_dir() else []:
        try:
            ident = read_public(p)
            if ident.name != p.stem:
                raise KeyError_(f"{p}: holds the key of {ident.name!r}, not {p.stem!r}")
            if ident.curve_public in seen:
                raise KeyError_(f"{p}: the same key as {seen[ident.curve_public]!r}")
        except KeyError_ as exc:
            if errors is None:
                raise
            errors.append(str(exc))
            continue
        seen[ident.curve_public] = ident.name
        out[ident.name] = ident
    return out


def allow_list_stamp(directory: str | os.PathLike[str]) -> tuple[tuple[str, int, int], ...]:
    """A cheap fingerprint of DIR/nodes (names, sizes, mtimes): the head reloads when it changes."""
    d = Path(directory) / NODES_DIR
    out = []
    try:
        for entry in os.scandir(d):
            if entry.name.endswith(".key"):
                st = entry.stat()
                out.append((entry.name, st.st_size, st.st_mtime_ns))
    except OSError:
        pass
    return tuple(sorted(out))


def load_head_keys(directory: str | os.PathLike[str]) -> HeadKeys:
    d = Path(directory)
    if (d / "client.key_secret").exists() or ((d / "client.key").exists() and not (d / NODES_DIR).is_dir()):
        raise KeyError_(
            f"{d}: holds the old shared worker key (client.key); every node now has its own: run "
            f"'anyway keys init {d} --force', then 'anyway keys add {d} NAME' for each worker and copy "
            f"{d}/{ISSUED_DIR}/NAME/ to it"
        )
    server = read_secret(d / f"{SERVER}.key_secret")
    load_allow_list(d)  # fail at start-up, in one line, on a broken allow-list
    return HeadKeys(server=server, keys_dir=d)


def load_worker_keys(directory: str | os.PathLike[str]) -> WorkerKeys:
    d = Path(directory)
    if not (d / NODE_SECRET).exists() and (d / "client.key_secret").exists():
        raise KeyError_(
            f"{d}: holds the old shared worker key (client.key_secret); issue this box its own identity: "
            f"'anyway keys add DIR NAME' where the cluster's keys are, then copy DIR/{ISSUED_DIR}/NAME/ here"
        )
    if not (d / NODE_SECRET).exists():
        raise KeyError_(f"{d / NODE_SECRET}: missing ('anyway keys add DIR NAME' makes it in DIR/{ISSUED_DIR}/NAME/)")
    return WorkerKeys(node=read_secret(d / NODE_SECRET), head=read_public(d / f"{SERVER}.key"))
