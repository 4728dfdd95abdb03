"""anyway-firstboot: turn the boot partition's `anyway.conf` into a configured worker.

Runs at every boot (anyway-firstboot.service, before anyway-worker.service) on the appliance
image. It reads `/boot/anyway/anyway.conf` (the FAT partition an operator can edit on any
computer), checks every line, prints what is wrong on the console (screen and serial), and only
when everything is valid writes the worker's configuration:

    /etc/anyway/worker.yml        options for `anyway worker --config` (the unit's command)
    /etc/anyway/keys/             node.key_secret (this box's own identity), server.key (the head's)
    /etc/anyway/firewall.nft      the RPC port, reachable only from the head (nftables)
    /root/.ssh/authorized_keys    operator SSH keys (password logins are off)
    /etc/hostname                 the node name

Exit status 0: configured, the worker starts. 1: the file is invalid, nothing was changed and
the worker does not start (its unit Requires= this one).

    anyway-firstboot check [FILE]          validate only (operators, tests)
    anyway-firstboot apply [FILE] [--root DIR]   validate and write the files under DIR
    anyway-firstboot boot                  what the unit runs (one-time tasks + apply + console)

The file format (key = value; `#` starts a comment line, and " #" a comment after a value) is
in docs/IMAGES.md and in the example on the boot partition (images/bootpart/anyway.conf).
Each box has its own identity (`anyway keys add DIR NAME` on the head: DIR/issued/NAME/), whose
name is the node's name. The firewall never opens the RPC port beyond the head: a head given by
name needs `rpc_allow` with its address. Uses the standard library, pyzmq and the product's
key format (appliance.common.keys), all in the image's venv.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import difflib
import ipaddress
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PROG = "anyway-firstboot"
BOOT_DIR = Path("/boot/anyway")
DEFAULT_CONFIG = BOOT_DIR / "anyway.conf"
DEFAULT_CONTROL_PORT = 5555
DEFAULT_RPC_PORT = 50052
ETC = Path("etc/anyway")
STATE = Path("var/lib/anyway")
IMAGE_RELEASE = Path("etc/anyway/image-release")
KEY_FILES = ("node.key_secret", "server.key")
OLD_KEY_FILES = ("client.key_secret", "client.key")
INLINE_KEYS = ("client_key_secret", "client_key", "server_key")

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
SIZE_RE = re.compile(r"^\d+(\.\d+)?\s*([kmgt](i?b)?)?$", re.IGNORECASE)

# key -> one-line help, used in "unknown key" messages and the example file.
KNOWN_KEYS = {
    "head": "the head's control address, HOST:PORT (port 5555 if left out)",
    "name": "node name shown in the dashboard (default, and it must be: the name its keys were issued for)",
    "keys": "folder next to anyway.conf with this box's node.key_secret and server.key (default: keys)",
    "client_key_secret": "no longer used: each box has its own keys folder (node.key_secret, server.key)",
    "client_key": "no longer used: each box has its own keys folder (node.key_secret, server.key)",
    "server_key": "no longer used: each box has its own keys folder (node.key_secret, server.key)",
    "rpc_port": "TCP port of the llama.cpp RPC server (default 50052)",
    "rpc_host": "address the RPC server binds (default: the one the head sees)",
    "rpc_advertise": "HOST:PORT the head should dial for the RPC server (NAT, port forwarding)",
    "rpc_allow": "addresses allowed to reach the RPC port (default: the head's address; needed when head is a name)",
    "firewall": "yes/no: restrict the RPC port with nftables (default yes)",
    "threads": "CPU threads for the RPC server (default: all)",
    "max_memory": "memory offered to the cluster, e.g. 6G (default: what is free)",
    "ssh_key": "an SSH public key for root (repeat the line for several keys)",
    "authorized_keys": "file next to anyway.conf with SSH public keys for root (default: authorized_keys)",
    "scrub_keys": "yes/no: delete the key files from the boot partition once installed (default no)",
}
REPEATABLE = {"ssh_key"}


@dataclass
class Problem:
    where: str  # "anyway.conf line 3", "keys/client.key", ...
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


@dataclass
class WorkerSettings:
    """A validated anyway.conf."""

    head: str  # tcp://HOST:PORT
    head_host: str
    head_port: int
    name: str | None
    rpc_port: int = DEFAULT_RPC_PORT
    rpc_host: str | None = None
    rpc_advertise: str | None = None
    rpc_allow: list[str] = field(default_factory=list)
    rpc_allow_source: str = ""
    firewall: bool = True
    threads: int | None = None
    max_memory: str | None = None
    ssh_keys: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # file name -> file text
    keys_source: str = ""
    keys_dir: Path | None = None  # the boot partition's keys folder, if used
    scrub_keys: bool = False
    warnings: list[str] = field(default_factory=list)


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


# ------------------------------------------------------------------------------ parsing
def read_lines(path: Path) -> list[tuple[int, str, str]]:
    """(line number, key, value) for each setting; raises ConfigError on syntax errors.

    `#` starts a comment only at the beginning of a line: keys (Z85) may contain '#'.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), "missing: there is no anyway.conf on the boot partition")]) from None
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read it: {exc.strerror or exc}")]) from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError([Problem(path.name, "is saved as UTF-16; save it as UTF-8 or plain text")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(path.name, f"is not UTF-8 text (byte {exc.start}); save it as plain text")]) from None
    out: list[tuple[int, str, str]] = []
    problems: list[Problem] = []
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith(("#", ";")):
            continue
        key, sep, value = s.partition("=")
        if not sep:
            key2, sep2, value2 = s.partition(":")
            hint = f" (write '{key2.strip()} = {value2.strip()}')" if sep2 and " " not in key2.strip() else ""
            problems.append(Problem(f"{path.name} line {no}", f"expected 'key = value', got {s[:60]!r}{hint}"))
            continue
        key = key.strip().lower().replace("-", "_")
        value = value.strip()
        if value[:1] in ("'", '"'):
            end = value.find(value[0], 1)
            rest = value[end + 1 :].strip() if end > 0 else ""
            if end < 0 or (rest and not rest.startswith("#")):
                problems.append(Problem(f"{path.name} line {no}", f"{key}: unbalanced quotes in {value[:60]!r}"))
                continue
            value = value[1:end].strip()
        else:
            # "value   # comment": a comment needs a space before '#', keys may contain '#'.
            value = re.sub(r"\s+#.*$", "", value)
        out.append((no, key, value))
    if problems:
        raise ConfigError(problems)
    return out


