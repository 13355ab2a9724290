"""The inference thread: where every tensor operation runs, at a lower priority than the event loop."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.engine.config import inference_thread

pytestmark = pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread priorities: Linux")


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def team_nices() -> set[int]:
    """The nice values of this process's threads other than the caller's."""
    me = threading.get_native_id()
    out = set()
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != me:
            out.add(os.getpriority(os.PRIO_PROCESS, int(tid)))
    return out


def test_the_inference_thread_and_its_openmp_team_run_below_the_event_loop() -> None:
    base = thread_nice()
    worker = inference_thread(nice=3)
    try:
        before = set(os.listdir("/proc/self/task"))

        def work() -> tuple[int, list[int]]:
            torch.randn(256, 256) @ torch.randn(256, 256)  # starts this thread's OpenMP team
            new = set(os.listdir("/proc/self/task")) - before
            return thread_nice(), [os.getpriority(os.PRIO_PROCESS, int(t)) for t in new]

        nice, team = worker.submit(work).result()
    finally:
        worker.shutdown()
    assert nice == min(base + 3, 19)
    assert team and set(team) == {nice}  # the team's threads (and the worker) inherit it
    assert thread_nice() == base  # the caller's thread keeps its own
    unchanged = inference_thread()
    try:
        assert unchanged.submit(thread_nice).result() == base
    finally:
        unchanged.shutdown()


def test_the_service_setting_reaches_the_engine_thread(app_factory: Callable[..., Any]) -> None:
    base = thread_nice()
    with TestClient(app_factory(inference_nice=2)) as client:
        engine = client.app.state.service.engine  # type: ignore[attr-defined]
        assert client.portal.call(engine.call, thread_nice) == min(base + 2, 19)  # type: ignore[union-attr]
    assert thread_nice() == base
