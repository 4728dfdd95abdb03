"""Chaos: a bounded, seeded random schedule of faults while clients keep asking.

Three real worker agents hold the 8-layer test model; client threads send chat and
completion requests (streaming and not, greedy) the whole time while a fault thread, on a
seeded random schedule, SIGKILLs workers (and starts them again a little later, as a box
that reboots), hangs them (SIGSTOP of the agent and its RPC server, then SIGCONT), restarts
them gracefully (SIGTERM, start again) and SIGKILLs the engine process. At most two workers
are faulted at a time, so one box always exists that can hold the model; the schedule and
its seed are printed so a failure can be replayed (`ANYWAY_CHAOS_SEED=N`).

At the end the faults stop and every box is back: the cluster must converge (healthy,
serving the plan it wants over all three workers, no further re-plans), and every request
must have either completed with exactly the no-fault text or ended with a clean retryable
error (503 with Retry-After, or an in-stream `cluster_degraded` error). Head restarts are
covered by test_cluster_edges: a head that goes away takes its clients' connections with it.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from openai import OpenAI

from appliance.cli.up import LocalCluster

pytestmark = pytest.mark.slow

WORKERS = ("w1", "w2", "w3")
CLIENTS = 3
MAX_TOKENS = 40
CHAOS_S = float(os.environ.get("ANYWAY_CHAOS_S", "50"))  # how long faults are injected
MAX_FAULTED = 2  # workers down or hung at once
PROMPTS = [
    ("chat", "Tell me about the sea."),
    ("chat", "Explain how bread is made."),
    ("completion", "The three rules of good software are"),
    ("completion", "Once upon a time, in a small village by the sea,"),
]


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome in ("wrong", "unclean"):
                self.failures.append(detail)


def retryable(exc: Exception) -> bool:
    """A clean retryable error: 503 + Retry-After, or the in-stream cluster_degraded error."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 503 and bool(exc.response.headers.get("retry-after"))
    if isinstance(exc, openai.APIError):
        body = exc.body if isinstance(exc.body, dict) else {}
        return body.get("code") == "cluster_degraded" or "cluster_degraded" in str(exc)
    return False


def ask(client: OpenAI, model: str, kind: str, text: str, stream: bool) -> str:
    if kind == "chat":
        messages: Any = [{"role": "user", "content": text}]
        if not stream:
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
            return r.choices[0].message.content or ""
        s = client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        return "".join((ch.choices[0].delta.content or "") for ch in s if ch.choices)
    if not stream:
        r2 = client.completions.create(model=model, prompt=text, max_tokens=MAX_TOKENS, temperature=0)
        return r2.choices[0].text
    s2 = client.completions.create(model=model, prompt=text, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    return "".join(ch.choices[0].text for ch in s2 if ch.choices)


def client_loop(url: str, model: str, want: dict[str, str], stop: threading.Event, tally: Tally, rng: random.Random) -> None:
    client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=240)
    while not stop.is_set():
        kind, text = rng.choice(PROMPTS)
        stream = rng.random() < 0.6
        try:
            got = ask(client, model, kind, text, stream)
        except Exception as exc:  # noqa: BLE001 - every outcome is classified below
            if retryable(exc):
                tally.add("retryable")
                time.sleep(0.5)
            else:
                tally.add("unclean", f"{kind} stream={stream}: {type(exc).__name__}: {exc}")
            continue
        if got == want[text]:
            tally.add("ok")
        else:
            tally.add("wrong", f"{kind} stream={stream} {text!r}: got {got!r}, want {want[text]!r}")


