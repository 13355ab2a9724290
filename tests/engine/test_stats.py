"""EngineStats: what decode steps report reaches the Prometheus metrics at a flush, as the same
observations made one by one would have."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from app.engine import stats as stats_mod
from app.engine.stats import EngineStats, PendingHistogram
from app.metrics import FAST_BUCKETS, Metrics


def samples(hist: Histogram) -> dict[tuple[str, str], float]:
    """Its buckets, count and sum: (suffix after the name, le) -> value."""
    return {
        (s.name.removeprefix(hist._name), s.labels.get("le", "")): s.value
        for m in hist.collect()
        for s in m.samples
        if not s.name.endswith("_created")
    }


def test_a_pending_histogram_flushes_what_observe_would_have_recorded() -> None:
    """Values below, at, between and past the bounds, some several times: after a flush the
    buckets, count and sum are those of a twin histogram observed one value at a time; a
    second flush adds nothing, and what comes after it adds to what is there."""
    registry = CollectorRegistry()
    pending_hist = Histogram("pending", "h", buckets=FAST_BUCKETS, registry=registry)
    direct = Histogram("direct", "h", buckets=FAST_BUCKETS, registry=registry)
    pending = PendingHistogram(pending_hist)
    assert not pending.direct
    values = [(0.0, 1), (0.0005, 2), (0.0007, 3), (0.01, 1), (2.5, 4), (3.0, 2), (1e6, 1)]
    for value, n in values:
        pending.observe(value, n)
        for _ in range(n):
            direct.observe(value)
    assert samples(pending_hist)[("_count", "")] == 0  # nothing before the flush
    pending.flush()
    pending.flush()
    assert samples(pending_hist) == samples(direct)
    pending.observe(0.003, 5)
    pending.flush()
    assert samples(pending_hist)[("_bucket", "0.005")] == samples(direct)[("_bucket", "0.005")] + 5


def test_decode_statistics_reach_the_metrics_at_a_flush() -> None:
    """Two decode steps of two rows and their tokens: nothing shows before the flush, the sums
    after it; the flush is due FLUSH_EVERY_S after the last."""
    metrics = Metrics(k=3)
    stats = EngineStats(metrics)
    value = metrics.registry.get_sample_value

    stats.decode_step(2, 2, [2, 0], [3, 1])  # row 0 verified 2 drafts and accepted both; row 1 did not speculate
    stats.decode_step(2, 1, [1, 1], [1, 2])
    stats.tokens(3, submitted=0.0, last_token_at=1.0, now=1.75)  # 0.25 s per token
    stats.tokens(1, submitted=0.0, last_token_at=None, now=0.5)  # a first token: time to first token, at once
    assert value("mtp_spec_steps_total") == 0 and value("mtp_generated_tokens_total") == 0
    assert value("mtp_time_to_first_token_seconds_count") == 1
    assert not stats.due(stats._flushed_at + stats_mod.FLUSH_EVERY_S / 2)
    assert stats.due(stats._flushed_at + stats_mod.FLUSH_EVERY_S * 1.01)
    stats.flush()
    assert value("mtp_spec_steps_total") == 3
    assert value("mtp_spec_drafted_tokens_total") == 4
    assert value("mtp_spec_accepted_tokens_total") == 3
    assert value("mtp_spec_accepted_by_head_total", {"head": "2"}) == 2
    assert value("mtp_spec_accepted_by_head_total", {"head": "3"}) == 1
    assert value("mtp_spec_accepted_length_count") == 3 and value("mtp_spec_accepted_length_sum") == 6
    assert value("mtp_spec_drafts_per_pass") == 1
    assert value("mtp_batch_size_count", {"kind": "decode"}) == 2
    assert value("mtp_batch_size_bucket", {"kind": "decode", "le": "1.0"}) == 0
    assert value("mtp_batch_size_bucket", {"kind": "decode", "le": "2.0"}) == 2
    assert value("mtp_inter_token_latency_seconds_count") == 3
    assert value("mtp_inter_token_latency_seconds_sum") == 0.75
    assert value("mtp_inter_token_latency_seconds_bucket", {"le": "0.1"}) == 0
    assert value("mtp_inter_token_latency_seconds_bucket", {"le": "0.25"}) == 3
    assert value("mtp_generated_tokens_total") == 4
    stats.flush()  # nothing new: nothing added
    assert value("mtp_spec_steps_total") == 3 and value("mtp_generated_tokens_total") == 4
