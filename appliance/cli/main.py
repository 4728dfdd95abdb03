"""`anyway`: the appliance's one command line.

    anyway up [--workers N] [--model PATH]     head + N local workers on loopback (the demo)
    anyway head --model PATH ...               the head (supervisor, engine, API)
    anyway worker --head tcp://HEAD:5555 ...   a worker agent (RPC server + heartbeats)
    anyway inspect MODEL.gguf                  model profile
    anyway plan MODEL --node NAME=MEM ...      placement plan (pure, no cluster needed)
    anyway status | drain NODE | uncordon NODE cluster state and operator actions (HTTP)
    anyway tui                                 the terminal dashboard
    anyway keys init|add|revoke|list DIR ...   the head's and each node's identity
    anyway model fetch demo                    download + verify the demo model

Bad input (a corrupt model, a plan that cannot fit, missing keys) is one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from appliance import __version__
from appliance.common.config import (
    DEFAULT_API_PORT,
    DEFAULT_CONTROL_PORT,
    DEFAULT_DRAFT_MAX_TOKENS,
    DEFAULT_MAX_BATCH,
    DEFAULT_N_CTX,
    DEFAULT_RPC_PORT,
    Timing,
)

if TYPE_CHECKING:
    from appliance.common.status import ClusterStatus

EXIT_BAD_INPUT = 2


class CliError(Exception):
    """One-line error for the user; exit code 2."""


def _die(msg: str) -> int:
    print(f"anyway: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _bytes_arg(text: str) -> int:
    from appliance.core.planner import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _load_config_defaults(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """`--config FILE`: a YAML mapping of option names (as on the command line) to values."""
    if "--config" not in argv:
        return
    i = list(argv).index("--config")
    if i + 1 >= len(argv):
        return
    path = Path(argv[i + 1])
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"{path}: cannot read config: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: config must be a mapping of option: value")
    known = {a.dest for a in parser._actions}
    defaults: dict[str, Any] = {}
    for k, v in data.items():
        dest = str(k).replace("-", "_")
        if dest not in known:
            raise CliError(f"{path}: unknown option {k!r}")
        if dest == "timing" and isinstance(v, dict):  # timing: {NAME: value}; --timing may add more
            v = [f"{n}={','.join(map(str, x)) if isinstance(x, list) else x}" for n, x in v.items()]
        defaults[dest] = v
    parser.set_defaults(**defaults)


def parse_timing(args: argparse.Namespace) -> Timing:
    """The timing constants from `--heartbeat-interval`, `--recovery-timeout` and `--timing NAME=VALUE`
    (or a YAML `timing:` mapping); a bad name or value is a `CliError`."""
    t = Timing()
    if getattr(args, "heartbeat_interval", None):
        t = t.with_interval(float(args.heartbeat_interval))
    over: list[tuple[str, Any]] = []
    if getattr(args, "recovery_timeout", None):
        over.append(("REQUEST_RECOVERY_TIMEOUT_S", float(args.recovery_timeout)))
    raw = getattr(args, "timing", None) or []
    over += list(raw.items()) if isinstance(raw, dict) else [tuple(str(x).partition("=")[::2]) for x in raw]
    try:
        return t.with_overrides(over)
    except ValueError as exc:
        raise CliError(f"--timing {exc}") from None


def _add_common_cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with default values for these options")
    p.add_argument("--keys", help="directory with the cluster keys (anyway keys init)")
    p.add_argument("--insecure", action="store_true", help="no CurveZMQ (development only)")
    p.add_argument("--heartbeat-interval", type=float, default=None, help="seconds (default 0.5)")
    p.add_argument(
        "--timing", action="append", default=None, metavar="NAME=VALUE",
        help="override one timing constant of appliance/common/config.py, e.g. DEAD_AFTER_MISSED=6 (repeatable)",
    )
    p.add_argument("--log-level", default=None, help="debug, info (default), warning")
    p.add_argument("--log-format", default=None, choices=["logfmt", "json"])


# ---------------------------------------------------------------- commands
def cmd_inspect(args: argparse.Namespace) -> int:
    from appliance.core.planner import fmt_bytes
    from appliance.common.modelfile import load_profile

    prof = load_profile(args.model)
    if args.json:
        print(json.dumps(prof.summary(), indent=2))
        return 0
    rows = [
        ("file", f"{prof.path} ({fmt_bytes(prof.file_bytes)})"),
        ("name", prof.name),
        ("architecture", prof.architecture),
        ("layers", str(prof.n_layers)),
        ("bytes per layer", f"{fmt_bytes(min(prof.layer_bytes))} - {fmt_bytes(prof.max_layer_bytes)}"),
        ("all layers", fmt_bytes(prof.layers_total_bytes)),
        ("input (embeddings)", fmt_bytes(prof.input_bytes)),
        ("output", fmt_bytes(prof.output_bytes)),
        ("KV cache / token / layer", f"{prof.kv_bytes_per_token_per_layer} B"),
        ("context length", str(prof.context_length)),
        ("vocabulary", str(prof.vocab_size)),
        ("chat template", "yes" if prof.has_chat_template else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _parse_node(spec: str) -> Any:
    from appliance.core.planner import NodeCapacity, parse_bytes

    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise CliError(f"--node {spec!r}: expected NAME=MEM[:SPEED], e.g. box1=8G or box2=16G:2")
    mem, _, speed = rest.partition(":")
    try:
        free = parse_bytes(mem)
        sp = float(speed) if speed else 1.0
    except ValueError as exc:
        raise CliError(f"--node {spec!r}: {exc}") from None
    if sp < 0:
        raise CliError(f"--node {spec!r}: speed must not be negative")
    return NodeCapacity(name=name, free_bytes=free, speed=sp, endpoint=f"{name}:{DEFAULT_RPC_PORT}")


def _lanes_arg(text: str) -> int:
    """--lanes: a positive number, or 'auto' (0: one per node holding layers)."""
    if text.strip().lower() == "auto":
        return 0
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("lanes must be at least 1 (or 'auto')")
    return n


def cmd_plan(args: argparse.Namespace) -> int:
    from appliance.common.modelfile import load_profile
    from appliance.core.planner import NodeCapacity, fmt_bytes, make_plan, moved_bytes, replan_without

    prof = load_profile(args.model)
    nodes = [_parse_node(s) for s in args.node]
    if args.head:
        nodes.insert(0, NodeCapacity(name="head", free_bytes=_bytes_arg(args.head), is_head=True))
    if not nodes:
        raise CliError("give at least one --node NAME=MEM (or --head MEM)")
    plan = make_plan(nodes=nodes, profile=prof, n_ctx=args.ctx, strategy=args.strategy, lanes=args.lanes)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    print(f"model {prof.name}: {prof.n_layers} layers, n_ctx={plan.n_ctx}, strategy={plan.strategy}")
    print(f"{'node':<12} {'layers':<10} {'weights':>10} {'kv':>10} {'reserve':>10} {'total':>10} {'free':>10}")
    for a in plan.assignments:
        rng = f"{a.start}-{a.end - 1}" if a.n_layers else "-"
        print(
            f"{a.node:<12} {rng:<10} {fmt_bytes(a.weight_bytes + a.extra_bytes):>10} {fmt_bytes(a.kv_bytes):>10} "
            f"{fmt_bytes(a.reserve_bytes):>10} {fmt_bytes(a.total_bytes):>10} {fmt_bytes(a.free_bytes):>10}"
        )
    for name, why in plan.excluded:
        print(f"{name:<12} (not used: {why})")
    print(f"tensor_split={plan.tensor_split} n_gpu_layers={plan.n_gpu_layers} output on {plan.output_node}")
    print("if a node is lost (its layers go to its neighbours; the workers pre-stage them):")
    for a in plan.rpc_assignments:
        after = replan_without(plan, nodes=[n for n in nodes if n.name != a.node], profile=prof, n_ctx=plan.n_ctx,
                               lanes=plan.lanes)
        moves = f"{fmt_bytes(moved_bytes(plan, after, prof))} of weights move" if after else "a fresh plan is needed"
        print(f"  {a.node:<12} {moves}")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from appliance.common.modelfile import fetch_demo

    if args.action != "fetch" or args.which != "demo":
        raise CliError("usage: anyway model fetch demo")
    print(fetch_demo())
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from appliance.common import keys as K

    d = Path(args.dir)
    if args.action == "init":
        K.init_keys(d, force=args.force)
        print(f"head identity written to {d} (server.key_secret stays on the head; server.key goes to every node)")
        print(f"next: 'anyway keys add {d} NAME' for each worker, then copy {d}/{K.ISSUED_DIR}/NAME/ to that box")
        return 0
    if args.action in ("add", "revoke") and not args.node:
        raise CliError(f"usage: anyway keys {args.action} DIR NODE")
    if args.action == "add":
        for node in args.node:
            bundle = K.add_node(d, node, force=args.force)
            print(f"{node}: its keys are in {bundle} (node.key_secret, server.key): copy them to the box's keys "
                  f"directory (anyway worker --keys DIR), then delete them here; the head accepts {node} now")
        return 0
    if args.action == "revoke":
        for node in args.node:
            K.revoke_node(d, node)
            print(f"{node}: revoked; a running head refuses its key within a second and takes it out of the plan")
        return 0
    allowed, revoked = K.list_nodes(d)
    print(f"{'NODE':<24} {'STATE':<8} {'CERTIFICATE':<18} CURVE KEY")
    for i in allowed:
        print(f"{i.name:<24} {'allowed':<8} {i.fingerprint:<18} {i.curve_public.decode()[:12]}…")
    for fname, i in revoked:
        print(f"{i.name:<24} {'revoked':<8} {i.fingerprint:<18} {i.curve_public.decode()[:12]}…  ({fname})")
    return 0


def _head_keys(args: argparse.Namespace) -> Any:
    from appliance.common.keys import load_head_keys

    if args.insecure:
        return None
    if not args.keys:
        raise CliError("give --keys DIR (make them with 'anyway keys init DIR'), or --insecure for development")
    return load_head_keys(args.keys)


def _worker_keys(args: argparse.Namespace) -> Any:
    from appliance.common.keys import load_worker_keys

    if args.insecure:
        return None
    if not args.keys:
        raise CliError("give --keys DIR (this node's keys: 'anyway keys add DIR NAME' on the head), or --insecure for development")
    return load_worker_keys(args.keys)


def _secret(*, file: str | None, env: str, what: str) -> str | None:
    """A key from a file (first line) or the environment; never from the command line."""
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read the {what} from {file}: {exc}") from None
        if not text or "\n" in text:
            raise CliError(f"{file}: the {what} file must hold one non-empty line")
        return text
    return os.environ.get(env) or None


def _no_key_on_command_line(args: argparse.Namespace) -> None:
    for opt in ("api_key", "admin_key"):
        if getattr(args, opt, None):
            flag = "--" + opt.replace("_", "-")
            env = "ANYWAY_API_KEY" if opt == "api_key" else "ANYWAY_ADMIN_KEY"
            raise CliError(
                f"{flag} no longer takes the key itself (a command line is visible to every user of the machine): "
                f"put it in a file and pass {flag}-file PATH, or set {env}"
            )


def _is_loopback_host(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _node_rpc(items: Any) -> dict[str, str]:
    """--node-rpc NAME=HOST:PORT (repeatable) or a YAML mapping node-rpc: {NAME: HOST:PORT}."""
    from appliance.common.netprobe import split_endpoint

    pairs = list(items.items()) if isinstance(items, dict) else [str(x).partition("=")[::2] for x in items or []]
    out = {}
    for name, ep in pairs:
        try:
            split_endpoint(str(ep))
        except ValueError:
            raise CliError(f"--node-rpc {name}={ep}: expected NAME=HOST:PORT") from None
        if not name:
            raise CliError(f"--node-rpc ={ep}: the node name is missing")
        out[str(name)] = str(ep)
    return out


def cmd_head(args: argparse.Namespace) -> int:
    import asyncio

    from appliance.common import logs
    from appliance.common.modelfile import load_profile, resolve_model
    from appliance.head.config import HeadConfig
    from appliance.head.supervisor import Head
    from appliance.head.tasks import TaskFailed

    logs.setup(proc="head", level=args.log_level, fmt=args.log_format)
    _no_key_on_command_line(args)
    api_key = _secret(file=args.api_key_file, env="ANYWAY_API_KEY", what="inference key")
    admin_key = _secret(file=args.admin_key_file, env="ANYWAY_ADMIN_KEY", what="admin key")
    if api_key and admin_key and api_key == admin_key:
        raise CliError("the admin key must differ from the inference key")
    if not _is_loopback_host(args.host) and not api_key and not args.open_api:
        raise CliError(
            f"the API would listen on {args.host} without an inference key: anyone who reaches it could use the model. "
            "Give a key (--api-key-file PATH or ANYWAY_API_KEY; and an admin key, --admin-key-file or "
            "ANYWAY_ADMIN_KEY, for drain/uncordon/reload), or pass --open-api if that is really what you want"
        )
    model = resolve_model(args.model)
    load_profile(model)  # fail fast, one line
    draft = _draft_model(args, model)
    keys = _head_keys(args)
    cfg = HeadConfig(
        model_path=str(model),
        control_bind=args.control,
        api_host=args.host,
        api_port=args.port,
        n_ctx=args.n_ctx,
        max_batch=args.max_batch,
        max_queued=args.max_queued,
        head_memory_bytes=_bytes_arg(str(args.head_memory)) if args.head_memory else 0,
        strategy=args.strategy,
        engine_threads=args.threads,
        engine_lanes=args.lanes,
        api_key=api_key,
        admin_key=admin_key,
        node_rpc_endpoints=_node_rpc(args.node_rpc),
        max_body_bytes=args.max_body,
        run_dir=args.run_dir or "",
        model_name=args.model_name or "",
        max_tokens=args.max_tokens,
        speculative=_on_off(args.speculative, "--speculative"),
        draft_model_path=draft,
        draft_max=args.draft_max,
        draft_min=args.draft_min,
        timing=parse_timing(args),
    )
    head = Head(cfg, keys=keys)
    try:
        import uvloop  # a faster event loop for the API's hot path
    except ImportError:  # pragma: no cover - a pinned dependency; plain asyncio otherwise
        uvloop = None
    try:
        (uvloop.run if uvloop is not None else asyncio.run)(head.run())
    except TaskFailed as exc:
        logs.get("head").error("head_exiting", reason=str(exc))
        return 1
    return 0


def _on_off(value: Any, option: str) -> bool:
    """`on`/`off` from the command line, or a YAML boolean (YAML reads a bare on/off as one)."""
    if value in (True, "on"):
        return True
    if value in (False, "off"):
        return False
    raise CliError(f"{option} {value!r}: expected on or off")


def _draft_model(args: argparse.Namespace, model: Any) -> str:
    """The --draft-model path, checked before anything starts: a GGUF model whose vocabulary
    is the model's (draft token ids are checked by the model, so they must mean the same)."""
    from appliance.common.modelfile import load_profile, vocab_difference

    if args.draft_max < 0:
        raise CliError(f"--draft-max {args.draft_max}: must be 0 (no speculative decoding) or more")
    if not 0 <= args.draft_min <= args.draft_max:
        raise CliError(f"--draft-min {args.draft_min}: must be between 0 and --draft-max ({args.draft_max})")
    if not args.draft_model:
        return ""
    load_profile(args.draft_model)
    why = vocab_difference(model, args.draft_model)
    if why:
        raise CliError(f"--draft-model {args.draft_model} cannot draft for {model}: {why} "
                       "(a draft model must use the same tokenizer as the model)")
    return str(Path(args.draft_model).resolve())


