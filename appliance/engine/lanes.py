"""Lanes: several engines over one set of weights, so concurrent requests keep every worker busy.

A layer split is a pipeline, but one llama.cpp context drives it like a relay with one
baton: each decode step goes through worker 1, then worker 2, ..., and each box computes
1/N of the time. ggml's pipeline parallelism does not help here: llama.cpp synchronizes
before reusing a decode graph, and a decode step of several sequences is one micro-batch.
So the engine runs K *lanes*: K llama.cpp contexts on the same loaded model (the weights
are on the workers once; each lane has its own KV cache and compute buffers), each lane
with its own requests and its own thread. While lane A's step is on worker 2, lane B's is
on worker 1: the workers overlap. `llama_decode` releases the GIL, so the threads really
run at once. A sequence is computed the same way in any lane: outputs are unchanged.

ggml's RPC client keeps one connection per worker for the whole process, and a single
dispatcher thread per connection sends the commands of every context in the order they
were queued (so lanes interleave on the wire safely). But it also remembers, per device,
the last graph computed there, to send only "compute it again" when the same graph comes
back; that check and the send are not one atomic step, so two lanes could each decide
from the other's memory. With more than one lane, llama.cpp's graph reuse is turned off
(LLAMA_GRAPH_REUSE_DISABLE): every step builds a graph with a fresh id and sends it whole.
The memory the lanes take is planned: each lane's compute buffers on every node
(planner.compute_reserve_bytes(lanes=...)); the KV cache is the same in total, split.

Threads: each lane's thread only computes; the process's main thread alone talks to the
head's socket, collecting what the lanes produce from one thread-safe queue.

Speculative decoding (appliance.engine.drafting) happens inside each lane's `Engine`: its
drafts are checked in that lane's own step, its one `llama_decode`. A draft model is a
llama.cpp context on the head, and a context is not safe to use from two threads, so each
lane has its own `DraftModel` (its own context, KV cache and batch) over draft weights
loaded once per process (`DraftWeights`, read-only, shared like the target's weights). The
draft counters in the heartbeat are the sum over the lanes (`stats`).
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from appliance.common import engine_protocol as ep
from appliance.engine.engine import Engine


@dataclass
class Lane:
    engine: Engine
    inbox: "queue.SimpleQueue[ep.Submit | ep.Cancel | None]" = field(default_factory=queue.SimpleQueue)
    thread: threading.Thread | None = None
    load: int = 0  # sequences it holds or waits for (kept by the main thread)


class Lanes:
    """K engines, one thread each; the main thread submits and collects."""

    IDLE_WAIT_S = 0.05

    def __init__(self, engines: list[Engine]) -> None:
        self.outbox: "queue.SimpleQueue[ep.Message]" = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe()  # the main thread polls this beside its socket
        os.set_blocking(self.wake_r, False)
        self.lanes = [Lane(engine=e) for e in engines]
        for lane in self.lanes:
            lane.engine.send = self._post  # lanes never touch the socket
        self.where: dict[str, Lane] = {}
        self.failure: BaseException | None = None

    def start(self) -> None:
        for i, lane in enumerate(self.lanes):
            lane.thread = threading.Thread(target=self._run, args=(lane,), name=f"lane-{i}", daemon=True)
            lane.thread.start()

    def _run(self, lane: Lane) -> None:
        eng = lane.engine
        try:
            while True:
                try:
                    msg = lane.inbox.get(timeout=0 if eng.busy else self.IDLE_WAIT_S)
                except queue.Empty:
                    msg = None
                else:
                    if msg is None:
                        return
                    if isinstance(msg, ep.Submit):
                        eng.submit(msg)
                    else:
                        eng.cancel(msg.id)
                    continue  # take every waiting message before the next step
                if eng.busy:
                    eng.step()
        except BaseException as exc:  # a lane that dies takes the process down (the head restarts it)
            self.failure = exc
            self._post(ep.Failed(error=f"lane {threading.current_thread().name} failed: {exc}"))

    def _post(self, msg: ep.Message) -> None:
        self.outbox.put(msg)
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def submit(self, msg: ep.Submit) -> None:
        lane = min(self.lanes, key=lambda x: x.load)
        lane.load += 1
        self.where[msg.id] = lane
        lane.inbox.put(msg)

    def cancel(self, rid: str) -> None:
        lane = self.where.get(rid)
        if lane is not None:
            lane.inbox.put(ep.Cancel(id=rid))

    def finished(self, rid: str) -> None:
        """The main thread saw the request end (done, error): its lane has room again."""
        lane = self.where.pop(rid, None)
        if lane is not None:
            lane.load -= 1

    def drain(self) -> list[ep.Message]:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while True:
            try:
                out.append(self.outbox.get_nowait())
            except queue.Empty:
                return out

    @property
    def busy(self) -> bool:
        return bool(self.where)

    def stats(self) -> dict[str, int]:
        engines = [lane.engine for lane in self.lanes]
        return {
            "active": sum(len(e.active) for e in engines),
            "queued": sum(len(e.queue) for e in engines),
            "steps": sum(e.steps for e in engines),
            "tokens": sum(e.tokens_out for e in engines),
            "prefilled": sum(e.prefilled for e in engines),
            "decodes": sum(e.decodes for e in engines),
            "drafted": sum(e.drafted for e in engines),  # speculative decoding, every lane's drafts
            "accepted": sum(e.accepted for e in engines),
        }

    def stop(self) -> None:
        for lane in self.lanes:
            lane.inbox.put(None)


def lane_batches(max_batch: int, lanes: int) -> list[int]:
    """How many sequences each lane holds: `max_batch` spread over `lanes`, each at least 1."""
    lanes = max(1, min(lanes, max_batch))
    base, extra = divmod(max_batch, lanes)
    return [base + (1 if i < extra else 0) for i in range(lanes)]

