"""The engine tests' shared fixture: engines on the tiny checkpoint, shut down after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from app.engine.config import EngineConfig
from app.engine.engine import Engine
from app.metrics import Metrics
from app.model.checkpoint import load_checkpoint


@pytest.fixture
async def engine_factory(checkpoint: Path) -> AsyncIterator[Callable[..., Any]]:
    engines: list[Engine] = []

    async def make(ckpt: Path | None = None, start: bool = True, device: str = "cpu", **cfg: Any) -> Engine:
        model, tok = load_checkpoint(ckpt or checkpoint, device=device)
        cfg.setdefault("compile", False)  # compiled steps: tests/engine/test_compiled.py
        cfg.setdefault("stream_interval_ms", 0)  # every step handed over; the interval's tests set it
        engine = Engine(model, eos_id=tok.eot_id, cfg=EngineConfig(**cfg), metrics=Metrics(k=model.cfg.k))
        if start:
            await engine.start(warmup=False)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.shutdown()
