"""Pre-staging on a real cluster: a failover whose layers were staged sends no cached weights.

The model is the demo model with two extra identity blocks whose feed-forward tensors are
over ggml's 10 MiB hash-cache threshold (bench.synth). Three real workers; the head tells
each what it would take over if another died, the workers fetch it over the control plane
and write it where ggml's RPC server looks (`CACHE_DIR/<FNV-1a hash>`). Then a worker is
SIGKILLed: the survivors' RPC servers must find every moved tensor in their caches, which
we see on disk: a server writes a cache file only for a tensor whose bytes it received.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from appliance.common.config import cache_dir
from appliance.common.fnv import fnv1a64_file
from appliance.core.staging import HASH_THRESHOLD_BYTES
from helpers import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def staging_model(demo_model: Path) -> Path:
    from bench.synth import identity_stack

    dst = cache_dir() / "models" / "test-identity-2x20480.gguf"
    if not dst.exists():
        identity_stack(base=demo_model, out=dst, extra_layers=2, extra_ffn=20480)
    return dst


def cache_files(path: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in path.iterdir() if p.is_file() and len(p.name) == 16}


def test_the_rpc_cache_names_files_by_our_hash(staging_model: Path, make_cluster) -> None:  # type: ignore[no-untyped-def]
    """The head computes ggml's cache names itself (to tell workers what to stage): after a
    load, the names ggml's RPC server chose are hashes the head computed of the file."""
    from appliance.head.staging import tensor_table

    c = make_cluster(staging_model, workers=1)
    c.wait_serving(nodes=1)
    ours = {t.hash for t in tensor_table(str(staging_model)) if t.size > HASH_THRESHOLD_BYTES}
    written = set(cache_files(c.state_dir / "cache-w1"))
    assert written and written <= ours
    t = next(t for t in tensor_table(str(staging_model)) if t.hash in written)
    assert f"{fnv1a64_file(staging_model, t.offset, t.size):016x}" == t.hash


def test_a_prestaged_failover_sends_no_cached_weights(staging_model: Path, make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(staging_model, workers=3)
    c.wait_serving(nodes=3)

    def all_staged() -> dict | None:  # type: ignore[type-arg]
        s = c.cluster_state()
        if not s or s["health"]["status"] != "ok":
            return None
        planned = [n for n in s["nodes"] if n["layers"]]
        if len(planned) == 3 and all(n["failover"] and n["failover"]["staged"] for n in planned):
            return s
        return None

    state = wait_until(all_staged, timeout_s=120, what="every failover staged")
    victim = max((n for n in state["nodes"] if n["layers"]), key=lambda n: n["failover"]["cacheable_bytes"])
    assert victim["failover"]["cacheable_bytes"] > HASH_THRESHOLD_BYTES  # something big would move
    survivors = [n["name"] for n in state["nodes"] if n["layers"] and n["name"] != victim["name"]]
    moving = set(cache_files(c.state_dir / f"cache-{victim['name']}"))  # the victim's own big tensors
    before = {s: cache_files(c.state_dir / f"cache-{s}") for s in survivors}
    assert moving and moving <= set().union(*before.values())  # all of them staged somewhere
    killed_at = time.time()
    c.procs[victim["name"]].send_signal(signal.SIGKILL)
    after = c.wait(lambda s: s["health"]["status"] == "ok"
                   and {n["name"] for n in s["nodes"] if n["layers"]} == set(survivors),
                   timeout_s=60, what="serving on the survivors")
    assert after["engine"]["generation"] == state["engine"]["generation"] + 1
    for s in survivors:
        now = cache_files(c.state_dir / f"cache-{s}")
        # A server writes a tensor's cache file only when it received the tensor's bytes: what
        # it had before the failover is untouched (found by hash), nothing it took over is new.
        rewritten = sorted(name for name, mtime in before[s].items() if now.get(name) != mtime)
        assert rewritten == [], f"{s}'s RPC server received these tensors' bytes again: {rewritten}"
        assert not (moving & {name for name, mtime in now.items() if mtime >= killed_at}), s
    r = httpx.post(f"{c.url}/v1/completions", json={"model": after["model"]["id"], "prompt": "Once upon a time",
                                                   "max_tokens": 8, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