def parse_head(value: str) -> tuple[str, int]:
    """'HOST', 'HOST:PORT', 'tcp://HOST:PORT', '[v6]:PORT' -> (host, port); ValueError says why."""
    v = value.strip()
    if "://" in v:
        scheme, _, rest = v.partition("://")
        if scheme.lower() != "tcp":
            raise ValueError(
                f"{value!r}: the head's control address is tcp://HOST:PORT (port 5555 by default), "
                f"not {scheme}:// (8080 is the HTTP API, not the control port)"
            )
        v = rest
    v = v.rstrip("/")
    if not v:
        raise ValueError("is empty: give the head's address, e.g. head = 192.168.1.10:5555")
    if "/" in v:
        raise ValueError(f"{value!r}: expected HOST:PORT, e.g. 192.168.1.10:5555 (no path)")
    if v.startswith("["):
        host, sep, rest = v[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r}: missing ']' after the IPv6 address")
        port_s = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected [IPv6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    elif v.count(":") > 1:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, e.g. [fd00::10]:5555")
    else:
        host, _, port_s = v.partition(":")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{value!r}: {host!r} is not an IPv4 address") from None
        elif not HOSTNAME_RE.match(host):
            raise ValueError(f"{value!r}: {host!r} is not a host name or IP address")
    if port_s == "":
        port = DEFAULT_CONTROL_PORT
    else:
        if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
            raise ValueError(f"{value!r}: port {port_s!r} must be a number from 1 to 65535")
        port = int(port_s)
    return host, port


def _yes_no(value: str) -> bool:
    v = value.strip().lower()
    if v in ("yes", "y", "true", "on", "1"):
        return True
    if v in ("no", "n", "false", "off", "0"):
        return False
    raise ValueError(f"{value!r}: write yes or no")


def _suggest_name(value: str) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")[:63].strip("-")
    return s or "worker-1"


def _check_ssh_key(line: str) -> str | None:
    """None if `line` looks like an OpenSSH public key, else why not."""
    parts = line.split()
    # authorized_keys lines may start with options; accept the usual layout only.
    idx = next((i for i, p in enumerate(parts) if p in SSH_KEY_TYPES), None)
    if idx is None:
        return f"not an SSH public key (expected one of {', '.join(SSH_KEY_TYPES[:3])}, ...): {line[:40]!r}"
    if idx + 1 >= len(parts):
        return f"the {parts[idx]} key has no key data"
    try:
        blob = base64.b64decode(parts[idx + 1], validate=True)
    except (binascii.Error, ValueError):
        return f"the {parts[idx]} key data is not base64 (copied incompletely?)"
    if len(blob) < 4 or int.from_bytes(blob[:4], "big") + 4 > len(blob) or blob[4 : 4 + int.from_bytes(blob[:4], "big")].decode(errors="replace") != parts[idx]:
        return f"the {parts[idx]} key data does not match its type (copied incompletely?)"
    return None


def _load_key_text(text: str, label: str, *, secret: bool) -> object:
    """Parse a key file (the product's format, appliance.common.keys); ValueError says why."""
    from appliance.common.keys import KeyError_, parse

    try:
        ident = parse(text, where=label, secret=secret)
    except KeyError_ as exc:
        raise ValueError(str(exc).removeprefix(f"{label}: ")) from None
    if secret:
        import zmq

        try:
            derived = zmq.curve_public(ident.curve_secret)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - libzmq's own complaint
            raise ValueError(f"the secret key is not valid ({exc})") from None
        if derived != ident.public.curve_public:  # type: ignore[attr-defined]
            raise ValueError("its public and secret keys do not belong together (edited or damaged?)")
    return ident


def _line_of(p: Problem) -> int:
    m = re.search(r" line (\d+)$", p.where)
    return int(m.group(1)) if m else 1 << 30


def parse_config(path: Path, *, installed_keys: Path | None = None) -> WorkerSettings:
    """Validate anyway.conf (and the files it points to); ConfigError lists every problem.

    `installed_keys`: keys installed by an earlier boot, used when the boot partition has none
    (after `scrub_keys = yes`).
    """
    entries = read_lines(path)
    base = path.parent
    fname = path.name
    problems: list[Problem] = []
    values: dict[str, tuple[int, str]] = {}
    repeated: dict[str, list[tuple[int, str]]] = {k: [] for k in REPEATABLE}
    for no, key, value in entries:
        where = f"{fname} line {no}"
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, list(KNOWN_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(KNOWN_KEYS)})"
            problems.append(Problem(where, f"unknown setting {key!r}{hint}"))
            continue
        if key in REPEATABLE:
            repeated[key].append((no, value))
            continue
        if key in values:
            problems.append(Problem(where, f"{key!r} is set twice (first on line {values[key][0]})"))
            continue
        values[key] = (no, value)

    def get(key: str) -> tuple[str, str] | None:
        if key not in values:
            return None
        no, v = values[key]
        return f"{fname} line {no}", v

    def check(key: str, fn: Callable[[str], object]) -> object:
        got = get(key)
        if got is None:
            return None
        where, v = got
        try:
            return fn(v)
        except ValueError as exc:
            problems.append(Problem(where, f"{key}: {exc}"))
            return None

    # head
    head_host, head_port = "", 0
    got = get("head")
    if got is None or not got[1]:
        problems.append(
            Problem(
                got[0] if got else fname,
                "head is not set: add a line like 'head = 192.168.1.10:5555' "
                "(the address of the machine running 'anyway head', control port 5555)",
            )
        )
    else:
        try:
            head_host, head_port = parse_head(got[1])
        except ValueError as exc:
            problems.append(Problem(got[0], f"head {exc}"))

    # name
    name: str | None = None
    got = get("name")
    if got is not None and got[1]:
        if NAME_RE.match(got[1]):
            name = got[1]
        else:
            problems.append(
                Problem(
                    got[0],
                    f"name {got[1]!r}: use 1-63 lowercase letters, digits and '-', not starting or "
                    f"ending with '-' (for example {_suggest_name(got[1])!r})",
                )
            )

    def port(v: str) -> int:
        if not v.isdigit() or not 1 <= int(v) <= 65535:
            raise ValueError(f"{v!r} must be a port number from 1 to 65535")
        return int(v)

    rpc_port = check("rpc_port", port) or DEFAULT_RPC_PORT

    def ip(v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address of this machine (e.g. 192.168.1.21)") from None

    rpc_host = check("rpc_host", ip)

    def advertise(v: str) -> str:
        if v.startswith("tcp://"):
            raise ValueError(f"{v!r}: write HOST:PORT without tcp://")
        h, p = parse_head(v)
        if ":" not in v.rsplit("]", 1)[-1]:
            raise ValueError(f"{v!r}: give the port too, HOST:PORT")
        return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"

    rpc_advertise = check("rpc_advertise", advertise)

    def threads(v: str) -> int:
        if not v.isdigit():
            raise ValueError(f"{v!r} must be a whole number (0: all cores)")
        return int(v)

    n_threads = check("threads", threads)

    def size(v: str) -> str:
        if not SIZE_RE.match(v.strip()):
            raise ValueError(f"{v!r} is not a memory size (examples: 6G, 512M, 1.5GiB)")
        return v.strip()

    max_memory = check("max_memory", size)
    firewall = check("firewall", _yes_no)
    scrub = check("scrub_keys", _yes_no)

    def networks(v: str) -> list[str]:
        out = []
        for item in re.split(r"[\s,]+", v.strip()):
            if not item:
                continue
            try:
                out.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network (e.g. 192.168.1.10 or 192.168.1.0/24)") from None
        if not out:
            raise ValueError("is empty")
        return out

    rpc_allow = check("rpc_allow", networks)

    # keys: this box's own identity
    keys: dict[str, str] = {}
    keys_source = ""
    keys_dir: Path | None = None
    key_name: str | None = None
    inline = [(k, get(k)) for k in INLINE_KEYS if get(k)]
    for k, got in inline:
        problems.append(Problem(got[0], f"{k}: keys are no longer pasted here: every box has its own identity. On the "
                                        "head run 'anyway keys add DIR NAME' and copy DIR/issued/NAME/ (node.key_secret, "
                                        "server.key) into the keys folder next to anyway.conf"))
    got_dir = get("keys")
    kdir = base / (got_dir[1] if got_dir and got_dir[1] else "keys")
    rel = kdir.name if kdir.parent == base else str(kdir)
    dir_has_keys = kdir.is_dir() and any((kdir / f).exists() for f in KEY_FILES + OLD_KEY_FILES)
    installed = installed_keys is not None and (installed_keys / "node.key_secret").exists()
    if dir_has_keys or not installed:
        missing = [f for f in KEY_FILES if not (kdir / f).is_file()]
        if any((kdir / f).exists() for f in OLD_KEY_FILES) and "node.key_secret" in missing:
            problems.append(Problem(f"{rel}/", "holds the old shared worker key (client.key_secret): every box now has "
                                              "its own. On the head run 'anyway keys add DIR NAME' and copy "
                                              "DIR/issued/NAME/ here instead"))
        elif len(missing) == len(KEY_FILES):
            problems.append(Problem(
                f"{rel}/",
                "no cluster keys: on the head run 'anyway keys add DIR NAME' (NAME: this box's name) and copy "
                "node.key_secret and server.key from DIR/issued/NAME/ into the keys folder next to anyway.conf",
            ))
        else:
            for f in missing:
                problems.append(Problem(f"{rel}/{f}", "missing (the worker needs node.key_secret and server.key)"))
            for f in KEY_FILES:
                if f in missing:
                    continue
                try:
                    text = (kdir / f).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    problems.append(Problem(f"{rel}/{f}", f"cannot read it ({exc})"))
                    continue
                if f == "server.key" and ("secret-key" in text or "tls-private-key" in text):
                    problems.append(Problem(f"{rel}/server.key", "contains the head's SECRET key: copy server.key, never "
                                                                "server.key_secret, to workers"))
                    continue
                try:
                    ident = _load_key_text(text, f, secret=f == "node.key_secret")
                except ValueError as exc:
                    problems.append(Problem(f"{rel}/{f}", str(exc)))
                    continue
                keys[f] = text
                if f == "node.key_secret":
                    key_name = ident.name  # type: ignore[attr-defined]
        keys_source = f"{rel}/ on the boot partition"
        keys_dir = kdir
    else:
        keys_source = "installed at an earlier boot (the boot partition has none)"
        try:
            key_name = _load_key_text((installed_keys / "node.key_secret").read_text(encoding="utf-8"), "node.key_secret",
                                      secret=True).name  # type: ignore[attr-defined,union-attr]
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problems.append(Problem("installed keys", f"node.key_secret: {exc}"))
    if name is not None and key_name is not None and name != key_name:
        got = get("name")
        problems.append(Problem(got[0] if got else fname, f"name {name!r}: this box's keys were issued for {key_name!r} "
                                                          "(a node may only be who its keys say: remove the name line, or "
                                                          "issue keys for this name)"))
    if name is None and key_name is not None:
        if NAME_RE.match(key_name):
            name = key_name
        else:
            problems.append(Problem(f"{rel}/node.key_secret", f"was issued for {key_name!r}, which is not a valid node "
                                                              f"name here (for example {_suggest_name(key_name)!r})"))

    # ssh keys
    ssh_keys: list[str] = []
    for no, v in repeated["ssh_key"]:
        why = _check_ssh_key(v)
        if why:
            problems.append(Problem(f"{fname} line {no}", f"ssh_key: {why}"))
        else:
            ssh_keys.append(v)
    got = get("authorized_keys")
    ak = base / (got[1] if got and got[1] else "authorized_keys")
    if got and got[1] and not ak.is_file():
        problems.append(Problem(got[0], f"authorized_keys: {ak.name} is not next to anyway.conf"))
    elif ak.is_file():
        try:
            for no, line in enumerate(ak.read_text(encoding="utf-8").splitlines(), 1):
                s = line.strip()
                if not s or s.startswith("#"):
                    continue
                why = _check_ssh_key(s)
                if why:
                    problems.append(Problem(f"{ak.name} line {no}", why))
                else:
                    ssh_keys.append(s)
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(ak.name, f"cannot read it ({exc})"))

    if problems:
        raise ConfigError(sorted(problems, key=_line_of))

    warnings: list[str] = []
    allow_source = "rpc_allow"
    if rpc_allow is None:
        try:
            rpc_allow = [str(ipaddress.ip_network(head_host))]
            allow_source = "the head's address"
        except ValueError:
            got = get("head")
            raise ConfigError([Problem(
                got[0] if got else fname,
                f"head {head_host!r} is a name, and the firewall opens the RPC port to the head's address only: add "
                "'rpc_allow = <the head's IP address>' (or write the head's IP address in 'head')",
            )]) from None
    if firewall is False:
        warnings.append("firewall = no: the RPC port (TLS with the cluster's keys) is reachable by anyone on the network")
    if ssh_keys == []:
        warnings.append("no SSH keys (ssh_key = ... or an authorized_keys file): nobody can log in over SSH")
    host_fmt = f"[{head_host}]" if ":" in head_host else head_host
    return WorkerSettings(
        head=f"tcp://{host_fmt}:{head_port}",
        head_host=head_host,
        head_port=head_port,
        name=name,
        rpc_port=int(rpc_port),
        rpc_host=rpc_host,  # type: ignore[arg-type]
        rpc_advertise=rpc_advertise,  # type: ignore[arg-type]
        rpc_allow=rpc_allow,
        rpc_allow_source=allow_source,
        firewall=True if firewall is None else bool(firewall),
        threads=n_threads,  # type: ignore[arg-type]
        max_memory=max_memory,  # type: ignore[arg-type]
        ssh_keys=ssh_keys,
        keys=keys,
        keys_source=keys_source,
        keys_dir=keys_dir,
        scrub_keys=bool(scrub),
        warnings=warnings,
    )


