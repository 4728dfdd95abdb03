"""Supply chain: what goes onto the boxes is pinned by hash, and checked on the box.

- The lock (ansible/roles/anyway_common/files/requirements.lock, made by pip-compile from
  pyproject.toml: `make lock`) pins every dependency, transitively, with hashes, at the
  versions pyproject.toml names.
- The lock splitter hands the controller's fill the dependencies and llama-cpp-python's
  source archive separately, each with its hashes.
- The box-side wheelhouse check refuses a changed, missing, extra wheel, or a changed
  manifest, before pip reads anything (the real play runs it: tests/test_ansible.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "ansible" / "roles" / "anyway_common" / "files"
LOCK = FILES / "requirements.lock"


def lock_pins() -> dict[str, str]:
    text = LOCK.read_text()
    pins = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+) ", block)
        if m:
            assert "--hash=sha256:" in block, f"{m.group(1)} has no hash in the lock"
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_the_lock_pins_every_dependency_at_pyprojects_versions() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = lock_pins()
    for req in [*project["dependencies"], *project["optional-dependencies"]["llama"]]:
        name, _, version = req.partition("==")
        assert pins.get(name.lower().replace("_", "-")) == version, f"{req}: the lock says {pins.get(name)} (run make lock)"
    assert "pip-compile" in LOCK.read_text().splitlines()[1] + LOCK.read_text().splitlines()[2]


def test_the_lock_is_complete_for_what_pip_installs() -> None:
    """Every package installed in this machine's .venv for the product is in the lock (the lock
    and the environment the tests run in agree), at the same version."""
    pins = lock_pins()
    from importlib.metadata import distribution

    seen, todo = set(), ["anyway", "llama-cpp-python"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = distribution(name)
        except Exception:  # noqa: BLE001 - llama-cpp-python's extras etc.
            continue
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            dep = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
            todo.append(dep)
        key = name.lower().replace("_", "-")
        if key != "anyway":
            assert pins.get(key) == dist.version, f"{key} {dist.version} installed, lock pins {pins.get(key)}"


def test_the_lock_splits_into_dependencies_and_llamas_source(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(FILES / "anyway_lock.py"), str(LOCK), str(tmp_path), "0.3.36"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    deps, llama = Path(info["deps"]).read_text(), Path(info["llama"]).read_text()
    assert "llama-cpp-python" not in deps and "numpy==" in deps and deps.count("--hash=sha256:") > 40
    assert llama.count("llama-cpp-python==0.3.36") == 1 and info["llama_sdist_hashes"]
    wrong = subprocess.run([sys.executable, str(FILES / "anyway_lock.py"), str(LOCK), str(tmp_path), "9.9.9"],
                           capture_output=True, text=True)
    assert wrong.returncode == 1 and "make lock" in wrong.stderr


def _house(tmp_path: Path) -> tuple[Path, str]:
    """A wheelhouse packed by anyway_bundle.py and unpacked as on a box; the manifest's sha256."""
    import tarfile

    src = tmp_path / "src"
    src.mkdir()
    (src / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl").write_bytes(b"llama" * 100)
    (src / "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"numpy" * 100)
    out = subprocess.run([sys.executable, str(FILES / "anyway_bundle.py"), str(src), str(tmp_path / "b.tar"), "0.3.36"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    house = tmp_path / "house"
    with tarfile.open(info["bundle"]) as tar:
        tar.extractall(house)
    assert hashlib.sha256((house / "MANIFEST.sha256").read_bytes()).hexdigest() == info["manifest_sha256"]
    return house, info["manifest_sha256"]


def verify(house: Path, digest: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(FILES / "anyway_verify_wheelhouse.py"), str(house), digest],
                          capture_output=True, text=True)


@pytest.mark.parametrize("tamper, expect", [
    ("none", ""),
    ("changed-wheel", "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl does not match"),
    ("extra-wheel", "evil-1.0-py3-none-any.whl is not in the manifest"),
    ("missing-wheel", "is missing"),
    ("changed-manifest", "not the manifest the controller packed"),
])
def test_the_box_checks_the_wheelhouse_against_its_manifest(tmp_path: Path, tamper: str, expect: str) -> None:
    house, digest = _house(tmp_path)
    numpy = house / "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl"
    if tamper == "changed-wheel":
        numpy.write_bytes(b"evil" * 100)
    elif tamper == "extra-wheel":
        (house / "evil-1.0-py3-none-any.whl").write_bytes(b"evil")
    elif tamper == "missing-wheel":
        numpy.unlink()
    elif tamper == "changed-manifest":
        manifest = house / "MANIFEST.sha256"
        manifest.write_text(manifest.read_text().replace(hashlib.sha256(b"numpy" * 100).hexdigest(),
                                                         hashlib.sha256(b"evil" * 100).hexdigest()))
        numpy.write_bytes(b"evil" * 100)
    out = verify(house, digest)
    if not expect:
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode == 1 and expect in out.stderr, out.stderr
