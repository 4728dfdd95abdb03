"""Appliance images (images/, docs/IMAGES.md).

Two kinds of tests:

- The first-boot config parser (images/firstboot/anyway_firstboot.py) on this machine: fast,
  part of the default `make test`.
- Tests marked `image` build the images with images/build.sh (as root: debootstrap, chroot) and
  check them: the product runs inside the root file system, its units pass
  `systemd-analyze verify`, the first-boot tool inside the image rejects a bad anyway.conf and
  accepts a good one, a worker started from the root file system joins a head on this machine
  and serves layers, the OCI layout is valid and its layer runs `anyway`, and the raw disk image
  boots under qemu (software emulation) far enough that the first-boot unit prints its check and
  the worker joins the head. They take minutes and are skipped unless ANYWAY_IMAGE_TESTS=1:
  run them with `make image-test` (which runs `make image` first).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from appliance.common.keys import ISSUED_DIR, add_node, init_keys, load_worker_keys
from appliance.cli.up import free_port

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
OUT = Path(os.environ.get("IMAGE_OUT") or REPO / "build" / "images").resolve()
ROOTFS = OUT / "rootfs"
DISK = OUT / "anyway-worker-amd64.img"
IMAGE_TESTS = os.environ.get("ANYWAY_IMAGE_TESTS") == "1"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
BOOT_OFFSET = 1 << 20  # the boot partition starts at 1 MiB
QEMU_BOOT_TIMEOUT_S = float(os.environ.get("ANYWAY_QEMU_TIMEOUT", "600"))

# The `image` marker: add it to pyproject's [tool.pytest.ini_options] markers; until then
# creating it must not warn.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    _image_mark = pytest.mark.image


def image_test(timeout_s: int) -> Any:
    """Decorator: the `image` marker, skipped unless ANYWAY_IMAGE_TESTS=1, with a time limit
    that covers a cold image build in the first test that needs it."""

    def deco(fn: Any) -> Any:
        fn = pytest.mark.timeout(timeout_s)(fn)
        fn = pytest.mark.skipif(
            not IMAGE_TESTS,
            reason="image tests build a Debian root fs (10-20 min, root): run 'make image-test' or set ANYWAY_IMAGE_TESTS=1",
        )(fn)
        return _image_mark(fn)

    return deco


BUILD_TIMEOUT_S = 2400  # a cold build: Debian packages, base root fs, llama-cpp-python wheel


def _load_firstboot() -> Any:
    spec = importlib.util.spec_from_file_location("anyway_firstboot", IMAGES / "firstboot" / "anyway_firstboot.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["anyway_firstboot"] = mod
    spec.loader.exec_module(mod)
    return mod


fb = _load_firstboot()


def worker_keys(cluster: Path, name: str, dst: Path) -> Path:
    """What an operator copies onto the stick: the box's own bundle (`anyway keys add`)."""
    if not (cluster / ISSUED_DIR / name).exists():
        add_node(cluster, name)
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("node.key_secret", "server.key"):
        shutil.copy(cluster / ISSUED_DIR / name / f, dst / f)
    return dst


def problems_of(path: Path) -> list[str]:
    with pytest.raises(fb.ConfigError) as ei:
        fb.parse_config(path)
    return [str(p) for p in ei.value.problems]


# ============================================================================ parser (fast)
def test_shipped_example_is_rejected_until_edited(tmp_path: Path) -> None:
    shutil.copytree(IMAGES / "bootpart", tmp_path / "boot")
    probs = problems_of(tmp_path / "boot" / "anyway.conf")
    assert any("head is not set" in p and "head = 192.168.1.10:5555" in p for p in probs), probs
    assert any(p.startswith("keys/") and "no cluster keys" in p for p in probs), probs


