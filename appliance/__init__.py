"""Anyway: an edge-cluster appliance that splits one LLM across spare machines.

A package per process, plus a pure core and shared pieces:

    appliance.core     planner, reconciler, membership, profile: pure decisions, no I/O
    appliance.common   settings, logs, protocols, keys, ggml bindings, status contract
    appliance.head     `anyway head`: supervisor, control plane, engine manager, API
    appliance.engine   the engine process the head starts (the model, batching)
    appliance.worker   `anyway worker`: the agent and its ggml RPC server child
    appliance.cli      the `anyway` command line and `anyway up`'s local cluster
"""

__version__ = "0.1.0"
