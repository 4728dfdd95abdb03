"""Per-node identities: each box its own keys, an allow-list that names them, `anyway keys`
to add and revoke, and a revocation that a running head honours at once."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from appliance.cli.main import main as anyway
from appliance.common import keys as K

from helpers import wait_until


def test_init_add_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "keys"
    assert anyway(["keys", "init", str(d)]) == 0
    assert anyway(["keys", "add", str(d), "w1", "w2"]) == 0
    w1, w2 = K.load_worker_keys(d / "issued" / "w1"), K.load_worker_keys(d / "issued" / "w2")
    head = K.load_head_keys(d)
    # Every box its own pair, on both planes; each knows the head's public identity only.
    assert w1.node.name == "w1" and w2.node.name == "w2"
    assert w1.public != w2.public and w1.node.public.tls_cert_der != w2.node.public.tls_cert_der
    assert w1.server_public == w2.server_public == head.public
    assert set(K.load_allow_list(d)) == {"w1", "w2"}
    for p in (d / "server.key_secret", d / "issued" / "w1" / "node.key_secret"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert "secret-key" not in (d / "nodes" / "w1.key").read_text()  # the allow-list is public keys only
    assert "secret-key" not in (d / "issued" / "w1" / "server.key").read_text()
    capsys.readouterr()
    assert anyway(["keys", "list", str(d)]) == 0
    listing = capsys.readouterr().out
    assert "w1" in listing and "allowed" in listing
    assert anyway(["keys", "revoke", str(d), "w2"]) == 0
    assert set(K.load_allow_list(d)) == {"w1"}
    assert not (d / "issued" / "w2").exists()  # the secret is not left lying around
    capsys.readouterr()
    anyway(["keys", "list", str(d)])
    assert "revoked" in capsys.readouterr().out
    # A name is issued once: a second add must be explicit (and revokes the first key).
    assert anyway(["keys", "add", str(d), "w1"]) == 2
    old = K.load_allow_list(d)["w1"].curve_public
    assert anyway(["keys", "add", str(d), "w1", "--force"]) == 0
    assert K.load_allow_list(d)["w1"].curve_public != old


def test_the_old_shared_worker_key_is_refused_with_instructions(tmp_path: Path) -> None:
    d = tmp_path / "old"
    d.mkdir()
    (d / "client.key_secret").write_text('metadata\ncurve\n    public-key = "x"\n')
    (d / "server.key_secret").write_text("")
    with pytest.raises(K.KeyError_, match="anyway keys add"):
        K.load_head_keys(d)
    with pytest.raises(K.KeyError_, match="its own identity"):
        K.load_worker_keys(d)


def test_an_allow_list_entry_names_its_own_key(tmp_path: Path) -> None:
    d = K.init_keys(tmp_path / "k")
    K.add_node(d, "w1")
    (d / "nodes" / "w1.key").rename(d / "nodes" / "w9.key")  # w1's key filed as w9
    with pytest.raises(K.KeyError_, match="holds the key of 'w1'"):
        K.load_allow_list(d)
    errors: list[str] = []
    assert K.load_allow_list(d, errors=errors) == {} and errors  # the head fails closed on it


def test_a_worker_may_only_be_who_its_key_says(tmp_path: Path) -> None:
    d = K.init_keys(tmp_path / "k")
    K.add_node(d, "w1")
    out = subprocess.run([sys.executable, "-m", "appliance", "worker", "--keys", str(d / "issued" / "w1"), "--name", "w2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "w1" in out.stderr


@pytest.mark.slow
def test_a_revoked_key_is_refused_at_once_and_its_node_leaves_the_plan(make_cluster, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(tiny_model, workers=2, heartbeat=1.0, data_plane="tls")
    c.wait_serving(nodes=2)
    last_id = c.cluster_state()["events_last_id"]
    t0 = time.monotonic()
    assert anyway(["keys", "revoke", str(c.keys), "w2"]) == 0
    state = c.wait(lambda s: {n["name"] for n in s["nodes"] if n.get("layers")} == {"w1"} and s["health"]["status"] == "ok",
                   timeout_s=30, what="a plan without w2")
    # At once: not after the heartbeat detector's 10 s (heartbeat 1 s).
    assert time.monotonic() - t0 < 10
    w2 = next(n for n in state["nodes"] if n["name"] == "w2")
    assert w2["state"] == "refused" and "revoked" in w2["reason"]
    evs = httpx.get(f"{c.url}/v1/events", params={"since": last_id}).json()["events"]
    assert any(e["kind"] == "refused" and e["node"] == "w2" and "revoked" in e["message"] for e in evs)
    # Its connection is ignored: it stops hearing the head, reconnects, and the handshake is refused.
    wait_until(lambda: any(e["kind"] == "refused" and "unknown cluster key" in e["message"]
                           for e in httpx.get(f"{c.url}/v1/events", params={"since": last_id}).json()["events"]),
               timeout_s=30, what="w2's reconnection to be refused")
    state = c.cluster_state()
    assert next(n for n in state["nodes"] if n["name"] == "w2")["state"] == "refused"
    r = httpx.post(f"{c.url}/v1/completions", json={"model": state["model"]["id"], "prompt": "Hi", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200
