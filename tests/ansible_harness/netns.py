"""Test hosts for the Ansible deployment: network namespaces that look like real boxes.

Each host is a network namespace with its own address on a private /24, joined to a
bridge in the root namespace by a veth pair, running its own `sshd` on port 22 of that
address (own host key, root login with a key made for the test). Ansible reaches them over
SSH exactly like real machines. They share this machine's file system, users and packages,
so the inventory gives every host its own install prefix, config, state and unit
directories and its own service user.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, **kw)


def _used_subnets() -> set[str]:
    out = sh("ip", "-o", "-4", "addr", "show").stdout
    nets = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.add(str(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network))
    return nets


def pick_subnet() -> ipaddress.IPv4Network:
    used = _used_subnets()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.77.{secrets.randbelow(200) + 20}.0/24")
        if str(net) not in used:
            return net
    raise RuntimeError("no free 10.77.x.0/24 subnet for the test hosts")


def wait_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{host}:{port} did not open within {timeout_s} s")


@dataclass
class Host:
    name: str  # inventory name, e.g. head, w1
    netns: str
    address: str
    dir: Path  # everything of this host lives under here
    sshd: subprocess.Popen | None = None

    def ns(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd]


@dataclass
class LabNetwork:
    base: Path
    names: tuple[str, ...] = ("head1", "w1", "w2")
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, Host] = field(default_factory=dict)
    bridge: str = ""
    subnet: ipaddress.IPv4Network | None = None
    client_key: Path | None = None
    known_hosts: Path | None = None
    _links: list[str] = field(default_factory=list)
    _netns: list[str] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def start(self) -> "LabNetwork":
        self.subnet = pick_subnet()
        self.bridge = f"awb{self.tag}"
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        ssh_dir = self.base / "ssh"
        ssh_dir.mkdir(parents=True, exist_ok=True)
        self.client_key = ssh_dir / "id_ed25519"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "anyway-ansible-test", "-f", str(self.client_key))
        self.known_hosts = ssh_dir / "known_hosts"
        known = []
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        for i, name in enumerate(self.names):
            host = Host(
                name=name,
                netns=f"aw{self.tag}{name}",
                address=str(self.subnet.network_address + 10 + i),
                dir=self.base / "hosts" / name,
            )
            host.dir.mkdir(parents=True, exist_ok=True)
            os.chmod(host.dir, 0o755)
            self._add_namespace(host, i)
            known.append(self._start_sshd(host))
            self.hosts[name] = host
        self.known_hosts.write_text("".join(known))
        for host in self.hosts.values():
            wait_port(host.address, 22, 10)
        return self

    def _add_namespace(self, host: Host, i: int) -> None:
        sh("ip", "netns", "add", host.netns)
        self._netns.append(host.netns)
        outer, inner = f"awv{self.tag}{i}", f"awi{self.tag}{i}"
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        self._links.append(outer)
        sh("ip", "link", "set", outer, "master", self.bridge)
        sh("ip", "link", "set", outer, "up")
        sh("ip", "link", "set", inner, "netns", host.netns)
        sh(*host.ns("ip", "link", "set", inner, "name", "eth0"))
        sh(*host.ns("ip", "addr", "add", f"{host.address}/24", "dev", "eth0"))
        sh(*host.ns("ip", "link", "set", "eth0", "up"))
        sh(*host.ns("ip", "link", "set", "lo", "up"))

    def _start_sshd(self, host: Host) -> str:
        d = host.dir / "sshd"
        d.mkdir(parents=True, exist_ok=True)
        key = d / "ssh_host_ed25519_key"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        assert self.client_key is not None
        (d / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        config = d / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    "Port 22",
                    f"ListenAddress {host.address}",
                    f"HostKey {key}",
                    f"PidFile {d}/sshd.pid",
                    f"AuthorizedKeysFile {d}/authorized_keys",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",  # the key files live under /tmp
                    "MaxSessions 50",
                    "MaxStartups 50:30:100",
                    "Subsystem sftp /usr/lib/openssh/sftp-server",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        log = open(d / "sshd.log", "ab")
        host.sshd = subprocess.Popen(
            host.ns(SSHD, "-D", "-e", "-f", str(config)), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return f"{host.address} {(d / 'ssh_host_ed25519_key.pub').read_text().split()[0]} " + \
            f"{(d / 'ssh_host_ed25519_key.pub').read_text().split()[1]}\n"

    def stop(self) -> None:
        for host in self.hosts.values():
            if host.sshd and host.sshd.poll() is None:
                os.killpg(host.sshd.pid, signal.SIGTERM)
                try:
                    host.sshd.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(host.sshd.pid, signal.SIGKILL)
        # Anything still running in our namespaces was started for these hosts (sshd session
        # children, services): end it before the namespaces go.
        for ns in self._netns:
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in self._netns:
            sh("ip", "netns", "del", ns, check=False)
        for link in self._links:
            sh("ip", "link", "del", link, check=False)
        self._netns.clear()
        self._links.clear()
