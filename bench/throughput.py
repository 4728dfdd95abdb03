"""Throughput: aggregate tokens/s for concurrent clients, lanes off and on, bare llama.cpp beside.

    .venv/bin/python -m bench.throughput [--models demo,1G] [--workers 1,2,3] [--clients 1,2,4,8]
                                         [--lanes auto] [--tokens 64] [--reps 3] [--lan]

For each model and worker count the same worker processes serve every configuration
(their RPC servers and tensor caches stay; only the head restarts), and the
configurations alternate rep by rep so they see the same machine load:

  * the appliance with one lane (`--lanes 1`: one llama.cpp context; concurrent requests
    are batched into its steps, one worker computes at a time),
  * the appliance with lanes (`--lanes K`, default the worker count plus one: K contexts
    over the same weights, so while one request is on worker 2 another is on worker 1),
  * bare llama.cpp over the same RPC servers and layout (llama-cpp-python in a fresh
    process, what `llama-server --rpc` runs), one stream.

Each configuration runs 1, 2, 4, 8 concurrent streaming clients (greedy, --tokens each,
different prompts), and measures every worker's busy fraction over the same window from
its RPC server's CPU time (what the workers report in /v1/cluster and /metrics). The
GB-class model is the scale lab's identity stack (bench.scale: the demo model with extra
neutral blocks, so the text is the demo's and the compute is real).

`--lan` runs the cluster in the LAN lab (bench.lab: head and workers in their own network
namespaces on a bridge, every link capped with tc tbf). Writes docs/throughput*.json, a plot,
and the "Throughput" section of docs/BENCHMARKS.md (docs/BENCHMARKS-lan.md with --lan).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

from appliance.cli.up import LocalCluster
from appliance.common.modelfile import resolve_model
from appliance.common.process import terminate
from bench.common import median
from bench.lab import tunnels_for

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Throughput: concurrent clients, lanes on and off"
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The old lighthouse keeper climbed the stairs and saw",
    "In the year 2150, the first city on Mars",
    "My grandmother's recipe for apple pie begins with",
    "The detective opened the door and found",
    "Deep in the forest, a young fox discovered",
    "The engineers looked at the bridge and decided",
    "On the first day of school, the new teacher",
]


def log(msg: str) -> None:
    print(f"[throughput {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------ measuring
def stream(url: str, model_id: str, prompt: str, tokens: int, headers: dict[str, str] | None = None) -> int:
    body = {"model": model_id, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    n = 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers or {}, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
    return n


class CpuClock:
    """CPU seconds of a set of processes (their whole trees), to turn a window into busy fractions."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs = procs

    def read(self) -> dict[str, float]:
        out = {}
        for name, p in self.procs.items():
            try:
                t = p.cpu_times()
                out[name] = t.user + t.system
            except psutil.Error:
                out[name] = 0.0
        return out


def rpc_servers(c: LocalCluster, names: list[str]) -> dict[str, psutil.Process]:
    out = {}
    for name in names:
        agent = psutil.Process(c.procs[name].pid)
        for child in agent.children(recursive=True):
            if "appliance.worker.rpc_server" in " ".join(child.cmdline()):
                out[name] = child
    return out


def engine_tree(c: LocalCluster) -> dict[str, psutil.Process]:
    head = psutil.Process(c.procs["head"].pid)
    return {"head": head, **{f"engine{i}": p for i, p in enumerate(head.children(recursive=True))}}