def tree(proc: Any) -> list[psutil.Process]:
    try:
        p = psutil.Process(proc.pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def signal_tree(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def engine_proc(c: LocalCluster) -> psutil.Process | None:
    try:
        head = psutil.Process(c.procs["head"].pid)
        return next((p for p in head.children() if "appliance.engine" in " ".join(p.cmdline())), None)
    except psutil.NoSuchProcess:
        return None


def fault_loop(c: LocalCluster, rng: random.Random, until: float, schedule: list[str]) -> None:
    """Inject faults until `until`; each worker fault is undone after a random delay."""
    undo: dict[str, tuple[float, str]] = {}  # worker -> (when, how)
    t0 = time.monotonic()
    next_fault = t0 + rng.uniform(1.0, 3.0)
    while time.monotonic() < until or undo:
        now = time.monotonic()
        for w, (when, how) in list(undo.items()):
            if now >= when:
                if how == "start":
                    c.restart(w)
                else:
                    signal_tree(tree(c.procs[w]), signal.SIGCONT)
                schedule.append(f"{now - t0:6.1f}s {how} {w}")
                del undo[w]
        if now >= next_fault and now < until:
            healthy = [w for w in WORKERS if w not in undo]
            kinds = ["engine"] + (["kill", "pause", "restart"] if len(undo) < MAX_FAULTED and healthy else [])
            kind = rng.choice(kinds)
            w = rng.choice(healthy) if kind != "engine" else ""
            if kind == "kill":
                signal_tree(tree(c.procs[w]), signal.SIGKILL)
                undo[w] = (now + rng.uniform(1.0, 6.0), "start")
            elif kind == "pause":
                signal_tree(tree(c.procs[w]), signal.SIGSTOP)
                undo[w] = (now + rng.uniform(0.5, 5.0), "resume")
            elif kind == "restart":
                c.restart(w)  # SIGTERM, wait, start again: a clean reboot
            else:
                e = engine_proc(c)
                if e is None:
                    kind = "engine-idle"  # between engines: nothing to kill
                else:
                    e.send_signal(signal.SIGKILL)
            schedule.append(f"{now - t0:6.1f}s {kind} {w}".rstrip())
            next_fault = now + rng.uniform(2.0, 5.0)
        time.sleep(0.05)


def converged(s: dict[str, Any]) -> bool:
    live = {n["name"] for n in s["nodes"] if n["state"] == "alive" and n.get("layers")}
    return (
        s["health"]["status"] == "ok"
        and s["engine"]["state"] == "serving"
        and live == set(WORKERS)
        and s["plan"] == s["desired_plan"]
    )


@pytest.mark.timeout(900)
def test_chaos_requests_complete_or_fail_cleanly_and_the_cluster_converges(
    make_cluster: Any, tiny_model: Path, reference: Any
) -> None:
    seed = int(os.environ.get("ANYWAY_CHAOS_SEED") or random.SystemRandom().randrange(1 << 16))
    print(f"chaos seed: {seed} (replay with ANYWAY_CHAOS_SEED={seed})")
    want = {}
    for kind, text in PROMPTS:
        if kind == "chat":
            want[text] = reference.chat(tiny_model, [{"role": "user", "content": text}], MAX_TOKENS)[0]
        else:
            want[text] = reference.complete(tiny_model, text, MAX_TOKENS)[0]

    c: LocalCluster = make_cluster(tiny_model, workers=len(WORKERS))
    c.wait_serving(nodes=len(WORKERS))
    model = httpx.get(f"{c.url}/v1/models").json()["data"][0]["id"]

    tally, stop, schedule = Tally(), threading.Event(), []
    rng = random.Random(seed)
    clients = [
        threading.Thread(target=client_loop, args=(c.url, model, want, stop, tally, random.Random(seed + i + 1)))
        for i in range(CLIENTS)
    ]
    for t in clients:
        t.start()
    try:
        fault_loop(c, rng, time.monotonic() + CHAOS_S, schedule)
    finally:
        for w in WORKERS:  # nothing stays hung, whatever happened above
            signal_tree(tree(c.procs[w]), signal.SIGCONT)
        # Keep the clients running while the cluster settles, then let them finish.
        try:
            c.wait(converged, timeout_s=120, what="convergence after the faults")
        finally:
            stop.set()
            for t in clients:
                t.join(timeout=300)

    faults = Counter(line.split()[1] for line in schedule)
    print("chaos schedule:\n  " + "\n  ".join(schedule))
    print(f"chaos faults: {dict(faults)}")
    print(f"chaos requests: {dict(tally.outcomes)} (seed {seed})")
    assert not any(t.is_alive() for t in clients), "a client is stuck"
    assert not tally.failures, "\n".join(tally.failures[:10])
    assert tally.outcomes["ok"] >= CLIENTS, f"too few requests completed: {dict(tally.outcomes)}"
    assert sum(faults[k] for k in ("kill", "pause", "restart", "engine")) >= 4, dict(faults)

    # Converged means idle: the reconciler wants nothing more, nothing reloads.
    first = c.wait(converged, timeout_s=30, what="still converged")
    time.sleep(3)
    later = c.wait(converged, timeout_s=5, what="still converged")
    assert later["engine"]["generation"] == first["engine"]["generation"]
    assert later["plan"] == first["plan"]

    # And it still answers exactly.
    client = OpenAI(base_url=f"{c.url}/v1", api_key="x", max_retries=0, timeout=60)
    for kind, text in PROMPTS:
        assert ask(client, model, kind, text, stream=True) == want[text]