def cmd_worker(args: argparse.Namespace) -> int:
    from appliance.common import logs
    from appliance.common.config import cache_dir
    from appliance.worker.agent import run_worker
    from appliance.worker.config import WorkerConfig

    logs.setup(proc="worker", level=args.log_level, fmt=args.log_format)
    keys = _worker_keys(args)
    if keys is not None and args.name and args.name != keys.node.name:
        raise CliError(f"--name {args.name}: this node's key is {keys.node.name!r}'s (a node may only be who its key says)")
    name = args.name or (keys.node.name if keys is not None else socket.gethostname().split(".")[0])
    data_plane = "plain" if keys is None else args.data_plane
    cfg = WorkerConfig(
        head=args.head,
        name=name,
        rpc_port=args.rpc_port,
        rpc_host=args.rpc_host or "",
        cache_dir=args.cache_dir or str(cache_dir() / "rpc-cache" / name),
        threads=args.threads,
        max_memory_bytes=_bytes_arg(str(args.max_memory)) if args.max_memory else 0,
        cache_quota_bytes=_bytes_arg(str(args.cache_quota)) if args.cache_quota else 0,
        staging_rate_bytes_s=_bytes_arg(str(args.staging_rate)),
        speed=args.speed,
        rpc_advertise=args.rpc_advertise or "",
        device=args.device,
        keys_dir=args.keys or "",
        data_plane=data_plane,
        timing=parse_timing(args),
    )
    return run_worker(cfg, keys=keys)


