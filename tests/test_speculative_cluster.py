"""Speculative decoding on a real cluster: the text is the one-process text, with and without
drafts, alone and batched, and across a worker killed mid-stream.

Real clusters of the demo model (a head and `anyway worker`s with their ggml RPC servers on
loopback). One cluster drafts from the prompt, one with a draft model (the demo model's
first 8 layers: the same vocabulary) that only requests asking for it use (`--speculative
off` as the server default, `speculative: true` in the body). Both run with `--draft-min`,
so every step that has drafts checks them: on this 2-core machine a pass costs almost as
much per token as it saves, the adaptive length would choose few drafts, and drafts that
are never checked prove nothing. Each greedy answer is compared with the same model in one
plain llama-cpp-python process (`reference`), and the draft counters must move in the
usage of the answer, `/metrics` and `/v1/cluster`. A draft model with another vocabulary
is refused when the head starts.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ARTICLE, CODE, derive_vocab_model, served_model
from openai import OpenAI

from appliance.cli.up import LocalCluster

pytestmark = pytest.mark.slow

REPEAT = [{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{ARTICLE}"}]
EDIT = [{"role": "user", "content": f"Rename the function to compute_total and keep everything else:\n\n{CODE}"}]
STORY = [{"role": "user", "content": "Tell me a story about a fox."}]
N_TOKENS = 120
KILL_AFTER_CHUNKS = 30


@pytest.fixture(scope="module")
def prompt_cluster(make_module_cluster: Any, demo_model: Path) -> LocalCluster:
    c = make_module_cluster(demo_model, workers=3, head_args=["--draft-min", "4"])
    c.wait_serving(nodes=3)
    return c


@pytest.fixture(scope="module")
def model_cluster(make_module_cluster: Any, demo_model: Path, tiny_model: Path) -> LocalCluster:
    c = make_module_cluster(demo_model, workers=2, head_args=[
        "--draft-model", str(tiny_model), "--draft-max", "4", "--draft-min", "3", "--speculative", "off"])
    c.wait_serving(nodes=2)
    return c


@pytest.fixture(scope="module")
def expected(reference: Any, demo_model: Path) -> dict[str, str]:
    return {name: reference.chat(demo_model, msgs, N_TOKENS)[0]
            for name, msgs in (("repeat", REPEAT), ("edit", EDIT), ("story", STORY))}


def client(c: LocalCluster) -> OpenAI:
    return OpenAI(base_url=f"{c.url}/v1", api_key="x", max_retries=0, timeout=300)


def answer(c: LocalCluster, messages: list[dict[str, str]], **extra: Any) -> tuple[str, Any]:
    r = client(c).chat.completions.create(model=served_model(c.url), messages=messages,  # type: ignore[arg-type]
                                          max_tokens=N_TOKENS, temperature=0, extra_body=extra or None)
    return r.choices[0].message.content or "", r.usage


def stream(c: LocalCluster, messages: list[dict[str, str]], *, fault: Any = None, **extra: Any) -> str:
    s = client(c).chat.completions.create(model=served_model(c.url), messages=messages,  # type: ignore[arg-type]
                                          max_tokens=N_TOKENS, temperature=0, stream=True, extra_body=extra or None)
    parts = []
    for i, chunk in enumerate(s):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if fault is not None and i == KILL_AFTER_CHUNKS:
            fault()
    return "".join(parts)


def drafts(usage: Any) -> tuple[int, int]:
    """(accepted, rejected) drafted tokens of an answer, from OpenAI's usage fields."""
    d = usage.completion_tokens_details
    return (0, 0) if d is None else (d.accepted_prediction_tokens, d.rejected_prediction_tokens)


def metric(c: LocalCluster, name: str) -> float:
    for line in httpx.get(f"{c.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# ------------------------------------------------------------ prompt drafts
def test_prompt_drafts_write_the_one_process_text(prompt_cluster: LocalCluster, expected: dict[str, str]) -> None:
    text, usage = answer(prompt_cluster, REPEAT)
    assert text == expected["repeat"]
    accepted, rejected = drafts(usage)
    assert accepted > 0, usage  # drafts were checked, and some were right
    text, usage = answer(prompt_cluster, EDIT)
    assert text == expected["edit"]
    off, usage = answer(prompt_cluster, REPEAT, speculative=False)
    assert off == expected["repeat"] and drafts(usage) == (0, 0)


def test_prompt_drafts_batched_each_writes_its_own_text(prompt_cluster: LocalCluster, expected: dict[str, str]) -> None:
    jobs = [(REPEAT, {}), (EDIT, {}), (STORY, {"speculative": False}), (REPEAT, {"speculative": False})]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda j: stream(prompt_cluster, j[0], **j[1]), jobs))
    assert texts == [expected["repeat"], expected["edit"], expected["story"], expected["repeat"]]


