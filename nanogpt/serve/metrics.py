"""The server's counters and histograms, written as Prometheus' text format for GET /metrics (names as
vLLM's, prefixed nanogpt_). The decoding thread observes tokens and batches; the HTTP side counts
requests; one lock keeps them consistent."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    """Counts of observations at most each bucket's upper bound, their sum and count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts, strict=True):
            total += count
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return [*out, f"{name}_sum {self.sum}", f"{name}_count {total}"]


class Metrics:
    """What GET /metrics reports; every method is safe to call from any thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, HTTP status) -> requests
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1

    def count_prompt(self, tokens: int) -> None:
        """Prompt tokens of a request that was queued (once per completion)."""
        with self.lock:
            self.prompt_tokens += tokens

    def observe_token(self, seconds: float, first: bool) -> None:
        """A generated token, `seconds` after the request arrived (first) or after the previous token."""
        with self.lock:
            self.generation_tokens += 1
            (self.ttft if first else self.itl).observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self.lock:
            self.batch.observe(size)

    def text(self, running: int, waiting: int) -> str:
        """Prometheus' text exposition format (version 0.0.4)."""
        p = "nanogpt_"
        with self.lock:
            requests = [
                f'{p}requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())
            ]
            table = [
                ("requests_total", "counter", "Requests answered, by endpoint and HTTP status.", requests),
                ("prompt_tokens_total", "counter", "Prompt tokens read.", self.prompt_tokens),
                ("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
                ("num_requests_running", "gauge", "Completions decoding now.", running),
                ("num_requests_waiting", "gauge", "Completions waiting for a row.", waiting),
                ("batch_size", "histogram", "Completions per decoding step.", self.batch),
                (
                    "time_to_first_token_seconds",
                    "histogram",
                    "From a request's arrival to its first token.",
                    self.ttft,
                ),
                ("inter_token_latency_seconds", "histogram", "Between a completion's tokens.", self.itl),
            ]
            out = []
            for name, kind, about, value in table:
                if isinstance(value, Histogram):
                    value = value.lines(p + name)
                lines = value if isinstance(value, list) else [f"{p}{name} {value}"]
                out += [f"# HELP {p}{name} {about}", f"# TYPE {p}{name} {kind}", *lines]
        return "\n".join(out) + "\n"
