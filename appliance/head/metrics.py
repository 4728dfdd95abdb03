"""The head's Prometheus metrics (`GET /metrics`): one registry per head, named in one place."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.nodes = Gauge("anyway_nodes", "Nodes by state", ["state"], registry=r)
        self.replans = Counter("anyway_replans_total", "Re-plans (layout changes loaded)", registry=r)
        self.engine_starts = Counter("anyway_engine_starts_total", "Engine process starts", registry=r)
        self.engine_crashes = Counter("anyway_engine_crashes_total", "Engine processes lost unexpectedly", registry=r)
        self.engine_state = Gauge("anyway_engine_state", "1 for the engine's current state", ["state"], registry=r)
        self.recovery = Histogram(
            "anyway_recovery_seconds",
            "From losing a serving engine to serving again",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
            registry=r,
        )
        self.tokens = Counter("anyway_tokens_generated_total", "Tokens sent to clients", registry=r)
        self.prompt_tokens = Counter("anyway_prompt_tokens_total", "Prompt tokens received", registry=r)
        self.requests = Counter("anyway_requests_total", "HTTP API requests", ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("anyway_requests_in_flight", "Generation requests in flight", registry=r)
        self.ttft = Histogram(
            "anyway_time_to_first_token_seconds",
            "Time to first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.bad_frames = Counter("anyway_control_bad_frames_total", "Malformed control messages dropped", registry=r)
        self.resumed = Counter("anyway_requests_resumed_total", "Requests resumed on a new engine", registry=r)
        self.abandoned = Counter(
            "anyway_requests_abandoned_total", "Requests whose client left before the answer (decoding stopped)", registry=r
        )
        self.drafted = Counter(
            "anyway_draft_tokens_total", "Drafted tokens checked by the model (speculative decoding)", registry=r
        )
        self.accepted = Counter(
            "anyway_draft_tokens_accepted_total", "Drafted tokens the model accepted (each saved a decode pass)",
            registry=r,
        )
        self.acceptance = Gauge(
            "anyway_draft_acceptance_ratio", "Accepted / drafted tokens since the head started", registry=r
        )
        self.worker_busy = Gauge(
            "anyway_worker_busy_ratio",
            "Fraction of wall time each worker's RPC server computed (last heartbeat interval)",
            ["node"],
            registry=r,
        )
        self.task_restarts = Counter(
            "anyway_head_task_restarts_total", "Head tasks restarted after an unexpected error", ["task"], registry=r
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)
