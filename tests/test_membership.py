"""Membership and failure detector: the node state machine, driven by messages and time."""

from __future__ import annotations

import pytest

from appliance.common.config import Timing
from appliance.core.membership import BadValue, Membership, NodeState, Refusal
from appliance.common.protocol import PROTOCOL_MAJOR

T = Timing().with_interval(0.5).heartbeat  # suspect after 2 s, dead after 5 s, settle 1 s


def hello(name: str = "w1", node_id: str = "id-1", **over):  # type: ignore[no-untyped-def]
    body = {
        "name": name, "node_id": node_id, "hostname": name, "protocol": PROTOCOL_MAJOR, "rpc_protocol": "7.0.0",
        "version": "0.1.0", "rpc_port": 50052, "rpc_host": "10.0.0.5", "rpc_ready": True,
        "memory": {"total": 8 << 30, "free": 6 << 30, "plannable": 6 << 30}, "devices": [{"name": "CPU", "type": "cpu"}],
    }
    body.update(over)
    return body


def fresh() -> Membership:
    return Membership(timing=T, rpc_protocol="7.0.0", package_version="0.1.0")


def test_join_settle_alive_suspect_dead_rejoin() -> None:
    m = fresh()
    node, events = m.hello(identity=b"a", body=hello(), peer_address="10.0.0.5", now=0.0)
    assert node.state == NodeState.JOINING and [e.kind for e in events] == ["join"]
    assert node.rpc_endpoint == "10.0.0.5:50052" and node.plannable_bytes == 6 << 30
    assert m.tick(0.5) == []  # settling
    assert [e.kind for e in m.tick(1.1)] == ["alive"]
    m.heartbeat(identity=b"a", body={"rpc_ready": True}, now=1.5)
    assert [e.kind for e in m.tick(3.6)] == ["suspect"]
    _, ev = m.heartbeat(identity=b"a", body={}, now=3.7)
    assert [e.kind for e in ev] == ["recovered"] and node.state == NodeState.ALIVE
    assert [e.kind for e in m.tick(9.0)] == ["dead"]
    assert node.state == NodeState.DEAD and not node.rpc_ready
    # The same process comes back (e.g. it was SIGSTOPped, then continued).
    _, ev = m.heartbeat(identity=b"a", body={"rpc_ready": True}, now=10.0)
    assert [e.kind for e in ev] == ["rejoin"] and node.state == NodeState.JOINING
    # One recent death: the settle time doubles before it is planned again.
    assert m.tick(11.5) == []
    m.heartbeat(identity=b"a", body={}, now=11.9)  # it keeps heartbeating while it settles
    assert [e.kind for e in m.tick(12.1)] == ["alive"]


def test_restarted_worker_is_a_rejoin_with_new_identity() -> None:
    m = fresh()
    m.hello(identity=b"a", body=hello(node_id="one"), peer_address="10.0.0.5", now=0.0)
    m.tick(2.0)
    node, events = m.hello(identity=b"b", body=hello(node_id="two"), peer_address="10.0.0.5", now=3.0)
    assert [e.kind for e in events] == ["rejoin"] and node.state == NodeState.JOINING
    assert m.by_identity == {b"b": "w1"}


def test_flapping_node_settles_longer_each_time() -> None:
    m = fresh()
    settles = []
    now = 0.0
    for i in range(4):
        m.hello(identity=f"id{i}".encode(), body=hello(node_id=f"n{i}"), peer_address="10.0.0.5", now=now)
        node = m.nodes["w1"]
        settles.append(m.settle_s(node, now))
        now += 6.0
        m.tick(now)  # silent: dies
        assert node.state == NodeState.DEAD
    assert settles == sorted(settles) and settles[-1] > settles[0]
    assert max(settles) <= T.FLAP_SETTLE_MAX_S


@pytest.mark.parametrize(
    "override, reason",
    [
        pytest.param({"rpc_protocol": "6.1.0"}, "ggml RPC protocol 6.1.0", id="rpc-version-mismatch"),
        pytest.param({"protocol": PROTOCOL_MAJOR + 1}, "control protocol", id="control-protocol-mismatch"),
        pytest.param({"name": ""}, "name", id="empty-name"),
        pytest.param({"name": "two words"}, "name", id="name-with-space"),
        pytest.param({"rpc_port": 70000}, "rpc_port", id="bad-port"),
        pytest.param({"rpc_port": "50052"}, "rpc_port", id="port-not-int"),
        pytest.param({"node_id": None}, "node_id", id="missing-node-id"),
    ],
)
def test_refusals_are_recorded_with_reason(override: dict, reason: str) -> None:  # type: ignore[type-arg]
    m = fresh()
    with pytest.raises(Refusal) as exc:
        m.hello(identity=b"x", body=hello(**override), peer_address="10.0.0.9", now=0.0)
    assert reason in exc.value.reason
    assert m.nodes == {}
    refused = list(m.refused.values())
    assert len(refused) == 1 and refused[0].state == NodeState.REFUSED and reason in refused[0].reason


