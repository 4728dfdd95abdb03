"""The pure core: planner, reconciler, membership, model profile, crash-loop guard.

No I/O, no sockets, no asyncio, no processes: every function takes what it needs
(including `now`) and returns a value, so the decisions that keep the cluster stable
are tested by tables and properties without a cluster. Enforced by the import contract
in pyproject.toml (`lint-imports`, run by `make test`).
"""
