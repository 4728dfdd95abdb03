"""The engine process (`python -m appliance.engine`, started by the head): the model over
the workers' RPC servers, one llama.cpp context, continuous batching."""
