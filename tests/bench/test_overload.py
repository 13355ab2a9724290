"""`python -m bench.overload`: one burst against a real server on a tiny model."""

import asyncio
import gc

from bench.overload import burst
from bench.service import server


def test_a_burst_counts_refusals_and_the_load_generators_own_pauses(byte_checkpoint: tuple[str, str]) -> None:
    ckpt, _ = byte_checkpoint
    kept = [object()]  # alive when the server is ready: frozen, never scanned by a collection again
    with server(ckpt, "cpu", max_queue_size=2, max_batch_size=2, compile=False) as srv:
        assert gc.get_freeze_count() > 0 and not any(o is kept for o in gc.get_objects())
        r = asyncio.run(burst(srv.url, 12, 4))
    assert r["accepted_200"] + r["refused_429"] == 12 and r["refused_429"] > 0 and r["every_accepted_completed"]
    assert r["client_gc_collections"] >= 0 and r["client_gc_longest_ms"] >= 0
    assert (r["client_gc_collections"] == 0) == (r["client_gc_longest_ms"] == 0)
