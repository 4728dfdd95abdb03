"""Timing constants: derived expiries and the `--timing NAME=VALUE` / YAML overrides."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from appliance.cli import CliError, _timing


def timing(interval: float | None = None, over: Any = None):  # type: ignore[no-untyped-def]
    return _timing(argparse.Namespace(heartbeat_interval=interval, recovery_timeout=None, timing=over))


@pytest.mark.parametrize(
    "interval, over, check",
    [
        pytest.param(None, None, lambda t: (t.SUSPECT_AFTER_S, t.DEAD_AFTER_S) == (2.0, 5.0), id="defaults"),
        pytest.param(0.2, None, lambda t: abs(t.DEAD_AFTER_S - 2.0) < 1e-9 and t.JOIN_SETTLE_S == 0.4, id="expiry-follows-interval"),
        pytest.param(None, ["DEAD_AFTER_MISSED=6"], lambda t: t.DEAD_AFTER_S == 3.0, id="cli-override-int"),
        pytest.param(None, ["rpc_probe_after_s=0,0.1"], lambda t: t.RPC_PROBE_AFTER_S == (0.0, 0.1), id="cli-override-tuple"),
        pytest.param(None, {"RETRY_AFTER_S": 2, "FLAP_WINDOW_S": "30"}, lambda t: (t.RETRY_AFTER_S, t.FLAP_WINDOW_S) == (2, 30.0), id="yaml-mapping"),
    ],
)
def test_timing_overrides(interval: float | None, over: Any, check: Any) -> None:
    assert check(timing(interval, over))


@pytest.mark.parametrize(
    "over, message",
    [
        pytest.param(["NOPE=1"], "unknown constant 'NOPE'", id="unknown"),
        pytest.param(["DEAD_AFTER_MISSED=x"], "expected a positive int", id="not-a-number"),
        pytest.param(["HEARTBEAT_INTERVAL_S=-1"], "expected a positive float", id="negative"),
        pytest.param(["RPC_PROBE_AFTER_S=0,-1"], "expected a positive tuple", id="negative-in-tuple"),
    ],
)
def test_bad_timing_overrides_are_clear_errors(over: Any, message: str) -> None:
    with pytest.raises(CliError, match=message):
        timing(None, over)
