"""The LAN lab: the head and each worker in its own network namespace on one bridge, every
link shaped with `tc tbf`, so weights and activations really cross rate-limited links.

    with LanLab(workers=3, rate="1gbit") as lab:
        c = lab.cluster(model, state_dir=...)      # head + `anyway worker`s, as users start them
        lab.tx_bytes("w1")                          # bytes the bridge sent to w1 so far

Each member's veth is shaped in both directions (its uploads on its own end, its downloads
on the bridge's end), like a box on a switch port. The bench itself stays in the root
namespace and reaches every member through the bridge's address. netem does not exist on
this machine's kernel, so there is no added latency: the links are as fast as the rate lets
them be (a switched office LAN is well under a millisecond anyway). Needs root.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from appliance.cli.up import LocalCluster, free_port

SUBNET = "10.79.0"


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True)


class LanLab:
    def __init__(self, *, workers: int, rate: str = "1gbit", tag: str | None = None, subnet: str = SUBNET) -> None:
        """`subnet`: the first three octets of the lab's /24 (two labs at once need two)."""
        self.workers, self.rate, self.subnet = workers, rate, subnet
        self.tag = tag or f"awl{os.getpid() % 10000}"
        self.bridge = f"{self.tag}br"
        self.members = ["head", *(f"w{k}" for k in range(1, workers + 1))]
        self._made: list[str] = []

    # ------------------------------------------------------------ topology
    def ns(self, member: str) -> str:
        return f"{self.tag}-{member}"

    def port(self, member: str) -> str:
        return f"{self.tag}{member}b"  # the bridge's end of the member's cable (root namespace)

    def ip(self, member: str) -> str:
        return f"{self.subnet}.1" if member == "head" else f"{self.subnet}.{10 + int(member[1:])}"

    def wrapper(self, member: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(member)]

    def _check_subnet_free(self) -> None:
        """A lab left behind by a killed run (its bridge still holds the subnet) would take
        this lab's traffic: say so instead of hanging on unreachable addresses."""
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if f" {self.subnet}.254/24 " in line:
                dev = line.split()[1]
                raise RuntimeError(f"{dev} already holds {self.subnet}.254/24 (a lab left by a killed run?): "
                                   f"remove it (ip link del {dev}; ip netns list | grep awl) or give another subnet")

    def __enter__(self) -> "LanLab":
        self._check_subnet_free()
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            self._made.append("bridge")
            _run("ip", "addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for m in self.members:
                ns, inner, outer = self.ns(m), f"{self.tag}{m}a", self.port(m)
                _run("ip", "netns", "add", ns)
                self._made.append(m)
                _run("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
                _run("ip", "link", "set", inner, "netns", ns)
                _run("ip", "link", "set", outer, "master", self.bridge)
                _run("ip", "link", "set", outer, "up")
                _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.ip(m)}/24", "dev", inner)
                _run("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
                _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
                tbf = ["root", "tbf", "rate", self.rate, "burst", "512kb", "latency", "20ms"]
                _run("tc", "qdisc", "add", "dev", outer, *tbf)  # to the member
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inner, *tbf)  # from the member
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for m in self.members:
            subprocess.run(["ip", "link", "del", self.port(m)], capture_output=True)
            subprocess.run(["ip", "netns", "del", self.ns(m)], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    # ------------------------------------------------------------ counters
    def tx_bytes(self, member: str) -> int:
        """Bytes the bridge has sent down `member`'s link (what it received)."""
        return int(Path(f"/sys/class/net/{self.port(member)}/statistics/tx_bytes").read_text())

    def rx_bytes(self, member: str) -> int:
        """Bytes `member` has sent up its link."""
        return int(Path(f"/sys/class/net/{self.port(member)}/statistics/rx_bytes").read_text())

    # ------------------------------------------------------------ the appliance in it
    def cluster(self, model: Path, *, state_dir: Path, n_ctx: int = 2048, max_batch: int = 2,
                strategy: str = "memory", heartbeat_interval: float | None = None,
                head_args: list[str] | None = None, worker_args: list[str] | None = None,
                data_plane: str = "tls") -> LocalCluster:
        """A head and the lab's workers, started as users start them (`anyway head/worker`).

        The data plane is TLS, as on real boxes (a head with keys refuses a plain-TCP worker off
        its own machine); bare llama.cpp runs reach the same servers through the same TLS
        channel (`tunnels_for`). The API listens on the head's bridge address, so it has keys;
        requests carry `c.headers`."""
        c = LocalCluster(model=model, state_dir=state_dir, api_host=self.ip("head"), api_port=free_port(),
                         n_ctx=n_ctx, max_batch=max_batch, strategy=strategy, heartbeat_interval=heartbeat_interval,
                         control_bind_host=self.ip("head"), data_plane=data_plane, api_keys=True)
        c.control = f"tcp://{self.ip('head')}:{c.control_port}"
        c.start_head(head_args, wrapper=self.wrapper("head"))
        for k in range(1, self.workers + 1):
            self.start_worker(c, f"w{k}", extra=worker_args)
        return c

    def start_worker(self, c: LocalCluster, name: str, *, extra: list[str] | None = None) -> None:
        c.start_worker(name, extra=["--rpc-host", self.ip(name), "--rpc-port", str(50052), *(extra or [])],
                       wrapper=self.wrapper(name))


def tunnels_for(c: LocalCluster, state: dict[str, Any], path: Path) -> Path:
    """The engine's TunnelSpec for a bare llama.cpp run (`bench.bare --tunnels`): the same TLS
    channel to the same workers the appliance's engine uses."""
    from appliance.common.dataplane import TunnelSpec
    from appliance.common.keys import load_allow_list

    allow = load_allow_list(c.keys)
    peers = {a["endpoint"]: allow[a["node"]] for a in state["plan"]["assignments"] if a.get("endpoint")}
    path.write_text(TunnelSpec(head_key_file=str(c.keys / "server.key_secret"), peers=peers).to_json())
    return path