# ------------------------------------------------------------------------------ output files
def worker_yaml(s: WorkerSettings, name: str) -> str:
    """Options for `anyway worker --config` (its long option names)."""
    lines = [
        "# Written by anyway-firstboot at boot from /boot/anyway/anyway.conf: edit that file, not this one.",
        f"head: '{s.head}'",
        f"name: '{name}'",
        f"rpc-port: {s.rpc_port}",
        f"keys: /{ETC}/keys",
        f"cache-dir: /{STATE}/cache",
    ]
    if s.rpc_host:
        lines.append(f"rpc-host: '{s.rpc_host}'")
    if s.rpc_advertise:
        lines.append(f"rpc-advertise: '{s.rpc_advertise}'")
    if s.threads:
        lines.append(f"threads: {s.threads}")
    if s.max_memory:
        lines.append(f"max-memory: '{s.max_memory}'")
    return "\n".join(lines) + "\n"


def firewall_rules(s: WorkerSettings) -> str:
    v4 = [n for n in s.rpc_allow if ":" not in n]
    v6 = [n for n in s.rpc_allow if ":" in n]
    rules = [
        "# Written by anyway-firstboot: the RPC port (TLS with the cluster's keys in front of llama.cpp's",
        f"# RPC server) is reachable only from the head ({s.rpc_allow_source}), IPv4 and IPv6. Loaded at boot.",
        "table inet anyway_worker",
        "delete table inet anyway_worker",
        "table inet anyway_worker {",
        "    chain input {",
        "        type filter hook input priority filter; policy accept;",
        '        iifname "lo" accept',
    ]
    if v4:
        rules.append(f"        tcp dport {s.rpc_port} ip saddr {{ {', '.join(v4)} }} accept")
    if v6:
        rules.append(f"        tcp dport {s.rpc_port} ip6 saddr {{ {', '.join(v6)} }} accept")
    rules += [f"        tcp dport {s.rpc_port} counter drop", "    }", "}"]
    return "\n".join(rules) + "\n"


