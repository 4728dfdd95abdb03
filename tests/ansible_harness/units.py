"""Stand-in for systemd on test hosts, where systemd is not PID 1.

The playbook renders real unit files (with anyway_common_manage_services: false it never
calls systemctl). `FakeSystemd` reads each unit the way systemd would for what matters to
start it - ExecStart=, User=, Group=, Environment=, EnvironmentFile=, WorkingDirectory=,
Type= - and runs that exact command line inside the host's network namespace as the unit's
user, with only the unit's environment. What it does not emulate (the sandboxing options)
is checked statically with `systemd-analyze verify` and `systemd-analyze security --offline`.
"""

from __future__ import annotations

import os
import pwd
import shlex
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .netns import Host

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Unit:
    path: Path
    sections: dict[str, list[tuple[str, str]]]

    @classmethod
    def load(cls, path: Path) -> "Unit":
        sections: dict[str, list[tuple[str, str]]] = {}
        current = None
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], [])
                continue
            key, _, value = line.partition("=")
            assert current is not None, f"{path}: {raw!r} outside a section"
            current.append((key.strip(), value.strip()))
        return cls(path, sections)

    def get(self, section: str, key: str, default: str = "") -> str:
        values = self.all(section, key)
        return values[-1] if values else default

    def all(self, section: str, key: str) -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    @property
    def exec_start(self) -> list[str]:
        argv = shlex.split(self.get("Service", "ExecStart"))
        assert argv and argv[0].startswith("/"), f"{self.path}: ExecStart must be an absolute path"
        return argv

    def environment(self) -> dict[str, str]:
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8"}
        # systemd applies EnvironmentFile= after Environment=; a leading '-' means optional.
        for spec in self.all("Service", "Environment"):
            for item in shlex.split(spec):
                k, _, v = item.partition("=")
                env[k] = v
        for spec in self.all("Service", "EnvironmentFile"):
            optional = spec.startswith("-")
            p = Path(spec.lstrip("-"))
            if not p.exists() and optional:
                continue
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith(("#", ";")):
                    k, _, v = line.partition("=")
                    env[k.strip()] = v.strip().strip('"')
        return env


@dataclass
class Started:
    unit: Unit
    host: Host
    proc: subprocess.Popen
    log: Path


@dataclass
class FakeSystemd:
    log_dir: Path
    started: dict[tuple[str, str], Started] = field(default_factory=dict)

    def units(self, host: Host, unit_dir: Path) -> list[Unit]:
        return [Unit.load(p) for p in sorted(unit_dir.glob("*.service"))]

    def start(self, host: Host, unit: Unit) -> None:
        key = (host.name, unit.path.name)
        running = self.started.get(key)
        if running and running.proc.poll() is None:
            return
        user = unit.get("Service", "User", "root")
        pw = pwd.getpwnam(user)
        # What systemd sets for a User= service, then the unit's own environment.
        env = {"HOME": pw.pw_dir, "USER": user, "LOGNAME": user, "SHELL": pw.pw_shell, **unit.environment()}
        argv = host.ns("runuser", "-u", user, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()], *unit.exec_start)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{host.name}-{unit.path.stem}.log"
        cwd = unit.get("Service", "WorkingDirectory") or "/"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        if unit.get("Service", "Type") == "oneshot":
            proc.wait(30)
            assert proc.returncode == 0, f"{unit.path} failed: {log.read_text()[-2000:]}"
        self.started[key] = Started(unit, host, proc, log)

    def stop_host(self, name: str) -> None:
        """`systemctl stop` of every unit started on one host."""
        self._stop([k for k in self.started if k[0] == name])

    def stop_all(self) -> None:
        self._stop(list(self.started))

    def _stop(self, keys: list[tuple[str, str]]) -> None:
        chosen = [self.started[k] for k in keys]
        for s in chosen:
            if s.proc.poll() is None:
                try:
                    os.killpg(s.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for s in chosen:
            try:
                s.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(s.proc.pid, signal.SIGKILL)
                s.proc.wait(5)
        for k in keys:
            self.started.pop(k, None)

    def tails(self, n: int = 30) -> str:
        out = []
        for s in self.started.values():
            lines = s.log.read_text(errors="replace").splitlines()[-n:] if s.log.exists() else []
            out.append(f"----- {s.host.name} {s.unit.path.name} (exit {s.proc.poll()}) -----\n" + "\n".join(lines))
        return "\n".join(out)
