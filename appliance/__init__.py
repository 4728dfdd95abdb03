"""Anyway: an edge-cluster appliance that splits one LLM across spare machines.

The package holds every process of the appliance: the worker agent, the head's
supervisor (membership, planner, reconciler, engine manager, HTTP API) and the CLI.
"""

__version__ = "0.1.0"
