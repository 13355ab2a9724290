"""Start-up time: from starting `mtp serve` to /ready 200, against an older commit's server.

    python -m bench.startup [--baseline GIT_REF] [--rounds 2] [--cold] [--cache-dir DIR] [--out FILE]

Phases, one server at a time (two would fight over the cores), default settings on the
default model:
  1. with --cold, each server once on an empty compile cache of its own (every graph traced,
     lowered, autotuned and built);
  2. `rounds` warm starts in alternating phases (A, B, A, B ...: this checkout, then GIT_REF's
     code in a temporary worktree) on one shared cache, which the first of them fills if it is
     empty (that start is then reported, and not counted as warm).
Each start reports its seconds to /ready 200 and the compile time its log gives ("decode steps
compiled in X s"). A server's warm figure is the median of its rounds; every ratio comes from
this one run.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from app import config
from bench.decoding import write_json
from bench.server import ROOT, baseline_tree, progress, running

COMPILED = re.compile(r"decode steps compiled in ([0-9.]+) s")


def start_phase(
    root: Path, checkpoint: str, cache_dir: Path, settings: dict[str, object] | None = None
) -> dict[str, Any]:
    """One server of root's code: seconds to /ready 200, and to compile (from its log)."""
    base = {"log_level": "INFO", "compile_cache_dir": str(cache_dir), **(settings or {})}
    with tempfile.TemporaryDirectory() as logs:
        t0 = time.perf_counter()
        with running(checkpoint, base, root=root, log_dir=Path(logs), ready_timeout=3600) as srv:
            ready_s = time.perf_counter() - t0
        log = srv.log()  # once it has exited: every line written
    found = COMPILED.search(log)
    return {"ready_s": round(ready_s, 1), "compile_s": float(found.group(1)) if found else None}


def bench_startup(
    checkpoint: str,
    baseline: str | None,
    rounds: int,
    cold: bool,
    cache_dir: str | None,
    settings: dict[str, object] | None = None,
) -> dict[str, Any]:
    """settings: MTP_* settings over the defaults (the tests turn compiling off)."""
    roots = {"this": ROOT} | ({"baseline": baseline_tree(baseline)} if baseline else {})
    out: dict[str, Any] = {"checkpoint": checkpoint, "baseline": baseline, "rounds": rounds}
    with tempfile.TemporaryDirectory() as scratch:
        if cold:
            out["cold"] = {
                name: progress(
                    "bench.startup",
                    f"{name} cold",
                    start_phase(root, checkpoint, Path(scratch) / f"cold-{name}", settings),
                )
                for name, root in roots.items()
            }
        shared = Path(cache_dir) if cache_dir else Path(scratch) / "cold-this" if cold else Path(scratch) / "shared"
        if not shared.is_dir() or not any(shared.iterdir()):
            out["filling_start"] = progress(
                "bench.startup", "filling the cache", start_phase(ROOT, checkpoint, shared, settings)
            )
        warm: dict[str, list[dict[str, Any]]] = {name: [] for name in roots}
        for r in range(rounds):
            for name, root in roots.items():
                warm[name].append(
                    progress(
                        "bench.startup", f"{name} warm, round {r + 1}", start_phase(root, checkpoint, shared, settings)
                    )
                )
    out["warm_rounds"] = warm
    out["warm"] = {
        name: {key: _median([p[key] for p in phases]) for key in ("ready_s", "compile_s")}
        for name, phases in warm.items()
    }
    if baseline:
        ratios: dict[str, float | None] = {}
        for phase in ("warm", "cold"):
            if phase in out:
                this, base = out[phase]["this"]["ready_s"], out[phase]["baseline"]["ready_s"]
                ratios[f"{phase}_ready_this_vs_baseline"] = round(this / base, 3) if this and base else None
        out["ratios"] = ratios
    return out


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 1) if known else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--baseline", help="a git ref whose server to start in alternating phases")
    parser.add_argument("--rounds", type=int, default=2, help="warm starts per server")
    parser.add_argument("--cold", action="store_true", help="first start each server once on an empty cache")
    parser.add_argument("--cache-dir", help="the shared compile cache of the warm starts (default: a new one)")
    parser.add_argument("--out", help="also write the JSON here")
    a = parser.parse_args()
    write_json(bench_startup(a.checkpoint, a.baseline, a.rounds, a.cold, a.cache_dir), a.out)


if __name__ == "__main__":
    main()