def test_good_config_with_a_keys_folder(tmp_path: Path) -> None:
    init_keys(tmp_path / "cluster")
    boot = tmp_path / "boot"
    worker_keys(tmp_path / "cluster", "old-dell", boot / "keys")
    (boot / "anyway.conf").write_text(
        "\ufeff# edited on Windows\r\nhead = 192.168.1.10\r\nname = old-dell   # the grey one\r\n"
        "threads = 2\r\nmax_memory = 6G\r\n"
    )
    s = fb.parse_config(boot / "anyway.conf")
    assert (s.head, s.name, s.threads, s.max_memory) == ("tcp://192.168.1.10:5555", "old-dell", 2, "6G")
    assert s.rpc_allow == ["192.168.1.10/32"] and s.firewall
    # what it writes is what the worker's unit runs with
    root = tmp_path / "root"
    notes = fb.apply(s, root, live=False)
    assert "node name old-dell" in notes
    opts = yaml.safe_load((root / "etc/anyway/worker.yml").read_text())
    assert opts["head"] == "tcp://192.168.1.10:5555" and opts["keys"] == "/etc/anyway/keys"
    assert load_worker_keys(root / "etc/anyway/keys").node.name == "old-dell"
    assert oct((root / "etc/anyway/keys/node.key_secret").stat().st_mode & 0o777) == "0o640"
    assert "tcp dport 50052 ip saddr { 192.168.1.10/32 } accept" in (root / "etc/anyway/firewall.nft").read_text()
    assert (root / "etc/hostname").read_text() == "old-dell\n"
    from appliance.cli import main as anyway_main

    with pytest.raises(SystemExit) as ei:  # the product's --config accepts every key (unknown ones are an error)
        anyway_main(["worker", "--config", str(root / "etc/anyway/worker.yml"), "--help"])
    assert ei.value.code == 0


def test_the_name_comes_from_the_keys_and_a_head_name_needs_rpc_allow(tmp_path: Path) -> None:
    """Each box has its own identity, named: the node is who its keys say. A head given by name
    cannot restrict the firewall to its address: the image does not open the RPC port wider
    (no more private ranges), it asks for rpc_allow."""
    init_keys(tmp_path / "cluster")
    boot = tmp_path / "boot"
    worker_keys(tmp_path / "cluster", "shelf-3", boot / "keys")
    conf = boot / "anyway.conf"
    conf.write_text("head = tcp://head.lan:6000\n"
                    "ssh_key = ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl op@laptop\n")
    assert any("head 'head.lan' is a name" in p and "rpc_allow" in p for p in problems_of(conf))
    conf.write_text(conf.read_text() + "rpc_allow = 192.168.1.10\n")
    s = fb.parse_config(conf)
    assert s.name == "shelf-3" and s.head == "tcp://head.lan:6000" and s.rpc_allow == ["192.168.1.10/32"]
    fb.apply(s, tmp_path / "root", live=False)
    rules = (tmp_path / "root/etc/anyway/firewall.nft").read_text()
    assert "192.168.1.10/32" in rules and "10.0.0.0/8" not in rules and "fe80" not in rules
    assert load_worker_keys(tmp_path / "root/etc/anyway/keys").node.name == "shelf-3"
    assert "op@laptop" in (tmp_path / "root/root/.ssh/authorized_keys").read_text()
    conf.write_text(conf.read_text() + "name = other-box\n")
    assert any("issued for 'shelf-3'" in p for p in problems_of(conf))


def test_bad_config_lists_every_problem_with_its_line(tmp_path: Path) -> None:
    conf = tmp_path / "anyway.conf"
    conf.write_text(
        "head = http://10.0.0.5:8080\n"
        "name = Old_PC\n"
        "rpc-port = 99999\n"
        "treads = 2\n"
        "client_key_secret = tooshort\n"
        "max_memory = lots\n"
        "ssh_key = ssh-rsa notbase64!!\n"
        "just some words\n"
    )
    probs = problems_of(conf)
    text = "\n".join(probs)
    assert "anyway.conf line 8: expected 'key = value'" in text
    assert len(probs) == 1  # a syntax error stops there: the rest would be guesses
    conf.write_text(conf.read_text().replace("just some words\n", ""))
    text = "\n".join(problems_of(conf))
    for expected in (
        "line 1: head 'http://10.0.0.5:8080': the head's control address is tcp://HOST:PORT",
        "line 2: name 'Old_PC': use 1-63 lowercase letters",
        "(for example 'old-pc')",
        "line 3: rpc_port: '99999' must be a port number",
        "line 4: unknown setting 'treads' (did you mean 'threads'?)",
        "line 5: client_key_secret: keys are no longer pasted here: every box has its own identity",
        "line 6: max_memory: 'lots' is not a memory size",
        "line 7: ssh_key: the ssh-rsa key data is not base64",
    ):
        assert expected in text, f"{expected!r} not in:\n{text}"