def test_the_draft_counters_move(prompt_cluster: LocalCluster) -> None:
    drafted0 = metric(prompt_cluster, "anyway_draft_tokens_total")
    accepted0 = metric(prompt_cluster, "anyway_draft_tokens_accepted_total")
    _, usage = answer(prompt_cluster, EDIT)
    accepted, rejected = drafts(usage)
    assert accepted + rejected > 0

    def counted(s: dict[str, Any]) -> bool:  # the engine's heartbeat carries its counters to the head
        return s["engine"]["speculation"]["drafted"] >= drafted0 + accepted + rejected

    state = prompt_cluster.wait(counted, timeout_s=10, what="the drafts counted at the head")
    spec = state["engine"]["speculation"]
    assert spec["mode"] == "prompt" and spec["default"] is True and spec["draft_max"] == 8
    assert 0 < spec["acceptance"] <= 1 and spec["accepted"] <= spec["drafted"]
    assert state["engine"]["stats"]["drafted"] > 0
    assert metric(prompt_cluster, "anyway_draft_tokens_total") >= drafted0 + accepted + rejected
    assert metric(prompt_cluster, "anyway_draft_tokens_accepted_total") >= accepted0 + accepted
    assert 0 < metric(prompt_cluster, "anyway_draft_acceptance_ratio") <= 1
    status = subprocess.run([sys.executable, "-m", "appliance", "status", "--url", prompt_cluster.url],
                            capture_output=True, text=True, timeout=30)
    assert "drafts:  from the prompt" in status.stdout


def test_a_bad_speculative_value_is_a_400_naming_it(prompt_cluster: LocalCluster) -> None:
    r = httpx.post(f"{prompt_cluster.url}/v1/chat/completions", json={
        "model": served_model(prompt_cluster.url), "messages": STORY, "speculative": "yes"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "speculative"


def test_prompt_drafts_across_a_worker_killed_mid_stream(prompt_cluster: LocalCluster, expected: dict[str, str]) -> None:
    gen = prompt_cluster.cluster_state()["engine"]["generation"]
    text = stream(prompt_cluster, REPEAT, fault=lambda: prompt_cluster.procs["w2"].send_signal(signal.SIGKILL))
    assert text == expected["repeat"]
    state = prompt_cluster.wait(lambda s: s["health"]["status"] == "ok", timeout_s=30, what="serving again")
    assert state["engine"]["generation"] > gen  # the stream really moved to a new engine


# ------------------------------------------------------------ with lanes
def test_prompt_drafts_in_two_lanes_write_the_one_process_text(
    make_cluster: Any, demo_model: Path, expected: dict[str, str]
) -> None:
    """`--lanes 2`: each lane (a thread and a context of its own) checks its own request's
    drafts in its own pass; the heartbeat adds up both lanes' draft counters."""
    c = make_cluster(demo_model, workers=2, head_args=["--lanes", "2", "--max-batch", "2", "--draft-min", "4"])
    c.wait_serving(nodes=2)
    assert c.cluster_state()["engine"]["lanes"] == 2
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda m: answer(c, m), [REPEAT, EDIT]))
    assert [text for text, _ in got] == [expected["repeat"], expected["edit"]]
    counts = [drafts(usage) for _, usage in got]
    assert all(a + r > 0 for a, r in counts), counts  # both lanes checked drafts
    total = sum(a + r for a, r in counts)
    state = c.wait(lambda s: s["engine"]["stats"]["drafted"] >= total, timeout_s=10,
                   what="both lanes' drafts in the engine's heartbeat")
    assert state["engine"]["stats"]["drafted"] == state["engine"]["speculation"]["drafted"] == total


# ------------------------------------------------------------ draft model
def test_a_draft_model_writes_the_one_process_text_alone_and_batched(
    model_cluster: LocalCluster, expected: dict[str, str]
) -> None:
    text, usage = answer(model_cluster, STORY)
    assert text == expected["story"] and drafts(usage) == (0, 0)  # the server's default: no drafts
    text, usage = answer(model_cluster, REPEAT, speculative=True)
    assert text == expected["repeat"]
    assert drafts(usage)[0] > 0
    jobs = [(REPEAT, {"speculative": True}), (STORY, {"speculative": True}), (EDIT, {})]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda j: stream(model_cluster, j[0], **j[1]), jobs))
    assert texts == [expected["repeat"], expected["story"], expected["edit"]]
    spec = model_cluster.cluster_state()["engine"]["speculation"]
    assert spec["mode"] == "model" and spec["default"] is False and spec["draft_model"] == "test-smollm2-8layers.gguf"


def test_a_draft_model_across_a_worker_killed_mid_stream(model_cluster: LocalCluster, expected: dict[str, str]) -> None:
    gen = model_cluster.cluster_state()["engine"]["generation"]
    text = stream(model_cluster, STORY, speculative=True,
                  fault=lambda: model_cluster.procs["w1"].send_signal(signal.SIGKILL))
    assert text == expected["story"]
    state = model_cluster.wait(lambda s: s["health"]["status"] == "ok", timeout_s=30, what="serving again")
    assert state["engine"]["generation"] > gen


def test_a_draft_model_with_another_vocabulary_is_refused(demo_model: Path, tiny_model: Path, tmp_path: Path) -> None:
    other = derive_vocab_model(tiny_model, tmp_path / "other-vocab.gguf", n_vocab=32000)
    r = subprocess.run(
        [sys.executable, "-m", "appliance", "head", "--model", str(demo_model), "--draft-model", str(other),
         "--insecure", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "cannot draft for" in r.stderr and "its vocabulary has 32000 tokens, the model's has 49152" in r.stderr
