"""Prompt scores (GenerateJob.prompt_logprobs): a PromptEvent before the first tokens, computed in
the prefill pass for the rows that ask, equal to head 1 of an uncached forward over the prompt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.engine.config import EngineConfig
from app.engine.engine import Engine
from app.engine.types import ErrorEvent, Event, FinishEvent, GenerateJob, PromptEvent, TokenEvent
from app.metrics import Metrics
from app.model.checkpoint import load_checkpoint
from tests.conftest import head1_prompt_logprobs

PROMPTS = [[5, 17, 42, 8, 99, 3], [7], [100, 3, 9, 250, 11, 64, 2, 2, 40]]


@pytest.fixture
async def engine(checkpoint: Path) -> AsyncIterator[Engine]:
    model, _ = load_checkpoint(checkpoint)
    engine = Engine(
        model, eos_id=None, cfg=EngineConfig(max_batch_size=8, compile=False), metrics=Metrics(k=model.cfg.k)
    )
    await engine.start(warmup=False)
    yield engine
    await engine.shutdown()


async def events_of(engine: Engine, job: GenerateJob) -> list[Event]:
    events = [event async for event in engine.generate(job)]
    assert not any(isinstance(e, ErrorEvent) for e in events), events
    return events


async def test_prompt_scores_come_first_for_the_rows_that_ask_in_a_ragged_batch(engine: Engine) -> None:
    running = engine.generate(GenerateJob([1, 2, 3], max_new_tokens=30))  # a row already in the batch
    assert isinstance(await anext(running), TokenEvent)
    jobs = [
        GenerateJob(PROMPTS[0], max_new_tokens=5, prompt_logprobs=True, top_logprobs=2),
        GenerateJob(PROMPTS[1], max_new_tokens=5, prompt_logprobs=True),
        GenerateJob(PROMPTS[2], max_new_tokens=5),
    ]
    got = await asyncio.gather(*(events_of(engine, job) for job in jobs))
    await running.aclose()
    for job, events in zip(jobs[:2], got[:2], strict=True):
        first, *rest = events
        assert isinstance(first, PromptEvent) and not any(isinstance(e, PromptEvent) for e in rest)
        assert first.logprobs == pytest.approx(head1_prompt_logprobs(engine.model, job.prompt_ids), abs=1e-5)
        assert isinstance(rest[0], TokenEvent) and isinstance(rest[-1], FinishEvent)
    assert got[1][0] == PromptEvent([])  # a one-token prompt: nothing to score
    assert not any(isinstance(e, PromptEvent) for e in got[2])
    plain = await events_of(engine, GenerateJob(PROMPTS[0], max_new_tokens=5, top_logprobs=2))
    tokens = [t for e in got[0] if isinstance(e, TokenEvent) for t in e.token_ids]
    assert tokens == [t for e in plain if isinstance(e, TokenEvent) for t in e.token_ids]  # scoring changes nothing
