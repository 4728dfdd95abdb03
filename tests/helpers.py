"""Test helpers: a small model derived from the demo model, polling with a deadline, and
what tests ask a running cluster (its model id, its engine process)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gguf
import httpx
import numpy as np
import psutil

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """`wait_until` gave up: a test failure (AssertionError) that is also a TimeoutError."""


def wait_until(predicate: Callable[[], T], *, timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Call `predicate()` every `interval_s` until it returns something truthy, and return that.

    It is always called at least once, and once more at the deadline. After `timeout_s`
    raises WaitTimeout (an AssertionError and a TimeoutError) naming `what` and the last
    value seen. Exceptions from `predicate` propagate: a predicate that can fail for a
    while (a server still starting) catches its own errors and returns a falsy value.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        last = predicate()
        if last:
            return last
        left = deadline - time.monotonic()
        if left <= 0:
            seen = repr(last)
            if len(seen) > 2000:
                seen = seen[:2000] + "..."
            raise WaitTimeout(f"timed out after {timeout_s:g}s waiting for {what}; last value: {seen}")
        time.sleep(min(interval_s, left))


def derive_model(src: Path, dst: Path, *, n_layers: int) -> Path:
    """Write a copy of `src` keeping only its first `n_layers` blocks (same tokenizer)."""
    if dst.exists():
        return dst
    reader = gguf.GGUFReader(str(src), "r")
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_suffix(".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == f"{arch}.block_count":
            value = n_layers
        if field.name == "general.name":
            value = f"{value} ({n_layers} layers, test)"
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    keep = []
    for t in reader.tensors:
        if t.name.startswith("blk."):
            if int(t.name.split(".")[1]) >= n_layers:
                continue
        keep.append(t)
    for t in keep:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in keep:
        writer.write_tensor_data(np.asarray(t.data), tensor_endianess=reader.endianess)
    writer.close()
    os.replace(tmp, dst)
    return dst


def served_model(url: str) -> str:
    """The model id a head at `url` serves."""
    return str(httpx.get(f"{url}/v1/models").json()["data"][0]["id"])


def engine_pid(cluster: Any) -> int:
    """The pid of the engine process of a running `LocalCluster`'s head."""
    head = psutil.Process(cluster.procs["head"].pid)
    engines = [p for p in head.children() if "appliance.engine" in " ".join(p.cmdline())]
    assert len(engines) == 1
    return engines[0].pid


def derive_vocab_model(src: Path, dst: Path, *, n_vocab: int) -> Path:
    """Write a copy of `src` whose vocabulary is cut to its first `n_vocab` tokens (the token
    embedding and output rows cut with it): a loadable model with another vocabulary."""
    if dst.exists():
        return dst
    reader = gguf.GGUFReader(str(src), "r")
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_suffix(".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    cut = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"}
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name in cut:
            value = value[:n_vocab]
        if field.name == "general.name":
            value = f"{value} ({n_vocab} tokens, test)"
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    tensors = []
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name in ("token_embd.weight", "output.weight"):
            data = data[:n_vocab]
        tensors.append((t, data))
    for t, data in tensors:
        shape = data.shape if t.name in ("token_embd.weight", "output.weight") else t.data.shape
        writer.add_tensor_info(t.name, shape, data.dtype, data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data in tensors:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    os.replace(tmp, dst)
    return dst


def node_dealer(cluster, name: str):  # type: ignore[no-untyped-def]
    """A ZeroMQ DEALER to `cluster`'s control plane holding node `name`'s own key (issued on
    first use, like `anyway keys add`): an authenticated peer that may only speak as `name`."""
    import zmq

    from appliance.common.keys import NODES_DIR, load_worker_keys

    issued = (cluster.keys / NODES_DIR / f"{name}.key").exists()
    keys = load_worker_keys(cluster.node_keys(name))
    if not issued and "head" in cluster.logs:  # a running head takes new keys on its next allow-list check
        wait_until(lambda: f"added={name}" in cluster.logs["head"].read_text(), timeout_s=10,
                   what=f"the head to add {name}'s key to its allow-list")
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.curve_secretkey, s.curve_publickey, s.curve_serverkey = keys.secret, keys.public, keys.server_public
    s.setsockopt(zmq.LINGER, 5_000)  # close() waits until what was queued is sent
    s.setsockopt(zmq.RCVTIMEO, 10_000)
    s.connect(cluster.control)
    return s


# Texts speculative decoding is tested on (tests/test_speculative*.py): input-grounded tasks copy them.
ARTICLE = (
    "The town council met on Tuesday evening to review the budget for the new library on Mill Street. "
    "After a long discussion, the members agreed to fund a children's reading room, a computer lab with "
    "twelve machines and longer opening hours on Saturdays and Sundays. The mayor, Ruth Okafor, said the "
    "library would open in March next year and that the old building would become a community centre."
)
CODE = (
    "def total(items):\n    result = 0\n    for item in items:\n        result = result + item.price * item.count\n"
    "    return result\n"
)