def test_damaged_keys_the_head_secret_or_the_old_shared_key_are_refused(tmp_path: Path) -> None:
    init_keys(tmp_path / "a")
    init_keys(tmp_path / "b")
    boot = tmp_path / "boot"
    worker_keys(tmp_path / "a", "w1", boot / "keys")
    (boot / "anyway.conf").write_text("head = 10.1.1.1:5555\n")
    assert fb.parse_config(boot / "anyway.conf").name == "w1"
    # a secret key that does not belong to its public key (the two halves of two identities)
    add_node(tmp_path / "b", "w1")
    mine = (boot / "keys" / "node.key_secret").read_text()
    theirs = (tmp_path / "b" / ISSUED_DIR / "w1" / "node.key_secret").read_text()
    secret_line = re.search(r'secret-key = "[^"]+"', theirs).group(0)  # type: ignore[union-attr]
    (boot / "keys" / "node.key_secret").write_text(re.sub(r'secret-key = "[^"]+"', secret_line, mine))
    text = "\n".join(problems_of(boot / "anyway.conf"))
    assert "keys/node.key_secret: its public and secret keys do not belong together" in text
    (boot / "keys" / "node.key_secret").write_text(mine)
    shutil.copy(tmp_path / "a" / "server.key_secret", boot / "keys" / "server.key")
    assert any("keys/server.key: contains the head's SECRET key" in p for p in problems_of(boot / "anyway.conf"))
    (boot / "keys" / "node.key_secret").write_text("garbage\n")
    assert any(p.startswith("keys/node.key_secret: ") for p in problems_of(boot / "anyway.conf"))
    for f in ("node.key_secret", "server.key"):
        (boot / "keys" / f).unlink()
    (boot / "keys" / "client.key_secret").write_text("old\n")
    assert any("old shared worker key" in p for p in problems_of(boot / "anyway.conf"))
    (boot / "keys" / "client.key_secret").unlink()
    (boot / "keys" / "server.key").write_text((tmp_path / "a" / "server.key").read_text())
    assert "keys/node.key_secret: missing" in "\n".join(problems_of(boot / "anyway.conf"))


@pytest.mark.parametrize(
    "value, expected",
    [
        ("10.0.0.1", ("10.0.0.1", 5555)),
        ("tcp://10.0.0.1:6000", ("10.0.0.1", 6000)),
        ("head-1.lan:5555", ("head-1.lan", 5555)),
        ("[fd00::1]:5555", ("fd00::1", 5555)),
        ("10.0.0.256:5555", "not an IPv4 address"),
        ("10.0.0.1:0", "must be a number from 1 to 65535"),
        ("fd00::1", "in brackets"),
        ("udp://10.0.0.1:5555", "not udp://"),
        ("bad_host:5555", "not a host name"),
    ],
)
def test_head_address_forms(value: str, expected: Any) -> None:
    if isinstance(expected, tuple):
        assert fb.parse_head(value) == expected
    else:
        with pytest.raises(ValueError, match=re.escape(expected)):
            fb.parse_head(value)


