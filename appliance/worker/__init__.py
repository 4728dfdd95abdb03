"""The worker process (`anyway worker`): the agent that joins the head, and the ggml RPC
server child it supervises."""
