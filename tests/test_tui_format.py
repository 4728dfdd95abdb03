"""The dashboard's style tables against the appliance's vocabulary (appliance.common.kinds).

Every event kind and every state the head can report must have a colour: a kind added
to `EventKind` (or a state to `NodeState`, `EngineState`, `HealthState`) without a
style in tui/format.py fails here, instead of showing up uncoloured on the dashboard.
The event colours must also agree with `EventKind.severity`. Fast and pure: no app,
no head.
"""

from __future__ import annotations

from enum import Enum

import pytest
from rich.style import Style

from appliance.common.kinds import EngineState, EventKind, HealthState, NodeState, Severity
from appliance.common.status import NodeStatus
from tui.format import (
    ENGINE_STATE_STYLE,
    EVENT_KIND_STYLE,
    HEALTH_STYLE,
    NODE_STATE_STYLE,
    fmt_age,
    fmt_bytes,
    fmt_layers,
    memory_used_free,
    node_state,
)

TABLES: list[tuple[type[Enum], dict[object, str]]] = [
    (EventKind, dict(EVENT_KIND_STYLE)),
    (NodeState, dict(NODE_STATE_STYLE)),
    (EngineState, dict(ENGINE_STATE_STYLE)),
    (HealthState, dict(HEALTH_STYLE)),
]


@pytest.mark.parametrize(("enum", "table"), TABLES, ids=[e.__name__ for e, _ in TABLES])
def test_every_member_has_a_style_and_nothing_else_does(enum: type[Enum], table: dict[object, str]) -> None:
    members = set(enum)
    assert members - set(table) == set(), f"{enum.__name__} members without a style in tui/format.py"
    assert set(table) - members == set(), f"styles for values {enum.__name__} does not have"
    for member, style in table.items():
        assert isinstance(member, enum)  # keyed by the enum, not by a free string
        assert style.strip(), f"{member!r} has an empty style"
        Style.parse(style)  # a valid rich style


def test_event_colours_follow_severity() -> None:
    """Errors are always red; warnings are yellow or red; an info event is never red."""
    for kind, style in EVENT_KIND_STYLE.items():
        colour = Style.parse(style).color
        name = colour.name if colour is not None else ""
        if kind.severity is Severity.ERROR:
            assert "red" in name, (kind, style)
        elif kind.severity is Severity.WARNING:
            assert "red" in name or "yellow" in name, (kind, style)
        else:
            assert "red" not in name, (kind, style)


def test_formatters_on_the_models() -> None:
    bare = NodeStatus(name="r", state=NodeState.REFUSED)
    assert memory_used_free(bare) == "—"  # no memory reported yet, not "0B/0B"
    assert fmt_layers(bare.layers) == "—"
    assert node_state(bare).plain == "refused" and node_state(bare).style == NODE_STATE_STYLE[NodeState.REFUSED]
    node = NodeStatus.model_validate(
        {"name": "w", "state": "alive", "layers": [0, 14], "memory": {"total_bytes": 4 << 30, "free_bytes": 1 << 30}}
    )
    assert fmt_layers(node.layers) == "0-13" and fmt_layers((5, 6)) == "5"
    assert memory_used_free(node) == "3.0G/1.0G"
    assert fmt_bytes(1536) == "1.5K" and fmt_bytes(None) == "—"
    assert fmt_age(0.25) == "0.2s" and fmt_age(-3) == "0.0s" and fmt_age(None) == "—" and fmt_age(7200) == "2h"
