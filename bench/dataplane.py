"""What the secure data plane costs: TLS (appliance.common.dataplane) vs plain TCP, side by side.

    sudo .venv/bin/python -m bench.dataplane [--model demo] [--larger] [--reps 5]
                                             [--rate 1gbit] [--delay-ms 0.25]

The LAN of `bench.run --lan`: two workers, each in its own network namespace behind a
`tc tbf` bandwidth cap on both ends of its link, reached through a delaying TCP proxy
(netem is missing here). Each worker box runs two RPC servers, as `anyway worker` would:
the plain C server on the box's address (what every release before the data plane did) and
the TLS front with the C server on the box's loopback. The head side is bare llama.cpp in a
fresh process per run (`bench.bare`): the same split over the plain endpoints, or over the
TLS tunnels the engine opens. Runs alternate plain/TLS (and which goes first) rep by rep, so
both see the same machine load. Neither server keeps a tensor cache: every load is cold, all
weights cross the link.

Prints a Markdown table (the medians and the TLS/plain ratios) and writes bench-dataplane.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from appliance.cli.up import free_port
from appliance.common.config import cache_dir
from appliance.common.dataplane import TunnelSpec
from appliance.common.keys import ISSUED_DIR, SERVER, add_node, init_keys, load_allow_list
from appliance.common.modelfile import load_profile, resolve_model
from appliance.common.netprobe import Reach, probe_tcp
from bench.common import median
from bench.run import ROOT, DelayProxy, NetLab, log


def larger_model(src: Path, *, repeat: int = 2) -> Path:
    """The demo model made bigger: every tensor dequantized to F16 and the blocks repeated
    `repeat` times (same tokenizer; the text is nonsense, the bytes and the work are real)."""
    import gguf

    dst = cache_dir() / "models" / f"bench-{src.stem}-f16-x{repeat}.gguf"
    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(src), "r")
    arch = reader.fields["general.architecture"].contents()
    n_layers = int(reader.fields[f"{arch}.block_count"].contents())
    tmp = dst.with_suffix(".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == f"{arch}.block_count":
            value = n_layers * repeat
        if field.name == "general.file_type":
            value = 1  # mostly F16
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    tensors: list[tuple[str, np.ndarray]] = []
    blocks: dict[int, list[tuple[str, np.ndarray]]] = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        if data.ndim >= 2:
            data = data.astype(np.float16)
        if t.name.startswith("blk."):
            i = int(t.name.split(".")[1])
            blocks.setdefault(i, []).append((t.name.split(".", 2)[2], data))
        else:
            tensors.append((t.name, data))
    for r in range(repeat):
        for i in range(n_layers):
            for suffix, data in blocks[i]:
                tensors.append((f"blk.{r * n_layers + i}.{suffix}", data))
    for name, data in tensors:
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


def wait_open(endpoint: str, timeout_s: float = 60) -> None:
    import asyncio

    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if asyncio.run(probe_tcp(host, int(port), 1.0)) == Reach.OPEN:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{endpoint} did not open")


def bare(model: Path, endpoints: list[str], *, split: list[int], ngl: int, tokens: int,
         tunnels: Path | None) -> dict[str, float]:
    cmd = [sys.executable, "-m", "bench.bare", "--model", str(model), "--tokens", str(tokens), "--reps", "1",
           "--rpc", ",".join(endpoints), "--split", ",".join(map(str, split)), "--n-gpu-layers", str(ngl)]
    if tunnels is not None:
        cmd += ["--tunnels", str(tunnels)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                         env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"bare run failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["runs"][0]


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(model: Path, lab: NetLab, keys: Path, tmp: Path, *, reps: int, tokens: int, delay_s: float) -> dict[str, Any]:
    prof = load_profile(model)
    n = prof.n_layers + 1
    split = [n // 2, n - n // 2]
    servers: list[subprocess.Popen[bytes]] = []
    plain: list[str] = []
    tls: list[str] = []
    peers = {}
    allow = load_allow_list(keys)
    try:
        for k in (1, 2):
            addr = f"10.78.{k}.2"
            ns = ["ip", "netns", "exec", f"{lab.tag}-{k}"]
            for mode in ("plain", "tls"):
                ep = f"{addr}:{free_port()}"
                extra = ["--keys", str(keys / ISSUED_DIR / f"w{k}")] if mode == "tls" else []
                servers.append(subprocess.Popen(
                    [*ns, sys.executable, "-m", "appliance.worker.rpc_server", "--endpoint", ep, "--threads", "1", *extra],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT))
                wait_open(ep)
                host, port = ep.rsplit(":", 1)
                dial = ep
                if delay_s > 0:
                    proxy = DelayProxy((host, int(port)), delay_s)
                    dial = f"127.0.0.1:{proxy.port}"
                (plain if mode == "plain" else tls).append(dial)
                if mode == "tls":
                    peers[dial] = allow[f"w{k}"]
        spec = tmp / f"tunnels-{model.stem}.json"
        spec.write_text(TunnelSpec(head_key_file=str(keys / f"{SERVER}.key_secret"), peers=peers).to_json())
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "tls": []}
        loads = [loadavg()]
        for rep in range(reps):
            for mode in (("plain", "tls") if rep % 2 == 0 else ("tls", "plain")):
                r = bare(model, plain if mode == "plain" else tls, split=split, ngl=n, tokens=tokens,
                         tunnels=spec if mode == "tls" else None)
                runs[mode].append(r)
                log(f"  {model.name} rep {rep + 1}/{reps} {mode:<5}: load {r['load_s']:.2f}s decode "
                    f"{r['decode_tps']:.1f} tok/s prefill {r['prompt_tps']:.0f} tok/s")
        loads.append(loadavg())
    finally:
        for p in servers:
            p.kill()
            p.wait(10)
    med = {m: {k: median([r[k] for r in rs]) for k in ("load_s", "decode_tps", "prompt_tps")} for m, rs in runs.items()}
    return {
        "model": f"{prof.name} ({prof.n_layers} layers, {model.name}, {model.stat().st_size / 1e6:.0f} MB)",
        "rpc_weight_mb": round(prof.layers_total_bytes / 1e6),
        "runs": runs,
        "median": med,
        "decode_ratio": med["tls"]["decode_tps"] / med["plain"]["decode_tps"],
        "load_ratio": med["plain"]["load_s"] / med["tls"]["load_s"],  # speed ratio: >1 means TLS loads faster
        "prefill_ratio": med["tls"]["prompt_tps"] / med["plain"]["prompt_tps"],
        "loadavg": loads,
    }


def report(results: dict[str, Any]) -> str:
    lines = [
        f"Network: {results['network']}. Machine: {results['machine']}. Date: {results['date']}. "
        f"{results['reps']} runs per mode, alternating; decode = {results['tokens']} tokens; load = cold "
        "(no tensor cache: every weight crosses the link).",
        "",
        "| model | weights over RPC | mode | cold load s | decode tok/s | prefill tok/s | load average (1/5/15 min) before, after |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in results["models"]:
        for mode in ("plain", "tls"):
            med = m["median"][mode]
            lines.append(f"| {m['model']} | {m['rpc_weight_mb']} MB | {'plain TCP' if mode == 'plain' else 'TLS 1.3'} "
                         f"| {med['load_s']:.2f} | {med['decode_tps']:.1f} | {med['prompt_tps']:.0f} | "
                         f"{' → '.join(m['loadavg'])} |")
        lines.append(f"| | | **TLS / plain** | **{m['load_ratio']:.2f}x** (speed) | **{m['decode_ratio']:.2f}x** "
                     f"| {m['prefill_ratio']:.2f}x | |")
    worst_decode = min(m["decode_ratio"] for m in results["models"])
    worst_load = min(m["load_ratio"] for m in results["models"])
    lines += ["", f"- Target: decode >= 0.95x plain TCP: worst {worst_decode:.2f}x "
                  f"({'met' if worst_decode >= 0.95 else 'MISSED'}).",
              f"- Target: cold load >= 0.9x plain TCP (speed, i.e. plain time / TLS time): worst {worst_load:.2f}x "
              f"({'met' if worst_load >= 0.9 else 'MISSED'})."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dataplane", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--larger", action="store_true", help="also a larger model derived from it (F16, blocks repeated)")
    p.add_argument("--repeat", type=int, default=2, help="how many times the larger model repeats the blocks")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--delay-ms", type=float, default=0.25)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench-dataplane.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "BENCHMARKS.md"),
                   help="write the results as this file's 'Secure data plane' section ('' for none)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.dataplane needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    models = [resolve_model(args.model)]
    if args.larger:
        log("deriving the larger model")
        models.append(larger_model(models[0], repeat=args.repeat))
    tmp = Path(tempfile.mkdtemp(prefix="anyway-bench-dp-"))
    keys = init_keys(tmp / "keys")
    add_node(keys, "w1")
    add_node(keys, "w2")
    lab = NetLab(2, rate=args.rate, delay_ms=args.delay_ms)
    import platform

    results: dict[str, Any] = {
        "network": f"2 workers in netns, tc tbf {args.rate} each way on each link"
        + (f", {args.delay_ms} ms added each way (delay proxy)" if args.delay_ms else ""),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "reps": args.reps,
        "tokens": args.tokens,
        "cmdline": "python -m bench.dataplane " + " ".join(argv if argv is not None else sys.argv[1:]),
        "models": [],
    }
    try:
        for model in models:
            log(f"{model.name}: plain TCP vs TLS, {args.reps} reps each")
            results["models"].append(measure(model, lab, keys, tmp, reps=args.reps, tokens=args.tokens,
                                             delay_s=args.delay_ms / 1000))
    finally:
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    text = report(results)
    print(text)
    if args.doc:
        write_section(Path(args.doc), results, text)
    return 0


SECTION = "## Secure data plane"


def write_section(doc: Path, results: dict[str, Any], table: str) -> None:
    """Replace (or add) the 'Secure data plane' section of BENCHMARKS.md; bench.run keeps it."""
    body = "\n".join([
        SECTION,
        "",
        "What the authenticated, encrypted data plane (TLS 1.3 in front of llama.cpp's RPC server,",
        "docs/ARCHITECTURE.md) costs against plain TCP, measured side by side by `bench/dataplane.py`:",
        "",
        f"    sudo {results['cmdline']}",
        "",
        table,
        "",
        NOTES,
    ])
    old = doc.read_text() if doc.exists() else ""
    start = old.find("\n" + SECTION)
    if start < 0:
        doc.write_text(old.rstrip() + "\n\n" + body + "\n")
        return
    end = old.find("\n## ", start + 1)
    doc.write_text(old[: start + 1] + body + "\n" + (old[end:] if end >= 0 else ""))


NOTES = """How to read it: the same two worker namespaces serve both modes at once (a plain C server on
the box's address, and the TLS front with its C server on loopback), and bare llama.cpp in a
fresh process per run loads the model (cold: no tensor cache) and decodes, alternating the
modes (and which goes first) rep by rep. *Decode* is one token per step through both workers:
about 14 KB to each (graph and inputs) and, from the worker holding the output layer, the
logits back (196 KB per token with this 49k-token vocabulary), each through two relays;
*cold load* streams every weight through the 1 Gbit/s cap; the ratio for load is a speed ratio
(plain time / TLS time). Everything (head, relays, both
workers, the shaping) shares this machine's two cores, so what TLS costs in CPU shows here more
than on real boxes, and the numbers move with the other jobs on the machine: the load average
before and after is in the table."""


if __name__ == "__main__":
    sys.exit(main())
