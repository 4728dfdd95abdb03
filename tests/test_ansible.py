"""The Ansible deployment (ansible/deploy.yml), checked for real.

- `ansible-playbook --syntax-check` and `ansible-lint` (production profile) on the playbook.
- Three test hosts (one head, two workers): network namespaces with their own addresses on
  a private /24, each running sshd, reached over SSH exactly like real boxes. They share
  this machine's file system, so each gets its own install prefix, config, state and unit
  directories and its own service user (inventory host variables).
- Preflight failures are clear: an unreachable head, too little memory, too little disk.
- A real run of deploy.yml. Systemd is not PID 1 here, so the inventory sets
  anyway_common_manage_services: false (the play renders the units but never calls
  systemctl) and the test plays systemd's part: when the play reaches its final "wait until
  the cluster serves" task, the test starts each rendered unit's ExecStart= inside the host's
  namespace as the unit's User= with the unit's Environment=/EnvironmentFile=
  (ansible_harness/units.py). The play then waits, and prints the endpoint. The units are
  checked with `systemd-analyze verify` and `systemd-analyze security --offline`.
- A chat request to the deployed head (the `openai` client) answers with text from the
  model split across the two deployed workers, with the inference key the play generated;
  admin actions refuse that key and take the generated admin key. The RPC port of a worker
  answers the head only (nftables), over IPv6 too, and still after `nft -f
  /etc/nftables.conf` (what `systemctl restart nftables` runs: it flushes every table first);
  each box got its own identity and only the keys its role needs; every Python package on a
  box is one the lock pins, installed with `pip --require-hashes` from a wheelhouse checked
  against its manifest.
- A second run reports changed=0 on every host.

Needs root, `ip netns`, and Debian packages the session fixture installs when missing
(openssh-server, nftables, sudo, systemd for systemd-analyze, python3-venv, python3-apt).
The playbook runs take about 2-4 minutes on 2 cores. ANYWAY_KEEP_TEST_HOSTS=1 keeps the
hosts' files (not the namespaces) for a look afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import yaml

from ansible_harness.netns import LabNetwork, sh
from ansible_harness.units import FakeSystemd, Unit

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE_DIR = ROOT / "ansible"
PLAYBOOK = ANSIBLE_DIR / "deploy.yml"
REMOVE = ANSIBLE_DIR / "remove.yml"
VENV_BIN = Path(sys.executable).parent
DEBIAN_NFTABLES_CONF = """#!/usr/sbin/nft -f

flush ruleset

