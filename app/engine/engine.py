"""The engine: owns the model; token ids in, token ids and probabilities out.

One asyncio worker task forms batches; every tensor operation runs on a single dedicated
thread (the executor), so the event loop stays free to answer /health and /metrics at full
load. /predict requests are batched into one padded forward pass; /generate sequences share
a continuous (iteration-level) batch with a KV cache: new sequences are prefilled and join at
step boundaries, finished or cancelled ones leave without stalling the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from app.decoding.generate import first_tokens, prefill
from app.decoding.predict import Scores, score_next
from app.decoding.sampling import BatchSampling, make_generator
from app.engine.admission import DoorTicket, check_ids, check_sampling, door_ticket
from app.engine.batch import DecodeBatch, RunningSequence
from app.engine.config import EngineConfig, Health, inference_thread
from app.engine.drafts import DraftPolicy, time_verify_steps
from app.engine.stats import EngineStats
from app.engine.types import (
    EngineError,
    EngineFailure,
    EngineNotReady,
    EngineOverloaded,
    EngineTimeout,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerateItem,
    GenerateJob,
    InvalidRequest,
    PredictItem,
    PredictJob,
    TokenEvent,
)
from app.metrics import Metrics
from app.model.model import MTPTransformer

log = logging.getLogger(__name__)


T = TypeVar("T")


class Engine:
    def __init__(
        self,
        model: MTPTransformer,
        eos_id: int | None,
        cfg: EngineConfig,
        metrics: Metrics,
        executor: ThreadPoolExecutor | None = None,  # the thread that loaded the model, if any
    ) -> None:
        self.model = model
        self._eos: frozenset[int] = frozenset() if eos_id is None else frozenset({eos_id})
        self.cfg = cfg
        self.stats = EngineStats(metrics)
        self.k = model.cfg.k
        self.max_seq_len = model.cfg.max_seq_len
        self.device = model.head.proj.weight.device
        self.dtype = model.head.proj.weight.dtype
        self._predict_q: deque[PredictItem] = deque()
        self._gen_q: deque[GenerateItem] = deque()
        self._wakeup = asyncio.Event()
        self._executor = executor or inference_thread()
        self._task: asyncio.Task[None] | None = None
        self._batch = DecodeBatch(model, cfg.draft_tokens)
        self._accepting = False
        self._stopping = False
        self._busy_since: float | None = None
        self._last_predict_batch = 0
        self._at_door = 0  # queue places held by requests past the door, not yet submitted
        self._predicting: list[PredictItem] = []  # the /predict batch on the worker now

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self, warmup: bool = True) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.model.setup_caches, self.cfg.max_batch_size)
        self._task = asyncio.create_task(self._run(), name="mtp-engine")
        self._accepting = True
        if warmup:
            await self._warmup()
            if self.cfg.adaptive_drafts and self.cfg.draft_tokens is None and self.k > 1:
                time_them = functools.partial(time_verify_steps, self.model, self.cfg.max_batch_size)
                costs = await loop.run_in_executor(self._executor, time_them)
                self._batch.policy = DraftPolicy(self.k - 1, costs)
        log.info("engine ready: k=%d, max_batch_size=%d, device=%s", self.k, self.cfg.max_batch_size, self.device)

    async def _warmup(self) -> None:
        """Run one request, then full batches of predict, prefill and decode, before serving.

        The first pass at a new shape pays one-off costs (kernel selection, allocator growth);
        paying them here keeps them out of the first burst of real traffic."""
        new = min(4, self.max_seq_len - 1)
        await self.predict([PredictJob([0])])
        async for _ in self.generate(GenerateJob([0], max_new_tokens=new)):
            pass
        n = min(self.cfg.max_batch_size, self.cfg.max_queue_size)
        prompt = [0] * min(32, self.max_seq_len - new)
        await self.predict([PredictJob(prompt) for _ in range(n)])

        async def one() -> None:
            async for _ in self.generate(GenerateJob(prompt, max_new_tokens=new)):
                pass

        await asyncio.gather(*(one() for _ in range(n)))

    async def drain(self, timeout: float) -> bool:
        """Stop taking work and wait for queued and running requests; True if all finished."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.pending()

    async def shutdown(self) -> None:
        self._accepting = False
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self.fail_all(EngineNotReady("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def fail_all(self, error: EngineError) -> None:
        """End every queued and running request with error now (streams get it as their last event).

        Running sequences leave the batch at the next step boundary, as cancelled ones do."""
        for item in [*self._predict_q, *self._predicting]:
            self._fail_predict(item, error)
        for gitem in [*self._gen_q, *(s.item for s in self._batch.seqs)]:
            self._finish_error(gitem, error)
        self._predict_q.clear()
        self._gen_q.clear()
        self._update_gauges()

    def places_free(self) -> int:
        """Queue places neither queued nor held at the door."""
        return self.cfg.max_queue_size - (len(self._predict_q) + len(self._gen_q) + self._at_door)

    def queue_full(self) -> bool:
        return self.places_free() <= 0

    def enter(self) -> DoorTicket | None:
        """Hold a queue place for a request about to be read; None when the queue is full."""
        if self._accepting and self.queue_full():
            return None
        self._at_door += 1
        return DoorTicket(self._leave_door)

    def _leave_door(self) -> None:
        self._at_door -= 1

    def pending(self) -> int:
        return len(self._predict_q) + len(self._gen_q) + len(self._batch)

    def health(self) -> Health:
        alive = self._task is not None and not self._task.done()
        stalled = self._busy_since is not None and time.monotonic() - self._busy_since > self.cfg.stall_timeout_s
        detail = "ok" if alive and not stalled else ("worker stalled" if alive else "worker not running")
        return Health(alive=alive, stalled=stalled, accepting=self._accepting, detail=detail)

    # ---- submission (event loop) -----------------------------------------------------------

    def _admit(self, n: int) -> None:
        door_ticket.get().release()  # the place held at the door becomes this queue entry
        if not self._accepting:
            raise EngineNotReady("the server is not accepting requests")
        if n > self.cfg.max_queue_size:  # could never fit: not a retryable overload
            raise InvalidRequest(f"{n} inputs exceed the queue capacity of {self.cfg.max_queue_size}")
        depth = len(self._predict_q) + len(self._gen_q) + self._at_door
        if depth + n > self.cfg.max_queue_size:
            raise EngineOverloaded(f"queue full ({depth} waiting, capacity {self.cfg.max_queue_size})")

    def speculates(self, request: GenerateJob) -> bool:
        """Whether a sequence drafts and verifies: the request's choice, else the engine's, and only if k > 1."""
        return self.k > 1 and (self.cfg.speculative if request.speculative is None else request.speculative)

    async def predict(self, requests: list[PredictJob]) -> list[Scores]:
        """Score each request's next k tokens; the requests may share forward passes with others."""
        for r in requests:
            check_ids(r.prompt_ids, self.model.cfg.vocab_size, self.max_seq_len)
            if not 1 <= r.top_n <= self.model.cfg.vocab_size:
                raise InvalidRequest(f"top_n must be in [1, {self.model.cfg.vocab_size}]")
            for cand in r.candidates:
                if not 1 <= len(cand) <= self.k:
                    raise InvalidRequest(f"each candidate needs 1 to {self.k} tokens")
                check_ids(cand, self.model.cfg.vocab_size, self.max_seq_len)
        self._admit(len(requests))
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.cfg.request_timeout_s
        items = [PredictItem(request=r, future=loop.create_future(), deadline=deadline) for r in requests]
        self._predict_q.extend(items)
        self._update_gauges()
        self._wakeup.set()
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):  # also when the forward outlasts it
                return list(await asyncio.gather(*(i.future for i in items if i.future is not None)))
        except TimeoutError:
            raise self._timed_out("predict") from None
        finally:
            for item in items:  # a caller that went away leaves nothing behind in the queue
                if item.future is not None and not item.future.done():
                    item.cancelled = True
                    item.future.cancel()
                    if item in self._predict_q:
                        self._predict_q.remove(item)
                        self.stats.cancelled()
            self._update_gauges()

    async def generate(self, request: GenerateJob) -> AsyncGenerator[Event, None]:
        """Stream events for one sequence; closing the iterator early cancels the sequence."""
        check_ids(request.prompt_ids, self.model.cfg.vocab_size, self.max_seq_len, request.max_new_tokens)
        check_sampling(request.sampling, self.model.cfg.vocab_size)
        if request.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be at least 1")
        self._admit(1)
        item = GenerateItem(request=request, deadline=time.monotonic() + self.cfg.request_timeout_s)
        self._gen_q.append(item)
        self._update_gauges()
        self._wakeup.set()
        try:
            while True:
                event = await item.events.get()
                yield event
                if isinstance(event, (FinishEvent, ErrorEvent)):
                    return
        finally:
            if not item.finished:
                self.abort(item)

    def abort(self, item: GenerateItem) -> None:
        """Cancel a sequence; it leaves the queue or the batch at the next step boundary."""
        if item.finished or item.cancelled:
            return
        item.cancelled = True
        if item in self._gen_q:  # still queued: leave now, not when a slot frees up
            self._gen_q.remove(item)
            item.finished = True
            self.stats.cancelled()
            self._update_gauges()
        self._wakeup.set()

    # ---- the worker (event loop side) ------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            try:
                if not (self._predict_q or self._gen_q or len(self._batch)):
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._yield_to_network()
                if self._predict_q:
                    await self._run_predict_batch()
                if self._gen_q and len(self._batch) < self.cfg.max_batch_size:
                    await self._run_prefill()
                if len(self._batch):
                    await self._run_decode_step()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the worker die on a bug; fail the requests it held
                log.exception("engine worker error")
                self._fail_running(EngineFailure("internal error in the inference worker"))

    async def _yield_to_network(self) -> None:
        """Let the event loop work off its backlog before a forward pass takes the cores.

        One loop iteration normally; while an iteration takes over 0.3 ms (a burst of requests
        being read, admitted or refused), more, up to max_wait_ms in all. Refusals and
        admissions of a burst then do not queue behind forward passes for CPU (measured with
        `python -m bench.overload`: a 1 ms threshold left bursts whose 429 p99 reached 50 ms).
        """
        deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(0)
            now = time.monotonic()
            if now - t0 < 0.0003 or now >= deadline:
                return

    async def _in_worker(self, kind: str, fn: Callable[[], T]) -> T:
        """Run fn on the worker thread, timing it as one forward pass of `kind`."""
        self._busy_since = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            with self.stats.forward(kind):
                return await loop.run_in_executor(self._executor, self._guarded, kind, fn)
        finally:
            self._busy_since = None

    def _guarded(self, kind: str, fn: Callable[[], T]) -> T:
        """One forward pass of `kind` ("predict", "prefill" or "decode") on the worker thread."""
        with torch.inference_mode():
            return fn()

    def _timed_out(self, where: str) -> EngineTimeout:
        """The one timeout error (504), logged as one line: an expected event, not a fault."""
        log.info("request timed out after %gs (%s)", self.cfg.request_timeout_s, where)
        return EngineTimeout(f"request timed out after {self.cfg.request_timeout_s:g}s")

    def _expired(self, item: PredictItem | GenerateItem, now: float) -> bool:
        if item.cancelled:
            self.stats.cancelled()
            return True
        return now > item.deadline

    async def _run_predict_batch(self) -> None:
        cfg = self.cfg
        # Batch formation: a lone request on an idle worker runs at once; under concurrency (the
        # last batch held several requests) wait up to max_wait_ms from the oldest arrival to fill.
        if not len(self._batch) and self._last_predict_batch > 1:
            deadline = self._predict_q[0].submitted + cfg.max_wait_ms / 1000
            while len(self._predict_q) < cfg.max_batch_size and (left := deadline - time.monotonic()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=left)
                except TimeoutError:
                    break
        now = time.monotonic()
        items: list[PredictItem] = []
        while self._predict_q and len(items) < cfg.max_batch_size:
            item = self._predict_q.popleft()
            if item.future is not None and item.future.done():
                continue  # the caller went away
            if self._expired(item, now):
                self._fail_predict(item, self._timed_out("predict, in the queue"))
                continue
            items.append(item)
        self._update_gauges()
        self._last_predict_batch = len(items)
        if not items:
            return
        self.stats.batch("predict", (i.submitted for i in items), now)
        prompts = [i.request.prompt_ids for i in items]
        top_n = max(i.request.top_n for i in items)
        cands = [i.request.candidates for i in items]
        self._predicting = items
        try:
            scores = await self._in_worker("predict", lambda: score_next(self.model, prompts, top_n, cands))
        except Exception as exc:
            log.exception("predict batch of %d failed", len(items))
            for item in items:
                self._fail_predict(item, EngineFailure(f"forward pass failed: {type(exc).__name__}"))
            return
        finally:
            self._predicting = []
        for b, item in enumerate(items):
            if item.future is not None and not item.future.done():
                item.future.set_result(_row(scores, b, item.request.top_n))

    async def _run_prefill(self) -> None:
        now = time.monotonic()
        free = self.cfg.max_batch_size - len(self._batch)
        items: list[GenerateItem] = []
        while self._gen_q and len(items) < free:
            item = self._gen_q.popleft()
            if self._expired(item, now):
                self._finish_error(item, self._timed_out("generate, in the queue"))
                continue
            items.append(item)
        self._update_gauges()
        if not items:
            return
        self.stats.batch("prefill", (i.submitted for i in items), now)
        seqs = [
            RunningSequence(
                item=i,
                generator=None if i.request.sampling.greedy else make_generator(i.request.sampling.seed),
                speculative=self.speculates(i.request),
                stop_ids=i.request.stop_token_ids | self._eos,
            )
            for i in items
        ]
        try:
            outputs = await self._in_worker("prefill", lambda: self._prefill_sync(seqs))
        except Exception as exc:
            log.exception("prefill of %d sequences failed", len(items))
            for item in items:
                self._finish_error(item, EngineFailure(f"forward pass failed: {type(exc).__name__}"))
            return
        self._deliver(outputs)

    def _prefill_sync(self, seqs: list[RunningSequence]) -> list[tuple[RunningSequence, list[int], list[float]]]:
        self._batch.compact()  # rows 0..n-1 hold the running sequences; new ones go after them
        row0 = len(self._batch)
        prompts = [s.item.request.prompt_ids for s in seqs]
        sampling = BatchSampling.from_params(
            [s.item.request.sampling for s in seqs], [s.generator for s in seqs], self.device
        )
        want = torch.tensor([s.speculative for s in seqs], dtype=torch.bool, device=self.device)
        first = first_tokens(prefill(self.model, prompts, row0=row0), sampling, want)
        self._batch.concatenate(seqs, first, [len(p) for p in prompts])
        for s in seqs:
            self.stats.prompt_tokens(len(s.item.request.prompt_ids))
        return self._collect(first.tokens[:, :1].tolist(), first.logprobs[:, :1].tolist(), [1] * len(seqs), row0)

    async def _run_decode_step(self) -> None:
        now = time.monotonic()
        for s in self._batch.seqs:
            if not s.item.finished and self._expired(s.item, now):
                err = self._timed_out("generate") if not s.item.cancelled else None
                self._finish(s, "cancelled", err)
        self._drop_finished()
        if not len(self._batch):
            return
        try:
            outputs = await self._in_worker("decode", self._decode_sync)
        except Exception as exc:
            log.exception("decode step of %d sequences failed", len(self._batch))
            self._fail_running(EngineFailure(f"forward pass failed: {type(exc).__name__}"))
            return
        self._deliver(outputs)

    def _decode_sync(self) -> list[tuple[RunningSequence, list[int], list[float]]]:
        res = self._batch.step()
        counts = res.n_emitted.tolist()
        self.stats.decode_step(len(self._batch), self._batch.last_drafts, self._batch.last_max_accept, counts)
        return self._collect(res.tokens.tolist(), res.logprobs.tolist(), counts, 0)

    def _collect(
        self, tokens: list[list[int]], logprobs: list[list[float]], counts: list[int], row0: int
    ) -> list[tuple[RunningSequence, list[int], list[float]]]:
        """Per sequence: the tokens to emit, cut at EOS / stop tokens / max_new_tokens."""
        out = []
        for r, (toks, lps, n) in enumerate(zip(tokens, logprobs, counts, strict=True)):
            seq = self._batch.seqs[row0 + r]
            keep = min(n, seq.remaining)
            for t in range(keep):
                if toks[t] in seq.stop_ids:
                    keep = t + 1
                    break
            seq.generated += keep
            out.append((seq, toks[:keep], lps[:keep]))
        return out

    # ---- delivery (event loop) -------------------------------------------------------------

    def _deliver(self, outputs: list[tuple[RunningSequence, list[int], list[float]]]) -> None:
        now = time.monotonic()
        for seq, toks, lps in outputs:
            if seq.item.finished or seq.item.cancelled:  # a cancelled one leaves at the next step
                continue
            if now > seq.item.deadline:  # a pass that ended past the deadline delivers nothing
                self._finish(seq, "cancelled", self._timed_out("generate"))
                continue
            reason = "eos_token" if toks and toks[-1] in seq.stop_ids else ("length" if seq.remaining <= 0 else None)
            if toks:
                self.stats.tokens(len(toks), seq.item.submitted, seq.last_token_at, now)
                seq.last_token_at = now
                seq.item.events.put_nowait(TokenEvent(toks, lps, final=reason is not None))
            if reason is not None:
                self._finish(seq, reason)
        self._drop_finished()

    def _drop_finished(self) -> None:
        """Finished and cancelled sequences leave the batch now, before the next step is formed.

        Runs on the event loop between worker calls (never during one); the cache rows are
        compacted later, on the worker thread, before the next forward pass.
        """
        self._batch.filter([not s.item.finished for s in self._batch.seqs])
        self._update_gauges()

    def _finish(self, seq: RunningSequence, reason: str, error: Exception | None = None) -> None:
        item = seq.item
        item.finished = True
        if error is not None:
            item.events.put_nowait(ErrorEvent(error))  # type: ignore[arg-type]
            return
        if item.cancelled:
            return
        req = item.request
        item.events.put_nowait(
            FinishEvent(
                reason=reason,
                generated_tokens=seq.generated,
                prompt_tokens=len(req.prompt_ids),
                drafted_tokens=seq.drafted,
                accepted_tokens=seq.accepted,
                verify_steps=seq.verify_steps,
                seed=req.sampling.seed,
            )
        )

    def _finish_error(self, item: GenerateItem, error: Exception) -> None:
        if item.finished:
            return
        item.finished = True
        item.events.put_nowait(ErrorEvent(error))  # type: ignore[arg-type]

    def _fail_predict(self, item: PredictItem, error: Exception) -> None:
        if item.future is not None and not item.future.done():
            item.future.set_exception(error)

    def _fail_running(self, error: Exception) -> None:
        """A failed decode step: fail every sequence in the batch and start a fresh one."""
        for seq in self._batch.seqs:
            self._finish_error(seq.item, error)
        self._batch = DecodeBatch(self.model, self.cfg.draft_tokens, self._batch.policy)
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.stats.gauges(len(self._predict_q) + len(self._gen_q), len(self._batch))

    def info(self) -> dict[str, Any]:
        policy = self._batch.policy
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "k": self.k,
            "speculative": self.cfg.speculative and self.k > 1,
            "draft_policy": policy.describe() if policy is not None else None,
        }


def _row(scores: Scores, b: int, top_n: int) -> Scores:
    """Row b of a batch's scores, trimmed to that request's top_n."""
    return Scores(
        top_ids=[[ids[:top_n] for ids in scores.top_ids[b]]],
        top_probs=[[p[:top_n] for p in scores.top_probs[b]]],
        top_logprobs=[[p[:top_n] for p in scores.top_logprobs[b]]],
        greedy=[scores.greedy[b]],
        candidates=[scores.candidates[b]],
    )
