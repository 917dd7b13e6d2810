"""``/metrics`` in Prometheus' text format: llama-server's names (``llamacpp:...``) where the
meaning is the same, so that its dashboards work, and the engine's own (``llamabind:...``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..engine.core import EngineMetrics
from ..generation.events import DoneEvent


class Stats:
    """Totals over the requests the server answered (updated on the event loop's thread)."""

    def __init__(self) -> None:
        self.prompt_tokens = self.cached_tokens = self.predicted = 0
        self.prompt_s = self.predicted_s = 0.0
        self.n_tokens_max = self.drafted = self.accepted = 0
        self.prefix_hits = 0
        self.finished: Counter[str] = Counter()  # requests by how they ended
        self.responses: Counter[int] = Counter()  # HTTP responses by status

    def record(self, done: DoneEvent) -> None:
        u, t = done.usage, done.timings
        self.prompt_tokens += max(0, u.prompt_tokens - u.cached_tokens)
        self.cached_tokens += u.cached_tokens
        self.prefix_hits += u.cached_tokens > 0
        self.predicted += u.completion_tokens
        self.prompt_s += t.prompt_ms / 1e3
        self.predicted_s += t.generation_ms / 1e3
        self.n_tokens_max = max(self.n_tokens_max, u.prompt_tokens + u.completion_tokens)
        m = done.metrics
        if m is not None:
            self.drafted += m.drafted_tokens
            self.accepted += m.accepted_tokens
        self.finished[done.finish_reason] += 1

    def render(self, em: EngineMetrics, processing: int) -> str:
        """The text a Prometheus scrape reads."""
        out: list[str] = []

        def add(name: str, kind: str, help: str, value: Any, labels: dict[str, Any] | None = None) -> None:
            if not labels:
                out.extend((f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"))
                return
            out.extend((f"# HELP {name} {help}", f"# TYPE {name} {kind}"))
            for k, v in sorted(labels.items()):
                out.append(f'{name}{{{k}}} {v}')

        c, g = "counter", "gauge"
        add("llamacpp:prompt_tokens_total", c, "Number of prompt tokens processed, excluding cached tokens",
            self.prompt_tokens)
        add("llamacpp:prompt_tokens_cached_total", c, "Number of prompt tokens reused from the cache",
            self.cached_tokens)
        add("llamacpp:prompt_seconds_total", c, "Total time spent processing prompts", self.prompt_s)
        add("llamacpp:tokens_predicted_total", c, "Number of generation tokens processed", self.predicted)
        add("llamacpp:tokens_predicted_seconds_total", c, "Total time spent generating tokens", self.predicted_s)
        add("llamacpp:n_decode_total", c, "Total number of llama_decode() calls (engine steps)", em.steps)
        add("llamacpp:n_tokens_max", c, "Largest observed sequence length (prompt + generation)", self.n_tokens_max)
        add("llamacpp:spec_decode_num_draft_tokens_total", c, "Speculative: Total draft tokens generated",
            self.drafted)
        add("llamacpp:spec_decode_num_accepted_tokens_total", c,
            "Speculative: Total draft tokens accepted by the target model", self.accepted)
        add("llamacpp:prompt_tokens_seconds", g, "Average prompt throughput in tokens/s",
            self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0)
        add("llamacpp:predicted_tokens_seconds", g, "Average generation throughput in tokens/s",
            self.predicted / self.predicted_s if self.predicted_s else 0.0)
        add("llamacpp:requests_processing", g, "Number of requests processing", processing)
        add("llamacpp:requests_deferred", g, "Number of requests deferred", em.queued)
        add("llamacpp:n_busy_slots_per_decode", g, "Average number of busy slots per llama_decode() call",
            em.mean_batch)
        add("llamabind:engine_step_seconds_total", c, "Time in engine steps (sampling and decoding)", em.step_s)
        add("llamabind:engine_decode_seconds_total", c, "Time in llama_decode within engine steps", em.decode_s)
        add("llamabind:tokens_decoded_total", c, "Tokens decoded by the engine (prompts and generations)",
            em.tokens_decoded)
        add("llamabind:preempted_total", c, "Requests pre-empted to free KV cells (resumed later)", em.preempted)
        add("llamabind:draft_seconds_total", c, "Time in the draft model's decodes", em.draft_s)
        add("llamabind:kv_tokens", g, "KV cells held by the running sequences", em.kv_tokens)
        add("llamabind:prefix_cache_hits_total", c, "Requests that reused a cached prompt prefix", self.prefix_hits)
        add("llamabind:requests_finished_total", c, "Requests ended, by finish reason",
            0, {f'reason="{k}"': v for k, v in self.finished.items()} or {'reason="stop"': 0})
        add("llamabind:http_responses_total", c, "HTTP responses, by status",
            0, {f'status="{k}"': v for k, v in self.responses.items()} or {'status="200"': 0})
        return "\n".join(out) + "\n"