table inet filter {
	chain input {
		type filter hook input priority filter;
	}
	chain forward {
		type filter hook forward priority filter;
	}
	chain output {
		type filter hook output priority filter;
	}
}
"""  # Debian 12's /etc/nftables.conf, which nftables.service loads (and reloads) with `nft -f`
WAIT_TASK = "Run - wait until the head's /health says the cluster serves"
LLAMA_VERSION = "0.3.36"

# Debian packages the test hosts (this machine) need.
DEBIAN_PACKAGES = [
    "openssh-server",  # sshd in each namespace
    "nftables",  # the workers' RPC firewall
    "sudo",  # become: true, as on real boxes
    "systemd",  # systemd-analyze (systemd itself is not PID 1 here)
    "python3-venv",  # the boxes' virtualenvs
    "python3-apt",  # Ansible's apt module
    "util-linux",  # runuser
    "iproute2",  # ip netns
    "ca-certificates",
]


def _installed(pkg: str) -> bool:
    res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return res.returncode == 0 and res.stdout.strip() == "install ok installed"


# ----------------------------------------------------------------------------- helpers
def ansible_env(base: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        PYTHONUNBUFFERED="1",
        PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
    )
    if base is not None:
        env.update(ANSIBLE_SSH_CONTROL_PATH_DIR=str(base / "cp"), ANSIBLE_LOCAL_TEMP=str(base / "ansible-tmp"))
    return env


@dataclass
class PlaybookRun:
    rc: int
    output: str
    seconds: float
    log: Path

    def recap(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        tail = self.output.split("PLAY RECAP", 1)[-1]
        for line in tail.splitlines():
            m = re.match(r"^(\S+)\s+:\s+(.*)$", line.strip())
            if m:
                out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        return out

    def flat(self) -> str:
        """The output with all whitespace runs (YAML line folding) collapsed to one space."""
        return re.sub(r"\s+", " ", self.output)

    def tail(self, n: int = 120) -> str:
        return "\n".join(self.output.splitlines()[-n:])


def run_playbook(
    base: Path,
    inventory: Path,
    *args: str,
    on_line: Callable[[str], None] | None = None,
    timeout_s: float = 900,
    playbook: Path = PLAYBOOK,
) -> PlaybookRun:
    logs = base / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / f"ansible-{len(list(logs.glob('ansible-*.log'))) + 1}.log"
    cmd = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(playbook), *args]
    t0 = time.monotonic()
    lines: list[str] = []
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(
            cmd, cwd=ANSIBLE_DIR, env=ansible_env(base), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(f"[{time.monotonic() - t0:6.1f}] {line}")
            f.flush()
            lines.append(line)
            if on_line:
                on_line(line)
            if time.monotonic() - t0 > timeout_s:
                proc.kill()
        rc = proc.wait()
    return PlaybookRun(rc=rc, output="".join(lines), seconds=time.monotonic() - t0, log=log)


def llama_wheel() -> Path:
    """The llama-cpp-python wheel with RPC that scripts/bootstrap.sh built on this machine."""
    house = Path(os.environ.get("ANYWAY_WHEELHOUSE") or Path.home() / ".cache" / "anyway" / "wheelhouse")
    flags = hashlib.sha256(b"-DGGML_RPC=ON -DGGML_LLAMAFILE=OFF").hexdigest()[:12]
    arch = os.uname().machine
    found = sorted(house.glob(f"llama-cpp-python-{LLAMA_VERSION}-{arch}-{flags}/llama_cpp_python-{LLAMA_VERSION}-*.whl"))
    found = found or sorted(house.glob(f"llama-cpp-python-{LLAMA_VERSION}-{arch}-*/llama_cpp_python-{LLAMA_VERSION}-*.whl"))
    if not found:
        pytest.fail(f"no llama-cpp-python {LLAMA_VERSION} wheel under {house}: run scripts/bootstrap.sh (make setup) first")
    return found[0]


def connects(argv_prefix: list[str], host: str, port: int, timeout_s: float = 2.0) -> bool:
    code = (
        "import socket,sys\n"
        f"try:\n socket.create_connection(({host!r}, {port}), timeout={timeout_s}).close()\n"
        "except OSError:\n sys.exit(1)\n"
    )
    return subprocess.run([*argv_prefix, "/usr/bin/python3", "-c", code], capture_output=True).returncode == 0


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def debian_packages() -> None:
    """Install the Debian packages the test hosts need (once, quietly) when missing."""
    if os.geteuid() != 0:
        pytest.skip("the Ansible deployment test needs root (network namespaces, sshd, users)")
    if not shutil.which("apt-get"):
        pytest.skip("the Ansible deployment test needs a Debian-like machine (apt-get)")
    missing = [pkg for pkg in DEBIAN_PACKAGES if not _installed(pkg)]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"apt-get install {' '.join(missing)} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}"


@dataclass
class Lab:
    base: Path
    net: LabNetwork
    systemd: FakeSystemd
    inventory: Path
    controller: Path
    model: Path

    def host_dir(self, name: str, *parts: str) -> Path:
        return self.net.hosts[name].dir.joinpath(*parts)

    def prefix(self, name: str) -> Path:
        return self.host_dir(name, "opt", "anyway")

    def config_dir(self, name: str) -> Path:
        return self.host_dir(name, "etc", "anyway")

    def unit_dir(self, name: str) -> Path:
        return self.host_dir(name, "etc", "systemd", "system")

    def user(self, name: str) -> str:
        return f"aw{self.net.tag}{name}"

    @property
    def head(self) -> str:
        return self.net.hosts["head1"].address

    @property
    def api(self) -> str:
        return f"http://{self.head}:8080"

    def key(self, which: str) -> str:
        """The inference or admin key the play generated on the controller."""
        return (self.controller / "secrets" / f"{which}.key").read_text().strip()

    def auth(self, which: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(which)}"}

    def start_services(self) -> None:
        """What systemd would do for the enabled units: start every rendered unit."""
        for name, host in self.net.hosts.items():
            for unit in self.systemd.units(host, self.unit_dir(name)):
                self.systemd.start(host, unit)


@pytest.fixture(scope="module")
def lab(debian_packages: None, demo_model: Path) -> Iterator[Lab]:
    base = Path(tempfile.mkdtemp(prefix="anyway-ansible-", dir="/tmp"))
    os.chmod(base, 0o755)  # the service users must reach their prefixes below it
    net = LabNetwork(base)
    systemd = FakeSystemd(base / "services")
    try:
        net.start()
        # The product as of now (a snapshot: the tree may change while the test runs) and a
        # wheelhouse seeded with the RPC build of llama-cpp-python; the play fills the rest.
        src = base / "src"
        shutil.copytree(
            ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                                      ".pytest_cache", ".anyway", ".cache")
        )
        house = base / "wheelhouse"
        house.mkdir()
        shutil.copy2(llama_wheel(), house)
        controller = base / "controller"
        # The controller fills the wheelhouse for its own Python: it must be the boxes' minor
        # version (CPython 3.11 on Debian 12), else let the boxes' Python do it.
        box_python = subprocess.run(
            ["/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True
        ).stdout.split()
        controller_python = sys.executable
        if box_python != [str(v) for v in sys.version_info[:2]]:
            controller_python = "/usr/bin/python3"
            if subprocess.run([controller_python, "-m", "pip", "--version"], capture_output=True).returncode != 0:
                pytest.fail(f"the test Python is {sys.version.split()[0]}, the boxes' is {'.'.join(box_python)}, "
                            "and /usr/bin/python3 has no pip to fill a wheelhouse for them (apt-get install python3-pip)")
        hosts: dict[str, dict] = {}
        for name, h in net.hosts.items():
            hv = {
                "ansible_host": h.address,
                "anyway_common_prefix": str(h.dir / "opt" / "anyway"),
                "anyway_common_config_dir": str(h.dir / "etc" / "anyway"),
                "anyway_common_state_dir": str(h.dir / "var" / "lib" / "anyway"),
                "anyway_common_systemd_dir": str(h.dir / "etc" / "systemd" / "system"),
                "anyway_common_user": f"aw{net.tag}{name}",
            }
            if name == "head1":
                hv["anyway_head_model_src"] = str(demo_model)  # host var: beats group_vars/all.yml
            else:
                conf = h.dir / "etc" / "nftables.conf"  # each test host's own copy of the system file
                conf.parent.mkdir(parents=True, exist_ok=True)
                conf.write_text(DEBIAN_NFTABLES_CONF)
                hv["anyway_worker_nftables_conf"] = str(conf)
            hosts[name] = hv
        inventory = {
            "all": {
                "vars": {
                    "ansible_user": "root",
                    "ansible_python_interpreter": "/usr/bin/python3",
                    "ansible_ssh_private_key_file": str(net.client_key),
                    "ansible_ssh_common_args": (
                        f"-o UserKnownHostsFile={net.known_hosts} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
                    ),
                    # systemd is not PID 1 here: render units, never call systemctl (see the module doc).
                    "anyway_common_manage_services": False,
                    # The namespaces reach nothing but each other: no apt index refresh (the
                    # packages are there), everything from the controller's wheelhouse.
                    "anyway_common_apt_update_cache": False,
                    "anyway_common_controller_dir": str(controller),
                    "anyway_common_controller_python": controller_python,
                    "anyway_common_product_src": str(src),
                    "anyway_common_wheelhouse_src": str(house),
                    "anyway_common_wheelhouse_fill": True,
                    "anyway_head_threads": 1,
                    "anyway_worker_threads": 1,
                    "anyway_head_wait_timeout_s": 240,
                },
                "children": {
                    "head": {"hosts": {"head1": hosts["head1"]}},
                    "workers": {"hosts": {"w1": hosts["w1"], "w2": hosts["w2"]}},
                },
            }
        }
        inv = base / "inventory.yml"
        inv.write_text(yaml.safe_dump(inventory, sort_keys=False))
        yield Lab(base=base, net=net, systemd=systemd, inventory=inv, controller=controller, model=demo_model)
    finally:
        systemd.stop_all()
        net.stop()
        for name in net.names:
            user = f"aw{net.tag}{name}"
            subprocess.run(["userdel", user], capture_output=True)
            subprocess.run(["groupdel", user], capture_output=True)
        if not os.environ.get("ANYWAY_KEEP_TEST_HOSTS"):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def first_run(lab: Lab) -> PlaybookRun:
    """deploy.yml, run once; the test starts the rendered units when the play waits for them."""

    def on_line(line: str) -> None:
        if line.startswith("TASK [") and WAIT_TASK in line:
            lab.start_services()

    run = run_playbook(lab.base, lab.inventory, on_line=on_line)
    print(f"first run: {run.seconds:.0f} s (log {run.log})")
    return run


def _explain(run: PlaybookRun, lab: Lab) -> str:
    return f"rc={run.rc}, log {run.log}\n{run.tail()}\n{lab.systemd.tails()}"


# ----------------------------------------------------------------------------- static checks
@pytest.mark.parametrize("playbook", ["deploy.yml", "remove.yml"])
def test_syntax_check(playbook: str) -> None:
    res = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", "inventory.example.yml", playbook, "--syntax-check"],
        cwd=ANSIBLE_DIR, env=ansible_env(), capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_ansible_lint_production_profile() -> None:
    res = subprocess.run(
        [str(VENV_BIN / "ansible-lint"), "--profile", "production", "--offline", "deploy.yml", "remove.yml"],
        cwd=ANSIBLE_DIR, env=ansible_env(), capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in res.stdout + res.stderr


def test_controller_keys_are_what_anyway_keys_writes(tmp_path: Path) -> None:
    """The controller-side generator (no Anyway or pyzmq needed) issues the head's identity and
    one per worker in the format `anyway keys` writes; it never replaces them, and revokes."""
    import zmq

    from appliance.common.keys import load_allow_list, load_head_keys, load_worker_keys

    script = ANSIBLE_DIR / "roles" / "anyway_common" / "files" / "anyway_keys.py"
    k = tmp_path / "k"

    def run(*args: str) -> dict:
        out = subprocess.run([sys.executable, str(script), str(k), *args], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    assert run("--nodes", "w1,w2")["changed"] is True
    assert run("--nodes", "w1,w2")["changed"] is False
    head = load_head_keys(k)
    w1, w2 = load_worker_keys(k / "issued" / "w1"), load_worker_keys(k / "issued" / "w2")
    assert zmq.curve_public(head.secret) == head.public
    assert zmq.curve_public(w1.secret) == w1.public and zmq.curve_public(w2.secret) == w2.public
    assert w1.public != w2.public and w1.server_public == head.public and w1.node.name == "w1"
    assert set(load_allow_list(k)) == {"w1", "w2"}
    assert stat.S_IMODE((k / "server.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((k / "issued" / "w1" / "node.key_secret").stat().st_mode) == 0o600
    assert run("--nodes", "w1,w2", "--revoke", "w2")["revoked"] == ["w2"]
    assert set(load_allow_list(k)) == {"w1"} and not (k / "issued" / "w2").exists()
    assert run("--nodes", "w1,w2")["issued"] == ["w2"]  # no longer revoked: a fresh identity
    assert load_allow_list(k)["w2"].curve_public != w2.public


# ----------------------------------------------------------------------------- preflight
PREFLIGHT_CASES = {
    "unreachable-head": (
        {"anyway_common_head_address": "{net}.99", "anyway_common_head_probe_timeout_s": 2},
        ["w1", "w2"],
        r"Preflight failed on (w1|w2): cannot reach the head at {net}\.99:5555 \(",
    ),
    "too-little-memory": (
        {"anyway_common_min_memory_mb": 100_000_000},
        ["head1", "w1", "w2"],
        r"Preflight failed on (head1|w1|w2): too little memory: \d+ MB, Anyway needs at least 100000000 MB "
        r"\(anyway_common_min_memory_mb\)",
    ),
    "too-little-disk": (
        {"anyway_common_min_disk_mb": 100_000_000},
        ["head1", "w1", "w2"],
        r"Preflight failed on (head1|w1|w2): too little free disk for \S+: \d+ MB free on \S+, Anyway needs at least "
        r"100000000 MB \(anyway_common_min_disk_mb\)",
    ),
}


def test_preflight_passes_on_fit_boxes(lab: Lab) -> None:
    run = run_playbook(lab.base, lab.inventory, "--tags", "preflight")
    assert run.rc == 0, _explain(run, lab)
    # Before the first deployment nothing listens on the head's control port: a refused
    # connection still proves the workers reach the head.
    assert re.search(rf"w1: Debian .* head reachable at {re.escape(lab.head)}:5555", run.flat()), run.tail()


@pytest.mark.parametrize("case", list(PREFLIGHT_CASES))
def test_preflight_failures_are_clear(lab: Lab, case: str) -> None:
    extra, failing, pattern = PREFLIGHT_CASES[case]
    net = lab.head.rsplit(".", 1)[0]
    extra = {k: v.format(net=net) if isinstance(v, str) else v for k, v in extra.items()}
    run = run_playbook(lab.base, lab.inventory, "--tags", "preflight", "-e", json.dumps(extra))
    assert run.rc != 0, run.tail()
    flat = run.flat()
    pattern = pattern.format(net=re.escape(net))
    for host in failing:
        assert re.search(pattern.replace("(head1|w1|w2)", host).replace("(w1|w2)", host), flat), (
            f"no clear message for {host} ({case}):\n{run.tail()}"
        )
    recap = run.recap()
    for host in failing:
        assert recap[host]["failed"] == 1, recap
    for host in set(recap) - set(failing):
        assert recap[host]["failed"] == 0, recap
    # Nothing was installed: the play stopped before changing anything.
    for name in lab.net.hosts:
        assert not (lab.prefix(name) / "venv").exists()


# ----------------------------------------------------------------------------- deployment
def test_deploy_serves_chat_split_across_workers(lab: Lab, first_run: PlaybookRun) -> None:
    run = first_run
    assert run.rc == 0, _explain(run, lab)
    recap = run.recap()
    assert set(recap) >= {"head1", "w1", "w2"} and all(r["failed"] == 0 for r in recap.values()), recap

    # The play ends by printing the endpoint and a curl example (also left on the controller).
    assert f"OpenAI-compatible endpoint: {lab.api}/v1" in run.output, run.tail()
    assert f"curl {lab.api}/v1/chat/completions" in run.output, run.tail()
    report = (lab.controller / "endpoint.txt").read_text()
    assert "Authorization: Bearer $ANYWAY_API_KEY" in report and "SmolLM2-135M-Instruct" in report
    assert "secrets/inference.key" in report and lab.key("inference") not in run.output + report  # never printed

    # A chat request, with the real OpenAI client, to the deployed head, with the generated key.
    from openai import OpenAI

    client = OpenAI(base_url=f"{lab.api}/v1", api_key=lab.key("inference"), timeout=120, max_retries=0)
    model_id = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=24, temperature=0
    )
    text = reply.choices[0].message.content or ""
    assert text.strip(), reply

    # ... answered by the model split across the two deployed workers.
    cluster = httpx.get(f"{lab.api}/v1/cluster", headers=lab.auth(), timeout=10).json()
    nodes = {n["name"]: n for n in cluster["nodes"]}
    assert {"w1", "w2"} <= set(nodes), cluster["nodes"]
    for w in ("w1", "w2"):
        assert nodes[w]["layers"], f"{w} holds no layers: {nodes[w]}"
        assert nodes[w]["rpc_endpoint"].startswith(lab.net.hosts[w].address + ":"), nodes[w]
    n_layers = cluster["model"]["n_layers"]  # layers are [start, end) ranges
    held = sorted(tuple(nodes[w]["layers"]) for w in ("w1", "w2"))
    assert held[0][0] == 0 and held[0][1] == held[1][0] and held[1][1] == n_layers, held

    # The API is not open by default, and admin actions take the admin key only.
    assert httpx.get(f"{lab.api}/v1/models", timeout=10).status_code == 401
    assert lab.key("admin") != lab.key("inference")
    r = httpx.post(f"{lab.api}/v1/nodes/w1/uncordon", headers=lab.auth(), timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required"
    assert httpx.post(f"{lab.api}/v1/nodes/w1/uncordon", headers=lab.auth("admin"), timeout=10).status_code == 200
    # The workers' RPC servers are reached over TLS with their own identities.
    assert all(nodes[w]["rpc_endpoint"] for w in ("w1", "w2"))


def test_deployed_units_verify(lab: Lab, first_run: PlaybookRun) -> None:
    assert first_run.rc == 0, _explain(first_run, lab)
    expected = {"head1": {"anyway-head.service"}, "w1": {"anyway-worker.service", "anyway-firewall.service"}}
    expected["w2"] = expected["w1"]
    for name, units in expected.items():
        files = sorted(lab.unit_dir(name).glob("*.service"))
        assert {p.name for p in files} == units
        # Clean except for what is inherent to not booting with systemd: nothing, here.
        res = subprocess.run(["systemd-analyze", "verify", *map(str, files)], capture_output=True, text=True)
        assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), (
            f"{name}: systemd-analyze verify:\n{res.stdout}{res.stderr}"
        )
        if name != "head1":
            worker, firewall = Unit.load(lab.unit_dir(name) / "anyway-worker.service"), Unit.load(
                lab.unit_dir(name) / "anyway-firewall.service")
            # Fail closed: no firewall, no worker; the firewall follows nftables' restarts and stops.
            assert "anyway-firewall.service" in worker.get("Unit", "Requires")
            assert "anyway-firewall.service" in worker.get("Unit", "After")
            assert firewall.get("Unit", "PartOf") == "nftables.service"
            assert firewall.get("Unit", "ReloadPropagatedFrom") == "nftables.service"
        for p in files:
            unit = Unit.load(p)
            assert Path(unit.exec_start[0]).exists()
            if unit.get("Service", "Type") == "oneshot":
                continue
            # Hardened: restart on failure, no privilege gain, read-only system, own user.
            assert unit.get("Service", "Restart") == "on-failure"
            assert unit.get("Service", "NoNewPrivileges") == "yes"
            assert unit.get("Service", "ProtectSystem") == "strict"
            assert unit.get("Service", "User") == lab.user(name)
            sec = subprocess.run(
                ["systemd-analyze", "security", "--offline=yes", str(p)], capture_output=True, text=True
            )
            m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", sec.stdout)
            assert m and float(m.group(1)) <= 3.0, f"{p.name} exposure too high:\n{sec.stdout[-3000:]}"


def test_deployed_files_keys_and_firewall(lab: Lab, first_run: PlaybookRun) -> None:
    assert first_run.rc == 0, _explain(first_run, lab)
    # Each box got its own identity and only the keys its role needs, secrets readable by its
    # service user only; the head's allow-list names every worker.
    wanted = {
        "head1": {"server.key_secret", "server.key", "nodes"},
        "w1": {"node.key_secret", "server.key"},
        "w2": {"node.key_secret", "server.key"},
    }
    for name, keys in wanted.items():
        kdir = lab.config_dir(name) / "keys"
        assert {p.name for p in kdir.iterdir()} == keys
        for p in kdir.glob("*.key_secret"):
            st = p.stat()
            assert stat.S_IMODE(st.st_mode) == 0o600 and pwd.getpwuid(st.st_uid).pw_name == lab.user(name)
        assert (kdir / "server.key").read_bytes() == (lab.controller / "keys" / "server.key").read_bytes()
    assert {p.name for p in (lab.config_dir("head1") / "keys" / "nodes").iterdir()} == {"w1.key", "w2.key"}
    assert (lab.config_dir("w1") / "keys" / "node.key_secret").read_bytes() != (
        lab.config_dir("w2") / "keys" / "node.key_secret").read_bytes()
    assert pwd.getpwnam(lab.user("w1")).pw_shell == "/usr/sbin/nologin"

    # Only the head holds the model.
    assert list(lab.net.hosts["head1"].dir.rglob("*.gguf"))
    for w in ("w1", "w2"):
        assert not list(lab.net.hosts[w].dir.rglob("*.gguf"))

    # The RPC port of each worker answers the head and nobody else (the root namespace
    # stands for any other machine on the network) ...
    head_ns = lab.net.hosts["head1"].ns()
    for w in ("w1", "w2"):
        addr = lab.net.hosts[w].address
        assert connects(head_ns, addr, 50052), f"the head cannot reach {w}'s RPC port"
        assert not connects([], addr, 50052), f"{w}'s RPC port is open to everyone"
        rules = sh(*lab.net.hosts[w].ns("nft", "list", "table", "inet", "anyway_worker")).stdout
        assert f"ip saddr {lab.head} tcp dport 50052 accept" in rules, rules
    # ... and still after nftables is restarted (its ruleset flushes every table first): on
    # Debian `systemctl restart|reload nftables` runs exactly this.
    w1 = lab.net.hosts["w1"]
    conf = lab.host_dir("w1", "etc", "nftables.conf")
    assert f'include "{lab.config_dir("w1")}/firewall.nft"' in conf.read_text()
    sh(*w1.ns("nft", "-f", str(conf)))
    assert connects(head_ns, w1.address, 50052) and not connects([], w1.address, 50052), "rules lost on restart"
    # IPv6 is covered: a listener on the RPC port over IPv6 is dropped for everyone (the head is
    # allowed at its IPv4 address), while another port answers.
    tag = lab.net.tag
    v6 = {"root": f"fd77:{tag[:4]}::1", "head1": f"fd77:{tag[:4]}::10", "w1": f"fd77:{tag[:4]}::11"}
    sh("ip", "-6", "addr", "add", f"{v6['root']}/64", "dev", lab.net.bridge, "nodad")
    for name in ("head1", "w1"):
        sh(*lab.net.hosts[name].ns("ip", "-6", "addr", "add", f"{v6[name]}/64", "dev", "eth0", "nodad"))
    listen_v6 = (
        "import socket, time\n"
        "held = []\n"
        "for port in (50052, 50053):\n"
        "    s = socket.socket(socket.AF_INET6)\n"
        "    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n"
        f"    s.bind(({v6['w1']!r}, port))\n"
        "    s.listen()\n"
        "    held.append(s)\n"
        "time.sleep(60)\n"
    )
    listener = subprocess.Popen(w1.ns("/usr/bin/python3", "-c", listen_v6))
    try:
        wait_until_v6 = time.monotonic() + 10
        while not connects([], v6["w1"], 50053) and time.monotonic() < wait_until_v6:
            time.sleep(0.2)
        assert connects([], v6["w1"], 50053), "no IPv6 path to w1 at all"
        assert not connects([], v6["w1"], 50052), "w1's RPC port is open over IPv6"
        assert not connects(head_ns, v6["w1"], 50052), "w1's RPC port answers an address that is not the head's"
    finally:
        listener.kill()


def test_every_package_on_a_box_is_pinned_by_the_lock(lab: Lab, first_run: PlaybookRun) -> None:
    """Installed with pip --require-hashes from requirements.txt: the lock's dependencies, the
    wheelhouse's llama-cpp-python (its hash from the manifest) and the product wheel; nothing else."""
    assert first_run.rc == 0, _explain(first_run, lab)
    assert "Install - check every wheel against the manifest the controller packed" in first_run.output
    lock = (ANSIBLE_DIR / "roles" / "anyway_common" / "files" / "requirements.lock").read_text()
    pinned = {m.group(1).lower().replace("_", "-"): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+) ", lock, re.M)}
    for name in ("head1", "w1"):
        blocks: list[list[str]] = []
        for line in (lab.prefix(name) / "requirements.txt").read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                if line[0].isspace() and blocks:
                    blocks[-1].append(line)
                else:
                    blocks.append([line])
        assert blocks and all(any("--hash=sha256:" in part for part in b) for b in blocks), blocks
        freeze = subprocess.run([str(lab.prefix(name) / "venv" / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                                capture_output=True, text=True, check=True).stdout
        for line in freeze.split():
            pkg, _, version = line.partition("==")
            pkg = pkg.lower().replace("_", "-")
            if pkg in ("pip", "setuptools", "wheel", "anyway"):
                continue
            assert pinned.get(pkg) == version, f"{name}: {pkg} {version} is not what the lock pins ({pinned.get(pkg)})"


def test_second_run_changes_nothing(lab: Lab, first_run: PlaybookRun) -> None:
    assert first_run.rc == 0, _explain(first_run, lab)
    run = run_playbook(lab.base, lab.inventory, on_line=lambda line: None)
    print(f"second run: {run.seconds:.0f} s (log {run.log})")
    assert run.rc == 0, _explain(run, lab)
    recap = run.recap()
    assert set(recap) == {"head1", "w1", "w2"}, recap
    changed = {h: r["changed"] for h, r in recap.items() if r["changed"] or r["failed"]}
    if changed:
        tasks = re.findall(r"TASK \[([^\]]+)\][^\n]*\n(?:[^\n]*\n)*?changed: \[(\S+?)\]", run.output)
        pytest.fail(f"second run changed something: {changed}\n{tasks}\n{run.tail(200)}")
    assert f"OpenAI-compatible endpoint: {lab.api}/v1" in run.output
    assert httpx.get(f"{lab.api}/health", timeout=10).status_code == 200


def test_remove_a_worker(lab: Lab, first_run: PlaybookRun) -> None:
    assert first_run.rc == 0, _explain(first_run, lab)
    refused = run_playbook(lab.base, lab.inventory, "-l", "w2", playbook=REMOVE)
    assert refused.rc != 0 and "confirm with -e anyway_remove=yes" in refused.flat(), refused.tail()

    lab.systemd.stop_host("w2")  # what `systemctl disable --now` does; systemd is not PID 1 here
    run = run_playbook(lab.base, lab.inventory, "-l", "w2", "-e", "anyway_remove=yes", playbook=REMOVE)
    assert run.rc == 0, _explain(run, lab)
    assert set(run.recap()) == {"w2"}
    for gone in (lab.prefix("w2"), lab.config_dir("w2"), lab.host_dir("w2", "var", "lib", "anyway")):
        assert not gone.exists(), gone
    assert not list(lab.unit_dir("w2").glob("*.service"))
    with pytest.raises(KeyError):
        pwd.getpwnam(lab.user("w2"))
    assert sh(*lab.net.hosts["w2"].ns("nft", "list", "tables")).stdout.strip() == ""
    assert lab.prefix("w1").exists()  # the other boxes are untouched

    # Its identity is revoked: off the controller's keys and the head's allow-list.
    assert not (lab.controller / "keys" / "nodes" / "w2.key").exists()
    assert list((lab.controller / "keys" / "revoked").glob("w2.*.key"))
    assert not (lab.config_dir("head1") / "keys" / "nodes" / "w2.key").exists()

    # The head notices the worker is gone and serves again with every layer on w1.
    headers = lab.auth()
    deadline = time.monotonic() + 180
    cluster: dict = {}
    while time.monotonic() < deadline:
        try:
            cluster = httpx.get(f"{lab.api}/v1/cluster", headers=headers, timeout=10).json()
        except httpx.HTTPError:
            cluster = {}
        nodes = {n["name"]: n for n in cluster.get("nodes", [])}
        if cluster.get("health", {}).get("status") == "ok" and (nodes.get("w1") or {}).get("layers") and not (
            nodes.get("w2") or {}
        ).get("layers"):
            break
        time.sleep(1)
    else:
        pytest.fail(f"the head did not re-plan onto w1: {json.dumps(cluster)[:2000]}\n{lab.systemd.tails()}")
    reply = httpx.post(
        f"{lab.api}/v1/chat/completions",
        headers=headers,
        json={"model": cluster["model"]["id"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
        timeout=120,
    )
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"].strip(), reply.text