def default_name(root: Path) -> str:
    """anyway-<last 6 hex digits of the first wired network card's MAC>, else of the machine id."""
    net = root / "sys/class/net"
    try:
        ifaces = sorted(p for p in net.iterdir() if (p / "device").exists())
    except OSError:
        ifaces = []
    for p in ifaces:
        try:
            mac = (p / "address").read_text().strip().replace(":", "")
        except OSError:
            continue
        if re.fullmatch(r"[0-9a-f]{12}", mac) and mac != "000000000000":
            return f"anyway-{mac[-6:]}"
    try:
        mid = (root / "etc/machine-id").read_text().strip()
        if re.fullmatch(r"[0-9a-f]{32}", mid):
            return f"anyway-{mid[:6]}"
    except OSError:
        pass
    return "anyway-worker"


def cpu_problem(root: Path) -> str | None:
    """Why this CPU cannot run the image's llama.cpp build, or None."""
    try:
        rel = dict(
            line.split("=", 1) for line in (root / IMAGE_RELEASE).read_text().splitlines() if "=" in line and not line.startswith("#")
        )
    except OSError:
        return None
    need = rel.get("REQUIRED_CPU_FLAGS", "").strip().strip('"').split()
    if not need:
        return None
    try:
        flags_line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    have = set(flags_line.split(":", 1)[1].split())
    missing = [f for f in need if f not in have]
    if not missing:
        return None
    return (
        f"this CPU lacks {', '.join(missing)}, which this image's llama.cpp build needs "
        f"({rel.get('CPU_TARGET', '?').strip(chr(34))}); write an image built with IMAGE_CPU=baseline"
    )


