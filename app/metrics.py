"""Prometheus metrics, on a registry of their own so that each app instance has a clean set.

The names are an interface: deploy/grafana and deploy/prometheus query them, and a test
checks that every name they use is exposed.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
FAILURE_REASONS = (
    "validation",
    "overloaded",
    "timeout",
    "cancelled",
    "error",
    "unauthorized",
    "not_ready",
    "too_large",
)


class Metrics:
    def __init__(self, k: int = 1) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mtp_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.failures = Counter("mtp_request_failures", "Failed or dropped requests by reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("mtp_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("mtp_generated_tokens", "Tokens generated", registry=r)
        self.request_duration = Histogram(
            "mtp_request_duration_seconds", "Request duration", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "mtp_queue_time_seconds",
            "Time from submission to the first forward pass",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "mtp_time_to_first_token_seconds", "Time to first generated token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "mtp_inter_token_latency_seconds", "Time between generated tokens", buckets=FAST_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "mtp_batch_size", "Rows per forward pass", ["kind"], buckets=BATCH_BUCKETS, registry=r
        )
        self.forward_duration = Histogram(
            "mtp_forward_duration_seconds", "Forward pass duration", ["kind"], buckets=FAST_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("mtp_queue_depth", "Requests waiting for the worker", registry=r)
        self.running = Gauge("mtp_running_sequences", "Sequences in the decode batch", registry=r)
        self.ready = Gauge("mtp_ready", "1 when the model is loaded, warm and accepting work", registry=r)
        self.spec_steps = Counter("mtp_spec_steps", "Verify passes that carried drafts (per sequence)", registry=r)
        self.spec_drafted = Counter("mtp_spec_drafted_tokens", "Draft tokens verified", registry=r)
        self.spec_accepted = Counter("mtp_spec_accepted_tokens", "Draft tokens accepted", registry=r)
        self.spec_accepted_by_head = Counter(
            "mtp_spec_accepted_by_head",
            "Drafts accepted from each drafting head (head 2 drafts the token after the next)",
            ["head"],
            registry=r,
        )
        self.drafts_per_pass = Gauge(
            "mtp_spec_drafts_per_pass",
            "Drafts each row verified in the last decode step (the draft policy's choice)",
            registry=r,
        )
        self.spec_accepted_length = Histogram(
            "mtp_spec_accepted_length",
            "Tokens emitted per verify pass",
            buckets=tuple(range(1, k + 1)) or (1,),
            registry=r,
        )
        for reason in FAILURE_REASONS:  # expose every reason at 0 so rate() works from the start
            self.failures.labels(reason)
        for head in range(2, k + 1):
            self.spec_accepted_by_head.labels(str(head))
        for kind in ("predict", "prefill", "decode"):
            self.batch_size.labels(kind)
            self.forward_duration.labels(kind)