def test_name_clash_from_another_address_is_refused() -> None:
    m = fresh()
    m.hello(identity=b"a", body=hello(node_id="one"), peer_address="10.0.0.5", now=0.0)
    with pytest.raises(Refusal, match="already used"):
        m.hello(identity=b"b", body=hello(node_id="two", rpc_host="10.0.0.6"), peer_address="10.0.0.6", now=1.0)


def test_unknown_heartbeat_is_ignored_and_bye_leaves() -> None:
    m = fresh()
    assert m.heartbeat(identity=b"ghost", body={}, now=0.0) == (None, [])
    m.hello(identity=b"a", body=hello(), peer_address="10.0.0.5", now=0.0)
    assert [e.kind for e in m.bye(identity=b"a", now=1.0)] == ["left"]
    assert m.nodes["w1"].state == NodeState.LEFT


def test_unreachable_rpc_makes_suspect_at_once() -> None:
    m = fresh()
    m.hello(identity=b"a", body=hello(), peer_address="10.0.0.5", now=0.0)
    m.tick(1.5)
    ev = m.mark_unreachable("w1", now=1.6, reason="RPC port refused")
    assert [e.kind for e in ev] == ["suspect"] and m.nodes["w1"].state == NodeState.SUSPECT
    assert not m.nodes["w1"].rpc_refused  # no answer is not proof: heartbeats decide


def test_refused_rpc_port_marks_the_node_until_it_answers_or_rejoins() -> None:
    m = fresh()
    m.hello(identity=b"a", body=hello(), peer_address="10.0.0.5", now=0.0)
    m.tick(1.5)
    ev = m.mark_unreachable("w1", now=1.6, reason="refused", refused=True)
    assert [e.kind for e in ev] == ["suspect"] and m.nodes["w1"].rpc_refused
    assert m.mark_unreachable("w1", now=1.7, reason="refused", refused=True) == []  # one event, not one per probe
    # Heartbeats from its agent do not clear it: only the head's own probe or a rejoin does.
    m.heartbeat(identity=b"a", body={"rpc_ready": True}, now=1.8)
    assert m.nodes["w1"].rpc_refused and m.nodes["w1"].state == NodeState.ALIVE
    assert [e.kind for e in m.rpc_reachable("w1", now=2.0)] == ["rpc_up"] and not m.nodes["w1"].rpc_refused
    assert m.rpc_reachable("w1", now=2.1) == []
    m.mark_unreachable("w1", now=2.2, reason="refused", refused=True)
    m.hello(identity=b"b", body=hello(node_id="other-process"), peer_address="10.0.0.5", now=2.5)
    assert not m.nodes["w1"].rpc_refused


# ------------------------------------------------ hostile values (docs/SECURITY.md)
ABSURD = [
    pytest.param({"memory": {"total": 1 << 60, "free": 1 << 60, "plannable": 1 << 60}}, "more than any box", id="exabytes"),
    pytest.param({"memory": {"total": 10 ** 400}}, "more than any box", id="beyond-float-range"),
    pytest.param({"memory": {"total": -1}}, "byte count", id="negative-memory"),
    pytest.param({"memory": {"total": 8e9}}, "byte count", id="float-memory"),
    pytest.param({"memory": "lots"}, "memory", id="memory-not-object"),
    pytest.param({"speed": float("nan")}, "speed", id="nan-speed"),
    pytest.param({"speed": float("inf")}, "speed", id="inf-speed"),
    pytest.param({"speed": 1e300}, "speed", id="absurd-speed"),
    pytest.param({"speed": -3}, "speed", id="negative-speed"),
    pytest.param({"speed": "fast"}, "speed", id="speed-not-number"),
    pytest.param({"devices": "gpu"}, "devices", id="devices-not-list"),
    pytest.param({"devices": [{"name": "GPU", "total_bytes": 1 << 62}]}, "more than any box", id="absurd-device"),
    pytest.param({"devices": [{"name": "x"}] * 100}, "devices", id="too-many-devices"),
    pytest.param({"rpc_ready": "yes"}, "rpc_ready", id="ready-not-bool"),
    pytest.param({"load": [1]}, "load", id="load-not-object"),
    pytest.param({"data_plane": "carrier-pigeon"}, "data_plane", id="unknown-data-plane"),
]


@pytest.mark.parametrize("override, reason", ABSURD)
def test_absurd_hello_values_are_refused_and_never_planned(override: dict, reason: str) -> None:  # type: ignore[type-arg]
    m = fresh()
    with pytest.raises(BadValue) as exc:
        m.hello(identity=b"a", body=hello(**override), peer_address="10.0.0.5", now=0.0)
    assert reason in exc.value.reason
    assert m.nodes == {} and m.refused["w1"].reason == exc.value.reason