def concurrent(c: LocalCluster, model_id: str, *, clients: int, tokens: int, workers: list[str]) -> dict[str, Any]:
    """`clients` concurrent streams; aggregate tokens/s, and the busy fraction of every worker
    (its RPC server's CPU time over the window, one compute thread) and of the head's processes."""
    servers = CpuClock(rpc_servers(c, workers))
    head = CpuClock(engine_tree(c))
    s0, h0, t0 = servers.read(), head.read(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        made = list(pool.map(lambda i: stream(c.url, model_id, PROMPTS[i % len(PROMPTS)], tokens, c.headers), range(clients)))
    wall = time.perf_counter() - t0
    s1, h1 = servers.read(), head.read()
    return {
        "clients": clients,
        "tokens": sum(made),
        "wall_s": wall,
        "tps": sum(made) / wall,
        "busy": {w: round(min(1.0, (s1[w] - s0[w]) / wall), 3) for w in s1},
        "head_cpu": round(sum(h1[k] - h0.get(k, 0.0) for k in h1) / wall, 3),  # cores the head and engine used
    }


def bare_decode(model: Path, state: dict[str, Any], tokens: int, wrapper: list[str], tunnels: Path | None) -> float:
    """One stream of bare llama.cpp over the same RPC servers, layout and data plane (a fresh process)."""
    plan = state["plan"]
    cmd = [*wrapper, sys.executable, "-m", "bench.bare", "--model", str(model), "--tokens", str(tokens), "--reps", "1",
           "--rpc", ",".join(plan["rpc_endpoints"]), "--split", ",".join(str(x) for x in plan["tensor_split"]),
           "--n-gpu-layers", str(plan["n_gpu_layers"]), *(["--tunnels", str(tunnels)] if tunnels else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"bare run failed: {out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["runs"][0]["decode_tps"])


# ------------------------------------------------------------ the cluster
def head_with(c: LocalCluster, *, lanes: int | None, n: int) -> dict[str, Any]:
    """Stop the head (if any) and start it with `lanes` (None: no head); wait until it serves on n workers."""
    old = c.procs.get("head")
    if old is not None and old.poll() is None:
        terminate(old, grace_s=10)
        time.sleep(1.0)  # the RPC servers notice the engine's connections closing
    if lanes is None:
        return {}
    args = list(c.args["head"])
    if "--lanes" in args:
        i = args.index("--lanes")
        del args[i : i + 2]
    c.spawn("head", [*args, "--lanes", str(lanes)], wrapper=c.wrappers.get("head"))
    return c.wait(lambda s: s["health"]["status"] == "ok" and len([x for x in s["nodes"] if x.get("layers")]) == n
                  and s["engine"]["lanes"] == lanes, timeout_s=900, what=f"serving on {n} workers with {lanes} lane(s)")


def bench_cluster(model: Path, n: int, args: argparse.Namespace, tmp: Path, lab: Any) -> dict[str, Any]:
    lanes_on = args.lanes if args.lanes > 0 else n + 1
    configs = {"off": 1, "on": lanes_on}
    names = [f"w{k}" for k in range(1, n + 1)]
    state_dir = tmp / f"{model.stem}-{n}"
    if lab is not None:
        c = lab.cluster(model, state_dir=state_dir, n_ctx=1024, max_batch=args.max_batch, strategy="memory",
                        head_args=["--lanes", "1"])
    else:
        c = LocalCluster(model=model, state_dir=state_dir, n_ctx=1024, max_batch=args.max_batch, strategy="memory")
        c.start_head(["--lanes", "1"])
        for w in names:
            c.start_worker(w, threads=1)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    bare: list[float] = []
    try:
        st = c.wait(lambda s: s["health"]["status"] == "ok" and len([x for x in s["nodes"] if x.get("layers")]) == n,
                    timeout_s=1800, what=f"serving on {n} workers")
        layout = ", ".join(f"{a['node']}:{a['start']}-{a['end'] - 1}" for a in st["plan"]["assignments"] if a["n_layers"])
        model_id = st["model"]["id"]
        log(f"{model.name} on {n} worker(s): {layout}; lanes off=1, on={lanes_on}")
        for rep in range(args.reps):
            order = list(configs) if rep % 2 == 0 else list(reversed(configs))
            for mode in order:
                st = head_with(c, lanes=configs[mode], n=n)
                stream(c.url, model_id, PROMPTS[0], 4, c.headers)  # warm: first graph, first tokens
                for k in args.clients:
                    r = concurrent(c, model_id, clients=k, tokens=args.tokens, workers=names)
                    runs[mode].append(r)
                    log(f"  rep {rep + 1} lanes {mode:>3}: {k} client(s) {r['tps']:6.1f} tok/s  busy {r['busy']}  "
                        f"head+engine {r['head_cpu']:.2f} cores")
            head_with(c, lanes=None, n=n)
            bare.append(bare_decode(model, st, args.tokens, c.wrappers.get("head") or [],
                                     tunnels_for(c, st, state_dir / "bare-tunnels.json") if lab is not None else None))
            log(f"  rep {rep + 1} bare llama.cpp RPC, one stream: {bare[-1]:.1f} tok/s")
    finally:
        c.stop()
    return {"model": model.name, "workers": n, "layout": layout, "lanes_on": lanes_on, "runs": runs, "bare": bare}


# ------------------------------------------------------------ report
def summary(res: dict[str, Any], clients: list[int]) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for mode, runs in res["runs"].items():
        out[mode] = {}
        for k in clients:
            rs = [r for r in runs if r["clients"] == k]
            if not rs:
                continue
            busy_names = rs[0]["busy"].keys()
            out[mode][k] = {
                "tps": median([r["tps"] for r in rs]),
                "busy": {w: median([r["busy"].get(w, 0.0) for r in rs]) for w in busy_names},
                "head_cpu": median([r["head_cpu"] for r in rs]),
            }
    return out


def table(results: dict[str, Any]) -> list[str]:
    clients = results["clients"]
    lines = [
        "| model | workers | lanes on | clients | tok/s lanes off | tok/s lanes on | on/off "
        "| vs 1 client (off) | vs 1 client (on) | bare RPC, 1 stream | busy per worker, off | busy per worker, on "
        "| head+engine cores, on |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results["clusters"]:
        s = summary(res, clients)
        bare = median(res["bare"]) if res["bare"] else float("nan")
        one_off = s["off"][clients[0]]["tps"]
        for k in clients:
            off, on = s["off"][k], s["on"][k]
            fmt = lambda b: " ".join(f"{v:.0%}" for v in b.values())  # noqa: E731
            lines.append(
                f"| {res['model']} | {res['workers']} | {res['lanes_on']} | {k} | {off['tps']:.1f} | {on['tps']:.1f} "
                f"| **{on['tps'] / off['tps']:.2f}** | {off['tps'] / one_off:.2f}x | **{on['tps'] / one_off:.2f}x** "
                f"| {bare:.1f} | {fmt(off['busy'])} | {fmt(on['busy'])} | {on['head_cpu']:.2f} |"
            )
    return lines


def verdicts(results: dict[str, Any]) -> list[str]:
    out = []
    clients = results["clients"]
    for res in results["clusters"]:
        s = summary(res, clients)
        one_off = s["off"][clients[0]]["tps"]
        single = s["on"][clients[0]]["tps"] / one_off
        out.append(f"- {res['model']}, {res['workers']} worker(s): single stream lanes on/off = {single:.2f} "
                   f"(target >= 0.97: {'met' if single >= 0.97 else 'MISSED'})")
        if res["workers"] == 2 and 4 in s["on"]:
            four = s["on"][4]["tps"] / one_off
            out.append(f"- {res['model']}, 2 workers: 4 clients with lanes = {four:.2f}x one client "
                       f"(target >= 1.7: {'met' if four >= 1.7 else 'MISSED'})")
        if res["workers"] >= 3 and 4 in s["on"]:
            on4 = s["on"][4]
            worst = max(on4["busy"].values() or [0.0])
            if worst > 0:
                # Each worker's compute per token stays what it is here; on its own box the pipeline is
                # capped by the busiest one: tokens / (its compute seconds) = tok/s / its busy fraction.
                out.append(f"- {res['model']}, {res['workers']} workers, 4 clients with lanes: {on4['tps']:.1f} tok/s "
                           f"({on4['tps'] / one_off:.2f}x one client), busiest worker {worst:.0%} busy; on "
                           f"{res['workers']} boxes of this CPU the busiest worker's compute caps it near "
                           f"{on4['tps'] / worst:.1f} tok/s ({on4['tps'] / worst / one_off:.2f}x today's single stream), "
                           "before the network's share")
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results["clusters"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        for res in [r for r in results["clusters"] if r["model"] == m]:
            s = summary(res, results["clients"])
            for mode, style in (("off", "--"), ("on", "-")):
                ks = sorted(s[mode])
                ax.plot(ks, [s[mode][k]["tps"] for k in ks], style, marker="o",
                        label=f"{res['workers']} worker(s), lanes {mode}" + (f" ({res['lanes_on']})" if mode == "on" else ""))
            if res["bare"]:
                ax.scatter([1], [median(res["bare"])], marker="x", color="k")
        ax.set_title(m)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    fig.suptitle("Concurrent clients: lanes on (solid) vs off (dashed); x = bare llama.cpp RPC, one stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_section(doc: Path, results: dict[str, Any]) -> None:
    """Replace (or add) this benchmark's section of BENCHMARKS.md (bench.run keeps it)."""
    r = results
    body = "\n".join([
        SECTION,
        "",
        "Aggregate tokens/s of concurrent streaming clients (greedy, "
        f"{r['tokens']} tokens each, different prompts) with one engine context (lanes off) and with",
        "several contexts over the same weights (lanes on, appliance.engine.lanes), bare llama.cpp",
        "over the same RPC servers and layout beside them (one stream), and the fraction of the",
        "window each worker's RPC server computed. Regenerate with:",
        "",
        f"    {r['cmdline']}",
        "",
        f"Machine: {r['machine']}; network: {r['network']}; date {r['date']}; medians of {r['reps']} reps, "
        "configurations alternated rep by rep on the same worker processes; each worker computes with one thread.",
        "",
        *table(r),
        "",
        *verdicts(r),
        "",
        f"![throughput]({r['plot']})",
        "",
        NOTES,
    ])
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    start = old.find("\n" + SECTION)
    if start < 0:
        doc.write_text(old.rstrip() + "\n\n" + body + "\n")
        return
    end = old.find("\n## ", start + 1)
    doc.write_text(old[: start + 1] + body + "\n" + (old[end:] if end >= 0 else ""))


NOTES = """How to read it: *on/off* compares the two engines at the same number of clients; *vs 1 client*
divides by one client with lanes off (the single stream a user sees today), so it is the
cluster's gain from concurrency. *busy* is the share of the window each worker's RPC server
spent computing (its CPU time, one compute thread): with lanes off the workers take turns
(their fractions add up to about one), with lanes they overlap. *head+engine cores* is what
the head and its engine used meanwhile (sampling, graphs, HTTP): on this machine it comes out
of the same two cores the workers compute on, which is why two local workers cannot reach 2x
here; on separate boxes that cost is the head's own.

Why the targets are missed here, and what follows. With one context the workers already sit
idle most of the window (demo model: 20-45 % busy each), and lanes raise that only a little:
what serialises them on this machine is not the pipeline but the two cores that the head, its
engine threads, every RPC server and the clients share, plus llama.cpp's per-step costs that
grow with lanes (graph reuse is off with more than one lane: every step rebuilds and resends
its graph). On the 1 GB stack the last worker, which computes the 49k-token output layer for
every token, is 60-90 % busy and caps the pipeline whatever the lanes do (the memory-balanced
plan does not weigh that layer's compute). So lanes stay off by default (`--lanes 1`; the
single stream with lanes on measured 0.93-0.99x), and `--lanes auto` or `--lanes N` is for
clusters of separate boxes, where the verdict lines above estimate the ceiling from each
worker's own compute per token."""


# ------------------------------------------------------------ main
def resolve(name: str) -> Path:
    demo = resolve_model("demo")
    if name == "demo":
        return demo
    from bench.scale import model_for

    return model_for(name, demo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo,1G", help="demo, and/or sizes of the scale lab's model (1G, 300M)")
    p.add_argument("--workers", default="1,2,3")
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--lanes", type=int, default=0, help="lanes when on (0: the worker count plus one)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--lan", action="store_true", help="in the LAN lab (netns, tbf-shaped links; root)")
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--out", default=str(ROOT / "docs"))
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the saved json")
    args = p.parse_args(argv)
    args.clients = [int(x) for x in args.clients.split(",")]
    suffix = "-lan" if args.lan else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / f"throughput{suffix}.json"
    if args.report_only:
        results = json.loads(saved.read_text())
    else:
        cmdline = "python -m bench.throughput " + " ".join(argv if argv is not None else sys.argv[1:])
        results = {
            "cmdline": cmdline.strip(), "clients": args.clients, "tokens": args.tokens, "reps": args.reps,
            "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
            "network": f"LAN lab, {args.rate} tbf per link" if args.lan else "loopback",
            "date": time.strftime("%Y-%m-%d"), "plot": f"throughput{suffix}.png", "clusters": [],
        }
        with tempfile.TemporaryDirectory(prefix="anyway-tput-") as tmp:
            for name in args.models.split(","):
                model = resolve(name)
                for n in (int(x) for x in args.workers.split(",")):
                    if args.lan:
                        from bench.lab import LanLab

                        with LanLab(workers=n, rate=args.rate) as lab:
                            results["clusters"].append(bench_cluster(model, n, args, Path(tmp), lab))
                    else:
                        results["clusters"].append(bench_cluster(model, n, args, Path(tmp), None))
                    saved.write_text(json.dumps(results, indent=1))
    plot(results, out / results["plot"])
    write_section(out / f"BENCHMARKS{suffix}.md", results)
    print("\n".join(table(results) + [""] + verdicts(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
