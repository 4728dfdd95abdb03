"""What each worker pre-stages, computed purely from the plan and the model's tensor table."""

from __future__ import annotations

from appliance.core.planner import GIB, MIB, NodeCapacity, make_plan, replan_without
from appliance.core.profile import ModelProfile
from appliance.core.staging import HASH_THRESHOLD_BYTES, ModelTensors, TensorInfo, failovers, staged_failovers, staging

N = 6
BIG, SMALL = 12 * MIB, 1 * MIB


def model() -> tuple[ModelProfile, ModelTensors]:
    table = [TensorInfo(name="token_embd.weight", offset=0, size=BIG, hash="e" * 16)]
    for i in range(N):
        table += [
            TensorInfo(name=f"blk.{i}.ffn_up.weight", offset=0, size=BIG, hash=f"{i:016x}"),
            TensorInfo(name=f"blk.{i}.attn_norm.weight", offset=0, size=SMALL),
        ]
    table += [TensorInfo(name="output_norm.weight", offset=0, size=SMALL)]  # tied: token_embd is the output
    prof = ModelProfile(path="m", file_bytes=1, architecture="llama", name="m", n_layers=N,
                        layer_bytes=(BIG + SMALL,) * N, input_bytes=BIG, output_bytes=BIG + SMALL,
                        kv_bytes_per_token_per_layer=1024, context_length=4096, embedding_length=1024,
                        vocab_size=32000, has_chat_template=False)
    return prof, ModelTensors.from_table(table, n_layers=N)


NODES = [NodeCapacity(name=f"w{i}", free_bytes=4 * GIB, endpoint=f"10.0.0.{i}:1") for i in (1, 2, 3)]


def setup():  # type: ignore[no-untyped-def]
    prof, tensors = model()
    plan = make_plan(nodes=NODES, profile=prof, n_ctx=2048)
    after = {a.node: replan_without(plan, nodes=[n for n in NODES if n.name != a.node], profile=prof, n_ctx=2048)
             for a in plan.rpc_assignments}
    return plan, tensors, failovers(plan, tensors=tensors, failover_plans=after)


def test_each_loss_moves_exactly_the_lost_nodes_tensors() -> None:
    plan, tensors, fo = setup()
    for a in plan.rpc_assignments:
        own = {t.name for t in tensors.of(a.start, a.end, output=plan.output_node == a.node)}
        moved = {t.name for ts in fo[a.node].receivers.values() for t in ts}
        assert fo[a.node].possible and moved == own
        assert fo[a.node].cacheable_bytes == sum(
            t.size for t in tensors.of(a.start, a.end, output=plan.output_node == a.node) if t.size > HASH_THRESHOLD_BYTES)


def test_the_output_node_s_loss_moves_the_tied_embeddings_to_the_new_last_node() -> None:
    plan, tensors, fo = setup()
    last = fo[plan.output_node]
    receivers = {n for n, ts in last.receivers.items() if any(t.name == "token_embd.weight" for t in ts)}
    assert receivers == {plan.rpc_assignments[-2].node}


def test_workers_keep_their_own_and_stage_what_they_would_take_over() -> None:
    plan, tensors, fo = setup()
    lists = staging(plan, tensors=tensors, failover=fo)
    for a in plan.rpc_assignments:
        assert all(t.size > HASH_THRESHOLD_BYTES for t in (*lists[a.node].need, *lists[a.node].want))
        assert not {t.hash for t in lists[a.node].need} & {t.hash for t in lists[a.node].want}
    middle = plan.rpc_assignments[1].node
    assert lists[middle].want  # the middle node takes over from both neighbours


def test_a_failover_is_staged_only_when_every_receiver_has_every_tensor() -> None:
    plan, tensors, fo = setup()
    lists = staging(plan, tensors=tensors, failover=fo)
    none_missing = {n: [] for n in lists}
    assert all(staged_failovers(fo, none_missing).values())
    first = plan.rpc_assignments[0].node
    receiver = next(iter(fo[first].receivers))
    lacking = {**none_missing, receiver: [fo[first].receivers[receiver][0].hash]}
    assert staged_failovers(fo, lacking)[first] is False
    assert staged_failovers(fo, {})[first] is False  # nothing reported yet: not staged
