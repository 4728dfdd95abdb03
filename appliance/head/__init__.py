"""The head process (`anyway head`): supervisor, control plane, engine process manager,
request routing and resume, RPC probes, and the HTTP API."""
