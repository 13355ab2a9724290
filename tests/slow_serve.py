"""`python -m tests.slow_serve serve ...`: `mtp serve` whose every forward pass first sleeps
TEST_FORWARD_DELAY_S seconds, so that a stream lasts long enough to be dropped, drained or timed
out mid-way without burning CPU. Test-only: the service itself has no such seam."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from app.cli.main import main
from app.engine.passes import Passes


def slow_forward_passes(delay_s: float) -> None:
    run = Passes._guarded

    def slowed(self: Passes, kind: str, fn: Callable[[], Any]) -> Any:
        time.sleep(delay_s)
        return run(self, kind, fn)

    Passes._guarded = slowed  # type: ignore[method-assign]


if __name__ == "__main__":
    slow_forward_passes(float(os.environ.get("TEST_FORWARD_DELAY_S") or 0))
    sys.exit(main())
