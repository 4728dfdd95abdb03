"""`anyway up`: the whole appliance on one machine, for a first look and for tests.

Starts a head and N workers on loopback, each its own `anyway` process exactly as on
real boxes (killing a worker is like unplugging a box), with fresh cluster keys in the
state directory: the head's identity and one per worker (`anyway keys add`). On loopback
the data plane may stay plain TCP (`data_plane="plain"`, the default here); tests pass
"tls" to run the same authenticated, encrypted channel as real boxes. Shows load progress, prints the endpoint, then either opens the
dashboard (in a terminal) or waits. Ctrl-C / SIGTERM stops every process it started.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from appliance.common.keys import ISSUED_DIR, NODES_DIR, add_node, init_keys
from appliance.common.kinds import HealthState, NodeState
from appliance.common.modelfile import load_profile, resolve_model
from appliance.common.process import die_with_parent, terminate
from appliance.common.status import ClusterStatus


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now and not handed out before by this process: the ports of one cluster
    are chosen before its processes bind them, and the kernel may offer the same one twice."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OSError("no free port found that was not handed out already")


def _preexec() -> None:
    die_with_parent(signal.SIGTERM)


class LocalCluster:
    """A head and workers as separate `anyway` processes on loopback; `stop()` ends them all.

    Used by `anyway up` and by the tests (which kill, hang and restart its workers).
    """

    def __init__(
        self,
        *,
        model: Path,
        state_dir: Path,
        api_host: str = "127.0.0.1",
        api_port: int = 0,
        n_ctx: int = 2048,
        max_batch: int = 4,
        strategy: str = "memory",
        heartbeat_interval: float | None = None,
        control_bind_host: str = "127.0.0.1",
        data_plane: str = "plain",
        api_keys: bool = False,
    ) -> None:
        self.model = Path(model)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.keys = self.state_dir / "keys"
        if not (self.keys / "server.key_secret").exists():
            init_keys(self.keys)
        self.api_host = api_host
        self.api_port = api_port or free_port(api_host)
        self.control_port = free_port()
        self.control_bind = f"tcp://{control_bind_host}:{self.control_port}"
        self.control = f"tcp://127.0.0.1:{self.control_port}"  # where local workers connect
        self.n_ctx, self.max_batch, self.strategy = n_ctx, max_batch, strategy
        self.data_plane = data_plane
        # An API on an address other than loopback needs keys (the head refuses to start
        # without): generate an inference and an admin key, and use the admin one ourselves.
        self.admin_key: str | None = None
        self.key_args: list[str] = []
        if api_keys:
            import secrets

            files = {}
            for kind in ("inference", "admin"):
                f = self.state_dir / f"{kind}.key"
                if not f.exists():
                    f.touch(mode=0o600)
                    f.write_text(secrets.token_urlsafe(32) + "\n")
                files[kind] = f
            self.admin_key = files["admin"].read_text().strip()
            self.key_args = ["--api-key-file", str(files["inference"]), "--admin-key-file", str(files["admin"])]
        self.hb = ["--heartbeat-interval", str(heartbeat_interval)] if heartbeat_interval else []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.args: dict[str, list[str]] = {}
        self.wrappers: dict[str, list[str]] = {}
        self.logs: dict[str, Path] = {}

    @property
    def headers(self) -> dict[str, str]:
        """What a request to this head's API carries (the admin key, which also serves inference)."""
        return {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}

    @property
    def url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    def spawn(self, name: str, args: list[str], *, wrapper: list[str] | None = None) -> subprocess.Popen[bytes]:
        """Start `anyway ARGS` as `name`; `wrapper` prefixes the command (e.g. to enter a cgroup or netns)."""
        log_path = self.state_dir / f"{name}.log"
        fh = open(log_path, "ab")
        proc = subprocess.Popen(
            [*(wrapper or []), sys.executable, "-m", "appliance", *args],
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            preexec_fn=_preexec,
        )
        fh.close()
        self.procs[name], self.args[name], self.logs[name] = proc, args, log_path
        self.wrappers[name] = wrapper or []
        return proc

    def start_head(self, extra: list[str] | None = None, *, wrapper: list[str] | None = None) -> subprocess.Popen[bytes]:
        return self.spawn(
            "head",
            [
                "head",
                "--model",
                str(self.model),
                "--control",
                self.control_bind,
                "--host",
                self.api_host,
                "--port",
                str(self.api_port),
                "--n-ctx",
                str(self.n_ctx),
                "--max-batch",
                str(self.max_batch),
                "--strategy",
                self.strategy,
                "--keys",
                str(self.keys),
                "--run-dir",
                str(self.state_dir / "head-run"),
                *self.hb,
                *self.key_args,
                *(extra or []),
            ],
            wrapper=wrapper,
        )

    def node_keys(self, name: str) -> Path:
        """`name`'s own keys directory (issued once, like `anyway keys add`)."""
        if not (self.keys / NODES_DIR / f"{name}.key").exists():
            add_node(self.keys, name)
        return self.keys / ISSUED_DIR / name

    def start_worker(
        self,
        name: str,
        *,
        memory: str = "",
        threads: int = 1,
        extra: list[str] | None = None,
        wrapper: list[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        args = [
            "worker",
            "--head",
            self.control,
            "--name",
            name,
            "--rpc-host",
            "127.0.0.1",
            "--rpc-port",
            str(free_port()),
            "--cache-dir",
            str(self.state_dir / f"cache-{name}"),
            "--threads",
            str(threads),
            *([] if "--keys" in (extra or []) else ["--keys", str(self.node_keys(name))]),
            "--data-plane",
            self.data_plane,
            *self.hb,
            *(["--max-memory", memory] if memory else []),
            *(extra or []),
        ]
        return self.spawn(name, args, wrapper=wrapper)

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start `name` again with the same arguments (a rebooted box)."""
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            terminate(old, grace_s=3)
        return self.spawn(name, self.args[name], wrapper=self.wrappers.get(name))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 8
        for proc in self.procs.values():
            terminate(proc, grace_s=max(deadline - time.monotonic(), 0.1))

    def cluster_state(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(f"{self.url}/v1/cluster", headers=self.headers, timeout=2)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def wait(self, predicate: Any, *, timeout_s: float, what: str = "condition") -> dict[str, Any]:
        """Poll /v1/cluster until `predicate(state)` holds; TimeoutError names `what`."""
        deadline = time.monotonic() + timeout_s
        state: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            head = self.procs.get("head")
            if head is not None and head.poll() is not None:
                raise RuntimeError(f"head exited ({head.returncode}); log: {self.logs['head']}")
            state = self.cluster_state()
            if state is not None and predicate(state):
                return state
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}; last health: {state and state.get('health')}")

    def wait_serving(self, *, timeout_s: float = 120, nodes: int | None = None) -> dict[str, Any]:
        def ok(s: dict[str, Any]) -> bool:
            if s["health"]["status"] != "ok":
                return False
            return nodes is None or len([n for n in s["nodes"] if n.get("layers")]) == nodes

        return self.wait(ok, timeout_s=timeout_s, what=f"serving on {nodes or 'any'} node(s)")


ALL_WORKERS_WAIT_S = 60.0  # after serving, how long `anyway up` waits for the rest of its workers


def _progress(url: str, cluster: "LocalCluster", *, quiet: bool, workers: int = 0) -> bool:
    """Wait until the API serves with all `workers` local workers alive and in the plan it
    wants (or, after ALL_WORKERS_WAIT_S of serving without some, with what there is); print a
    progress line. False if the head died."""
    last = ""
    serving_since: float | None = None
    while True:
        head = cluster.procs["head"]
        if head.poll() is not None:
            return False
        try:
            s = ClusterStatus.model_validate(httpx.get(f"{url}/v1/cluster", timeout=2).json())
        except (httpx.HTTPError, ValueError):
            time.sleep(0.3)
            continue
        eng = s.engine
        ready = sum(1 for n in s.nodes if n.state == NodeState.ALIVE)
        bar_n = int(eng.progress * 20)
        line = (
            f"\r[{'#' * bar_n}{'.' * (20 - bar_n)}] {eng.progress:>4.0%}  engine {eng.state.value:<8} "
            f"workers ready {ready}/{len(s.nodes)}  {s.health.reason[:60]:<60}"
        )
        if not quiet and line != last:
            print(line, end="", file=sys.stderr, flush=True)
            last = line
        if s.health.status == HealthState.OK:
            serving_since = serving_since or time.monotonic()
            settled = ready >= workers and s.plan == s.desired_plan
            if settled or time.monotonic() - serving_since > ALL_WORKERS_WAIT_S:
                if not quiet:
                    print(file=sys.stderr)
                    if not settled:
                        print(f"serving with {ready} of {workers} workers ready; the others join when they are",
                              file=sys.stderr, flush=True)
                return True
        else:
            serving_since = None
        time.sleep(0.3)


def run_up(args: argparse.Namespace) -> int:
    model = resolve_model(args.model)
    profile = load_profile(model)
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="anyway-up-"))
    cluster = LocalCluster(
        model=model,
        state_dir=state,
        api_host=args.host,
        api_port=args.port,
        n_ctx=args.n_ctx,
        max_batch=args.max_batch,
        strategy=args.strategy,
        heartbeat_interval=args.heartbeat_interval,
    )
    url = cluster.url

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    interactive = sys.stdout.isatty() and sys.stdin.isatty() and not args.no_tui
    try:
        cluster.start_head()
        for i in range(1, args.workers + 1):
            cluster.start_worker(f"worker-{i}", memory=args.worker_memory, threads=args.worker_threads)
        print(
            f"anyway up: {profile.name} ({profile.n_layers} layers) on a head + {args.workers} local worker(s); "
            f"logs in {state}",
            file=sys.stderr,
        )
        if not _progress(url, cluster, quiet=False, workers=args.workers):
            print(f"anyway up: the head exited; see {cluster.logs['head']}", file=sys.stderr)
            for line in cluster.logs["head"].read_text(errors="replace").strip().splitlines()[-5:]:
                print(f"  {line}", file=sys.stderr)
            return 1
        model_id = Path(model).stem
        print(f"serving {model_id} at {url}/v1  (status: anyway status --url {url})", flush=True)
        body = '{"model": "%s", "messages": [{"role": "user", "content": "Hello!"}]}' % model_id
        print(f"try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'", flush=True)
        if interactive:
            try:
                from tui.app import run_dashboard
            except ImportError:
                run_dashboard = None  # type: ignore[assignment]
            if run_dashboard is not None:
                run_dashboard(url=url, api_key=None)
                return 0
        print("press Ctrl-C to stop", file=sys.stderr, flush=True)
        while True:
            head = cluster.procs["head"]
            if head.poll() is not None:
                print(f"anyway up: the head exited ({head.returncode}); see {cluster.logs['head']}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nanyway up: stopping", file=sys.stderr)
        return 0
    finally:
        cluster.stop()
