"""Head ⇄ engine messages: the sampling settings and sampled tokens (with logprobs) round-trip,
and a frame with any field out of range is refused whole (the engine drops it, never crashes)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from appliance.common import engine_protocol as ep


def roundtrip(msg: Any, allowed: dict[str, type]) -> Any:
    return ep.decode(ep.encode(msg), allowed=allowed)


def test_submit_with_every_sampling_field_roundtrips() -> None:
    s = ep.Sampling(
        temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5, frequency_penalty=-0.5,
        repeat_penalty=1.1, logit_bias=((5, -100.0), (7, 2.5)), seed=42, grammar='root ::= "a"', logprobs=3,
    )
    msg = ep.Submit(id="r1", tokens=(1, 2, 3), max_new=8, sampling=s, replay=(4,))
    assert roundtrip(msg, ep.TO_ENGINE) == msg


def test_tokens_with_and_without_logprobs_roundtrip() -> None:
    msg = ep.Tokens(items=(
        ep.Sampled("r1", 5),
        ep.Sampled("r2", 9, ep.Logprob(logprob=-0.25, top=((9, -0.25), (3, -1.5)))),
    ))
    raw = ep.encode(msg)
    assert json.loads(raw)["items"][0] == ["r1", 5]  # no logprob: the compact pair
    assert roundtrip(msg, ep.FROM_ENGINE) == msg


def sampling_frame(**fields: Any) -> bytes:
    return json.dumps({"t": "submit", "id": "r", "tokens": [1], "max_new": 4, "sampling": fields}).encode()


@pytest.mark.parametrize(
    "fields, why",
    [
        pytest.param({"temperature": float("nan")}, "finite", id="nan-temperature"),
        pytest.param({"top_p": 1.5}, "top_p", id="top-p-above-1"),
        pytest.param({"top_k": -1}, "top_k", id="negative-top-k"),
        pytest.param({"min_p": -0.1}, "min_p", id="negative-min-p"),
        pytest.param({"presence_penalty": 3}, "presence_penalty", id="presence-too-high"),
        pytest.param({"repeat_penalty": 0}, "repeat_penalty", id="repeat-zero"),
        pytest.param({"logit_bias": [[5, 101]]}, "logit_bias", id="bias-too-high"),
        pytest.param({"logit_bias": [[-1, 1]]}, "logit_bias", id="bias-negative-token"),
        pytest.param({"logit_bias": {"5": 1}}, "logit_bias", id="bias-not-a-list"),
        pytest.param({"logit_bias": [[5, 1]] * (ep.MAX_LOGIT_BIAS + 1)}, "logit_bias", id="bias-too-many"),
        pytest.param({"seed": 2**32}, "seed", id="seed-too-big"),
        pytest.param({"seed": True}, "seed", id="seed-bool"),
        pytest.param({"grammar": 5}, "grammar", id="grammar-not-string"),
        pytest.param({"grammar": "x" * (ep.MAX_GRAMMAR_CHARS + 1)}, "grammar", id="grammar-too-long"),
        pytest.param({"logprobs": ep.MAX_TOP_LOGPROBS + 1}, "logprobs", id="logprobs-too-many"),
        pytest.param({"logprobs": -1}, "logprobs", id="logprobs-negative"),
    ],
)
def test_bad_sampling_fields_are_refused(fields: dict[str, Any], why: str) -> None:
    with pytest.raises(ep.BadMessage, match=why):
        ep.decode(sampling_frame(**fields), allowed=ep.TO_ENGINE)


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(["r", 1, [0.5, []]], id="positive-logprob"),
        pytest.param(["r", 1, [-0.5, [[2, "x"]]]], id="top-not-a-number"),
        pytest.param(["r", 1, [-0.5]], id="logprob-without-top"),
        pytest.param(["r", -1], id="negative-token"),
        pytest.param(["r", 1, [-0.5, [[2, -1.0]] * (ep.MAX_TOP_LOGPROBS + 1)]], id="too-many-top"),
    ],
)
def test_bad_token_items_are_refused(item: list[Any]) -> None:
    with pytest.raises(ep.BadMessage):
        ep.decode(json.dumps({"t": "tokens", "items": [item]}).encode(), allowed=ep.FROM_ENGINE)
