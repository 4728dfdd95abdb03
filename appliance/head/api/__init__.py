"""The head's HTTP API (FastAPI): OpenAI-compatible endpoints and the appliance's own."""
