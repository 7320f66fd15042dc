"""Prometheus metrics of one server instance, in its own CollectorRegistry (two apps in a process never mix).

Counters and histograms are updated by the scheduler thread (steps, finished requests) and by the HTTP layer
(requests by status); prometheus_client is thread-safe. Derived values that Prometheus could compute from the
counters (mean acceptance length, acceptance per position) are exported as gauges too, so `curl /metrics` answers
the question directly.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("leapdecode_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("leapdecode_request_finish", "Generations ended, by reason (stop, length, "
                                "cancelled, error)", ["reason"], registry=r)
        self.prompt_tokens = Counter("leapdecode_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.generation_tokens = Counter("leapdecode_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("leapdecode_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("leapdecode_time_per_output_token_seconds", "Mean time per generated token after "
                              "the first, per request", buckets=_TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("leapdecode_request_latency_seconds", "Arrival to last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("leapdecode_requests_running", "Requests holding a batch slot", registry=r)
        self.waiting = Gauge("leapdecode_requests_waiting", "Requests queued for a batch slot", registry=r)
        self.steps = Counter("leapdecode_sequence_steps", "Verification steps, counted per sequence", registry=r)
        self.batch_steps = Counter("leapdecode_batch_steps", "Batched forward passes of the decode loop", registry=r)
        self.batch_size = Histogram("leapdecode_batch_size", "Sequences per decode step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.draft_length = Gauge("leapdecode_draft_length", "Longest draft the scheduler offered a request in "
                                  "the last step (0 = plain decoding)", registry=r)
        self.draft_tokens = Counter("leapdecode_draft_tokens", "Draft tokens proposed", registry=r)
        self.accepted_tokens = Counter("leapdecode_draft_accepted_tokens", "Draft tokens accepted", registry=r)
        self.emitted_tokens = Counter("leapdecode_emitted_tokens", "Tokens emitted by steps (accepted + bonus)",
                                      registry=r)
        self.mean_acceptance_length = Gauge("leapdecode_mean_acceptance_length", "MAT: tokens emitted per sequence "
                                            "step, bonus included (plain decoding: 1)", registry=r)
        self.position_drafted = Counter("leapdecode_draft_position_proposed", "Steps whose draft reached this depth",
                                        ["position"], registry=r)
        self.position_accepted = Counter("leapdecode_draft_position_accepted", "Steps that accepted a token at "
                                         "this depth", ["position"], registry=r)
        self.acceptance_per_position = Gauge("leapdecode_acceptance_per_position", "Share of drafts reaching this "
                                             "depth whose token there was accepted", ["position"], registry=r)
        self.step_load = Gauge("leapdecode_step_cost_load", "How much slower than the start-up calibration plain "
                               "steps of several sequences run now (learned; 1 = as calibrated)", registry=r)
        self.row_load = Gauge("leapdecode_step_cost_row_load", "How much more than the start-up calibration a "
                              "drafted row of a step of several sequences costs now (learned; 1 = as calibrated)",
                              registry=r)
        self._steps = 0
        self._emitted = 0
        self._drafted: list[int] = []  # [d] steps whose draft reached depth d + 1
        self._accepted: list[int] = []  # [d] steps that accepted depth d + 1

    def bind(self, scheduler) -> None:
        """Read the queue gauges from the scheduler at scrape time."""
        self.running.set_function(lambda: scheduler.running_count)
        self.waiting.set_function(lambda: scheduler.waiting_count)
        self.step_load.set_function(lambda: scheduler.cost.load if scheduler.cost is not None else 1.0)
        self.row_load.set_function(lambda: scheduler.cost.row_load if scheduler.cost is not None else 1.0)

    # --------------------------------------------------------------------------------- from the scheduler thread

    def on_batch(self, size: int, draft_length: int) -> None:
        self.batch_steps.inc()
        self.batch_size.observe(size)
        self.draft_length.set(draft_length)

    def on_step(self, drafted_depth: int, draft_nodes: int, accepted: int, emitted: int) -> None:
        self.steps.inc()
        self.draft_tokens.inc(draft_nodes)
        self.accepted_tokens.inc(accepted)
        self.emitted_tokens.inc(emitted)
        self._steps += 1
        self._emitted += 1 + accepted  # what the step produced; a stop or EOS may cut what reaches the client
        self.mean_acceptance_length.set(self._emitted / self._steps)
        for d in range(drafted_depth):
            if d == len(self._drafted):
                self._drafted.append(0)
                self._accepted.append(0)
            self._drafted[d] += 1
            self.position_drafted.labels(str(d + 1)).inc()
            if d < accepted:
                self._accepted[d] += 1
                self.position_accepted.labels(str(d + 1)).inc()
            self.acceptance_per_position.labels(str(d + 1)).set(self._accepted[d] / self._drafted[d])

    def on_finish(self, seq, result) -> None:
        self.finished.labels(result.finish_reason).inc()
        self.prompt_tokens.inc(len(seq.prompt))
        self.generation_tokens.inc(seq.stats.new_tokens)
        if result.finish_reason == "cancelled":
            return
        if result.ttft:
            self.ttft.observe(result.ttft)
        self.latency.observe(result.latency)
        if seq.stats.new_tokens > 1:
            self.tpot.observe((result.latency - result.ttft) / (seq.stats.new_tokens - 1))

    def on_failed(self) -> None:
        self.finished.labels("error").inc()

    # ------------------------------------------------------------------------------------- from the HTTP layer

    def on_response(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