def _write(path: Path, text: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    try:
        os.chown(tmp, uid, gid)
    except PermissionError:
        pass
    os.replace(tmp, path)


def _anyway_gid(root: Path) -> int:
    """The 'anyway' group of the system being configured (or of this one, under --root)."""
    for group in (root / "etc/group", Path("/etc/group")):
        try:
            for line in group.read_text().splitlines():
                parts = line.split(":")
                if parts[0] == "anyway":
                    return int(parts[2])
        except (OSError, ValueError, IndexError):
            continue
    return 0


def apply(s: WorkerSettings, root: Path, *, live: bool) -> list[str]:
    """Write the worker's files under `root`; `live` also acts on this system. Returns notes."""
    notes: list[str] = []
    name = s.name or default_name(Path("/") if live else root)
    gid = _anyway_gid(root)
    etc = root / ETC
    (etc / "keys").mkdir(parents=True, exist_ok=True)
    os.chmod(etc / "keys", 0o750)
    try:
        os.chown(etc / "keys", 0, gid)
    except PermissionError:
        pass
    if s.keys:
        for f in KEY_FILES:
            _write(etc / "keys" / f, s.keys[f], 0o640 if f.endswith("_secret") else 0o644, 0, gid)
        for f in OLD_KEY_FILES:  # the shared key of an earlier image: no longer accepted anywhere
            (etc / "keys" / f).unlink(missing_ok=True)
    _write(etc / "worker.yml", worker_yaml(s, name), 0o644)
    fw = etc / "firewall.nft"
    if s.firewall:
        _write(fw, firewall_rules(s), 0o644)
    elif fw.exists():
        fw.unlink()
    if s.ssh_keys:
        _write(root / "root/.ssh/authorized_keys", "\n".join(s.ssh_keys) + "\n", 0o600)
        os.chmod(root / "root/.ssh", 0o700)
    _write(root / "etc/hostname", name + "\n", 0o644)
    hosts = root / "etc/hosts"
    try:
        lines = [line for line in hosts.read_text().splitlines() if not line.startswith("127.0.1.1")]
    except OSError:
        lines = ["127.0.0.1\tlocalhost", "::1\t\tlocalhost ip6-localhost ip6-loopback"]
    _write(hosts, "\n".join(lines[:1] + [f"127.0.1.1\t{name}"] + lines[1:]) + "\n", 0o644)
    if live:
        try:
            subprocess.run(["hostname", name], check=True, capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:
            notes.append(f"could not set the hostname: {exc}")
        if s.firewall:
            r = subprocess.run(["nft", "-f", str(fw)], capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise ConfigError([Problem("firewall", f"nft could not load {fw}: {r.stderr.strip()[:300]}")])
            allowed = ", ".join(s.rpc_allow)
            notes.append(f"firewall: RPC port {s.rpc_port} reachable only from {allowed}")
        else:
            subprocess.run(["nft", "delete", "table", "inet", "anyway_worker"], capture_output=True, timeout=30)
        if s.scrub_keys and s.keys_dir is not None:
            for f in KEY_FILES:
                (s.keys_dir / f).unlink(missing_ok=True)
            notes.append(f"scrub_keys: removed the key files from {s.keys_dir}")
    return [f"node name {name}", *notes]


# ------------------------------------------------------------------------------ console
class Console:
    """Prints to stdout (the journal) and, at boot, to every active console (screen + serial)."""

    def __init__(self, *, boot: bool) -> None:
        self.ttys: list[int] = []
        if boot:
            try:
                names = Path("/sys/class/tty/console/active").read_text().split()
            except OSError:
                names = []
            for n in dict.fromkeys(names):
                try:
                    self.ttys.append(os.open(f"/dev/{n}", os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK))
                except OSError:
                    pass
        self.lines: list[str] = []

    def say(self, msg: str = "") -> None:
        line = f"{PROG}: {msg}" if msg else ""
        self.lines.append(line)
        print(line, flush=True)
        for fd in self.ttys:
            try:
                os.write(fd, (line + "\n").encode())
            except OSError:
                pass


def issue_text(ok: bool, lines: list[str]) -> str:
    """For /etc/issue.d: what the login prompt shows (the state of the last boot's check)."""
    head = "Anyway worker: configured" if ok else "Anyway worker: NOT STARTED, anyway.conf has problems"
    body = "\n".join("  " + line.removeprefix(f"{PROG}: ") for line in lines if line)
    return f"{head}\n{body}\n\n".replace("\\", "\\\\")


# ------------------------------------------------------------------------------ one-time boot tasks
def ensure_ssh_host_keys(con: Console) -> None:
    if not list(Path("/etc/ssh").glob("ssh_host_*_key")):
        r = subprocess.run(["ssh-keygen", "-A"], capture_output=True, text=True)
        con.say("created this machine's SSH host keys" if r.returncode == 0 else f"ssh-keygen -A failed: {r.stderr.strip()}")


def grow_root(con: Console) -> None:
    """Grow the root partition and file system to the end of the disk, once."""
    stamp = Path("/var/lib/anyway-image/root-grown")
    if stamp.exists():
        return
    try:
        src = subprocess.run(["findmnt", "-no", "SOURCE", "/"], capture_output=True, text=True, check=True).stdout.strip()
        disk = subprocess.run(["lsblk", "-no", "PKNAME", src], capture_output=True, text=True, check=True).stdout.strip()
        partn = Path(f"/sys/class/block/{Path(src).name}/partition").read_text().strip()
        if not disk:
            raise RuntimeError(f"no parent disk for {src}")
        before = int(subprocess.run(["blockdev", "--getsize64", src], capture_output=True, text=True, check=True).stdout)
        r = subprocess.run(
            ["sfdisk", "--no-reread", "--no-tell-kernel", "-N", partn, f"/dev/{disk}"],
            input=", +\n", capture_output=True, text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "sfdisk failed")
        subprocess.run(["partx", "-u", "-n", partn, f"/dev/{disk}"], capture_output=True, text=True, check=True)
        subprocess.run(["resize2fs", src], capture_output=True, text=True, check=True)
        after = int(subprocess.run(["blockdev", "--getsize64", src], capture_output=True, text=True, check=True).stdout)
        if after > before:
            con.say(f"grew the root file system on {src} from {before >> 20} MiB to {after >> 20} MiB")
    except (OSError, subprocess.CalledProcessError, RuntimeError, ValueError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        con.say(f"could not grow the root file system (not fatal): {str(detail).strip()[:200]}")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text("done\n")


# ------------------------------------------------------------------------------ commands
def report_problems(con: Console, path: Path, exc: ConfigError) -> None:
    con.say(f"{path} is INVALID ({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}):")
    for p in exc.problems:
        con.say(f"  ERROR {p}")


def report_ok(con: Console, path: Path, s: WorkerSettings) -> None:
    con.say(f"{path} is valid: head {s.head}, keys {s.keys_source}")
    for w in s.warnings:
        con.say(f"  WARNING {w}")


def cmd_check(path: Path) -> int:
    con = Console(boot=False)
    try:
        s = parse_config(path)
    except ConfigError as exc:
        report_problems(con, path, exc)
        return 1
    report_ok(con, path, s)
    return 0


def cmd_apply(path: Path, root: Path, *, live: bool = False, con: Console | None = None) -> int:
    con = con or Console(boot=False)
    try:
        s = parse_config(path, installed_keys=root / ETC / "keys")
        report_ok(con, path, s)
        for note in apply(s, root, live=live):
            con.say(note)
    except ConfigError as exc:
        report_problems(con, path, exc)
        return 1
    return 0


def cmd_boot(path: Path) -> int:
    con = Console(boot=True)
    con.say(f"reading {path}")
    ensure_ssh_host_keys(con)
    grow_root(con)
    why = cpu_problem(Path("/"))
    if why:
        con.say(f"ERROR {why}")
        rc = 1
    else:
        rc = cmd_apply(path, Path("/"), live=True, con=con)
    if rc == 0:
        con.say("configuration written to /etc/anyway; starting anyway-worker.service")
    else:
        con.say(f"the worker was NOT started: fix {path.name} on the ANYWAY boot partition and reboot")
        con.say(f"  (or over SSH: edit {path}, run 'anyway-firstboot check', then 'systemctl restart anyway-firstboot anyway-worker')")
    try:
        _write(Path("/etc/issue.d/anyway.issue"), issue_text(rc == 0, con.lines[1:]), 0o644)
    except OSError:
        pass
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Check anyway.conf and configure the worker from it.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate anyway.conf (exit 1 with the problems if invalid)")
    c.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    a = sub.add_parser("apply", help="validate and write the worker's configuration")
    a.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    a.add_argument("--root", default="/", help="write under this directory (default /)")
    a.add_argument("--live", action="store_true", help="also set the hostname and load the firewall")
    b = sub.add_parser("boot", help="what anyway-firstboot.service runs")
    b.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    args = p.parse_args(argv)
    if args.cmd == "check":
        return cmd_check(Path(args.config))
    if args.cmd == "apply":
        return cmd_apply(Path(args.config), Path(args.root), live=args.live)
    return cmd_boot(Path(args.config))


if __name__ == "__main__":
    sys.exit(main())
