"""Timing constants: derived expiries, the `--timing NAME=VALUE` / YAML overrides, and their groups."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from appliance.cli.main import CliError, parse_timing


def timing(interval: float | None = None, over: Any = None):  # type: ignore[no-untyped-def]
    return parse_timing(argparse.Namespace(heartbeat_interval=interval, recovery_timeout=None, timing=over))


@pytest.mark.parametrize(
    "interval, over, check",
    [
        pytest.param(None, None, lambda t: (t.heartbeat.SUSPECT_AFTER_S, t.heartbeat.DEAD_AFTER_S) == (2.0, 5.0), id="defaults"),
        pytest.param(0.2, None, lambda t: abs(t.heartbeat.DEAD_AFTER_S - 2.0) < 1e-9 and t.heartbeat.JOIN_SETTLE_S == 0.4, id="expiry-follows-interval"),
        pytest.param(None, ["DEAD_AFTER_MISSED=6"], lambda t: t.heartbeat.DEAD_AFTER_S == 3.0, id="cli-override-int"),
        pytest.param(None, ["rpc_probe_after_s=0,0.1"], lambda t: t.recovery.RPC_PROBE_AFTER_S == (0.0, 0.1), id="cli-override-tuple"),
        pytest.param(None, {"RETRY_AFTER_S": 2, "FLAP_WINDOW_S": "30"}, lambda t: (t.recovery.RETRY_AFTER_S, t.heartbeat.FLAP_WINDOW_S) == (2, 30.0), id="yaml-mapping"),
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


def test_every_constant_has_a_unit_a_docstring_and_a_unique_name() -> None:
    """Names carry their unit (or say they count), are unique across groups (so `--timing NAME`
    needs no group), and each field is documented in appliance/common/config.py."""
    import ast
    import inspect

    from appliance.common import config

    constants = config.Timing.constants()
    assert len(constants) > 30
    for name in constants:
        assert name.endswith(("_S", "_MISSED", "_WINDOW", "_DEGRADED", "_MESSAGES")) or "PER_WINDOW" in name, name
    src = ast.parse(inspect.getsource(config))
    documented = set()
    for cls in (n for n in src.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for i, stmt in enumerate(body[:-1]):
            nxt = body[i + 1]
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                documented.add(stmt.target.id)  # type: ignore[union-attr]
    assert set(constants) <= documented, sorted(set(constants) - documented)
