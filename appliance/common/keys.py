"""Cluster key material for CurveZMQ on the control plane.

`anyway keys init DIR` writes two Curve key pairs:

    DIR/server.key          head's public key      -> every node
    DIR/server.key_secret   head's secret key      -> the head only
    DIR/client.key          workers' public key    -> the head (its allow-list)
    DIR/client.key_secret   workers' secret key    -> every worker

A worker without `client.key_secret` matching the head's allow-list, or with another
cluster's `server.key`, cannot complete the handshake; the head logs the refusal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

SERVER = "server"
CLIENT = "client"


class KeyError_(Exception):
    """Missing or unreadable key files; the message says which."""


@dataclass(frozen=True)
class HeadKeys:
    public: bytes
    secret: bytes
    allowed_clients_dir: Path


@dataclass(frozen=True)
class WorkerKeys:
    public: bytes
    secret: bytes
    server_public: bytes


def init_keys(directory: str | os.PathLike[str], *, force: bool = False) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    existing = [p for p in (d / f"{SERVER}.key_secret", d / f"{CLIENT}.key_secret") if p.exists()]
    if existing and not force:
        raise KeyError_(f"{d}: keys already exist ({', '.join(p.name for p in existing)}); use --force to replace them")
    for name in (SERVER, CLIENT):
        for suffix in (".key", ".key_secret"):
            (d / f"{name}{suffix}").unlink(missing_ok=True)
        zmq.auth.create_certificates(str(d), name)
        os.chmod(d / f"{name}.key_secret", 0o600)
    return d


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise KeyError_(f"{path}: missing (run 'anyway keys init DIR' and copy the files)")
    try:
        pub, sec = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"{path}: not a valid key file ({exc})") from None
    if secret and not sec:
        raise KeyError_(f"{path}: has no secret key")
    return pub, sec


def load_head_keys(directory: str | os.PathLike[str]) -> HeadKeys:
    d = Path(directory)
    pub, sec = _load(d / f"{SERVER}.key_secret", secret=True)
    _load(d / f"{CLIENT}.key", secret=False)
    assert sec is not None
    return HeadKeys(public=pub, secret=sec, allowed_clients_dir=d)


def load_worker_keys(directory: str | os.PathLike[str]) -> WorkerKeys:
    d = Path(directory)
    pub, sec = _load(d / f"{CLIENT}.key_secret", secret=True)
    server_pub, _ = _load(d / f"{SERVER}.key", secret=False)
    assert sec is not None
    return WorkerKeys(public=pub, secret=sec, server_public=server_pub)
