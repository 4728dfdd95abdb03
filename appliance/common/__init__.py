"""Pieces every process shares: timing settings, logs, the wire protocols, keys, the ggml
bindings, process helpers, model files, and the typed status contract."""