def _url(args: argparse.Namespace) -> str:
    return (args.url or os.environ.get("ANYWAY_URL") or f"http://127.0.0.1:{DEFAULT_API_PORT}").rstrip("/")


def _http(method: str, url: str, *, api_key: str | None = None) -> tuple[int, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.request(method, url, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the head at {url}: {exc}") from None
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, {"error": {"message": r.text[:200]}}


def _error_message(data: Any) -> str:
    err = data.get("error") if isinstance(data, dict) else None
    return str(err.get("message")) if isinstance(err, dict) and err.get("message") else str(data)[:200]


def fetch_status(url: str, *, api_key: str | None) -> "ClusterStatus":
    """`GET /v1/cluster`, parsed once; a `CliError` if the head is unreachable or answers oddly."""
    from pydantic import ValidationError

    from appliance.common.status import ClusterStatus

    code, data = _http("GET", f"{url}/v1/cluster", api_key=api_key)
    if code != 200:
        raise CliError(f"head answered {code}: {_error_message(data)}")
    try:
        return ClusterStatus.model_validate(data)
    except ValidationError as exc:
        raise CliError(f"unexpected answer from the head at {url}: {str(exc).splitlines()[0]}") from None


def _speculation(spec: Any) -> str:
    if spec.mode == "off":
        return "off"
    source = f"draft model {spec.draft_model}" if spec.mode == "model" else "from the prompt"
    rate = "none yet" if spec.acceptance is None else f"{spec.acceptance:.0%} of {spec.drafted} accepted"
    return f"{source}, {rate}" + ("" if spec.default else " (only for requests that ask)")


def format_status(s: "ClusterStatus") -> str:
    """The human table of `anyway status`."""
    from appliance.core.planner import fmt_bytes

    eng = s.engine
    lines = [
        f"cluster: {s.health.status.value}" + (f" ({s.health.reason})" if s.health.reason else ""),
        f"model:   {s.model.id}  {s.model.n_layers} layers  "
        f"engine {eng.state.value} #{eng.generation}  restarts {eng.restarts}",
        f"load:    {s.throughput.tokens_per_s} tok/s, {s.throughput.requests_in_flight} request(s) in flight",
        f"drafts:  {_speculation(eng.speculation)}",
    ]
    if eng.state.value in ("starting", "loading"):
        for p in eng.load:
            lines.append(f"loading: {p.node:<14} {fmt_bytes(p.bytes):>10} of {fmt_bytes(p.total_bytes):>10} "
                         f"at {fmt_bytes(p.bytes_per_s)}/s")
    lines += [
        "",
        f"{'NODE':<14} {'STATE':<10} {'ADDRESS':<22} {'HB AGE':>7} {'LAYERS':<9} {'FREE':>10} {'PLANNED':>10}"
        f" {'BUSY':>5} {'IF LOST':>16}  VERSION",
    ]
    for n in s.nodes:
        layers = f"{n.layers[0]}-{n.layers[1] - 1}" if n.layers else "-"
        f = n.failover
        lost = "-" if f is None else (fmt_bytes(f.bytes) + (" staged" if f.staged else "") if f.possible else "re-plan")
        busy = "-" if n.load.rpc_busy is None else f"{n.load.rpc_busy:.0%}"
        lines.append(
            f"{n.name:<14} {n.state.value:<10} {str(n.rpc_endpoint or n.address):<22} "
            f"{n.heartbeat_age_s:>6.1f}s {layers:<9} {fmt_bytes(n.memory.free_bytes):>10} "
            f"{fmt_bytes(n.memory.planned_bytes):>10} {busy:>5} {lost:>16}  {n.versions.package or '?'}"
            + (f"  ({n.reason})" if n.reason else "")
        )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from appliance.common.kinds import HealthState

    status = fetch_status(_url(args), api_key=_client_key(args, admin=False))
    if args.json:
        print(status.model_dump_json(indent=2))
    else:
        print(format_status(status))
    return 0 if status.health.status == HealthState.OK else 1


def cmd_node_action(args: argparse.Namespace) -> int:
    action = args.command
    url = f"{_url(args)}/v1/nodes/{args.node}/{action}"
    if action == "drain" and args.force:
        url += "?force=true"
    code, data = _http("POST", url, api_key=_client_key(args, admin=True))
    if code >= 400:
        raise CliError(_error_message(data))
    print(f"{args.node}: {data.get('state') if isinstance(data, dict) else data}")
    return 0


def cmd_tui(args: argparse.Namespace) -> int:
    try:
        from tui.app import run_dashboard
    except ImportError as exc:
        raise CliError(f"the dashboard is not installed: {exc}") from None
    return run_dashboard(url=_url(args), api_key=_client_key(args, admin=False), admin_key=_client_key(args, admin=True))


def _client_key(args: argparse.Namespace, *, admin: bool) -> str | None:
    """The key a client command sends: the admin key for actions that change state, else the
    inference key (the admin key also reads). From files or the environment only."""
    _no_key_on_command_line(args)
    admin_key = _secret(file=getattr(args, "admin_key_file", None), env="ANYWAY_ADMIN_KEY", what="admin key")
    if admin:
        return admin_key
    return _secret(file=getattr(args, "api_key_file", None), env="ANYWAY_API_KEY", what="inference key") or admin_key


def cmd_up(args: argparse.Namespace) -> int:
    from appliance.cli.up import run_up

    return run_up(args)


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anyway", description="Run one LLM across the spare machines you own.")
    p.add_argument("--version", action="version", version=f"anyway {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("inspect", help="show a GGUF model's profile")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("plan", help="plan which layers go to which node")
    s.add_argument("model")
    s.add_argument("--node", action="append", default=[], metavar="NAME=MEM[:SPEED]")
    s.add_argument("--head", metavar="MEM", help="memory the head's own CPU lends to layers")
    s.add_argument("--ctx", type=int, default=DEFAULT_N_CTX, help="context size in tokens")
    s.add_argument("--strategy", choices=["memory", "proportional", "speed"], default="proportional")
    s.add_argument("--lanes", type=int, default=1, help="engine lanes (each has its compute buffers on every node)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("model", help="model files")
    s.add_argument("action", choices=["fetch"])
    s.add_argument("which", choices=["demo"])
    s.set_defaults(func=cmd_model)

    s = sub.add_parser(
        "keys", help="the cluster's identities: init (the head's), add/revoke a node, list",
        description="init DIR: the head's identity. add DIR NODE...: issue nodes their own keys (DIR/issued/NODE/ "
        "goes to the box). revoke DIR NODE...: a running head refuses them at once. list DIR.",
    )
    s.add_argument("action", choices=["init", "add", "revoke", "list"])
    s.add_argument("dir")
    s.add_argument("node", nargs="*", help="node name(s), for add and revoke")
    s.add_argument("--force", action="store_true", help="init: replace the head's identity; add: re-issue a node's key")
    s.set_defaults(func=cmd_keys)

    s = sub.add_parser("head", help="run the head (supervisor, engine, API)")
    s.add_argument("--model", default="demo", help="GGUF path, or 'demo'")
    s.add_argument("--model-name", help="model id served on the API (default: file name)")
    s.add_argument("--control", default=f"tcp://0.0.0.0:{DEFAULT_CONTROL_PORT}", help="control-plane bind address")
    s.add_argument("--host", default="127.0.0.1", help="API bind address")
    s.add_argument("--port", type=int, default=DEFAULT_API_PORT, help="API port")
    s.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX, help="context per request, tokens")
    s.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="requests decoded together")
    s.add_argument("--lanes", type=_lanes_arg, default=1,
                   help="engine contexts decoding at once over the same weights, so concurrent requests keep "
                        "every worker busy: a number, or 'auto' (one per node holding layers)")
    s.add_argument("--max-queued", type=int, default=32,
                   help="requests waiting for a place in the batch; more get 429 with Retry-After")
    s.add_argument("--head-memory", default="", help="memory the head's CPU lends to layers (0: none)")
    s.add_argument(
        "--strategy",
        choices=["memory", "proportional", "speed"],
        default="speed",
        help="speed: minimise time per token with the workers' measured speeds (default); "
        "memory: split by free memory like llama.cpp; proportional: memory x speed weight",
    )
    s.add_argument("--max-tokens", type=int, default=0, help="per-request completion limit (0: the context)")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--api-key-file", help="file holding the inference key required on /v1 (or ANYWAY_API_KEY)")
    s.add_argument("--admin-key-file", help="file holding the admin key for drain/uncordon/reload (or ANYWAY_ADMIN_KEY)")
    s.add_argument("--api-key", "--admin-key", dest="api_key", default=None, help=argparse.SUPPRESS)
    s.add_argument("--open-api", action="store_true",
                   help="serve the API on a network address without an inference key (anyone who reaches it may use it)")
    s.add_argument("--node-rpc", action="append", default=None, metavar="NAME=HOST:PORT",
                   help="dial NAME's RPC server here instead of where its control connection comes from (NAT, port "
                        "forward); no node may advertise an endpoint the head's configuration does not give it")
    s.add_argument("--max-body", type=int, default=1 << 20, help="largest request body, bytes")
    s.add_argument("--run-dir", default=None)
    s.add_argument("--recovery-timeout", type=float, default=None, help="seconds a request waits for a healed engine")
    s.add_argument("--speculative", choices=["on", "off"], default="on",
                   help="requests check drafted tokens (speculative decoding) unless they say otherwise (default on)")
    s.add_argument("--draft-model", default=None,
                   help="small GGUF model with the same vocabulary that drafts tokens on the head "
                        "(default: drafts from the prompt)")
    s.add_argument("--draft-max", type=int, default=DEFAULT_DRAFT_MAX_TOKENS,
                   help=f"most drafted tokens per request and decode step (default {DEFAULT_DRAFT_MAX_TOKENS}; "
                        "0: no speculative decoding)")
    s.add_argument("--draft-min", type=int, default=0,
                   help="check at least this many drafted tokens whenever there are drafts, overriding the "
                        "adaptive length (default 0; for tests and measurements)")
    _add_common_cluster(s)
    s.set_defaults(func=cmd_head)

    s = sub.add_parser("worker", help="run a worker agent")
    s.add_argument("--head", required=False, default=f"tcp://127.0.0.1:{DEFAULT_CONTROL_PORT}", help="tcp://HEAD:PORT")
    s.add_argument("--name", help="node name (default: hostname)")
    s.add_argument("--rpc-port", type=int, default=DEFAULT_RPC_PORT)
    s.add_argument("--rpc-host", help="address to bind the RPC server (default: the one the head sees)")
    s.add_argument("--cache-dir", help="tensor cache directory")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--max-memory", default="", help="cap the memory offered to the cluster")
    s.add_argument("--cache-quota", default="", help="disk the tensor cache may use, e.g. 20G (default: 9/10 of free)")
    s.add_argument("--staging-rate", default="40M",
                   help="bytes/s at most for pre-staging failover tensors from the head (0: off)")
    s.add_argument("--speed", type=float, default=0.0, help="speed to report (default: measured at start-up)")
    s.add_argument("--rpc-advertise", help="HOST:PORT the head should use to reach the RPC server (NAT, proxy)")
    s.add_argument("--device", default="auto", help="device to serve: auto (first GPU, else CPU), cpu, gpu, or a ggml index/name")
    s.add_argument("--data-plane", choices=["tls", "plain"], default="tls",
                   help="tls (default): the RPC server on loopback behind TLS with the cluster's keys; plain: the RPC "
                        "server itself on --rpc-host, which must then be a loopback address (anyway up)")
    _add_common_cluster(s)
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("up", help="head + local workers on this machine (the demo)")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--model", default="demo")
    s.add_argument("--port", type=int, default=DEFAULT_API_PORT)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX)
    s.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    s.add_argument("--worker-memory", default="", help="memory each local worker offers, e.g. 200M")
    s.add_argument("--worker-threads", type=int, default=1)
    s.add_argument("--heartbeat-interval", type=float, default=None)
    s.add_argument(
        "--strategy",
        choices=["memory", "proportional", "speed"],
        default="memory",
        help="local workers share one CPU, so the demo splits by memory",
    )
    s.add_argument("--state-dir", default=None, help="where logs, keys and caches go")
    s.add_argument("--no-tui", action="store_true", help="run headless (no dashboard)")
    s.set_defaults(func=cmd_up)

    for name, helptext in (("status", "show the cluster"),):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--url", help=f"head API (default http://127.0.0.1:{DEFAULT_API_PORT}, or ANYWAY_URL)")
        s.add_argument("--api-key-file", help="file holding the inference key (or ANYWAY_API_KEY)")
        s.add_argument("--api-key", dest="api_key", default=None, help=argparse.SUPPRESS)
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=cmd_status)
    for name, helptext in (("drain", "move a node's layers to the others"), ("uncordon", "let a drained node hold layers again")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("node")
        s.add_argument("--url")
        s.add_argument("--admin-key-file", help="file holding the admin key (or ANYWAY_ADMIN_KEY)")
        s.add_argument("--api-key", "--admin-key", dest="api_key", default=None, help=argparse.SUPPRESS)
        if name == "drain":
            s.add_argument("--force", action="store_true", help="drain even if the model no longer fits")
        s.set_defaults(func=cmd_node_action)

    s = sub.add_parser("tui", help="the terminal dashboard")
    s.add_argument("--url")
    s.add_argument("--api-key-file", help="file holding the inference key (or ANYWAY_API_KEY)")
    s.add_argument("--admin-key-file", help="file holding the admin key, for drain/uncordon/reload (or ANYWAY_ADMIN_KEY)")
    s.add_argument("--api-key", "--admin-key", dest="api_key", default=None, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_tui)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from appliance.common.ggml import LlamaLibError
    from appliance.common.keys import KeyError_
    from appliance.common.modelfile import FetchError
    from appliance.core.planner import PlanError
    from appliance.core.profile import ProfileError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] in ("head", "worker"):
            sub = parser._subparsers._group_actions[0].choices[argv[0]]  # type: ignore[union-attr]
            _load_config_defaults(sub, argv)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_BAD_INPUT
        return int(args.func(args) or 0)
    except (CliError, ProfileError, PlanError, KeyError_, FetchError, LlamaLibError) as exc:
        return _die(str(exc))
    except KeyboardInterrupt:
        return 130