# ============================================================================ image (slow)
@pytest.fixture(scope="session")
def built() -> Path:
    """images/build.sh build: incremental, so after `make image` this takes seconds."""
    if os.geteuid() != 0:
        pytest.skip("building the images needs root (debootstrap, chroot)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    log = OUT.parent / "image-build.log"
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        r = subprocess.run(["bash", str(IMAGES / "build.sh"), "build"], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    assert r.returncode == 0, f"images/build.sh failed (log {log}):\n{tail}"
    print(f"images/build.sh: {time.monotonic() - t0:.0f} s\n{tail}")
    return OUT


def _mounts_under(root: Path) -> list[str]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mnt = line.split()[1]
        if mnt == str(root) or mnt.startswith(str(root) + "/"):
            out.append(mnt)
    return sorted(out, reverse=True)


class Chroot:
    """/proc, /sys, /dev and a /run tmpfs mounted in the root fs for the session; unmounted at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: list[Path] = []

    def mount(self) -> None:
        for args, target in (
            (["-t", "proc", "proc"], "proc"),
            (["-t", "sysfs", "sysfs"], "sys"),
            (["--bind", "/dev"], "dev"),
            (["-t", "tmpfs", "tmpfs"], "run"),
        ):
            t = self.root / target
            subprocess.run(["mount", *args, str(t)], check=True)
            self.mounted.append(t)

    def unmount(self) -> None:
        for m in _mounts_under(self.root):
            if subprocess.run(["umount", m], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", m], capture_output=True)
        self.mounted.clear()

    def run(self, *cmd: str, user: str | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
        pre = [CHROOT, *([f"--userspec={user}"] if user else []), str(self.root)]
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 120)
        kw.setdefault("env", {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
        return subprocess.run([*pre, *cmd], **kw)


@pytest.fixture(scope="session")
def chroot(built: Path) -> Iterator[Chroot]:
    c = Chroot(ROOTFS)
    try:
        c.mount()
        yield c
    finally:
        c.unmount()
        assert not _mounts_under(ROOTFS), f"still mounted: {_mounts_under(ROOTFS)}"


@pytest.fixture
def scratch(built: Path) -> Iterator[tuple[Path, str]]:
    """A folder inside the root fs's /tmp: (host path, path inside the chroot)."""
    inside = f"/tmp/anyway-test-{os.getpid()}-{time.monotonic_ns()}"
    host = ROOTFS / inside.lstrip("/")
    host.mkdir(parents=True)
    try:
        yield host, inside
    finally:
        shutil.rmtree(host, ignore_errors=True)


@image_test(BUILD_TIMEOUT_S)
def test_build_outputs_inputs_and_checksums(built: Path) -> None:
    sums = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=built, capture_output=True, text=True)
    assert sums.returncode == 0, sums.stdout + sums.stderr
    listed = {line.split()[1] for line in (built / "SHA256SUMS").read_text().splitlines()}
    assert {DISK.name, "anyway-oci.tar", "inputs.txt", "packages.lock", "python.lock"} <= listed
    inputs = (built / "inputs.txt").read_text()
    for field in ("debian ", "debian mirror", "debian packages", "llama-cpp-python    0.3.36", "CMAKE_ARGS", "-DGGML_RPC=ON", "SOURCE_DATE_EPOCH", "kernel"):
        assert field in inputs, f"{field!r} missing from inputs.txt:\n{inputs}"
    locked = (built / "packages.lock").read_text()
    assert re.search(r"^linux-image-\d.*-amd64=", locked, re.M) and "openssh-server=" in locked and "systemd=" in locked
    py = (built / "python.lock").read_text()
    assert "llama_cpp_python==0.3.36" in py.replace("-", "_") and "pyzmq==27.3.0" in py


@image_test(BUILD_TIMEOUT_S)
def test_product_runs_inside_the_root_fs(chroot: Chroot) -> None:
    r = chroot.run("/opt/anyway/venv/bin/anyway", "--version")
    assert r.returncode == 0 and r.stdout.strip() == "anyway 0.1.0", r
    r = chroot.run("anyway", "--version", user="anyway:anyway")  # /usr/local/bin, as the unit's user
    assert r.returncode == 0 and "anyway 0.1.0" in r.stdout, r
    r = chroot.run("/opt/anyway/venv/bin/python", "-c", "import llama_cpp; print(llama_cpp.__version__, llama_cpp.llama_supports_rpc())")
    assert r.stdout.split() == ["0.3.36", "True"], r
    release = (ROOTFS / "etc/anyway/image-release").read_text()
    assert "ANYWAY_VERSION=0.1.0" in release and "REQUIRED_CPU_FLAGS=" in release
    # per-machine state is not shipped
    assert (ROOTFS / "etc/machine-id").read_text() == ""
    assert not list((ROOTFS / "etc/ssh").glob("ssh_host_*"))


@image_test(BUILD_TIMEOUT_S)
def test_units_pass_systemd_analyze_verify(chroot: Chroot) -> None:
    units = ["/etc/systemd/system/anyway-worker.service", "/etc/systemd/system/anyway-firstboot.service"]
    r = chroot.run("systemd-analyze", "verify", *units)
    assert r.returncode == 0, r.stdout + r.stderr
    noise = [line for line in (r.stdout + r.stderr).splitlines() if "anyway" in line]
    assert not noise, noise  # no warnings about our units either
    for unit in ("anyway-worker.service", "anyway-firstboot.service", "ssh.service", "systemd-networkd.service"):
        assert chroot.run("systemctl", "is-enabled", unit).stdout.strip() == "enabled", unit
    assert chroot.run("systemctl", "is-enabled", "systemd-firstboot.service").stdout.strip() == "masked"
    assert chroot.run("systemctl", "get-default").stdout.strip() == "multi-user.target"
    worker = (ROOTFS / "etc/systemd/system/anyway-worker.service").read_text()
    assert "Requires=anyway-firstboot.service" in worker and "User=anyway" in worker


@image_test(BUILD_TIMEOUT_S)
def test_ssh_is_hardened(chroot: Chroot, scratch: tuple[Path, str]) -> None:
    host, inside = scratch
    (ROOTFS / "run/sshd").mkdir(exist_ok=True)  # made by ssh.service's RuntimeDirectory= at boot
    assert chroot.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{inside}/hostkey").returncode == 0
    r = chroot.run("/usr/sbin/sshd", "-T", "-h", f"{inside}/hostkey")  # the effective configuration
    assert r.returncode == 0, r.stderr
    eff = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    assert eff["passwordauthentication"] == "no"
    assert eff["permitrootlogin"] == "without-password"  # = prohibit-password
    assert eff["kbdinteractiveauthentication"] == "no"
    assert eff["authenticationmethods"] == "publickey"
    assert eff["x11forwarding"] == "no" and eff["allowtcpforwarding"] == "no"


@image_test(BUILD_TIMEOUT_S)
def test_first_boot_tool_in_the_image_rejects_bad_and_accepts_good(chroot: Chroot, scratch: tuple[Path, str], tmp_path: Path) -> None:
    host, inside = scratch
    bad = host / "bad"
    shutil.copytree(IMAGES / "bootpart", bad)
    (bad / "anyway.conf").write_text("head = 192.168.1.300:5555\nname = Bad Name\n")
    r = chroot.run("anyway-firstboot", "check", f"{inside}/bad/anyway.conf")
    assert r.returncode == 1, r
    out = r.stdout
    assert f"anyway-firstboot: {inside}/bad/anyway.conf is INVALID (3 problems):" in out, out
    assert "ERROR anyway.conf line 1: head '192.168.1.300:5555': '192.168.1.300' is not an IPv4 address" in out, out
    assert "ERROR anyway.conf line 2: name 'Bad Name'" in out, out
    assert "ERROR keys/: no cluster keys" in out, out

    init_keys(tmp_path / "cluster")
    good = host / "good"
    shutil.copytree(IMAGES / "bootpart", good)
    worker_keys(tmp_path / "cluster", "old-dell", good / "keys")
    conf = (good / "anyway.conf").read_text().replace("#head = 192.168.1.10:5555", "head = 192.168.1.10:5555")
    (good / "anyway.conf").write_text(conf.replace("#name = old-dell", "name = old-dell"))
    r = chroot.run("anyway-firstboot", "check", f"{inside}/good/anyway.conf")
    assert r.returncode == 0, r
    assert f"{inside}/good/anyway.conf is valid: head tcp://192.168.1.10:5555, keys keys/ on the boot partition" in r.stdout
    r = chroot.run("anyway-firstboot", "apply", f"{inside}/good/anyway.conf", "--root", f"{inside}/root")
    assert r.returncode == 0, r
    assert "node name old-dell" in r.stdout
    yml = host / "root/etc/anyway/worker.yml"
    assert "head: 'tcp://192.168.1.10:5555'" in yml.read_text()
    # the product inside the image accepts the generated config, and the keys are the anyway user's
    r = chroot.run("anyway", "worker", "--config", f"{inside}/root/etc/anyway/worker.yml", "--help")
    assert r.returncode == 0, r
    st = (host / "root/etc/anyway/keys/node.key_secret").stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (0, 900, "0o640")


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """The worker, its RPC server child and anything else in its process group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@image_test(BUILD_TIMEOUT_S)
def test_worker_from_the_root_fs_joins_a_head_here_and_serves_layers(
    chroot: Chroot, scratch: tuple[Path, str], make_cluster: Any, tiny_model: Path
) -> None:
    from openai import OpenAI

    host, inside = scratch
    cluster = make_cluster(tiny_model, workers=0, heartbeat=0.5)  # the worker's default heartbeat
    rpc_port = free_port()
    boot = host / "boot"
    worker_keys(cluster.keys, "imgworker", boot / "keys")
    (boot / "anyway.conf").write_text(
        f"head = {cluster.control.removeprefix('tcp://')}\nname = imgworker\n"
        f"rpc_port = {rpc_port}\nrpc_host = 127.0.0.1\nthreads = 1\n"
    )
    # the same steps as at boot: the first-boot tool writes worker.yml, the unit's command runs it
    r = chroot.run("anyway-firstboot", "apply", f"{inside}/boot/anyway.conf", "--root", f"{inside}/root")
    assert r.returncode == 0, r
    (host / "cache").mkdir()
    os.chown(host / "cache", 900, 900)
    log = host / "worker.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [CHROOT, "--userspec=anyway:anyway", str(ROOTFS),
             "/opt/anyway/venv/bin/anyway", "worker", "--config", f"{inside}/root/etc/anyway/worker.yml",
             "--keys", f"{inside}/root/etc/anyway/keys", "--cache-dir", f"{inside}/cache"],
            stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            env={"PATH": "/usr/bin:/bin", "HOME": "/var/lib/anyway", "ANYWAY_CACHE_DIR": f"{inside}/cache",
                 "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"},
        )
    try:
        try:
            state = cluster.wait_serving(nodes=1, timeout_s=180)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n--- worker log ---\n{log.read_text(errors='replace')[-3000:]}") from None
        node = next(n for n in state["nodes"] if n["name"] == "imgworker")
        assert node["layers"] and node["layers"][1] - node["layers"][0] == 8, node  # all 8 layers
        assert node["versions"]["package"] == "0.1.0"
        assert os.readlink(f"/proc/{proc.pid}/root") == str(ROOTFS)  # really running from the image
        client = OpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0, timeout=120)
        model_id = client.models.list().data[0].id
        answer = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8, temperature=0
        )
        assert answer.choices[0].message.content
        after = httpx.get(f"{cluster.url}/v1/cluster", timeout=5).json()
        assert [n["name"] for n in after["nodes"] if n.get("layers")] == ["imgworker"]
    finally:
        _kill_group(proc)
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _root_of(p) == str(ROOTFS)]
    assert not leftovers, f"processes still running in the root fs: {leftovers}"


def _root_of(p: Path) -> str:
    try:
        return os.readlink(p / "root")
    except OSError:
        return ""


@image_test(BUILD_TIMEOUT_S)
def test_oci_image_layout_is_valid_and_runs_anyway(built: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("anyway_oci", IMAGES / "oci.py")
    assert spec and spec.loader
    oci = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oci)
    layout = built / "oci"
    got = oci.verify(layout)  # every digest and size, the diff_id of the uncompressed layer
    cfg = got["config"]["config"]
    assert cfg["Entrypoint"] == ["/opt/anyway/venv/bin/anyway"] and cfg["Cmd"] == ["worker"]
    assert got["config"]["architecture"] == "amd64" and got["config"]["os"] == "linux"
    assert got["index"]["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "0.1.0"
    # the archive holds the same layout
    with tarfile.open(built / "anyway-oci.tar") as t:
        assert json.loads(t.extractfile("index.json").read()) == got["index"]  # type: ignore[union-attr]
    if shutil.which("skopeo"):  # a real OCI client reads both
        for ref in (f"oci:{layout}", f"oci-archive:{built / 'anyway-oci.tar'}"):
            r = subprocess.run(["skopeo", "inspect", "--config", ref], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["config"]["Cmd"] == ["worker"]
    # unpack the layer and run the image's command (no container engine here: chroot)
    layer = got["manifest"]["layers"][0]["digest"].split(":")[1]
    root = tmp_path / "container"
    root.mkdir()
    subprocess.run(["tar", "-xzf", str(layout / "blobs/sha256" / layer), "-C", str(root)], check=True)
    assert not (root / "boot/vmlinuz").exists() and not any((root / "usr/lib/modules").iterdir())
    r = subprocess.run([CHROOT, "--userspec=900:900", str(root), *cfg["Entrypoint"], "--version"],
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert r.stdout.strip() == "anyway 0.1.0", r
    r = subprocess.run([CHROOT, str(root), *cfg["Entrypoint"], "head", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--model" in r.stdout


def _fat(disk: Path, *args: str) -> subprocess.CompletedProcess[str]:
    tool, rest = args[0], args[1:]
    return subprocess.run([tool, "-i", f"{disk}@@{BOOT_OFFSET}", *rest], capture_output=True, text=True,
                          env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})


@image_test(BUILD_TIMEOUT_S)
def test_disk_image_layout(built: Path) -> None:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(DISK)], capture_output=True, text=True, check=True).stdout)
    pt = table["partitiontable"]
    assert pt["label"] == "dos" and pt["id"] == "0x414e5957"
    boot, root = pt["partitions"]
    assert boot["start"] == 2048 and boot["type"] == "c" and boot.get("bootable")
    assert root["type"] == "83"
    listing = _fat(DISK, "mdir", "-a", "-/", "-b", "::/").stdout
    for f in ("::/anyway.conf", "::/README.txt", "::/keys/README.txt", "::/vmlinuz", "::/initrd.img", "::/ldlinux.sys", "::/ldlinux.c32",
              "::/syslinux.cfg", "::/EFI/BOOT/BOOTX64.EFI", "::/loader/entries/anyway.conf"):
        assert f in listing.split(), f"{f} not on the boot partition:\n{listing}"
    assert _fat(DISK, "mtype", "::/anyway.conf").stdout.replace("\r\n", "\n") == (IMAGES / "bootpart/anyway.conf").read_text()
    cfg = _fat(DISK, "mtype", "::/syslinux.cfg").stdout
    assert "root=UUID=6e7f5a1c-4a59-4e57-8a59-0000000a0001" in cfg and "console=ttyS0" in cfg
    blk = subprocess.run(["blkid", "-p", "-O", str(BOOT_OFFSET), "-o", "export", str(DISK)], capture_output=True, text=True).stdout
    assert "UUID=A117-0001" in blk.split() and "LABEL=ANYWAY" in blk.split(), blk  # what /etc/fstab mounts
    assert "UUID=A117-0001" in (ROOTFS / "etc/fstab").read_text()
    label = subprocess.run(["mlabel", "-i", f"{DISK}@@{BOOT_OFFSET}", "-s", "::"], capture_output=True, text=True,
                           env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout
    assert "ANYWAY" in label
    off = root["start"] * 512
    r = subprocess.run(["debugfs", "-R", "stat /opt/anyway/venv/bin/anyway", f"{DISK}?offset={off}"], capture_output=True, text=True)
    assert "Type: regular" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(["dumpe2fs", "-h", f"{DISK}?offset={off}"], capture_output=True, text=True)
    assert "Filesystem UUID:          6e7f5a1c-4a59-4e57-8a59-0000000a0001" in r.stdout, r.stdout[:500]


class QemuBoot:
    """A copy of the disk image, 1 GiB larger, with the operator's files put on its boot partition
    with mtools, booted with software emulation (TCG) and user networking; the serial console is
    a file. Killed (its whole process group) by stop()."""

    def __init__(self, tmp: Path, files: dict[str, Path], *, uefi: bool = False, hostfwd: str = "") -> None:
        self.qemu = shutil.which("qemu-system-x86_64")
        if not self.qemu:
            pytest.skip("qemu-system-x86_64 is not installed (bash images/build.sh deps --test)")
        self.disk = tmp / "disk.img"
        subprocess.run(["cp", "--sparse=always", str(DISK), str(self.disk)], check=True)
        os.truncate(self.disk, self.disk.stat().st_size + (1 << 30))  # a bigger stick: the first boot grows root
        for dest, src in files.items():
            r = _fat(self.disk, "mcopy", "-o", str(src), f"::/{dest}")
            assert r.returncode == 0, r.stderr
        self.console = tmp / "console.log"
        cmd = [
            self.qemu, "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048", "-display", "none",
            "-monitor", "none", "-no-reboot", "-serial", f"file:{self.console}",
            "-drive", f"file={self.disk},format=raw,if=virtio",
            "-netdev", "user,id=n0" + (f",hostfwd={hostfwd}" if hostfwd else ""), "-device", "virtio-net-pci,netdev=n0",
        ]
        if uefi:
            code = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
            if not code.exists():
                pytest.skip("OVMF is not installed (apt-get install ovmf)")
            shutil.copy("/usr/share/OVMF/OVMF_VARS_4M.fd", tmp / "vars.fd")
            cmd += ["-machine", "q35", "-drive", f"if=pflash,format=raw,readonly=on,file={code}",
                    "-drive", f"if=pflash,format=raw,file={tmp / 'vars.fd'}"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.t0 = time.monotonic()
        self.marks: dict[str, float] = {}

    def text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_for(self, what: str, pred: Any, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise AssertionError(f"qemu exited ({self.proc.returncode}) waiting for {what}: {err}\n{self.text()[-3000:]}")
            got = pred()
            if got:
                self.marks[what] = round(time.monotonic() - self.t0)
                return got
            time.sleep(1)
        raise AssertionError(f"no {what} after {timeout_s:.0f} s of emulated boot; serial console:\n{self.text()[-4000:]}")

    def wait_text(self, what: str, needle: str, timeout_s: float = QEMU_BOOT_TIMEOUT_S) -> None:
        self.wait_for(what, lambda: needle in self.text(), timeout_s)

    def stop(self, keep_as: str) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        if self.console.exists():
            shutil.copy(self.console, OUT.parent / keep_as)
        print(f"qemu boot milestones (s since start): {json.dumps(self.marks)}")


@image_test(BUILD_TIMEOUT_S)
def test_disk_image_boots_in_qemu_first_boot_checks_the_config_and_the_worker_serves(
    built: Path, tmp_path: Path, make_cluster: Any, tiny_model: Path
) -> None:
    """BIOS boot (SYSLINUX). The first-boot unit runs, prints its check on the serial console,
    makes the SSH host keys, grows the root fs, loads the firewall, and the worker it starts joins
    a head running on this machine (the guest reaches it at 10.0.2.2, qemu's address for this
    host; the head reaches the guest's RPC port through a forwarded port), which then serves a
    chat request with every layer on the emulated machine."""
    rpc_fwd = free_port()
    # Behind qemu's NAT the head sees the VM at 127.0.0.1: its own configuration says where to dial
    # the VM's RPC server (a node cannot advertise that on its own).
    cluster = make_cluster(tiny_model, workers=0, heartbeat=0.5, head_args=["--node-rpc", f"qemu-worker=127.0.0.1:{rpc_fwd}"])
    cfg = tmp_path / "anyway.conf"
    cfg.write_text(
        "# test config\n"
        f"head = 10.0.2.2:{cluster.control.rsplit(':', 1)[1]}\n"
        "name = qemu-worker\n"
        # behind qemu's NAT the head sees the VM as 127.0.0.1: bind the RPC server on every address
        # (the firewall still lets only the head in) and tell the head the forwarded port
        "rpc_host = 0.0.0.0\n"
        f"rpc_advertise = 127.0.0.1:{rpc_fwd}\n"
        "ssh_key = ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl op@laptop\n"
    )
    bundle = cluster.node_keys("qemu-worker")
    files = {"anyway.conf": cfg, **{f"keys/{f}": bundle / f for f in ("node.key_secret", "server.key")}}
    vm = QemuBoot(tmp_path, files, hostfwd=f"tcp:127.0.0.1:{rpc_fwd}-:50052")
    try:
        vm.wait_text("first-boot check", "anyway-firstboot: /boot/anyway/anyway.conf is valid")
        vm.wait_text("worker start", "starting anyway-worker.service", 60)
        out = vm.text()
        assert "anyway-firstboot: reading /boot/anyway/anyway.conf" in out
        assert "head tcp://10.0.2.2:" in out and "keys keys/ on the boot partition" in out
        assert "anyway-firstboot: created this machine's SSH host keys" in out
        assert re.search(r"anyway-firstboot: grew the root file system on /dev/vda2 from \d+ MiB to \d+ MiB", out), out[-3000:]
        assert "anyway-firstboot: firewall: RPC port 50052 reachable only from 10.0.2.2/32" in out
        assert "INVALID" not in out and "ERROR" not in out

        def joined() -> Any:
            s = cluster.cluster_state()
            return s and next((n for n in s["nodes"] if n["name"] == "qemu-worker"), None)

        node = vm.wait_for("the worker in the head's node list", joined, QEMU_BOOT_TIMEOUT_S - (time.monotonic() - vm.t0))
        assert node["versions"]["package"] == "0.1.0"
        vm.wait_text("login prompt", "qemu-worker login:", 120)
        assert "Anyway worker: configured" in vm.text()  # /etc/issue.d: shown above the login prompt
        # the head puts the model's layers on the emulated machine and answers through them
        from openai import OpenAI

        def serving() -> Any:
            s = cluster.cluster_state()
            vm_node = s and next((n for n in s["nodes"] if n["name"] == "qemu-worker"), None)
            return s and s["health"]["status"] == "ok" and vm_node and vm_node.get("layers") == [0, 8] and vm_node

        vm.wait_for("all 8 layers on the VM", serving, 300)
        client = OpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0, timeout=300)
        answer = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Say hello"}], max_tokens=4, temperature=0
        )
        assert answer.choices[0].message.content and answer.usage.completion_tokens == 4
        vm.marks["chat answered"] = round(time.monotonic() - vm.t0)
    finally:
        vm.stop("qemu-console-bios.log")


@image_test(BUILD_TIMEOUT_S)
def test_disk_image_boots_with_uefi_and_refuses_a_bad_config(built: Path, tmp_path: Path, make_cluster: Any, tiny_model: Path) -> None:
    """UEFI boot (OVMF firmware, systemd-boot). anyway.conf names the head but the keys folder
    holds the head's secret instead of its public key: the console lists the problems and the
    worker is not started."""
    cluster = make_cluster(tiny_model, workers=0, heartbeat=0.5)
    bundle = cluster.node_keys("uefi-worker")
    cfg = tmp_path / "anyway.conf"
    cfg.write_text(f"head = 10.0.2.2:{cluster.control.rsplit(':', 1)[1]}\nname = Bad_Name\n")
    files = {"anyway.conf": cfg, "keys/node.key_secret": bundle / "node.key_secret",
             "keys/server.key": cluster.keys / "server.key_secret"}
    vm = QemuBoot(tmp_path, files, uefi=True)
    try:
        vm.wait_text("first-boot check", "anyway-firstboot: /boot/anyway/anyway.conf is INVALID (2 problems):")
        vm.wait_text("the verdict", "the worker was NOT started", 60)
        out = vm.text()
        assert "ERROR anyway.conf line 2: name 'Bad_Name'" in out
        assert "ERROR keys/server.key: contains the head's SECRET key" in out
        vm.wait_text("login prompt", "login:", 180)
        assert "Anyway worker: NOT STARTED, anyway.conf has problems" in vm.text()
        time.sleep(5)
        s = cluster.cluster_state()
        assert s is not None and not s["nodes"], s["nodes"]  # nothing joined
    finally:
        vm.stop("qemu-console-uefi.log")