@pytest.mark.parametrize("override, reason", [p for p in ABSURD if p.id != "unknown-data-plane"])
def test_a_heartbeat_with_an_absurd_value_changes_nothing(override: dict, reason: str) -> None:  # type: ignore[type-arg]
    m = fresh()
    node, _ = m.hello(identity=b"a", body=hello(), peer_address="10.0.0.5", now=0.0)
    before = (node.memory_total, node.plannable_bytes, node.speed, node.devices, node.load, node.rpc_ready, node.last_seen)
    with pytest.raises(BadValue, match=reason.split()[0]):
        m.heartbeat(identity=b"a", body=override, now=1.0)
    assert (node.memory_total, node.plannable_bytes, node.speed, node.devices, node.load, node.rpc_ready, node.last_seen) == before


def test_a_node_offers_no_more_than_it_has() -> None:
    m = fresh()
    node, _ = m.hello(identity=b"a", body=hello(memory={"total": 8 << 30, "free": 9 << 30, "plannable": 40 << 30}),
                      peer_address="10.0.0.5", now=0.0)
    assert node.plannable_bytes == node.memory_free == 8 << 30


def test_load_figures_out_of_range_are_left_out() -> None:
    m = fresh()
    node, _ = m.hello(identity=b"a", body=hello(load={"cpu_percent": float("nan"), "ram_percent": 1e300, "loadavg_1m": 0.5}),
                      peer_address="10.0.0.5", now=0.0)
    assert node.load == {"loadavg_1m": 0.5}


def test_the_rpc_endpoint_is_where_the_control_connection_comes_from() -> None:
    m = fresh()
    node, _ = m.hello(identity=b"a", body=hello(rpc_host="203.0.113.7"), peer_address="::ffff:10.0.0.5", now=0.0)
    assert node.rpc_endpoint == "10.0.0.5:50052"  # not the address the node claims


def test_an_advertised_endpoint_needs_the_heads_configuration() -> None:
    m = fresh()
    with pytest.raises(Refusal, match="--node-rpc w1=HOST:PORT"):
        m.hello(identity=b"a", body=hello(rpc_advertise="198.51.100.9:22"), peer_address="10.0.0.5", now=0.0)
    allowed = Membership(timing=T, rpc_protocol="7.0.0", package_version="0.1.0", rpc_endpoints={"w1": ("192.0.2.4", 6000)})
    node, _ = allowed.hello(identity=b"a", body=hello(rpc_advertise="198.51.100.9:22"), peer_address="10.0.0.5", now=0.0)
    assert node.rpc_endpoint == "192.0.2.4:6000"  # the head's configuration, not the node's claim


def test_a_key_announces_only_its_own_node() -> None:
    m = fresh()
    with pytest.raises(Refusal, match="cannot announce a node named 'w2'"):
        m.hello(identity=b"a", body=hello(name="w2"), peer_address="10.0.0.5", now=0.0, key_name="w1")
    assert "w2" not in m.refused and "w1" in m.refused
    node, _ = m.hello(identity=b"a", body=hello(name="w1"), peer_address="10.0.0.5", now=0.1, key_name="w1")
    assert node.name == "w1"


def test_with_keys_a_plain_data_plane_is_only_allowed_on_loopback() -> None:
    m = Membership(timing=T, rpc_protocol="7.0.0", package_version="0.1.0", secure=True)
    with pytest.raises(Refusal, match="must be TLS"):
        m.hello(identity=b"a", body=hello(data_plane="plain"), peer_address="10.0.0.5", now=0.0)
    node, _ = m.hello(identity=b"b", body=hello(name="w2", data_plane="plain"), peer_address="127.0.0.1", now=0.0)
    assert node.data_plane == "plain"
    node, _ = m.hello(identity=b"c", body=hello(name="w3", data_plane="tls"), peer_address="10.0.0.7", now=0.0)
    assert node.data_plane == "tls"


def test_a_revoked_node_leaves_at_once_and_its_connection_is_ignored() -> None:
    m = fresh()
    m.hello(identity=b"a", body=hello(), peer_address="10.0.0.5", now=0.0)
    m.tick(1.5)
    assert [e.kind for e in m.revoke("w1", now=2.0)] == ["refused"]
    assert "w1" not in m.nodes and m.refused["w1"].reason == "its key was revoked"
    assert m.heartbeat(identity=b"a", body={"rpc_ready": True}, now=2.1) == (None, [])
    assert m.identities() == []


def test_a_worker_built_with_llamafile_is_accepted_with_a_warning() -> None:
    """Its batched kernels differ from its one-token kernels: resumed answers may drift."""
    m = fresh()
    node, events = m.hello(identity=b"a", body=hello(llamafile=True), peer_address="10.0.0.5", now=0.0)
    assert [e.kind for e in events] == ["join", "version_skew"] and "llamafile" in events[1].message
    assert node.versions["llamafile"] == "on"
    _, events = m.hello(identity=b"b", body=hello(name="w2", node_id="id-2", llamafile=False), peer_address="10.0.0.6",
                        now=0.0)
    assert [e.kind for e in events] == ["join"]
