"""A LAN on this machine for data-plane tests: network namespaces on a bridge.

The head stays in the root namespace (on the bridge's address); each other host (a worker
box, an attacker on the same LAN) is a namespace with its own address and its own loopback,
exactly the separation real boxes have: what a worker binds on its 127.0.0.1 cannot be
reached from any other host. Needs root (tests using it are skipped otherwise).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, field

from ansible_harness.netns import pick_subnet, sh


@dataclass
class NsHost:
    name: str
    netns: str
    address: str

    def ns(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd]


@dataclass
class BridgeLab:
    names: tuple[str, ...]
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, NsHost] = field(default_factory=dict)
    head_address: str = ""
    _links: list[str] = field(default_factory=list)

    def start(self) -> "BridgeLab":
        subnet = pick_subnet()
        bridge = f"awd{self.tag}"
        sh("ip", "link", "add", bridge, "type", "bridge")
        self._links.append(bridge)
        self.head_address = str(subnet.network_address + 1)
        sh("ip", "addr", "add", f"{self.head_address}/24", "dev", bridge)
        sh("ip", "link", "set", bridge, "up")
        for i, name in enumerate(self.names):
            host = NsHost(name=name, netns=f"awd{self.tag}{name}", address=str(subnet.network_address + 10 + i))
            sh("ip", "netns", "add", host.netns)
            outer, inner = f"awdv{self.tag}{i}", f"awdi{self.tag}{i}"
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            self._links.append(outer)
            sh("ip", "link", "set", outer, "master", bridge)
            sh("ip", "link", "set", outer, "up")
            sh("ip", "link", "set", inner, "netns", host.netns)
            sh(*host.ns("ip", "link", "set", inner, "name", "eth0"))
            sh(*host.ns("ip", "addr", "add", f"{host.address}/24", "dev", "eth0"))
            sh(*host.ns("ip", "link", "set", "eth0", "up"))
            sh(*host.ns("ip", "link", "set", "lo", "up"))
            self.hosts[name] = host
        return self

    def stop(self) -> None:
        for host in self.hosts.values():
            for pid in sh("ip", "netns", "pids", host.netns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", host.netns, check=False)
        for link in self._links:
            sh("ip", "link", "del", link, check=False)


def run_in(host: NsHost, *cmd: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(host.ns(*cmd), capture_output=True, text=True, timeout=timeout_s)
