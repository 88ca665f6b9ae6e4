"""Counters for GET /metrics, in Prometheus' text format (version 0.0.4)."""

from __future__ import annotations

import threading
from collections import Counter

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.finished: Counter[str] = Counter()
        self._ttft_counts = [0] * len(TTFT_BUCKETS)
        self._ttft_sum = 0.0
        self._ttft_n = 0

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def finished_request(self, request) -> None:
        with self._lock:
            self.prompt_tokens += len(request.prompt_ids)
            self.generated_tokens += len(request.token_ids)
            self.finished[request.finish_reason] += 1

    def time_to_first_token(self, seconds: float) -> None:
        with self._lock:
            self._ttft_sum += seconds
            self._ttft_n += 1
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self._ttft_counts[i] += 1

    def render(self, waiting: int, running: int, cache_usage: float) -> str:
        with self._lock:
            lines = [
                "# HELP scratchlm_requests_total HTTP requests by route and status code.",
                "# TYPE scratchlm_requests_total counter",
            ]
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'scratchlm_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += [
                "# HELP scratchlm_generations_total Finished generations by finish reason.",
                "# TYPE scratchlm_generations_total counter",
            ]
            for reason, n in sorted(self.finished.items()):
                lines.append(f'scratchlm_generations_total{{finish_reason="{reason}"}} {n}')
            lines += _gauge("scratchlm_prompt_tokens_total", "Prompt tokens.", self.prompt_tokens)
            lines[-2] = lines[-2].replace("gauge", "counter")
            lines += _gauge(
                "scratchlm_generated_tokens_total", "Generated tokens.", self.generated_tokens
            )
            lines[-2] = lines[-2].replace("gauge", "counter")
            lines += _gauge("scratchlm_queue_length", "Requests waiting for the batch.", waiting)
            lines += _gauge("scratchlm_running_requests", "Requests in the running batch.", running)
            lines += _gauge(
                "scratchlm_kv_cache_usage", "Share of KV cache blocks in use.", cache_usage
            )
            lines += [
                "# HELP scratchlm_time_to_first_token_seconds From arrival to the first token.",
                "# TYPE scratchlm_time_to_first_token_seconds histogram",
            ]
            for bound, n in zip(TTFT_BUCKETS, self._ttft_counts, strict=True):
                lines.append(f'scratchlm_time_to_first_token_seconds_bucket{{le="{bound}"}} {n}')
            lines += [
                f'scratchlm_time_to_first_token_seconds_bucket{{le="+Inf"}} {self._ttft_n}',
                f"scratchlm_time_to_first_token_seconds_sum {self._ttft_sum}",
                f"scratchlm_time_to_first_token_seconds_count {self._ttft_n}",
            ]
        return "\n".join(lines) + "\n"


def _gauge(name: str, help_text: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
