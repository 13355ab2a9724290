"""The engine's event-loop side: admission, submission, and the hand-off of each step's outputs.

Every tensor operation runs on one inference thread, in the core loop (core.py), which runs
step after step without waiting on the event loop. The event loop only admits requests into
the core's inbox, receives each step's outputs in one call (several steps' streamed tokens,
within the stream interval: core.py), and hands them to the request streams and futures, so
it stays free to answer /health and /metrics at full load.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from app.decoding.predict import Scores
from app.engine.admission import NO_RESERVATION, Reservation, check_ids, check_sampling
from app.engine.compile import build_compiled
from app.engine.config import EngineConfig, Health, inference_thread
from app.engine.core import Abort, Call, DropAll, EngineCore, Stop, Submit
from app.engine.drafts import DraftPolicy, time_verify_steps, timing_position
from app.engine.stats import EngineStats
from app.engine.types import (
    EngineError,
    EngineNotReady,
    EngineOverloaded,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerateItem,
    GenerateJob,
    InvalidRequest,
    PredictItem,
    PredictJob,
    StepOutput,
    WorkItem,
)
from app.metrics import Metrics
from app.model.checkpoint import resolve_kv_dtype
from app.model.model import MTPTransformer

log = logging.getLogger(__name__)

T = TypeVar("T")
STOP_WAIT_S = 1.0  # shutdown waits this long for the core to finish its step


def _stop_at_exit(core: EngineCore) -> None:
    """Stop the core loop if the program ends without shutdown() (a script, a notebook).

    The loop runs on an executor thread, and Python joins such threads at exit; blocked on its
    inbox, the loop would never return, and the program would hang after its last line.
    threading's exit hooks run before that join, newest first (concurrent.futures registers
    its join the same way, at import), so this one tells the loop to stop in time."""
    ref = weakref.ref(core)

    def stop() -> None:
        alive = ref()
        if alive is not None:
            alive.put(Stop())

    register = getattr(threading, "_register_atexit", None)  # CPython >= 3.9
    if register is not None:
        with contextlib.suppress(RuntimeError):  # the interpreter is already exiting
            register(stop)


class Engine:
    """The EngineClient the API uses (client.py): generate, predict, abort, health, info."""

    def __init__(
        self,
        model: MTPTransformer,
        eos_id: int | None,
        cfg: EngineConfig,
        metrics: Metrics,
        executor: ThreadPoolExecutor | None = None,  # the thread that loaded the model, if any
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.stats = EngineStats(metrics)
        self.k = model.cfg.k
        self.max_seq_len = model.cfg.max_seq_len
        self.device = model.head.proj.weight.device
        self.dtype = model.head.proj.weight.dtype
        model.kv_dtype = resolve_kv_dtype(cfg.kv_cache_dtype, self.dtype, self.device, compiled=cfg.compile)
        eos = frozenset() if eos_id is None else frozenset({eos_id})
        self.core = EngineCore(model, eos, cfg, self.stats, lambda item: self.speculates(item.request))
        self._executor = executor or inference_thread()
        self._running: asyncio.Future[None] | None = None  # the core loop, on the inference thread
        self._accepting = False
        self._queued = 0  # requests submitted to the core and still waiting there
        self._at_door = 0  # queue places held by requests past the door, not yet submitted
        self._live: set[WorkItem] = set()  # submitted and not yet answered
        self._by_id: dict[str, set[GenerateItem]] = {}  # live sequences by request id, for abort()
        self.compiled_info: dict[str, Any] | None = None  # the compiled step shapes, once built

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self, warmup: bool = True) -> None:
        loop = asyncio.get_running_loop()
        compiled = None
        if self.cfg.compile:  # not ready until every shape is compiled (app/engine/compile.py)
            t0 = time.perf_counter()
            try:
                compiled = await loop.run_in_executor(self._executor, build_compiled, self.model, self.cfg)
            except Exception as exc:  # e.g. no C++ compiler for Inductor's CPU kernels
                log.error("compiling the decode steps failed, serving eager steps: %s: %s", type(exc).__name__, exc)
                self.model.kv_dtype = resolve_kv_dtype(self.cfg.kv_cache_dtype, self.dtype, self.device, compiled=False)
                self.compiled_info = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            else:
                self.core.batch.compiled = compiled
                self.compiled_info = {
                    "batch_sizes": compiled.batch_sizes,
                    "widths": compiled.widths,
                    "greedy_widths": compiled.greedy_widths,
                    "shallow_depths": compiled.shallow_depths,
                    "threads": compiled.threads,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
        if compiled is None:
            await loop.run_in_executor(self._executor, self.model.setup_caches, self.cfg.max_batch_size)
        self.core.post = lambda out: loop.call_soon_threadsafe(self._on_step, out)
        self._running = asyncio.wrap_future(self._executor.submit(self.core.run))
        _stop_at_exit(self.core)
        self._accepting = True
        if warmup:
            # Its passes and tokens are not traffic: they go to metrics of their own, left behind.
            await self.call(functools.partial(self.core.report_to, EngineStats(Metrics(self.k))))
            await self._warmup()
            await self.call(functools.partial(self.core.report_to, self.stats))
            if self.cfg.adaptive_drafts and self.cfg.draft_tokens is None and self.k > 1:
                timing = functools.partial(time_verify_steps, self.model, self.cfg.max_batch_size, compiled)
                costs, shallow = await self.call(timing)
                widths = (compiled.greedy_widths or compiled.widths) if compiled is not None else None
                choices = [w - 1 for w in widths] if widths else None
                # made on the inference thread, at the thread count its steps run at (drafts.py)
                position = timing_position(self.model)  # the key length those costs were timed at
                policy = await self.call(functools.partial(DraftPolicy, self.k - 1, costs, choices, shallow, position))
                await self.call(functools.partial(setattr, self.core.batch, "policy", policy))
        await self.call(self.core.snapshot_policies)
        log.info(
            "engine ready: k=%d, max_batch_size=%d, rows decoding at once at most %d, device=%s",
            self.k,
            self.cfg.max_batch_size,
            self.cfg.running_limit,
            self.device,
        )

    async def _warmup(self) -> None:
        """Run full batches of predict, prefill and decode, then one request, before serving.

        The first pass at a new shape pays one-off costs (kernel selection, allocator growth);
        paying them here keeps them out of the first burst of real traffic. The lone request
        comes last: the scheduler holds a lone /predict for up to max_wait_ms when the batch
        before it held several (scheduler.predict_fill_wait), and a warm-up that ended on a full
        batch made the first real request wait for batch mates that were never coming."""
        new = min(4, self.max_seq_len - 1)
        n = min(self.cfg.max_batch_size, self.cfg.max_queue_size)
        prompt = [0] * min(32, self.max_seq_len - new)
        await self.predict([PredictJob(prompt) for _ in range(n)])

        async def one(ids: list[int]) -> None:
            async for _ in self.generate(GenerateJob(ids, max_new_tokens=new)):
                pass

        await asyncio.gather(*(one(prompt) for _ in range(n)))
        await self.predict([PredictJob([0])])
        await one([0])

    async def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the inference thread between two steps of the core loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def done(result: Any, exc: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, future, result, exc)

        self.core.put(Call(fn, done))
        return await future

    async def drain(self, timeout: float) -> bool:
        """Stop taking work and wait for queued and running requests; True if all finished."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.pending()

    async def shutdown(self) -> None:
        self._accepting = False
        if self._running is not None:
            self.core.put(Stop())
            with contextlib.suppress(Exception):  # a stalled pass is left behind (daemon thread)
                await asyncio.wait_for(asyncio.shield(self._running), STOP_WAIT_S)
        self.fail_all(EngineNotReady("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def fail_all(self, error: EngineError) -> None:
        """End every queued and running request with error now (streams get it as their last event).

        The core forgets them at its next step boundary."""
        for item in list(self._live):
            self._answer(item, error)
        self._queued = 0
        self.core.put(DropAll())

    # ---- admission (event loop) ------------------------------------------------------------

    def places_free(self) -> int:
        """Queue places neither queued nor held at the door."""
        return self.cfg.max_queue_size - (self._queued + self._at_door)

    def queue_full(self) -> bool:
        return self.places_free() <= 0

    def turns_away(self) -> bool:
        """Whether enter() would refuse a request now (accepting work, and the queue is full)."""
        return self._accepting and self.queue_full()

    def enter(self) -> Reservation | None:
        """Reserve a queue place for a request about to be read; None when the queue is full."""
        if self.turns_away():
            return None
        self._at_door += 1
        return Reservation(self._leave_door)

    def _leave_door(self) -> None:
        self._at_door -= 1

    def pending(self) -> int:
        return len(self._live)

    def health(self) -> Health:
        alive = self._running is not None and not self._running.done()
        busy_since = self.core.busy_since
        stalled = busy_since is not None and time.monotonic() - busy_since > self.cfg.stall_timeout_s
        detail = "ok" if alive and not stalled else ("worker stalled" if alive else "worker not running")
        return Health(alive=alive, stalled=stalled, accepting=self._accepting, detail=detail)

    def _admit(self, n: int, reservation: Reservation) -> None:
        reservation.release()  # the place held from the door becomes this queue entry
        if not self._accepting:
            raise EngineNotReady("the server is not accepting requests")
        if n > self.cfg.max_queue_size:  # could never fit: not a retryable overload
            raise InvalidRequest(f"{n} inputs exceed the queue capacity of {self.cfg.max_queue_size}")
        depth = self._queued + self._at_door
        if depth + n > self.cfg.max_queue_size:
            raise EngineOverloaded(f"queue full ({depth} waiting, capacity {self.cfg.max_queue_size})")

    def _submit(self, items: list[PredictItem] | list[GenerateItem]) -> None:
        self._queued += len(items)
        self._live.update(items)
        self.core.put(Submit(items))

    def speculates(self, request: GenerateJob) -> bool:
        """Whether a sequence drafts and verifies: the request's choice, else the engine's, and only if k > 1."""
        return self.k > 1 and (self.cfg.speculative if request.speculative is None else request.speculative)

    # ---- requests --------------------------------------------------------------------------

    async def predict(self, requests: list[PredictJob], reservation: Reservation = NO_RESERVATION) -> list[Scores]:
        """Score each request's next k tokens; the requests may share forward passes with others.

        reservation: the queue place `enter` reserved for them; their queue entries replace it."""
        for r in requests:
            check_ids(r.prompt_ids, self.model.cfg.vocab_size, self.max_seq_len)
            if not 1 <= r.top_n <= self.model.cfg.vocab_size:
                raise InvalidRequest(f"top_n must be in [1, {self.model.cfg.vocab_size}]")
            for cand in r.candidates:
                if not 1 <= len(cand) <= self.k:
                    raise InvalidRequest(f"each candidate needs 1 to {self.k} tokens")
                check_ids(cand, self.model.cfg.vocab_size, self.max_seq_len)
        self._admit(len(requests), reservation)
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.cfg.request_timeout_s
        items = [PredictItem(request=r, future=loop.create_future(), deadline=deadline) for r in requests]
        self._submit(items)
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):  # also when the forward outlasts it
                futures = [i.future for i in items if i.future is not None]
                if len(futures) == 1:  # one input, as most requests have: no gathering future
                    return [await futures[0]]
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            raise self.core.timed_out("predict") from None
        finally:
            self._abort([i for i in items if i in self._live])  # a caller that went away leaves nothing behind

    async def generate(
        self, request: GenerateJob, reservation: Reservation = NO_RESERVATION
    ) -> AsyncGenerator[Event, None]:
        """Stream events for one sequence; closing the iterator early cancels the sequence.

        reservation: the queue place `enter` reserved for it; its queue entry replaces it."""
        check_ids(request.prompt_ids, self.model.cfg.vocab_size, self.max_seq_len, request.max_new_tokens)
        check_sampling(request.sampling, self.model.cfg.vocab_size)
        if request.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be at least 1")
        if not 0 <= request.top_logprobs <= self.model.cfg.vocab_size:
            raise InvalidRequest(f"top log-probabilities must be in [0, {self.model.cfg.vocab_size}]")
        self._admit(1, reservation)
        item = GenerateItem(request=request, deadline=time.monotonic() + self.cfg.request_timeout_s)
        self._by_id.setdefault(request.request_id, set()).add(item)
        self._submit([item])
        try:
            while True:
                event = await item.events.get()
                yield event
                if isinstance(event, (FinishEvent, ErrorEvent)):
                    return
        finally:
            self._abort([item])

    def stop(self, request: GenerateJob) -> None:
        """The caller has all it wants of this sequence (a stop sequence matched): end it as a
        success, not a cancellation. Closing its stream then ends it at the next step boundary."""
        for item in self._by_id.get(request.request_id, ()):
            if item.request is request:
                item.stopped = True

    def abort(self, request_id: str) -> None:
        """Cancel every sequence of a request; they leave the queue or the batch at the next step boundary."""
        self._abort(list(self._by_id.get(request_id, ())))

    def _abort(self, items: list[PredictItem] | list[GenerateItem]) -> None:
        live = [i for i in items if i in self._live and not i.cancelled]
        for item in live:
            item.cancelled = True  # forgotten once the core lets it go (StepOutput.released)
        if live:
            self.core.put(Abort(live))  # type: ignore[arg-type]

    def _forget(self, item: WorkItem) -> None:
        self._live.discard(item)
        if isinstance(item, GenerateItem) and item.request.request_id in self._by_id:
            ids = self._by_id[item.request.request_id]
            ids.discard(item)
            if not ids:
                del self._by_id[item.request.request_id]

    # ---- one step's outputs (event loop) ---------------------------------------------------

    def _on_step(self, out: StepOutput) -> None:
        """The core's hand-off: one call per step, for every sequence and /predict request in it."""
        self._queued = max(0, self._queued - out.left_queue)
        for item in out.released:
            self._forget(item)
        for item, result in out.results:
            if item in self._live:
                self._answer(item, result)
        for gen_item, event in out.events:
            if gen_item in self._live:
                gen_item.events.put_nowait(event)
                if isinstance(event, (FinishEvent, ErrorEvent)):
                    self._forget(gen_item)

    def _answer(self, item: WorkItem, result: Any) -> None:
        """Give a request its result (or error) and forget it."""
        self._forget(item)
        if isinstance(item, PredictItem):
            if item.future is not None and not item.future.done():
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
        elif isinstance(item, GenerateItem) and isinstance(result, EngineError):
            item.events.put_nowait(ErrorEvent(result))

    def info(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "kv_cache_dtype": str(self.model.kv_dtype or self.dtype).removeprefix("torch."),
            "k": self.k,
            "speculative": self.cfg.speculative and self.k > 1,
            "compiled": self.compiled_info,
            "draft_policy": None,
            "threads": None,
            "thread_timings": None,
            "running_limit": self.cfg.running_limit,  # rows decoding at once at most
            **self.core.policy_info,
        }


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
