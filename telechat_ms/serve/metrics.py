"""Prometheus metrics of the server (prometheus-client), on a registry of its own per server.

Names follow vLLM's (`vllm:num_requests_running` -> `telechat_num_requests_running`, ...), so dashboards carry
over. "Requests" here are sequences: a request with n choices counts n.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """Counters, gauges and histograms the engine updates; render() gives the exposition text."""

    def __init__(self, max_batch_size: int, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.running = Gauge("telechat_num_requests_running", "Sequences in the decode batch now.", registry=r)
        self.waiting = Gauge("telechat_num_requests_waiting", "Sequences waiting for a free row.", registry=r)
        self.batch_rows_max = Gauge("telechat_batch_rows_max", "Most sequences in the batch at once so far.",
                                    registry=r)
        self.batch_rows_capacity = Gauge("telechat_batch_rows_capacity", "Rows of the batch (--max-batch-size).",
                                         registry=r)
        self.batch_rows_capacity.set(max_batch_size)
        self.prompt_tokens = Counter("telechat_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("telechat_generation_tokens", "Tokens generated.", registry=r)
        self.steps = Counter("telechat_engine_steps", "Model steps run by the engine.", registry=r)
        self.mixed_steps = Counter("telechat_mixed_steps", "Steps that prefilled new sequences while others "
                                   "decoded in the same step (requests joining a running batch).", registry=r)
        self.finished = Counter("telechat_requests_finished", "Sequences finished, by reason.",
                                ["finished_reason"], registry=r)
        self.ttft = Histogram("telechat_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("telechat_e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("telechat_inter_token_latency_seconds", "Time between two tokens of a "
                                     "sequence.", buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("telechat_request_queue_time_seconds", "Arrival to admission into a row.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("telechat_batch_occupancy_rows", "Sequences generating in each model step.",
                                    buckets=tuple(range(1, max_batch_size + 1)), registry=r)
        self.prefill_rows = Histogram("telechat_prefill_batch_rows", "Sequences prefilled together in one step.",
                                      buckets=tuple(range(1, max_batch_size + 1)), registry=r)
        self.abort_steps = Histogram("telechat_abort_to_free_steps", "Model steps between a cancellation (client "
                                     "gone) and its row being freed.", buckets=(0, 1, 2, 4, 8, 16, 64), registry=r)
        self.engine_errors = Counter("telechat_engine_errors", "Model steps that raised.", registry=r)
        # paged kv cache (telechat_ms.serve.paged_engine); vLLM's kv_cache_usage_perc, prefix_cache_*, preemptions
        self.blocks_used = Gauge("telechat_kv_cache_blocks_used", "kv-cache blocks held by running sequences "
                                 "(cached blocks nobody uses count as free).", registry=r)
        self.blocks_free = Gauge("telechat_kv_cache_blocks_free", "kv-cache blocks an allocation can take (free, "
                                 "or cached and unused: evicted least recently used first).", registry=r)
        self.blocks_cached = Gauge("telechat_kv_cache_blocks_cached", "Full blocks in the prefix cache.",
                                   registry=r)
        self.cache_usage = Gauge("telechat_kv_cache_usage_perc", "Fraction of kv-cache blocks in use.", registry=r)
        self.prefix_queries = Counter("telechat_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache (full blocks).", registry=r)
        self.prefix_hits = Counter("telechat_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                   registry=r)
        self.prefix_misses = Counter("telechat_prefix_cache_misses", "Prompt tokens looked up and not found.",
                                     registry=r)
        self.evictions = Counter("telechat_prefix_cache_evictions", "Cached blocks evicted for new ones.",
                                 registry=r)
        self.preemptions = Counter("telechat_num_preemptions", "Sequences preempted (blocks freed, recomputed "
                                   "later) because the cache was full.", registry=r)
        self.prefill_chunks = Counter("telechat_prefill_chunks", "Prefill chunks computed (a prompt longer than "
                                      "--max-num-batched-tokens takes several).", registry=r)
        for reason in ("stop", "length", "abort", "error"):
            self.finished.labels(finished_reason=reason)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
